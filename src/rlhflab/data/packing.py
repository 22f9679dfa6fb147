"""Packing several tokenized sequences into one row, so a batch carries no padding.

A packed row is the sequences laid end to end, with `position_ids` restarting at 0 for each one. To
keep the sequences from attending to each other, either pass `position_ids` to an attention kernel
that reads them as boundaries (flash-attention varlen, with `cu_seqlens`) or pass the 4-D
block-diagonal causal mask from `block_causal_mask` (sdpa/eager attention). With the mask and the
position ids, every packed sequence gets exactly the logits it gets alone (tested on a tiny Llama).
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from typing import Any

import torch

from rlhflab.data.collate import _check_pad_id, _round_up, pad
from rlhflab.errors import ConfigError


def _bins(lengths: list[int], max_length: int, strategy: str) -> list[list[int]]:
    if strategy == "sequential":
        bins: list[list[int]] = []
        used = max_length
        for i, n in enumerate(lengths):
            if used + n > max_length:
                bins.append([])
                used = 0
            bins[-1].append(i)
            used += n
        return bins
    if strategy != "bfd":
        raise ConfigError(f"unknown packing strategy {strategy!r}; expected 'bfd' or 'sequential'")
    # Best-fit decreasing: each sequence, longest first, goes to the fullest row that still holds it.
    bins = []
    free: list[tuple[int, int]] = []  # (space left, bin index), sorted
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        j = bisect.bisect_left(free, (lengths[i], -1))
        if j == len(free):
            bins.append([i])
            bisect.insort(free, (max_length - lengths[i], len(bins) - 1))
        else:
            space, b = free.pop(j)
            bins[b].append(i)
            bisect.insort(free, (space - lengths[i], b))
    # Inside a row keep the data order; the rows come in the order they were opened.
    return [sorted(b) for b in bins]


def pack_sequences(examples: Sequence[dict], max_length: int, *, strategy: str = "bfd") -> list[dict]:
    """Pack tokenized examples (`input_ids`, `loss_mask`) into rows of at most `max_length` tokens.

    Args:
        examples: tokenized SFT/unpaired-style examples.
        max_length: the longest row; a longer example is a ConfigError (tokenize with a smaller max_length).
        strategy: "bfd" (best-fit decreasing: fewest rows) or "sequential" (keeps the data order).

    Returns:
        Rows with `input_ids`, `loss_mask`, `position_ids` (restarting at 0 per sequence), `seq_lens`
        (the packed sequences' lengths) and `cu_seqlens` ([0, l1, l1+l2, ...]). The first token of each
        sequence is set not to count: nothing before it in the row may predict it (unpacked, token 0 is
        never a target either).
    """
    if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 1:
        raise ConfigError(f"packing max_length must be a positive integer, got {max_length!r}")
    lengths = [len(e["input_ids"]) for e in examples]
    for i, n in enumerate(lengths):
        if n == 0 or n > max_length:
            raise ConfigError(
                f"example {i} has {n} tokens; packing needs 1..{max_length} (tokenize with "
                f"max_length <= {max_length})"
            )
    rows = []
    for members in _bins(lengths, max_length, strategy):
        ids: list[int] = []
        loss: list[bool] = []
        pos: list[int] = []
        for i in members:
            ids += list(examples[i]["input_ids"])
            loss += [False, *map(bool, list(examples[i]["loss_mask"])[1:])]
            pos += list(range(lengths[i]))
        seq_lens = [lengths[i] for i in members]
        cu = [0]
        for n in seq_lens:
            cu.append(cu[-1] + n)
        rows.append(
            {"input_ids": ids, "loss_mask": loss, "position_ids": pos, "seq_lens": seq_lens, "cu_seqlens": cu}
        )
    return rows


def block_causal_mask(
    seq_lens: Sequence[Sequence[int]],
    length: int | None = None,
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Additive 4-D attention mask [B, 1, T, T] for packed rows: 0 where query t may attend key s (same
    sequence, s <= t), -inf elsewhere.

    Args:
        seq_lens: per row, the lengths of its packed sequences; positions past their sum are padding.
        length: T (default: the longest row).
        dtype: the model's compute dtype (sdpa needs the mask in the query's dtype).

    Each padding position attends only to itself, so no softmax row is all -inf (which would give NaN).
    """
    totals = [sum(r) for r in seq_lens]
    length = max(totals, default=0) if length is None else length
    if length < max(totals, default=0):
        raise ValueError(f"mask length {length} is shorter than the longest packed row ({max(totals)})")
    segment = torch.empty(len(seq_lens), length, dtype=torch.long)
    for b, lens in enumerate(seq_lens):
        segment[b] = -1 - torch.arange(length)  # padding: a segment of its own per position
        start = 0
        for k, n in enumerate(lens):
            segment[b, start : start + n] = k
            start += n
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    allowed = (segment[:, :, None] == segment[:, None, :]) & causal
    mask = torch.zeros(allowed.shape, dtype=dtype).masked_fill(~allowed, float("-inf"))
    return mask[:, None].to(device) if device is not None else mask[:, None]


def collate_packed(
    rows: Sequence[dict],
    *,
    pad_token_id: int | None,
    pad_to_multiple_of: int | None = None,
    with_4d_mask: bool = True,
    dtype: torch.dtype = torch.float32,
) -> dict[str, Any]:
    """Batch packed rows (from `pack_sequences`).

    Returns `input_ids`, `position_ids` [B, T] long, `loss_mask` [B, T] bool, `attention_mask`
    [B, 1, T, T] (`block_causal_mask`, in `dtype`; left out with `with_4d_mask=False`, e.g. for
    flash-attention, whose T x T mask would be wasted memory), `seq_lens` (list per row), and
    `cu_seqlens` [S + 1] int32 / `max_seqlen` over the flattened [1, B*T] batch, where each row's padding
    tail counts as one more sequence.
    """
    pad_id = _check_pad_id(pad_token_id)
    length = _round_up(max(len(r["input_ids"]) for r in rows), pad_to_multiple_of)
    positions, segments = [], []
    for r in rows:
        tail = length - len(r["input_ids"])
        positions.append(list(r["position_ids"]) + list(range(tail)))
        segments += list(r["seq_lens"]) + ([tail] if tail else [])
    out: dict[str, Any] = {
        "input_ids": pad([r["input_ids"] for r in rows], pad_id, length=length),
        "position_ids": pad(positions, 0, length=length),
        "loss_mask": pad([r["loss_mask"] for r in rows], False, length=length, dtype=torch.bool),
        "seq_lens": [list(r["seq_lens"]) for r in rows],
        "cu_seqlens": torch.tensor([0, *segments], dtype=torch.int32).cumsum(0, dtype=torch.int32),
        "max_seqlen": max(segments),
    }
    if with_4d_mask:
        out["attention_mask"] = block_causal_mask(out["seq_lens"], length, dtype=dtype)
    return out


# ---- One prompt, several responses: the prompt once per row ------------------------------------------------


def responses_of(example: dict) -> list[list[int]] | None:
    """The response token ids of a tokenized pair (chosen, rejected) or ranking (best first), or None when a
    response is empty or does not start right after the shared `prompt_input_ids` (then the example needs
    one row per response)."""
    prompt = example["prompt_input_ids"]
    rows = (
        [example["chosen_input_ids"], example["rejected_input_ids"]]
        if "chosen_input_ids" in example
        else list(example["input_ids"])
    )
    if any(len(r) <= len(prompt) or r[: len(prompt)] != prompt for r in rows):
        return None
    return [r[len(prompt) :] for r in rows]


def collate_shared_prompt(
    examples: Sequence[dict], *, pad_token_id: int | None, dtype: torch.dtype = torch.float32
) -> dict[str, torch.Tensor] | None:
    """Batch examples whose K responses share one prompt as one row each: prompt, response 1, ..., response K.

    Each response attends to the prompt and to itself (causally), never to another response, and its
    positions continue from the end of the prompt, so every response's hidden states are those of the
    row prompt + response alone (exact up to float rounding): the prompt runs once instead of K times.

    Returns `input_ids`, `position_ids` [B, T] long, `attention_mask` [B, T] long (1 = real token),
    `attention_mask_4d` [B, 1, T, T] additive (0 = may attend, -inf = may not; in `dtype`),
    and, per response (N = sum of K: example 0's responses in order, then example 1's, ...), the row
    `read_rows` [N] and position `read_positions` [N] of its last token (where a reward head reads) and
    `key_mask` [N, T] bool (the positions that token attends to). None when an example cannot be laid out
    this way (see `responses_of`).
    """
    pad_id = _check_pad_id(pad_token_id)
    split = [responses_of(e) for e in examples]
    if any(s is None for s in split):
        return None
    segments, ids, positions, reads = [], [], [], []
    for e, responses in zip(examples, split):
        n = len(e["prompt_input_ids"])
        row, seg, pos, read = list(e["prompt_input_ids"]), [0] * n, list(range(n)), []
        for k, r in enumerate(responses, start=1):
            row += r
            seg += [k] * len(r)
            # Each response's positions continue from the prompt, as if it followed the prompt alone.
            pos += range(n, n + len(r))
            read.append(len(row) - 1)
        ids.append(row)
        segments.append(seg)
        positions.append(pos)
        reads.append(read)
    length = max(len(r) for r in ids)
    t = torch.arange(length)
    # Padding gets a segment of its own per position, so it attends only to itself (no all -inf softmax row).
    segment = torch.stack(
        [torch.cat([torch.tensor(s, dtype=torch.long), -1 - t[len(s) :]]) for s in segments]
    )
    prompt_len = torch.tensor([len(e["prompt_input_ids"]) for e in examples])
    is_prompt = t[None] < prompt_len[:, None]
    allowed = (segment[:, :, None] == segment[:, None, :]) | (
        is_prompt[:, None, :] & (segment[:, :, None] >= 0)
    )
    allowed &= torch.ones(length, length, dtype=torch.bool).tril()
    read_rows = torch.tensor([b for b, read in enumerate(reads) for _ in read], dtype=torch.long)
    read_positions = torch.tensor([p for read in reads for p in read], dtype=torch.long)
    return {
        "input_ids": pad(ids, pad_id, length=length),
        "position_ids": pad(positions, 0, length=length),
        "attention_mask": (segment >= 0).long(),
        "attention_mask_4d": torch.zeros(allowed.shape, dtype=dtype).masked_fill(~allowed, float("-inf"))[
            :, None
        ],
        "read_rows": read_rows,
        "read_positions": read_positions,
        "key_mask": allowed[read_rows, read_positions],
    }
