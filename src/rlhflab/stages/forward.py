"""Forward passes that the stages share: token log-probs computed only where they are needed.

A causal LM's cost on a small model is dominated by the LM head (hidden x vocab per position). SFT, DPO
and PPO only need log-probs of response tokens, so we run the base transformer over the whole sequence
and apply the head only at response positions, never holding [B, T, V] at once.

When gradients are needed and the softmax of those positions fits `SAVED_PROBS_BYTES`, the head's
forward keeps it for the backward (`_HeadLogps`): the backward is then two matmuls and one pass over the
probabilities instead of recomputing the logits (a third matmul, an exp and a subtraction over [N, V]).
Above the budget, the chunked path of `rlhflab.losses` recomputes chunk by chunk; without gradients
nothing is kept (one [chunk_size, V] block at a time).

A reward model reads its last layer at one position per response: `final_layer_only_at` runs that layer's
query, attention output and MLP only there (one position per row, or several per row when one prompt and
its responses share a row).
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from rlhflab.losses.logprobs import chunked_gather_logprobs, gather_logprobs
from rlhflab.models.backbone import backbone_and_head, hidden_to_logits, position_ids_from_mask
from rlhflab.models.loading import is_peft_model

# Largest softmax (float32, [N, V]) the head keeps for its backward: 16 rows x ~50 response tokens of a
# 49k vocabulary is ~150 MB; a larger one is recomputed chunk by chunk instead (one more head matmul).
SAVED_PROBS_BYTES = 256 * 2**20
# Default chunk: rows of logits per [rows, V] float32 block. Measured on 2 cores (32 MB L3, V = 49k): 256-341
# rows (50-64 MB) beat both 85 rows (small matmuls) and 1024 (every pass over the block goes to memory).
CHUNK_BYTES = 64 * 2**20


def _head_is_plain_linear(model: torch.nn.Module, head: torch.nn.Module) -> bool:
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    scaled = getattr(config, "logit_scale", None) not in (None, 1.0) or getattr(config, "final_logit_softcapping", None)
    return isinstance(head, torch.nn.Linear) and not scaled


def _exp_logits(block: Tensor, hidden: Tensor, weight: Tensor, bias: Tensor | None, labels: Tensor,
                temperature: float) -> tuple[Tensor, Tensor]:
    """Write exp(logits - max) of one chunk into `block` [r, V] (in place); return (label log-probs [r],
    1 / sum of the exps [r]), so that softmax = block * that and nothing else is allocated at [r, V]."""
    if weight.dtype == hidden.dtype == block.dtype and (bias is None or bias.dtype == block.dtype):
        torch.mm(hidden, weight.T, out=block) if bias is None else torch.addmm(bias, hidden, weight.T, out=block)
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
    def forward(ctx, hidden: Tensor, weight: Tensor, bias: Tensor | None, labels: Tensor, chunk_size: int,
                temperature: float) -> Tensor:  # type: ignore[override]
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
            gl = torch.mul(exps[c], scale[c, None], out=block[:len(g[c])])
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


def head_logps(hidden: Tensor, weight: Tensor, labels: Tensor, bias: Tensor | None = None, *,
               chunk_size: int | None = None, temperature: float = 1.0) -> Tensor:
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
            return head_logps(hidden.to(weight.dtype), weight, labels, bias, chunk_size=chunk_size,
                              temperature=temperature)
    cdtype = torch.promote_types(weight.dtype, torch.float32)
    if chunk_size is None:
        chunk_size = max(1, CHUNK_BYTES // (weight.shape[0] * cdtype.itemsize))
    if chunk_size < 1 or not temperature > 0:
        raise ValueError(f"chunk_size must be >= 1 and temperature > 0, got {chunk_size} and {temperature}")
    needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (hidden, weight, bias))
    if not needs_grad:
        return _no_grad_head_logps(hidden, weight, labels, bias, chunk_size, temperature, cdtype)
    if hidden.shape[0] * weight.shape[0] * cdtype.itemsize <= SAVED_PROBS_BYTES:
        return _HeadLogps.apply(hidden, weight, bias, labels, int(chunk_size), float(temperature))
    return chunked_gather_logprobs(hidden, weight, labels, bias, chunk_size=chunk_size, temperature=temperature)


@torch.no_grad()
def _no_grad_head_logps(hidden: Tensor, weight: Tensor, labels: Tensor, bias: Tensor | None, chunk_size: int,
                        temperature: float, cdtype: torch.dtype) -> Tensor:
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
    hidden = base(input_ids=input_ids, attention_mask=mask_arg, position_ids=position_ids,
                  use_cache=False).last_hidden_state
    labels = input_ids[:, 1:].masked_fill(~target_mask[:, 1:].bool(), -100)
    h = hidden[:, :-1]
    if _head_is_plain_linear(model, head):
        sel = labels != -100
        # Gather the needed rows first: with short responses most positions are prompt or padding.
        picked = head_logps(h[sel], head.weight, labels[sel], head.bias, chunk_size=chunk_size,
                            temperature=temperature)
        logps = torch.zeros(labels.shape, dtype=picked.dtype, device=picked.device)
        logps = logps.masked_scatter(sel, picked)
    else:
        logps = gather_logprobs(hidden_to_logits(model, head, h) / temperature, labels)
    return (logps, hidden) if return_hidden else logps


# ---- The final decoder layer, computed only where its output is read ---------------------------------------

# Decoder layers whose forward is exactly: x + o_proj(attn(rope(q), rope(k), v)) on input_layernorm(x), then
# + mlp(post_attention_layernorm(.)), with full causal attention. Others run whole (same result, more work).
_PLAIN_DECODER_LAYERS = ("LlamaDecoderLayer",)


class _FinalLayerAt(nn.Module):
    """Stands in for the last decoder layer: keys and values at every position (attention needs them), but
    the query, attention output, MLP and residuals only at N read positions (`rows`, `positions`, distinct
    pairs). The returned hidden states are the layer's input everywhere else, so they are only right there.
    """

    def __init__(self, layer: nn.Module, rows: Tensor, positions: Tensor, key_mask: Tensor):
        super().__init__()
        self.layer, self.rows, self.positions, self.key_mask = layer, rows, positions, key_mask

    def forward(self, hidden_states: Tensor, position_embeddings: tuple[Tensor, Tensor], **_: object) -> Tensor:
        layer, attn = self.layer, self.layer.self_attn
        rope = sys.modules[type(attn).__module__].apply_rotary_pos_emb
        b, t, _ = hidden_states.shape
        rows, positions, n = self.rows, self.positions, len(self.rows)
        normed = layer.input_layernorm(hidden_states)
        keys = attn.k_proj(normed).view(b, t, -1, attn.head_dim).transpose(1, 2)
        values = attn.v_proj(normed).view(b, t, -1, attn.head_dim).transpose(1, 2)
        query = attn.q_proj(normed[rows, positions][:, None]).view(n, 1, -1, attn.head_dim).transpose(1, 2)
        cos, sin = position_embeddings
        query, _ = rope(query, query, cos[rows, positions][:, None], sin[rows, positions][:, None])
        _, keys = rope(keys, keys, cos, sin)
        if n != b or not torch.equal(rows, torch.arange(b, device=rows.device)):
            keys, values = keys[rows], values[rows]  # several reads per row (shared-prompt rows)
        groups = query.shape[1] // keys.shape[1]
        if groups > 1:  # grouped-query attention: each key/value head serves `groups` query heads
            keys, values = keys.repeat_interleave(groups, 1), values.repeat_interleave(groups, 1)
        out = F.scaled_dot_product_attention(query, keys, values, attn_mask=self.key_mask[:, None, None, :],
                                             scale=attn.scaling)
        x = hidden_states[rows, positions] + attn.o_proj(out.transpose(1, 2).reshape(n, -1))
        x = x + layer.mlp(layer.post_attention_layernorm(x))
        return hidden_states.index_put((rows, positions), x)


def _decoder_layers(backbone: nn.Module) -> nn.ModuleList | None:
    """The backbone's decoder layers when its last one can run as `_FinalLayerAt`, else None."""
    base = backbone.get_base_model() if is_peft_model(backbone) else backbone
    layers = getattr(base, "layers", None)
    if not isinstance(layers, nn.ModuleList) or len(layers) == 0:
        return None
    layer, config = layers[-1], getattr(base, "config", None)
    if type(layer).__name__ not in _PLAIN_DECODER_LAYERS or not hasattr(layer, "self_attn"):
        return None
    if layer.training and getattr(config, "attention_dropout", 0.0):
        return None
    return layers


