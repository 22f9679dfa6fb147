"""CPL's pieces on a control task: oracle advantages, regret labels, the Gaussian policy's log-probs in the CPL
loss, and CPL learning a toy preference."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from rlhflab.control.cpl import (
    GaussianPolicy,
    SegmentBatch,
    cut_segments,
    expert_advantages,
    likelihood_accuracy,
    order_pairs,
    regret_labels,
    train_cpl,
)
from rlhflab.control.trajectories import Trajectory
from rlhflab.losses.preference import cpl


def _batch(states, actions, advantages=None):
    states, actions = np.asarray(states, np.float32), np.asarray(actions, np.float32)
    n, length = actions.shape[:2]
    adv = np.zeros((n, length)) if advantages is None else np.asarray(advantages, np.float64)
    return SegmentBatch(states, actions, np.zeros((n, length)), adv)


def test_expert_advantages_by_hand():
    t = Trajectory(np.array([[1.0], [2.0], [4.0]]), np.zeros((2, 1)), np.array([1.0, 0.0]))
    # A_0 = 1 + 0.5 * 2 - 1 = 1, A_1 = 0 + 0.5 * 4 - 2 = 0, with V(s) = s.
    assert expert_advantages(lambda s: s[:, 0], t, gamma=0.5).tolist() == [1.0, 0.0]


def test_regret_labels_prefer_the_larger_advantage_sum():
    first = np.array([[1.0, -2.0, 0.5], [0.0, 0.0, 3.0]])
    second = np.array([[0.0, 0.0, 0.0], [1.0, 1.0, 0.0]])
    # Sums -0.5 vs 0 and 3 vs 2: the second of the first pair, the first of the second pair.
    assert regret_labels(first, second).tolist() == [0.0, 1.0]
    # Discounted by 0.5: 1 - 1 + 0.125 = 0.125 > 0 flips the first pair; 0.75 < 1.5 flips the second.
    assert regret_labels(first, second, gamma=0.5).tolist() == [1.0, 0.0]
    # Bradley-Terry draws: P(first) = sigmoid((3 - 2) / 1) = 0.731 for the second pair.
    rng = np.random.default_rng(0)
    many = regret_labels(
        np.repeat(first[1:], 4000, 0), np.repeat(second[1:], 4000, 0), temperature=1.0, rng=rng
    )
    assert abs(many.mean() - 1 / (1 + math.exp(-1))) < 0.03
    with pytest.raises(ValueError, match="temperature"):
        regret_labels(first, second, temperature=1.0)  # no Generator


def test_segments_and_pair_order():
    rng = np.random.default_rng(0)
    trajs = [
        Trajectory(np.arange(11.0)[:, None] + 100 * k, np.ones((10, 1)), np.arange(10.0)) for k in range(2)
    ]
    advs = [np.arange(10.0) * (k + 1) for k in range(2)]
    seg = cut_segments(trajs, advs, 5, 4, rng)
    assert seg.states.shape == (5, 5, 1) and seg.actions.shape == (5, 4, 1)
    for s, r, a in zip(
        seg.states, seg.rewards, seg.advantages
    ):  # states, rewards and advantages stay aligned
        k, start = int(s[0, 0] // 100), int(s[0, 0] % 100)
        assert r.tolist() == list(range(start, start + 4)) and a.tolist() == (r * (k + 1)).tolist()
    assert [len(x) for x in seg.segments()] == [4] * 5 and seg.segments()[0].observations[0, 0] == seg.states[
        0, 1, 0
    ]
    first, second = seg.take(np.array([0, 1])), seg.take(np.array([2, 3]))
    chosen, rejected = order_pairs(first, second, np.array([1.0, 0.0]))
    assert (
        chosen.states[0].tolist() == first.states[0].tolist()
        and chosen.states[1].tolist() == second.states[1].tolist()
    )
    assert rejected.states[0].tolist() == second.states[0].tolist()
    with pytest.raises(ValueError, match="need states"):
        SegmentBatch(np.zeros((2, 4, 1)), np.zeros((2, 4, 1)), np.zeros((2, 4)), np.zeros((2, 4)))


def test_one_training_step_is_the_cpl_loss_of_the_recorded_batch():
    torch.manual_seed(0)
    rng = np.random.default_rng(1)
    chosen = _batch(rng.normal(size=(6, 4, 3)), rng.uniform(-2, 2, size=(6, 3, 1)))
    rejected = _batch(rng.normal(size=(6, 4, 3)), rng.uniform(-2, 2, size=(6, 3, 1)))
    policy = GaussianPolicy(3, np.array([-2.0]), np.array([2.0]), hidden=8)
    alpha, gamma, lam = 0.3, 0.9, 0.5
    trained, log = train_cpl(
        policy, chosen, rejected, steps=1, batch_size=4, lr=1e-2, alpha=alpha, gamma=gamma, conservative_lambda=lam,
        seed=7,
    )  # fmt: skip
    idx = np.random.default_rng(7).integers(0, 6, size=4)  # the minibatch train_cpl draws with its seed

    def logps_by_hand(batch):  # log N(a; mu, sigma) written out, summed over the action's one dimension
        with torch.no_grad():
            mean, log_std = policy(torch.as_tensor(batch.states[idx, :-1]))
        a = torch.as_tensor(batch.actions[idx])
        return (-0.5 * ((a - mean) / log_std.exp()) ** 2 - log_std - 0.5 * math.log(2 * math.pi)).sum(-1)

    c, r = logps_by_hand(chosen), logps_by_hand(rejected)
    disc = gamma ** torch.arange(3.0)
    by_hand = -F.logsigmoid(alpha * (c * disc).sum(-1) - lam * alpha * (r * disc).sum(-1)).mean()
    ones = torch.ones(4, 3, dtype=torch.bool)
    via_loss = cpl(c, ones, r, ones, alpha=alpha, gamma=gamma, conservative_lambda=lam).loss.mean()
    assert (
        log[0]["loss/cpl"]
        == pytest.approx(by_hand.item(), rel=1e-5)
        == pytest.approx(via_loss.item(), rel=1e-5)
    )
    # The step moved the copy, not the policy passed in.
    moved = [not torch.equal(a, b) for a, b in zip(trained.parameters(), policy.parameters())]
    assert any(moved)


def _toy_pairs(rng, n, length=5):
    """Chosen segments act a = clip(-s_0) (+ small noise), rejected ones uniformly at random, on the same kind of
    states: the preference is about the action taken in a state."""
    s_c, s_r = rng.uniform(-1, 1, size=(n, length + 1, 2)), rng.uniform(-1, 1, size=(n, length + 1, 2))
    a_c = np.clip(-s_c[:, :-1, :1] + 0.05 * rng.normal(size=(n, length, 1)), -1, 1)
    a_r = rng.uniform(-1, 1, size=(n, length, 1))
    return _batch(s_c, a_c), _batch(s_r, a_r)


def test_cpl_learns_to_prefer_the_chosen_segments_on_held_out_pairs():
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    chosen, rejected = _toy_pairs(rng, 200)
    held_c, held_r = _toy_pairs(rng, 200)
    policy = GaussianPolicy(2, np.array([-1.0]), np.array([1.0]), hidden=32)
    trained, log = train_cpl(policy, chosen, rejected, steps=300, batch_size=32, lr=3e-3, alpha=1.0, seed=0)
    assert likelihood_accuracy(trained, held_c, held_r) > 0.9
    assert log[-1]["loss/cpl"] < log[0]["loss/cpl"]
    # The mean action learned the preferred controller, with no reward and no RL.
    s = rng.uniform(-0.8, 0.8, size=(100, 2))
    assert np.abs(trained.act(s)[:, 0] + s[:, 0]).mean() < 0.25
