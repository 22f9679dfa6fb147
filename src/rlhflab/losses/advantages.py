"""Advantage estimators: GAE, reward-to-go, whitening, REINFORCE baselines, RLOO, GRPO and ReMax.

Token-level tensors are [B, T] with a mask (True = a real response token). Sequences are right-padded: a
False after the last True ends the episode, so nothing bootstraps from padding. A False between Trues also
ends the episode at that point.

Critic-free (group) estimators take the scores of K samples per prompt, [P, K] or flat prompt-major
[P*K] with k given. A group holding a non-finite score (a reward model's NaN, a verifier's inf) is
dropped, not propagated: all its samples get advantage 0, so they add exactly nothing to the policy
gradient and no NaN reaches the rest of the batch; `finite_groups` gives the mask of the groups kept,
for the stage to count and log. DAPO's dynamic sampling (`dynamic_sampling_mask`) also drops the groups
whose samples all score the same, which would get advantage 0 anyway.
"""

from __future__ import annotations

import torch
from torch import Tensor

from rlhflab.errors import ConfigError
from rlhflab.losses.utils import (
    as_bool_mask,
    check_same_shape,
    check_unit_interval,
    fill_masked,
    masked_whiten,
)


def _zero(x: Tensor) -> Tensor:
    return torch.zeros((), dtype=x.dtype, device=x.device)


def gae(
    rewards: Tensor,
    values: Tensor,
    mask: Tensor,
    gamma: float = 1.0,
    lam: float = 0.95,
) -> tuple[Tensor, Tensor]:
    """Generalized advantage estimation over right-padded token sequences.

    delta_t = r_t + gamma V_{t+1} - V_t   (V after the last real token = 0: the episode ends there)
    A_t = sum_l (gamma lam)^l delta_{t+l};   returns R_t = A_t + V_t
    (Schulman et al. 2016, "High-Dimensional Continuous Control Using GAE", Eq. 16; AlpacaFarm
    `_estimate_advantage`, Dubois et al. 2023.) With gamma = lam = 1, A_t = reward-to-go - V_t.

    rewards, values, mask: [B, T]. Returns (advantages [B, T], returns [B, T]), 0 at masked positions,
    not whitened (call `whiten`). Compute it under torch.no_grad(); it is differentiable but nobody
    should backpropagate through a target.
    """
    check_same_shape(rewards=rewards, values=values, mask=mask)
    check_unit_interval("gamma", gamma)
    check_unit_interval("lam", lam)
    mask = as_bool_mask(mask)
    zero = _zero(rewards)
    rewards, values = fill_masked(rewards, mask), fill_masked(values, mask)
    next_value = torch.zeros_like(values[:, 0])
    next_adv = torch.zeros_like(values[:, 0])
    next_real = torch.zeros_like(mask[:, 0])
    advantages = []
    for t in reversed(range(rewards.shape[-1])):
        # torch.where, not a multiply: a masked neighbour must not leak even if it holds inf.
        nv = torch.where(next_real, next_value, zero)
        na = torch.where(next_real, next_adv, zero)
        adv = rewards[:, t] + gamma * nv - values[:, t] + gamma * lam * na
        adv = torch.where(mask[:, t], adv, zero)
        advantages.append(adv)
        next_value, next_adv, next_real = values[:, t], adv, mask[:, t]
    adv = torch.stack(advantages[::-1], dim=-1)
    return adv, torch.where(mask, adv + values, zero)


def discounted_returns(rewards: Tensor, mask: Tensor, gamma: float = 1.0) -> Tensor:
    """Reward-to-go G_t = sum_{l >= 0} gamma^l r_{t+l} over each sequence's real tokens.

    rewards, mask: [B, T]. Returns [B, T], 0 at masked positions. Equals `gae(..., values=0, lam=1)[0]`.
    """
    adv, _ = gae(rewards, torch.zeros_like(rewards), mask, gamma=gamma, lam=1.0)
    return adv


