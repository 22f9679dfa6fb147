"""Runs: output directory, metrics (JSONL always, TensorBoard, W&B), progress with ETA, checkpoints.

A run directory looks like:

    RUN/
      config.yaml          the resolved config, written before training starts
      metrics.jsonl        one JSON object per logged step: {"step": N, "time": s, "loss/...": ...}
      tb/                  TensorBoard event files (when tensorboard is installed and enabled)
      checkpoints/step-N/  resumable state: model, optimizer, scheduler, RNG states, data position
      final/               the trained model in Hugging Face format

Exact resume: the data order of each epoch is a permutation drawn from (seed, epoch), so a checkpoint
only needs the epoch and the position inside it; together with the optimizer, scheduler and all RNG
states, a resumed run ends with the same weights as an uninterrupted one.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rlhflab.errors import TrainingHealthError, UserError

# --------------------------------------------------------------------------------------------------------
# Seeding and data order
# --------------------------------------------------------------------------------------------------------


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def epoch_permutation(n: int, seed: int, epoch: int) -> list[int]:
    """The data order of `epoch`: a function of (seed, epoch) only, so resuming needs no sampler state."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=g).tolist()


def batch_schedule(n: int, batch_size: int, seed: int, epoch: int, *, drop_last: bool = True) -> list[list[int]]:
    """Index batches for one epoch. drop_last keeps every step the same size (steady loss scale)."""
    order = epoch_permutation(n, seed, epoch)
    stop = (n // batch_size) * batch_size if drop_last else n
    return [order[i:i + batch_size] for i in range(0, stop, batch_size)]


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# --------------------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------------------


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write through a temp file in the same directory and rename: a reader never sees half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    """`atomic_write_bytes` of UTF-8 text."""
    atomic_write_bytes(path, text.encode("utf-8"))


@contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield a temp directory beside `path`; on success it replaces `path`, on failure it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    try:
        yield tmp
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            path.rename(old)
            tmp.rename(path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


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
                "--overwrite to replace it, or choose another logging.output_dir")
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
        trained = any(p.is_dir() and (p.name == "final" or (p.name.startswith("step-") and p.parent.name == "checkpoints"))
                      for p in out.rglob("*"))
        if out.is_dir() and not trained:
            shutil.rmtree(out, ignore_errors=True)
            removed.append(out)
    return removed


# --------------------------------------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------------------------------------


def _scalar(v: Any) -> float | None:
    if isinstance(v, torch.Tensor):
        if v.numel() != 1:
            return None
        v = v.item()
    if isinstance(v, (int, float, np.floating, np.integer)) and not isinstance(v, bool):
        return float(v)
    return None


class MetricsLogger:
    """Writes every logged step to metrics.jsonl, and to TensorBoard / W&B when enabled."""

    def __init__(self, run_dir: Path, *, tensorboard: bool = True, wandb: bool = False,
                 wandb_project: str = "rlhflab", config: dict[str, Any] | None = None):
        self.path = Path(run_dir) / "metrics.jsonl"
        self._file = open(self.path, "a")  # noqa: SIM115 (kept open for the run's life)
        self._t0 = time.time()
        self._tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
                self._tb = SummaryWriter(log_dir=str(Path(run_dir) / "tb"))
            except ImportError:  # tensorboard is optional
                self._tb = None
        self._wandb = None
        if wandb:
            try:
                import wandb as wandb_mod
            except ImportError:
                raise UserError("logging.wandb=true needs the wandb package: pip install wandb") from None
            self._wandb = wandb_mod.init(project=wandb_project, dir=str(run_dir), config=config or {})

    def log(self, step: int, metrics: dict[str, Any]) -> dict[str, float]:
        row = {k: s for k, v in metrics.items() if (s := _scalar(v)) is not None}
        record = {"step": step, "time": round(time.time() - self._t0, 3), **row}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._tb is not None:
            for k, v in row.items():
                if math.isfinite(v):
                    self._tb.add_scalar(k, v, step)
        if self._wandb is not None:
            self._wandb.log(row, step=step)
        return row

    def close(self) -> None:
        self._file.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """All rows of a metrics.jsonl file."""
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


# --------------------------------------------------------------------------------------------------------
# Progress
# --------------------------------------------------------------------------------------------------------


class Progress:
    """A rich progress bar with ETA and the latest metrics; silent when disabled or not a terminal-ish run."""

    def __init__(self, total: int, description: str, *, enabled: bool = True, completed: int = 0):
        self._bar = None
        if enabled:
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )
            from rich.progress import Progress as RichProgress
            self._bar = RichProgress(
                TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(), TextColumn("{task.fields[info]}"),
                transient=False)
            self._task = self._bar.add_task(description, total=total, completed=completed, info="")
            self._bar.start()

    def update(self, advance: int = 1, info: dict[str, float] | None = None) -> None:
        if self._bar is None:
            return
        text = "  ".join(f"{k.split('/')[-1]}={v:.4g}" for k, v in (info or {}).items())
        self._bar.update(self._task, advance=advance, **({"info": text} if info is not None else {}))

    def print(self, message: str) -> None:
        """Print above the bar (a plain print would be overwritten by the live display)."""
        if self._bar is None:
            print(message)
        else:
            self._bar.console.print(message, markup=False, highlight=False)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


