"""KL estimators x placement: the EXACT expected gradient of k1 / k2 / k3 in the reward and in the loss.

A categorical policy pi = softmax(theta) over a few actions and a fixed reference ref. With no sampling at
all, every expectation is a sum over actions weighted by pi (held constant: it is the sampling weight):

    true:      grad_theta KL(pi || ref)                    (autograd through the exact KL)
    "reward":  sum_y pi(y) k(y).detach() grad log pi(y)    (what a policy gradient with reward -beta k
                                                             follows, up to the sign and beta)
    "loss":    sum_y pi(y) grad k(y)                       (autograd on a sampled token, y held fixed)

With d = log pi - log ref and the logits as parameters (grad_theta log pi(y) = e_y - pi), a score-function
gradient is sum_y pi(y) f(y) (e_y - pi) = pi * (f - E_pi f), which gives the closed forms checked below:

    true      = pi * (d - KL)
    k1 reward = pi * (d - E d)               = true
    k1 loss   = sum_y pi(y) (e_y - pi)       = 0
    k2 reward = pi * (d^2/2 - E[d^2/2])      (neither KL direction; second order in d)
    k2 loss   = pi * d * (e_y - pi) summed   = true
    k3 reward = pi * (e^-d - 1 + d - KL)     = true + (ref - pi) = grad KL(pi || ref) - grad KL(ref || pi)
    k3 loss   = sum_y (pi - ref)(y) (e_y - pi) = pi - ref = grad KL(ref || pi)

(Schulman 2020, "Approximating KL Divergence"; Tang & Munos 2025, arXiv 2506.09477; Shah et al. 2025,
arXiv 2512.21852.)
"""

from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

from rlhflab.losses.kl import KL_ESTIMATORS, KL_GRADIENT_UNBIASED

F64 = torch.float64
LOGITS = [0.5, -1.0, 0.3, 1.2, -0.4]
REF_LOGITS = [0.0, 0.2, -0.5, 0.8, 0.1]


def _policy(logits):
    theta = torch.tensor(logits, dtype=F64, requires_grad=True)
    return theta, theta.log_softmax(-1)


def _ref(logits=REF_LOGITS):
    return torch.tensor(logits, dtype=F64).log_softmax(-1)


def true_gradient(logits, ref_logps):
    """grad_theta KL(pi || ref) by autograd through the exact sum."""
    theta, logp = _policy(logits)
    kl = (logp.exp() * (logp - ref_logps)).sum()
    return torch.autograd.grad(kl, theta)[0]


def reverse_direction_gradient(logits, ref_logps):
    """grad_theta KL(ref || pi) by autograd."""
    theta, logp = _policy(logits)
    kl = (ref_logps.exp() * (ref_logps - logp)).sum()
    return torch.autograd.grad(kl, theta)[0]


def expected_gradient(estimator, placement, logits, ref_logps):
    """The exact E_pi of the gradient an estimator gives in a placement (pi itself held as the weight)."""
    theta, logp = _policy(logits)
    weight = logp.exp().detach()
    k = KL_ESTIMATORS[estimator](logp, ref_logps)
    if placement == "reward":
        surrogate = (weight * k.detach() * logp).sum()  # score function: k is a constant reward
    else:
        surrogate = (weight * k).sum()  # pathwise: differentiate k on each fixed token
    return torch.autograd.grad(surrogate, theta)[0]


def _closed_forms(logits, ref_logps):
    logp = torch.tensor(logits, dtype=F64).log_softmax(-1)
    pi, ref = logp.exp(), ref_logps.exp()
    d = logp - ref_logps
    kl = (pi * d).sum()
    true = pi * (d - kl)
    half_sq = d * d / 2
    return {
        ("k1", "reward"): true,
        ("k1", "loss"): torch.zeros_like(pi),
        ("k2", "reward"): pi * (half_sq - (pi * half_sq).sum()),
        ("k2", "loss"): true,
        ("k3", "reward"): true + ref - pi,
        ("k3", "loss"): pi - ref,
    }


def test_two_actions_by_hand():
    """pi = [0.7, 0.3], ref = [0.4, 0.6]: d = [ln 1.75, ln 0.5] = [0.559616, -0.693147],
    KL = 0.7 * 0.559616 + 0.3 * -0.693147 = 0.391731 - 0.207944 = 0.183787.
    true = pi * (d - KL) = [0.7 * 0.375829, 0.3 * -0.876934] = [0.263080, -0.263080].
    k1 reward = true; k2 loss = true; k1 loss = [0, 0].
    k2 reward: d^2/2 = [0.156585, 0.240227], E = 0.7 * 0.156585 + 0.3 * 0.240227 = 0.181677;
        pi * (d^2/2 - E) = [0.7 * -0.025092, 0.3 * 0.058550] = [-0.017565, 0.017565].
    k3 loss = pi - ref = [0.3, -0.3]; k3 reward = true + ref - pi = [-0.036920, 0.036920].
    """
    logits, ref = [math.log(0.7), math.log(0.3)], torch.tensor([0.4, 0.6], dtype=F64).log()
    hand = {
        ("k1", "reward"): [0.263080, -0.263080],
        ("k1", "loss"): [0.0, 0.0],
        ("k2", "reward"): [-0.017565, 0.017565],
        ("k2", "loss"): [0.263080, -0.263080],
        ("k3", "reward"): [-0.036920, 0.036920],
        ("k3", "loss"): [0.3, -0.3],
    }
    assert_close(
        true_gradient(logits, ref), torch.tensor([0.263080, -0.263080], dtype=F64), atol=1e-6, rtol=0
    )
    for (est, place), expected in hand.items():
        got = expected_gradient(est, place, logits, ref)
        assert_close(got, torch.tensor(expected, dtype=F64), atol=1e-6, rtol=0, msg=f"{est} in {place}")


