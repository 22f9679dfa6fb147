"""Supervised fine-tuning: token-level negative log-likelihood with masks."""

from __future__ import annotations

from torch import Tensor

from rlhflab.losses.utils import (
    LossOutput,
    as_bool_mask,
    check_same_shape,
    detach_metrics,
    fill_masked,
    masked_mean,
    reduce_token_losses,
)


def sft_nll(
    token_logps: Tensor, mask: Tensor, reduction: str = "token_mean", max_tokens: float | None = None
) -> LossOutput:
    """Negative log-likelihood of the target tokens.

    L = -(1/N) sum_{t in mask} log pi(y_t | y_<t, x)  (InstructGPT's SFT loss; Ouyang et al. 2022
    Sec. 3.5), with the normalization chosen by `reduction`:
    - "token_mean": mean over all real tokens of the batch (the `.mean()` of the [B] output equals it;
      each example's value is its token sum times B / N_tokens);
    - "sequence_mean": mean over each sequence's tokens, then the caller's `.mean()` weighs sequences equally;
    - "sequence_sum": the sequence NLL -log pi(y | x) (ReST's L_NLL, Gulcehre et al. 2023), e.g. for
      best-of-n / ReST;
    - "constant": each sequence's token sum / max_tokens (see `reduce_token_losses`).

    token_logps: [B, T] log-probs of the target tokens (see `gather_logprobs`); mask: [B, T], True = a
    target token (response tokens; prompt and padding False). Returns LossOutput with loss [B] and metrics
    `loss/nll` (per-sequence mean NLL, [B]) and `perf/tokens` (real tokens per sequence, [B]).
    """
    check_same_shape(token_logps=token_logps, mask=mask)
    nll = -fill_masked(token_logps, mask)
    loss = reduce_token_losses(nll, mask, reduction, max_tokens)
    metrics = {
        "loss/nll": masked_mean(nll, mask, dim=-1),
        "perf/tokens": as_bool_mask(mask).sum(-1).to(token_logps.dtype),
    }
    return LossOutput(loss, detach_metrics(metrics))
