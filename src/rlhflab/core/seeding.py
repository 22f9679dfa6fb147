"""Seeds, RNG state and the data order.

Exact resume: the data order of each epoch is a permutation drawn from (seed, epoch), so a checkpoint only
needs the step; together with the optimizer, scheduler and all RNG states, a resumed run ends with the same
weights as an uninterrupted one.
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def epoch_permutation(n: int, seed: int, epoch: int) -> list[int]:
    """The data order of `epoch`: a function of (seed, epoch) only, so resuming needs no sampler state."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=g).tolist()


def batch_schedule(
    n: int, batch_size: int, seed: int, epoch: int, *, drop_last: bool = True
) -> list[list[int]]:
    """Index batches for one epoch. drop_last keeps every step the same size (steady loss scale)."""
    order = epoch_permutation(n, seed, epoch)
    stop = (n // batch_size) * batch_size if drop_last else n
    return [order[i : i + batch_size] for i in range(0, stop, batch_size)]


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
