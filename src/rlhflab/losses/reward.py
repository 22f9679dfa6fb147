"""Reward-model losses: pairwise (Bradley-Terry), K-wise (Plackett-Luce, InstructGPT), regression, T-REX.

Scores are the reward model's scalar outputs r(x, y) (logits, not probabilities). K-wise rewards come in
ranked order: column 0 is the best response, column K-1 the worst.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from rlhflab.errors import ConfigError
from rlhflab.losses.utils import (
    LossOutput,
    as_bool_mask,
    check_same_shape,
    check_unit_interval,
    detach_metrics,
    fill_masked,
    masked_sum,
)

# Llama 2 (Touvron et al. 2023), Table 27: margin m(r) by preference strength, index 0..3 =
# significantly better, better, slightly better, negligibly better / unsure.
LLAMA2_MARGINS: dict[str, tuple[float, float, float, float]] = {
    "small": (1.0, 2.0 / 3.0, 1.0 / 3.0, 0.0),
    "large": (3.0, 2.0, 1.0, 0.0),
}


def _pair_metrics(chosen: Tensor, rejected: Tensor) -> dict[str, Tensor]:
    margin = chosen - rejected
    return detach_metrics({
        "reward/chosen": chosen,
        "reward/rejected": rejected,
        "reward/margin": margin,
        "reward/accuracy": (margin > 0).to(chosen.dtype),
    })


def _smoothed_logistic(z: Tensor, label_smoothing: float) -> Tensor:
    # -(1-eps) log sigma(z) - eps log sigma(-z): cross-entropy against a label that is right w.p. 1-eps.
    loss = -F.logsigmoid(z)
    if label_smoothing > 0:
        loss = (1 - label_smoothing) * loss - label_smoothing * F.logsigmoid(-z)
    return loss


def llama2_margins(strength: Tensor, variant: str = "small") -> Tensor:
    """Per-pair margins from Llama 2's preference-strength ratings (Table 27).

    strength: [B] integer ratings, 0 = significantly better, 1 = better, 2 = slightly better,
    3 = negligibly better / unsure. variant: "small" (1, 2/3, 1/3, 0) or "large" (3, 2, 1, 0). Returns [B].
    """
    if variant not in LLAMA2_MARGINS:
        raise ConfigError(f"unknown Llama 2 margin variant {variant!r}; choose 'small' or 'large'.")
    if strength.numel() and (strength.min() < 0 or strength.max() > 3):
        raise ValueError("preference strength must be an integer in 0..3")
    table = torch.tensor(LLAMA2_MARGINS[variant], device=strength.device)
    return table[strength.long()]


def bradley_terry(
    chosen_rewards: Tensor,
    rejected_rewards: Tensor,
    margin: Tensor | float | None = None,
    label_smoothing: float = 0.0,
) -> LossOutput:
    """Bradley-Terry pairwise loss, optionally with a margin and label smoothing.

    L = -log sigma(r_c - r_r - m)   (InstructGPT Eq. 1 with K = 2; Llama 2 Eq. 2 with margin m(r), seed 000)
    With label smoothing eps: L = -(1-eps) log sigma(z) - eps log sigma(-z), z = r_c - r_r - m.

    chosen_rewards, rejected_rewards: [B]; margin: [B], a float, or None (0). Returns loss [B] and metrics
    reward/chosen, reward/rejected, reward/margin (r_c - r_r, without m), reward/accuracy (r_c > r_r).
    """
    check_same_shape(chosen_rewards=chosen_rewards, rejected_rewards=rejected_rewards)
    check_unit_interval("label_smoothing", label_smoothing, upper_open=True, upper=0.5)
    z = chosen_rewards - rejected_rewards
    if margin is not None:
        z = z - margin
    return LossOutput(_smoothed_logistic(z, label_smoothing), _pair_metrics(chosen_rewards, rejected_rewards))


def _ranked_inputs(rewards: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor]:
    if rewards.dim() != 2:
        raise ValueError(f"rewards must be [B, K] in ranked order, got {tuple(rewards.shape)}")
    if mask is None:
        mask = torch.ones_like(rewards, dtype=torch.bool)
    check_same_shape(rewards=rewards, mask=mask)
    mask = as_bool_mask(mask)
    return fill_masked(rewards, mask), mask


def _pairwise_accuracy(r: Tensor, mask: Tensor) -> Tensor:
    k = r.shape[-1]
    upper = torch.ones(k, k, dtype=torch.bool, device=r.device).triu(1)
    pairs = upper & mask[:, :, None] & mask[:, None, :]
    correct = (r[:, :, None] > r[:, None, :]) & pairs
    return correct.sum((1, 2)).to(r.dtype) / pairs.sum((1, 2)).clamp(min=1).to(r.dtype)


def plackett_luce(rewards: Tensor, mask: Tensor | None = None) -> LossOutput:
    """Plackett-Luce negative log-likelihood of a full ranking of K responses.

    L = -sum_{k=1}^{K} [ r_k - log sum_{j >= k} exp(r_j) ]   (Plackett 1975; used for K-wise reward
    learning by Zhu, Jordan & Jiao 2023, "Principled RLHF with Pairwise or K-wise Comparisons", and in
    the DPO paper's Appendix A.3)
    The last term is 0, so K = 2 gives -log sigma(r_1 - r_2): exactly Bradley-Terry.

    rewards: [B, K] scores in ranked order (column 0 = best); mask: [B, K], True = the response exists
    (ragged K; absent responses drop out of every sum). Returns loss [B] (a sum, not normalized by K) and
    metrics reward/accuracy (fraction of ordered pairs scored in the right order) and reward/top1_accuracy.
    """
    r, mask = _ranked_inputs(rewards, mask)
    k = r.shape[-1]
    later = torch.ones(k, k, dtype=torch.bool, device=r.device).triu()  # later[k, j] = j >= k
    # An absent position keeps itself in its own set so the logsumexp stays finite (its term is dropped).
    allowed = later & (mask[:, None, :] | torch.eye(k, dtype=torch.bool, device=r.device))
    scores = r[:, None, :].expand(-1, k, -1)
    neg_inf = torch.tensor(float("-inf"), dtype=r.dtype, device=r.device)
    lse = torch.logsumexp(torch.where(allowed, scores, neg_inf), dim=-1)
    loss = -masked_sum(r - lse, mask, dim=-1)
    top = torch.where(mask, r, neg_inf)
    top1 = ((top.argmax(-1) == 0) & mask[:, 0]).to(r.dtype)
    metrics = {"reward/accuracy": _pairwise_accuracy(r, mask), "reward/top1_accuracy": top1}
    return LossOutput(loss, detach_metrics(metrics))


def pairwise_all_pairs(rewards: Tensor, mask: Tensor | None = None) -> LossOutput:
    """InstructGPT's K-wise loss: mean Bradley-Terry loss over all K-choose-2 pairs of one prompt.

    L = -1/C(K,2) * sum_{i < j} log sigma(r_i - r_j)   (Ouyang et al. 2022, Eq. 1; i ranked above j)

    rewards: [B, K] in ranked order (column 0 = best); mask: [B, K], True = present (the mean runs over
    present pairs only). Returns loss [B]; metrics reward/accuracy (fraction of pairs in the right order).
    K = 2 equals Bradley-Terry.
    """
    r, mask = _ranked_inputs(rewards, mask)
    k = r.shape[-1]
    upper = torch.ones(k, k, dtype=torch.bool, device=r.device).triu(1)
    pairs = upper & mask[:, :, None] & mask[:, None, :]
    pair_losses = -F.logsigmoid(r[:, :, None] - r[:, None, :])
    n_pairs = pairs.sum((1, 2)).clamp(min=1).to(r.dtype)
    loss = masked_sum(pair_losses, pairs, dim=-1).sum(-1) / n_pairs
    return LossOutput(loss, detach_metrics({"reward/accuracy": _pairwise_accuracy(r, mask)}))


def regression(predicted: Tensor, target: Tensor) -> LossOutput:
    """Squared error to a scalar score: L = (r(x, y) - s)^2 (reward regression on ratings).

    predicted, target: [B]. Returns loss [B]; metric reward/abs_error |r - s|.
    """
    check_same_shape(predicted=predicted, target=target)
    err = predicted - target
    return LossOutput(err * err, detach_metrics({"reward/abs_error": err.abs()}))


def trex(
    chosen_state_rewards: Tensor,
    chosen_mask: Tensor,
    rejected_state_rewards: Tensor,
    rejected_mask: Tensor,
) -> LossOutput:
    """T-REX: Bradley-Terry over trajectory returns, each the sum of per-state rewards.

    L = -log [ exp(sum_{s in tau_c} R(s)) / (exp(sum_{s in tau_c} R(s)) + exp(sum_{s in tau_r} R(s))) ]
    (Brown et al. 2019, "Extrapolating Beyond Suboptimal Demonstrations via IRL from Observations", the T-REX
    loss; seed 003 writes it without the log, but its pseudo-code trains a cross-entropy, which this is.)

    chosen_state_rewards: [B, T_c], chosen_mask: [B, T_c] (True = a real state of the preferred
    trajectory); rejected_*: [B, T_r]. Returns loss [B]; metrics reward/chosen and reward/rejected are the
    trajectory returns, plus reward/margin and reward/accuracy.
    """
    check_same_shape(chosen_state_rewards=chosen_state_rewards, chosen_mask=chosen_mask)
    check_same_shape(rejected_state_rewards=rejected_state_rewards, rejected_mask=rejected_mask)
    ret_c = masked_sum(chosen_state_rewards, chosen_mask, dim=-1)
    ret_r = masked_sum(rejected_state_rewards, rejected_mask, dim=-1)
    return LossOutput(-F.logsigmoid(ret_c - ret_r), _pair_metrics(ret_c, ret_r))
