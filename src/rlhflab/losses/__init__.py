"""All the maths the training stages use, as pure functions: tensors in, per-example loss + metrics out.

One module per family; see docs/losses.md for every function, its formula and its source.

- utils: LossOutput / RewardOutput, masked_sum / mean / var / whiten, reduce_token_losses
- logprobs: gather_logprobs, sequence_logps, entropy_from_logits
- sft: sft_nll
- reward: bradley_terry (+ margins, label smoothing), plackett_luce, pairwise_all_pairs, the same two with
  ties (plackett_luce_with_ties, all_pairs_with_ties), reward_centering, regression, trex, binary_classifier,
  process_reward_loss (a classifier per step) with prm_product / prm_min (PRM_AGGREGATES)
- combine: llama2_safety_gate, weighted_sum, sparrow_rerank, ensemble_mean / ensemble_min (WCO) / ensemble_uwo
  (UWO), ENSEMBLE_AGGREGATIONS
- general_preference: general_preference (a pairwise preference model's loss, antisymmetric logits)
- tournament: tournament_pairs / tournament_matrix / tournament_win_rates, best_worst_pairs (DNO's round)
- preference: dpo, cdpo, robust_dpo, ipo, hinge, kto, bco (+ BCORewardShift), orpo, simpo, cpl,
  PREFERENCE_LOSS_TABLE
- kl: kl_k1 / k2 / k3, alpacafarm_clamp, kl_shaped_rewards, kl_penalty_loss, KL controllers,
  KL_GRADIENT_UNBIASED (which estimator x placement gives the gradient of KL(pi || ref))
- advantages: gae, discounted_returns, whiten, reinforce / rloo / group-normalized / ReMax advantages,
  finite_groups and dynamic_sampling_mask (DAPO) keep-masks
- ppo: ppo_policy_loss, ppo_value_loss, entropy_bonus, reinforce_loss, sampler_mismatch,
  truncated_importance_weights (TIS)
- quark: quark_loss (conditional NLL + KL + entropy, Lu et al. 2022), reward_quantiles (its control tokens)

Mask polarity everywhere: True = the token counts.
"""

from rlhflab.losses.advantages import (
    discounted_returns,
    dynamic_sampling_mask,
    finite_groups,
    gae,
    group_normalized_advantages,
    reinforce_advantages,
    remax_advantages,
    rloo_advantages,
    whiten,
)
from rlhflab.losses.combine import (
    ENSEMBLE_AGGREGATIONS,
    ensemble_mean,
    ensemble_min,
    ensemble_uwo,
    llama2_safety_gate,
    sparrow_rerank,
    weighted_sum,
)
from rlhflab.losses.general_preference import antisymmetric_logits, general_preference
from rlhflab.losses.kl import (
    KL_ESTIMATORS,
    KL_GRADIENT_UNBIASED,
    AdaptiveKLController,
    FixedKLController,
    alpacafarm_clamp,
    kl_k1,
    kl_k2,
    kl_k3,
    kl_penalty_loss,
    kl_shaped_rewards,
    last_token_index,
)
from rlhflab.losses.logprobs import (
    entropy_from_logits,
    gather_logprobs,
    sequence_logps,
    token_mask_from_labels,
)
from rlhflab.losses.ppo import (
    entropy_bonus,
    ppo_policy_loss,
    ppo_value_loss,
    reinforce_loss,
    sampler_mismatch,
    truncated_importance_weights,
)
from rlhflab.losses.preference import (
    PREFERENCE_LOSS_TABLE,
    BCORewardShift,
    bco,
    cdpo,
    cpl,
    dpo,
    hinge,
    implicit_reward_metrics,
    ipo,
    kto,
    kto_kl_estimate,
    orpo,
    robust_dpo,
    simpo,
)
from rlhflab.losses.quark import quark_loss, reward_quantiles
from rlhflab.losses.reward import (
    LLAMA2_MARGINS,
    PRM_AGGREGATES,
    all_pairs_with_ties,
    binary_classifier,
    bradley_terry,
    llama2_margins,
    pairwise_all_pairs,
    plackett_luce,
    plackett_luce_with_ties,
    prm_min,
    prm_product,
    process_reward_loss,
    regression,
    reward_centering,
    tie_orders,
    trex,
)
from rlhflab.losses.sft import sft_nll
from rlhflab.losses.tournament import (
    best_worst_pairs,
    tournament_matrix,
    tournament_pairs,
    tournament_win_rates,
)
from rlhflab.losses.utils import (
    REDUCTIONS,
    LossOutput,
    RewardOutput,
    masked_mean,
    masked_sum,
    masked_var,
    masked_whiten,
    reduce_token_losses,
)

__all__ = [
    "ENSEMBLE_AGGREGATIONS",
    "KL_ESTIMATORS",
    "KL_GRADIENT_UNBIASED",
    "LLAMA2_MARGINS",
    "PREFERENCE_LOSS_TABLE",
    "PRM_AGGREGATES",
    "REDUCTIONS",
    "AdaptiveKLController",
    "BCORewardShift",
    "FixedKLController",
    "LossOutput",
    "RewardOutput",
    "all_pairs_with_ties",
    "alpacafarm_clamp",
    "antisymmetric_logits",
    "bco",
    "best_worst_pairs",
    "binary_classifier",
    "bradley_terry",
    "cdpo",
    "cpl",
    "discounted_returns",
    "dpo",
    "dynamic_sampling_mask",
    "ensemble_mean",
    "ensemble_min",
    "ensemble_uwo",
    "entropy_bonus",
    "entropy_from_logits",
    "finite_groups",
    "gae",
    "gather_logprobs",
    "general_preference",
    "group_normalized_advantages",
    "hinge",
    "implicit_reward_metrics",
    "ipo",
    "kl_k1",
    "kl_k2",
    "kl_k3",
    "kl_penalty_loss",
    "kl_shaped_rewards",
    "kto",
    "kto_kl_estimate",
    "last_token_index",
    "llama2_margins",
    "llama2_safety_gate",
    "masked_mean",
    "masked_sum",
    "masked_var",
    "masked_whiten",
    "orpo",
    "pairwise_all_pairs",
    "plackett_luce",
    "plackett_luce_with_ties",
    "ppo_policy_loss",
    "ppo_value_loss",
    "sampler_mismatch",
    "truncated_importance_weights",
    "prm_min",
    "prm_product",
    "process_reward_loss",
    "quark_loss",
    "reduce_token_losses",
    "regression",
    "reinforce_advantages",
    "reinforce_loss",
    "remax_advantages",
    "reward_centering",
    "reward_quantiles",
    "rloo_advantages",
    "robust_dpo",
    "sequence_logps",
    "sft_nll",
    "simpo",
    "sparrow_rerank",
    "tie_orders",
    "token_mask_from_labels",
    "tournament_matrix",
    "tournament_pairs",
    "tournament_win_rates",
    "trex",
    "weighted_sum",
    "whiten",
]
