"""Reward-model losses: hand-worked numbers, invariants and gradchecks.

Reference values: -log sigma(z) = log(1 + e^-z): z = 0 -> 0.693147, 0.5 -> 0.474077, 1 -> 0.313262,
1.5 -> 0.201413, 2 -> 0.126928, -1 -> 1.313262.
"""

from __future__ import annotations

import math

import pytest
import torch

from rlhflab.errors import ConfigError
from rlhflab.losses.reward import (
    all_pairs_with_ties,
    bradley_terry,
    distributional_preference,
    llama2_margins,
    pairwise_all_pairs,
    plackett_luce,
    plackett_luce_with_ties,
    regression,
    reward_centering,
    stacked_distributional,
    tie_orders,
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


# ---- Rankings with ties ----------------------------------------------------------------------------------


def test_tie_orders_by_hand():
    assert tie_orders([0, 1, 2]) == [[0, 1, 2]]
    assert tie_orders([0, 1, 1]) == [[0, 1, 2], [0, 2, 1]]
    assert tie_orders([0, 0, 1, 1]) == [[0, 1, 2, 3], [0, 1, 3, 2], [1, 0, 2, 3], [1, 0, 3, 2]]
    with pytest.raises(ValueError, match="720 orders"):
        tie_orders([0] * 6 + [1], max_orders=120)


def test_all_pairs_with_ties_by_hand():
    """ranks [0, 1, 1], r = [1, 0, 0.5]: the tied pair (1, 2) is skipped, so
    L = (-log s(1 - 0) - log s(1 - 0.5)) / 2 = (0.313262 + 0.474077) / 2 = 0.393669; both pairs in order: acc 1.
    A second ranking [0, 1, -1] (K = 2, padded) with r = [0, 1]: -log s(-1) = 1.313262, accuracy 0."""
    rewards = t([[1.0, 0.0, 0.5], [0.0, 1.0, 123.0]])
    ranks = torch.tensor([[0, 1, 1], [0, 1, -1]])
    out = all_pairs_with_ties(rewards, ranks)
    torch.testing.assert_close(out.loss, t([0.393669, 1.313262]), atol=1e-6, rtol=0)
    assert out.metrics["reward/accuracy"].tolist() == [1.0, 0.0]
    # label smoothing 0.1 on the first ranking: 0.9 * 0.393669 + 0.1 * (1.313262 + 0.974077) / 2
    smoothed = all_pairs_with_ties(rewards, ranks, label_smoothing=0.1)
    assert float(smoothed.loss[0]) == pytest.approx(
        0.9 * 0.393669 + 0.1 * (1.313262 + 0.974077) / 2, abs=1e-6
    )
    with pytest.raises(ValueError, match="no strictly ordered pair"):
        all_pairs_with_ties(t([[1.0, 2.0]]), torch.tensor([[0, 0]]))


def test_plackett_luce_with_ties_by_hand():
    """ranks [0, 1, 1], r = [1, 0, 0.5]: the partial order is 'response 0 first', whatever the order of the
    tie: P = e^1 / Z * (e^0 / (e^0 + e^.5) + e^.5 / (e^0 + e^.5)) = e^1 / Z, Z = e^1 + e^0 + e^.5 = 5.367003,
    so L = log Z - 1 = 1.680270 - 1 = 0.680270."""
    out = plackett_luce_with_ties(t([[1.0, 0.0, 0.5]]), torch.tensor([[0, 1, 1]]))
    assert float(out.loss[0]) == pytest.approx(0.680270, abs=1e-6)
    assert float(out.loss[0]) == pytest.approx(
        float(torch.log(torch.exp(t([1.0, 0.0, 0.5])).sum())) - 1, abs=1e-12
    )


def test_rankings_with_ties_reduce_to_the_plain_losses_without_ties():
    torch.manual_seed(0)
    rewards = torch.randn(4, 3, dtype=F64)
    ranks = torch.tensor([[0, 1, 2], [0, 1, 2], [0, 1, -1], [0, 1, -1]])
    mask = ranks >= 0
    torch.testing.assert_close(
        plackett_luce_with_ties(rewards, ranks).loss, plackett_luce(rewards, mask).loss
    )
    torch.testing.assert_close(
        all_pairs_with_ties(rewards, ranks).loss, pairwise_all_pairs(rewards, mask).loss
    )
    # K = 2 without ties: both are Bradley-Terry.
    two = rewards[:, :2]
    bt = bradley_terry(two[:, 0], two[:, 1]).loss
    torch.testing.assert_close(plackett_luce_with_ties(two, ranks[:, :2]).loss, bt)
    torch.testing.assert_close(all_pairs_with_ties(two, ranks[:, :2]).loss, bt)


def test_plackett_luce_with_ties_is_the_sum_over_consistent_orders():
    """Brute force: P(partial order) = sum over the tie orders o of prod_k e^{r_o(k)} / sum_{j >= k} e^{r_o(j)}."""
    torch.manual_seed(1)
    rewards = torch.randn(1, 5, dtype=F64)
    ranks = [0, 1, 1, 2, 2]
    total = 0.0
    for order in tie_orders(ranks):
        r = rewards[0, order]
        total += float(torch.prod(torch.stack([r[k].exp() / r[k:].exp().sum() for k in range(5)])))
    out = plackett_luce_with_ties(rewards, torch.tensor([ranks]))
    assert float(out.loss[0]) == pytest.approx(-torch.log(t(total)).item(), abs=1e-10)


def test_absent_responses_never_matter():
    ranks = torch.tensor([[0, 1, 1, -1]])
    base = t([[1.0, 0.0, 0.5, 0.0]])
    other = t([[1.0, 0.0, 0.5, float("nan")]]).requires_grad_()
    for fn in (all_pairs_with_ties, plackett_luce_with_ties):
        out = fn(other, ranks)
        torch.testing.assert_close(out.loss, fn(base, ranks).loss)
        out.loss.sum().backward()
        assert float(other.grad[0, 3]) == 0.0 and torch.isfinite(other.grad).all()
        other.grad = None


def test_reward_centering_by_hand():
    """Pair (r_c, r_r) = (1, 0): (r_c + r_r)^2 = 1; ranking [2, 1, 0] and a padded one [1, -1, (x)]:
    (2 * mean)^2 = (2 * 1)^2 = 4 and (2 * 0)^2 = 0."""
    torch.testing.assert_close(reward_centering(t([[1.0, 0.0]])), t([1.0]))
    out = reward_centering(
        t([[2.0, 1.0, 0.0], [1.0, -1.0, 9.0]]), torch.tensor([[True] * 3, [True, True, False]])
    )
    torch.testing.assert_close(out, t([4.0, 0.0]))


def test_binary_classifier_by_hand():
    from rlhflab.losses import binary_classifier

    # r = 0: -log(1/2) = log 2 whatever the label. r = ln 3: sigma = 3/4, so y = 1 costs -log(3/4) = 0.2877 and
    # y = 0 costs -log(1/4) = 1.3863. r = -ln 3 with y = 0 is the mirror image: 0.2877.
    r = torch.tensor([0.0, math.log(3), math.log(3), -math.log(3)], dtype=torch.float64)
    y = torch.tensor([True, True, False, False])
    out = binary_classifier(r, y)
    torch.testing.assert_close(
        out.loss,
        torch.tensor([math.log(2), -math.log(0.75), -math.log(0.25), -math.log(0.75)], dtype=torch.float64),
    )
    assert out.metrics["reward/accuracy"].tolist() == [0.0, 1.0, 0.0, 1.0]  # r = 0 is not > 0: counted wrong
    assert out.metrics["reward/positive"][:2].tolist() == [0.0, math.log(3)]
    assert out.metrics["reward/negative"][2:].tolist() == [math.log(3), -math.log(3)]
    assert math.isnan(out.metrics["reward/positive"][3]) and math.isnan(out.metrics["reward/negative"][0])
    # Centering adds c (2r)^2: at r = ln 3, 0.5 * 4 * ln(3)^2.
    centered = binary_classifier(r, y, center_coef=0.5)
    torch.testing.assert_close(centered.loss - out.loss, 0.5 * (2 * r) ** 2)
    # The gradient is sigma(r) - y, as for any logistic regression.
    r64 = torch.randn(6, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0, 0.0], dtype=torch.float64)
    binary_classifier(r64, labels).loss.sum().backward()
    torch.testing.assert_close(r64.grad, torch.sigmoid(r64.detach()) - labels)
    assert torch.autograd.gradcheck(
        lambda x: binary_classifier(x, labels).loss, (r64.detach().requires_grad_(),)
    )


