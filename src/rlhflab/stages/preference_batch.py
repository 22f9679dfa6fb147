"""One batch of the DPO family: the policy's response log-probs, the reference's (cached or live), and the
loss of the table's row on them; held-out evaluation over batches."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from rlhflab.config import DPOAlgo
from rlhflab.data.collate import collate_preference
from rlhflab.losses import LossOutput, kto_kl_estimate
from rlhflab.losses.preference import BCORewardShift, PreferenceInputs, PreferenceLoss, run_preference_loss
from rlhflab.models.logprobs import response_logps
from rlhflab.stages.common import accumulate_metrics, metric_means
from rlhflab.stages.reference import cache_rows


@dataclass
class PreferenceContext:
    """What the loss of a batch needs: the policy, where reference log-probs come from, the loss."""

    model: Any
    row: PreferenceLoss
    algo: DPOAlgo
    device: torch.device
    pad_id: int
    ref_cache: dict[str, Tensor] | None  # cached reference log-probs per example set
    live_ref: Callable[[], contextlib.AbstractContextManager] | None  # context yielding a reference model
    amp: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext  # model.autocast context
    reward_shift: BCORewardShift | None = None  # BCO's running delta, kept across steps (and checkpoints)

    def ref_rows(self, split: str, indices: list[int], batch: dict) -> Tensor | None:
        if not self.row.reference:
            return None
        if self.ref_cache is not None:
            return cache_rows(self.ref_cache[split], indices).to(self.device)
        with torch.no_grad(), self.live_ref() as ref:
            return response_logps(ref, batch, self.device, self.amp)[0]


def kl_reference_point(
    ctx: PreferenceContext, split: str, kl_examples: list[dict], indices: list[int], chunk: int
) -> Tensor:
    """KTO's z0 over the mismatched rows of `indices`: policy log-probs now, reference ones cached."""
    policy, ref = [], []
    with torch.no_grad():
        for s in range(0, len(indices), chunk):
            idx = indices[s : s + chunk]
            batch = collate_preference([kl_examples[i] for i in idx], "unpaired", ctx.pad_id)
            policy.append(response_logps(ctx.model, batch, ctx.device, ctx.amp)[0])
            ref.append(ctx.ref_rows(f"{split}_kl", idx, batch))
    return kto_kl_estimate(torch.cat(policy), torch.cat(ref))


def batch_loss(
    ctx: PreferenceContext,
    split: str,
    examples: list[dict],
    indices: list[int],
    kl_estimate: Tensor | None = None,
) -> tuple[LossOutput, int]:
    """The loss [B] and metrics of examples[indices], and the real tokens the forward processed."""
    batch = collate_preference([examples[i] for i in indices], ctx.row.data, ctx.pad_id)
    sums, lengths, logps, mask = response_logps(ctx.model, batch, ctx.device, ctx.amp)
    desirable = batch["label"].to(ctx.device) if "label" in batch else None
    inputs = PreferenceInputs(
        sums,
        lengths,
        logps,
        mask,
        ref_logps=ctx.ref_rows(split, indices, batch),
        desirable=desirable,
        kl_estimate=kl_estimate,
        reward_shift=ctx.reward_shift.value if ctx.reward_shift is not None else None,
    )
    return run_preference_loss(ctx.row, inputs, vars(ctx.algo)), int(batch["attention_mask"].sum())


@torch.no_grad()
def evaluate(
    ctx: PreferenceContext, examples: list[dict], kl_examples: list[dict] | None, batch_size: int = 32
) -> dict[str, float]:
    """Held-out loss and metrics: eval/loss, eval/accuracy (the share of pairs whose chosen response gets
    the higher implicit reward; for KTO and BCO, of completions on the right side of the reference point or
    reward shift; BCO's shift is read, never updated, here),
    eval/chosen, eval/rejected, eval/margin, and the loss's other metrics under eval/."""
    was_training = ctx.model.training
    ctx.model.eval()
    everything = list(range(len(examples)))
    z0 = (
        kl_reference_point(ctx, "eval", kl_examples, everything, batch_size)
        if kl_examples is not None
        else None
    )
    sums: dict[str, list[float]] = {}
    for s in range(0, len(examples), batch_size):
        out, _ = batch_loss(ctx, "eval", examples, everything[s : s + batch_size], kl_estimate=z0)
        accumulate_metrics(sums, {"loss": out.loss, **out.metrics})
    ctx.model.train(was_training)
    return {f"eval/{k.removeprefix('reward/')}": v for k, v in metric_means(sums).items()}
