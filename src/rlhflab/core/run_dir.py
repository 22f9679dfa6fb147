"""Run directories.

RUN/
  config.yaml          the resolved config, written before training starts
  metrics.jsonl        one JSON object per logged step: {"step": N, "time": s, "loss/...": ...}
  tb/                  TensorBoard event files (when tensorboard is installed and enabled)
  checkpoints/step-N/  resumable state: model, optimizer, scheduler, RNG states
  final/               the trained model in Hugging Face format
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

from rlhflab.errors import UserError


def prepare_run_dir(output_dir: str | Path, stage: str, *, resume: bool, overwrite: bool = False) -> Path:
    """Create (or reopen, with resume) the run directory, refusing to clobber an earlier run by accident."""
    out = Path(output_dir) if output_dir else Path("runs") / f"{stage}-{time.strftime('%Y%m%d-%H%M%S')}"
    if out.exists() and any(out.iterdir()):
        if resume:
            return out
        if overwrite:
            shutil.rmtree(out)
        else:
            raise UserError(
                f"output directory '{out}' already holds a run; pass --resume to continue it, "
                "--overwrite to replace it, or choose another logging.output_dir"
            )
    elif resume:
        raise UserError(f"--resume: output directory '{out}' holds no run to resume")
    out.mkdir(parents=True, exist_ok=True)
    _FRESH_RUN_DIRS.append(out)
    return out


# Run directories this process created. When bad input (a malformed record, an impossible config) stops a
# run, the CLI removes them, so a failed launch leaves nothing half-written behind.
_FRESH_RUN_DIRS: list[Path] = []


def discard_fresh_runs() -> list[Path]:
    """Delete the run directories created by this process that hold no checkpoint and no final model;
    returns the removed paths. Called on input errors only: a run stopped by a health guard keeps its files."""
    removed = []
    while _FRESH_RUN_DIRS:
        out = _FRESH_RUN_DIRS.pop()
        trained = any(
            p.is_dir()
            and (p.name == "final" or (p.name.startswith("step-") and p.parent.name == "checkpoints"))
            for p in out.rglob("*")
        )
        if out.is_dir() and not trained:
            shutil.rmtree(out, ignore_errors=True)
            removed.append(out)
    return removed
