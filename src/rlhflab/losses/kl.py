"""KL between policy and reference: per-token estimators, KL-shaped rewards, KL controllers.

Per-token estimators use only the log-probs of the sampled tokens, y_t ~ pi (Schulman 2020, "Approximating
KL Divergence"). With log r = log ref(y_t) - log pi(y_t):
    k1 = -log r                     unbiased, can be negative
    k2 = (log r)^2 / 2              biased, low variance, >= 0
    k3 = (r - 1) - log r            unbiased, >= 0 (since log x <= x - 1)
An unbiased value is not an unbiased gradient: which estimator gives grad KL(pi || ref) depends on whether
it sits in the reward or in the loss (`KL_GRADIENT_UNBIASED`).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from rlhflab.errors import ConfigError
from rlhflab.losses.utils import (
    LossOutput,
    RewardOutput,
    as_bool_mask,
    check_positive,
    check_same_shape,
    detach_metrics,
    fill_masked,
    masked_sum,
    reduce_token_losses,
)


def kl_k1(policy_logps: Tensor, ref_logps: Tensor) -> Tensor:
    """k1 = log pi(y) - log ref(y), per token. Any shape in, same shape out."""
    return policy_logps - ref_logps


def kl_k2(policy_logps: Tensor, ref_logps: Tensor) -> Tensor:
    """k2 = (log pi(y) - log ref(y))^2 / 2, per token."""
    d = policy_logps - ref_logps
    return 0.5 * d * d


def kl_k3(policy_logps: Tensor, ref_logps: Tensor) -> Tensor:
    """k3 = exp(log r) - 1 - log r with log r = log ref(y) - log pi(y), per token; never negative.

    Computed as expm1(log r) - log r, which keeps precision when the two policies are close.
    """
    log_r = ref_logps - policy_logps
    return torch.expm1(log_r) - log_r


def alpacafarm_clamp(kl: Tensor) -> Tensor:
    """AlpacaFarm's clamp of the per-token k1 estimate at 0 (Dubois et al. 2023, `_shape_reward`).

    kl = clamp(log pi(y) - log ref(y), min=0): tokens where the policy is less likely than the reference
    get no KL reward, so a policy that finds negative-KL tokens cannot farm reward from them.
    """
    return kl.clamp(min=0)


KL_ESTIMATORS: dict[str, Callable[[Tensor, Tensor], Tensor]] = {"k1": kl_k1, "k2": kl_k2, "k3": kl_k3}

# Which (estimator, placement) pairs have the gradient of KL(pi || ref) as their expected gradient, for
# tokens sampled from pi itself (on-policy) at one sampling step. With d = log pi(y) - log ref(y):
#   "reward": -beta k(y), detached, enters the return, so the policy gradient carries E_pi[k grad log pi]
#             (`kl_shaped_rewards`);
#   "loss":   beta k(y) is differentiated on the sampled token, giving E_pi[grad k] (`kl_penalty_loss`).
# The true gradient is grad KL(pi || ref) = E_pi[d grad log pi]. Then
#   k1 reward: E[d grad log pi]                                  = grad KL(pi || ref)     unbiased
#   k1 loss:   E[grad log pi] = sum_y grad pi(y)                 = 0                      no signal at all
#   k2 reward: E[(d^2 / 2) grad log pi]                          != grad KL, O(d^2)       biased
#   k2 loss:   E[d grad log pi]                                  = grad KL(pi || ref)     unbiased
#   k3 reward: E[(e^-d - 1 + d) grad log pi]                     = grad KL(pi || ref) - grad KL(ref || pi)
#   k3 loss:   E[(1 - e^-d) grad log pi] = -sum_y ref(y) grad log pi(y)
#                                                                = grad KL(ref || pi)     the other direction
# (Schulman 2020, "Approximating KL Divergence", for the estimators; Tang & Munos 2025, "On a few pitfalls
# in KL divergence gradient estimation for RL", arXiv 2506.09477, for the loss placements; Shah et al.
# 2025, "A Comedy of Estimators: On KL Regularization in RL Training of LLMs", arXiv 2512.21852, for all
# six.) Over a sequence even the unbiased "loss" row is partial: a token's KL term also depends on the
# earlier tokens that led to it, which a per-token loss does not differentiate (Tang & Munos 2025).
# tests/losses/test_kl_gradients.py computes all six exactly on a categorical policy.
KL_GRADIENT_UNBIASED: dict[tuple[str, str], bool] = {
    ("k1", "reward"): True,
    ("k1", "loss"): False,
    ("k2", "reward"): False,
    ("k2", "loss"): True,
    ("k3", "reward"): False,
    ("k3", "loss"): False,
}


def _estimator(name: str) -> Callable[[Tensor, Tensor], Tensor]:
    if name not in KL_ESTIMATORS:
        raise ConfigError(f"unknown KL estimator {name!r}; choose one of {', '.join(KL_ESTIMATORS)}.")
    return KL_ESTIMATORS[name]


def last_token_index(mask: Tensor) -> Tensor:
    """Index of the last True position of each row of mask [B, T] (0 for an all-False row). Returns [B]."""
    m = as_bool_mask(mask)
    return m.shape[-1] - 1 - m.flip(-1).to(torch.int8).argmax(-1)


def kl_shaped_rewards(
    score: Tensor,
    policy_logps: Tensor,
    ref_logps: Tensor,
    mask: Tensor,
    beta: float,
    estimator: str = "k1",
    clamp: bool = False,
) -> RewardOutput:
    """Per-token rewards: -beta * KL_t at every token, plus the sequence score at the last real token.

    r_t = -beta * KL_t + [t == last] * score    (Ziegler et al. 2019 Eq. 2; InstructGPT Eq. 2 in per-token
    form; AlpacaFarm's `_shape_reward`, Dubois et al. 2023)

    score: [B] sequence rewards; policy_logps, ref_logps: [B, T] log-probs of the sampled response tokens;
    mask: [B, T] True = a real response token; beta: KL coefficient (a controller's `.value`);
    estimator: "k1" | "k2" | "k3"; clamp: apply AlpacaFarm's clamp at 0 to the per-token estimate.
    Returns rewards [B, T] (0 at masked positions; a row with no real token gets no score) and metrics
    kl/sequence (sum of per-token KL), reward/score, reward/non_score (sum of -beta KL), reward/total.
    """
    check_same_shape(policy_logps=policy_logps, ref_logps=ref_logps, mask=mask)
    if score.shape != policy_logps.shape[:1]:
        raise ValueError(f"score {tuple(score.shape)} must be [B] for log-probs {tuple(policy_logps.shape)}")
    if beta < 0:
        raise ConfigError(f"KL coefficient beta must be >= 0, got {beta}.")
    mask = as_bool_mask(mask)
    zero = torch.zeros((), dtype=policy_logps.dtype, device=policy_logps.device)
    kl = _estimator(estimator)(fill_masked(policy_logps, mask), fill_masked(ref_logps, mask))
    if clamp:
        kl = alpacafarm_clamp(kl)
    non_score = -beta * kl
    last = torch.nn.functional.one_hot(last_token_index(mask), mask.shape[-1]).bool() & mask
    rewards = non_score + torch.where(last, score[:, None].to(non_score.dtype), zero)
    metrics = {
        "kl/sequence": masked_sum(kl, mask, dim=-1),
        "reward/score": score,
        "reward/non_score": masked_sum(non_score, mask, dim=-1),
        "reward/total": masked_sum(rewards, mask, dim=-1),
    }
    return RewardOutput(rewards, detach_metrics(metrics))


def kl_penalty_loss(
    policy_logps: Tensor,
    ref_logps: Tensor,
    mask: Tensor,
    estimator: str = "k3",
    reduction: str = "sequence_mean",
    max_tokens: float | None = None,
) -> LossOutput:
    """KL to the reference as a loss term (GRPO puts beta * k3 in the loss instead of the reward).

    L = reduce_t KL_t(pi || ref)   (Shao et al. 2024, DeepSeekMath, GRPO objective with the k3 estimator)
    policy_logps, ref_logps, mask: [B, T]; the reference is treated as a constant. Returns loss [B] (see
    `reduce_token_losses` for `reduction` and `max_tokens`) and metric kl/sequence_mean (per-token mean,
    [B]); multiply the loss by beta yourself.

    Its gradient is not what the name suggests for every estimator (`KL_GRADIENT_UNBIASED`): on tokens
    sampled from pi, k3 here (GRPO's choice) has expected gradient grad KL(ref || pi), k1 has 0, and only
    k2 gives grad KL(pi || ref). The other unbiased choice is k1 in the reward (`kl_shaped_rewards`).
    """
    check_same_shape(policy_logps=policy_logps, ref_logps=ref_logps, mask=mask)
    kl = _estimator(estimator)(fill_masked(policy_logps, mask), fill_masked(ref_logps.detach(), mask))
    loss = reduce_token_losses(kl, mask, reduction, max_tokens)
    metrics = {"kl/sequence_mean": reduce_token_losses(kl, mask, "sequence_mean")}
    return LossOutput(loss, detach_metrics(metrics))


def _as_float(x: Tensor | float, name: str) -> float:
    value = float(x.detach().float().mean()) if isinstance(x, Tensor) else float(x)
    if not math.isfinite(value):
        raise ValueError(f"{name} is not finite ({value}); check the rollout log-probs for NaN/inf")
    return value


class FixedKLController:
    """A constant KL coefficient with the same interface as `AdaptiveKLController`."""

    def __init__(self, kl_coef: float):
        if kl_coef < 0:
            raise ConfigError(f"kl_coef must be >= 0, got {kl_coef}.")
        self.value = float(kl_coef)

    def update(self, current_kl: Tensor | float, n_steps: int) -> float:
        """Does nothing (the coefficient is fixed); returns the coefficient."""
        _as_float(current_kl, "current_kl")
        return self.value

    def state_dict(self) -> dict[str, float]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.value = float(state["value"])


class AdaptiveKLController:
    """Proportional control of the KL coefficient toward a target KL.

    e_t = clip(KL_t / KL_target - 1, -0.2, 0.2);   beta_{t+1} = beta_t * (1 + e_t * n_steps / horizon)
    (Ziegler et al. 2019, "Fine-Tuning Language Models from Human Preferences", the adaptive-beta rule
    beta_{t+1} = beta_t (1 + K_beta e_t), here with K_beta = n_steps / horizon as in their code and trl.)
    `current_kl` is the mean per-sequence KL of the latest batch (`kl/sequence` averaged); n_steps the
    number of samples (or steps) it covered; horizon sets how fast beta moves (10,000 in Ziegler et al.).
    """

    def __init__(self, init_kl_coef: float, target: float, horizon: float):
        if init_kl_coef < 0:
            raise ConfigError(f"init_kl_coef must be >= 0, got {init_kl_coef}.")
        check_positive("target", target)
        check_positive("horizon", horizon)
        self.value = float(init_kl_coef)
        self.target = float(target)
        self.horizon = float(horizon)

    def update(self, current_kl: Tensor | float, n_steps: int) -> float:
        """Move the coefficient toward the target; returns the new coefficient."""
        error = min(max(_as_float(current_kl, "current_kl") / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon
        return self.value

    def state_dict(self) -> dict[str, float]:
        return {"value": self.value, "target": self.target, "horizon": self.horizon}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.value = float(state["value"])
        self.target = float(state.get("target", self.target))
        self.horizon = float(state.get("horizon", self.horizon))
