"""Reward combinations: Llama 2's safety/helpfulness gate, weighted sums (HHH), Sparrow's re-rank score, and the
aggregations of a reward-model ensemble (mean, worst case, uncertainty-weighted; Coste et al. 2024).

These turn several reward-model scores into the one scalar an optimizer sees. They are pure maths on
tensors; the reward sources themselves live in `rlhflab.rewards`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from rlhflab.errors import ConfigError
from rlhflab.losses.utils import (
    RewardOutput,
    as_bool_mask,
    check_same_shape,
    check_unit_interval,
    detach_metrics,
    masked_mean,
    masked_whiten,
)


def _logit(p: Tensor, eps: float) -> Tensor:
    p = p.clamp(eps, 1 - eps)
    return torch.log(p) - torch.log1p(-p)


def llama2_safety_gate(
    helpfulness_scores: Tensor,
    safety_scores: Tensor,
    unsafe_prompt: Tensor,
    threshold: float = 0.15,
    whiten: bool = True,
    scores_are_probs: bool = False,
    eps: float = 1e-6,
) -> RewardOutput:
    """Llama 2's combined reward: the safety score where safety matters, else the helpfulness score.

    R_c = R_s if IS_SAFETY(p) or sigma(R_s) < threshold else R_h;   R = WHITEN(LOGIT(R_c))
    (Touvron et al. 2023, Llama 2, Sec. 3.2.3; threshold 0.15 on the sigmoid scale.)

    helpfulness_scores, safety_scores: [B] reward-model outputs, logits by default; with
    scores_are_probs=True they are sigmoid outputs in (0, 1) and are mapped back with LOGIT.
    unsafe_prompt: [B] bool, True where the prompt is flagged as potentially unsafe. whiten: shift and
    scale the combined scores over the batch (mean 0, unit unbiased variance). Returns rewards [B] and
    metric reward/safety_gated (1 where the safety score was used).
    """
    check_same_shape(
        helpfulness_scores=helpfulness_scores, safety_scores=safety_scores, unsafe_prompt=unsafe_prompt
    )
    check_unit_interval("threshold", threshold)
    safety_prob = safety_scores if scores_are_probs else torch.sigmoid(safety_scores)
    gated = as_bool_mask(unsafe_prompt) | (safety_prob < threshold)
    combined = torch.where(gated, safety_scores, helpfulness_scores)
    if scores_are_probs:
        combined = _logit(combined, eps)
    if whiten:
        combined = masked_whiten(combined, torch.ones_like(gated))
    return RewardOutput(combined, detach_metrics({"reward/safety_gated": gated.to(combined.dtype)}))


def weighted_sum(rewards: Tensor | Sequence[Tensor], weights: Sequence[float] | Tensor) -> Tensor:
    """Weighted sum of several reward signals (e.g. helpful, honest, harmless): R = sum_i w_i R_i.

    rewards: [B, N] or a sequence of N tensors [B]; weights: N numbers. Returns [B].
    """
    stacked = torch.stack(list(rewards), dim=-1) if not isinstance(rewards, Tensor) else rewards
    w = torch.as_tensor(weights, dtype=stacked.dtype, device=stacked.device)
    if w.dim() != 1 or w.shape[0] != stacked.shape[-1]:
        raise ConfigError(
            f"got {w.numel()} reward weights for {stacked.shape[-1]} reward signals; "
            "give exactly one weight per reward."
        )
    return stacked @ w


def sparrow_rerank(
    preference_rewards: Tensor,
    rule_rewards: Tensor,
    mask: Tensor | None = None,
    eps: float = 1e-6,
) -> RewardOutput:
    """Sparrow's re-rank score for N candidate replies to one dialogue context.

    R_rerank = exp(R_pr) / (exp(R_pr) + exp(AVG(R_pr))) * (prod_{i=1}^{n} R_rule_i)^(1/n)
             = sigma(R_pr - AVG(R_pr)) * geometric_mean(R_rule)
    (Glaese et al. 2022, "Improving alignment of dialogue agents via targeted human judgements" (Sparrow),
    the re-ranking score.)

    preference_rewards: [P, N] preference-RM scores of N candidates for each of P contexts (AVG runs over
    the candidates of the same context). rule_rewards: [P, N, n] probability that each of n rules is
    followed (1 - the rule RM's violation probability). mask: [P, N], True = the candidate exists.
    Returns rewards [P, N] (0 for absent candidates; the best candidate is the argmax over N) and metric
    reward/rule_geomean [P, N].
    """
    if mask is None:
        mask = torch.ones_like(preference_rewards, dtype=torch.bool)
    check_same_shape(preference_rewards=preference_rewards, mask=mask)
    if rule_rewards.shape[:-1] != preference_rewards.shape:
        raise ValueError(
            f"rule_rewards {tuple(rule_rewards.shape)} must be [P, N, n] for "
            f"preference_rewards {tuple(preference_rewards.shape)}"
        )
    mask = as_bool_mask(mask)
    zero = torch.zeros((), dtype=preference_rewards.dtype, device=preference_rewards.device)
    r_pr = torch.where(mask, preference_rewards, zero)
    avg = masked_mean(r_pr, mask, dim=-1)
    pref_term = torch.sigmoid(r_pr - avg[:, None])
    # Geometric mean in log space: a product of many probabilities underflows.
    rules = torch.where(mask[..., None], rule_rewards, torch.ones((), dtype=zero.dtype, device=zero.device))
    rule_term = torch.log(rules.clamp(min=eps)).mean(-1).exp() if rules.shape[-1] else torch.ones_like(r_pr)
    reranked = torch.where(mask, pref_term * rule_term, zero)
    return RewardOutput(reranked, detach_metrics({"reward/rule_geomean": torch.where(mask, rule_term, zero)}))


def _check_members(member_scores: Tensor) -> None:
    if member_scores.dim() != 2 or member_scores.shape[0] < 1:
        raise ValueError(
            f"member_scores must be [K, B] with K >= 1 ensemble members, got shape {tuple(member_scores.shape)}"
        )


def ensemble_mean(member_scores: Tensor) -> Tensor:
    """Mean optimization: R_mean(q, a) = (1/K) sum_i R_i(q, a)  (Coste et al. 2024, "Reward Model Ensembles
    Help Mitigate Overoptimization", the mean objective).

    member_scores: [K, B], the scores of K reward models for B responses. Returns [B]. Not conservative: one
    member that over-rates a response still lifts the mean.
    """
    _check_members(member_scores)
    return member_scores.mean(dim=0)


def ensemble_min(member_scores: Tensor) -> Tensor:
    """Worst-case optimization (WCO): R_WCO(q, a) = min_i R_i(q, a)  (Coste et al. 2024, the WCO objective).

    member_scores: [K, B]. Returns [B]. No hyperparameter; a response scores high only if every member agrees.
    The members must share one scale (e.g. each whitened by its own training-response statistics): a
    Bradley-Terry reward is defined only up to a constant, and without that the minimum is mostly the member
    with the lowest offset.
    """
    _check_members(member_scores)
    return member_scores.min(dim=0).values


def ensemble_uwo(member_scores: Tensor, coef: float) -> Tensor:
    """Uncertainty-weighted optimization (UWO): the mean minus coef times the variance over the members,

        R_UWO(q, a) = (1/K) sum_i R_i(q, a) - lambda (1/K) sum_i (R_i(q, a) - (1/K) sum_j R_j(q, a))^2

    (Coste et al. 2024, the UWO objective; lambda = coef >= 0; the population variance, 1/K, as there).
    member_scores: [K, B]. Returns [B]. coef = 0 is the mean; one member has variance 0, so K = 1 is that
    member. As for WCO, the members must share one scale.
    """
    _check_members(member_scores)
    if not (coef >= 0 and math.isfinite(coef)):
        raise ValueError(f"the UWO coefficient lambda must be a finite number >= 0, got {coef}")
    mean = member_scores.mean(dim=0)
    variance = (member_scores - mean).pow(2).mean(dim=0)
    return mean - coef * variance


# The ensemble aggregations by name (`CombinedReward`'s ensemble_* modes): [K, B] member scores -> [B]; UWO also
# takes its coefficient.
ENSEMBLE_AGGREGATIONS = {"mean": ensemble_mean, "min": ensemble_min, "uwo": ensemble_uwo}
