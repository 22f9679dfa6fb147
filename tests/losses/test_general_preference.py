"""The general preference model's loss and DNO's tournament: hand-worked numbers, invariants, gradcheck.

Reference values: -log sigma(z) = log(1 + e^-z): z = 0 -> 0.693147, 1 -> 0.313262, -1 -> 1.313262,
2 -> 0.126928, 3 -> 0.048587, -3 -> 3.048587.
"""

from __future__ import annotations

import math

import pytest
import torch

from rlhflab.errors import ConfigError
from rlhflab.losses import bradley_terry
from rlhflab.losses.general_preference import antisymmetric_logits, general_preference
from rlhflab.losses.tournament import (
    best_worst_pairs,
    tournament_matrix,
    tournament_pairs,
    tournament_win_rates,
)

F64 = torch.float64
NAN = float("nan")


def t(x):
    return torch.tensor(x, dtype=F64)


def test_general_preference_by_hand():
    """g(a, b) = 2, g(b, a) = 1 -> s = 1:  label 1: -log sigma(1) = 0.313262;  label 0: -log sigma(-1) = 1.313262;
    label 0.5: 0.5 * 0.313262 + 0.5 * 1.313262 = 0.813262.
    g(a, b) = 0.5, g(b, a) = 0.5 -> s = 0, label 0.5: log 2 = 0.693147 (a tie's minimum)."""
    out = general_preference(t([2.0, 2.0, 2.0, 0.5]), t([1.0, 1.0, 1.0, 0.5]), t([1.0, 0.0, 0.5, 0.5]))
    torch.testing.assert_close(out.loss, t([0.313262, 1.313262, 0.813262, 0.693147]), atol=1e-6, rtol=0)
    torch.testing.assert_close(out.metrics["reward/margin"], t([1.0, 1.0, 1.0, 0.0]))
    torch.testing.assert_close(out.metrics["reward/prob_first"][:1], t([1 / (1 + math.exp(-1))]))
    acc = out.metrics["reward/accuracy"]
    assert acc[:2].tolist() == [1.0, 0.0] and acc[2:].isnan().all()  # a tie has no side to get right
    assert not out.metrics["reward/margin"].requires_grad


def test_general_preference_label_smoothing_by_hand():
    """eps = 0.1, s = 3, label 1: y' = 0.9;  0.9 * 0.048587 + 0.1 * 3.048587 = 0.043728 + 0.304859 = 0.348587.
    A tie is unchanged by smoothing (y' = 0.1 + 0.8 * 0.5 = 0.5)."""
    out = general_preference(t([3.0, 3.0]), t([0.0, 0.0]), t([1.0, 0.5]), label_smoothing=0.1)
    plain = general_preference(t([3.0]), t([0.0]), t([0.5]))
    assert out.loss[0].item() == pytest.approx(0.348587, abs=1e-6)
    assert out.loss[1].item() == pytest.approx(plain.loss[0].item(), abs=1e-12)
    with pytest.raises(ConfigError):
        general_preference(t([1.0]), t([0.0]), t([1.0]), label_smoothing=0.5)
    with pytest.raises(ValueError, match="labels must be in"):
        general_preference(t([1.0]), t([0.0]), t([2.0]))


def test_label_one_is_bradley_terry_on_the_antisymmetric_logit():
    g = torch.Generator().manual_seed(0)
    fwd, bwd = torch.randn(16, generator=g, dtype=F64), torch.randn(16, generator=g, dtype=F64)
    ours = general_preference(fwd, bwd, torch.ones(16, dtype=F64))
    torch.testing.assert_close(ours.loss, bradley_terry(fwd, bwd).loss)
    # ... and with label 0 it is Bradley-Terry with the roles swapped
    swapped = general_preference(fwd, bwd, torch.zeros(16, dtype=F64))
    torch.testing.assert_close(swapped.loss, bradley_terry(bwd, fwd).loss)


def test_swapping_the_responses_and_the_label_changes_nothing():
    """(a, b, y) and (b, a, 1 - y) are the same observation: one pair trains both orders."""
    g = torch.Generator().manual_seed(1)
    fwd, bwd = torch.randn(8, generator=g, dtype=F64), torch.randn(8, generator=g, dtype=F64)
    y = torch.rand(8, generator=g, dtype=F64)
    torch.testing.assert_close(general_preference(fwd, bwd, y).loss, general_preference(bwd, fwd, 1 - y).loss)
    torch.testing.assert_close(antisymmetric_logits(fwd, bwd), -antisymmetric_logits(bwd, fwd))


def test_a_tie_is_minimal_at_one_half():
    s = torch.linspace(-3, 3, 61, dtype=F64)
    loss = general_preference(s, torch.zeros_like(s), torch.full_like(s, 0.5)).loss
    assert loss.argmin().item() == 30 and loss[30].item() == pytest.approx(math.log(2))
    torch.testing.assert_close(loss, loss.flip(0))  # symmetric in s


