"""The final decoder layer of a backbone, computed only where its output is read.

A reward model reads its last layer at one position per response: `final_layer_only_at` runs that layer's
query, attention output and MLP only there (one position per row, or several per row when one prompt and
its responses share a row). `supports_shared_prompt` says which backbones can run shared-prompt rows.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rlhflab.models.loading import is_peft_model

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

    def forward(
        self, hidden_states: Tensor, position_embeddings: tuple[Tensor, Tensor], **_: object
    ) -> Tensor:
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
        out = F.scaled_dot_product_attention(
            query, keys, values, attn_mask=self.key_mask[:, None, None, :], scale=attn.scaling
        )
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


def fast_final_layer(backbone: nn.Module) -> nn.Module | None:
    """The decoder layer that `final_layer_only_at` would run only at the read positions (the backbone's
    last one), or None when it would run the backbone whole (yield False). FLOP accounting reads it."""
    layers = _decoder_layers(backbone)
    return None if layers is None else layers[-1]


@contextlib.contextmanager
def final_layer_only_at(
    backbone: nn.Module,
    attention_mask: Tensor,
    positions: Tensor,
    *,
    rows: Tensor | None = None,
    key_mask: Tensor | None = None,
) -> Iterator[bool]:
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


# Decoder families whose attention takes a custom 4-D mask with explicit position ids as it is (shared-prompt
# rows give the rewards of separate rows, tested for each family). Others get one row per response:
# ALiBi models (Bloom) build their biases from a 2-D mask, and a custom mask would override sliding windows.
SHARED_PROMPT_MODEL_TYPES = ("llama", "gpt2", "qwen2", "mistral")


def supports_shared_prompt(model: nn.Module) -> bool:
    """Whether the backbone can run shared-prompt rows: a tested decoder family, attention that reads 4-D
    masks (sdpa, eager; flash-attention reads only padding masks), and no active sliding window."""
    config = model.config
    if getattr(config, "_attn_implementation", None) not in ("sdpa", "eager"):
        return False
    if getattr(config, "model_type", None) not in SHARED_PROMPT_MODEL_TYPES:
        return False
    return not getattr(config, "sliding_window", None) or getattr(config, "use_sliding_window", True) is False
