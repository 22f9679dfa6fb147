"""Load typed records from any supported source, with errors that point at the file, record and field.

    result = load_records("prefs.jsonl", "pairwise", margin_table={"much_better": 2.0, "better": 1.0})
    result.records  # list[PairwiseRecord]

Field names follow TRL: `prompt`/`completion` or `messages` (SFT); `prompt`/`chosen`/`rejected` with an
optional `margin` or `rating` (pairwise); `prompt`/`responses` (best first) with optional `ranks` for ties
(ranked); `prompt`/`completion`/`label` (unpaired); `prompt`/`completions`/`labels` (stepwise: the steps of
one solution and a bool per step, TRL's stepwise-supervision format); `prompt` (prompts). Other column names are
mapped with `column_map={"prompt": "question"}` (our field -> your column).
"""

from __future__ import annotations

import difflib
import json
import logging
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from rlhflab.data.readers import data_error, open_source
from rlhflab.data.records import (
    LLAMA2_RATINGS,
    PairwiseRecord,
    PromptRecord,
    RankedRecord,
    Record,
    RecordError,
    SFTRecord,
    StepwiseRecord,
    UnpairedRecord,
    check_rating,
    check_text,
    is_conversation,
    margin_for_rating,
    normalize_margin_table,
)
from rlhflab.errors import ConfigError, DataError

logger = logging.getLogger(__name__)

FIELDS: dict[str, tuple[str, ...]] = {
    "sft": ("prompt", "completion", "messages"),
    "pairwise": ("prompt", "chosen", "rejected", "margin", "rating"),
    "ranked": ("prompt", "responses", "ranks"),
    "unpaired": ("prompt", "completion", "label"),
    "prompt": ("prompt",),
    "stepwise": ("prompt", "completions", "labels"),
}
KINDS = tuple(FIELDS)
# Column names other datasets use for our fields, offered as "did you mean" before spelling matches.
_SYNONYMS = {
    "prompt": ("question", "instruction", "input", "query", "context", "text"),
    "completion": ("response", "output", "answer", "target", "reply"),
    "chosen": ("preferred", "winner", "accepted", "better", "response_chosen"),
    "rejected": ("dispreferred", "loser", "worse", "response_rejected"),
    "responses": ("completions", "candidates", "ranking", "ranked_responses"),
    "messages": ("conversation", "conversations", "dialogue", "chat"),
    "label": ("desirable", "kto_label", "feedback", "thumbs_up"),
    "completions": ("steps", "solution_steps"),
    "labels": ("step_labels", "step_correct"),
}
_MAX_KEPT_ERRORS = 10


@dataclass
class LoadResult:
    """What `load_records` read: the records, how many malformed ones were skipped, and why (the first few)."""

    records: list[Record]
    n_skipped: int
    path: str
    skipped_errors: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.records)

    def __iter__(self) -> Iterator[Record]:
        return iter(self.records)


class _Row:
    """One raw row seen through the column map; CSV cells are parsed from text on access."""

    def __init__(self, row: dict[str, Any], column_map: Mapping[str, str], text_cells: bool):
        self.row, self.column_map, self.text_cells = row, column_map, text_cells

    def column(self, name: str) -> str:
        return self.column_map.get(name, name)

    def has(self, name: str) -> bool:
        value = self.row.get(self.column(name))
        return value is not None and not (self.text_cells and value == "")

    def optional(self, name: str) -> Any:
        return self.row.get(self.column(name)) if self.has(name) else None

    def required(self, name: str, hint: str = "") -> Any:
        column = self.column(name)
        if column not in self.row or self.row[column] is None:
            raise RecordError(_missing_message(name, column, self.row, self.column_map, hint), field=name)
        return self.row[column]

    def text(self, name: str, hint: str = "") -> Any:
        value = self.required(name, hint)
        return _parse_json_cell(value) if self.text_cells else value

    def json_list(self, name: str, value: Any) -> Any:
        if self.text_cells and isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError as e:
                raise RecordError(
                    f"expected a JSON list in this CSV cell ({e.msg} at column {e.colno})", field=name
                ) from None
        return value


