"""Quark's loss and its reward quantization (`rlhflab.losses.quark`): hand-worked numbers, invariants, gradients."""

from __future__ import annotations

import math

import pytest
import torch

from rlhflab.errors import ConfigError
from rlhflab.losses.logprobs import gather_logprobs
from rlhflab.losses.quark import quark_loss, reward_quantiles
from rlhflab.losses.sft import sft_nll

F64 = torch.float64
LN = math.log
NAN = float("nan")

# Two responses over a vocabulary of 2 words plus 1 control token (V = 3; the reference has V_ref = 2).
# Row 0, two tokens:
#   t0: policy logits [0, 0, ln 2] -> p = [1/4, 1/4, 1/2]; label 0: nll = ln 4 = 1.386294
#       entropy = -(2 * 1/4 ln 1/4 + 1/2 ln 1/2) = 1.5 ln 2 = 1.039721
#       p~ (renormalized on the 2 words) = [1/2, 1/2]; reference logits [ln 3, 0] -> [3/4, 1/4]
#       KL(p~ || ref) = 1/2 ln(2/3) + 1/2 ln 2 = 1/2 ln(4/3) = 0.143841
#   t1: policy logits [ln 3, 0, 0] -> p = [3/5, 1/5, 1/5]; label 1: nll = ln 5 = 1.609438
#       entropy = -(3/5 ln 3/5 + 2/5 ln 1/5) = 0.950271
#       p~ = [3/4, 1/4]; reference [0, 0] -> [1/2, 1/2]; KL = 3/4 ln(3/2) + 1/4 ln(1/2) = 0.130812
# Row 1, one token and one padding position (NaN logits):
#   t0: policy logits [0, 0, 0]; label 2 (the control token; any id counts): nll = ln 3, entropy = ln 3,
#       p~ = [1/2, 1/2] = reference: KL = 0
POLICY = torch.tensor([[[0.0, 0.0, LN(2)], [LN(3), 0.0, 0.0]], [[0.0, 0.0, 0.0], [NAN, NAN, NAN]]], dtype=F64)
REF = torch.tensor([[[LN(3), 0.0], [0.0, 0.0]], [[0.0, 0.0], [NAN, NAN]]], dtype=F64)
LABELS = torch.tensor([[0, 1], [2, 0]])
MASK = torch.tensor([[True, True], [True, False]])


def test_quark_loss_by_hand():
    """beta = 0.5, alpha = 0.1, l_t = nll + beta KL - alpha H:
    row 0: t0 1.386294 + 0.5 * 0.143841 - 0.1 * 1.039721 = 1.354243
           t1 1.609438 + 0.5 * 0.130812 - 0.1 * 0.950271 = 1.579817   sum 2.934060
    row 1: t0 ln 3 - 0.1 ln 3 = 0.9 ln 3 = 0.988751
    sequence_sum: [2.934060, 0.988751]; token_mean (3 real tokens, B = 2): sums * 2 / 3 = [1.956040, 0.659167],
    whose mean is the mean over the 3 tokens, 3.922811 / 3 = 1.307604."""
    kw = {"beta": 0.5, "alpha": 0.1}
    seq = quark_loss(POLICY, LABELS, MASK, REF, reduction="sequence_sum", **kw)
    torch.testing.assert_close(seq.loss, torch.tensor([2.934060, 0.988751], dtype=F64), atol=1e-6, rtol=0)
    tok = quark_loss(POLICY, LABELS, MASK, REF, **kw)  # token_mean is the default, as in Quark's code
    torch.testing.assert_close(tok.loss, torch.tensor([1.956040, 0.659167], dtype=F64), atol=1e-6, rtol=0)
    assert tok.loss.mean().item() == pytest.approx(1.307604, abs=1e-6)
    m = tok.metrics  # per-sequence token means
    torch.testing.assert_close(m["loss/nll"], torch.tensor([(LN(4) + LN(5)) / 2, LN(3)], dtype=F64))
    torch.testing.assert_close(
        m["kl/ref"], torch.tensor([(0.5 * LN(4 / 3) + 0.130812) / 2, 0.0], dtype=F64), atol=1e-6, rtol=0
    )
    torch.testing.assert_close(
        m["loss/entropy"], torch.tensor([(1.039721 + 0.950271) / 2, LN(3)], dtype=F64), atol=1e-6, rtol=0
    )
    torch.testing.assert_close(
        m["loss/quark"], torch.tensor([2.934060 / 2, 0.988751], dtype=F64), atol=1e-6, rtol=0
    )
    assert all(not v.requires_grad for v in m.values())


