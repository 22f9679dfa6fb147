"""Online DPO's step 4 (`rlhflab.stages.online_dpo`): the loss of the step's pairs and one optimizer step, in
micro-batches, in one process or across several (plain data parallel, FSDP, DeepSpeed ZeRO)."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from rlhflab.config import OnlineDPOAlgo
from rlhflab.core.health import check_finite
from rlhflab.data.collate import collate_preference
from rlhflab.losses.preference import PreferenceInputs, PreferenceLoss, run_preference_loss
from rlhflab.models.logprobs import response_logps
from rlhflab.stages.common import accumulate_metrics, clip_gradients, optimizer_step
from rlhflab.stages.parallel import DataParallel


@dataclass
class StepContext:
    """What the loss of a step needs: the policy, the live reference (a context yielding it, or None for a
    reference-free loss), the loss's row and settings."""

    model: Any
    row: PreferenceLoss
    algo: OnlineDPOAlgo
    device: torch.device
    pad_id: int
    live_ref: Callable[[], contextlib.AbstractContextManager] | None
    amp: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext


def pair_loss(ctx: StepContext, examples: list[dict]) -> tuple[Any, Tensor, Tensor | None, dict[str, float]]:
    """One forward of `examples` (chosen rows, then rejected rows): (LossOutput with loss [B], the policy's
    summed response log-probs [2B], the reference's [2B] or None, counts and the reference's seconds)."""
    batch = collate_preference(examples, "pairwise", ctx.pad_id)
    t = time.time()
    ref = None
    if ctx.live_ref is not None:
        with torch.no_grad(), ctx.live_ref() as ref_model:
            ref = response_logps(ref_model, batch, ctx.device, ctx.amp)[0]
    t_ref = time.time() - t
    sums, lengths, logps, mask = response_logps(ctx.model, batch, ctx.device, ctx.amp)
    out = run_preference_loss(
        ctx.row, PreferenceInputs(sums, lengths, logps, mask, ref_logps=ref), vars(ctx.algo)
    )
    counts = {
        "tokens": int(batch["attention_mask"].sum()),
        "head_tokens": int(batch["loss_mask"].sum()),
        "time_reference": t_ref,
    }
    return out, sums, ref, counts


def update(
    ctx: StepContext,
    examples: list[dict],
    optimizer,
    scheduler,
    max_grad_norm: float,
    step: int,
    last,
    par=None,
    n: int | None = None,
    spare: list[dict] | None = None,
):
    """Step 4 on the step's pairs (micro-batches of algo.micro_batch_size, the loss normalized by all pairs so
    the accumulated gradient is the whole batch's). Returns (metrics, sequence KL [2B] of the chosen rows then
    the rejected rows under the policy before the step, or None without a reference). Across processes
    (`par`), `examples` are this process's share of the step's `n` pairs: the summed gradients and the metrics
    are the whole step's. Where every pass needs every process (`par.lockstep`), one with fewer
    micro-batches joins the others' passes on `spare` (a pair of its own) weighted 0, recording nothing."""
    par = par or DataParallel()
    n = len(examples) if n is None else n
    micro = ctx.algo.micro_batch_size or max(len(examples), 1)
    metric = f"loss/{ctx.algo.loss}"
    sums: dict[str, list[float]] = {}
    counts = {"tokens": 0, "head_tokens": 0, "time_reference": 0.0}
    total, chosen_kl, rejected_kl = 0.0, [], []
    chunks: list = [examples[s : s + micro] for s in range(0, len(examples), micro)]
    # The micro-batch count differs between processes (each drops its own ties) and from step to step: where every
    # pass is collective (a sharded policy; DeepSpeed, which reduces the gradients during the backward pass), every
    # process takes the step's largest count, and the engine is told it.
    chunks += [None] * (int(par.max(len(chunks))) - len(chunks) if par.lockstep else 0)
    par.begin_step(len(chunks))
    for chunk in chunks:
        out, policy, ref, c = pair_loss(ctx, chunk or spare)
        if chunk is None:
            par.backward(out.loss.sum() * 0.0)
            continue
        loss = out.loss.sum() / n
        check_finite({metric: loss}, step=step, last_good=last)
        par.backward(loss)
        total += float(loss.detach())
        accumulate_metrics(sums, out.metrics)
        counts = {k: counts[k] + c[k] for k in counts}
        if ref is not None:  # k1 summed over the response: log pi(y) - log ref(y), pi before this step
            kl = (policy.detach() - ref).float().cpu()
            chosen_kl.append(kl[: kl.numel() // 2])
            rejected_kl.append(kl[kl.numel() // 2 :])
    par.sum_gradients(ctx.model)
    # DeepSpeed's engine clips (at optim.max_grad_norm) and applies the update itself.
    grad_norm = par.deepspeed_step(scheduler) if par.engine else clip_gradients(ctx.model, max_grad_norm)
    check_finite({"loss/grad_norm": grad_norm}, step=step, last_good=last)
    if par.engine is None:
        optimizer_step(optimizer, scheduler)
    seq_kl = torch.cat(chosen_kl + rejected_kl) if chosen_kl else None
    if seq_kl is not None:
        accumulate_metrics(sums, {"kl/sequence": seq_kl})
    total_tokens = par.sum_all({"loss": total, "tokens": counts["tokens"], "head": counts["head_tokens"]})
    metrics = {metric: total_tokens["loss"], **par.metric_means(sums), "loss/grad_norm": grad_norm}
    metrics.update({"perf/lr": scheduler.get_last_lr()[0], "perf/time_reference": counts["time_reference"]})
    metrics.update(
        {"perf/train_tokens": total_tokens["tokens"], "perf/train_head_tokens": total_tokens["head"]}
    )
    return metrics, seq_kl