def _missing_message(
    name: str, column: str, row: Mapping[str, Any], column_map: Mapping[str, str], hint: str
) -> str:
    state = "is null" if column in row else "is missing"
    where = f"(read from column '{column}') " if column != name else ""
    columns = [c for c in row if c not in column_map.values()]
    found = ", ".join(map(repr, columns)) or "none"
    guess = [c for c in _SYNONYMS.get(name, ()) if c in columns]
    guess = guess or difflib.get_close_matches(name, columns, n=1, cutoff=0.5)
    suggestion = (
        f"; did you mean {guess[0]!r}? Map it with column_map={{{name!r}: {guess[0]!r}}}" if guess else ""
    )
    detail = " ".join(part for part in (state, where.strip(), hint.strip()) if part)
    return f"{detail}; columns found: {found}{suggestion}"


def _parse_json_cell(value: Any) -> Any:
    """A CSV cell holding a JSON message list becomes that list; other text stays text ("[INST] hi")."""
    if isinstance(value, str) and value.lstrip().startswith("["):
        try:
            parsed = json.loads(value)
        except json.JSONDecodeError:
            return value
        if isinstance(parsed, list) and parsed and is_conversation(parsed):
            return parsed
    return value


def _parse_sft(r: _Row, margins: Mapping[str, float] | None) -> SFTRecord:
    if r.has("messages"):
        return SFTRecord(messages=r.text("messages"))
    hint = "(expected 'prompt' + 'completion', or 'messages')"
    return SFTRecord(prompt=r.text("prompt", hint), completion=r.text("completion", hint))


def _parse_pairwise(r: _Row, margins: Mapping[str, float] | None) -> PairwiseRecord:
    chosen, rejected = r.text("chosen"), r.text("rejected")
    if r.has("prompt") or not (is_conversation(chosen) and is_conversation(rejected)):
        prompt = r.text(
            "prompt",
            "(a prompt can be left out only when 'chosen' and 'rejected' are message "
            "lists that share it as their first messages)",
        )
    else:
        prompt, chosen, rejected = _split_shared_prefix(chosen, rejected)
    margin, rating = r.optional("margin"), r.optional("rating")
    if margin is not None and r.text_cells:
        margin = _parse_float(margin, "margin")
    if isinstance(rating, str):
        # A rating alone never sets a margin (algo.margin=small|large reads the rating, =data the margin),
        # unless the caller passes its own table.
        if margins is None:
            check_rating(rating, LLAMA2_RATINGS)
        elif margin is None:
            margin = margin_for_rating(rating, margins)
    return PairwiseRecord(prompt, chosen, rejected, margin=margin, rating=rating)


def _split_shared_prefix(chosen: Any, rejected: Any) -> tuple[list, list, list]:
    """TRL's implicit prompt: the leading messages that chosen and rejected share."""
    chosen, rejected = check_text(chosen, "chosen"), check_text(rejected, "rejected")
    n = 0
    while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
        n += 1
    if n == 0:
        raise RecordError(
            "is missing, and 'chosen' and 'rejected' share no leading messages to take it from; "
            "add a 'prompt' field",
            field="prompt",
        )
    if n == len(chosen) or n == len(rejected):
        side = "chosen" if n == len(chosen) else "rejected"
        raise RecordError(
            "has no messages after the prompt it shares with the other response; "
            "'chosen' and 'rejected' must differ after the shared prompt",
            field=side,
        )
    return chosen[:n], chosen[n:], rejected[n:]


def _parse_ranked(r: _Row, margins: Mapping[str, float] | None) -> RankedRecord:
    responses = r.json_list("responses", r.required("responses", "(a list of responses, best first)"))
    ranks = r.optional("ranks")
    if ranks is not None:
        ranks = r.json_list("ranks", ranks)
    return RankedRecord(r.text("prompt"), responses, ranks=ranks)


def _parse_unpaired(r: _Row, margins: Mapping[str, float] | None) -> UnpairedRecord:
    label = r.required("label", "(true = desirable, false = undesirable)")
    if r.text_cells:
        label = _parse_bool(label, "label")
    return UnpairedRecord(r.text("prompt"), r.text("completion"), label)


def _parse_prompt(r: _Row, margins: Mapping[str, float] | None) -> PromptRecord:
    return PromptRecord(r.text("prompt"))


