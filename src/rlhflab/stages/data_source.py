"""A stage's records: read from data.train_path (any format of `rlhflab.data`), with the held-out split."""

from __future__ import annotations

import random
from typing import Any

from rlhflab.config import DataSection, PromptDataSection
from rlhflab.data import load_records
from rlhflab.errors import ConfigError


def require_train_path(data: DataSection | PromptDataSection, kind: str) -> None:
    """Refuse an empty data.train_path before anything is loaded."""
    if not data.train_path:
        raise ConfigError(
            f"config: data.train_path is empty; give a {kind} data file (JSONL/JSON/CSV/Parquet or a saved "
            "datasets directory), or on the command line use a lab model (model.name_or_path=lab:TASK, or a "
            "model trained from one) to get built-in data"
        )


def load_train_records(data: DataSection | PromptDataSection, kind: str, *, log=print) -> list[Any]:
    """The records of data.train_path (a prompt section has no held-out split)."""
    require_train_path(data, kind)
    return _load(data.train_path, kind, data, log)


def load_stage_records(data: DataSection, kind: str, *, seed: int, log=print) -> tuple[list[Any], list[Any]]:
    """(train records, eval records) for a stage, with skipped-record counts reported through `log`.

    Eval records come from data.eval_path, else a seeded data.eval_fraction of the training records."""
    train = load_train_records(data, kind, log=log)
    if data.eval_path:
        return train, _load(data.eval_path, kind, data, log)
    if data.eval_fraction > 0:
        order = list(range(len(train)))
        random.Random(seed).shuffle(order)
        n_eval = max(1, int(len(train) * data.eval_fraction))
        held = set(order[:n_eval])
        return [r for i, r in enumerate(train) if i not in held], [train[i] for i in sorted(held)]
    return train, []


def _load(source: str, kind: str, data: DataSection | PromptDataSection, log) -> list[Any]:
    columns = getattr(data, "columns", None) or None  # prompt sections have none
    result = load_records(
        source, kind, split=data.split or None, skip_bad=data.skip_bad_records, column_map=columns
    )
    if result.n_skipped:
        log(f"data: skipped {result.n_skipped} malformed records of {source} (data.skip_bad_records=true)")
    return list(result.records)
