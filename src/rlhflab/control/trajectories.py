"""Trajectories of a policy with their true rewards, and the sub-trajectory pairs T-REX trains on.

A trajectory keeps every observation s_0 ... s_T, the actions a_0 ... a_{T-1} and the true rewards r_0 ...
r_{T-1}. The states a per-state reward scores are the ones the actions lead to, s_1 ... s_T (`states`): the
learned reward of a step is then R(s_{t+1}), the state the agent chose to reach, which is also what the reward
wrapper gives PPO at that step. Behaviour cloning reads the other alignment, (s_t, a_t) (`state_actions`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

Policy = Callable[[np.ndarray], np.ndarray]  # observation [obs_dim] -> action


@dataclass(frozen=True)
class Trajectory:
    """One episode. observations: [T+1, obs_dim]; actions: [T, ...]; rewards: [T] (the environment's own)."""

    observations: np.ndarray
    actions: np.ndarray
    rewards: np.ndarray

    def __post_init__(self):
        n = len(self.rewards)
        if len(self.observations) != n + 1 or len(self.actions) != n:
            raise ValueError(
                f"a trajectory of {n} steps needs {n + 1} observations and {n} actions, got "
                f"{len(self.observations)} and {len(self.actions)}"
            )

    def __len__(self) -> int:
        return len(self.rewards)

    @property
    def states(self) -> np.ndarray:
        """[T, obs_dim]: s_1 ... s_T, the states the per-state reward scores."""
        return self.observations[1:]

    @property
    def true_return(self) -> float:
        """The undiscounted sum of the environment's rewards, the number the experiments report."""
        return float(np.sum(self.rewards, dtype=np.float64))


def rollout(env, policy: Policy, episodes: int, seed: int) -> list[Trajectory]:
    """`episodes` episodes of `policy` in the gymnasium `env`, episode i reset with seed + i (so two policies
    rolled out with the same seed start from the same states)."""
    out = []
    for i in range(episodes):
        obs, _ = env.reset(seed=seed + i)
        observations, actions, rewards = [obs], [], []
        done = False
        while not done:
            action = policy(obs)
            obs, reward, terminated, truncated, _ = env.step(action)
            observations.append(obs)
            actions.append(action)
            rewards.append(float(reward))
            done = terminated or truncated
        out.append(Trajectory(np.asarray(observations), np.asarray(actions), np.asarray(rewards)))
    return out


def subtrajectory_starts(
    worse_len: int, better_len: int, length: int, rng: np.random.Generator
) -> tuple[int, int, int]:
    """(start in the worse trajectory, start in the better one, snippet length) of one T-REX training pair.

    Brown et al. (2019a, T-REX) train on random snippets of equal length rather than whole trajectories (many
    more training pairs from few demonstrations), the better trajectory's snippet starting no earlier than the
    worse one's: an earlier stretch of a better demonstration is then never preferred to a later stretch of a
    worse one, which could hold only because the later one is further along the task.
    The length is `length`, or the shorter trajectory's when that is shorter. start_worse is uniform on
    [0, L_min - length], start_better uniform on [start_worse, better_len - length] (both ends included).
    """
    if length < 1 or worse_len < 1 or better_len < 1:
        raise ValueError(f"lengths must be positive, got {worse_len}, {better_len}, snippet {length}")
    n = min(length, worse_len, better_len)
    start_worse = int(rng.integers(0, min(worse_len, better_len) - n + 1))
    start_better = int(rng.integers(start_worse, better_len - n + 1))
    return start_worse, start_better, n


def sample_trex_pairs(
    trajectories: Sequence[Trajectory],
    ranks: Sequence[int],
    n_pairs: int,
    length: int,
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray]:
    """(chosen states [N, L, obs_dim], rejected states [N, L, obs_dim]) of `n_pairs` snippet pairs.

    ranks[i] is trajectory i's rank, higher = better; each pair draws two trajectories of different rank
    uniformly, then snippets by `subtrajectory_starts`; the better one is "chosen". Every snippet has the same
    length L (the shortest trajectory's when shorter than `length`), so no mask is needed.
    """
    if len(trajectories) != len(ranks):
        raise ValueError(f"{len(trajectories)} trajectories but {len(ranks)} ranks")
    if len(set(ranks)) < 2:
        raise ValueError("T-REX needs trajectories of at least two different ranks")
    length = min(length, *(len(t) for t in trajectories))
    chosen, rejected = [], []
    while len(chosen) < n_pairs:
        i, j = rng.choice(len(trajectories), size=2, replace=False)
        if ranks[i] == ranks[j]:
            continue  # equal ranks say nothing
        worse, better = (
            (trajectories[i], trajectories[j]) if ranks[i] < ranks[j] else (trajectories[j], trajectories[i])
        )
        sw, sb, n = subtrajectory_starts(len(worse), len(better), length, rng)
        chosen.append(better.states[sb : sb + n])
        rejected.append(worse.states[sw : sw + n])
    return np.stack(chosen).astype(np.float32), np.stack(rejected).astype(np.float32)
