"""Trajectory segments, the unit people (or a synthetic labeller) compare in Christiano et al. (2017).

Christiano et al. ("Deep Reinforcement Learning from Human Preferences", NeurIPS 2017, Sec. 2.2) show a labeller
two short clips of the agent (1-2 s of play) and ask which is better. A segment keeps what a labeller or a
reward model needs: the states the per-state reward scores (s_1 ... s_L, aligned with `Trajectory.states`), the
actions that led to them, and the environment's own rewards, which only a synthetic labeller and the evaluation
may read, never the learner.

A labeller answers a batch of queries at once (people answer asynchronously, so one query at a time would keep
them waiting on the loop): per query, 1.0 when the first segment is preferred, 0.0 the second, 0.5 equally good,
and NaN for "cannot tell", which Christiano et al. drop from the training data.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from rlhflab.control.trajectories import Trajectory

FIRST, SECOND, EQUAL = 1.0, 0.0, 0.5


@dataclass(frozen=True)
class Segment:
    """L consecutive steps of one episode. observations: [L, obs_dim], the states s_{t+1} the steps reach (what a
    per-state reward scores and what a clip shows); actions: [L, act_dim]; rewards: [L], the true ones."""

    observations: np.ndarray
    actions: np.ndarray
    rewards: np.ndarray
    env_id: str = "Pendulum-v1"

    def __post_init__(self):
        n = len(self.rewards)
        if n < 1 or len(self.observations) != n or len(self.actions) != n:
            raise ValueError(
                f"a segment needs L >= 1 observations, actions and rewards alike, got {len(self.observations)}, "
                f"{len(self.actions)} and {n}"
            )

    def __len__(self) -> int:
        return len(self.rewards)

    @property
    def true_return(self) -> float:
        return float(np.sum(self.rewards, dtype=np.float64))


# queries [(first, second), ...] -> one answer per query: FIRST, SECOND, EQUAL or NaN (cannot tell)
Labeller = Callable[[Sequence[tuple[Segment, Segment]]], list[float]]


def segment_of(trajectory: Trajectory, start: int, length: int, env_id: str = "Pendulum-v1") -> Segment:
    """Steps start ... start + length - 1 of `trajectory` as a Segment."""
    if start < 0 or length < 1 or start + length > len(trajectory):
        raise ValueError(
            f"steps {start}..{start + length - 1} are not inside a trajectory of {len(trajectory)}"
        )
    sl = slice(start, start + length)
    return Segment(trajectory.states[sl], trajectory.actions[sl], trajectory.rewards[sl], env_id)


def random_segments(
    trajectories: Sequence[Trajectory],
    n: int,
    length: int,
    rng: np.random.Generator,
    env_id: str = "Pendulum-v1",
) -> list[Segment]:
    """`n` segments of `length` steps, each from a trajectory drawn uniformly, starting uniformly within it."""
    if not trajectories:
        raise ValueError("random_segments needs at least one trajectory")
    out = []
    for _ in range(n):
        t = trajectories[int(rng.integers(len(trajectories)))]
        if len(t) < length:
            raise ValueError(f"a trajectory of {len(t)} steps is shorter than the segment length {length}")
        out.append(segment_of(t, int(rng.integers(0, len(t) - length + 1)), length, env_id))
    return out
