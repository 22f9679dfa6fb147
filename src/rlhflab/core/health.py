"""Health guards: training never silently continues on NaN."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from rlhflab.errors import TrainingHealthError


def check_finite(values: dict[str, Any], *, step: int, last_good: Path | None = None) -> None:
    """Stop training with a clear message when any of `values` is NaN or infinite.

    Training must never silently continue on NaN: one bad update poisons every weight, and the run then
    burns hours producing garbage.
    """
    for name, v in values.items():
        finite = torch.isfinite(v).all().item() if isinstance(v, torch.Tensor) else math.isfinite(float(v))
        if not finite:
            where = (
                f"; the last good checkpoint is {last_good}"
                if last_good
                else "; no checkpoint was written yet"
            )
            raise TrainingHealthError(
                f"training stopped at step {step}: {name} is not finite (NaN or inf){where}. Check the data "
                "of this step, lower optim.lr, or keep optim.max_grad_norm > 0"
            )
