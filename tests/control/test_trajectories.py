"""Trajectories, rollouts and T-REX's snippet pairs, by hand."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest

from rlhflab.control.trajectories import Trajectory, rollout, sample_trex_pairs, subtrajectory_starts


def _traj(states, rewards=None):
    """A trajectory whose observations are the given 1-D values (s_0 first)."""
    obs = np.asarray(states, dtype=np.float64).reshape(-1, 1)
    n = len(obs) - 1
    return Trajectory(obs, np.zeros((n, 1)), np.asarray(rewards if rewards is not None else np.zeros(n)))


def test_trajectory_alignment_and_return():
    t = _traj([0.0, 1.0, 2.0, 3.0], rewards=[-1.0, 0.5, 2.0])
    assert len(t) == 3 and t.true_return == pytest.approx(1.5)
    assert t.states[:, 0].tolist() == [1.0, 2.0, 3.0]  # s_1 .. s_T: the states the actions led to
    with pytest.raises(ValueError, match="3 steps needs 4 observations"):
        Trajectory(np.zeros((3, 1)), np.zeros((3, 1)), np.zeros(3))


def test_rollout_records_pendulums_reward_of_each_step():
    """Pendulum's reward of step t is -(theta_t^2 + 0.1 thetadot_t^2 + 0.001 u^2) at the state before the step:
    recomputed by hand from the recorded observations, it must match the recorded rewards."""
    env = gym.make("Pendulum-v1")
    [t] = rollout(env, lambda obs: np.array([0.5], dtype=np.float32), episodes=1, seed=3)
    assert len(t) == 200 and t.observations.shape == (201, 3) and t.actions.shape == (200, 1)
    cos, sin, thetadot = t.observations[:-1].T
    theta = np.arctan2(sin, cos)
    expected = -(theta**2 + 0.1 * thetadot**2 + 0.001 * 0.5**2)
    np.testing.assert_allclose(t.rewards, expected, rtol=1e-4, atol=1e-4)
    assert t.true_return == pytest.approx(expected.sum(), rel=1e-4)
    # The same seed starts from the same state; episode i is reset with seed + i.
    again = rollout(env, lambda obs: np.array([0.0], dtype=np.float32), episodes=2, seed=3)
    assert np.array_equal(again[0].observations[0], t.observations[0])
    assert not np.array_equal(again[1].observations[0], t.observations[0])
    assert np.array_equal(again[1].observations[0], env.reset(seed=4)[0])


def test_subtrajectory_starts_by_hand():
    rng = np.random.default_rng(0)
    assert subtrajectory_starts(10, 10, 10, rng) == (0, 0, 10)  # the whole trajectories, nothing to choose
    # Worse of 5 steps, better of 10, snippets of 4: start_worse in {0, 1}, start_better in [start_worse, 6].
    draws = [subtrajectory_starts(5, 10, 4, rng) for _ in range(2000)]
    assert {sw for sw, _, _ in draws} == {0, 1} and {n for _, _, n in draws} == {4}
    assert all(sw <= sb <= 6 for sw, sb, _ in draws)
    assert {sb for sw, sb, _ in draws if sw == 1} == {1, 2, 3, 4, 5, 6}
    assert {sb for sw, sb, _ in draws if sw == 0} == {0, 1, 2, 3, 4, 5, 6}
    # A snippet longer than the shorter trajectory is cut to it.
    assert {subtrajectory_starts(3, 8, 5, rng)[::2] for _ in range(200)} == {(0, 3)}
    with pytest.raises(ValueError):
        subtrajectory_starts(0, 5, 2, rng)


def test_sample_trex_pairs_puts_the_better_trajectory_first():
    # Trajectory k's states are 100 k + time, so each snippet says where it came from.
    trajectories = [_traj(100 * k + np.arange(21)) for k in range(4)]
    ranks = [2, 0, 1, 1]
    chosen, rejected = sample_trex_pairs(
        trajectories, ranks, n_pairs=300, length=5, rng=np.random.default_rng(1)
    )
    assert chosen.shape == rejected.shape == (300, 5, 1) and chosen.dtype == np.float32
    src_c, src_r = chosen[:, 0, 0] // 100, rejected[:, 0, 0] // 100
    assert all(ranks[int(c)] > ranks[int(r)] for c, r in zip(src_c, src_r))
    start_c, start_r = chosen[:, 0, 0] % 100, rejected[:, 0, 0] % 100
    assert np.all(start_c >= start_r)  # the better snippet starts no earlier
    assert np.all(np.diff(chosen[..., 0], axis=1) == 1)  # consecutive states
    assert set(map(int, src_c)) == {0, 2, 3}  # every trajectory above the worst is drawn as the better one
    with pytest.raises(ValueError, match="two different ranks"):
        sample_trex_pairs(trajectories[:2], [1, 1], 4, 5, np.random.default_rng(0))
