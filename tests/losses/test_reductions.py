"""Token-to-example reductions: GRPO's sequence mean, DAPO's token mean, Dr. GRPO's constant normalizer.

Every reduction returns [B] per-example losses whose `.mean()` is the batch loss. The hand-worked batch
below has unequal lengths, so each reduction weighs tokens differently and a mix-up shows.
"""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from rlhflab.errors import ConfigError
from rlhflab.losses.kl import kl_penalty_loss
from rlhflab.losses.ppo import entropy_bonus, ppo_policy_loss, ppo_value_loss, reinforce_loss
from rlhflab.losses.sft import sft_nll
from rlhflab.losses.utils import REDUCTIONS, reduce_token_losses

F64 = torch.float64

# Row 0: 2 real tokens [1, 2 | pad 9]; row 1: 3 real tokens [3, 4, 5]. B = 2, N = 5, total 15.
X = [[1.0, 2.0, 9.0], [3.0, 4.0, 5.0]]
MASK = torch.tensor([[1, 1, 0], [1, 1, 1]], dtype=torch.bool)


def t(x):
    return torch.tensor(x, dtype=F64)


def test_every_reduction_by_hand():
    """sequence_mean: [3/2, 12/3] = [1.5, 4],       mean 2.75 (GRPO: each sequence weighs 1/B);
    sequence_sum:  [3, 12],                      mean 7.5;
    token_mean:    [3, 12] x B/N = x 2/5 = [1.2, 4.8], mean 3.0 = 15 / 5 (DAPO: each token 1/N);
    constant (max_tokens 4): [3/4, 12/4] = [0.75, 3], mean 1.875 = 15 / (2 x 4) (Dr. GRPO).
    """
    expected = {
        "sequence_mean": ([1.5, 4.0], 2.75),
        "sequence_sum": ([3.0, 12.0], 7.5),
        "token_mean": ([1.2, 4.8], 3.0),
        "constant": ([0.75, 3.0], 1.875),
    }
    assert set(expected) == set(REDUCTIONS)
    for name, (per_example, batch) in expected.items():
        out = reduce_token_losses(t(X), MASK, name, max_tokens=4 if name == "constant" else None)
        assert_close(out, t(per_example), msg=name)
        assert out.mean().item() == pytest.approx(batch), name


def test_token_weights_by_hand():
    """d(x.mean()) / d l_it, the weight each real token gets in the batch loss:
    sequence_mean: 1/(B L_i) -> row 0 (L=2) 1/4, row 1 (L=3) 1/6: a token of a long sequence counts less;
    token_mean:    1/N = 1/5 for every token;
    constant:      1/(B max_tokens) = 1/8 for every token; padding always 0.
    """
    weights = {
        "sequence_mean": [[1 / 4, 1 / 4, 0.0], [1 / 6, 1 / 6, 1 / 6]],
        "token_mean": [[1 / 5, 1 / 5, 0.0], [1 / 5, 1 / 5, 1 / 5]],
        "constant": [[1 / 8, 1 / 8, 0.0], [1 / 8, 1 / 8, 1 / 8]],
    }
    for name, w in weights.items():
        x = t(X).requires_grad_()
        reduce_token_losses(x, MASK, name, max_tokens=4 if name == "constant" else None).mean().backward()
        assert_close(x.grad, t(w), msg=name)


def test_constant_with_the_mean_length_accumulates_to_the_token_mean():
    """The documented recipe for micro-batches: "constant" with max_tokens = N_batch / B_batch = 5/2 on each
    micro-batch (here one row each), outputs summed and divided by B_batch, equals "token_mean" on the batch."""
    whole = reduce_token_losses(t(X), MASK, "token_mean").mean()
    parts = [
        reduce_token_losses(t(X)[i : i + 1], MASK[i : i + 1], "constant", max_tokens=5 / 2) for i in (0, 1)
    ]
    assert_close(torch.cat(parts).sum() / 2, whole)
    # token_mean on each micro-batch alone does not: it weighs by each micro-batch's own N.
    naive = [reduce_token_losses(t(X)[i : i + 1], MASK[i : i + 1], "token_mean") for i in (0, 1)]
    assert not torch.isclose(torch.cat(naive).sum() / 2, whole)


def test_max_tokens_acts_or_is_refused():
    with pytest.raises(ConfigError, match="needs max_tokens"):
        reduce_token_losses(t(X), MASK, "constant")
    with pytest.raises(ConfigError, match="max_tokens must be > 0"):
        reduce_token_losses(t(X), MASK, "constant", max_tokens=0)
    with pytest.raises(ConfigError, match='only by reduction "constant"'):
        reduce_token_losses(t(X), MASK, "token_mean", max_tokens=4)


def test_every_token_loss_passes_max_tokens_through():
    """Each loss with `reduction` gives its per-token loss reduced by "constant": spot values by hand.
    reinforce, A = [1, -1]: token losses -A log pi = [[1, 2], [-3, -4, -5]] for log pi = -X -> sums [3, -12]
    / 4 = [0.75, -3]. sft: -log pi = X -> [0.75, 3]. entropy bonus: -H -> [-0.75, -3]."""
    logps = -t(X)
    kw = {"reduction": "constant", "max_tokens": 4}
    assert_close(reinforce_loss(logps, t([1.0, -1.0]), MASK, **kw).loss, t([0.75, -3.0]))
    assert_close(sft_nll(logps, MASK, **kw).loss, t([0.75, 3.0]))
    assert_close(entropy_bonus(t(X), MASK, **kw).loss, t([-0.75, -3.0]))
    # PPO at ratio 1 with A = [1, -1]: token losses -A = [[-1, -1], [1, 1, 1]] -> [-2/4, 3/4].
    assert_close(ppo_policy_loss(logps, logps, t([1.0, -1.0]), MASK, **kw).loss, t([-0.5, 0.75]))
    # Value loss, unclipped: 0.5 (V - R)^2 with V - R = 2 everywhere -> 2 per token -> [4/4, 6/4].
    values = t(X)
    out = ppo_value_loss(values, values, values - 2, MASK, clip_eps_value=None, **kw)
    assert_close(out.loss, t([1.0, 1.5]))
    # KL penalty, k1 with ref = policy - 1: 1 per token -> [2/4, 3/4].
    assert_close(kl_penalty_loss(logps, logps - 1, MASK, estimator="k1", **kw).loss, t([0.5, 0.75]))
