"""Log-probabilities of chosen tokens, sequence log-probabilities and entropy.

Shifting is the caller's job: for a causal LM, `logits[:, :-1]` scores `labels[:, 1:]`.
Half-precision inputs are upcast to float32 before any softmax: summing bf16 log-probs over a few hundred
tokens loses whole nats.
"""

from __future__ import annotations

import torch
from torch import Tensor

from rlhflab.losses.utils import as_bool_mask, masked_mean, masked_sum

_HALF = (torch.float16, torch.bfloat16)


def logprob_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype log-probs are computed in: float32 for half-precision inputs (their log-softmax loses digits)."""
    return torch.promote_types(dtype, torch.float32)


def gather_logprobs(logits: Tensor, labels: Tensor, *, ignore_index: int = -100) -> Tensor:
    """log softmax(logits)[label] for every position, without keeping a [.., V] log-softmax around.

    logits: [B, T, V] (any leading dims); labels: [B, T] token ids. Returns [B, T] (float32 for half
    inputs, else the logits dtype); positions whose label is `ignore_index` get 0.
    Computes `logit[label] - logsumexp(logits)` one batch row at a time, which is exact, stable for any
    logit scale, and keeps peak extra memory at one row of [T, V].
    """
    if logits.shape[:-1] != labels.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and labels {tuple(labels.shape)} disagree")
    valid = labels != ignore_index
    safe_labels = torch.where(valid, labels, torch.zeros_like(labels))
    if logits.dim() < 2:
        raise ValueError(f"logits must be [..., T, V], got {tuple(logits.shape)}")
    flat_logits = logits.reshape(-1, *logits.shape[-2:])
    flat_labels = safe_labels.reshape(flat_logits.shape[:-1]).long()
    flat_valid = valid.reshape(flat_labels.shape)
    rows = []
    for row_logits, row_labels, row_valid in zip(flat_logits, flat_labels, flat_valid):
        # Zero the ignored positions first: NaN logits there (a fully masked attention row) would
        # otherwise turn the zero gradient of those positions into NaN.
        row = torch.where(row_valid[:, None], row_logits.to(logprob_dtype(row_logits.dtype)), 0.0)
        picked = row.gather(-1, row_labels.unsqueeze(-1)).squeeze(-1)
        rows.append(picked - torch.logsumexp(row, dim=-1))
    out = torch.stack(rows).reshape(labels.shape)
    return torch.where(valid, out, torch.zeros((), dtype=out.dtype, device=out.device))


def sequence_logps(token_logps: Tensor, mask: Tensor, average: bool = False) -> Tensor:
    """Per-sequence log-probability: sum (or mean, with average=True) of token log-probs over the mask.

    token_logps, mask: [B, T]. Returns [B]. DPO uses the sum; IPO (as TRL runs it), ORPO and SimPO the mean.
    """
    return masked_mean(token_logps, mask, dim=-1) if average else masked_sum(token_logps, mask, dim=-1)


def entropy_from_logits(logits: Tensor) -> Tensor:
    """Entropy of softmax(logits) at every position: H = logsumexp(z) - sum_v softmax(z)_v z_v.

    logits: [B, T, V] (any leading dims). Returns [B, T] (float32 for half inputs). Stable for any logit
    scale and for -inf logits (banned tokens): no log of a probability is ever taken.
    """
    z = logits.to(logprob_dtype(logits.dtype))
    probs = torch.softmax(z, dim=-1)
    # A banned token has p = 0 and z = -inf; its term is 0, not 0 * -inf = NaN.
    finite_z = torch.where(probs > 0, z, torch.zeros((), dtype=z.dtype, device=z.device))
    return torch.logsumexp(z, dim=-1) - (probs * finite_z).sum(-1)


def token_mask_from_labels(labels: Tensor, ignore_index: int = -100) -> Tensor:
    """The loss mask implied by labels: True where the label is a real token id."""
    return as_bool_mask(labels != ignore_index)
