"""PPO surrogate (the six cases of the clipped objective), value loss, entropy bonus, REINFORCE."""

from __future__ import annotations

import math

import pytest
import torch

from rlhflab.errors import ConfigError
from rlhflab.losses.ppo import entropy_bonus, ppo_policy_loss, ppo_value_loss, reinforce_loss

F64 = torch.float64

# The six cases of Schulman et al. 2017, Eq. 7 (sign of A; ratio below, inside or above the clip range),
# eps = 0.2. Columns: ratio, A, token loss (= -objective), clipped?, d loss / d logp.
SIX_CASES = [
    # 1: ratio in [0.8, 1.2], A > 0 -> objective  1.1 * 1, not clipped, gradient -A ratio = -1.1
    (1.1, 1.0, -1.1, False, -1.1),
    # 2: ratio in [0.8, 1.2], A < 0 -> objective -1.1, not clipped, gradient +1.1
    (1.1, -1.0, 1.1, False, 1.1),
    # 3: ratio < 0.8, A > 0 -> min(0.5, 0.8) = 0.5, not clipped, gradient -0.5
    (0.5, 1.0, -0.5, False, -0.5),
    # 4: ratio < 0.8, A < 0 -> min(-0.5, -0.8) = -0.8 = (1 - eps) A, clipped, gradient 0
    (0.5, -1.0, 0.8, True, 0.0),
    # 5: ratio > 1.2, A > 0 -> min(1.5, 1.2) = 1.2 = (1 + eps) A, clipped, gradient 0
    (1.5, 1.0, -1.2, True, 0.0),
    # 6: ratio > 1.2, A < 0 -> min(-1.5, -1.2) = -1.5, not clipped, gradient +1.5
    (1.5, -1.0, 1.5, False, 1.5),
]


def test_six_case_table():
    """Each case is one single-token sequence; old log-prob 0 so ratio = exp(logp).

    The loss is -objective, so 'sign of objective' in the table is minus the sign here; the gradient of
    the loss w.r.t. the log-prob is -A * ratio where unclipped and exactly 0 in cases 4 and 5.
    """
    ratios = torch.tensor([c[0] for c in SIX_CASES], dtype=F64)
    logps = ratios.log()[:, None].clone().requires_grad_()
    adv = torch.tensor([c[1] for c in SIX_CASES], dtype=F64)
    mask = torch.ones(6, 1, dtype=torch.bool)
    out = ppo_policy_loss(logps, torch.zeros(6, 1, dtype=F64), adv, mask, clip_eps=0.2)
    out.loss.sum().backward()
    torch.testing.assert_close(out.loss, torch.tensor([c[2] for c in SIX_CASES], dtype=F64))
    assert out.metrics["loss/clipfrac"].tolist() == [float(c[3]) for c in SIX_CASES]
    torch.testing.assert_close(logps.grad[:, 0], torch.tensor([c[4] for c in SIX_CASES], dtype=F64))
    assert logps.grad[3, 0].item() == 0.0 and logps.grad[4, 0].item() == 0.0
    objective_sign = [1, -1, 1, -1, 1, -1]
    assert [int(math.copysign(1, -x)) for x in out.loss.tolist()] == objective_sign


def test_ppo_reduction_and_metrics_by_hand():
    """ratio 1 everywhere: token loss = -A. A = [[1, 3 | pad], [2, 2, 2]].
    sequence_mean: [-2, -2]; sequence_sum: [-4, -6]; token_mean: [-4, -6] * 2 / 5 = [-1.6, -2.4].
    approx KL with ratio 1 is 0; a per-sequence advantage [B] broadcasts to all tokens.
    """
    lp = torch.full((2, 3), -1.0, dtype=F64)
    adv = torch.tensor([[1.0, 3.0, 99.0], [2.0, 2.0, 2.0]], dtype=F64)
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]], dtype=torch.bool)
    out = ppo_policy_loss(lp, lp, adv, mask)
    torch.testing.assert_close(out.loss, torch.tensor([-2.0, -2.0], dtype=F64))
    torch.testing.assert_close(
        ppo_policy_loss(lp, lp, adv, mask, reduction="sequence_sum").loss,
        torch.tensor([-4.0, -6.0], dtype=F64),
    )
    torch.testing.assert_close(
        ppo_policy_loss(lp, lp, adv, mask, reduction="token_mean").loss, torch.tensor([-1.6, -2.4], dtype=F64)
    )
    assert out.metrics["kl/approx"].abs().max() == 0
    per_seq = ppo_policy_loss(lp, lp, torch.tensor([1.0, 2.0], dtype=F64), mask)
    torch.testing.assert_close(per_seq.loss, torch.tensor([-1.0, -2.0], dtype=F64))


