"""The per-state reward network: predicted returns and pair accuracy by hand, and a T-REX fit that can fail."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rlhflab.control.reward_model import (
    StateRewardNet,
    predicted_returns,
    ranked_pair_accuracy,
    train_trex_reward,
)
from rlhflab.control.trajectories import Trajectory, sample_trex_pairs
from rlhflab.eval.metrics import spearman


def test_ranked_pair_accuracy_by_hand():
    assert ranked_pair_accuracy([1.0, 2.0, 3.0], [0, 1, 2]) == 1.0
    assert ranked_pair_accuracy([3.0, 2.0, 1.0], [0, 1, 2]) == 0.0
    assert ranked_pair_accuracy([5.0, 5.0, 5.0], [0, 1, 2]) == 0.5  # a constant scorer is at chance
    # Pairs of equal rank do not count: (0 vs 1 and 0 vs 2) right, (1 vs 2) is a tie of rank -> 2/2.
    assert ranked_pair_accuracy([0.0, 2.0, 1.0], [0, 1, 1]) == 1.0
    # Three pairs of different rank, one ordered wrongly: 2/3.
    assert ranked_pair_accuracy([1.0, 3.0, 2.0], [0, 1, 2]) == pytest.approx(2 / 3)
    assert np.isnan(ranked_pair_accuracy([1.0, 2.0], [1, 1]))


def test_predicted_return_is_the_sum_of_state_rewards():
    net = StateRewardNet(obs_dim=1, hidden=1)
    with torch.no_grad():  # R(s) = relu(relu(s)) = max(s, 0)
        for layer in (net.net[0], net.net[2], net.net[4]):
            layer.weight.fill_(1.0)
            layer.bias.fill_(0.0)
    t = Trajectory(np.array([[9.0], [1.0], [2.0], [-3.0]]), np.zeros((3, 1)), np.zeros(3))
    assert net.score(t.states).tolist() == [1.0, 2.0, 0.0]
    assert predicted_returns(net, [t]).tolist() == [3.0]  # s_0 = 9 is not a reached state: not counted


def _ranked_trajectories(rng, n_per_rank, ranks=5, steps=40):
    """Trajectories of 2-D states whose true reward is -|s|^2; rank k wanders with spread 2 / (k + 1), so a
    higher rank stays nearer the origin. Returns trajectories, ranks, true returns."""
    trajectories, labels, returns = [], [], []
    for k in range(ranks):
        for _ in range(n_per_rank):
            obs = rng.normal(0.0, 2.0 / (k + 1), size=(steps + 1, 2))
            rewards = -(obs[1:] ** 2).sum(axis=1)
            trajectories.append(Trajectory(obs, np.zeros((steps, 1)), rewards))
            labels.append(k)
            returns.append(rewards.sum())
    return trajectories, labels, np.array(returns)


def test_trex_reward_ranks_held_out_trajectories_above_chance():
    rng = np.random.default_rng(0)
    train, ranks, _ = _ranked_trajectories(rng, n_per_rank=3)
    chosen, rejected = sample_trex_pairs(train, ranks, n_pairs=500, length=10, rng=rng)
    untrained = StateRewardNet(2)
    net, log = train_trex_reward(chosen, rejected, steps=200, seed=0)
    assert log[-1]["loss/trex"] < 0.5 * log[0]["loss/trex"]  # learnable: the loss falls
    held, held_ranks, held_returns = _ranked_trajectories(np.random.default_rng(1), n_per_rank=4)
    pred = predicted_returns(net, held)
    assert ranked_pair_accuracy(pred, held_ranks) > 0.85
    assert spearman(pred, held_returns) > 0.8
    # The state reward itself extrapolates: the origin (never a whole trajectory) scores above a far state.
    assert net.score(np.zeros((1, 2)))[0] > net.score(np.full((1, 2), 3.0))[0]
    # An untrained net does not (this is what the test can catch).
    assert abs(ranked_pair_accuracy(predicted_returns(untrained, held), held_ranks) - 0.5) < 0.4


def test_train_trex_reward_refuses_mismatched_pairs():
    with pytest.raises(ValueError, match=r"\[N, L, obs_dim\]"):
        train_trex_reward(np.zeros((4, 3, 2), np.float32), np.zeros((4, 2, 2), np.float32))