def whiten(x: Tensor, mask: Tensor, shift_mean: bool = True, eps: float = 1e-8) -> Tensor:
    """Whiten advantages (shift_mean=True) or rewards (shift_mean=False, AlpacaFarm) over the masked batch.

    See `rlhflab.losses.utils.masked_whiten`; x, mask: [B, T] (or any shape); masked positions become 0.
    """
    return masked_whiten(x, mask, shift_mean=shift_mean, eps=eps)


def reinforce_advantages(scores: Tensor, baseline: Tensor | float | None = None) -> Tensor:
    """REINFORCE with a baseline: A = R(tau) - b  (Williams 1992: (R(tau) - b) grad log p).

    scores: [B]; baseline: [B], a float, or None for the mean of the finite scores (a constant baseline
    keeps the gradient unbiased). Returns [B]; a non-finite score, or baseline, gives advantage 0.
    """
    finite = torch.isfinite(scores)
    if baseline is None:
        baseline = scores[finite].mean() if finite.any() else _zero(scores)
    adv = scores - baseline
    return torch.where(torch.isfinite(adv), adv, _zero(adv))


def _grouped(scores: Tensor, k: int | None) -> tuple[Tensor, tuple[int, ...]]:
    shape = tuple(scores.shape)
    if scores.dim() == 2:
        return scores, shape
    if scores.dim() != 1 or k is None:
        raise ValueError("scores must be [P, K], or flat [P*K] with k given")
    if k < 1 or scores.shape[0] % k:
        raise ConfigError(
            f"{scores.shape[0]} scores do not split into groups of k={k}; the number of "
            "completions per prompt must divide the batch."
        )
    return scores.view(-1, k), shape


def finite_groups(scores: Tensor, k: int | None = None) -> Tensor:
    """Keep-mask of the groups whose scores are all finite, per sample.

    scores: [P, K] or flat prompt-major [P*K] with k given. Returns a bool tensor of the input shape: True
    for every sample of a group whose K scores are all finite, False for every sample of a group holding a
    NaN or inf. The group estimators below give the False samples advantage 0.
    """
    grouped, shape = _grouped(scores, k)
    keep = torch.isfinite(grouped).all(-1, keepdim=True).expand_as(grouped)
    return keep.reshape(shape)


def dynamic_sampling_mask(scores: Tensor, k: int | None = None) -> Tensor:
    """DAPO's dynamic-sampling filter: keep a group only if its samples do not all score the same.

    keep(group) = 0 < #{i : R_i = R_max} < K, i.e. max_i R_i != min_i R_i   (Yu et al. 2025, "DAPO",
    the constraint 0 < |{o_i | is_equivalent(a, o_i)}| < G of its objective, here for any score: a group
    whose samples all got the same score has zero group-relative advantage, so it only dilutes the batch.)
    Groups holding a non-finite score are not kept either (see `finite_groups`).

    scores: [P, K] or flat prompt-major [P*K] with k given. Returns the bool keep-mask of the input shape,
    the same for every sample of a group ([P*K] for flat scores): index the rollout with it, or resample
    prompts until enough groups are kept, as DAPO does. Equality is exact (verifier scores are exact).
    Filtering is not the same as the advantage 0 those groups get anyway: kept in the batch, they add
    nothing to the gradient but still count in every normalizer (B, and N for "token_mean"), which shrinks
    the informative groups' share of the update.
    """
    grouped, shape = _grouped(scores, k)
    finite = torch.isfinite(grouped).all(-1, keepdim=True)
    varied = grouped.amax(-1, keepdim=True) != grouped.amin(-1, keepdim=True)
    return (finite & varied).expand_as(grouped).reshape(shape)


def _finite_grouped(scores: Tensor, k: int | None) -> tuple[Tensor, Tensor, tuple[int, ...]]:
    # (grouped scores with dropped groups set to 0, [P, 1] mask of the groups that get an advantage, input
    # shape). Dropped: a non-finite score (the arithmetic then never sees a NaN), and all-equal scores,
    # whose advantage must be exactly 0 but which the mean can miss by a rounding error: float32 [x, x, x]
    # has mean(x) != x for many x, and dividing that error by std + eps gives advantages of order 1e-3.
    grouped, shape = _grouped(scores, k)
    finite = torch.isfinite(grouped).all(-1, keepdim=True)
    grouped = torch.where(finite, grouped, _zero(grouped))
    varied = grouped.amax(-1, keepdim=True) != grouped.amin(-1, keepdim=True)
    return grouped, finite & varied, shape


