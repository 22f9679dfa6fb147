"""Policy-gradient losses: PPO clipped surrogate, clipped value loss, entropy bonus, REINFORCE; the sampler /
trainer mismatch of log-probs and truncated importance weights that correct for it.

Token-level inputs are [B, T] with a mask (True = a real response token). Every loss returns a per-example
[B] loss; `reduction` says how tokens become an example (see `reduce_token_losses`):
"sequence_mean" (default: masked token mean per sequence, then `.mean()` weighs sequences equally, as
AlpacaFarm and TRL's PPO do), "sequence_sum", or "token_mean" (`.mean()` of the output is the mean over
all real tokens of the batch, as verl / DAPO do). Advantages, old log-probs, old values and returns are
targets: they are detached inside, so gradient flows only into the new log-probs / values.
"""

from __future__ import annotations

import torch
from torch import Tensor

from rlhflab.errors import ConfigError
from rlhflab.losses.utils import (
    LossOutput,
    check_positive,
    check_same_shape,
    detach_metrics,
    fill_masked,
    reduce_token_losses,
)


def _token_advantages(advantages: Tensor, like: Tensor, mask: Tensor) -> Tensor:
    # A per-sequence advantage [B] (REINFORCE, RLOO, GRPO) applies to every token of its sequence.
    adv = advantages.detach()
    if adv.shape not in (like.shape, like.shape[:1]):
        raise ValueError(
            f"advantages {tuple(adv.shape)} must be [B, T] or [B] for log-probs {tuple(like.shape)}"
        )
    adv = adv[:, None].expand_as(like) if adv.dim() == 1 else adv
    return fill_masked(adv, mask)


def ppo_policy_loss(
    policy_logps: Tensor,
    old_logps: Tensor,
    advantages: Tensor,
    mask: Tensor,
    clip_eps: float = 0.2,
    clip_eps_high: float | None = None,
    dual_clip: float | None = None,
    reduction: str = "sequence_mean",
    max_tokens: float | None = None,
) -> LossOutput:
    """PPO's clipped surrogate, as a loss to minimize.

    rho_t = exp(log pi(a_t) - log pi_old(a_t))
    L_t = max(-A_t rho_t, -A_t clip(rho_t, 1 - eps, 1 + eps_high))  = -min(rho A, clip(rho) A)
    (Schulman et al. 2017, PPO, Eq. 7; of its six cases, the gradient is zero exactly when
    rho < 1-eps with A < 0, or rho > 1+eps with A > 0.) eps_high defaults to eps (DAPO's clip-higher uses
    a larger one). dual_clip c > 1 caps the loss of negative-advantage tokens at -c A (Ye et al. 2020),
    which stops one stale token with a huge ratio from dominating the batch.

    policy_logps: [B, T] (with grad); old_logps: [B, T] from the rollout policy; advantages: [B, T] or
    [B]; mask: [B, T]. Returns loss [B]; metrics (per-sequence token means, [B]): loss/clipfrac (tokens
    where the clipped branch is taken), loss/ratio, kl/approx (k3 estimate of KL(pi_old || pi)).
    """
    check_positive("clip_eps", clip_eps)
    eps_high = clip_eps if clip_eps_high is None else clip_eps_high
    check_positive("clip_eps_high", eps_high)
    if dual_clip is not None and not dual_clip > 1:
        raise ConfigError(f"dual_clip must be > 1, got {dual_clip}.")
    check_same_shape(policy_logps=policy_logps, old_logps=old_logps, mask=mask)
    adv = _token_advantages(advantages, policy_logps, mask)
    log_ratio = fill_masked(policy_logps, mask) - fill_masked(old_logps.detach(), mask)
    ratio = torch.exp(log_ratio)
    unclipped = -adv * ratio
    clipped = -adv * torch.clamp(ratio, 1 - clip_eps, 1 + eps_high)
    token_loss = torch.maximum(unclipped, clipped)
    if dual_clip is not None:
        token_loss = torch.where(adv < 0, torch.minimum(token_loss, -dual_clip * adv), token_loss)
    loss = reduce_token_losses(token_loss, mask, reduction, max_tokens)
    metrics = {
        "loss/clipfrac": reduce_token_losses((clipped > unclipped).to(ratio.dtype), mask, "sequence_mean"),
        "loss/ratio": reduce_token_losses(ratio, mask, "sequence_mean"),
        # Tokens were sampled from pi_old, so k3 with r = pi / pi_old estimates KL(pi_old || pi).
        "kl/approx": reduce_token_losses(torch.expm1(log_ratio) - log_ratio, mask, "sequence_mean"),
    }
    return LossOutput(loss, detach_metrics(metrics))


def ppo_value_loss(
    values: Tensor,
    old_values: Tensor,
    returns: Tensor,
    mask: Tensor,
    clip_eps_value: float | None = 0.2,
    reduction: str = "sequence_mean",
    max_tokens: float | None = None,
) -> LossOutput:
    """Clipped value loss: L_t = 0.5 * max((V - R)^2, (clip(V, V_old - c, V_old + c) - R)^2).

    (The value clipping of OpenAI baselines' PPO2, as AlpacaFarm (Dubois et al. 2023) uses
    it; clip_eps_value=None gives the plain 0.5 (V - R)^2 of the PPO paper's Eq. 9 value term.)

    values: [B, T] (with grad); old_values: [B, T] from the rollout; returns: [B, T] GAE returns;
    mask: [B, T]. Returns loss [B]; metrics loss/value_clipfrac and loss/value_error (|V - R| mean), [B].
    """
    check_same_shape(values=values, old_values=old_values, returns=returns, mask=mask)
    values = fill_masked(values, mask)
    returns, old_values = fill_masked(returns.detach(), mask), fill_masked(old_values.detach(), mask)
    err = (values - returns) ** 2
    if clip_eps_value is None:
        token_loss, clip_hit = 0.5 * err, torch.zeros_like(err)
    else:
        check_positive("clip_eps_value", clip_eps_value)
        v_clip = torch.clamp(values, old_values - clip_eps_value, old_values + clip_eps_value)
        err_clip = (v_clip - returns) ** 2
        token_loss = 0.5 * torch.maximum(err, err_clip)
        clip_hit = (err_clip > err).to(err.dtype)
    metrics = {
        "loss/value_clipfrac": reduce_token_losses(clip_hit, mask, "sequence_mean"),
        "loss/value_error": reduce_token_losses((values - returns).abs(), mask, "sequence_mean"),
    }
    return LossOutput(reduce_token_losses(token_loss, mask, reduction, max_tokens), detach_metrics(metrics))