# --------------------------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------------------------


def save_checkpoint(run_dir: Path, step: int, *, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    scheduler: Any = None, state: dict[str, Any] | None = None, keep: int = 2) -> Path:
    """Write checkpoints/step-N atomically (model + optimizer + scheduler + RNG + `state`), keep the last `keep`."""
    ckpt_root = Path(run_dir) / "checkpoints"
    target = ckpt_root / f"step-{step:08d}"
    with atomic_dir(target) as tmp:
        torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, tmp / "model.pt")
        torch.save({
            "step": step,
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict() if scheduler is not None else None,
            "rng": rng_state(),
            "state": state or {},
        }, tmp / "trainer_state.pt")
    for old in sorted(ckpt_root.glob("step-*"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return target


def latest_checkpoint(run_dir: Path) -> Path | None:
    ckpts = sorted((Path(run_dir) / "checkpoints").glob("step-*"))
    return ckpts[-1] if ckpts else None


def load_checkpoint(path: Path, *, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    scheduler: Any = None) -> dict[str, Any]:
    """Restore a checkpoint written by `save_checkpoint`; returns {"step": N, **state}."""
    model.load_state_dict(torch.load(path / "model.pt", map_location="cpu", weights_only=True))
    trainer = torch.load(path / "trainer_state.pt", map_location="cpu", weights_only=False)
    optimizer.load_state_dict(trainer["optimizer"])
    if scheduler is not None and trainer["scheduler"] is not None:
        scheduler.load_state_dict(trainer["scheduler"])
    set_rng_state(trainer["rng"])
    return {"step": trainer["step"], **trainer["state"]}


# --------------------------------------------------------------------------------------------------------
# Health guards
# --------------------------------------------------------------------------------------------------------


def check_finite(values: dict[str, Any], *, step: int, last_good: Path | None = None) -> None:
    """Stop training with a clear message when any of `values` is NaN or infinite.

    Training must never silently continue on NaN: one bad update poisons every weight, and the run then
    burns hours producing garbage.
    """
    for name, v in values.items():
        finite = torch.isfinite(v).all().item() if isinstance(v, torch.Tensor) else math.isfinite(float(v))
        if not finite:
            where = f"; the last good checkpoint is {last_good}" if last_good else "; no checkpoint was written yet"
            raise TrainingHealthError(
                f"training stopped at step {step}: {name} is not finite (NaN or inf){where}. Check the data "
                "of this step, lower optim.lr, or keep optim.max_grad_norm > 0")
