"""KL between policy and reference: per-token estimators, KL-shaped rewards, KL controllers.

Per-token estimators use only the log-probs of the sampled tokens, y_t ~ pi (Schulman 2020, "Approximating
KL Divergence"). With log r = log ref(y_t) - log pi(y_t):
    k1 = -log r                     unbiased, can be negative
    k2 = (log r)^2 / 2              biased, low variance, >= 0
    k3 = (r - 1) - log r            unbiased, >= 0 (since log x <= x - 1)
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
) -> LossOutput:
    """KL to the reference as a loss term (GRPO puts beta * k3 in the loss instead of the reward).

    L = reduce_t KL_t(pi || ref)   (Shao et al. 2024, DeepSeekMath, GRPO objective with the k3 estimator)
    policy_logps, ref_logps, mask: [B, T]; the reference is treated as a constant. Returns loss [B] (see
    `reduce_token_losses` for `reduction`) and metric kl/sequence_mean (per-token mean, [B]); multiply
    the loss by beta yourself.
    """
    check_same_shape(policy_logps=policy_logps, ref_logps=ref_logps, mask=mask)
    kl = _estimator(estimator)(fill_masked(policy_logps, mask), fill_masked(ref_logps.detach(), mask))
    loss = reduce_token_losses(kl, mask, reduction)
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