def test_general_preference_gradcheck():
    g = torch.Generator().manual_seed(2)
    fwd = torch.randn(5, generator=g, dtype=F64, requires_grad=True)
    bwd = torch.randn(5, generator=g, dtype=F64, requires_grad=True)
    y = t([1.0, 0.0, 0.5, 0.3, 1.0])
    assert torch.autograd.gradcheck(lambda a, b: general_preference(a, b, y, 0.1).loss, (fwd, bwd))


# ---- DNO's tournament -----------------------------------------------------------------------------------------


def test_tournament_pairs_order():
    assert tournament_pairs(3) == [(0, 1), (0, 2), (1, 2)]
    assert len(tournament_pairs(5)) == 10
    with pytest.raises(ValueError):
        tournament_pairs(1)


def test_tournament_by_hand():
    """K = 3, labels for (0,1), (0,2), (1,2):
    prompt 0: 1, 0.5, 0 -> M[0,1] = 1, M[1,0] = 0; M[0,2] = M[2,0] = 0.5; M[1,2] = 0, M[2,1] = 1.
        W = ((1 + 0.5)/2, (0 + 0)/2, (0.5 + 1)/2) = (0.75, 0, 0.75): best 0 (first of the tied), worst 1,
        margin 0.75.
    prompt 1 (rock, paper, scissors: 0 beats 1, 1 beats 2, 2 beats 0): 1, 0, 1 -> W = (0.5, 0.5, 0.5): no pair.
    prompt 2: 1, NaN, NaN -> response 2 played no answered game: W = (1, 0, NaN): best 0, worst 1, margin 1.
    prompt 3: NaN, NaN, NaN -> nothing known: no pair.
    """
    labels = t([[1.0, 0.5, 0.0], [1.0, 0.0, 1.0], [1.0, NAN, NAN], [NAN, NAN, NAN]])
    prefs = tournament_matrix(labels, 3)
    assert prefs[0].tolist()[0][1:] == [1.0, 0.5] and prefs[0, 1, 0] == 0.0 and prefs[0, 2, 1] == 1.0
    assert prefs[:, [0, 1, 2], [0, 1, 2]].isnan().all()
    wr = tournament_win_rates(prefs)
    torch.testing.assert_close(
        wr[:3], t([[0.75, 0.0, 0.75], [0.5, 0.5, 0.5], [1.0, 0.0, NAN]]), equal_nan=True
    )
    assert wr[3].isnan().all()
    best, worst, margin, keep = best_worst_pairs(wr)
    assert best[:3].tolist() == [0, 0, 0] and worst[:3].tolist() == [1, 0, 1]
    torch.testing.assert_close(margin[:3], t([0.75, 0.0, 1.0]))
    assert margin[3].isnan() and keep.tolist() == [True, False, True, False]


def test_the_margin_filter():
    """K = 4, one prompt, labels (0,1) (0,2) (0,3) (1,2) (1,3) (2,3) = 1, 1, 0, 1, 0, 0:
    W_0 = (1 + 1 + 0)/3 = 2/3, W_1 = (0 + 1 + 0)/3 = 1/3, W_2 = (0 + 0 + 0)/3 = 0, W_3 = (1 + 1 + 1)/3 = 1.
    best 3, worst 2, margin 1: kept under any threshold below 1.
    A second prompt, labels 0, 1, 1, 0, 1, 0 (1 beats 0, 0 beats 2 and 3, 2 beats 1, 1 beats 3, 3 beats 2):
    W_0 = (0 + 1 + 1)/3 = 2/3, W_1 = (1 + 0 + 1)/3 = 2/3, W_2 = (0 + 1 + 0)/3 = 1/3, W_3 = (0 + 0 + 1)/3 = 1/3:
    best 0, worst 2 (the first of the tied), margin 1/3: kept at a threshold of 1/3, not at 0.4.
    """
    labels = t([[1.0, 1.0, 0.0, 1.0, 0.0, 0.0], [0.0, 1.0, 1.0, 0.0, 1.0, 0.0]])
    wr = tournament_win_rates(tournament_matrix(labels, 4))
    torch.testing.assert_close(wr, t([[2 / 3, 1 / 3, 0.0, 1.0], [2 / 3, 2 / 3, 1 / 3, 1 / 3]]))
    best, worst, margin, keep = best_worst_pairs(wr, min_margin=1 / 3)
    assert best.tolist() == [3, 0] and worst.tolist() == [2, 2] and keep.tolist() == [True, True]
    assert best_worst_pairs(wr, min_margin=0.4)[3].tolist() == [True, False]
    with pytest.raises(ConfigError):
        best_worst_pairs(wr, min_margin=1.0)


def test_win_rates_of_a_transitive_judge_follow_its_order():
    """Labels from scores (a reward-like judge): the win rate ranks responses as the scores do."""
    scores = torch.tensor([[0.3, 2.0, -1.0, 0.7, 1.1]])
    labels = torch.tensor([[float(scores[0, i] > scores[0, j]) for i, j in tournament_pairs(5)]])
    wr = tournament_win_rates(tournament_matrix(labels, 5))
    assert wr.argsort().tolist() == scores.argsort().tolist()
    torch.testing.assert_close(wr[0].sort().values, t([0.0, 0.25, 0.5, 0.75, 1.0]))
