"""DPO family: hand-worked numbers, invariants (DPO = log 2, IPO minimum, CPL -> DPO) and the loss table.

Reference values: -log sigma(z): 0 -> 0.693147, 1 -> 0.313262, 1.5 -> 0.201413, -1 -> 1.313262,
0.3 -> 0.554355, 0.7 -> 0.403186, -0.7 -> 1.103186; sigma(0.4) = 0.598688, sigma(0.6) = 0.645656.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
from pathlib import Path

import pytest
import torch

from rlhflab.errors import ConfigError
from rlhflab.losses.preference import (
    PREFERENCE_LOSS_TABLE,
    BCORewardShift,
    PreferenceInputs,
    bco,
    cdpo,
    cpl,
    dpo,
    hinge,
    implicit_reward_metrics,
    ipo,
    kto,
    kto_kl_estimate,
    orpo,
    preference_loss_markdown,
    robust_dpo,
    run_preference_loss,
    simpo,
)

F64 = torch.float64


def t(x):
    return torch.tensor(x, dtype=F64)


# pc = -1, pr = -3, rc = rr = -2: h = (-1 + 2) - (-3 + 2) = 1 - (-1) = 2.
PAIR = (t([-1.0]), t([-3.0]), t([-2.0]), t([-2.0]))


def test_dpo_by_hand():
    """beta = 0.5, h = 2 -> -log sigma(1) = 0.313262; rewards 0.5 * 1 = 0.5 and 0.5 * -1 = -0.5."""
    out = dpo(*PAIR, beta=0.5)
    assert out.loss.item() == pytest.approx(0.313262, abs=1e-6)
    m = out.metrics
    assert (m["reward/chosen"].item(), m["reward/rejected"].item()) == (0.5, -0.5)
    assert (m["reward/margin"].item(), m["reward/accuracy"].item()) == (1.0, 1.0)


@pytest.mark.parametrize("beta", [0.01, 0.1, 1.0, 5.0])
def test_dpo_is_log2_when_policy_equals_reference(beta):
    g = torch.Generator().manual_seed(0)
    c, r = torch.randn(8, dtype=F64, generator=g) * 20, torch.randn(8, dtype=F64, generator=g) * 20
    out = dpo(c, r, c, r, beta=beta)
    torch.testing.assert_close(out.loss, torch.full((8,), math.log(2), dtype=F64))
    assert out.metrics["reward/accuracy"].sum() == 0


def test_cdpo_and_robust_by_hand():
    """eps = 0.1, beta h = 1:
    cDPO = 0.9 * 0.313262 + 0.1 * 1.313262 = 0.413262;
    robust = (0.9 * 0.313262 - 0.1 * 1.313262) / (1 - 0.2) = 0.150610 / 0.8 = 0.188262.
    """
    assert cdpo(*PAIR, beta=0.5, label_smoothing=0.1).loss.item() == pytest.approx(0.413262, abs=1e-6)
    assert robust_dpo(*PAIR, beta=0.5, label_smoothing=0.1).loss.item() == pytest.approx(0.188262, abs=1e-6)
    torch.testing.assert_close(
        robust_dpo(*PAIR, beta=0.5, label_smoothing=0.0).loss, dpo(*PAIR, beta=0.5).loss
    )
    with pytest.raises(ConfigError):
        robust_dpo(*PAIR, label_smoothing=0.5)


def test_ipo_by_hand_and_minimum():
    """beta = 0.5: target 1/(2 beta) = 1; h = 2 -> (2 - 1)^2 = 1.
    Minimum: loss 0 and zero gradient at h = 1/(2 beta); larger on both sides.
    """
    assert ipo(*PAIR, beta=0.5).loss.item() == pytest.approx(1.0)
    beta = 0.25
    target = 1 / (2 * beta)
    h = torch.tensor([target - 0.3, target, target + 0.3], dtype=F64, requires_grad=True)
    zero = torch.zeros(3, dtype=F64)
    out = ipo(h, zero, zero, zero, beta=beta)
    out.loss.sum().backward()
    assert out.loss[1].item() == 0.0 and h.grad[1].item() == 0.0
    # 0.3 either side: loss 0.3^2 = 0.09, gradient 2 x (h - target) = -0.6 and +0.6.
    assert out.loss[[0, 2]].tolist() == pytest.approx([0.09, 0.09]) and h.grad[
        [0, 2]
    ].tolist() == pytest.approx([-0.6, 0.6])


def test_hinge_by_hand():
    """beta = 0.5: h = 2 -> max(0, 1 - 1) = 0; h = 1 -> max(0, 1 - 0.5) = 0.5."""
    assert hinge(*PAIR, beta=0.5).loss.item() == 0.0
    out = hinge(t([-2.0]), t([-3.0]), t([-2.0]), t([-2.0]), beta=0.5)
    assert out.loss.item() == pytest.approx(0.5)


def test_kto_by_hand():
    """beta = 0.5, z0 = 0.2.
    desirable, r = -1 - (-2) = 1: 1 - sigma(0.5 * (1 - 0.2)) = 1 - sigma(0.4) = 0.401312;
    undesirable, r = -3 - (-2) = -1: 1 - sigma(0.5 * (0.2 + 1)) = 1 - sigma(0.6) = 0.354344, x 2 weight.
    """
    out = kto(
        t([-1.0, -3.0]), t([-2.0, -2.0]), torch.tensor([True, False]), 0.2, beta=0.5, undesirable_weight=2.0
    )
    torch.testing.assert_close(out.loss, t([0.401312, 2 * 0.354344]), atol=1e-6, rtol=0)
    torch.testing.assert_close(out.metrics["reward/implicit"], t([0.5, -0.5]))


def test_kto_kl_estimate_by_hand():
    """Mismatched-pair log-ratios [0.5, 0.5] -> 0.5; [0.5, -1.5] -> mean -0.5 -> clamped to 0."""
    assert kto_kl_estimate(t([-1.0, -1.0]), t([-1.5, -1.5])).item() == 0.5
    est = kto_kl_estimate(t([-1.0, -3.0]).requires_grad_(), t([-1.5, -1.5]))
    assert est.item() == 0.0 and not est.requires_grad


def test_bco_by_hand():
    """beta = 0.5, delta = 0.2.
    desirable, r = 0.5 * (-1 - (-2)) = 0.5: -log sigma(0.5 - 0.2) = -log sigma(0.3) = 0.554355;
    undesirable, r = 0.5 * (-3 - (-2)) = -0.5: -log sigma(-(-0.5 - 0.2)) = -log sigma(0.7) = 0.403186.
    The same rewards with the labels swapped: -log sigma(-0.3) = 0.854355, -log sigma(-0.7) = 1.103186.
    """
    pol, ref = t([-1.0, -3.0]), t([-2.0, -2.0])
    out = bco(pol, ref, torch.tensor([True, False]), 0.2, beta=0.5)
    torch.testing.assert_close(out.loss, t([0.554355, 0.403186]), atol=1e-6, rtol=0)
    torch.testing.assert_close(out.metrics["reward/implicit"], t([0.5, -0.5]))
    torch.testing.assert_close(out.metrics["reward/shift"], t([0.2, 0.2]))
    swapped = bco(pol, ref, torch.tensor([False, True]), torch.tensor(0.2), beta=0.5)
    torch.testing.assert_close(swapped.loss, t([0.854355, 1.103186]), atol=1e-6, rtol=0)


@pytest.mark.parametrize("beta", [0.01, 0.1, 1.0])
def test_bco_is_log2_when_policy_equals_reference_and_no_shift(beta):
    g = torch.Generator().manual_seed(1)
    logps = torch.randn(6, dtype=F64, generator=g) * 20
    out = bco(logps, logps, torch.tensor([True, False] * 3), 0.0, beta=beta)
    torch.testing.assert_close(out.loss, torch.full((6,), math.log(2), dtype=F64))


def test_bco_shift_is_a_constant_and_moves_the_decision_boundary():
    """Gradient d/dr: desirable -(1 - sigma(r - delta)), undesirable sigma(r - delta); nothing reaches delta.
    At r = delta each kind pays log 2: the shift is where the classifier is undecided."""
    pol = t([-1.0, -1.0]).requires_grad_()
    shift = torch.tensor(0.5, dtype=F64, requires_grad=True)
    out = bco(pol, t([-1.5, -1.5]), torch.tensor([True, False]), shift, beta=1.0)
    torch.testing.assert_close(out.loss, torch.full((2,), math.log(2), dtype=F64))
    out.loss.sum().backward()
    torch.testing.assert_close(pol.grad, t([-0.5, 0.5]))
    assert shift.grad is None


def test_bco_reward_shift_by_hand():
    """Running mean over every reward seen: [0.5, -0.5, 0.25] -> 0.25 / 3 = 0.083333; then [1.0]:
    (0.25 + 1.0) / 4 = 0.3125. The state survives a round trip; a NaN reward is refused."""
    shift = BCORewardShift()
    assert shift.value == 0.0
    assert shift.update(t([0.5, -0.5, 0.25])) == pytest.approx(0.083333, abs=1e-6)
    assert shift.update(t([1.0])) == pytest.approx(0.3125)
    assert shift.update(t([])) == pytest.approx(0.3125)
    clone = BCORewardShift()
    clone.load_state_dict(shift.state_dict())
    assert (clone.value, clone.count) == (0.3125, 4)
    assert clone.update(t([0.3125])) == pytest.approx(0.3125)
    with pytest.raises(ValueError, match="not finite"):
        shift.update(t([float("nan")]))


def test_run_preference_loss_feeds_bco_its_shift():
    """The bco row reads desirable flags and reward_shift (not kl_estimate); per-kind rewards NaN elsewhere;
    accuracy = the share on the right side of delta: r = [0.5, -0.5, 0.1] against delta 0.2 with labels
    [good, bad, good] -> [right, right, wrong]."""
    x = PreferenceInputs(
        t([-1.0, -3.0, -1.8]),
        torch.tensor([2, 2, 2]),
        torch.zeros(3, 2, dtype=F64),
        torch.ones(3, 2, dtype=torch.bool),
        ref_logps=t([-2.0, -2.0, -2.0]),
        desirable=torch.tensor([True, False, True]),
        kl_estimate=torch.tensor(5.0, dtype=F64),  # ignored by bco: a KTO-only input
        reward_shift=0.2,
    )
    out = run_preference_loss(PREFERENCE_LOSS_TABLE["bco"], x, {"beta": 0.5})
    expected = bco(x.policy_logps, x.ref_logps, x.desirable, 0.2, beta=0.5)
    torch.testing.assert_close(out.loss, expected.loss)
    assert out.metrics["reward/accuracy"].tolist() == [1.0, 1.0, 0.0]
    torch.testing.assert_close(out.metrics["reward/implicit"], t([0.5, -0.5, 0.1]))
    assert out.metrics["reward/chosen"][1].isnan() and out.metrics["reward/rejected"][0].isnan()
    assert "kl/reference_point" not in out.metrics
    with pytest.raises(ValueError, match="reward_shift"):
        run_preference_loss(
            PREFERENCE_LOSS_TABLE["bco"], dataclasses.replace(x, reward_shift=None), {"beta": 0.5}
        )


def test_orpo_by_hand():
    """Average log-probs ln 0.5 (chosen) and ln 0.25 (rejected).
    odds_c = 0.5 / 0.5 = 1, odds_r = 0.25 / 0.75 = 1/3 -> log odds ratio = ln 3 = 1.098612;
    sigma(ln 3) = 3/4 -> L_OR = -ln 0.75 = 0.287682; NLL = -ln 0.5 = 0.693147.
    beta = 0.1: loss = 0.693147 + 0.1 * 0.287682 = 0.721915.
    """
    out = orpo(t([math.log(0.5)]), t([math.log(0.25)]), beta=0.1)
    assert out.loss.item() == pytest.approx(0.721915, abs=1e-6)
    assert out.metrics["reward/log_odds_ratio"].item() == pytest.approx(math.log(3))
    custom = orpo(t([math.log(0.5)]), t([math.log(0.25)]), beta=0.1, chosen_nll=t([2.0]))
    assert custom.loss.item() == pytest.approx(2.0 + 0.0287682, abs=1e-6)


def test_simpo_by_hand():
    """beta = 2, gamma = 0.5. Chosen: sum -4 over 4 tokens -> -1; rejected: -6 over 3 -> -2.
    z = 2 * (-1) - 2 * (-2) - 0.5 = 1.5 -> -log sigma(1.5) = 0.201413.
    """
    out = simpo(t([-4.0]), t([-6.0]), torch.tensor([4]), torch.tensor([3]), beta=2.0, gamma=0.5)
    assert out.loss.item() == pytest.approx(0.201413, abs=1e-6)
    assert (out.metrics["reward/chosen"].item(), out.metrics["reward/rejected"].item()) == (-2.0, -4.0)


def test_cpl_by_hand():
    """alpha = 0.5, gamma = 0.5. Chosen steps [-1, -2]: S+ = 0.5 * (-1 + 0.5 * -2) = -1.0.
    Rejected [-1, -1, -1 | pad]: S- = 0.5 * (-1 - 0.5 - 0.25) = -0.875.
    loss = -log sigma(-1.0 + 0.875) = -log sigma(-0.125) = log(1 + e^0.125) = 0.757599.
    Conservative lambda = 0.5: -log sigma(-1.0 + 0.4375) = -log sigma(-0.5625) = 1.013437.
    """
    args = (
        t([[-1.0, -2.0, 0.0]]),
        torch.tensor([[1, 1, 0]]),
        t([[-1.0, -1.0, -1.0, 7.0]]),
        torch.tensor([[1, 1, 1, 0]]),
    )
    out = cpl(*args, alpha=0.5, gamma=0.5)
    assert out.loss.item() == pytest.approx(0.757599, abs=1e-6)
    assert out.metrics["reward/chosen"].item() == pytest.approx(-1.0)
    biased = cpl(*args, alpha=0.5, gamma=0.5, conservative_lambda=0.5)
    assert biased.loss.item() == pytest.approx(1.013437, abs=1e-6)


def test_cpl_one_step_equals_dpo_without_reference():
    g = torch.Generator().manual_seed(3)
    c, r = torch.randn(6, 1, dtype=F64, generator=g) * 3, torch.randn(6, 1, dtype=F64, generator=g) * 3
    ones, zeros = torch.ones(6, 1, dtype=torch.bool), torch.zeros(6, dtype=F64)
    out = cpl(c, ones, r, ones, alpha=0.7, gamma=1.0)
    torch.testing.assert_close(out.loss, dpo(c[:, 0], r[:, 0], zeros, zeros, beta=0.7).loss)
    # With a reference it is DPO proper.
    rc, rr = torch.randn(6, 1, dtype=F64, generator=g), torch.randn(6, 1, dtype=F64, generator=g)
    with_ref = cpl(c, ones, r, ones, alpha=0.7, ref_chosen_logps=rc, ref_rejected_logps=rr)
    torch.testing.assert_close(with_ref.loss, dpo(c[:, 0], r[:, 0], rc[:, 0], rr[:, 0], beta=0.7).loss)


def test_the_loss_table():
    """Every row's keywords exist in its function; the "sums" rows share the paired signature and report the
    implicit rewards; reference-free and unpaired rows are the ones the papers define."""
    g = torch.Generator().manual_seed(0)
    args = [torch.randn(5, dtype=F64, generator=g) for _ in range(4)]
    for name, row in PREFERENCE_LOSS_TABLE.items():
        assert set(row.params.values()) <= set(inspect.signature(row.fn).parameters), name
        assert row.average == (row.inputs == "sums"), name
        if row.inputs == "sums":
            out = row.fn(
                *args, beta=0.2, **({"label_smoothing": 0.1} if "label_smoothing" in row.params else {})
            )
            assert out.loss.shape == (5,), name
            expected = implicit_reward_metrics(*args, 0.2)["reward/chosen"]
            torch.testing.assert_close(out.metrics["reward/chosen"], expected)
    assert [n for n, r in PREFERENCE_LOSS_TABLE.items() if not r.reference] == ["orpo", "simpo", "cpl"]
    assert [n for n, r in PREFERENCE_LOSS_TABLE.items() if r.data == "unpaired"] == ["kto", "bco"]


def test_docs_list_the_table():
    """docs/losses.md carries the table as the code renders it, so the documented list cannot drift."""
    docs = (Path(__file__).resolve().parents[2] / "docs" / "losses.md").read_text()
    assert preference_loss_markdown() in docs


def test_bad_beta_is_a_config_error():
    with pytest.raises(ConfigError, match="beta must be > 0"):
        dpo(*PAIR, beta=0.0)


def test_run_preference_loss_feeds_each_row_its_inputs():
    """The dispatcher by hand, on a batch of 2 pairs (rows c0, c1, r0, r1) with lengths 4, 2, 1, 5:
    "sums" with average_logps divides policy and reference by the lengths; "means" (ORPO) always does;
    "sums_lengths" (SimPO) passes the raw sums and the lengths."""
    policy = torch.tensor([-4.0, -3.0, -2.0, -10.0], dtype=F64)
    ref = torch.tensor([-2.0, -4.0, -1.0, -5.0], dtype=F64)
    lengths = torch.tensor([4, 2, 1, 5])
    x = PreferenceInputs(
        policy, lengths, torch.zeros(4, 3, dtype=F64), torch.ones(4, 3, dtype=torch.bool), ref
    )
    summed = run_preference_loss(PREFERENCE_LOSS_TABLE["dpo"], x, {"beta": 0.5, "label_smoothing": 0.0})
    torch.testing.assert_close(summed.loss, dpo(policy[:2], policy[2:], ref[:2], ref[2:], beta=0.5).loss)
    mean_p = torch.tensor([-1.0, -1.5, -2.0, -2.0], dtype=F64)  # policy / lengths
    mean_r = torch.tensor([-0.5, -2.0, -1.0, -1.0], dtype=F64)  # ref / lengths
    averaged = run_preference_loss(PREFERENCE_LOSS_TABLE["ipo"], x, {"beta": 0.5, "average_logps": True})
    torch.testing.assert_close(
        averaged.loss, ipo(mean_p[:2], mean_p[2:], mean_r[:2], mean_r[2:], beta=0.5).loss
    )
    odds = run_preference_loss(PREFERENCE_LOSS_TABLE["orpo"], x, {"orpo_lambda": 0.2})
    torch.testing.assert_close(odds.loss, orpo(mean_p[:2], mean_p[2:], beta=0.2).loss)
    simple = run_preference_loss(
        PREFERENCE_LOSS_TABLE["simpo"], x, {"simpo_beta": 2.0, "simpo_gamma": 0.3, "label_smoothing": 0.0}
    )
    expected = simpo(policy[:2], policy[2:], lengths[:2], lengths[2:], beta=2.0, gamma=0.3).loss
    torch.testing.assert_close(simple.loss, expected)
