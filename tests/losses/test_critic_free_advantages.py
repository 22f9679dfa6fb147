"""Critic-free advantages: ReMax, DAPO's dynamic-sampling filter, NaN-safe groups, zero-variance groups.

The invariant that matters for training: a group whose samples all score the same (or that holds a NaN)
gets advantage exactly 0 and contributes exactly 0 gradient, whatever the loss and its reduction.
"""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from rlhflab.errors import ConfigError
from rlhflab.losses.advantages import (
    dynamic_sampling_mask,
    finite_groups,
    group_normalized_advantages,
    reinforce_advantages,
    remax_advantages,
    rloo_advantages,
)
from rlhflab.losses.ppo import ppo_policy_loss, reinforce_loss

F64 = torch.float64
NAN, INF = float("nan"), float("inf")


def t(x, dtype=F64):
    return torch.tensor(x, dtype=dtype)


# ---- ReMax ----------------------------------------------------------------------------------------------


def test_remax_by_hand():
    """One sample per prompt: [1.0, 0.2] - greedy [0.5, 0.7] = [0.5, -0.5].
    K = 2, flat prompt-major [1, 3 | 0, 2] with greedy [2, 1]: [1 - 2, 3 - 2 | 0 - 1, 2 - 1] = [-1, 1, -1, 1].
    """
    assert_close(remax_advantages(t([1.0, 0.2]), t([0.5, 0.7])), t([0.5, -0.5]))
    assert_close(remax_advantages(t([1.0, 3.0, 0.0, 2.0]), t([2.0, 1.0]), k=2), t([-1.0, 1.0, -1.0, 1.0]))
    assert_close(remax_advantages(t([[1.0, 3.0], [0.0, 2.0]]), t([2.0, 1.0])), t([[-1.0, 1.0], [-1.0, 1.0]]))


def test_remax_sample_equal_to_greedy_gets_zero_and_nan_prompts_are_dropped():
    """A sample scoring what the greedy response scores gets exactly 0. Prompt 1's greedy score is NaN and
    prompt 2 has an inf sample: both prompts get 0 everywhere; prompt 0 is untouched: [0.3 - 0.3, 0.9 - 0.3]."""
    scores = t([0.3, 0.9, 1.0, 2.0, INF, 0.0])
    out = remax_advantages(scores, t([0.3, NAN, 1.0]), k=2)
    assert_close(out, t([0.0, 0.6, 0.0, 0.0, 0.0, 0.0]))
    with pytest.raises(ValueError, match="greedy_scores"):
        remax_advantages(scores, t([0.3, 0.1]), k=2)


# ---- Group masks ---------------------------------------------------------------------------------------

# Four groups of k = 3: varied | all equal | all equal (0) | holds a NaN.
GROUPS = [1.0, 0.0, 1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.5, NAN, 1.0]


def test_finite_groups_by_hand():
    """Only the last group holds a non-finite score."""
    keep = finite_groups(t(GROUPS), k=3)
    assert keep.tolist() == [True] * 9 + [False] * 3
    assert finite_groups(t([[1.0, INF], [2.0, 3.0]])).tolist() == [[False, False], [True, True]]


def test_dynamic_sampling_mask_by_hand():
    """DAPO keeps a group iff its scores are not all equal: group 0 [1, 0, 1] is kept; [1, 1, 1] (all
    correct) and [0, 0, 0] (all wrong) are not; [0.5, NaN, 1] is not (not finite). The mask is per sample,
    [P*K] for flat scores, [P, K] for grouped ones."""
    keep = dynamic_sampling_mask(t(GROUPS), k=3)
    assert keep.shape == (12,) and keep.dtype == torch.bool
    assert keep.tolist() == [True] * 3 + [False] * 9
    assert dynamic_sampling_mask(t(GROUPS).view(4, 3)).tolist() == [[True] * 3] + [[False] * 3] * 3
    with pytest.raises(ConfigError, match="groups of k=5"):
        dynamic_sampling_mask(t(GROUPS), k=5)


