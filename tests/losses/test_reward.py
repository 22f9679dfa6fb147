"""Reward-model losses: hand-worked numbers, invariants and gradchecks.

Reference values: -log sigma(z) = log(1 + e^-z): z = 0 -> 0.693147, 0.5 -> 0.474077, 1 -> 0.313262,
1.5 -> 0.201413, 2 -> 0.126928, -1 -> 1.313262.
"""

from __future__ import annotations

import pytest
import torch

from rlhflab.errors import ConfigError
from rlhflab.losses.reward import (
    bradley_terry,
    llama2_margins,
    pairwise_all_pairs,
    plackett_luce,
    regression,
    trex,
)

F64 = torch.float64


def t(x):
    return torch.tensor(x, dtype=F64)


def test_bradley_terry_by_hand():
    """r_c = 1.5, r_r = 1.0: -log sigma(0.5) = 0.474077; r_c = 0, r_r = 1: -log sigma(-1) = 1.313262."""
    out = bradley_terry(t([1.5, 0.0]), t([1.0, 1.0]))
    torch.testing.assert_close(out.loss, t([0.474077, 1.313262]), atol=1e-6, rtol=0)
    assert out.metrics["reward/accuracy"].tolist() == [1.0, 0.0]
    torch.testing.assert_close(out.metrics["reward/margin"], t([0.5, -1.0]))
    assert not out.metrics["reward/margin"].requires_grad


def test_bradley_terry_margin_by_hand():
    """Llama 2 margin: r_c - r_r = 2 with m = 1 -> -log sigma(1) = 0.313262; 0.5 - m 0.5 -> log 2."""
    out = bradley_terry(t([3.0, 1.5]), t([1.0, 1.0]), margin=t([1.0, 0.5]))
    torch.testing.assert_close(out.loss, t([0.313262, 0.693147]), atol=1e-6, rtol=0)
    scalar = bradley_terry(t([3.0]), t([1.0]), margin=1.0)
    torch.testing.assert_close(scalar.loss, t([0.313262]), atol=1e-6, rtol=0)


def test_bradley_terry_label_smoothing_by_hand():
    """eps = 0.1, z = 1: 0.9 * 0.313262 + 0.1 * 1.313262 = 0.281936 + 0.131326 = 0.413262."""
    out = bradley_terry(t([1.0]), t([0.0]), label_smoothing=0.1)
    assert out.loss.item() == pytest.approx(0.413262, abs=1e-6)
    with pytest.raises(ConfigError):
        bradley_terry(t([1.0]), t([0.0]), label_smoothing=0.5)


def test_llama2_margins_table_27():
    """Table 27: small = (1, 2/3, 1/3, 0), large = (3, 2, 1, 0) for significantly better .. negligibly."""
    strength = torch.tensor([0, 1, 2, 3])
    torch.testing.assert_close(llama2_margins(strength), torch.tensor([1.0, 2 / 3, 1 / 3, 0.0]))
    torch.testing.assert_close(llama2_margins(strength, "large"), torch.tensor([3.0, 2.0, 1.0, 0.0]))
    with pytest.raises(ConfigError):
        llama2_margins(strength, "medium")


def test_plackett_luce_by_hand():
    """Ranked rewards [2, 1, 0]:
    stage 1: 2 - log(e^2 + e + 1) = 2 - log(11.1073) = 2 - 2.407606 = -0.407606
    stage 2: 1 - log(e + 1) = 1 - 1.313262 = -0.313262;  stage 3: 0.
    loss = 0.407606 + 0.313262 = 0.720868.
    With the middle response absent: BT(2, 0) = -log sigma(2) = 0.126928.
    """
    out = plackett_luce(t([[2.0, 1.0, 0.0], [2.0, 99.0, 0.0]]), torch.tensor([[1, 1, 1], [1, 0, 1]]))
    torch.testing.assert_close(out.loss, t([0.720868, 0.126928]), atol=1e-6, rtol=0)
    assert out.metrics["reward/accuracy"].tolist() == [1.0, 1.0]
    assert out.metrics["reward/top1_accuracy"].tolist() == [1.0, 1.0]


def test_plackett_luce_k2_equals_bradley_terry():
    g = torch.Generator().manual_seed(0)
    r = torch.randn(16, 2, dtype=F64, generator=g) * 3
    torch.testing.assert_close(plackett_luce(r).loss, bradley_terry(r[:, 0], r[:, 1]).loss)
    torch.testing.assert_close(pairwise_all_pairs(r).loss, bradley_terry(r[:, 0], r[:, 1]).loss)


def test_pairwise_all_pairs_by_hand():
    """Ranked [2, 1, 0]: pairs (2,1), (2,0), (1,0) -> (0.313262 + 0.126928 + 0.313262) / 3 = 0.251150.
    Misordered [0, 1, 2]: every pair wrong -> accuracy 0.
    """
    out = pairwise_all_pairs(t([[2.0, 1.0, 0.0], [0.0, 1.0, 2.0]]))
    assert out.loss[0].item() == pytest.approx(0.251150, abs=1e-6)
    assert out.metrics["reward/accuracy"].tolist() == [1.0, 0.0]


def test_regression_by_hand():
    """(3 - 1)^2 = 4, (0.5 - 1)^2 = 0.25."""
    out = regression(t([3.0, 0.5]), t([1.0, 1.0]))
    torch.testing.assert_close(out.loss, t([4.0, 0.25]))
    torch.testing.assert_close(out.metrics["reward/abs_error"], t([2.0, 0.5]))


def test_trex_by_hand():
    """Preferred states [1, 2 | pad] -> return 3; other [0.5, 0.5, 0.5] -> 1.5.
    loss = -log sigma(3 - 1.5) = 0.201413.
    """
    out = trex(t([[1.0, 2.0, 50.0]]), torch.tensor([[1, 1, 0]]), t([[0.5, 0.5, 0.5]]), torch.ones(1, 3))
    assert out.loss.item() == pytest.approx(0.201413, abs=1e-6)
    assert out.metrics["reward/chosen"].item() == 3.0 and out.metrics["reward/rejected"].item() == 1.5


def test_gradcheck_reward_losses():
    g = torch.Generator().manual_seed(1)

    def rnd(*shape):
        return torch.randn(*shape, dtype=F64, generator=g, requires_grad=True)

    a, b = rnd(4), rnd(4)
    mask = torch.tensor([[1, 1, 1], [1, 0, 1], [1, 1, 0], [0, 1, 1]], dtype=torch.bool)
    assert torch.autograd.gradcheck(
        lambda x, y: bradley_terry(x, y, margin=0.3, label_smoothing=0.1).loss, (a, b))
    r = rnd(4, 3)
    assert torch.autograd.gradcheck(lambda x: plackett_luce(x, mask).loss, (r,))
    assert torch.autograd.gradcheck(lambda x: pairwise_all_pairs(x, mask).loss, (r,))
    assert torch.autograd.gradcheck(lambda x, y: regression(x, y).loss, (a, b))
    s1, s2 = rnd(4, 3), rnd(4, 3)
    assert torch.autograd.gradcheck(lambda x, y: trex(x, mask, y, mask.flip(0)).loss, (s1, s2))
