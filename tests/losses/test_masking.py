"""Property: masked positions never change any result.

For every function that takes a mask, hypothesis draws shapes, masks and inputs; the masked-out positions
are then overwritten with garbage (NaN, +-inf, +-1e30 or huge random numbers). Every output (loss,
metrics, rewards, advantages) must be bit-identical to the run with ordinary random values there, and for
losses the gradient must be identical too, and exactly 0 at the masked positions.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rlhflab.losses import advantages as adv_mod
from rlhflab.losses import combine, kl, logprobs, ppo, preference, reward, sft, utils
from rlhflab.models.logprobs import chunked_gather_logprobs

F64 = torch.float64
GARBAGE = [float("nan"), float("inf"), float("-inf"), 1e30, -1e30, "random"]

# name -> (function of (inputs, m, m2), {input: which mask}, input to differentiate or None)
Case = tuple[Callable, dict[str, str], str | None]
CASES: dict[str, Case] = {
    "masked_sum": (lambda x, m, m2: utils.masked_sum(x["a"], m, dim=-1), {"a": "m"}, "a"),
    "masked_mean": (lambda x, m, m2: utils.masked_mean(x["a"], m), {"a": "m"}, "a"),
    "masked_var": (lambda x, m, m2: utils.masked_var(x["a"], m), {"a": "m"}, "a"),
    "masked_whiten": (lambda x, m, m2: utils.masked_whiten(x["a"], m, shift_mean=False), {"a": "m"}, "a"),
    "reduce_token_mean": (
        lambda x, m, m2: utils.reduce_token_losses(x["a"], m, "token_mean"),
        {"a": "m"},
        "a",
    ),
    "sequence_logps": (lambda x, m, m2: logprobs.sequence_logps(x["a"], m, average=True), {"a": "m"}, "a"),
    "sft_nll": (lambda x, m, m2: sft.sft_nll(x["a"], m), {"a": "m"}, "a"),
    "plackett_luce": (lambda x, m, m2: reward.plackett_luce(x["a"], m), {"a": "m"}, "a"),
    "pairwise_all_pairs": (lambda x, m, m2: reward.pairwise_all_pairs(x["a"], m), {"a": "m"}, "a"),
    "trex": (lambda x, m, m2: reward.trex(x["a"], m, x["b"], m2), {"a": "m", "b": "m2"}, "a"),
    "cpl": (
        lambda x, m, m2: preference.cpl(
            x["a"], m, x["b"], m2, gamma=0.9, ref_chosen_logps=x["c"], ref_rejected_logps=x["d"]
        ),
        {"a": "m", "b": "m2", "c": "m", "d": "m2"},
        "a",
    ),
    "sparrow_rerank": (lambda x, m, m2: combine.sparrow_rerank(x["a"], x["p"], m), {"a": "m", "p": "m"}, "a"),
    "kl_shaped_rewards": (
        lambda x, m, m2: kl.kl_shaped_rewards(x["s"], x["a"], x["b"], m, 0.1, "k3", clamp=True),
        {"a": "m", "b": "m"},
        "a",
    ),
    "kl_penalty_loss": (lambda x, m, m2: kl.kl_penalty_loss(x["a"], x["b"], m), {"a": "m", "b": "m"}, "a"),
    "gae": (lambda x, m, m2: adv_mod.gae(x["a"], x["b"], m, gamma=0.9, lam=0.8), {"a": "m", "b": "m"}, "a"),
    "discounted_returns": (lambda x, m, m2: adv_mod.discounted_returns(x["a"], m, 0.7), {"a": "m"}, "a"),
    "ppo_policy_loss": (
        lambda x, m, m2: ppo.ppo_policy_loss(
            x["a"], x["b"], x["c"], m, dual_clip=3.0, reduction="token_mean"
        ),
        {"a": "m", "b": "m", "c": "m"},
        "a",
    ),
    "ppo_value_loss": (
        lambda x, m, m2: ppo.ppo_value_loss(x["a"], x["b"], x["c"], m),
        {"a": "m", "b": "m", "c": "m"},
        "a",
    ),
    "entropy_bonus": (lambda x, m, m2: ppo.entropy_bonus(x["e"], m), {"e": "m"}, "e"),
    "reinforce_loss": (lambda x, m, m2: ppo.reinforce_loss(x["a"], x["c"], m), {"a": "m", "c": "m"}, "a"),
}


def _flatten(out) -> list[torch.Tensor]:
    if isinstance(out, utils.LossOutput | utils.RewardOutput):
        return [out[0]] + [out.metrics[k] for k in sorted(out.metrics)]
    if isinstance(out, tuple):
        return list(out)
    return [out]


def _inputs(seed: int, b: int, k: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = {name: torch.randn(b, k, dtype=F64, generator=g) for name in "abcd"}
    x["e"] = torch.rand(b, k, dtype=F64, generator=g)
    x["p"] = torch.rand(b, k, 2, dtype=F64, generator=g)
    x["s"] = torch.randn(b, dtype=F64, generator=g)
    return x


def _spoil(x: torch.Tensor, mask: torch.Tensor, garbage, seed: int) -> torch.Tensor:
    if garbage == "random":
        g = torch.Generator().manual_seed(seed + 1)
        junk = torch.randn(x.shape, dtype=F64, generator=g) * 1e4
    else:
        junk = torch.full_like(x, garbage)
    keep = mask if x.dim() == mask.dim() else mask[..., None]
    return torch.where(keep, x, junk)


def _run(name, x, m, m2):
    fn, _, wrt = CASES[name]
    x = {k: v.clone().requires_grad_(k == wrt) for k, v in x.items()}
    outs = _flatten(fn(x, m, m2))
    grad = None
    if isinstance(fn(x, m, m2), utils.LossOutput):
        (grad,) = torch.autograd.grad(outs[0].sum(), x[wrt])
    return outs, grad


@pytest.mark.parametrize("name", sorted(CASES))
@settings(max_examples=25, deadline=None)
@given(data=st.data())
def test_masked_positions_never_change_results(name, data):
    b, k = data.draw(st.integers(1, 4), label="B"), data.draw(st.integers(1, 6), label="T")
    bits = st.lists(st.booleans(), min_size=b * k, max_size=b * k)
    m = torch.tensor(data.draw(bits, label="mask")).view(b, k)
    m2 = torch.tensor(data.draw(bits, label="mask2")).view(b, k)
    garbage = data.draw(st.sampled_from(GARBAGE), label="garbage")
    seed = data.draw(st.integers(0, 2**16), label="seed")
    clean = _inputs(seed, b, k)
    masks = {"m": m, "m2": m2}
    spoiled = dict(clean)
    for key, which in CASES[name][1].items():
        spoiled[key] = _spoil(clean[key], masks[which], garbage, seed)
    outs_clean, grad_clean = _run(name, clean, m, m2)
    outs_spoiled, grad_spoiled = _run(name, spoiled, m, m2)
    for a, b_ in zip(outs_clean, outs_spoiled):
        torch.testing.assert_close(b_, a, rtol=0, atol=0)
    if grad_clean is not None:
        torch.testing.assert_close(grad_spoiled, grad_clean, rtol=0, atol=0)
        wrt_mask = masks[CASES[name][1][CASES[name][2]]]
        assert grad_spoiled[~wrt_mask].eq(0).all()


@settings(max_examples=25, deadline=None)
@given(data=st.data())
def test_ignored_labels_never_change_logprobs(data):
    """Positions with label -100 may hold any logits / hidden state, NaN included."""
    b, k = data.draw(st.integers(1, 3)), data.draw(st.integers(1, 5))
    valid = torch.tensor(data.draw(st.lists(st.booleans(), min_size=b * k, max_size=b * k))).view(b, k)
    garbage = data.draw(st.sampled_from(GARBAGE))
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2**16)))
    hidden = torch.randn(b, k, 4, dtype=F64, generator=g)
    weight = torch.randn(7, 4, dtype=F64, generator=g, requires_grad=True)
    labels = torch.where(valid, torch.randint(0, 7, (b, k), generator=g), -100)
    spoiled = _spoil(hidden, valid, garbage, 0)
    logits = torch.nn.functional.linear(hidden, weight).detach()
    results = []
    for h, z in ((hidden, logits), (spoiled, _spoil(logits, valid, garbage, 1))):
        h, z = h.clone().requires_grad_(), z.clone().requires_grad_()
        out = chunked_gather_logprobs(h, weight, labels, chunk_size=3)
        grads = torch.autograd.grad(out.sum(), (h, weight))
        plain = logprobs.gather_logprobs(z, labels)
        (plain_grad,) = torch.autograd.grad(plain.sum(), z)
        results.append((out, *grads, plain, plain_grad))
    for clean, dirty in zip(*results):
        torch.testing.assert_close(dirty, clean, rtol=0, atol=0)