def entropy_bonus(
    entropy: Tensor, mask: Tensor, reduction: str = "sequence_mean", max_tokens: float | None = None
) -> LossOutput:
    """Entropy bonus as a loss: L = -H (add coef * L to the total to reward exploration).

    (Schulman et al. 2017, PPO, Eq. 9's c2 S[pi] term.) entropy: [B, T] per-token entropy (see
    `entropy_from_logits`), mask: [B, T]. Returns loss [B]; metric loss/entropy (per-token mean, [B]).
    """
    check_same_shape(entropy=entropy, mask=mask)
    entropy = fill_masked(entropy, mask)
    loss = reduce_token_losses(-entropy, mask, reduction, max_tokens)
    metrics = {"loss/entropy": reduce_token_losses(entropy, mask, "sequence_mean")}
    return LossOutput(loss, detach_metrics(metrics))


def reinforce_loss(
    policy_logps: Tensor,
    advantages: Tensor,
    mask: Tensor,
    reduction: str = "sequence_sum",
    max_tokens: float | None = None,
) -> LossOutput:
    """REINFORCE (with whatever baseline made the advantages): L = -sum_t A_t log pi(a_t | s_t).

    (Williams 1992: (R(tau) - b) grad log p(tau).) Its gradient is the policy-gradient
    estimate. The default "sequence_sum" is log p(tau) of the whole response, as the estimator needs.

    policy_logps: [B, T]; advantages: [B] (one per sequence, e.g. `rloo_advantages`) or [B, T];
    mask: [B, T]. Returns loss [B]; metric reward/advantage (per-token mean advantage, [B]).
    """
    check_same_shape(policy_logps=policy_logps, mask=mask)
    adv = _token_advantages(advantages, policy_logps, mask)
    loss = reduce_token_losses(-adv * fill_masked(policy_logps, mask), mask, reduction, max_tokens)
    metrics = {"reward/advantage": reduce_token_losses(adv, mask, "sequence_mean")}
    return LossOutput(loss, detach_metrics(metrics))


def sampler_mismatch(trainer_logps: Tensor, sampler_logps: Tensor, mask: Tensor) -> dict[str, Tensor]:
    """How far the trainer's log-probs of the sampled tokens are from the sampler's own.

    delta_t = log pi_trainer(y_t | x, y_<t) - log pi_sampler(y_t | x, y_<t) over the real tokens. An RL loop whose
    rollouts come from another engine (vLLM, bfloat16 kernels) is off-policy by delta even "on-policy"
    (Yao et al. 2025, "Your Efficient RL Framework Secretly Brings You Off-Policy RL Training"); with the same
    model and kernels it is float rounding. trainer_logps, sampler_logps, mask: [B, T]. Returns detached
    kl/sampler_mismatch_mean = mean |delta| and kl/sampler_mismatch_max = max |delta| over the real tokens
    (0 when there is none), and kl/sampler_trainer_k1 = the mean of -delta, the k1 estimate of
    KL(sampler || trainer) from the sampler's tokens.
    """
    check_same_shape(trainer_logps=trainer_logps, sampler_logps=sampler_logps, mask=mask)
    delta = (trainer_logps.detach() - sampler_logps.detach())[mask.bool()]
    if delta.numel() == 0:
        zero = torch.zeros((), dtype=trainer_logps.dtype, device=trainer_logps.device)
        return {
            "kl/sampler_mismatch_mean": zero,
            "kl/sampler_mismatch_max": zero,
            "kl/sampler_trainer_k1": zero,
        }
    return {
        "kl/sampler_mismatch_mean": delta.abs().mean(),
        "kl/sampler_mismatch_max": delta.abs().max(),
        "kl/sampler_trainer_k1": (-delta).mean(),
    }


def truncated_importance_weights(
    trainer_logps: Tensor, sampler_logps: Tensor, mask: Tensor, cap: float
) -> Tensor:
    """Truncated importance sampling (TIS) weights of the sampled tokens, w_t = min(pi_trainer / pi_sampler, C).

    Yao et al. 2025 (Eq. 3): the rollouts come from pi_sampler, the update assumes pi_trainer (the old policy as
    the trainer computes it), so each token's policy-gradient term is weighted by their ratio, truncated at C to
    bound the variance. The weights are constants (no gradient). They multiply the advantage: for w > 0,
    w * min(r A, clip(r) A) = min(r (w A), clip(r) (w A)), so PPO's clipped surrogate takes w A unchanged.
    trainer_logps, sampler_logps, mask: [B, T]; cap C > 0. Returns w [B, T], 0 where the mask is False.
    """
    check_positive("cap", cap)
    check_same_shape(trainer_logps=trainer_logps, sampler_logps=sampler_logps, mask=mask)
    ratio = torch.exp(trainer_logps.detach() - sampler_logps.detach())
    return fill_masked(ratio.clamp(max=cap), mask)
