"""The learned-reward wrapper and its standardization, by hand."""

from __future__ import annotations

import math

import gymnasium as gym
import numpy as np
import pytest

from rlhflab.control.wrappers import STD_FLOOR, LearnedRewardWrapper, reward_stats, standardize


def test_reward_stats_and_standardize_by_hand():
    mean, std = reward_stats(np.array([1.0, 2.0, 3.0, 4.0]))
    assert mean == 2.5 and std == pytest.approx(math.sqrt(1.25))  # population std: (2.25+.25+.25+2.25)/4
    assert standardize(4.0, mean, std) == pytest.approx(1.5 / math.sqrt(1.25))
    np.testing.assert_allclose(standardize(np.array([2.5, 1.0]), 2.5, 0.5), [0.0, -3.0])
    assert reward_stats(np.full(5, 7.0)) == (7.0, STD_FLOOR)  # a constant reward standardizes to 0
    with pytest.raises(ValueError):
        reward_stats(np.array([]))


def test_wrapper_replaces_the_reward_and_keeps_the_true_one_aside():
    wrapped = LearnedRewardWrapper(gym.make("Pendulum-v1"), lambda obs: float(obs[2]), mean=1.0, std=2.0)
    plain = gym.make("Pendulum-v1")
    wrapped.reset(seed=5)
    plain.reset(seed=5)
    for u in (0.3, -1.0, 2.0):
        action = np.array([u], dtype=np.float32)
        obs, reward, *_, info = wrapped.step(action)
        obs_plain, true_reward, *_ = plain.step(action)
        assert np.array_equal(obs, obs_plain)
        assert reward == pytest.approx((obs[2] - 1.0) / 2.0)  # R(s') standardized, s' the new state
        assert info["true_reward"] == pytest.approx(true_reward)
