"""Reward combinations: Llama 2 safety gate, weighted sums, Sparrow re-rank."""

from __future__ import annotations

import math

import pytest
import torch

from rlhflab.errors import ConfigError
from rlhflab.losses.combine import (
    ENSEMBLE_AGGREGATIONS,
    ensemble_mean,
    ensemble_min,
    ensemble_uwo,
    llama2_safety_gate,
    sparrow_rerank,
    weighted_sum,
)

F64 = torch.float64


def t(x):
    return torch.tensor(x, dtype=F64)


def test_llama2_gate_by_hand():
    """helpful = [2, 2, 2], safety logits = [0, -3, 1], unsafe prompt = [T, F, F].

    row 0: flagged -> safety 0;  row 1: sigma(-3) = 0.047 < 0.15 -> safety -3;  row 2: sigma(1) = 0.73
    -> helpful 2. Combined [0, -3, 2]: mean -1/3, deviations [1/3, -8/3, 7/3], squares sum 114/9,
    unbiased var 57/9 = 6.3333, std 2.516611 -> whitened [0.132453, -1.059626, 0.927173].
    """
    args = (t([2.0, 2.0, 2.0]), t([0.0, -3.0, 1.0]), torch.tensor([True, False, False]))
    raw = llama2_safety_gate(*args, whiten=False)
    torch.testing.assert_close(raw.rewards, t([0.0, -3.0, 2.0]))
    assert raw.metrics["reward/safety_gated"].tolist() == [1.0, 1.0, 0.0]
    out = llama2_safety_gate(*args)
    torch.testing.assert_close(out.rewards, t([0.132453, -1.059626, 0.927173]), atol=1e-5, rtol=0)


def test_llama2_gate_on_probabilities():
    """Sigmoid outputs: safety 0.1 < 0.15 -> gated -> LOGIT(0.1) = ln(0.1 / 0.9) = -2.197225;
    safety 0.9, helpful 0.5 -> LOGIT(0.5) = 0."""
    out = llama2_safety_gate(
        t([0.8, 0.5]), t([0.1, 0.9]), torch.tensor([False, False]), whiten=False, scores_are_probs=True
    )
    torch.testing.assert_close(out.rewards, t([math.log(0.1 / 0.9), 0.0]))


def test_weighted_sum_by_hand():
    """[[1, 2], [3, 4]] . [0.5, 2] = [0.5 + 4, 1.5 + 8] = [4.5, 9.5]."""
    torch.testing.assert_close(weighted_sum(t([[1.0, 2.0], [3.0, 4.0]]), [0.5, 2.0]), t([4.5, 9.5]))
    torch.testing.assert_close(weighted_sum([t([1.0, 3.0]), t([2.0, 4.0])], [0.5, 2.0]), t([4.5, 9.5]))
    with pytest.raises(ConfigError, match="one weight per reward"):
        weighted_sum(t([[1.0, 2.0]]), [1.0])


def test_sparrow_rerank_by_hand():
    """R_pr = [1, -1] -> AVG 0 -> e^1 / (e^1 + e^0) = sigma(1) = 0.731059, sigma(-1) = 0.268941.
    Rules [0.9, 0.4] -> (0.36)^(1/2) = 0.6; [1.0, 0.25] -> 0.5.
    R = [0.731059 * 0.6, 0.268941 * 0.5] = [0.438635, 0.134471]. An absent third candidate scores 0
    and does not move the average.
    """
    pr = t([[1.0, -1.0, 30.0]])
    rules = t([[[0.9, 0.4], [1.0, 0.25], [0.0, 0.0]]])
    out = sparrow_rerank(pr, rules, torch.tensor([[True, True, False]]))
    torch.testing.assert_close(out.rewards, t([[0.438635, 0.134471, 0.0]]), atol=1e-6, rtol=0)
    expected = math.exp(1) / (math.exp(1) + math.exp(0)) * math.sqrt(0.9 * 0.4)
    assert out.rewards[0, 0].item() == pytest.approx(expected)


# ---- reward-model ensembles (Coste et al. 2024) ----------------------------------------------------------

# K = 3 members (rows) scoring B = 3 responses (columns).
MEMBERS = [[1.0, 4.0, 0.0], [3.0, 2.0, 0.0], [2.0, 0.0, 0.0]]


