"""Reward-model losses: pairwise (Bradley-Terry), K-wise (Plackett-Luce, InstructGPT), regression, T-REX, binary
classifiers of single responses, and process supervision (a classifier per step, with the product / minimum that
turn step probabilities into a solution's score).

Scores are the reward model's scalar outputs r(x, y) (logits, not probabilities). K-wise rewards come in
ranked order: column 0 is the best response, column K-1 the worst.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

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
    pair_metrics,
)

# Llama 2 (Touvron et al. 2023), Table 27: margin m(r) by preference strength, index 0..3 =
# significantly better, better, slightly better, negligibly better / unsure.
LLAMA2_MARGINS: dict[str, tuple[float, float, float, float]] = {
    "small": (1.0, 2.0 / 3.0, 1.0 / 3.0, 0.0),
    "large": (3.0, 2.0, 1.0, 0.0),
}


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

    L = -log sigma(r_c - r_r - m)   (InstructGPT Eq. 1 with K = 2; Touvron et al. 2023, Eq. 2 with margin m(r))
    With label smoothing eps: L = -(1-eps) log sigma(z) - eps log sigma(-z), z = r_c - r_r - m.

    chosen_rewards, rejected_rewards: [B]; margin: [B], a float, or None (0). Returns loss [B] and metrics
    reward/chosen, reward/rejected, reward/margin (r_c - r_r, without m), reward/accuracy (r_c > r_r).
    """
    check_same_shape(chosen_rewards=chosen_rewards, rejected_rewards=rejected_rewards)
    check_unit_interval("label_smoothing", label_smoothing, upper_open=True, upper=0.5)
    z = chosen_rewards - rejected_rewards
    if margin is not None:
        z = z - margin
    return LossOutput(_smoothed_logistic(z, label_smoothing), pair_metrics(chosen_rewards, rejected_rewards))


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


def tie_orders(ranks: Sequence[int], max_orders: int | None = None) -> list[list[int]]:
    """Every order of K responses consistent with `ranks` (0 = best, equal = tied), best first.

    [0, 1, 1] -> [[0, 1, 2], [0, 2, 1]]; without ties, the one order. Raises ValueError when there are more
    than `max_orders` (the product of the tie groups' factorials).
    """
    groups = [[i for i, r in enumerate(ranks) if r == g] for g in sorted(set(ranks))]
    n_orders = math.prod(math.factorial(len(g)) for g in groups)
    if max_orders is not None and n_orders > max_orders:
        raise ValueError(f"ranks {list(ranks)} allow {n_orders} orders of their ties, more than {max_orders}")
    per_group = (itertools.permutations(g) for g in groups)
    return [list(itertools.chain(*perm)) for perm in itertools.product(*per_group)]


def _strictly_above(ranks: Tensor) -> Tensor:
    """[B, K, K] bool: response i is ranked strictly above response j (both present; -1 = absent)."""
    present = ranks >= 0
    return present[:, :, None] & present[:, None, :] & (ranks[:, :, None] < ranks[:, None, :])


def _ordered_pair_accuracy(rewards: Tensor, above: Tensor) -> Tensor:
    right = ((rewards[:, :, None] - rewards[:, None, :] > 0) & above).sum((1, 2)).to(rewards.dtype)
    return right / above.sum((1, 2)).clamp(min=1).to(rewards.dtype)


