"""Batching tokenized examples into padded tensors.

Training batches are right-padded (the real tokens start at position 0, as in training without a cache);
prompt batches for generation are left-padded, so every row's next token goes at the same position.
`attention_mask` is long 0/1 (what HF models take); `loss_mask` is bool, True = the token counts.
Packing without padding lives in `rlhflab.data.packing`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import torch

from rlhflab.errors import ConfigError


def _round_up(n: int, multiple: int | None) -> int:
    return n if not multiple else -(-n // multiple) * multiple


def pad(
    seqs: Sequence[Sequence[Any]],
    value: Any,
    *,
    side: str = "right",
    length: int | None = None,
    dtype: torch.dtype = torch.long,
) -> torch.Tensor:
    """Stack variable-length sequences into a [B, T] tensor, filling with `value` on `side`.

    T is `length` when given (it must hold the longest sequence), else the longest length.
    """
    if side not in ("right", "left"):
        raise ValueError(f"side must be 'right' or 'left', got {side!r}")
    longest = max((len(s) for s in seqs), default=0)
    length = longest if length is None else length
    if length < longest:
        raise ValueError(f"pad length {length} is shorter than the longest sequence ({longest})")
    out = torch.full((len(seqs), length), value, dtype=dtype)
    for i, s in enumerate(seqs):
        if len(s):
            row = torch.as_tensor(list(s), dtype=dtype)
            if side == "right":
                out[i, : len(s)] = row
            else:
                out[i, length - len(s) :] = row
    return out


def _check_pad_id(pad_token_id: int | None) -> int:
    if pad_token_id is None:
        raise ConfigError(
            "the tokenizer has no pad token; set one (e.g. tokenizer.pad_token = "
            "tokenizer.eos_token) before batching"
        )
    return int(pad_token_id)


def _pad_triplet(
    ids: Sequence[Sequence[int]],
    att: Sequence[Sequence[int]],
    loss: Sequence[Sequence[bool]],
    pad_token_id: int,
    length: int,
    side: str = "right",
) -> dict[str, torch.Tensor]:
    return {
        "input_ids": pad(ids, pad_token_id, side=side, length=length),
        "attention_mask": pad(att, 0, side=side, length=length),
        "loss_mask": pad(loss, False, side=side, length=length, dtype=torch.bool),
    }


def collate_sft(
    examples: Sequence[dict], *, pad_token_id: int | None, pad_to_multiple_of: int | None = None
) -> dict[str, torch.Tensor]:
    """`input_ids` [B, T] long, `attention_mask` [B, T] long, `loss_mask` [B, T] bool; right-padded."""
    pad_id = _check_pad_id(pad_token_id)
    length = _round_up(max(len(e["input_ids"]) for e in examples), pad_to_multiple_of)
    return _pad_triplet(
        [e["input_ids"] for e in examples],
        [e["attention_mask"] for e in examples],
        [e["loss_mask"] for e in examples],
        pad_id,
        length,
    )


def collate_unpaired(
    examples: Sequence[dict], *, pad_token_id: int | None, pad_to_multiple_of: int | None = None
) -> dict[str, torch.Tensor]:
    """As `collate_sft`, plus `label` [B] bool (True = desirable)."""
    out = collate_sft(examples, pad_token_id=pad_token_id, pad_to_multiple_of=pad_to_multiple_of)
    out["label"] = torch.tensor([bool(e["label"]) for e in examples], dtype=torch.bool)
    return out


def collate_pairs(
    examples: Sequence[dict],
    *,
    pad_token_id: int | None,
    stack: bool = False,
    pad_to_multiple_of: int | None = None,
) -> dict[str, torch.Tensor]:
    """Batch preference pairs, chosen and rejected padded to one common length T.

    Returns `chosen_input_ids`, `chosen_attention_mask`, `chosen_loss_mask`, the same for `rejected_`
    (each [B, T]), and `margin` [B] float (0 where the record has none, which turns a margin loss back
    into the plain Bradley-Terry loss). With `stack=True` the two halves come as one batch for a single
    forward pass instead: `input_ids`, `attention_mask`, `loss_mask` [2B, T], rows 0..B-1 chosen and
    B..2B-1 rejected.
    """
    pad_id = _check_pad_id(pad_token_id)
    length = _round_up(
        max(len(e[f"{side}_input_ids"]) for e in examples for side in ("chosen", "rejected")),
        pad_to_multiple_of,
    )
    margin = torch.tensor([0.0 if e.get("margin") is None else float(e["margin"]) for e in examples])
    sides = ("chosen", "rejected")
    if stack:
        rows = [e for side in sides for e in _side_rows(examples, side)]
        out = _pad_triplet(*zip(*rows), pad_id, length)
        out["margin"] = margin
        return out
    out = {}
    for side in sides:
        batch = _pad_triplet(*zip(*_side_rows(examples, side)), pad_id, length)
        out.update({f"{side}_{k}": v for k, v in batch.items()})
    out["margin"] = margin
    return out


def _side_rows(examples: Sequence[dict], side: str) -> list[tuple[list, list, list]]:
    return [(e[f"{side}_input_ids"], e[f"{side}_attention_mask"], e[f"{side}_loss_mask"]) for e in examples]


def collate_ranked(
    examples: Sequence[dict], *, pad_token_id: int | None, pad_to_multiple_of: int | None = None
) -> dict[str, torch.Tensor]:
    """Batch K-wise rankings (K may differ between examples) as N = sum of K flat rows.

    Returns `input_ids`, `attention_mask`, `loss_mask` [N, T] (example 0's responses best first, then
    example 1's, ...), `num_responses` [B] long, and `ranks` [B, K_max] long (0 = best, equal = tied,
    -1 = no response) with `response_mask` [B, K_max] bool. Per-row scores s [N] go back to [B, K_max]
    with `s.new_zeros(B, K_max).masked_scatter(response_mask, s)`.
    """
    pad_id = _check_pad_id(pad_token_id)
    ids = [r for e in examples for r in e["input_ids"]]
    att = [r for e in examples for r in e["attention_mask"]]
    loss = [r for e in examples for r in e["loss_mask"]]
    out = _pad_triplet(ids, att, loss, pad_id, _round_up(max(len(r) for r in ids), pad_to_multiple_of))
    out["num_responses"] = torch.tensor([len(e["input_ids"]) for e in examples], dtype=torch.long)
    out["ranks"] = pad([e["ranks"] for e in examples], -1)
    out["response_mask"] = out["ranks"] >= 0
    return out


def collate_prompts(
    examples: Sequence[dict], *, pad_token_id: int | None, pad_to_multiple_of: int | None = None
) -> dict[str, torch.Tensor]:
    """Left-padded prompts for generation: `input_ids` [B, T] long and `attention_mask` [B, T] long."""
    pad_id = _check_pad_id(pad_token_id)
    length = _round_up(max(len(e["input_ids"]) for e in examples), pad_to_multiple_of)
    return {
        "input_ids": pad([e["input_ids"] for e in examples], pad_id, side="left", length=length),
        "attention_mask": pad([e["attention_mask"] for e in examples], 0, side="left", length=length),
    }


_COLLATORS: dict[str, Callable[..., dict[str, torch.Tensor]]] = {
    "sft": collate_sft,
    "pairwise": collate_pairs,
    "ranked": collate_ranked,
    "unpaired": collate_unpaired,
    "prompt": collate_prompts,
}


def make_collator(kind: str, pad_token_id: int | None, **options: Any) -> Callable[[Sequence[dict]], dict]:
    """A `collate_fn` for a DataLoader over tokenized `kind` examples (options: stack, pad_to_multiple_of)."""
    if kind not in _COLLATORS:
        raise ConfigError(f"unknown data kind {kind!r}; expected one of {', '.join(_COLLATORS)}")
    _check_pad_id(pad_token_id)
    return functools.partial(_COLLATORS[kind], pad_token_id=pad_token_id, **options)


def collate_preference(examples: Sequence[dict], kind: str, pad_token_id: int) -> dict[str, torch.Tensor]:
    """A preference batch: "pairwise" examples as 2B stacked rows (chosen, then rejected), "unpaired" as B."""
    if kind == "pairwise":
        return collate_pairs(examples, pad_token_id=pad_token_id, stack=True)
    return collate_unpaired(examples, pad_token_id=pad_token_id)