@pytest.mark.parametrize("reduction", ["token_mean", "sequence_mean", "sequence_sum"])
def test_without_kl_and_entropy_it_is_masked_nll(reduction):
    """beta = 0, alpha = 0 (AlpacaFarm's reward conditioning): exactly `sft_nll` of the label log-probs, with or
    without reference logits."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 5, 7, generator=g, dtype=F64)
    labels = torch.randint(0, 7, (3, 5), generator=g)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]], dtype=torch.bool)
    expected = sft_nll(gather_logprobs(logits, labels), mask, reduction).loss
    torch.testing.assert_close(quark_loss(logits, labels, mask, reduction=reduction).loss, expected)
    ref = torch.randn(3, 5, 6, generator=g, dtype=F64)
    torch.testing.assert_close(quark_loss(logits, labels, mask, ref, reduction=reduction).loss, expected)


def test_kl_is_zero_when_the_policy_is_the_reference_whatever_its_control_tokens():
    """The KL compares the policy renormalized on the reference's vocabulary: equal logits there give KL 0,
    whatever mass the policy puts on its control tokens (columns V_ref..V-1); and KL > 0 otherwise."""
    g = torch.Generator().manual_seed(1)
    ref = torch.randn(2, 4, 6, generator=g, dtype=F64)
    mask = torch.ones(2, 4, dtype=torch.bool)
    labels = torch.randint(0, 6, (2, 4), generator=g)
    for extra in (torch.zeros(2, 4, 3, dtype=F64), 5.0 + torch.randn(2, 4, 3, generator=g, dtype=F64)):
        policy = torch.cat([ref + 2.5, extra], dim=-1)  # a constant shift changes no softmax
        out = quark_loss(policy, labels, mask, ref, beta=1.0)
        torch.testing.assert_close(out.metrics["kl/ref"], torch.zeros(2, dtype=F64), atol=1e-12, rtol=0)
        plain = quark_loss(policy, labels, mask)
        torch.testing.assert_close(out.loss, plain.loss)  # beta times a zero KL adds nothing
    moved = quark_loss(torch.randn(2, 4, 9, generator=g, dtype=F64), labels, mask, ref, beta=1.0)
    assert (moved.metrics["kl/ref"] > 0).all()


def test_padding_changes_nothing_and_gets_no_gradient():
    finite = POLICY.nan_to_num(0.0)
    junk = POLICY.nan_to_num(1e6).requires_grad_()
    a = quark_loss(finite, LABELS, MASK, REF.nan_to_num(0.0), beta=0.5, alpha=0.1)
    b = quark_loss(junk, LABELS, MASK, REF.nan_to_num(-1e6), beta=0.5, alpha=0.1)
    torch.testing.assert_close(a.loss, b.loss)
    b.loss.sum().backward()
    assert torch.equal(junk.grad[1, 1], torch.zeros(3, dtype=F64))
    assert torch.isfinite(junk.grad).all() and junk.grad[0].abs().sum() > 0


def test_gradcheck_float64():
    g = torch.Generator().manual_seed(2)
    policy = torch.randn(2, 3, 5, generator=g, dtype=F64, requires_grad=True)
    ref = torch.randn(2, 3, 4, generator=g, dtype=F64)
    labels = torch.randint(0, 5, (2, 3), generator=g)
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]], dtype=torch.bool)
    for reduction in ("token_mean", "sequence_mean"):
        assert torch.autograd.gradcheck(
            lambda p, r=reduction: quark_loss(p, labels, mask, ref, beta=0.3, alpha=0.2, reduction=r).loss,
            (policy,),
        )


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="beta > 0 needs ref_logits"):
        quark_loss(POLICY, LABELS, MASK, beta=0.1)
    with pytest.raises(ConfigError, match="must be >= 0"):
        quark_loss(POLICY, LABELS, MASK, REF, alpha=-0.1)
    with pytest.raises(ValueError, match="V_ref <= V"):
        quark_loss(REF, LABELS, MASK, POLICY, beta=0.1)
    with pytest.raises(ValueError, match="disagree"):
        quark_loss(POLICY[:, :1], LABELS, MASK)


# ---- reward quantiles -------------------------------------------------------------------------------------------


def test_reward_quantiles_by_hand():
    """q_i = floor(K m_i / N), m_i the middle 0-based rank of r_i's tie group = (below_i + c_i - 1) / 2 with
    below_i = #{r_j < r_i}, c_i = #{r_j <= r_i}; the maximum reward always in quantile K - 1."""
    # K = 2 (the good / bad split), N = 5: rewards [3, 1, 2, 2, 5]: below = [3, 0, 1, 1, 4], c = [4, 1, 3, 3, 5],
    # m = [3, 0, 1.5, 1.5, 4] -> floor(2 m / 5) = [1, 0, 0, 0, 1]: good = {3, 5}; the tied median 2 is bad.
    assert reward_quantiles(torch.tensor([3.0, 1.0, 2.0, 2.0, 5.0]), 2).tolist() == [1, 0, 0, 0, 1]
    # K = 2, N = 4: [1, 2, 2, 3]: m = [0, 1.5, 1.5, 3] -> floor(2 m / 4) = [0, 0, 0, 1]: the two ties at the median
    # share a token, the bad one (their middle rank 1.5 is in the lower half).
    assert reward_quantiles(torch.tensor([1.0, 2.0, 2.0, 3.0]), 2).tolist() == [0, 0, 0, 1]
    # K = 2, N = 4, no ties: [4, 1, 3, 2]: m = rank = [3, 0, 2, 1] -> [1, 0, 1, 0]: the upper half is good.
    assert reward_quantiles(torch.tensor([4.0, 1.0, 3.0, 2.0]), 2).tolist() == [1, 0, 1, 0]
    # K = 3, N = 7, no ties: rank r -> floor(3 r / 7) = 0 0 0 1 1 2 2 (sizes 3, 2, 2), so 0.1 0.2 0.3 -> 0,
    # 0.4 0.5 -> 1, 0.6 0.7 -> 2.
    r = torch.tensor([0.7, 0.1, 0.3, 0.6, 0.2, 0.5, 0.4])
    assert reward_quantiles(r, 3).tolist() == [2, 0, 0, 2, 0, 1, 1]
    # K = 3, N = 6, a tie across the boundary of quantiles 0 and 1: [1, 1, 1, 2, 3, 4]: the three 1s have m = 1
    # -> floor(3 / 6) = 0, all three in quantile 0; 2 (m = 3) -> floor(9 / 6) = 1; 3 (m = 4) -> 2; 4 is the max -> 2.
    assert reward_quantiles(torch.tensor([1.0, 1.0, 1.0, 2.0, 3.0, 4.0]), 3).tolist() == [0, 0, 0, 1, 2, 2]
    # K = 5, N = 10, mostly zeros (a count reward): the seven 0s have m = 3 -> floor(15 / 10) = 1; the two 1s have
    # m = 7.5 -> floor(37.5 / 10) = 3; the 2 is the max -> 4. Quantiles 0 and 2 stay empty; the best token holds
    # only the best sample, never a 0.
    zeros = torch.tensor([0.0, 1.0, 0.0, 0.0, 2.0, 0.0, 0.0, 1.0, 0.0, 0.0])
    assert reward_quantiles(zeros, 5).tolist() == [1, 3, 1, 1, 4, 1, 1, 3, 1, 1]
    # K = 5, N = 10, mostly the maximum: the eight 1s have m = 5.5 -> floor(27.5 / 10) = 2, but they are the best
    # reward, so quantile 4 (else the token sampled with would be trained on nothing); the 0s (m = 0.5) -> 0.
    tops = torch.tensor([1.0, 1.0, 0.0, 1.0, 1.0, 1.0, 0.0, 1.0, 1.0, 1.0])
    assert reward_quantiles(tops, 5).tolist() == [4, 4, 0, 4, 4, 4, 0, 4, 4, 4]
    # Every reward equal: nothing to tell apart, all are the best.
    assert reward_quantiles(torch.zeros(4), 3).tolist() == [2, 2, 2, 2]
    assert reward_quantiles(torch.zeros(0), 3).tolist() == []


def test_reward_quantiles_invariants():
    g = torch.Generator().manual_seed(3)
    for n, k in ((10, 5), (11, 4), (100, 7), (5, 5)):
        rewards = torch.randn(n, generator=g, dtype=F64)  # no ties
        q = reward_quantiles(rewards, k)
        sizes = torch.bincount(q, minlength=k)
        assert len(sizes) == k and sizes.max() - sizes.min() <= 1  # K equal runs, up to one sample
        order = rewards.argsort()
        assert (q[order].diff() >= 0).all()  # a higher reward never gets a lower quantile
        assert q[rewards.argmax()] == k - 1 and q[rewards.argmin()] == 0
        # Quark's definition by position: sorted ascending, the r-th sample is in quantile floor(K r / N).
        assert q[order].tolist() == [r * k // n for r in range(n)]
    with pytest.raises(ValueError, match="NaN"):
        reward_quantiles(torch.tensor([1.0, NAN]), 2)
    with pytest.raises(ConfigError):
        reward_quantiles(torch.tensor([1.0]), 0)