@contextlib.contextmanager
def final_layer_only_at(backbone: nn.Module, attention_mask: Tensor, positions: Tensor, *,
                        rows: Tensor | None = None, key_mask: Tensor | None = None) -> Iterator[bool]:
    """Within the block, `backbone`'s final decoder layer computes its output only where it is read (e.g.
    the last real token a reward head reads); yields whether it does.

    One read per row: `positions` [B], and the keys are the real tokens at or before each position
    (attention_mask [B, T], any padding side). Several reads per row (shared-prompt rows from
    `rlhflab.data.packing.collate_shared_prompt`): `rows` and `positions` [N] name N distinct (row,
    position) pairs and `key_mask` [N, T] bool what each attends to.

    The final layer's query projection, attention output and MLP (most of a layer's weights) then run on N
    rows instead of B x T: a quarter of a 4-layer model's work. The last hidden state is exact at the read
    positions and wrong elsewhere, so read nothing else. Backbones other than Llama-style decoders
    (`_PLAIN_DECODER_LAYERS`) run unchanged (yields False).
    """
    layers = _decoder_layers(backbone)
    if layers is None:
        yield False
        return
    if rows is None:
        rows = torch.arange(len(positions), device=positions.device)
    if key_mask is None:
        columns = torch.arange(attention_mask.shape[1], device=attention_mask.device)
        before = columns[None] <= positions[:, None]
        # A position always sees itself, so even a row without real tokens gets no all-masked softmax (NaN).
        key_mask = (attention_mask.bool() & before) | (columns[None] == positions[:, None])
    original = layers[-1]
    layers[-1] = _FinalLayerAt(original, rows, positions, key_mask)
    try:
        yield True
    finally:
        layers[-1] = original