def _parse_stepwise(r: _Row, margins: Mapping[str, float] | None) -> StepwiseRecord:
    steps = r.json_list("completions", r.required("completions", "(a list of step texts, in order)"))
    labels = r.json_list("labels", r.required("labels", "(a list of true/false, one per step)"))
    return StepwiseRecord(r.text("prompt"), steps, labels)


_PARSERS: dict[str, Callable[[_Row, Mapping[str, float] | None], Record]] = {
    "sft": _parse_sft,
    "pairwise": _parse_pairwise,
    "ranked": _parse_ranked,
    "unpaired": _parse_unpaired,
    "prompt": _parse_prompt,
    "stepwise": _parse_stepwise,
}


def _parse_float(value: str, name: str) -> float:
    try:
        return float(value)
    except ValueError:
        raise RecordError(f"expected a number, got {value!r}", field=name) from None


def _parse_bool(value: str, name: str) -> bool:
    text = value.strip().lower()
    if text in ("true", "1", "yes"):
        return True
    if text in ("false", "0", "no"):
        return False
    raise RecordError(f"expected true or false, got {value!r}", field=name)


def _check_options(kind: str, column_map: Mapping[str, str] | None) -> dict[str, str]:
    if kind not in FIELDS:
        raise ConfigError(f"unknown data kind {kind!r}; expected one of {', '.join(KINDS)}")
    column_map = dict(column_map or {})
    for key, value in column_map.items():
        if key not in FIELDS[kind]:
            raise ConfigError(
                f"column_map key {key!r} is not a field of {kind!r} records; its fields are "
                f"{', '.join(FIELDS[kind])} (column_map maps our field -> your column)"
            )
        if not isinstance(value, str):
            raise ConfigError(f"column_map[{key!r}] must be a column name (string), got {value!r}")
    return column_map


def load_records(
    source: Any,
    kind: str,
    *,
    split: str | None = None,
    skip_bad: bool = False,
    margin_table: Mapping[str, float] | None = None,
    column_map: Mapping[str, str] | None = None,
) -> LoadResult:
    """Read and validate every record of `source` as `kind` records.

    Args:
        source: a path (.jsonl, .json, .csv, .tsv, .parquet, or a `save_to_disk` directory), a
            `datasets.Dataset`/`DatasetDict`, or a list of dicts.
        kind: "sft", "pairwise", "ranked", "unpaired", "prompt" or "stepwise".
        split: the split of a DatasetDict (needed only when it has several).
        skip_bad: skip malformed records instead of raising on the first; they are counted in
            `n_skipped` and logged. Zero usable records is an error either way.
        margin_table: rating -> margin, to fill the `margin` of pairwise records that give only a `rating`
            (an explicit `margin` wins); None (default): `margin` is only what the record says.
        column_map: our field -> your column name, e.g. {"prompt": "question"}.

    Raises:
        DataError: naming the file, the line/index, the field and what was expected.
        ConfigError: an unknown kind or column_map key, or a bad split.
    """
    column_map = _check_options(kind, column_map)
    margins = None if margin_table is None else normalize_margin_table(margin_table)
    src = open_source(source, split)
    parse = _PARSERS[kind]
    records: list[Record] = []
    errors: list[str] = []
    n_bad = 0
    for number, row in src.rows:
        try:
            if isinstance(row, DataError):
                raise row
            records.append(parse(_Row(row, column_map, src.text_cells), margins))
            continue
        except RecordError as e:
            err = data_error(e.reason, path=src.name, unit=src.unit, number=number, field=e.field)
        except DataError as e:
            err = e
        if not skip_bad:
            raise err from None
        n_bad += 1
        if len(errors) < _MAX_KEPT_ERRORS:
            errors.append(str(err))
    if not records:
        if n_bad:
            raise data_error(
                f"no usable {kind} records: all {n_bad} were malformed; the first: {errors[0]}", path=src.name
            )
        raise data_error(f"no records found; the source is empty (expected {kind} records)", path=src.name)
    if n_bad:
        logger.warning(
            "%s: skipped %d malformed of %d records (skip_bad=True); the first: %s",
            src.name,
            n_bad,
            n_bad + len(records),
            errors[0],
        )
    return LoadResult(records, n_bad, src.name, errors)
