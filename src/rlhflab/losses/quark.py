"""Quark: reward quantiles as control tokens, and the conditional language-modelling loss that learns them.

Quark (Lu et al. 2022, "Quark: Controllable Text Generation with Reinforced Unlearning") keeps a growing pool of
sampled responses, sorts it by reward into K quantiles, marks each quantile with its own control token put in
front of the prompt (Keskar et al. 2019's control codes, one per reward level), and trains the policy with a
language-modelling loss on (token + prompt, response), kept near the initial model by a per-token KL and spread
by an entropy bonus. Sampling with the best quantile's token then asks for the highest rewards.
AlpacaFarm's binary reward conditioning (Dubois et al. 2023) is the same with K = 2 and no KL or entropy.
"""

from __future__ import annotations

import torch
from torch import Tensor

from rlhflab.errors import ConfigError
from rlhflab.losses.logprobs import entropy_from_logits, gather_logprobs, logprob_dtype
from rlhflab.losses.utils import (
    LossOutput,
    as_bool_mask,
    check_same_shape,
    detach_metrics,
    fill_masked,
    reduce_token_losses,
)


def reward_quantiles(rewards: Tensor, n_quantiles: int) -> Tensor:
    """Quark's quantization: the reward quantile (0 = worst, n_quantiles - 1 = best) of every pool sample.

    rewards: [N] float. Returns [N] long. With K = n_quantiles and m_i the 0-based rank of r_i in the pool sorted
    ascending, ties given the middle rank of their group (m_i = (#{r_j < r_i} + #{r_j <= r_i} - 1) / 2),

        q_i = floor(K m_i / N),   and q_i = K - 1 wherever r_i = max(r).

    Without ties this cuts the sorted pool into K runs of floor(N / K) or ceil(N / K) samples, as Quark does (Lu
    et al. 2022, Sec. 2 "Quantization": quantiles of equal size). Quark's code splits by position, which sends the
    copies of a tied reward to different tokens by their order in the pool; here equal rewards share a quantile,
    so a token says something about the reward and nothing about the order. The best reward is always in the top
    quantile: the token the policy samples with is always trained, on the best samples (a large tied group at the
    top would otherwise sit lower and leave it empty). K = 2 is AlpacaFarm's good / bad split at the median: a
    sample is good when its tie group's middle rank is in the upper half (in [1, 2, 2, 3] only 3 is good; in
    [1, 2, 3, 4], 3 and 4).
    """
    if n_quantiles < 1:
        raise ConfigError(f"n_quantiles must be >= 1, got {n_quantiles}")
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be [N], got {tuple(rewards.shape)}")
    if not torch.isfinite(rewards).all():
        raise ValueError("rewards hold NaN or inf; a quantile of them means nothing")
    n = rewards.shape[0]
    if n == 0:
        return torch.zeros(0, dtype=torch.long, device=rewards.device)
    ordered = torch.sort(rewards).values
    below = torch.searchsorted(ordered, rewards, right=False)
    at_or_below = torch.searchsorted(ordered, rewards, right=True)
    # floor(K m / N) with m = (below + at_or_below - 1) / 2, in integers: no float rounding can move a sample
    # across a quantile boundary.
    q = n_quantiles * (below + at_or_below - 1) // (2 * n)
    return torch.where(rewards == ordered[-1], torch.full_like(q, n_quantiles - 1), q)