def rloo_advantages(scores: Tensor, k: int | None = None) -> Tensor:
    """REINFORCE leave-one-out: each sample's baseline is the mean score of the other k-1 samples.

    A_i = R_i - 1/(k-1) sum_{j != i} R_j = k/(k-1) (R_i - mean_j R_j)
    (Kool et al. 2019, "Buy 4 REINFORCE samples, get a baseline for free!"; Ahmadian et al. 2024, RLOO.)

    scores: [P, K] (K samples of P prompts) or flat [P*K], prompt-major (samples of prompt 0 first, as
    `repeat_interleave` makes them), with k given. Returns the input shape. Needs k >= 2. A group whose
    samples all score the same gets exactly 0; so does a group with a non-finite score (`finite_groups`).
    """
    grouped, keep, shape = _finite_grouped(scores, k)
    n = grouped.shape[-1]
    if n < 2:
        raise ConfigError("RLOO needs at least 2 samples per prompt (k >= 2).")
    others = (grouped.sum(-1, keepdim=True) - grouped) / (n - 1)
    return torch.where(keep, grouped - others, _zero(grouped)).reshape(shape)


def group_normalized_advantages(
    scores: Tensor,
    k: int | None = None,
    scale_by_std: bool = True,
    eps: float = 1e-4,
) -> Tensor:
    """GRPO's group-relative advantages: A_i = (R_i - mean_group R) / (std_group R + eps).

    (Shao et al. 2024, DeepSeekMath, Sec. 4.1.2 "outcome supervision"; std is unbiased as in TRL.)
    scale_by_std=False gives Dr. GRPO's mean-centred advantages (Liu et al. 2025), which do not
    up-weight prompts whose samples all score about the same.

    scores: [P, K] or flat prompt-major [P*K] with k given. Returns the input shape. A group whose samples
    all score the same gets exactly 0, with or without the std scaling; so does a group with a non-finite
    score (see `finite_groups`).
    """
    grouped, keep, shape = _finite_grouped(scores, k)
    centred = grouped - grouped.mean(-1, keepdim=True)
    if scale_by_std:
        std = grouped.std(-1, keepdim=True) if grouped.shape[-1] > 1 else torch.zeros_like(grouped[:, :1])
        centred = centred / (std + eps)
    return torch.where(keep, centred, _zero(centred)).reshape(shape)


def remax_advantages(scores: Tensor, greedy_scores: Tensor, k: int | None = None) -> Tensor:
    """ReMax: REINFORCE whose baseline is the score of the prompt's greedy response.

    A_i = R(x, y_i) - R(x, y_greedy(x)),  y_i ~ pi(. | x),  y_greedy = argmax decoding of pi
    (Li et al. 2023, "ReMax: A Simple, Effective, and Efficient Reinforcement Learning Method for Aligning
    Large Language Models", arXiv 2310.10505: the greedy response's reward is a baseline that depends on
    the prompt only, so the gradient stays unbiased while its variance drops.)

    scores: [P] (one sample per prompt, as in the paper), [P, K], or flat prompt-major [P*K] with k given;
    greedy_scores: [P], one per prompt. Returns the shape of `scores`. A prompt whose samples' or greedy
    score is non-finite gets 0 for all its samples.
    """
    if scores.dim() == 1 and k is None:
        k = 1
    grouped, shape = _grouped(scores, k)
    if greedy_scores.shape != grouped.shape[:1]:
        raise ValueError(
            f"greedy_scores {tuple(greedy_scores.shape)} must be [P] = [{grouped.shape[0]}] for scores "
            f"{tuple(scores.shape)}"
        )
    both = torch.cat([grouped, greedy_scores[:, None].to(grouped.dtype)], dim=-1)
    keep = torch.isfinite(both).all(-1, keepdim=True)
    both = torch.where(keep, both, _zero(both))
    adv = both[:, :-1] - both[:, -1:]
    return torch.where(keep, adv, _zero(adv)).reshape(shape)