def test_ppo_clip_higher_and_dual_clip_by_hand():
    """ratio 1.25, A = 1: eps 0.2 clips to 1.2 -> loss -1.2; eps_high 0.28 does not -> -1.25.
    ratio 5, A = -1: plain loss 5 (case 6, unclipped); dual clip c = 3 caps it at -c A = 3.
    approx KL(old || new) for ratio 5: (5 - 1) - ln 5 = 4 - 1.609438 = 2.390562.
    """
    one = torch.ones(1, 1, dtype=torch.bool)

    def run(ratio, a, **kw):
        return ppo_policy_loss(
            torch.tensor([[math.log(ratio)]], dtype=F64),
            torch.zeros(1, 1, dtype=F64),
            torch.tensor([a], dtype=F64),
            one,
            **kw,
        )

    assert run(1.25, 1.0).loss.item() == pytest.approx(-1.2)
    assert run(1.25, 1.0, clip_eps_high=0.28).loss.item() == pytest.approx(-1.25)
    assert run(5.0, -1.0).loss.item() == pytest.approx(5.0)
    assert run(5.0, -1.0, dual_clip=3.0).loss.item() == pytest.approx(3.0)
    assert run(5.0, -1.0).metrics["kl/approx"].item() == pytest.approx(4 - math.log(5))
    with pytest.raises(ConfigError):
        run(1.0, 1.0, dual_clip=0.5)


def test_value_loss_by_hand():
    """V = 1.0, V_old = 0.5, R = 2.0, c = 0.2: (1 - 2)^2 = 1; clip(1.0, 0.3, 0.7) = 0.7 -> (0.7 - 2)^2 = 1.69.
    loss = 0.5 * max(1, 1.69) = 0.845, clipfrac 1. Without clipping: 0.5 * 1 = 0.5.
    """
    v, old, ret = (torch.tensor([[x]], dtype=F64) for x in (1.0, 0.5, 2.0))
    one = torch.ones(1, 1, dtype=torch.bool)
    out = ppo_value_loss(v, old, ret, one, clip_eps_value=0.2)
    assert out.loss.item() == pytest.approx(0.845)
    assert out.metrics["loss/value_clipfrac"].item() == 1.0
    assert ppo_value_loss(v, old, ret, one, clip_eps_value=None).loss.item() == pytest.approx(0.5)


def test_entropy_bonus_and_reinforce_by_hand():
    """Entropy [1, 2 | pad] -> loss -(1 + 2) / 2 = -1.5.
    REINFORCE: log-probs [-1, -2], A = 2 -> -(2 * -1 + 2 * -2) = 6 (sequence sum).
    """
    mask = torch.tensor([[1, 1, 0]], dtype=torch.bool)
    ent = entropy_bonus(torch.tensor([[1.0, 2.0, 7.0]], dtype=F64), mask)
    assert ent.loss.item() == pytest.approx(-1.5)
    out = reinforce_loss(torch.tensor([[-1.0, -2.0, 5.0]], dtype=F64), torch.tensor([2.0], dtype=F64), mask)
    assert out.loss.item() == pytest.approx(6.0)


def test_sampler_mismatch_by_hand():
    from rlhflab.losses.ppo import sampler_mismatch

    trainer = torch.tensor([[-1.0, -2.0, -0.5]], dtype=F64)
    sampler = torch.tensor([[-1.1, -1.5, -9.0]], dtype=F64)  # the masked third token differs by 8.5: ignored
    mask = torch.tensor([[True, True, False]])
    m = sampler_mismatch(trainer, sampler, mask)
    # delta = trainer - sampler = [0.1, -0.5]: mean |delta| 0.3, max 0.5; k1 of KL(sampler || trainer) = mean(-delta)
    assert float(m["kl/sampler_mismatch_mean"]) == pytest.approx(0.3)
    assert float(m["kl/sampler_mismatch_max"]) == pytest.approx(0.5)
    assert float(m["kl/sampler_trainer_k1"]) == pytest.approx(0.2)
    none = sampler_mismatch(trainer, sampler, torch.zeros_like(mask))
    assert all(float(v) == 0.0 for v in none.values())


def test_truncated_importance_weights_by_hand():
    from rlhflab.losses.ppo import truncated_importance_weights

    trainer = torch.tensor([[-1.0, -2.0, -1.0, 0.0]], dtype=F64, requires_grad=True)
    sampler = torch.tensor([[-1.1, -1.5, -1.5, 5.0]], dtype=F64)
    mask = torch.tensor([[True, True, True, False]])
    w = truncated_importance_weights(trainer, sampler, mask, cap=1.2)
    # exp(0.1) = 1.10517, exp(-0.5) = 0.60653, exp(0.5) = 1.6487 truncated to 1.2, masked -> 0
    torch.testing.assert_close(w, torch.tensor([[math.exp(0.1), math.exp(-0.5), 1.2, 0.0]], dtype=F64))
    assert not w.requires_grad
    # Equal log-probs (one engine, float32): every weight 1, the update unchanged.
    assert torch.equal(truncated_importance_weights(sampler, sampler, mask, cap=2.0), mask.to(F64))
    with pytest.raises(ConfigError, match="cap"):
        truncated_importance_weights(trainer, sampler, mask, cap=0.0)