def all_pairs_with_ties(rewards: Tensor, ranks: Tensor, *, label_smoothing: float = 0.0) -> LossOutput:
    """InstructGPT's K-wise loss over the strictly ordered pairs of a ranking that may contain ties.

    L = -1/|P| * sum_{(i, j) in P} log sigma(r_i - r_j),  P = {(i, j): rank_i < rank_j}
    (Ouyang et al. 2022, Eq. 1, with the pairs of tied responses left out: a tie states no preference).
    Without ties this is `pairwise_all_pairs`; with label_smoothing eps each pair's loss is the conservative
    cross-entropy of `bradley_terry`.

    rewards: [B, K]; ranks: [B, K] long, 0 = best, equal = tied, -1 = no response (ragged K). Every ranking
    needs at least one strictly ordered pair. Returns loss [B]; metric reward/accuracy = the share of strictly
    ordered pairs scored in order.
    """
    check_same_shape(rewards=rewards, ranks=ranks)
    check_unit_interval("label_smoothing", label_smoothing, upper=0.5, upper_open=True)
    rewards = fill_masked(rewards, ranks >= 0)  # absent responses never enter the arithmetic
    above = _strictly_above(ranks)
    n_pairs = above.sum((1, 2))
    if bool((n_pairs == 0).any()):
        raise ValueError("all_pairs_with_ties: a ranking has no strictly ordered pair (every response tied)")
    pair_losses = _smoothed_logistic(rewards[:, :, None] - rewards[:, None, :], label_smoothing)
    loss = masked_sum(pair_losses, above, dim=-1).sum(-1) / n_pairs.to(rewards.dtype)
    return LossOutput(loss, detach_metrics({"reward/accuracy": _ordered_pair_accuracy(rewards, above)}))


def plackett_luce_with_ties(rewards: Tensor, ranks: Tensor, *, max_orders: int = 120) -> LossOutput:
    """Plackett-Luce negative log-likelihood of a ranking with ties: the probability of the observed partial
    order is the sum of the probabilities of the total orders consistent with it.

    L = -log sum_{o in O(ranks)} exp(-L_PL(r_o))   (`plackett_luce` for L_PL; O(ranks) = every order of the
    tied responses within their tie groups, `tie_orders`; without ties, O has one order and L = L_PL).

    rewards: [B, K]; ranks: [B, K] long, 0 = best, equal = tied, -1 = no response. Returns loss [B]; metric
    reward/accuracy = the share of strictly ordered pairs scored in order. More than `max_orders` orders in
    one ranking raise ValueError (use `all_pairs_with_ties` there).
    """
    check_same_shape(rewards=rewards, ranks=ranks)
    rewards = fill_masked(rewards, ranks >= 0)
    b, k = ranks.shape
    owners, orders = [], []
    for row, row_ranks in enumerate(ranks.tolist()):
        present = [i for i, r in enumerate(row_ranks) if r >= 0]
        for order in tie_orders([row_ranks[i] for i in present], max_orders):
            owners.append(row)
            orders.append([present[i] for i in order] + [-1] * (k - len(order)))
    owner = torch.tensor(owners, device=rewards.device)
    index = torch.tensor(orders, device=rewards.device)  # [E, K] response indices, best first; -1 = none
    nll = plackett_luce(rewards[owner[:, None], index.clamp(min=0)], index >= 0).loss  # [E]
    # Row b's orders go to slots 0..n_b-1 of a [B, max n_b] table; empty slots are -inf (weight 0).
    counts = torch.bincount(owner.cpu(), minlength=b).tolist()
    slot = torch.cat([torch.arange(c) for c in counts]).to(rewards.device)
    table = rewards.new_full((b, int(slot.max()) + 1), float("-inf")).index_put((owner, slot), -nll)
    loss = -torch.logsumexp(table, dim=1)
    accuracy = _ordered_pair_accuracy(rewards, _strictly_above(ranks))
    return LossOutput(loss, detach_metrics({"reward/accuracy": accuracy}))


