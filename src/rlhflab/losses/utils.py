"""Masked reductions, whitening and the output types shared by every loss.

Mask polarity everywhere: True (or 1) marks a real token that counts; False (or 0) marks padding or a
prompt token. Masked positions are removed with `torch.where`, never by multiplying with the mask, so
that whatever sits there (huge numbers, inf, NaN from a padded forward pass) cannot leak into a result.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from rlhflab.errors import ConfigError

REDUCTIONS = ("sequence_mean", "sequence_sum", "token_mean", "constant")


class LossOutput(NamedTuple):
    """What every loss returns.

    loss: [B] per-example loss with gradient; the caller reduces it (usually `.mean()`).
    metrics: name -> detached tensor, [B] per example unless the docstring says otherwise; names live in
        the `loss/*`, `reward/*`, `kl/*` namespaces.
    """

    loss: Tensor
    metrics: dict[str, Tensor]


class RewardOutput(NamedTuple):
    """What reward transforms (KL shaping, reward combinations) return.

    rewards: the transformed rewards, shape documented by the function.
    metrics: name -> detached tensor, [B] per example.
    """

    rewards: Tensor
    metrics: dict[str, Tensor]


def detach_metrics(metrics: dict[str, Tensor]) -> dict[str, Tensor]:
    """Detach every tensor of a metrics dict (metrics must never carry gradient)."""
    return {k: v.detach() for k, v in metrics.items()}


def as_bool_mask(mask: Tensor) -> Tensor:
    """A bool view of a 0/1 or bool mask (True = counts)."""
    return mask if mask.dtype == torch.bool else mask != 0


def fill_masked(x: Tensor, mask: Tensor, value: float = 0.0) -> Tensor:
    """`x` with every masked-out position replaced by `value`.

    Losses call this on their inputs first, so padding never enters any arithmetic: no inf or NaN can
    reach the forward result, and the gradient at a masked position is exactly 0.
    """
    return torch.where(as_bool_mask(mask), x, torch.full((), value, dtype=x.dtype, device=x.device))


def check_same_shape(**tensors: Tensor) -> None:
    """Raise ValueError naming the tensors when their shapes differ (a caller bug, not user input)."""
    shapes = {name: tuple(t.shape) for name, t in tensors.items()}
    if len(set(shapes.values())) > 1:
        raise ValueError(f"shape mismatch: {shapes}")


def check_positive(name: str, value: float) -> None:
    if not value > 0:
        raise ConfigError(f"{name} must be > 0, got {value}; set a positive value.")


def check_unit_interval(name: str, value: float, *, upper_open: bool = False, upper: float = 1.0) -> None:
    ok = 0.0 <= value < upper if upper_open else 0.0 <= value <= upper
    if not ok:
        bracket = ")" if upper_open else "]"
        raise ConfigError(f"{name} must be in [0, {upper}{bracket}, got {value}.")


def masked_sum(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Sum of `x` over positions where `mask` is True.

    x: any shape; mask: broadcastable to x. dim None sums everything (0-dim result).
    """
    kept = torch.where(as_bool_mask(mask), x, torch.zeros((), dtype=x.dtype, device=x.device))
    return kept.sum() if dim is None else kept.sum(dim)


def _count(x: Tensor, mask: Tensor, dim: int | None) -> Tensor:
    m = torch.broadcast_to(as_bool_mask(mask), x.shape).to(x.dtype)
    return m.sum() if dim is None else m.sum(dim)


