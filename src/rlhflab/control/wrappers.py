"""A gymnasium wrapper that hides the true reward and gives the learned one, standardized.

The Bradley-Terry loss fixes a learned reward only up to an additive constant (and its scale only loosely, by
where the loss saturates), so its raw values mean nothing to PPO. We standardize it with the mean and standard
deviation of R_theta over the demonstrations' states: the policy optimizer then sees rewards of order one, the
scale its hyperparameters were tuned for, whatever the network's scale. The true reward stays in
`info["true_reward"]`, for evaluation only.
"""

from __future__ import annotations

from collections.abc import Callable

import gymnasium as gym
import numpy as np

STD_FLOOR = 1e-8


def reward_stats(rewards: np.ndarray) -> tuple[float, float]:
    """(mean, standard deviation) of learned rewards over the demonstration states; the standard deviation is
    floored at STD_FLOOR so that a constant reward standardizes to 0, not to a division by zero."""
    r = np.asarray(rewards, dtype=np.float64).reshape(-1)
    if r.size == 0:
        raise ValueError("reward_stats needs at least one reward")
    return float(r.mean()), max(float(r.std()), STD_FLOOR)


def standardize(reward: float | np.ndarray, mean: float, std: float) -> float | np.ndarray:
    """(r - mean) / std."""
    return (reward - mean) / std


class LearnedRewardWrapper(gym.Wrapper):
    """Replaces each step's reward by standardize(R(s'), mean, std), s' the observation the step returns."""

    def __init__(self, env: gym.Env, reward_fn: Callable[[np.ndarray], float], mean: float, std: float):
        super().__init__(env)
        self.reward_fn, self.mean, self.std = reward_fn, mean, std

    def step(self, action):
        obs, true_reward, terminated, truncated, info = self.env.step(action)
        info = {**info, "true_reward": float(true_reward)}
        return obs, float(standardize(self.reward_fn(obs), self.mean, self.std)), terminated, truncated, info
