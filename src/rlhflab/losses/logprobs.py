"""Log-probabilities of chosen tokens, sequence log-probabilities and entropy.

Shifting is the caller's job: for a causal LM, `logits[:, :-1]` scores `labels[:, 1:]`.
Half-precision inputs are upcast to float32 before any softmax: summing bf16 log-probs over a few hundred
tokens loses whole nats.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from rlhflab.losses.utils import as_bool_mask, check_positive, masked_mean, masked_sum

_HALF = (torch.float16, torch.bfloat16)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
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
        row = torch.where(row_valid[:, None], row_logits.to(_compute_dtype(row_logits.dtype)), 0.0)
        picked = row.gather(-1, row_labels.unsqueeze(-1)).squeeze(-1)
        rows.append(picked - torch.logsumexp(row, dim=-1))
    out = torch.stack(rows).reshape(labels.shape)
    return torch.where(valid, out, torch.zeros((), dtype=out.dtype, device=out.device))


class _ChunkedLabelLogprobs(torch.autograd.Function):
    """log softmax(h W^T + b)[label] chunk by chunk; backward recomputes each chunk's logits.

    Saves only the inputs and one logsumexp per token, so autograd never holds a [N, V] tensor: peak extra
    memory is one [chunk_size, V] block in forward and backward alike.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, chunk_size, temperature):  # type: ignore[override]
        cdtype = _compute_dtype(hidden.dtype)
        n = hidden.shape[0]
        out = torch.empty(n, dtype=cdtype, device=hidden.device)
        lse = torch.empty(n, dtype=cdtype, device=hidden.device)
        for s in range(0, n, chunk_size):
            logits = F.linear(hidden[s:s + chunk_size], weight, bias).to(cdtype) / temperature
            lse[s:s + chunk_size] = torch.logsumexp(logits, dim=-1)
            picked = logits.gather(-1, labels[s:s + chunk_size].unsqueeze(-1)).squeeze(-1)
            out[s:s + chunk_size] = picked - lse[s:s + chunk_size]
        ctx.save_for_backward(hidden, weight, bias, labels, lse)
        ctx.chunk_size, ctx.temperature = chunk_size, temperature
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):  # type: ignore[override]
        hidden, weight, bias, labels, lse = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        grad_h = torch.zeros_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=lse.dtype, device=weight.device) if need_w else None
        grad_b = torch.zeros(bias.shape, dtype=lse.dtype, device=bias.device) if need_b else None
        cs, temp = ctx.chunk_size, ctx.temperature
        for s in range(0, hidden.shape[0], cs):
            h = hidden[s:s + cs]
            logits = F.linear(h, weight, bias).to(lse.dtype) / temp
            g = grad_out[s:s + cs].to(lse.dtype)
            # d/dlogits of (logit[y] - lse) is onehot(y) - softmax, scaled by the incoming gradient.
            grad_logits = -torch.exp(logits - lse[s:s + cs, None]) * g[:, None]
            grad_logits.scatter_add_(-1, labels[s:s + cs, None], g[:, None])
            grad_logits = grad_logits / temp
            if need_h:
                grad_h[s:s + cs] = (grad_logits.to(weight.dtype) @ weight).to(hidden.dtype)
            if need_w:
                grad_w += grad_logits.T @ h.to(lse.dtype)
            if need_b:
                grad_b += grad_logits.sum(0)
        grad_w = grad_w.to(weight.dtype) if need_w else None
        grad_b = grad_b.to(bias.dtype) if need_b else None
        return grad_h, grad_w, grad_b, None, None, None


def chunked_gather_logprobs(
    hidden_states: Tensor,
    lm_head_weight: Tensor,
    labels: Tensor,
    lm_head_bias: Tensor | None = None,
    *,
    chunk_size: int = 1024,
    temperature: float = 1.0,
    ignore_index: int = -100,
) -> Tensor:
    """Label log-probs from hidden states and the LM head, never materializing the [B, T, V] logits.

    hidden_states: [B, T, H] (any leading dims); lm_head_weight: [V, H]; lm_head_bias: [V] or None;
    labels: [B, T]. Returns [B, T] (float32 for half inputs), 0 where label == ignore_index.
    Equals `gather_logprobs(F.linear(h, W, b) / temperature, labels)`, values and gradients (for h, W
    and b), with peak extra memory of one [chunk_size, V] block: forward keeps one logsumexp per token and
    backward recomputes each chunk's logits (a custom autograd Function, Liger-kernel style). First-order
    gradients only (no double backward).
    """
    check_positive("chunk_size", chunk_size)
    check_positive("temperature", temperature)
    if hidden_states.shape[:-1] != labels.shape:
        raise ValueError(f"hidden_states {tuple(hidden_states.shape)} and labels {tuple(labels.shape)} "
                         "disagree")
    valid = labels != ignore_index
    safe = torch.where(valid, labels, torch.zeros_like(labels)).reshape(-1).long()
    # Ignored positions (padding) are zeroed so that nothing there, not even NaN, reaches W's gradient.
    flat_h = torch.where(valid[..., None], hidden_states, 0.0).reshape(-1, hidden_states.shape[-1])
    out = _ChunkedLabelLogprobs.apply(flat_h, lm_head_weight, lm_head_bias, safe, int(chunk_size),
                                      float(temperature))
    out = out.reshape(labels.shape)
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
    z = logits.to(_compute_dtype(logits.dtype))
    probs = torch.softmax(z, dim=-1)
    # A banned token has p = 0 and z = -inf; its term is 0, not 0 * -inf = NaN.
    finite_z = torch.where(probs > 0, z, torch.zeros((), dtype=z.dtype, device=z.device))
    return torch.logsumexp(z, dim=-1) - (probs * finite_z).sum(-1)


def token_mask_from_labels(labels: Tensor, ignore_index: int = -100) -> Tensor:
    """The loss mask implied by labels: True where the label is a real token id."""
    return as_bool_mask(labels != ignore_index)
