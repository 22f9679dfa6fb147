"""Batches for reward models: every response of a batch in one flat order, tagged with the head it trains."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from rlhflab.data.collate import collate_pairs, collate_ranked, collate_unpaired, pad
from rlhflab.data.packing import collate_shared_prompt


def collate_stepwise(examples: Sequence[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded `input_ids`, `attention_mask` [B, T] long and `step_mask`, `step_labels` [B, T] bool of
    `tokenize_stepwise` examples."""
    ids = pad([e["input_ids"] for e in examples], pad_id)
    step_mask = torch.zeros(ids.shape, dtype=torch.bool)
    step_labels = torch.zeros(ids.shape, dtype=torch.bool)
    for i, e in enumerate(examples):
        step_mask[i, e["step_positions"]] = True
        step_labels[i, e["step_positions"]] = torch.tensor(e["step_labels"], dtype=torch.bool)
    return {
        "input_ids": ids,
        "attention_mask": pad([e["attention_mask"] for e in examples], 0),
        "step_mask": step_mask,
        "step_labels": step_labels,
    }


def collate_reward_batch(
    examples: Sequence[dict],
    kind: str,
    pad_id: int,
    *,
    shared: bool = False,
    dtype: torch.dtype = torch.float32,
) -> dict[str, torch.Tensor]:
    """A batch of responses in a flat order (pairwise: B chosen, then B rejected; rankings: example 0's
    responses best first, then example 1's, ...; unpaired: one response per example, with `label` [B] bool)
    with, per response, the head it trains (`row_head`).

    shared: one row per example (prompt once, then its responses, `collate_shared_prompt`) when every
    example allows it, with `read_rows`/`read_positions` in that flat order; else one row per response.
    Ranked batches carry `num_responses` [B] and `ranks` [B, K_max] (-1 = no response).
    stepwise: one solution per row (nothing shared), with `step_mask` [B, T] bool (True at each labelled step's
    last token) and `step_labels` [B, T] bool (the step's label there, False elsewhere).
    """
    heads = torch.tensor([e["head"] for e in examples])
    if kind == "stepwise":
        batch = collate_stepwise(examples, pad_id)
        batch["row_head"] = heads
        return batch
    if kind == "unpaired":  # one response per example, nothing to share
        batch = collate_unpaired(examples, pad_token_id=pad_id)
        batch["row_head"] = heads
        return batch
    batch = collate_shared_prompt(examples, pad_token_id=pad_id, dtype=dtype) if shared else None
    if kind == "pairwise":
        if batch is None:
            batch = collate_pairs(examples, pad_token_id=pad_id, stack=True)
        else:  # responses come as (c0, r0, c1, r1, ...); the losses want (c0, c1, ..., r0, r1, ...)
            order = torch.arange(2 * len(examples)).view(-1, 2).T.reshape(-1)
            batch.update({k: batch[k][order] for k in ("read_rows", "read_positions", "key_mask")})
            batch["margin"] = torch.tensor([float(e["margin"] or 0.0) for e in examples])
        batch["row_head"] = heads.repeat(2)
        return batch
    if batch is None:
        batch = collate_ranked(examples, pad_token_id=pad_id)
    else:
        batch["num_responses"] = torch.tensor([len(e["input_ids"]) for e in examples], dtype=torch.long)
        batch["ranks"] = pad([e["ranks"] for e in examples], -1)
    batch["row_head"] = heads.repeat_interleave(batch["num_responses"])
    return batch
