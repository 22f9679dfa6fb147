"""Record types for every kind of training data, and Llama 2's rating-to-margin tables.

A prompt or a response is either plain text (the "standard" style) or a list of chat messages
`{"role": ..., "content": ...}` (the "conversational" style, rendered later with the tokenizer's chat
template). Records validate themselves on construction, so a record built in code (by the lab, by an
annotator) is held to the same rules as one read from a file; the loaders add the file and line to the
error.
"""

from __future__ import annotations

import difflib
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from rlhflab.errors import ConfigError, DataError

Message = dict[str, Any]
Conversation = list[Message]
Text = str | Conversation

# Llama 2's preference-strength ratings (Touvron et al. 2023, Sec. 3.2.1), strongest first: the index is the
# strength that `rlhflab.losses.llama2_margins` maps to a margin (Table 27).
LLAMA2_RATINGS = ("significantly_better", "better", "slightly_better", "negligibly_better")

# The paper's label is "Negligibly Better / Unsure"; accept the common ways people write it.
_RATING_ALIASES = {
    "negligibly_better_unsure": "negligibly_better",
    "negligibly_better_or_unsure": "negligibly_better",
    "unsure": "negligibly_better",
}


class RecordError(DataError):
    """A record that breaks a rule; `reason` is the message without the location prefix."""

    def __init__(self, reason: str, *, field: str | None = None):
        super().__init__(reason, field=field)
        self.reason = reason


def normalize_rating(name: str) -> str:
    """Canonical form of a rating name: lower case, words joined by "_", Llama 2 aliases resolved.

    "Significantly Better", "significantly-better" and "significantly_better" all give
    "significantly_better"; "Negligibly better / unsure" gives "negligibly_better".
    """
    slug = "_".join(re.findall(r"[a-z0-9]+", str(name).lower()))
    return _RATING_ALIASES.get(slug, slug)


def normalize_margin_table(table: Mapping[str, float]) -> dict[str, float]:
    """A user's rating -> margin table with its keys normalized; values must be finite numbers."""
    out: dict[str, float] = {}
    for name, value in table.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ConfigError(
                f"margin table: the margin for rating {name!r} must be a finite number, got {value!r}"
            )
        out[normalize_rating(name)] = float(value)
    return out


def margin_for_rating(rating: str, table: Mapping[str, float]) -> float:
    """The margin a (normalized) rating maps to; raises RecordError naming the known ratings if unknown."""
    return float(table[check_rating(rating, table)])


