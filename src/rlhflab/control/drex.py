"""D-REX's automatic rankings: behaviour cloning, then noise injection (Brown et al. 2019b).

"Better-than-Demonstrator Imitation Learning via Automatically-Ranked Demonstrations" (Brown, Goo and Niekum,
CoRL 2019) needs no ranking from anyone: it clones the demonstrator, then rolls the clone out with increasing
noise, epsilon-greedy style (with probability epsilon the action is replaced by a uniformly random one), and
assumes that more noise means worse behaviour. Those rollouts, ranked by their noise, are T-REX's input.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from rlhflab.control.trajectories import Policy, Trajectory


def noise_schedule(levels: int, low: float = 0.02, high: float = 1.0) -> list[float]:
    """`levels` noise levels evenly spaced from `low` (almost the clone itself) to `high` (1.0: every action
    random), as in D-REX's schedule from near-zero to fully random noise."""
    if levels < 2:
        raise ValueError(f"a ranking needs at least two noise levels, got {levels}")
    return [float(x) for x in np.linspace(low, high, levels)]


def epsilon_action(
    action: np.ndarray, epsilon: float, rng: np.random.Generator, low: np.ndarray, high: np.ndarray
) -> np.ndarray:
    """With probability epsilon a uniform random action in the box [low, high], else `action` itself."""
    if not 0.0 <= epsilon <= 1.0:
        raise ValueError(f"epsilon must be in [0, 1], got {epsilon}")
    if rng.random() < epsilon:
        return rng.uniform(low, high).astype(np.asarray(action).dtype)
    return action


def noisy_policy(policy: Policy, epsilon: float, rng: np.random.Generator, low, high) -> Policy:
    """`policy` with epsilon-noise injection (see `epsilon_action`)."""
    return lambda obs: epsilon_action(policy(obs), epsilon, rng, np.asarray(low), np.asarray(high))


class BCPolicy(nn.Module):
    """A deterministic policy for a box action space: an MLP whose tanh output is scaled to [low, high]."""

    def __init__(self, obs_dim: int, low: np.ndarray, high: np.ndarray, hidden: int = 64):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(obs_dim, hidden),
            nn.Tanh(),
            nn.Linear(hidden, hidden),
            nn.Tanh(),
            nn.Linear(hidden, len(low)),
        )
        self.register_buffer("low", torch.as_tensor(low, dtype=torch.float32))
        self.register_buffer("high", torch.as_tensor(high, dtype=torch.float32))

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        return self.low + (torch.tanh(self.net(obs)) + 1) * 0.5 * (self.high - self.low)

    @torch.no_grad()
    def act(self, obs: np.ndarray) -> np.ndarray:
        return self(torch.as_tensor(obs, dtype=torch.float32)).numpy()


def behaviour_clone(
    demos: Sequence[Trajectory],
    low: np.ndarray,
    high: np.ndarray,
    *,
    steps: int = 1000,
    batch_size: int = 64,
    lr: float = 1e-3,
    seed: int = 0,
) -> tuple[BCPolicy, float]:
    """A BCPolicy regressed (mean squared error) on the demonstrations' (s_t, a_t) pairs; returns it and the
    final training loss. Demonstrated actions are clipped to the box first: the clone cannot output more."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    obs = torch.as_tensor(np.concatenate([d.observations[:-1] for d in demos]), dtype=torch.float32)
    acts = np.concatenate([np.asarray(d.actions).reshape(len(d), -1) for d in demos])
    target = torch.as_tensor(np.clip(acts, low, high), dtype=torch.float32)
    policy = BCPolicy(obs.shape[-1], np.asarray(low), np.asarray(high))
    opt = torch.optim.Adam(policy.parameters(), lr=lr)
    loss = torch.tensor(float("nan"))
    for _ in range(steps):
        idx = torch.as_tensor(rng.integers(0, len(obs), size=min(batch_size, len(obs))))
        loss = ((policy(obs[idx]) - target[idx]) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return policy, loss.item()
