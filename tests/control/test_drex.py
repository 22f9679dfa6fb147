"""D-REX's pieces: the noise schedule, epsilon-noise injection, behaviour cloning."""

from __future__ import annotations

import numpy as np
import pytest

from rlhflab.control.drex import behaviour_clone, epsilon_action, noise_schedule
from rlhflab.control.trajectories import Trajectory


def test_noise_schedule_by_hand():
    assert noise_schedule(2) == [0.02, 1.0]
    assert noise_schedule(3) == pytest.approx([0.02, 0.51, 1.0])
    assert noise_schedule(5) == pytest.approx([0.02, 0.265, 0.51, 0.755, 1.0])
    with pytest.raises(ValueError, match="at least two"):
        noise_schedule(1)


class _Rng:
    """A stand-in Generator: random() returns a fixed draw, uniform() the box's midpoint."""

    def __init__(self, draw):
        self.draw = draw

    def random(self):
        return self.draw

    def uniform(self, low, high):
        return (np.asarray(low) + np.asarray(high)) / 2


def test_epsilon_action_by_hand():
    a, low, high = np.array([1.5]), np.array([-2.0]), np.array([0.0])
    assert epsilon_action(a, 0.5, _Rng(0.3), low, high).tolist() == [-1.0]  # 0.3 < 0.5: random (midpoint)
    assert epsilon_action(a, 0.2, _Rng(0.3), low, high) is a  # 0.3 >= 0.2: the policy's own action
    assert epsilon_action(a, 0.0, _Rng(0.0), low, high) is a  # epsilon 0 never replaces
    with pytest.raises(ValueError):
        epsilon_action(a, 1.5, _Rng(0.3), low, high)
    # With a real Generator the replaced share is epsilon, and random actions stay in the box.
    rng = np.random.default_rng(0)
    out = np.array([epsilon_action(np.array([5.0]), 0.3, rng, low, high)[0] for _ in range(4000)])
    replaced = out != 5.0
    assert abs(replaced.mean() - 0.3) < 0.03 and np.all((out[replaced] >= -2) & (out[replaced] <= 0))


def test_behaviour_cloning_learns_a_simple_controller():
    """Demonstrated actions a = clip(-2 s0, -1, 1); the clone must reproduce them on states it never saw."""
    rng = np.random.default_rng(0)
    demos = []
    for _ in range(4):
        obs = rng.uniform(-1, 1, size=(51, 2))
        demos.append(Trajectory(obs, np.clip(-2 * obs[:-1, :1], -1, 1), np.zeros(50)))
    low, high = np.array([-1.0]), np.array([1.0])
    policy, loss = behaviour_clone(demos, low, high, steps=400, seed=0)
    test = rng.uniform(-1, 1, size=(200, 2))
    error = np.abs(policy.act(test) - np.clip(-2 * test[:, :1], -1, 1)).mean()
    assert loss < 0.02 and error < 0.1
    assert np.all(policy.act(rng.uniform(-50, 50, size=(100, 2))) <= 1.0)  # never outside the box
