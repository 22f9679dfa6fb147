"""Where a stage's records come from: the user's files, or the lab's built-in data.

With `data.train_path` set, records are read from it (any format of `rlhflab.data`). Left empty while
the model is a lab model ('lab:TASK', or a model trained from one, such as runs/sft/final), the lab makes
the task's data with its simulated annotators, so `rlhflab sft` and the stages after it work out of the
box. Anything else is an error that says what to set.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

from rlhflab.config import DataSection
from rlhflab.data import load_records
from rlhflab.errors import ConfigError

# Which file of the lab's data each record kind reads.
LAB_FILES = {"sft": "sft", "pairwise": "pairs", "prompt": "prompts", "ranked": "rankings", "unpaired": "unpaired"}


def lab_task_of(model_name: str) -> str | None:
    """The lab task a model belongs to: 'lab:TASK' or 'lab:TASK:BUDGET' -> TASK; a model directory trained
    from a lab base model (its config.json carries the task, see `rlhflab.lab.pretrain.LAB_TASK_KEY`) -> that
    task; anything else -> None."""
    if model_name.startswith("lab:"):
        return model_name[len("lab:"):].partition(":")[0]
    from rlhflab.lab.pretrain import LAB_TASK_KEY

    config = Path(model_name) / "config.json"
    try:
        task = json.loads(config.read_text()).get(LAB_TASK_KEY) if config.is_file() else None
    except (OSError, ValueError):
        return None
    return task if isinstance(task, str) and task else None


def lab_data(task: str, out_dir: Path, *, seed: int, kinds: tuple[str, ...]) -> dict[str, Path]:
    """Make (or reuse) the lab task's data in `out_dir`; returns {kind file name: path}."""
    from rlhflab.lab.make_data import make_task_data

    wanted = {LAB_FILES[k] for k in kinds}
    existing = {name: out_dir / f"{name}.jsonl" for name in wanted}
    if all(p.exists() for p in existing.values()):
        return existing
    return make_task_data(task, out_dir, seed=seed, n_rankings=500 if "rankings" in wanted else 0,
                          n_unpaired=1000 if "unpaired" in wanted else 0)


def load_stage_records(data: DataSection, kind: str, *, model_name: str, run_dir: Path, seed: int,
                       log=print) -> tuple[list[Any], list[Any]]:
    """(train records, eval records) for a stage, with skipped-record counts reported through `log`."""
    if data.train_path:
        train_source = data.train_path
    elif (task := lab_task_of(model_name)) is not None:
        paths = lab_data(task, run_dir / "data", seed=seed, kinds=(kind,))
        train_source = str(paths[LAB_FILES[kind]])
        origin = "" if model_name.startswith("lab:") else f" ({model_name} comes from the lab's '{task}' base model)"
        log(f"data: made the lab task '{task}' {kind} data in {run_dir / 'data'}{origin}")
    else:
        raise ConfigError(
            f"config: data.train_path is empty; give a {kind} data file (JSONL/JSON/CSV/Parquet or a saved "
            "datasets directory), or use a lab model (model.name_or_path=lab:TASK, or a model trained from one) "
            "to get built-in data")
    train = _load(train_source, kind, data, log)
    if data.eval_path:
        return train, _load(data.eval_path, kind, data, log)
    if data.eval_fraction > 0:
        order = list(range(len(train)))
        random.Random(seed).shuffle(order)
        n_eval = max(1, int(len(train) * data.eval_fraction))
        held = set(order[:n_eval])
        return [r for i, r in enumerate(train) if i not in held], [train[i] for i in sorted(held)]
    return train, []


def _load(source: str, kind: str, data: DataSection, log) -> list[Any]:
    result = load_records(source, kind, split=data.split or None, skip_bad=data.skip_bad_records)
    if result.n_skipped:
        log(f"data: skipped {result.n_skipped} malformed records of {source} (data.skip_bad_records=true)")
    return list(result.records)
