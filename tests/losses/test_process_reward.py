"""Process supervision: the per-step classifier loss and the step aggregates, by hand, with invariants and gradcheck.

Reference values: sigma(ln 3) = 3/4, sigma(0) = 1/2, sigma(-ln 3) = 1/4; -log(3/4) = 0.287682, -log(1/4) =
1.386294, -log(1/2) = 0.693147.
"""

from __future__ import annotations

import math

import pytest
import torch

from rlhflab.losses import PRM_AGGREGATES, binary_classifier, prm_min, prm_product, process_reward_loss

F64 = torch.float64
LN3 = math.log(3)
NAN, INF = float("nan"), float("inf")


def _batch():
    # Row 0: steps end at tokens 1 and 3 (labels right, wrong), both scored ln 3. Row 1: one step at token 4,
    # scored 0, labelled right. Row 2: no labelled step. Every other position holds junk that must not count.
    scores = torch.tensor(
        [[NAN, LN3, 50.0, LN3, -INF], [7.0, 7.0, 7.0, 7.0, 0.0], [NAN, 1.0, 2.0, 3.0, INF]], dtype=F64
    )
    mask = torch.zeros(3, 5, dtype=torch.bool)
    mask[0, 1] = mask[0, 3] = mask[1, 4] = True
    labels = torch.zeros(3, 5, dtype=torch.bool)
    labels[0, 1] = labels[1, 4] = True
    labels[2, 1] = True  # a label off the mask is never read
    return scores, labels, mask


def test_process_reward_loss_by_hand():
    scores, labels, mask = _batch()
    out = process_reward_loss(scores, labels, mask)
    # Row 0: mean of -log(3/4) (right step, p = 3/4) and -log(1/4) (wrong step, p = 3/4): (0.287682 + 1.386294) / 2.
    expected = torch.tensor([(-math.log(0.75) - math.log(0.25)) / 2, math.log(2), 0.0], dtype=F64)
    torch.testing.assert_close(out.loss, expected)
    assert out.loss[0].item() == pytest.approx(0.836988, abs=1e-6)
    # Accuracy per row: row 0 one of two steps agrees in sign; row 1's r = 0 is not > 0, so counted wrong.
    assert out.metrics["reward/accuracy"].tolist() == [0.5, 0.0, 0.0]
    assert out.metrics["reward/steps"].tolist() == [2.0, 1.0, 0.0]


def test_one_step_per_row_is_the_binary_classifier():
    r = torch.tensor([0.3, -1.2, 2.0, 0.0], dtype=F64)
    y = torch.tensor([True, False, False, True])
    scores = torch.zeros(4, 3, dtype=F64)
    scores[:, 2] = r  # the step ends at the last token
    mask = torch.zeros(4, 3, dtype=torch.bool)
    mask[:, 2] = True
    labels = torch.zeros(4, 3, dtype=torch.bool)
    labels[:, 2] = y
    torch.testing.assert_close(process_reward_loss(scores, labels, mask).loss, binary_classifier(r, y).loss)


def test_gradient_is_sigma_minus_label_over_the_steps_and_zero_elsewhere():
    scores, labels, mask = _batch()
    x = torch.where(mask, scores, torch.zeros((), dtype=F64)).requires_grad_()
    process_reward_loss(x, labels, mask).loss.sum().backward()
    expected = torch.zeros(3, 5, dtype=F64)
    expected[0, 1] = (0.75 - 1) / 2
    expected[0, 3] = (0.75 - 0) / 2
    expected[1, 4] = 0.5 - 1
    torch.testing.assert_close(x.grad, expected)
    # Junk (NaN, inf) at unread positions gives a finite loss and a zero gradient there.
    junk = scores.clone().requires_grad_()
    process_reward_loss(junk, labels, mask).loss.sum().backward()
    assert torch.isfinite(junk.grad).all() and junk.grad[~mask].abs().sum() == 0
    base = torch.randn(3, 5, dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda s: process_reward_loss(s, labels, mask).loss, (base,))


def test_aggregates_by_hand():
    # Row 0: p = 3/4, 1/2 (third slot padding); row 1: p = 1/4, 3/4, 3/4; row 2: no step.
    logits = torch.tensor([[LN3, 0.0, -INF], [-LN3, LN3, LN3], [5.0, NAN, INF]], dtype=F64)
    mask = torch.tensor([[True, True, False], [True, True, True], [False, False, False]])
    torch.testing.assert_close(prm_product(logits, mask), torch.tensor([3 / 8, 9 / 64, 0.0], dtype=F64))
    torch.testing.assert_close(prm_min(logits, mask), torch.tensor([0.5, 0.25, 0.0], dtype=F64))
    assert {"product": prm_product, "min": prm_min} == PRM_AGGREGATES


def test_aggregate_invariants():
    torch.manual_seed(0)
    logits = torch.randn(16, 6, dtype=F64) * 3
    mask = torch.rand(16, 6) < 0.7
    mask[:, 0] = True
    product, worst = prm_product(logits, mask), prm_min(logits, mask)
    # A product of probabilities never exceeds its smallest factor.
    assert bool((product <= worst + 1e-12).all())
    one = torch.zeros_like(mask)
    one[:, 0] = True  # a single step: both are that step's probability
    torch.testing.assert_close(prm_product(logits, one), torch.sigmoid(logits[:, 0]))
    torch.testing.assert_close(prm_min(logits, one), torch.sigmoid(logits[:, 0]))
    with pytest.raises(ValueError, match=r"\[B, S\]"):
        prm_product(torch.zeros(3), torch.ones(3, dtype=torch.bool))
