"""Reaching into HF models: base transformer vs LM head, last real token, positions from the mask.

These are shared by the policy, value and reward models and by the stages (which compute log-probs only
on response positions by running the base transformer and applying the LM head where needed).
"""

from __future__ import annotations

import torch
from torch import nn

from rlhflab.errors import UserError
from rlhflab.models.loading import is_peft_model


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position of the last real token of each row.

    Args:
        attention_mask: [B, T], 1/True = real token; right, left or no padding.

    Returns:
        [B] long. A row with no real token gets 0 (callers must not pass empty rows).
    """
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    # argmax returns the first maximum; masked positions score 0, so this is the last real position.
    return (positions * attention_mask.long()).argmax(dim=-1)


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions counted over real tokens only: [B, T] long, 0 at (and before) the first real token.

    With left padding the first real token must still be position 0, or models with absolute
    position embeddings (GPT-2) score a left-padded row differently from the same row right-padded.
    """
    return (attention_mask.long().cumsum(dim=-1) - 1).clamp(min=0)


def backbone_and_head(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    """(base transformer, LM head) of a HF causal LM, or of a PEFT model wrapping one.

    Both are submodules of `model` (no copy). `base(...).last_hidden_state` is the post-final-norm
    hidden state [B, T, D] that the LM head consumes, so a stage can apply the head only at the
    positions whose log-probs it needs (see `hidden_to_logits`).
    """
    inner = model.get_base_model() if is_peft_model(model) else model
    get_decoder = getattr(inner, "get_decoder", None)
    base = get_decoder() if get_decoder is not None else None
    if base is None or base is inner:
        base = inner.base_model
    head = inner.get_output_embeddings()
    if head is None or base is inner:
        raise UserError(
            f"{type(inner).__name__} is not a causal LM with a separate LM head; "
            "expected a *ForCausalLM / *LMHeadModel"
        )
    return base, head


def hidden_to_logits(model: nn.Module, head: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """LM logits from final hidden states [..., D] -> [..., V], as the model's own forward computes them.

    Some architectures post-process the head's output (Gemma 2/3 soft-cap it, Cohere scales it); the
    scale and cap are read from the config so that this matches `model(...).logits`.
    """
    logits = head(hidden)
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    scale = getattr(config, "logit_scale", None)
    if isinstance(scale, (int, float)) and scale != 1.0:
        logits = logits * scale
    cap = getattr(config, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits


def hidden_size_of(model: nn.Module) -> int:
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    return int(config.hidden_size)


def device_of(model: nn.Module) -> torch.device:
    return next(model.parameters()).device