def quark_loss(
    policy_logits: Tensor,
    labels: Tensor,
    mask: Tensor,
    ref_logits: Tensor | None = None,
    *,
    beta: float = 0.0,
    alpha: float = 0.0,
    reduction: str = "token_mean",
    max_tokens: float | None = None,
) -> LossOutput:
    """Quark's per-token objective on responses from the pool, each conditioned on its quantile's token.

    Lu et al. 2022, Sec. 2 "Learning": maximize, over pool samples (x, y) of quantile k with reward token r_k,

        log p_theta(y | x, r_k) - beta sum_t KL(p_theta(. | y_<t, x, r_k) || p_0(. | y_<t, x))

    plus an entropy bonus alpha H(p_theta(. | y_<t, x, r_k)). As a loss to minimize, per response token t:

        l_t = -log p_theta(y_t | .) + beta KL_t - alpha H_t
        KL_t = sum_v p~(v) (log p~(v) - log p_0(v)),   p~ = softmax(policy_logits[:V_ref])
        H_t  = -sum_v p(v) log p(v) over the policy's whole vocabulary

    The KL runs over the reference's vocabulary, the policy's logits renormalized on it, because the reference
    p_0 (the initial model, which has no control tokens) gives them probability zero. The direction,
    KL(policy || reference), and the renormalization are those of the authors' released code, which
    AlpacaFarm's reimplementation (Dubois et al. 2023) keeps. beta = 0, alpha = 0 is plain masked NLL, i.e.
    AlpacaFarm's reward conditioning.

    policy_logits: [B, T, V] the policy's logits predicting each response token (conditioned on the control
        token); labels: [B, T] long, the response tokens; mask: [B, T], True = a real response token;
        ref_logits: [B, T, V_ref] with V_ref <= V, the reference's logits at the same tokens (unconditioned);
        may be None when beta = 0. Positions where mask is False may hold anything (NaN included).
    reduction, max_tokens: how tokens become the [B] loss (`reduce_token_losses`); "token_mean" (the default)
        weighs every token of the batch the same, as Quark's code does.

    Returns LossOutput with loss [B] and metrics, per-sequence token means [B]: loss/nll, kl/ref (KL_t),
    loss/entropy (H_t), loss/quark (l_t).
    """
    check_same_shape(labels=labels, mask=mask)
    if policy_logits.shape[:-1] != labels.shape:
        raise ValueError(
            f"policy_logits {tuple(policy_logits.shape)} and labels {tuple(labels.shape)} disagree"
        )
    if beta < 0 or alpha < 0:
        raise ConfigError(f"beta and alpha must be >= 0, got beta={beta}, alpha={alpha}")
    if beta > 0 and ref_logits is None:
        raise ValueError("beta > 0 needs ref_logits")
    if ref_logits is not None and (
        ref_logits.shape[:-1] != labels.shape or ref_logits.shape[-1] > policy_logits.shape[-1]
    ):
        raise ValueError(
            f"ref_logits {tuple(ref_logits.shape)} must be [B, T, V_ref] with V_ref <= V for policy_logits "
            f"{tuple(policy_logits.shape)}"
        )
    m = as_bool_mask(mask)
    # Padding positions are zeroed before any softmax, so nothing there reaches a result or a gradient.
    logits = fill_masked(policy_logits.to(logprob_dtype(policy_logits.dtype)), m[..., None])
    nll = -gather_logprobs(logits, torch.where(m, labels, torch.zeros_like(labels)))
    entropy = entropy_from_logits(logits)
    kl = torch.zeros_like(nll)
    if ref_logits is not None:
        shared = torch.log_softmax(logits[..., : ref_logits.shape[-1]], dim=-1)
        ref = fill_masked(ref_logits.detach().to(shared.dtype), m[..., None])
        ref = torch.log_softmax(ref, dim=-1)
        kl = (shared.exp() * (shared - ref)).sum(-1)
    token_loss = nll + beta * kl - alpha * entropy
    loss = reduce_token_losses(token_loss, m, reduction, max_tokens)
    metrics = {
        "loss/nll": reduce_token_losses(nll, m, "sequence_mean"),
        "kl/ref": reduce_token_losses(kl, m, "sequence_mean"),
        "loss/entropy": reduce_token_losses(entropy, m, "sequence_mean"),
        "loss/quark": reduce_token_losses(token_loss, m, "sequence_mean"),
    }
    return LossOutput(loss, detach_metrics(metrics))
