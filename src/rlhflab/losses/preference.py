"""Direct preference optimization and its family.

The view of Tang et al. 2024 ("Generalized Preference Optimization"): each offline loss is one convex
function f applied to beta times the log-ratio gap

    h = (log pi(y_c) - log ref(y_c)) - (log pi(y_r) - log ref(y_r)),

logistic f -> DPO, squared -> IPO, hinge -> SLiC. The meaning of beta follows TRL: the DPO loss is
-log sigma(beta * h). Log-probs are per-sequence sums unless a docstring says otherwise (see
`sequence_logps(..., average=True)` for the means that IPO-as-TRL-runs-it, ORPO and SimPO use).

Which inputs each loss needs:

| name                    | reference | inputs beyond the four paired log-probs                          |
|-------------------------|-----------|------------------------------------------------------------------|
| dpo / cdpo / robust_dpo | yes       | label_smoothing (cdpo, robust_dpo)                               |
| ipo, hinge (SLiC)       | yes       | -                                                                |
| kto                     | yes       | unpaired: one log-prob per example, desirable flag, KL estimate  |
| bco                     | yes       | unpaired: one log-prob per example, desirable flag, reward shift |
| orpo                    | no        | length-averaged log-probs; optional chosen NLL                   |
| simpo                   | no        | summed log-probs and response lengths; margin gamma              |
| cpl                     | optional  | per-step log-probs [B, T] with masks; discount gamma, alpha      |

`PREFERENCE_LOSS_TABLE` (at the end) is the one table of these losses: data kind, reference, inputs and the
hyperparameters each takes.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from rlhflab.losses.utils import (
    LossOutput,
    as_bool_mask,
    check_positive,
    check_same_shape,
    check_unit_interval,
    detach_metrics,
    fill_masked,
    masked_sum,
    pair_metrics,
)


def _gap(pc: Tensor, pr: Tensor, rc: Tensor, rr: Tensor) -> Tensor:
    check_same_shape(
        policy_chosen_logps=pc, policy_rejected_logps=pr, ref_chosen_logps=rc, ref_rejected_logps=rr
    )
    return (pc - rc) - (pr - rr)


def implicit_reward_metrics(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    beta: float,
) -> dict[str, Tensor]:
    """DPO's implicit rewards r = beta * (log pi(y) - log ref(y)) as detached [B] metrics.

    (Rafailov et al. 2023, Sec. 5.1: the policy defines a reward up to a prompt-only term.)
    Returns reward/chosen, reward/rejected, reward/margin (chosen - rejected) and reward/accuracy
    (1 where the chosen reward is strictly higher).
    """
    check_same_shape(
        policy_chosen_logps=policy_chosen_logps,
        ref_chosen_logps=ref_chosen_logps,
        policy_rejected_logps=policy_rejected_logps,
        ref_rejected_logps=ref_rejected_logps,
    )
    return pair_metrics(
        beta * (policy_chosen_logps - ref_chosen_logps), beta * (policy_rejected_logps - ref_rejected_logps)
    )


def _logistic(z: Tensor, label_smoothing: float) -> Tensor:
    loss = -F.logsigmoid(z)
    if label_smoothing > 0:
        loss = (1 - label_smoothing) * loss - label_smoothing * F.logsigmoid(-z)
    return loss


def dpo(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
) -> LossOutput:
    """DPO: L = -log sigma(beta * h)   (Rafailov et al. 2023, Eq. 7; f = logistic in Tang et al. 2024).

    With label_smoothing eps > 0 this is conservative DPO, see `cdpo`. All inputs [B] summed sequence
    log-probs. Returns loss [B] and the implicit-reward metrics. Policy == reference gives log 2.
    """
    check_positive("beta", beta)
    check_unit_interval("label_smoothing", label_smoothing, upper_open=True, upper=0.5)
    h = _gap(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    metrics = implicit_reward_metrics(
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta
    )
    return LossOutput(_logistic(beta * h, label_smoothing), metrics)


def cdpo(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    beta: float = 0.1,
    label_smoothing: float = 0.1,
) -> LossOutput:
    """Conservative DPO: L = -(1-eps) log sigma(beta h) - eps log sigma(-beta h)

    (Mitchell 2023, "A note on DPO with noisy preferences & relationship to IPO", Eq. 3): labels are
    assumed flipped with probability eps. Shapes as `dpo`.
    """
    return dpo(
        policy_chosen_logps,
        policy_rejected_logps,
        ref_chosen_logps,
        ref_rejected_logps,
        beta=beta,
        label_smoothing=label_smoothing,
    )


def robust_dpo(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    beta: float = 0.1,
    label_smoothing: float = 0.1,
) -> LossOutput:
    """Robust DPO: an unbiased loss under label noise of rate eps.

    L = [ -(1-eps) log sigma(beta h) + eps log sigma(-beta h) ] / (1 - 2 eps)
    (Chowdhury et al. 2024, "Provably Robust DPO: Aligning Language Models with Noisy Feedback"; TRL's
    loss_type="robust".) eps must be < 0.5; the loss can be negative for eps > 0. Shapes as `dpo`.
    """
    check_positive("beta", beta)
    check_unit_interval("label_smoothing", label_smoothing, upper_open=True, upper=0.5)
    h = _gap(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    eps = label_smoothing
    loss = (-(1 - eps) * F.logsigmoid(beta * h) + eps * F.logsigmoid(-beta * h)) / (1 - 2 * eps)
    metrics = implicit_reward_metrics(
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta
    )
    return LossOutput(loss, metrics)


def ipo(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    beta: float = 0.1,
) -> LossOutput:
    """IPO: L = (h - 1/(2 beta))^2, minimal at h = 1/(2 beta)

    (Azar et al. 2023, "A General Theoretical Paradigm to Understand Learning from Human Preferences",
    arXiv 2310.12036v2 Eq. 17, with beta = tau, as TRL.) In Tang et al. 2024's form this is a squared f:
    (h - 1/(2 beta))^2 = (beta h - 1/2)^2 / beta^2. The paper sums token log-probs; TRL averages them per
    token for IPO. Pass whichever you mean (`sequence_logps(..., average=...)`); the beta that works
    differs by roughly the response length between the two. Shapes as `dpo`.
    """
    check_positive("beta", beta)
    h = _gap(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    metrics = implicit_reward_metrics(
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta
    )
    return LossOutput((h - 1 / (2 * beta)) ** 2, metrics)


def hinge(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    beta: float = 0.1,
) -> LossOutput:
    """SLiC / hinge: L = max(0, 1 - beta h)

    (Zhao et al. 2023, "SLiC-HF", the rank-calibration loss max(0, delta - log P(y_c) + log P(y_r)) with
    delta = 1/beta, scaled by beta and applied to reference-normalized log-ratios as in TRL and
    Tang et al. 2024's hinge f.) Shapes as `dpo`.
    """
    check_positive("beta", beta)
    h = _gap(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    metrics = implicit_reward_metrics(
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta
    )
    return LossOutput(torch.relu(1 - beta * h), metrics)


def kto_kl_estimate(policy_kl_logps: Tensor, ref_kl_logps: Tensor) -> Tensor:
    """KTO's reference point z0 = max(0, mean(log pi(y'|x) - log ref(y'|x))), detached (0-dim).

    policy_kl_logps, ref_kl_logps: [M] summed log-probs of mismatched pairs (x, y'), y' a completion of
    another prompt in the batch (Ethayarajh et al. 2024, KTO). Average it across processes
    before passing it to `kto` when training data-parallel.
    """
    check_same_shape(policy_kl_logps=policy_kl_logps, ref_kl_logps=ref_kl_logps)
    return (policy_kl_logps - ref_kl_logps).mean().clamp(min=0).detach()


def kto(
    policy_logps: Tensor,
    ref_logps: Tensor,
    desirable: Tensor,
    kl_estimate: Tensor | float,
    beta: float = 0.1,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> LossOutput:
    """KTO on unpaired feedback: each completion is labelled desirable or undesirable.

    r = log pi(y|x) - log ref(y|x), z0 = the KL estimate (see `kto_kl_estimate`)
    L = lambda_D (1 - sigma(beta (r - z0)))  if desirable
        lambda_U (1 - sigma(beta (z0 - r)))  otherwise
    (Ethayarajh et al. 2024, "KTO: Model Alignment as Prospect Theoretic Optimization", the KTO loss;
    TRL's KTOTrainer.) z0 is treated as a constant (no gradient).

    policy_logps, ref_logps: [B] summed log-probs; desirable: [B] bool; kl_estimate: 0-dim or float.
    Returns loss [B]; metrics reward/implicit (beta * r), reward/desirable (the flag as float) and
    kl/reference_point (z0, broadcast to [B]).
    """
    check_positive("beta", beta)
    check_same_shape(policy_logps=policy_logps, ref_logps=ref_logps, desirable=desirable)
    z0 = torch.as_tensor(kl_estimate, dtype=policy_logps.dtype, device=policy_logps.device).detach()
    r = policy_logps - ref_logps
    good = as_bool_mask(desirable)
    value = torch.where(good, torch.sigmoid(beta * (r - z0)), torch.sigmoid(beta * (z0 - r)))
    weight = torch.where(good, torch.full_like(r, desirable_weight), torch.full_like(r, undesirable_weight))
    metrics = {
        "reward/implicit": beta * r,
        "reward/desirable": good.to(r.dtype),
        "kl/reference_point": z0.expand_as(r),
    }
    return LossOutput(weight * (1 - value), detach_metrics(metrics))


def bco(
    policy_logps: Tensor,
    ref_logps: Tensor,
    desirable: Tensor,
    reward_shift: Tensor | float,
    beta: float = 0.1,
) -> LossOutput:
    """BCO on unpaired feedback: a binary classifier of desirable vs undesirable completions whose logit is
    the implicit reward minus a reward shift.

    r = beta (log pi(y|x) - log ref(y|x)), delta = the reward shift (see `BCORewardShift`)
    L = -log sigma(r - delta)       if desirable
        -log sigma(-(r - delta))    otherwise
    (Jung et al. 2024, "Binary Classifier Optimization for Large Language Model Alignment", arXiv
    2404.04656: this binary cross-entropy bounds the DPO loss from above, and shifting the reward by the
    mean implicit reward tightens the bound; TRL's BCOTrainer.) Unlike KTO's z0, delta is in reward units
    (after beta) and is a constant here (no gradient). Policy == reference with delta = 0 gives log 2.
    The paper's underlying-distribution matching (a density-ratio weight on undesirable examples) is not
    part of this loss.

    policy_logps, ref_logps: [B] summed log-probs; desirable: [B] bool; reward_shift: 0-dim or float.
    Returns loss [B]; metrics reward/implicit (r), reward/desirable (the flag as float) and reward/shift
    (delta, broadcast to [B]).
    """
    check_positive("beta", beta)
    check_same_shape(policy_logps=policy_logps, ref_logps=ref_logps, desirable=desirable)
    delta = torch.as_tensor(reward_shift, dtype=policy_logps.dtype, device=policy_logps.device).detach()
    r = beta * (policy_logps - ref_logps)
    good = as_bool_mask(desirable)
    logit = r - delta
    loss = -F.logsigmoid(torch.where(good, logit, -logit))
    metrics = {"reward/implicit": r, "reward/desirable": good.to(r.dtype), "reward/shift": delta.expand_as(r)}
    return LossOutput(loss, detach_metrics(metrics))


class BCORewardShift:
    """BCO's reward shift delta: the running mean of every implicit reward r = beta log pi/ref seen so far,
    desirable and undesirable pooled (Jung et al. 2024; TRL's BCOTrainer keeps it in `RunningMoments`).

    delta_n = (sum of the n rewards seen) / n, 0 before the first update. A stage passes `.value` to `bco`
    and calls `update` with the step's rewards after the step's forward passes, so delta lags one step:
    the step's gradient then does not depend on how the batch is split into micro-batches (TRL folds each
    micro-batch in before its loss). `state_dict` / `load_state_dict` carry it across --resume.
    """

    def __init__(self) -> None:
        self.value = 0.0
        self.count = 0

    def update(self, rewards: Tensor) -> float:
        """Fold a batch of implicit rewards (any shape, detached) into the mean; returns the new delta."""
        n = rewards.numel()
        total = float(rewards.detach().double().sum()) if n else 0.0
        if not math.isfinite(total):
            raise ValueError(
                f"BCO rewards are not finite ({total}); check the policy and reference log-probs"
            )
        if n:
            self.value = (self.value * self.count + total) / (self.count + n)
            self.count += n
        return self.value

    def state_dict(self) -> dict[str, float]:
        return {"value": self.value, "count": self.count}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.value = float(state["value"])
        self.count = int(state["count"])


def _log1mexp(x: Tensor) -> Tensor:
    # log(1 - exp(x)) for x < 0, accurate at both ends (Maechler 2012).
    return torch.where(x > -0.6931471805599453, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def orpo(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    beta: float = 0.1,
    chosen_nll: Tensor | None = None,
) -> LossOutput:
    """ORPO: SFT on the chosen response plus an odds-ratio preference term, no reference model.

    odds(y) = P(y) / (1 - P(y)), P(y) = exp(mean_t log pi(y_t | ...))
    L = NLL(y_c) - beta * log sigma(log odds(y_c) - log odds(y_r))
    (Hong et al. 2024, "ORPO: Monolithic Preference Optimization without Reference Model", L_SFT + lambda
    L_OR with lambda = beta, as TRL.)

    policy_chosen_logps, policy_rejected_logps: [B] length-AVERAGED log-probs (< 0). chosen_nll: [B] the
    SFT loss of the chosen response; defaults to -policy_chosen_logps (the token-mean NLL). Returns loss
    [B]; metrics loss/nll, loss/odds_ratio, reward/log_odds_ratio and the reward/* margin metrics with
    rewards beta * average log-prob.
    """
    check_positive("beta", beta)
    check_same_shape(policy_chosen_logps=policy_chosen_logps, policy_rejected_logps=policy_rejected_logps)
    # P(y) = 1 makes the odds infinite; nudge it just below 1 instead of returning inf.
    lc = policy_chosen_logps.clamp(max=-1e-6)
    lr = policy_rejected_logps.clamp(max=-1e-6)
    log_odds = (lc - _log1mexp(lc)) - (lr - _log1mexp(lr))
    or_loss = -F.logsigmoid(log_odds)
    nll = -policy_chosen_logps if chosen_nll is None else chosen_nll
    metrics = pair_metrics(beta * policy_chosen_logps, beta * policy_rejected_logps)
    metrics.update(
        detach_metrics({"loss/nll": nll, "loss/odds_ratio": or_loss, "reward/log_odds_ratio": log_odds})
    )
    return LossOutput(nll + beta * or_loss, metrics)


def simpo(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    chosen_lengths: Tensor,
    rejected_lengths: Tensor,
    beta: float = 2.0,
    gamma: float = 0.5,
    label_smoothing: float = 0.0,
) -> LossOutput:
    """SimPO: length-normalized, reference-free, with a target margin gamma.

    L = -log sigma( beta/|y_c| log pi(y_c) - beta/|y_r| log pi(y_r) - gamma )
    (Meng et al. 2024, "SimPO: Simple Preference Optimization with a Reference-Free Reward".)
    gamma is the absolute margin (TRL's CPO `simpo_gamma`; the paper tunes gamma/beta around 0.5).

    policy_chosen_logps, policy_rejected_logps: [B] SUMMED log-probs; chosen_lengths, rejected_lengths:
    [B] response token counts. Returns loss [B]; reward/* metrics with rewards beta * average log-prob.
    """
    check_positive("beta", beta)
    check_unit_interval("label_smoothing", label_smoothing, upper_open=True, upper=0.5)
    check_same_shape(
        policy_chosen_logps=policy_chosen_logps,
        policy_rejected_logps=policy_rejected_logps,
        chosen_lengths=chosen_lengths,
        rejected_lengths=rejected_lengths,
    )
    rc = beta * policy_chosen_logps / chosen_lengths.to(policy_chosen_logps.dtype).clamp(min=1)
    rr = beta * policy_rejected_logps / rejected_lengths.to(policy_rejected_logps.dtype).clamp(min=1)
    return LossOutput(_logistic(rc - rr - gamma, label_smoothing), pair_metrics(rc, rr))


def _discounted_segment_score(logps: Tensor, mask: Tensor, ref: Tensor | None, gamma: float) -> Tensor:
    # Discount by the index among real steps (not the raw position), so left padding changes nothing.
    mask = as_bool_mask(mask)
    step = (mask.cumsum(-1) - 1).clamp(min=0).to(logps.dtype)
    ratio = fill_masked(logps if ref is None else logps - fill_masked(ref, mask), mask)
    return masked_sum(gamma**step * ratio, mask, dim=-1)


def cpl(
    chosen_logps: Tensor,
    chosen_mask: Tensor,
    rejected_logps: Tensor,
    rejected_mask: Tensor,
    alpha: float = 0.1,
    gamma: float = 1.0,
    ref_chosen_logps: Tensor | None = None,
    ref_rejected_logps: Tensor | None = None,
    conservative_lambda: float = 1.0,
) -> LossOutput:
    """Contrastive Preference Learning over segments of (state, action) steps.

    S(sigma) = sum_t gamma^t alpha log pi(a_t | s_t)   (t = 0, 1, ... over the segment's real steps;
               with reference log-probs mu: alpha log pi/mu, the KL-to-reference form)
    L = -log [ exp S(sigma+) / (exp S(sigma+) + exp(lambda S(sigma-))) ] = -log sigma(S+ - lambda S-)
    (Hejna et al. 2023, "Contrastive Preference Learning: Learning from Human Feedback without RL"; lambda
    < 1 is the paper's conservative bias, lambda = 1 the plain CPL loss.)
    One step with gamma = 1 and no reference is DPO with beta = alpha and zero reference log-probs.

    chosen_logps: [B, T+] per-step log-probs of the preferred segment, chosen_mask: [B, T+] (True = a
    real step); rejected_*: [B, T-]; optional ref_* like the policy ones. Returns loss [B]; reward/*
    metrics with rewards S+ and S-.
    """
    check_positive("alpha", alpha)
    check_unit_interval("gamma", gamma)
    check_unit_interval("conservative_lambda", conservative_lambda)
    check_same_shape(chosen_logps=chosen_logps, chosen_mask=chosen_mask)
    check_same_shape(rejected_logps=rejected_logps, rejected_mask=rejected_mask)
    s_pos = alpha * _discounted_segment_score(chosen_logps, chosen_mask, ref_chosen_logps, gamma)
    s_neg = alpha * _discounted_segment_score(rejected_logps, rejected_mask, ref_rejected_logps, gamma)
    return LossOutput(-F.logsigmoid(s_pos - conservative_lambda * s_neg), pair_metrics(s_pos, s_neg))


@dataclass(frozen=True)
class PreferenceLoss:
    """One row of the table of preference losses: what a trainer needs to know to run the loss.

    fn:         the loss function of this module.
    data:       the records it trains on: "pairwise" (prompt, chosen, rejected) or "unpaired" (prompt,
                completion, desirable label).
    reference:  whether it needs a reference policy's log-probs.
    inputs:     the log-probs `fn` takes, in its argument order:
                "sums"         policy chosen, policy rejected, reference chosen, reference rejected: summed over
                               response tokens (per-token means where the trainer averages, see `average`)
                "means"        policy chosen, policy rejected: per-token means
                "sums_lengths" policy chosen, policy rejected sums, then chosen and rejected token counts
                "tokens"       chosen token log-probs [B, T], chosen mask, rejected ones, rejected mask
                "unpaired"     policy, reference, desirable flags, KL estimate (`kto_kl_estimate`)
                "unpaired_shift" policy, reference, desirable flags, reward shift (`BCORewardShift.value`)
    params:     {hyperparameter name: keyword of `fn`}; the names are the trainer's settings (the DPO
                stage's algo keys), so one name has one meaning across losses.
    average:    whether summed log-probs may be replaced by per-token means ("sums" inputs only).
    cite:       the paper and equation.
    """

    fn: Callable[..., LossOutput]
    data: str
    reference: bool
    inputs: str
    params: dict[str, str]
    average: bool = False
    cite: str = ""


_DPO_PARAMS = {"beta": "beta", "label_smoothing": "label_smoothing"}

# The one table of preference losses (name -> how to run it). Trainers, config validation and the list in
# docs/losses.md are derived from it: adding a loss means a function above and a row here.
PREFERENCE_LOSS_TABLE: dict[str, PreferenceLoss] = {
    "dpo": PreferenceLoss(dpo, "pairwise", True, "sums", _DPO_PARAMS, True, "Rafailov et al. 2023, Eq. 7"),
    "cdpo": PreferenceLoss(cdpo, "pairwise", True, "sums", _DPO_PARAMS, True, "Mitchell 2023, Eq. 3"),
    "robust_dpo": PreferenceLoss(
        robust_dpo, "pairwise", True, "sums", _DPO_PARAMS, True, "Chowdhury et al. 2024"
    ),
    "ipo": PreferenceLoss(ipo, "pairwise", True, "sums", {"beta": "beta"}, True, "Azar et al. 2023, Eq. 17"),
    "hinge": PreferenceLoss(
        hinge, "pairwise", True, "sums", {"beta": "beta"}, True, "Zhao et al. 2023 (SLiC-HF)"
    ),
    "kto": PreferenceLoss(
        kto,
        "unpaired",
        True,
        "unpaired",
        {
            "beta": "beta",
            "kto_desirable_weight": "desirable_weight",
            "kto_undesirable_weight": "undesirable_weight",
        },
        cite="Ethayarajh et al. 2024",
    ),
    "bco": PreferenceLoss(bco, "unpaired", True, "unpaired_shift", {"beta": "beta"}, cite="Jung et al. 2024"),
    "orpo": PreferenceLoss(
        orpo, "pairwise", False, "means", {"orpo_lambda": "beta"}, cite="Hong et al. 2024"
    ),
    "simpo": PreferenceLoss(
        simpo,
        "pairwise",
        False,
        "sums_lengths",
        {"simpo_beta": "beta", "simpo_gamma": "gamma", "label_smoothing": "label_smoothing"},
        cite="Meng et al. 2024",
    ),
    "cpl": PreferenceLoss(
        cpl,
        "pairwise",
        False,
        "tokens",
        {"cpl_alpha": "alpha", "cpl_gamma": "gamma", "cpl_lambda": "conservative_lambda"},
        cite="Hejna et al. 2023",
    ),
}


def preference_loss_markdown() -> str:
    """The table as markdown (docs/losses.md carries it verbatim; a test keeps the two in step)."""
    lines = [
        "| loss | function | data | reference | log-probs | hyperparameters | source |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, row in PREFERENCE_LOSS_TABLE.items():
        params = ", ".join(f"`{k}`" for k in row.params) + (", `average_logps`" if row.average else "")
        lines.append(
            f"| `{name}` | `{row.fn.__name__}` | {row.data} | {'yes' if row.reference else 'no'} | "
            f"{row.inputs} | {params} | {row.cite} |"
        )
    return "\n".join(lines) + "\n"


@dataclass
class PreferenceInputs:
    """Response log-probs of one batch. Paired data: R = 2B rows, chosen rows 0..B-1 then rejected rows
    B..2B-1; unpaired data: R = B rows.

    policy_logps [R] summed over response tokens; lengths [R] response token counts; token_logps [R, T]
    per-token (0 off the response) with token_mask [R, T]; ref_logps [R] summed (None without a
    reference); desirable [B] bool (unpaired losses only); kl_estimate 0-dim (KTO); reward_shift, BCO's delta.
    """

    policy_logps: Tensor
    lengths: Tensor
    token_logps: Tensor
    token_mask: Tensor
    ref_logps: Tensor | None = None
    desirable: Tensor | None = None
    kl_estimate: Tensor | None = None
    reward_shift: Tensor | float | None = None


def _halves(x: Tensor) -> tuple[Tensor, Tensor]:
    b = x.shape[0] // 2
    return x[:b], x[b:]


def _run_unpaired(row: PreferenceLoss, x: PreferenceInputs, beta: float, kw: dict) -> LossOutput:
    if row.inputs == "unpaired_shift":  # BCO: the implicit reward against the reward shift delta
        if x.reward_shift is None:
            raise ValueError("bco needs PreferenceInputs.reward_shift")  # a trainer bug, not user input
        out = row.fn(x.policy_logps, x.ref_logps, x.desirable, x.reward_shift, **kw)
        threshold = out.metrics["reward/shift"]
        extra = {"reward/implicit": out.metrics["reward/implicit"], "reward/shift": threshold}
    else:  # KTO: beta r against beta z0
        out = row.fn(x.policy_logps, x.ref_logps, x.desirable, x.kl_estimate, **kw)
        z0 = out.metrics["kl/reference_point"]
        threshold, extra = beta * z0, {"kl/reference_point": z0}
    implicit, good = out.metrics["reward/implicit"], x.desirable.bool()
    nan = torch.full_like(implicit, float("nan"))
    # NaN marks "not this kind": a trainer's metric means skip it, giving per-kind means.
    metrics = {
        "reward/chosen": torch.where(good, implicit, nan),
        "reward/rejected": torch.where(good, nan, implicit),
        "reward/accuracy": ((implicit > threshold) == good).to(implicit.dtype),
        **extra,
    }
    return LossOutput(out.loss, metrics)


def run_preference_loss(row: PreferenceLoss, x: PreferenceInputs, settings: Mapping[str, Any]) -> LossOutput:
    """Run one row of `PREFERENCE_LOSS_TABLE` on a batch's log-probs.

    `row.inputs` says which log-probs its function takes; `settings` holds the hyperparameters by name
    (`row.params` maps each to the function's keyword; "average_logps" switches "sums" rows to per-token
    means). Returns the function's LossOutput (unpaired losses: with per-kind reward/chosen, reward/rejected,
    NaN for the other kind, and reward/accuracy = the share on the right side of beta * z0 (KTO) or of
    delta (BCO); BCO also returns reward/implicit [B], which its trainer folds into `BCORewardShift`).
    """
    kw = {keyword: settings[key] for key, keyword in row.params.items()}
    lengths = x.lengths.clamp(min=1).to(x.policy_logps.dtype)
    if row.inputs == "sums":
        policy, ref = x.policy_logps, x.ref_logps
        if settings.get("average_logps", False):
            policy, ref = policy / lengths, ref / lengths
        return row.fn(*_halves(policy), *_halves(ref), **kw)
    if row.inputs == "means":
        return row.fn(*_halves(x.policy_logps / lengths), **kw)
    if row.inputs == "sums_lengths":
        return row.fn(*_halves(x.policy_logps), *_halves(x.lengths), **kw)
    if row.inputs == "tokens":
        (chosen, rejected), (chosen_mask, rejected_mask) = _halves(x.token_logps), _halves(x.token_mask)
        return row.fn(chosen, chosen_mask, rejected, rejected_mask, **kw)
    if row.inputs in ("unpaired", "unpaired_shift"):
        return _run_unpaired(row, x, settings["beta"], kw)
    raise ValueError(f"unknown loss inputs {row.inputs!r}")  # a bug in the table, not user input
