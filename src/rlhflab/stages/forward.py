"""Forward passes that the stages share: token log-probs computed only where they are needed.

A causal LM's cost on a small model is dominated by the LM head (hidden x vocab per position). SFT, DPO
and PPO only need log-probs of response tokens, so we run the base transformer over the whole sequence
and apply the head only at response positions, chunk by chunk, never holding [B, T, V] at once.
"""

from __future__ import annotations

import torch

from rlhflab.losses.logprobs import chunked_gather_logprobs, gather_logprobs
from rlhflab.models.backbone import backbone_and_head, hidden_to_logits, position_ids_from_mask


def _head_is_plain_linear(model: torch.nn.Module, head: torch.nn.Module) -> bool:
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    scaled = getattr(config, "logit_scale", None) not in (None, 1.0) or getattr(config, "final_logit_softcapping", None)
    return isinstance(head, torch.nn.Linear) and not scaled


def token_logps(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    target_mask: torch.Tensor,
    *,
    position_ids: torch.Tensor | None = None,
    attention_mask_4d: torch.Tensor | None = None,
    temperature: float = 1.0,
    chunk_size: int = 1024,
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
        picked = chunked_gather_logprobs(h[sel], head.weight, labels[sel], head.bias, chunk_size=chunk_size,
                                         temperature=temperature)
        logps = torch.zeros(labels.shape, dtype=picked.dtype, device=picked.device)
        logps = logps.masked_scatter(sel, picked)
    else:
        logps = gather_logprobs(hidden_to_logits(model, head, h) / temperature, labels)
    return (logps, hidden) if return_hidden else logps