def test_ensemble_aggregations_by_hand():
    """Columns (1, 3, 2), (4, 2, 0), (0, 0, 0).

    mean: 6/3 = 2, 6/3 = 2, 0.  min (WCO): 1, 0, 0.
    variance (1/K): column 0 deviations (-1, 1, 0) -> (1 + 1 + 0) / 3 = 2/3; column 1 (2, 0, -2) -> 8/3; column 2 0.
    UWO, lambda = 0.5: 2 - 1/3 = 5/3, 2 - 4/3 = 2/3, 0. The first two responses have the same mean; WCO and UWO
    both prefer the one the members agree on (column 0).
    """
    r = t(MEMBERS)
    torch.testing.assert_close(ensemble_mean(r), t([2.0, 2.0, 0.0]))
    torch.testing.assert_close(ensemble_min(r), t([1.0, 0.0, 0.0]))
    torch.testing.assert_close(ensemble_uwo(r, 0.5), t([5.0 / 3.0, 2.0 / 3.0, 0.0]))
    torch.testing.assert_close(ensemble_uwo(r, 1.5), t([2.0 - 1.0, 2.0 - 4.0, 0.0]))  # 1.5 * 2/3, 1.5 * 8/3
    assert {"mean": ensemble_mean, "min": ensemble_min, "uwo": ensemble_uwo} == ENSEMBLE_AGGREGATIONS


def test_ensemble_invariants():
    g = torch.Generator().manual_seed(0)
    r = torch.randn(5, 7, generator=g, dtype=F64)
    # One member: every aggregation is that member.
    one = r[:1]
    for aggregate in (ensemble_mean, ensemble_min, lambda x: ensemble_uwo(x, 3.0)):
        torch.testing.assert_close(aggregate(one), r[0])
    torch.testing.assert_close(ensemble_uwo(r, 0.0), ensemble_mean(r))  # lambda = 0: the mean
    assert (ensemble_min(r) <= ensemble_mean(r)).all()  # the worst case never exceeds the mean
    assert (ensemble_uwo(r, 0.7) <= ensemble_mean(r)).all()  # a variance is >= 0
    # Members that agree exactly: WCO = UWO = mean.
    same = r[:1].expand(4, -1)
    torch.testing.assert_close(ensemble_min(same), ensemble_mean(same))
    torch.testing.assert_close(ensemble_uwo(same, 2.0), ensemble_mean(same))
    # A shift of every member shifts each aggregation by the same amount (the variance does not move).
    for aggregate in (ensemble_mean, ensemble_min, lambda x: ensemble_uwo(x, 0.5)):
        torch.testing.assert_close(aggregate(r + 3.0), aggregate(r) + 3.0)
    # UWO's variance is the population one (1/K), as in the paper, not torch.var's unbiased 1/(K-1).
    torch.testing.assert_close(ensemble_mean(r) - ensemble_uwo(r, 1.0), r.var(dim=0, unbiased=False))


def test_ensemble_gradients():
    r = torch.randn(4, 3, dtype=F64, generator=torch.Generator().manual_seed(1), requires_grad=True)
    assert torch.autograd.gradcheck(ensemble_mean, (r,))
    assert torch.autograd.gradcheck(lambda x: ensemble_uwo(x, 0.5), (r,))
    assert torch.autograd.gradcheck(ensemble_min, (r,))  # distinct members: the minimum is differentiable
    # WCO's gradient flows to the lowest member only.
    x = t([[1.0, 4.0, 0.0], [3.0, 2.0, -1.0], [2.0, 0.0, 5.0]]).requires_grad_(True)
    ensemble_min(x).sum().backward()  # minima: row 0 of column 0, row 2 of column 1, row 1 of column 2
    assert x.grad.tolist() == [[1.0, 0.0, 0.0], [0.0, 0.0, 1.0], [0.0, 1.0, 0.0]]


def test_ensemble_bad_input():
    with pytest.raises(ValueError, match=r"\[K, B\]"):
        ensemble_mean(t([1.0, 2.0]))
    with pytest.raises(ValueError, match=r"\[K, B\]"):
        ensemble_min(torch.zeros(0, 3, dtype=F64))
    with pytest.raises(ValueError, match="lambda must be a finite number >= 0"):
        ensemble_uwo(t(MEMBERS), -0.1)
    with pytest.raises(ValueError, match="lambda must be a finite number >= 0"):
        ensemble_uwo(t(MEMBERS), float("nan"))