def reward_centering(rewards: Tensor, mask: Tensor | None = None) -> Tensor:
    """Auxiliary term that keeps rewards centred near 0: (2 x the mean reward of an example's responses)^2.

    For a pair this is (r_c + r_r)^2, the centering term of Eisenstein et al. 2023 ("Helping or Herding?
    Reward Model Ensembles Mitigate but do not Eliminate Reward Hacking", arXiv 2312.09244; TRL's
    center_rewards_coefficient). Bradley-Terry only sees differences, so without it the offset is free.

    rewards: [B, K]; mask: [B, K], True = the response exists. Returns [B] (multiply by a coefficient).
    """
    r, mask = _ranked_inputs(rewards, mask)
    mean = masked_sum(r, mask, dim=-1) / mask.sum(-1).clamp(min=1).to(r.dtype)
    return (2 * mean) ** 2


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
    loss: the cross-entropy of choosing the preferred trajectory from the two.)

    chosen_state_rewards: [B, T_c], chosen_mask: [B, T_c] (True = a real state of the preferred
    trajectory); rejected_*: [B, T_r]. Returns loss [B]; metrics reward/chosen and reward/rejected are the
    trajectory returns, plus reward/margin and reward/accuracy.
    """
    check_same_shape(chosen_state_rewards=chosen_state_rewards, chosen_mask=chosen_mask)
    check_same_shape(rejected_state_rewards=rejected_state_rewards, rejected_mask=rejected_mask)
    ret_c = masked_sum(chosen_state_rewards, chosen_mask, dim=-1)
    ret_r = masked_sum(rejected_state_rewards, rejected_mask, dim=-1)
    return LossOutput(-F.logsigmoid(ret_c - ret_r), pair_metrics(ret_c, ret_r))


def binary_classifier(scores: Tensor, labels: Tensor, *, center_coef: float = 0.0) -> LossOutput:
    """A reward head trained as a classifier of single responses: L = -[y log sigma(r) + (1 - y) log sigma(-r)].

    Sparrow's rule models (Glaese et al. 2022, Sec. 2.3 and App. D) are classifiers of this kind: one binary
    label per (dialogue, rule), "the response breaks the rule" or not, and their probability sigma(r) re-ranks
    samples (`rlhflab.losses.combine`). With y = 1 for a desirable response the head is also a reward whose
    sign says desirable (the labels KTO and BCO train on, Ethayarajh et al. 2024).

    scores: [N] logits r; labels: [N] bool or float in {0, 1}. Returns loss [N] (+ center_coef * (2r)^2, the
    single-response form of `reward_centering`); metrics reward/accuracy (sign of r agrees with y),
    reward/positive and reward/negative (r where y is 1, resp. 0; NaN on the other rows).
    """
    check_same_shape(scores=scores, labels=labels)
    y = labels.to(scores.dtype)
    loss = F.binary_cross_entropy_with_logits(scores, y, reduction="none")
    metrics = {
        "reward/accuracy": ((scores > 0) == (y > 0.5)).to(scores.dtype),
        "reward/positive": scores.masked_fill(y < 0.5, float("nan")),
        "reward/negative": scores.masked_fill(y > 0.5, float("nan")),
    }
    if center_coef:
        center = (2 * scores) ** 2
        loss, metrics["loss/center"] = loss + center_coef * center, center
    return LossOutput(loss, detach_metrics(metrics))


def process_reward_loss(token_scores: Tensor, step_labels: Tensor, step_mask: Tensor) -> LossOutput:
    """Process supervision: a binary classifier of each step, read at the step's last token.

    L_b = -1/S_b * sum_{t: m_bt} [ y_bt log sigma(r_bt) + (1 - y_bt) log sigma(-r_bt) ],  S_b = sum_t m_bt

    Lightman et al. 2023 ("Let's Verify Step by Step", Sec. 2.6) train the PRM to predict the correctness of
    each step after the last token of the step, maximizing the log-likelihood of the label there; with two
    labels (correct / not, Uesato et al. 2022's step labels) that is this cross-entropy, and TRL's stepwise
    supervision puts the label on the same token (each step's separator). Each solution weighs the same,
    whatever its number of steps.

    token_scores: [B, T] logits r at every position; step_labels: [B, T] bool or float in {0, 1}, read only
    where step_mask is True; step_mask: [B, T] bool, True at the last token of each labelled step. Returns
    loss [B] (0 for a row without steps) and metrics reward/accuracy (share of the row's steps whose sign of r
    agrees with the label; 0 without steps) and reward/steps (the row's labelled steps).
    """
    check_same_shape(token_scores=token_scores, step_labels=step_labels, step_mask=step_mask)
    mask = as_bool_mask(step_mask)
    token_scores = fill_masked(token_scores, mask)  # padding and unlabelled tokens never enter the arithmetic
    y = fill_masked(step_labels.to(token_scores.dtype), mask)
    bce = F.binary_cross_entropy_with_logits(token_scores, y, reduction="none")
    n_steps = mask.sum(-1).to(token_scores.dtype)
    per_step = n_steps.clamp(min=1)
    loss = masked_sum(bce, mask, dim=-1) / per_step
    right = ((token_scores > 0) == (y > 0.5)).to(token_scores.dtype)
    metrics = {"reward/accuracy": masked_sum(right, mask, dim=-1) / per_step, "reward/steps": n_steps}
    return LossOutput(loss, detach_metrics(metrics))


def _step_logits(step_logits: Tensor, step_mask: Tensor) -> tuple[Tensor, Tensor]:
    if step_logits.dim() != 2:
        raise ValueError(f"step_logits must be [B, S], got {tuple(step_logits.shape)}")
    check_same_shape(step_logits=step_logits, step_mask=step_mask)
    return step_logits, as_bool_mask(step_mask)


def prm_product(step_logits: Tensor, step_mask: Tensor) -> Tensor:
    """A solution's process-reward score: the probability that every step is correct, prod_s sigma(r_s).

    Lightman et al. 2023, Sec. 2.6: "the PRM score for a solution [is] the probability that every step is
    correct under the PRM ... the product of the correctness probabilities for each step". Computed as
    exp(sum_s log sigma(r_s)), which stays exact where the probabilities are tiny.

    step_logits: [B, S] the PRM's logit at each step's last token; step_mask: [B, S] bool, True = a step.
    Returns [B] in [0, 1]; a row without steps scores 0 (nothing was shown to be correct).
    """
    r, mask = _step_logits(step_logits, step_mask)
    score = masked_sum(F.logsigmoid(r), mask, dim=-1).exp()
    return torch.where(mask.any(-1), score, torch.zeros_like(score))


def prm_min(step_logits: Tensor, step_mask: Tensor) -> Tensor:
    """A solution's process-reward score from its weakest step: min_s sigma(r_s), the aggregation of Wang et al.
    2024 ("Math-Shepherd: Verify and Reinforce LLMs Step-by-step"); Lightman et al. 2023 (Sec. 2.6) use the product, `prm_product`.

    step_logits: [B, S]; step_mask: [B, S] bool. Returns [B] in [0, 1]; a row without steps scores 0.
    """
    r, mask = _step_logits(step_logits, step_mask)
    worst = fill_masked(r, mask, float("inf")).min(-1).values
    return torch.where(mask.any(-1), torch.sigmoid(worst), torch.zeros_like(worst))


# How a solution's step probabilities become one score (`rlhflab.rewards.ProcessReward`'s `aggregate`).
PRM_AGGREGATES = {"product": prm_product, "min": prm_min}


def stacked_bradley_terry(
    rewards: Tensor, margin: Tensor | None, *, label_smoothing: float = 0.0, center_coef: float = 0.0
) -> LossOutput:
    """`bradley_terry` over a stacked batch, with optional reward centering (Eisenstein et al. 2023).

    rewards [2B]: chosen rows, then rejected rows; margin [B] or None. Returns loss [B] =
    BT + center_coef * (r_c + r_r)^2 and the `reward/*` metrics of `bradley_terry` (+ loss/center).
    """
    b = rewards.shape[0] // 2
    chosen, rejected = rewards[:b], rewards[b:]
    out = bradley_terry(chosen, rejected, margin=margin, label_smoothing=label_smoothing)
    loss, metrics = out.loss, dict(out.metrics)
    if center_coef:
        center = reward_centering(torch.stack([chosen, rejected], dim=1))
        loss, metrics["loss/center"] = loss + center_coef * center, center.detach()
    return LossOutput(loss, metrics)


def ranked_loss(
    scores: Tensor,
    num_responses: Tensor,
    ranks: Tensor,
    *,
    loss: str,
    label_smoothing: float = 0.0,
    center_coef: float = 0.0,
    max_orders: int = 120,
) -> LossOutput:
    """K-wise loss of B rankings from flat per-response scores [N]: example 0's num_responses[0] responses
    best first, then example 1's, ...; ranks [B, K_max] (-1 = no response).

    all_pairs: `all_pairs_with_ties` (InstructGPT Eq. 1 over the strictly ordered pairs); plackett_luce:
    `plackett_luce_with_ties` (the likelihood summed over every order of the tied responses). Returns loss
    [B] (plus center_coef * `reward_centering`); metric reward/accuracy = share of strictly ordered pairs
    scored in order.
    """
    counts = num_responses.to(scores.device)
    present = torch.arange(int(counts.max()), device=scores.device)[None] < counts[:, None]
    table = scores.new_zeros(present.shape).masked_scatter(present, scores)  # [B, K_max], best first
    ranks = ranks.to(scores.device)
    if loss == "all_pairs":
        out = all_pairs_with_ties(table, ranks, label_smoothing=label_smoothing)
    elif loss == "plackett_luce":
        out = plackett_luce_with_ties(table, ranks, max_orders=max_orders)
    else:
        raise ConfigError(f"unknown K-wise loss {loss!r}; use plackett_luce or all_pairs")
    per_example, metrics = out.loss, dict(out.metrics)
    if center_coef:
        center = reward_centering(table, present)
        per_example, metrics["loss/center"] = per_example + center_coef * center, center.detach()
    return LossOutput(per_example, metrics)


def distributional_preference(
    chosen_mean: Tensor, chosen_log_var: Tensor, rejected_mean: Tensor, rejected_log_var: Tensor
) -> LossOutput:
    """Mean-and-variance distributional preference learning (DPL): each response's utility is a distribution
    over the annotators who might judge it, N(mu, sigma^2), and a label is one draw of the comparison.

    P(c > r) = Phi((mu_c - mu_r) / sqrt(sigma_c^2 + sigma_r^2)),   L = -log P(c > r)
    (Siththaranjan, Laidlaw & Hadfield-Menell 2023, "Distributional Preference Learning: Understanding and
    Accounting for Hidden Context in RLHF", the mean-and-variance model, Sec. 5.) Pairs on which the hidden
    context (who annotates) splits the labels are fitted by a large sigma instead of a small mean gap, so the
    variance is where the disagreement shows. With sigma_c = sigma_r = s this is a probit Bradley-Terry model in
    the scaled gap (mu_c - mu_r) / (sqrt(2) s).

    chosen_mean, chosen_log_var, rejected_mean, rejected_log_var: [B] (log sigma^2: unconstrained, so any head
    output is a valid variance). Returns loss [B] and metrics reward/chosen, reward/rejected, reward/margin,
    reward/accuracy of the means (mu_c > mu_r), and reward/std (the pair's sqrt(sigma_c^2 + sigma_r^2)).
    """
    check_same_shape(
        chosen_mean=chosen_mean,
        chosen_log_var=chosen_log_var,
        rejected_mean=rejected_mean,
        rejected_log_var=rejected_log_var,
    )
    scale = torch.sqrt(chosen_log_var.exp() + rejected_log_var.exp())
    # log Phi through log_ndtr: exact far in the lower tail, where log(Phi(z)) would underflow to -inf.
    loss = -torch.special.log_ndtr((chosen_mean - rejected_mean) / scale)
    metrics = {**pair_metrics(chosen_mean, rejected_mean), "reward/std": scale.detach()}
    return LossOutput(loss, metrics)


def stacked_distributional(outputs: Tensor, *, center_coef: float = 0.0) -> LossOutput:
    """`distributional_preference` over a stacked batch: outputs [2B, 2], chosen rows then rejected rows, columns
    (mean, log variance). center_coef adds coef * (mu_c + mu_r)^2 (`reward_centering` of the means: the loss sees
    only their difference). Returns loss [B] and the metrics of `distributional_preference` (+ loss/center)."""
    if outputs.dim() != 2 or outputs.shape[1] != 2 or outputs.shape[0] % 2:
        raise ValueError(f"outputs must be [2B, 2] (mean, log variance), got {tuple(outputs.shape)}")
    b = outputs.shape[0] // 2
    chosen, rejected = outputs[:b], outputs[b:]
    out = distributional_preference(chosen[:, 0], chosen[:, 1], rejected[:, 0], rejected[:, 1])
    loss, metrics = out.loss, dict(out.metrics)
    if center_coef:
        center = reward_centering(torch.stack([chosen[:, 0], rejected[:, 0]], dim=1))
        loss, metrics["loss/center"] = loss + center_coef * center, center.detach()
    return LossOutput(loss, metrics)
