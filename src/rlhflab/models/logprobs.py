"""Token log-probs of a causal LM, computed only where they are needed, and the LM-head kernels behind them.

A causal LM's cost on a small model is dominated by the LM head (hidden x vocab per position). SFT, DPO
and PPO only need log-probs of response tokens, so we run the base transformer over the whole sequence
and apply the head only at response positions, never holding [B, T, V] at once.

When gradients are needed and the softmax of those positions fits `SAVED_PROBS_BYTES`, the head's
forward keeps it for the backward (`_HeadLogps`): the backward is then two matmuls and one pass over the
probabilities instead of recomputing the logits (a third matmul, an exp and a subtraction over [N, V]).
Above the budget, the chunked path of `rlhflab.losses` recomputes chunk by chunk; without gradients
nothing is kept (one [chunk_size, V] block at a time).

"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from rlhflab.losses.logprobs import gather_logprobs, logprob_dtype
from rlhflab.losses.utils import check_positive
from rlhflab.models.backbone import backbone_and_head, hidden_to_logits, position_ids_from_mask

# Largest softmax (float32, [N, V]) the head keeps for its backward: 16 rows x ~50 response tokens of a
# 49k vocabulary is ~150 MB; a larger one is recomputed chunk by chunk instead (one more head matmul).
SAVED_PROBS_BYTES = 256 * 2**20
# Default chunk: rows of logits per [rows, V] float32 block. Measured on 2 cores (32 MB L3, V = 49k): 256-341
# rows (50-64 MB) beat both 85 rows (small matmuls) and 1024 (every pass over the block goes to memory).
CHUNK_BYTES = 64 * 2**20


def _head_is_plain_linear(model: torch.nn.Module, head: torch.nn.Module) -> bool:
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    scaled = getattr(config, "logit_scale", None) not in (None, 1.0) or getattr(
        config, "final_logit_softcapping", None
    )
    return isinstance(head, torch.nn.Linear) and not scaled


def _exp_logits(
    block: Tensor, hidden: Tensor, weight: Tensor, bias: Tensor | None, labels: Tensor, temperature: float
) -> tuple[Tensor, Tensor]:
    """Write exp(logits - max) of one chunk into `block` [r, V] (in place); return (label log-probs [r],
    1 / sum of the exps [r]), so that softmax = block * that and nothing else is allocated at [r, V]."""
    if weight.dtype == hidden.dtype == block.dtype and (bias is None or bias.dtype == block.dtype):
        torch.mm(hidden, weight.T, out=block) if bias is None else torch.addmm(
            bias, hidden, weight.T, out=block
        )
    else:  # half precision: the matmul in the model's dtype, the softmax in float32
        block.copy_(F.linear(hidden, weight, bias))
    if temperature != 1.0:
        block.div_(temperature)
    picked = block.gather(1, labels[:, None]).squeeze(1)
    top = block.amax(1)
    block.sub_(top[:, None]).exp_()
    total = block.sum(1)
    return picked - top - total.log(), total.reciprocal()


class _HeadLogps(torch.autograd.Function):
    """log softmax((h W^T + b) / temperature)[label] at N positions, keeping the softmax for backward.

    hidden [N, D], weight [V, D], bias [V] or None, labels [N] -> [N] (float32 for half inputs). Forward:
    chunk by chunk, the logits go into one [N, V] buffer and become exp(logit - max) in place. Backward:
    d out / d logits = onehot(label) - softmax, built chunk by chunk in a reused [chunk, V] block, then
    two matmuls per chunk (hidden gradient rows; weight gradient accumulated in place).
    """

    @staticmethod
    def forward(
        ctx,
        hidden: Tensor,
        weight: Tensor,
        bias: Tensor | None,
        labels: Tensor,
        chunk_size: int,
        temperature: float,
    ) -> Tensor:  # type: ignore[override]
        n, cdtype = hidden.shape[0], torch.promote_types(weight.dtype, torch.float32)
        exps = torch.empty(n, weight.shape[0], dtype=cdtype, device=hidden.device)
        out = torch.empty(n, dtype=cdtype, device=hidden.device)
        inv_total = torch.empty(n, dtype=cdtype, device=hidden.device)
        for s in range(0, n, chunk_size):
            c = slice(s, s + chunk_size)
            out[c], inv_total[c] = _exp_logits(exps[c], hidden[c], weight, bias, labels[c], temperature)
        ctx.save_for_backward(hidden, weight, labels, exps, inv_total)
        ctx.has_bias, ctx.temperature, ctx.chunk_size = bias is not None, temperature, chunk_size
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: Tensor):  # type: ignore[override]
        hidden, weight, labels, exps, inv_total = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        g = grad_out.to(exps.dtype) / ctx.temperature
        scale = -g * inv_total  # softmax = exps * inv_total
        cs = ctx.chunk_size
        # The saved exps stay untouched: a retained graph (backward(retain_graph=True)) may run this again.
        block = torch.empty(min(cs, len(g)), exps.shape[1], dtype=exps.dtype, device=exps.device)
        grad_h = torch.empty(hidden.shape, dtype=exps.dtype, device=hidden.device) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=exps.dtype, device=weight.device) if need_w else None
        grad_b = torch.zeros(weight.shape[0], dtype=exps.dtype, device=weight.device) if need_b else None
        w = weight.to(exps.dtype)
        for s in range(0, len(g), cs):
            c = slice(s, s + cs)
            gl = torch.mul(exps[c], scale[c, None], out=block[: len(g[c])])
            gl.scatter_add_(1, labels[c, None], g[c, None])
            if need_h:
                torch.mm(gl, w, out=grad_h[c])
            if need_w:
                grad_w.addmm_(gl.T, hidden[c].to(exps.dtype))
            if need_b:
                grad_b += gl.sum(0)
        grad_h = grad_h.to(hidden.dtype) if need_h else None
        grad_w = grad_w.to(weight.dtype) if need_w else None
        grad_b = grad_b.to(weight.dtype) if need_b and ctx.has_bias else None
        return grad_h, grad_w, grad_b, None, None, None


class _ChunkedLabelLogprobs(torch.autograd.Function):
    """log softmax(h W^T + b)[label] chunk by chunk; backward recomputes each chunk's logits.

    Saves only the inputs and one logsumexp per token, so autograd never holds a [N, V] tensor: peak extra
    memory is one [chunk_size, V] block in forward and backward alike.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, chunk_size, temperature):  # type: ignore[override]
        cdtype = logprob_dtype(hidden.dtype)
        n = hidden.shape[0]
        out = torch.empty(n, dtype=cdtype, device=hidden.device)
        lse = torch.empty(n, dtype=cdtype, device=hidden.device)
        for s in range(0, n, chunk_size):
            logits = F.linear(hidden[s : s + chunk_size], weight, bias).to(cdtype) / temperature
            lse[s : s + chunk_size] = torch.logsumexp(logits, dim=-1)
            picked = logits.gather(-1, labels[s : s + chunk_size].unsqueeze(-1)).squeeze(-1)
            out[s : s + chunk_size] = picked - lse[s : s + chunk_size]
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
            h = hidden[s : s + cs]
            logits = F.linear(h, weight, bias).to(lse.dtype) / temp
            g = grad_out[s : s + cs].to(lse.dtype)
            # d/dlogits of (logit[y] - lse) is onehot(y) - softmax, scaled by the incoming gradient.
            grad_logits = -torch.exp(logits - lse[s : s + cs, None]) * g[:, None]
            grad_logits.scatter_add_(-1, labels[s : s + cs, None], g[:, None])
            grad_logits = grad_logits / temp
            if need_h:
                grad_h[s : s + cs] = (grad_logits.to(weight.dtype) @ weight).to(hidden.dtype)
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
        raise ValueError(
            f"hidden_states {tuple(hidden_states.shape)} and labels {tuple(labels.shape)} disagree"
        )
    valid = labels != ignore_index
    safe = torch.where(valid, labels, torch.zeros_like(labels)).reshape(-1).long()
    # Ignored positions (padding) are zeroed so that nothing there, not even NaN, reaches W's gradient.
    flat_h = torch.where(valid[..., None], hidden_states, 0.0).reshape(-1, hidden_states.shape[-1])
    out = _ChunkedLabelLogprobs.apply(
        flat_h, lm_head_weight, lm_head_bias, safe, int(chunk_size), float(temperature)
    )
    out = out.reshape(labels.shape)
    return torch.where(valid, out, torch.zeros((), dtype=out.dtype, device=out.device))


