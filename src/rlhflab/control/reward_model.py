"""A per-state reward network, trained on ranked snippet pairs with the T-REX loss (`rlhflab.losses.trex`).

T-REX learns R_theta: S -> R from observations only (Brown et al. 2019a, Sec. 4): a trajectory's predicted
return is the sum of R_theta over its states, and the ranking is a Bradley-Terry model over those returns.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from rlhflab.control.trajectories import Trajectory
from rlhflab.losses.reward import trex


class StateRewardNet(nn.Module):
    """R_theta(s): an MLP from an observation [..., obs_dim] to a scalar reward [...]."""

    def __init__(self, obs_dim: int, hidden: int = 64):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(obs_dim, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, 1)
        )

    def forward(self, states: torch.Tensor) -> torch.Tensor:
        return self.net(states).squeeze(-1)

    @torch.no_grad()
    def score(self, states: np.ndarray) -> np.ndarray:
        """R_theta of each state of a numpy array [..., obs_dim], as float64 [...]."""
        return self(torch.as_tensor(np.asarray(states), dtype=torch.float32)).double().numpy()


def train_trex_reward(
    chosen: np.ndarray,
    rejected: np.ndarray,
    *,
    hidden: int = 64,
    steps: int = 300,
    batch_size: int = 64,
    lr: float = 1e-3,
    weight_decay: float = 1e-4,
    seed: int = 0,
) -> tuple[StateRewardNet, list[dict[str, float]]]:
    """A StateRewardNet trained on snippet pairs (chosen/rejected states [N, L, obs_dim]) with the T-REX loss.

    Minibatches are drawn with replacement by a Generator seeded with `seed`. The small weight decay keeps the
    rewards from growing without bound once the training pairs are all separated (the Bradley-Terry loss is
    then still lowered by scaling R up).
    Returns the net and a log [{step, loss/trex, reward/accuracy}] every 25 steps and at the end.
    """
    if chosen.shape != rejected.shape or chosen.ndim != 3:
        raise ValueError(
            f"chosen and rejected must both be [N, L, obs_dim], got {chosen.shape}, {rejected.shape}"
        )
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    net = StateRewardNet(chosen.shape[-1], hidden)
    opt = torch.optim.Adam(net.parameters(), lr=lr, weight_decay=weight_decay)
    chosen_t, rejected_t = torch.as_tensor(chosen), torch.as_tensor(rejected)
    mask = torch.ones(chosen.shape[:2], dtype=torch.bool)  # equal-length snippets: every state counts
    log = []
    for step in range(1, steps + 1):
        idx = torch.as_tensor(rng.integers(0, len(chosen), size=min(batch_size, len(chosen))))
        out = trex(net(chosen_t[idx]), mask[idx], net(rejected_t[idx]), mask[idx])
        loss = out.loss.mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 25 == 0 or step == steps:
            log.append(
                {
                    "step": step,
                    "loss/trex": loss.item(),
                    "reward/accuracy": float(out.metrics["reward/accuracy"].float().mean()),
                }
            )
    return net, log


def predicted_returns(net: StateRewardNet, trajectories: Sequence[Trajectory]) -> np.ndarray:
    """[n]: each trajectory's predicted return, sum over its states of R_theta(s)."""
    return np.array([float(net.score(t.states).sum()) for t in trajectories])


def ranked_pair_accuracy(scores: Sequence[float], ranks: Sequence[int]) -> float:
    """Share of the pairs of different rank that `scores` order like the ranks (higher rank, higher score); a
    tie in score counts 1/2, so a constant scorer gets 0.5 (chance). nan when no pair has different ranks."""
    s, r = np.asarray(scores, dtype=np.float64), np.asarray(ranks)
    right = total = 0.0
    for i in range(len(s)):
        for j in range(len(s)):
            if r[i] > r[j]:
                total += 1
                right += 1.0 if s[i] > s[j] else 0.5 if s[i] == s[j] else 0.0
    return right / total if total else float("nan")