# ---- NaN safety ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "fn",
    [
        rloo_advantages,
        group_normalized_advantages,
        lambda s, k: group_normalized_advantages(s, k, scale_by_std=False),
    ],
    ids=["rloo", "grpo", "dr_grpo"],
)
def test_a_nan_group_does_not_poison_the_batch(fn):
    """Group 0 = [1, 2, 6]; group 1 holds a NaN, group 2 an inf: they get 0, and group 0 gets exactly what
    it gets alone. RLOO by hand: [1 - 4, 2 - 3.5, 6 - 1.5] = [-3, -1.5, 4.5]."""
    scores = t([1.0, 2.0, 6.0, 5.0, NAN, 4.0, -INF, 0.0, 1.0])
    out = fn(scores, 3)
    assert torch.isfinite(out).all()
    assert_close(out[:3], fn(t([1.0, 2.0, 6.0]), 3))
    assert out[3:].eq(0).all()
    assert_close(rloo_advantages(scores, 3)[:3], t([-3.0, -1.5, 4.5]))


def test_reinforce_baseline_skips_non_finite_scores():
    """[1, NaN, 3, inf]: the batch-mean baseline is over the finite scores, (1 + 3) / 2 = 2 -> [-1, 0, 1, 0]."""
    assert_close(reinforce_advantages(t([1.0, NAN, 3.0, INF])), t([-1.0, 0.0, 1.0, 0.0]))
    assert_close(reinforce_advantages(t([NAN, NAN])), t([0.0, 0.0]))


# ---- Zero-variance groups: zero advantage, zero gradient -------------------------------------------------

EQUAL = 0.12974936746685017  # an arbitrary score shared by a whole group


def test_all_equal_scores_get_exactly_zero_even_when_the_mean_rounds():
    """400 float32 groups of equal scores each, k = 3, 5 and 7: the group mean misses the score by a
    rounding error in many of them, yet every advantage is exactly 0."""
    values = torch.linspace(-10, 10, 400, dtype=torch.float32)
    for k in (3, 5, 7):
        grouped = values[:, None].expand(-1, k).contiguous()
        assert (grouped.mean(-1) != values).any()  # the rounding this test is about
        for fn in (rloo_advantages, group_normalized_advantages):
            assert fn(grouped).eq(0).all(), (fn.__name__, k)
        assert group_normalized_advantages(grouped, scale_by_std=False).eq(0).all()


LOSSES = {
    "ppo": lambda logps, old, adv, mask, **kw: ppo_policy_loss(logps, old, adv, mask, clip_eps=0.2, **kw),
    "reinforce": lambda logps, old, adv, mask, **kw: reinforce_loss(logps, adv, mask, **kw),
}
REDUCTIONS = [
    {"reduction": "sequence_mean"},
    {"reduction": "sequence_sum"},
    {"reduction": "token_mean"},
    {"reduction": "constant", "max_tokens": 4},
]


@pytest.mark.parametrize("reduce", REDUCTIONS, ids=lambda r: r["reduction"])
@pytest.mark.parametrize("loss", list(LOSSES))
@pytest.mark.parametrize("scale_by_std", [True, False], ids=["std", "no_std"])
def test_zero_variance_and_nan_groups_contribute_exactly_zero_gradient(scale_by_std, loss, reduce):
    """Three groups of k = 3 (float32): a varied group, an all-equal group, a group holding a NaN.
    Rows of the last two get advantage 0 and an exactly-zero gradient (the old log-probs differ from the
    new ones, so PPO's ratio is not 1 and some tokens are clipped); the varied group's rows do move."""
    scores = torch.tensor([0.0, 1.0, 0.5] + [EQUAL] * 3 + [1.0, NAN, 0.0], dtype=torch.float32)
    adv = group_normalized_advantages(scores, k=3, scale_by_std=scale_by_std)
    assert adv[3:].eq(0).all() and adv[:3].ne(0).any()

    g = torch.Generator().manual_seed(0)
    logps = (-torch.rand(9, 4, generator=g)).requires_grad_()
    old = logps.detach() + 0.5 * torch.randn(9, 4, generator=g)
    lengths = torch.tensor([4, 2, 3, 1, 4, 2, 3, 4, 1])
    mask = torch.arange(4)[None, :] < lengths[:, None]
    out = LOSSES[loss](logps, old, adv, mask, **reduce)
    out.loss.mean().backward()
    assert torch.isfinite(out.loss).all()
    assert logps.grad[3:].eq(0).all()
    assert logps.grad[:3][mask[:3]].ne(0).any()
    assert out.loss[3:].eq(0).all()