def head_logps(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    bias: Tensor | None = None,
    *,
    chunk_size: int | None = None,
    temperature: float = 1.0,
) -> Tensor:
    """log softmax((hidden W^T + bias) / temperature)[labels] of N positions: hidden [N, D], labels [N]
    (real token ids, no ignore index) -> [N] (float32 for half inputs), differentiable in hidden, weight
    and bias.

    Keeps the [N, V] softmax for the backward when gradients are needed and it fits SAVED_PROBS_BYTES;
    otherwise never holds more than a few [chunk_size, V] blocks. chunk_size: rows per block (default:
    a CHUNK_BYTES block).

    Under torch.autocast the head still runs in the weight's dtype: every path (kept softmax, chunked,
    no-grad) then computes the same numbers, and a chunked backward recomputes exactly its forward's logits.
    """
    if torch.is_autocast_enabled(hidden.device.type):
        with torch.autocast(hidden.device.type, enabled=False):
            return head_logps(
                hidden.to(weight.dtype), weight, labels, bias, chunk_size=chunk_size, temperature=temperature
            )
    cdtype = torch.promote_types(weight.dtype, torch.float32)
    if chunk_size is None:
        chunk_size = max(1, CHUNK_BYTES // (weight.shape[0] * cdtype.itemsize))
    if chunk_size < 1 or not temperature > 0:
        raise ValueError(f"chunk_size must be >= 1 and temperature > 0, got {chunk_size} and {temperature}")
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (hidden, weight, bias)
    )
    if not needs_grad:
        return _no_grad_head_logps(hidden, weight, labels, bias, chunk_size, temperature, cdtype)
    if hidden.shape[0] * weight.shape[0] * cdtype.itemsize <= SAVED_PROBS_BYTES:
        return _HeadLogps.apply(hidden, weight, bias, labels, int(chunk_size), float(temperature))
    return chunked_gather_logprobs(
        hidden, weight, labels, bias, chunk_size=chunk_size, temperature=temperature
    )


