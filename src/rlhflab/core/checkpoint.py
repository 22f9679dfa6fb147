"""Resumable checkpoints: model, optimizer, scheduler, RNG states and stage state, written atomically."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from rlhflab.core.io import atomic_dir
from rlhflab.core.seeding import rng_state, set_rng_state


def save_checkpoint(
    run_dir: Path,
    step: int,
    *,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any = None,
    state: dict[str, Any] | None = None,
    keep: int = 2,
    optimizer_state: dict | None = None,
) -> Path:
    """Write checkpoints/step-N atomically (model + optimizer + scheduler + RNG + `state`), keep the last `keep`.
    `optimizer_state`: the optimizer's state dict when it is not `optimizer.state_dict()` (gathered from the
    processes of a sharded model)."""
    ckpt_root = Path(run_dir) / "checkpoints"
    target = ckpt_root / f"step-{step:08d}"
    with atomic_dir(target) as tmp:
        torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, tmp / "model.pt")
        torch.save(
            {
                "step": step,
                "optimizer": optimizer.state_dict() if optimizer_state is None else optimizer_state,
                "scheduler": scheduler.state_dict() if scheduler is not None else None,
                "rng": rng_state(),
                "state": state or {},
            },
            tmp / "trainer_state.pt",
        )
    for old in sorted(ckpt_root.glob("step-*"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return target


def latest_checkpoint(run_dir: Path) -> Path | None:
    ckpts = sorted((Path(run_dir) / "checkpoints").glob("step-*"))
    return ckpts[-1] if ckpts else None


def load_checkpoint(
    path: Path,
    *,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any = None,
    restore: Callable[[dict, dict], None] | None = None,
) -> dict[str, Any]:
    """Restore a checkpoint written by `save_checkpoint`; returns {"step": N, **state}. `restore(model_state,
    optimizer_state)` loads the weights and the optimizer when plain `load_state_dict` cannot (a sharded
    model)."""
    weights = torch.load(path / "model.pt", map_location="cpu", weights_only=True)
    trainer = torch.load(path / "trainer_state.pt", map_location="cpu", weights_only=False)
    if restore is not None:
        restore(weights, trainer["optimizer"])
    else:
        model.load_state_dict(weights)
        optimizer.load_state_dict(trainer["optimizer"])
    if scheduler is not None and trainer["scheduler"] is not None:
        scheduler.load_state_dict(trainer["scheduler"])
    set_rng_state(trainer["rng"])
    return {"step": trainer["step"], **trainer["state"]}
