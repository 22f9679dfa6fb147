"""KL estimators, AlpacaFarm clamp, KL-shaped rewards and KL controllers."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rlhflab.errors import ConfigError
from rlhflab.losses.kl import (
    AdaptiveKLController,
    FixedKLController,
    alpacafarm_clamp,
    kl_k1,
    kl_k2,
    kl_k3,
    kl_penalty_loss,
    kl_shaped_rewards,
    last_token_index,
)

F64 = torch.float64


def t(x):
    return torch.tensor(x, dtype=F64)


def test_estimators_by_hand():
    """policy -1, ref -2: k1 = 1, k2 = 1/2, log r = -1 -> k3 = e^-1 - 1 + 1 = 0.367879.
    policy -2, ref -1: k1 = -1, k2 = 1/2, log r = 1 -> k3 = e - 1 - 1 = 0.718282.
    """
    p, r = t([-1.0, -2.0]), t([-2.0, -1.0])
    torch.testing.assert_close(kl_k1(p, r), t([1.0, -1.0]))
    torch.testing.assert_close(kl_k2(p, r), t([0.5, 0.5]))
    torch.testing.assert_close(kl_k3(p, r), t([math.exp(-1), math.e - 2]))
    torch.testing.assert_close(alpacafarm_clamp(kl_k1(p, r)), t([1.0, 0.0]))


@settings(max_examples=200, deadline=None)
@given(st.floats(-30, 30), st.floats(-30, 30))
def test_k3_is_never_negative(policy_logp, ref_logp):
    assert kl_k3(t([policy_logp]), t([ref_logp])).item() >= 0.0


def test_estimators_are_unbiased_on_a_known_pair():
    """pi = [0.7, 0.3], ref = [0.4, 0.6]: KL = 0.7 ln(7/4) + 0.3 ln(1/2) = 0.391731 - 0.207944 = 0.183787.
    E_pi[k1] and E_pi[k3] equal it exactly (weights pi); k2 is biased:
    0.7 * ln(7/4)^2 / 2 + 0.3 * ln(1/2)^2 / 2 = 0.7 * 0.156585 + 0.3 * 0.240227
    = 0.109610 + 0.072068 = 0.181677.
    """
    pi, ref = t([0.7, 0.3]), t([0.4, 0.6])
    lp, lr = pi.log(), ref.log()
    assert (pi * kl_k1(lp, lr)).sum().item() == pytest.approx(0.183787, abs=1e-6)
    assert (pi * kl_k3(lp, lr)).sum().item() == pytest.approx(0.183787, abs=1e-6)
    assert (pi * kl_k2(lp, lr)).sum().item() == pytest.approx(0.181677, abs=1e-6)


def test_kl_shaped_rewards_by_hand():
    """beta = 0.1, k1.
    row 0: kl = [-1+2, -2+2, -1+1.5] = [1, 0, 0.5] -> -0.1 kl = [-0.1, 0, -0.05]; score 1 at t=2 -> 0.95.
    row 1 (2 real tokens): kl = [0, -1+0.5] = [0, -0.5] -> [0, 0.05]; score 2 at t=1 -> [0, 2.05, 0].
    With AlpacaFarm's clamp the -0.5 becomes 0 -> row 1 = [0, 2.0, 0].
    """
    score = t([1.0, 2.0])
    pol = t([[-1.0, -2.0, -1.0], [-1.0, -1.0, 9.0]])
    ref = t([[-2.0, -2.0, -1.5], [-1.0, -0.5, -9.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]], dtype=torch.bool)
    out = kl_shaped_rewards(score, pol, ref, mask, beta=0.1)
    torch.testing.assert_close(out.rewards, t([[-0.1, 0.0, 0.95], [0.0, 2.05, 0.0]]))
    torch.testing.assert_close(out.metrics["kl/sequence"], t([1.5, -0.5]))
    torch.testing.assert_close(out.metrics["reward/total"], t([0.85, 2.05]))
    clamped = kl_shaped_rewards(score, pol, ref, mask, beta=0.1, clamp=True)
    torch.testing.assert_close(clamped.rewards[1], t([0.0, 2.0, 0.0]))
    k3 = kl_shaped_rewards(score, pol, ref, mask, beta=0.1, estimator="k3")
    # k3 = e^(ref - pol) - 1 - (ref - pol) per real token: row 0 log r = [-1, 0, -0.5], row 1 log r = [0, 0.5].
    k3_row0 = (math.exp(-1) - 1 + 1) + 0.0 + (math.exp(-0.5) - 1 + 0.5)
    torch.testing.assert_close(k3.metrics["kl/sequence"], t([k3_row0, math.exp(0.5) - 1 - 0.5]))
    with pytest.raises(ConfigError, match="unknown KL estimator"):
        kl_shaped_rewards(score, pol, ref, mask, beta=0.1, estimator="k4")


def test_last_token_index_and_empty_rows():
    """Right padding [1,1,0] -> 1; left padding [0,1,1] -> 2; empty row -> no score anywhere."""
    mask = torch.tensor([[1, 1, 0], [0, 1, 1], [0, 0, 0]], dtype=torch.bool)
    assert last_token_index(mask).tolist() == [1, 2, 2]
    zeros = torch.zeros(3, 3, dtype=F64)
    out = kl_shaped_rewards(t([5.0, 6.0, 7.0]), zeros, zeros, mask, beta=0.1)
    torch.testing.assert_close(out.rewards, t([[0, 5.0, 0], [0, 0, 6.0], [0, 0, 0]]))


def test_kl_penalty_loss_by_hand():
    """k3 tokens [0.367879, 0.718282 | pad] -> per-sequence mean 0.543081."""
    out = kl_penalty_loss(t([[-1.0, -2.0, 3.0]]), t([[-2.0, -1.0, 0.0]]), torch.tensor([[1, 1, 0]]))
    assert out.loss.item() == pytest.approx((math.exp(-1) + math.e - 2) / 2)


def test_adaptive_controller_by_hand():
    """init 0.2, target 6, horizon 10000, n_steps 256.
    KL 9: error 9/6 - 1 = 0.5 -> clipped 0.2 -> x (1 + 0.2 * 256 / 10000) = x 1.00512 -> 0.201024.
    KL 3: error -0.5 -> -0.2 -> x 0.99488 -> 0.201024 * 0.99488 = 0.199995.
    KL 6.6: error 0.1 -> x (1 + 0.1 * 1000 / 10000) = x 1.01 with n_steps 1000.
    """
    ctl = AdaptiveKLController(0.2, target=6.0, horizon=10000)
    assert ctl.update(9.0, 256) == pytest.approx(0.201024)
    assert ctl.update(torch.tensor(3.0), 256) == pytest.approx(0.201024 * 0.99488)
    before = ctl.value
    assert ctl.update(6.6, 1000) == pytest.approx(before * 1.01)
    clone = AdaptiveKLController(1.0, 1.0, 1.0)
    clone.load_state_dict(ctl.state_dict())
    assert clone.value == ctl.value and clone.target == 6.0
    with pytest.raises(ValueError, match="not finite"):
        ctl.update(float("nan"), 1)
    with pytest.raises(ConfigError):
        AdaptiveKLController(0.1, target=0.0, horizon=10)


def test_fixed_controller_never_moves():
    ctl = FixedKLController(0.05)
    assert ctl.update(100.0, 10_000) == 0.05 and ctl.value == 0.05