def check_rating(rating: str, known: Iterable[str]) -> str:
    """The normalized rating, which must be one of `known`; raises RecordError naming them if not."""
    key, known = normalize_rating(rating), list(known)
    if key in known:
        return key
    close = difflib.get_close_matches(key, known, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    raise RecordError(
        f"unknown rating {rating!r}; expected one of {', '.join(known)}{hint} "
        "(or pass margin_table= with your own rating names)",
        field="rating",
    )


def is_conversation(value: Any) -> bool:
    """True for a list whose items are all dicts (a message list); an empty list counts as one."""
    return isinstance(value, (list, tuple)) and all(isinstance(m, Mapping) for m in value)


def check_text(value: Any, field: str, *, allow_empty: bool = True) -> Text:
    """Validate a prompt/response: a string or a list of {"role","content"} messages (returned copied)."""
    if isinstance(value, str):
        if not allow_empty and not value.strip():
            raise RecordError("is empty; expected non-empty text", field=field)
        return value
    if isinstance(value, (list, tuple)) and value and is_conversation(value):
        return [_check_message(m, field, i) for i, m in enumerate(value)]
    if isinstance(value, (list, tuple)) and not value:
        raise RecordError("is an empty list; expected text or a non-empty list of messages", field=field)
    raise RecordError(
        f"expected a string or a list of {{'role', 'content'}} messages, got {_describe(value)}", field=field
    )


def _check_message(message: Mapping, field: str, index: int) -> Message:
    # Arrow-backed sources give every message every key seen in the column, with None where absent.
    msg = {k: v for k, v in message.items() if v is not None}
    for key in ("role", "content"):
        if not isinstance(msg.get(key), str):
            raise RecordError(
                f"message {index} needs a string {key!r}, got {_describe(msg.get(key))} in {dict(message)!r}",
                field=field,
            )
    return msg


def _describe(value: Any) -> str:
    text = repr(value)
    text = text if len(text) <= 60 else text[:57] + "..."
    return f"{type(value).__name__} {text}"


def _check_response(value: Any, field: str, prompt: Text | None) -> Text:
    """A response must match the prompt's style; text given for a chat prompt becomes one assistant turn."""
    value = check_text(value, field, allow_empty=False)
    if prompt is None:
        return value
    if isinstance(prompt, list) and isinstance(value, str):
        return [{"role": "assistant", "content": value}]
    if isinstance(prompt, str) and isinstance(value, list):
        raise RecordError(
            "is a list of messages but the prompt is text; give the prompt as a list of "
            "messages too (or the response as text)",
            field=field,
        )
    return value


def _check_prompt(value: Any, field: str = "prompt", *, allow_empty: bool = True) -> Text:
    return check_text(value, field, allow_empty=allow_empty)


@dataclass(frozen=True)
class SFTRecord:
    """A demonstration: `prompt` + `completion` (loss on the completion), or a multi-turn `messages`
    conversation (loss on every assistant turn). Exactly one of the two forms is set."""

    prompt: Text | None = None
    completion: Text | None = None
    messages: Conversation | None = None

    def __post_init__(self):
        if self.messages is not None:
            if self.prompt is not None or self.completion is not None:
                raise RecordError(
                    "give either 'messages' or 'prompt' + 'completion', not both", field="messages"
                )
            msgs = check_text(self.messages, "messages")
            if not isinstance(msgs, list):
                raise RecordError("expected a list of messages, got text", field="messages")
            if not any(m["role"] == "assistant" for m in msgs):
                raise RecordError(
                    "has no assistant message, so nothing would be trained on", field="messages"
                )
            object.__setattr__(self, "messages", msgs)
            return
        if self.prompt is None or self.completion is None:
            missing = "prompt" if self.prompt is None else "completion"
            raise RecordError("is missing; expected 'prompt' and 'completion', or 'messages'", field=missing)
        prompt = _check_prompt(self.prompt)
        object.__setattr__(self, "prompt", prompt)
        object.__setattr__(self, "completion", _check_response(self.completion, "completion", prompt))


@dataclass(frozen=True)
class PairwiseRecord:
    """A preference: `chosen` is better than `rejected` for `prompt`.

    `margin` (a number) is how much better, for margin losses; `rating` is the annotator's Llama 2 label in
    normalized form (e.g. "slightly_better"), kept even when it has been turned into `margin`.
    """

    prompt: Text
    chosen: Text
    rejected: Text
    margin: float | None = None
    rating: str | None = None

    def __post_init__(self):
        prompt = _check_prompt(self.prompt)
        chosen = _check_response(self.chosen, "chosen", prompt)
        rejected = _check_response(self.rejected, "rejected", prompt)
        if chosen == rejected:
            raise RecordError("is identical to 'rejected', so the pair carries no preference", field="chosen")
        object.__setattr__(self, "prompt", prompt)
        object.__setattr__(self, "chosen", chosen)
        object.__setattr__(self, "rejected", rejected)
        if self.margin is not None:
            m = self.margin
            if isinstance(m, bool) or not isinstance(m, (int, float)) or not math.isfinite(m):
                raise RecordError(f"expected a finite number, got {_describe(m)}", field="margin")
            object.__setattr__(self, "margin", float(m))
        if self.rating is not None:
            if not isinstance(self.rating, str):
                raise RecordError(
                    f"expected a rating name (string), got {_describe(self.rating)}", field="rating"
                )
            object.__setattr__(self, "rating", normalize_rating(self.rating))


@dataclass(frozen=True)
class RankedRecord:
    """K >= 2 responses to one prompt, ordered best to worst.

    Ties: `ranks[i]` is the rank of `responses[i]` (0 = best); equal ranks are ties. Ranks must be
    non-decreasing (the responses are already in order) and are stored dense (0, 1, 1, 2, ...).
    Without ties (`ranks=None`), ranks are 0..K-1.
    """

    prompt: Text
    responses: list[Text]
    ranks: tuple[int, ...] | None = None

    def __post_init__(self):
        prompt = _check_prompt(self.prompt)
        if not isinstance(self.responses, (list, tuple)) or is_conversation(self.responses):
            raise RecordError(
                f"expected a list of responses (each text or a list of messages), ordered best "
                f"to worst, got {_describe(self.responses)}",
                field="responses",
            )
        responses = [_check_response(r, "responses", prompt) for r in self.responses]
        if len(responses) < 2:
            raise RecordError(
                f"has {len(responses)} response(s); a ranking needs at least 2", field="responses"
            )
        object.__setattr__(self, "prompt", prompt)
        object.__setattr__(self, "responses", responses)
        object.__setattr__(self, "ranks", _check_ranks(self.ranks, len(responses)))

    @property
    def tie_groups(self) -> list[list[int]]:
        """Indices of the responses grouped by rank, best group first, e.g. [[0], [1, 2], [3]]."""
        groups: list[list[int]] = []
        for i, r in enumerate(self.ranks):
            if r == len(groups):
                groups.append([])
            groups[r].append(i)
        return groups

    @property
    def has_ties(self) -> bool:
        return len(set(self.ranks)) < len(self.ranks)


def _check_ranks(ranks: Any, k: int) -> tuple[int, ...]:
    if ranks is None:
        return tuple(range(k))
    if not isinstance(ranks, (list, tuple)) or any(
        isinstance(r, bool) or not isinstance(r, int) for r in ranks
    ):
        raise RecordError(
            f"expected a list of integers (equal = tied), got {_describe(ranks)}", field="ranks"
        )
    if len(ranks) != k:
        raise RecordError(f"has {len(ranks)} entries but there are {k} responses", field="ranks")
    if any(b < a for a, b in zip(ranks, ranks[1:])):
        raise RecordError(
            f"{list(ranks)} is not non-decreasing; responses must be ordered best to worst, "
            "with equal ranks for ties",
            field="ranks",
        )
    if len(set(ranks)) < 2:
        raise RecordError("ties every response, so the ranking carries no preference", field="ranks")
    dense = {r: i for i, r in enumerate(sorted(set(ranks)))}
    return tuple(dense[r] for r in ranks)


@dataclass(frozen=True)
class UnpairedRecord:
    """Binary feedback on one response (KTO style): `label` True = desirable."""

    prompt: Text
    completion: Text
    label: bool

    def __post_init__(self):
        prompt = _check_prompt(self.prompt)
        object.__setattr__(self, "prompt", prompt)
        object.__setattr__(self, "completion", _check_response(self.completion, "completion", prompt))
        if not isinstance(self.label, bool):
            raise RecordError(f"expected true or false, got {_describe(self.label)}", field="label")


@dataclass(frozen=True)
class PromptRecord:
    """A prompt alone, for RL stages that generate their own responses."""

    prompt: Text

    def __post_init__(self):
        object.__setattr__(self, "prompt", _check_prompt(self.prompt, allow_empty=False))


@dataclass(frozen=True)
class StepwiseRecord:
    """A solution in steps with a correctness label per step (process supervision, Lightman et al. 2023): TRL's
    stepwise-supervision format, `prompt`, `completions` (the step texts, in order) and `labels` (one bool per
    step, True = the step is correct)."""

    prompt: Text
    completions: list[str]
    labels: list[bool]

    def __post_init__(self):
        prompt = _check_prompt(self.prompt)
        steps = self.completions
        if not isinstance(steps, (list, tuple)) or not steps or not all(isinstance(s, str) for s in steps):
            raise RecordError(
                f"expected a non-empty list of step texts (strings), got {_describe(steps)}",
                field="completions",
            )
        empty = [i for i, s in enumerate(steps) if not s.strip()]
        if empty:
            raise RecordError(f"step {empty[0]} is empty; every step needs text", field="completions")
        labels = self.labels
        if not isinstance(labels, (list, tuple)) or not all(isinstance(y, bool) for y in labels):
            raise RecordError(
                f"expected a list of true/false, one per step, got {_describe(labels)}", field="labels"
            )
        if len(labels) != len(steps):
            raise RecordError(f"has {len(labels)} labels but there are {len(steps)} steps", field="labels")
        object.__setattr__(self, "prompt", prompt)
        object.__setattr__(self, "completions", list(steps))
        object.__setattr__(self, "labels", list(labels))


Record = SFTRecord | PairwiseRecord | RankedRecord | UnpairedRecord | PromptRecord | StepwiseRecord

RECORD_TYPES: dict[str, type] = {
    "sft": SFTRecord,
    "pairwise": PairwiseRecord,
    "ranked": RankedRecord,
    "unpaired": UnpairedRecord,
    "prompt": PromptRecord,
    "stepwise": StepwiseRecord,
}


def record_to_dict(record: Record) -> dict[str, Any]:
    """The JSON form of a record, as the loaders read it back (None fields and trivial ranks left out)."""
    if isinstance(record, SFTRecord):
        return (
            {"messages": record.messages}
            if record.messages is not None
            else {"prompt": record.prompt, "completion": record.completion}
        )
    if isinstance(record, PairwiseRecord):
        out = {"prompt": record.prompt, "chosen": record.chosen, "rejected": record.rejected}
        out.update({k: v for k, v in (("margin", record.margin), ("rating", record.rating)) if v is not None})
        return out
    if isinstance(record, RankedRecord):
        out = {"prompt": record.prompt, "responses": record.responses}
        if record.has_ties:
            out["ranks"] = list(record.ranks)
        return out
    if isinstance(record, UnpairedRecord):
        return {"prompt": record.prompt, "completion": record.completion, "label": record.label}
    if isinstance(record, PromptRecord):
        return {"prompt": record.prompt}
    if isinstance(record, StepwiseRecord):
        return {"prompt": record.prompt, "completions": record.completions, "labels": record.labels}
    raise TypeError(f"not an rlhflab record: {type(record).__name__}")