def masked_mean(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Mean of `x` over positions where `mask` is True; 0 where nothing counts.

    x: any shape; mask: broadcastable to x. dim None averages everything (0-dim result).
    """
    count = _count(x, mask, dim)
    safe = torch.where(count > 0, count, torch.ones_like(count))
    return masked_sum(x, mask, dim) / safe


def masked_var(x: Tensor, mask: Tensor, unbiased: bool = True, dim: int | None = None) -> Tensor:
    """Variance of `x` over the masked positions.

    unbiased applies Bessel's correction n / (n - 1); with a single counted element the variance is 0.
    """
    x = fill_masked(x, mask)
    mean = masked_mean(x, mask, dim)
    centered = x - (mean if dim is None else mean.unsqueeze(dim))
    var = masked_mean(centered * centered, mask, dim)
    if unbiased:
        n = _count(x, mask, dim)
        var = var * torch.where(n > 1, n / (n - 1).clamp(min=1), torch.zeros_like(n))
    return var


def masked_whiten(x: Tensor, mask: Tensor, shift_mean: bool = True, eps: float = 1e-8) -> Tensor:
    """Whiten `x` with the mean and (unbiased) variance of its masked positions; masked positions become 0.

    shift_mean=False keeps the mean (only rescales), as AlpacaFarm does for rewards (Dubois et al. 2023).
    """
    x = fill_masked(x, mask)
    mean = masked_mean(x, mask)
    var = masked_var(x, mask, unbiased=True)
    whitened = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        whitened = whitened + mean
    return fill_masked(whitened, mask)


def reduce_token_losses(
    token_losses: Tensor, mask: Tensor, reduction: str = "sequence_mean", max_tokens: float | None = None
) -> Tensor:
    """Reduce per-token losses l [B, T] to per-example losses x [B] whose `.mean()` is the batch loss.

    With L_i the real tokens of sequence i and N = sum_i L_i those of the call:

    | reduction       | x_i                       | x.mean() =                          | source          |
    |-----------------|---------------------------|-------------------------------------|-----------------|
    | "sequence_mean" | (1/L_i) sum_t l_it        | (1/B) sum_i (1/L_i) sum_t l_it:     | GRPO, Shao et   |
    |                 |                           | every sequence weighs the same      | al. 2024, Eq. 3 |
    | "sequence_sum"  | sum_t l_it                | (1/B) sum_i sum_t l_it              | REINFORCE       |
    | "token_mean"    | (B/N) sum_t l_it          | (1/N) sum_i sum_t l_it: every token | DAPO, Yu et al. |
    |                 |                           | weighs the same                     | 2025            |
    | "constant"      | (1/max_tokens) sum_t l_it | (1/B) sum_i sum_t l_it / max_tokens | Dr. GRPO, Liu   |
    |                 |                           |                                     | et al. 2025     |

    Only "sequence_mean" divides a sequence by its own length, which gives each token of a long sequence
    less weight (the length bias Liu et al. 2025 point out); "constant" divides every sequence by the same
    number (normally the generation limit), so the gradient is the plain sum up to one fixed scale.

    Gradient accumulation: every reduction except "token_mean" is per example, so micro-batch outputs
    summed and divided by the whole batch's B give the batch loss. "token_mean" uses this call's N; for
    micro-batches use "constant" with max_tokens = N_batch / B_batch (the whole batch's mean real length),
    which gives x_i = (B_batch / N_batch) sum_t l_it, then sum over micro-batches and divide by B_batch.

    max_tokens: the constant of "constant" (> 0); refused with the other reductions, which ignore it.
    """
    if reduction not in REDUCTIONS:
        raise ConfigError(f"unknown reduction {reduction!r}; choose one of {', '.join(REDUCTIONS)}.")
    if reduction == "constant":
        if max_tokens is None:
            raise ConfigError('reduction "constant" needs max_tokens (e.g. the generation limit).')
        check_positive("max_tokens", max_tokens)
    elif max_tokens is not None:
        raise ConfigError(f'max_tokens is used only by reduction "constant", not {reduction!r}; drop it.')
    token_losses = fill_masked(token_losses, mask)
    if reduction == "sequence_mean":
        return masked_mean(token_losses, mask, dim=-1)
    sums = masked_sum(token_losses, mask, dim=-1)
    if reduction == "sequence_sum":
        return sums
    if reduction == "constant":
        return sums / max_tokens
    n_tokens = _count(token_losses, mask, None).clamp(min=1)
    return sums * (sums.shape[0] / n_tokens)


def pair_metrics(chosen: Tensor, rejected: Tensor) -> dict[str, Tensor]:
    """The detached `reward/*` metrics of scored pairs: chosen, rejected, margin, and accuracy (margin > 0)."""
    margin = chosen - rejected
    return detach_metrics(
        {
            "reward/chosen": chosen,
            "reward/rejected": rejected,
            "reward/margin": margin,
            "reward/accuracy": (margin > 0).to(chosen.dtype),
        }
    )