@torch.no_grad()
def _no_grad_head_logps(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    bias: Tensor | None,
    chunk_size: int,
    temperature: float,
    cdtype: torch.dtype,
) -> Tensor:
    """`head_logps` without autograd (reference and rollout passes): one reused [chunk_size, V] block."""
    n = hidden.shape[0]
    out = torch.empty(n, dtype=cdtype, device=hidden.device)
    block = torch.empty(min(chunk_size, n), weight.shape[0], dtype=cdtype, device=hidden.device)
    for s in range(0, n, chunk_size):
        c = slice(s, s + chunk_size)
        rows = len(labels[c])
        out[c] = _exp_logits(block[:rows], hidden[c], weight, bias, labels[c], temperature)[0]
    return out


def token_logps(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    target_mask: torch.Tensor,
    *,
    position_ids: torch.Tensor | None = None,
    attention_mask_4d: torch.Tensor | None = None,
    temperature: float = 1.0,
    chunk_size: int | None = None,
    return_hidden: bool = False,
):
    """Log-probs of each next token, computed only at the positions that count.

    Args:
        model: an HF causal LM (or a PEFT model wrapping one).
        input_ids, attention_mask: [B, T]; any padding side (positions are counted over real tokens).
        target_mask: [B, T], True where token t is a target whose log-prob is needed (e.g. `loss_mask`).
            Position 0 is never a target (nothing precedes it).
        position_ids, attention_mask_4d: for packed rows (see `rlhflab.data.packing`).
        temperature: divide the logits by this (PPO samples with a temperature, so it scores with it).
        return_hidden: also return the final hidden states [B, T, D] (value heads read them).

    Returns:
        logps [B, T-1]: logps[:, t] = log p(input_ids[:, t+1] | input_ids[:, :t+1]), 0 where
        target_mask[:, t+1] is False. With return_hidden, (logps, hidden).
    """
    base, head = backbone_and_head(model)
    if position_ids is None:
        position_ids = position_ids_from_mask(attention_mask)
    mask_arg = attention_mask_4d if attention_mask_4d is not None else attention_mask
    hidden = base(
        input_ids=input_ids, attention_mask=mask_arg, position_ids=position_ids, use_cache=False
    ).last_hidden_state
    labels = input_ids[:, 1:].masked_fill(~target_mask[:, 1:].bool(), -100)
    h = hidden[:, :-1]
    sel = labels != -100
    if _head_is_plain_linear(model, head):
        # Gather the needed rows first: with short responses most positions are prompt or padding.
        if hasattr(head.weight, "full_tensor") or hasattr(head.weight, "ds_id"):
            # A sharded head (FSDP, ZeRO-3) is called as a module, which gathers its weight across the processes.
            picked = gather_logprobs(head(h[sel]) / temperature, labels[sel])
        else:
            picked = head_logps(
                h[sel], head.weight, labels[sel], head.bias, chunk_size=chunk_size, temperature=temperature
            )
        logps = torch.zeros(labels.shape, dtype=picked.dtype, device=picked.device)
        logps = logps.masked_scatter(sel, picked)
    else:
        logps = gather_logprobs(hidden_to_logits(model, head, h) / temperature, labels)
    return (logps, hidden) if return_hidden else logps


def response_logps(
    model, batch: dict[str, Tensor], device, amp: Callable = contextlib.nullcontext
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(summed log-probs [R], lengths [R], token log-probs [R, T-1], token mask [R, T-1]) of every row's
    response (batch["loss_mask"]), from one forward with the LM head at response positions only, run inside
    `amp()` (the model.autocast context: a policy and its reference must share it, or their log-ratios start
    away from zero)."""
    mask = batch["loss_mask"].to(device)
    with amp():
        logps = token_logps(model, batch["input_ids"].to(device), batch["attention_mask"].to(device), mask)
    target = mask[:, 1:]
    return logps.sum(-1), target.sum(-1), logps, target