def test_distributional_preference_by_hand():
    """Phi(z) = (1 + erf(z / sqrt 2)) / 2. Pair 1: mu 1 vs 0, sigma^2 1 and 1: z = 1 / sqrt 2 = 0.707107, Phi =
    0.760250, loss 0.274108. Pair 2: mu 0.5 vs 1.5, sigma^2 3 and 1: z = -1 / 2, Phi = 0.308538, loss 1.175912.
    Pair 3: equal means: z = 0, loss log 2 = 0.693147, whatever the variances."""
    out = distributional_preference(
        t([1.0, 0.5, 2.0]), t([0.0, math.log(3.0), 1.0]), t([0.0, 1.5, 2.0]), t([0.0, 0.0, -2.0])
    )
    torch.testing.assert_close(out.loss, t([0.274108, 1.175912, 0.693147]), atol=1e-6, rtol=0)
    assert out.metrics["reward/accuracy"].tolist() == [1.0, 0.0, 0.0]
    torch.testing.assert_close(out.metrics["reward/std"][:2], t([math.sqrt(2.0), 2.0]))
    assert not out.metrics["reward/std"].requires_grad


def test_distributional_preference_with_equal_variances_is_probit_bradley_terry():
    """sigma_c = sigma_r = s: L = -log Phi(gap / (sqrt 2 s)), a probit Bradley-Terry model in the scaled gap; so
    doubling s halves the effective gap, and the two orders of a pair have probabilities summing to 1."""
    gap = t([-2.0, -0.3, 0.0, 0.4, 3.0])
    for s in (0.5, 1.0, 2.0):
        log_var = torch.full_like(gap, 2 * math.log(s))
        out = distributional_preference(gap, log_var, torch.zeros_like(gap), log_var)
        z = gap / (math.sqrt(2.0) * s)
        torch.testing.assert_close(out.loss, -torch.log(0.5 * (1 + torch.erf(z / math.sqrt(2.0)))))
        flipped = distributional_preference(torch.zeros_like(gap), log_var, gap, log_var)
        torch.testing.assert_close(torch.exp(-out.loss) + torch.exp(-flipped.loss), torch.ones_like(gap))
    # Far in the tail the loss stays finite and linear-quadratic (log_ndtr), not inf.
    far = distributional_preference(t([-40.0]), t([0.0]), t([0.0]), t([0.0]))
    assert math.isfinite(far.loss.item()) and far.loss.item() > 400


def test_distributional_preference_gradcheck():
    g = torch.Generator().manual_seed(0)
    args = tuple(torch.randn(4, generator=g, dtype=F64, requires_grad=True) for _ in range(4))
    assert torch.autograd.gradcheck(lambda *a: distributional_preference(*a).loss, args)
    stacked = torch.randn(6, 2, generator=g, dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: stacked_distributional(x, center_coef=0.3).loss, (stacked,))


def test_stacked_distributional_splits_rows_and_centres_the_means():
    """Rows: chosen (mu 1, log var 0), rejected (mu 0, log var 0): the loss of pair 1 above, 0.274108; centering
    0.5 x (1 + 0)^2 = 0.5."""
    out = stacked_distributional(t([[1.0, 0.0], [0.0, 0.0]]), center_coef=0.5)
    torch.testing.assert_close(out.loss, t([0.274108 + 0.5]), atol=1e-6, rtol=0)
    torch.testing.assert_close(out.metrics["loss/center"], t([1.0]))
    with pytest.raises(ValueError, match="2B, 2"):
        stacked_distributional(t([[1.0, 0.0, 2.0], [0.0, 0.0, 1.0]]))
