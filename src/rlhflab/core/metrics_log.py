"""Metrics of a run: metrics.jsonl always, TensorBoard and W&B when enabled."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rlhflab.errors import UserError


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

    def __init__(
        self,
        run_dir: Path,
        *,
        tensorboard: bool = True,
        wandb: bool = False,
        wandb_project: str = "rlhflab",
        config: dict[str, Any] | None = None,
    ):
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


class SilentLogger:
    """The logger of a data-parallel process other than the main one: it writes nothing (the main one writes
    the run's metrics), and returns the row as `MetricsLogger.log` does."""

    def log(self, step: int, metrics: dict[str, Any]) -> dict[str, float]:
        return {k: s for k, v in metrics.items() if (s := _scalar(v)) is not None}

    def close(self) -> None:
        pass


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """All rows of a metrics.jsonl file."""
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]