@pytest.mark.parametrize("key", list(KL_GRADIENT_UNBIASED), ids=lambda k: f"{k[0]}-in-{k[1]}")
def test_expected_gradient_is_the_closed_form(key):
    """Autograd on the exact expectation equals the closed form of the module docstring, per pair."""
    ref = _ref()
    assert_close(expected_gradient(*key, LOGITS, ref), _closed_forms(LOGITS, ref)[key])


@pytest.mark.parametrize("key", list(KL_GRADIENT_UNBIASED), ids=lambda k: f"{k[0]}-in-{k[1]}")
def test_the_table_says_which_pairs_are_unbiased(key):
    """KL_GRADIENT_UNBIASED[key] is True exactly when the expected gradient is grad KL(pi || ref)."""
    ref = _ref()
    got, true = expected_gradient(*key, LOGITS, ref), true_gradient(LOGITS, ref)
    assert true.abs().max() > 0.05  # pi is far enough from ref for a wrong pair to show
    assert torch.allclose(got, true, atol=1e-10, rtol=0) == KL_GRADIENT_UNBIASED[key]


def test_the_table_is_the_published_one():
    """k1 in the reward and k2 in the loss are the two unbiased pairs (Shah et al. 2025)."""
    assert {k for k, ok in KL_GRADIENT_UNBIASED.items() if ok} == {("k1", "reward"), ("k2", "loss")}
    assert set(KL_GRADIENT_UNBIASED) == {(e, p) for e in KL_ESTIMATORS for p in ("reward", "loss")}


def test_k1_in_the_loss_has_zero_expected_gradient():
    """E_pi[grad log pi] = sum_y grad pi(y) = grad 1 = 0: the penalty pulls nowhere on average."""
    got = expected_gradient("k1", "loss", LOGITS, _ref())
    assert got.abs().max() < 1e-15


def test_k3_in_the_loss_is_the_gradient_of_the_other_direction():
    """GRPO's k3-in-the-loss follows grad KL(ref || pi), not grad KL(pi || ref)."""
    ref = _ref()
    got = expected_gradient("k3", "loss", LOGITS, ref)
    assert_close(got, reverse_direction_gradient(LOGITS, ref))
    assert not torch.allclose(got, true_gradient(LOGITS, ref), atol=1e-3)


def test_k3_in_the_reward_is_the_difference_of_both_directions():
    """k3 in the reward: grad KL(pi || ref) - grad KL(ref || pi)."""
    ref = _ref()
    got = expected_gradient("k3", "reward", LOGITS, ref)
    assert_close(got, true_gradient(LOGITS, ref) - reverse_direction_gradient(LOGITS, ref))


def test_k2_in_the_reward_vanishes_to_first_order():
    """Near pi = ref, k2's reward gradient shrinks like d^2 while the true gradient shrinks like d: halving
    the distance (logits theta_ref + s (theta - theta_ref)) halves the true gradient but quarters k2's."""
    ref = _ref()
    base = torch.tensor(REF_LOGITS, dtype=F64)
    direction = torch.tensor(LOGITS, dtype=F64) - base

    def norms(s):
        logits = (base + s * direction).tolist()
        return (
            expected_gradient("k2", "reward", logits, ref).norm().item(),
            true_gradient(logits, ref).norm().item(),
        )

    (k2_a, true_a), (k2_b, true_b) = norms(1e-3), norms(5e-4)
    assert true_b / true_a == pytest.approx(0.5, rel=1e-2)
    assert k2_b / k2_a == pytest.approx(0.25, rel=1e-2)


def test_estimator_values_k1_k3_unbiased_k2_not():
    """E_pi[k1] = E_pi[k3] = KL(pi || ref) exactly; E_pi[k2] differs (it is only second-order close)."""
    ref = _ref()
    logp = torch.tensor(LOGITS, dtype=F64).log_softmax(-1)
    pi = logp.exp()
    kl = (pi * (logp - ref)).sum()
    means = {name: (pi * fn(logp, ref)).sum() for name, fn in KL_ESTIMATORS.items()}
    assert_close(means["k1"], kl)
    assert_close(means["k3"], kl)
    assert abs(means["k2"] - kl) > 1e-3
