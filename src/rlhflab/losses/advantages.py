"""Advantage estimators: GAE, reward-to-go, whitening, REINFORCE baselines, RLOO and GRPO groups.

Token-level tensors are [B, T] with a mask (True = a real response token). Sequences are right-padded: a
False after the last True ends the episode, so nothing bootstraps from padding. A False between Trues also
ends the episode at that point.
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

    scores: [B]; baseline: [B], a float, or None for the batch mean (a constant baseline keeps the
    gradient unbiased). Returns [B].
    """
    if baseline is None:
        baseline = scores.mean()
    return scores - baseline


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


def rloo_advantages(scores: Tensor, k: int | None = None) -> Tensor:
    """REINFORCE leave-one-out: each sample's baseline is the mean score of the other k-1 samples.

    A_i = R_i - 1/(k-1) sum_{j != i} R_j = k/(k-1) (R_i - mean_j R_j)
    (Kool et al. 2019, "Buy 4 REINFORCE samples, get a baseline for free!"; Ahmadian et al. 2024, RLOO.)

    scores: [P, K] (K samples of P prompts) or flat [P*K], prompt-major (samples of prompt 0 first, as
    `repeat_interleave` makes them), with k given. Returns the input shape. Needs k >= 2.
    """
    grouped, shape = _grouped(scores, k)
    n = grouped.shape[-1]
    if n < 2:
        raise ConfigError("RLOO needs at least 2 samples per prompt (k >= 2).")
    others = (grouped.sum(-1, keepdim=True) - grouped) / (n - 1)
    return (grouped - others).reshape(shape)


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

    scores: [P, K] or flat prompt-major [P*K] with k given. Returns the input shape.
    """
    grouped, shape = _grouped(scores, k)
    centred = grouped - grouped.mean(-1, keepdim=True)
    if scale_by_std:
        std = grouped.std(-1, keepdim=True) if grouped.shape[-1] > 1 else torch.zeros_like(grouped[:, :1])
        centred = centred / (std + eps)
    return centred.reshape(shape)
