"""Direct preference optimization and its family, one stage with the loss picked by name (algo.loss).

Tang et al. 2024 (GPO): DPO, IPO and SLiC are one convex f applied to beta times the log-ratio gap
h = (log pi(y_c) - log ref(y_c)) - (log pi(y_r) - log ref(y_r)); cDPO and robust DPO reweigh it for label
noise. KTO learns from unpaired good/bad completions against a KL reference point, BCO as a binary
classifier of them against a running reward shift; ORPO, SimPO and CPL need no reference model. The maths
and the table of losses (data, reference, inputs, hyperparameters) live in `rlhflab.losses.preference`;
`run_preference_loss` runs a row of that table on a batch.

Cost: the reference's log-probs of every response are computed once and cached (`rlhflab.stages.reference`);
reference-free losses load no reference. Chosen and rejected go through the policy as one batch of 2B rows
(one forward, one backward), with the LM head applied only at response positions.

    rlhflab dpo --config configs/dpo_tiny.yaml model.name_or_path=runs/sft/final algo.loss=ipo

Setup -> reference pass -> loop -> save, read top to bottom.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor

from rlhflab.config import DPOConfig
from rlhflab.core.health import check_finite
from rlhflab.core.seeding import batch_schedule, seed_everything
from rlhflab.data import UnpairedRecord, tokenize_pair, tokenize_unpaired
from rlhflab.data.tokenize import mismatched_partners
from rlhflab.errors import ConfigError, DataError
from rlhflab.losses.preference import (
    PREFERENCE_LOSS_TABLE,
    BCORewardShift,
)
from rlhflab.models.flops import MatmulParams, causal_lm_forward_flops, causal_lm_train_flops, matmul_params
from rlhflab.models.loading import count_parameters, is_peft_model, load_causal_lm, save_model
from rlhflab.stages.common import (
    Loop,
    accumulate_metrics,
    build_optimizer,
    clip_gradients,
    finish,
    load_policy,
    metric_means,
    mixed_precision,
    num_optimizer_steps,
    open_run,
    optimizer_step,
    resolve_model_path,
)
from rlhflab.stages.data_source import load_stage_records, require_train_path
from rlhflab.stages.parallel import DataParallel
from rlhflab.stages.preference_batch import PreferenceContext, batch_loss, evaluate, kl_reference_point
from rlhflab.stages.reference import cached_reference_logps, response_tokens


def _tokenize_records(
    records: list, kind: str, tokenizer, cfg: DPOConfig, *, mismatched: bool = True
) -> tuple[list[dict], list[dict] | None]:
    """(examples, KTO's mismatched examples or None; `mismatched`: whether the loss needs them)."""
    kw = {"max_length": cfg.data.max_length, "max_prompt_length": cfg.data.max_prompt_length}
    if kind == "pairwise":
        return [tokenize_pair(r, tokenizer, **kw) for r in records], None
    examples = [tokenize_unpaired(r, tokenizer, **kw) for r in records]
    if not mismatched:
        return examples, None
    partners = mismatched_partners([r.prompt for r in records])
    kl = [
        tokenize_unpaired(UnpairedRecord(r.prompt, records[j].completion, r.label), tokenizer, **kw)
        for r, j in zip(records, partners)
    ]
    return examples, kl


_DATA_HINTS = {
    "pairwise": "records with prompt, chosen and rejected; for good/bad completions use algo.loss=kto or "
    "algo.loss=bco",
    "unpaired": "records with prompt, completion and label; for preference pairs use a paired loss such as "
    "algo.loss=dpo",
}


def _load_records(cfg: DPOConfig, kind: str, run_dir: Path) -> tuple[list, list]:
    try:
        return load_stage_records(cfg.data, kind, seed=cfg.seed)
    except DataError as e:
        raise DataError(f"{e}. algo.loss={cfg.algo.loss} trains on {_DATA_HINTS[kind]}") from None


def _preference_gradients(
    ctx: PreferenceContext,
    examples: list[dict],
    kl_examples,
    indices: list[int],
    micro: int,
    step: int,
    last_ckpt,
    par: DataParallel | None = None,
) -> tuple[dict[str, float], int, int]:
    """Forward/backward of one optimizer step; returns (metrics, trained and forward-only tokens). With
    several processes each takes its share of `indices` (normalized by the whole step's count), and the
    gradients and metric sums are summed across them."""
    par = par or DataParallel()  # default: this process alone
    # KTO's reference point is one estimate over the whole step's batch, on every process alike.
    z0 = kl_reference_point(ctx, "train", kl_examples, indices, micro) if kl_examples is not None else None
    metric = f"loss/{ctx.algo.loss}"
    sums: dict[str, list[float]] = {}
    total, tokens, rewards = 0.0, 0, []
    mine = par.shard(indices)
    for s in range(0, len(mine), micro):
        out, n = batch_loss(ctx, "train", examples, mine[s : s + micro], kl_estimate=z0)
        # Normalized by the whole step's example count, so accumulation gives the full batch's gradient.
        loss = out.loss.sum() / len(indices)
        check_finite({metric: loss}, step=step, last_good=last_ckpt)
        par.backward(loss)
        total += float(loss.detach())
        tokens += n
        accumulate_metrics(sums, out.metrics)
        if ctx.reward_shift is not None:
            rewards.append(out.metrics["reward/implicit"])
    if ctx.reward_shift is not None:
        # BCO: fold the step's implicit rewards into the running shift, which the next step uses.
        ctx.reward_shift.update(torch.cat(rewards))
    par.sum_gradients(ctx.model)
    flat = par.sum_all({metric: total, **{f"{k}\0{j}": v[j] for k, v in sums.items() for j in (0, 1)}})
    sums = {k: [flat[f"{k}\0{0}"], flat[f"{k}\0{1}"]] for k in sums}
    forward_only = sum(len(kl_examples[i]["input_ids"]) for i in mine) if kl_examples is not None else 0
    return {metric: flat[metric], **metric_means(sums)}, int(par.sum(tokens)), int(par.sum(forward_only))


@contextlib.contextmanager
def _adapters_off(policy):
    with policy.disable_adapter():
        yield policy


def _setup_reference(
    cfg: DPOConfig, policy, device, pad_id: int, run_dir: Path, sets: dict[str, list[dict]], spec, par=None
) -> tuple[dict[str, Tensor] | None, dict[str, float], Callable | None]:
    """(cached reference log-probs or None, perf of the caching pass, live reference context or None).

    An empty cfg.ref_model means the initial policy: the policy itself fills the cache before its first
    update (nothing else is loaded), and a live LoRA policy switches its adapters off to act as reference.
    A reference model loaded only to fill the cache is dropped as soon as it is filled. A reference-free loss
    (`spec.reference` false) gets (None, {}, None). Across processes (`par`) each fills its share of the rows.
    """
    if not spec.reference:
        return None, {}, None

    def load_other():
        path = resolve_model_path(cfg.ref_model or cfg.model.name_or_path)
        return load_causal_lm(path, dtype=cfg.model.dtype, device=str(device)).eval().requires_grad_(False)

    if not cfg.algo.precompute_ref_logps:
        if not cfg.ref_model and is_peft_model(policy):
            return None, {}, functools.partial(_adapters_off, policy)
        return None, {}, functools.partial(contextlib.nullcontext, load_other())
    precision = cfg.model.dtype + (f", autocast {cfg.model.autocast}" if cfg.model.autocast != "none" else "")
    ref_id = f"{cfg.ref_model or 'initial policy ' + cfg.model.name_or_path} ({precision})"
    batch_size = max(cfg.optim.micro_batch_size or cfg.optim.batch_size, 32)
    cache, perf = cached_reference_logps(
        run_dir,
        ref_id,
        sets,
        spec.data,
        lambda: load_other() if cfg.ref_model else policy,
        device,
        pad_id,
        batch_size,
        amp=mixed_precision(cfg.model, device),
        par=par,
        log=print if par is None or par.is_main else (lambda *_: None),
    )
    return cache, perf, None


def _work(
    examples, kl_examples, indices: list[int], tokens: int, forward_only: int, live: bool
) -> dict[str, int]:
    """One step's work for the throughput counts. Forward-only: the policy over KTO's KL rows; a live reference
    (counted as the policy's architecture) over the same rows as the policy and the KL rows."""
    live_runs = int(live)
    head = response_tokens(examples, indices)
    kl_head = response_tokens(kl_examples, indices) if kl_examples is not None else 0
    return {
        "examples": len(indices),
        "tokens": tokens,
        "head_tokens": head,
        "forward_tokens": (1 + live_runs) * forward_only + live_runs * tokens,
        "forward_head_tokens": (1 + live_runs) * kl_head + live_runs * head,
    }


def _perf(counts: dict[str, int], elapsed: float, params: MatmulParams, what: str) -> dict[str, float]:
    # Model FLOPs (rlhflab.models.flops): trained and forward-only rows, the LM head at response tokens only.
    flops = causal_lm_train_flops(params, counts["tokens"], counts["head_tokens"]) + causal_lm_forward_flops(
        params, counts["forward_tokens"], counts["forward_head_tokens"]
    )
    return {
        f"perf/{what}_per_s": counts["examples"] / elapsed,
        "perf/tokens_per_s": counts["tokens"] / elapsed,
        "perf/flops_per_s": flops / elapsed,
    }


def _announce(cfg: DPOConfig, model, what: str, run_dir: Path, par: DataParallel) -> None:
    if not par.is_main:
        return
    n, trainable = count_parameters(model), count_parameters(model, trainable_only=True)
    print(
        f"dpo: loss {cfg.algo.loss}, {what}, {n / 1e6:.2f}M parameters ({trainable / 1e6:.2f}M trainable), "
        f"run dir {run_dir}" + par.describe()
    )


def _data_parallel(cfg: DPOConfig, spec) -> DataParallel:
    """This process's place among the data-parallel processes, with what cannot run across them refused."""
    par = DataParallel()  # one process, or one of those `accelerate launch` / `torchrun` started
    par.check_batch(cfg.optim.batch_size)
    if par.world > 1 and spec.inputs == "unpaired_shift":
        raise ConfigError(
            "config: algo.loss=bco keeps a running reward shift over each step's whole batch, which does not "
            "run across processes yet; launch one process"
        )
    return par


def train(cfg: DPOConfig, *, resume: bool = False, overwrite: bool = False) -> Path:
    """Train with algo.loss; returns the directory of the final model (RUN/final)."""
    # 1. Setup: seeds, run directory, policy, data.
    spec = PREFERENCE_LOSS_TABLE[cfg.algo.loss]
    require_train_path(cfg.data, spec.data)
    seed_everything(cfg.seed)
    par = _data_parallel(cfg, spec)
    run = open_run(cfg, "dpo", cfg.logging, resume=resume, overwrite=overwrite, parallel=par)
    model, tokenizer, device = load_policy(cfg.model, device=par.device)
    train_records, eval_records = _load_records(cfg, spec.data, run.dir)
    kl_rows = spec.inputs == "unpaired"  # KTO's KL estimate reads mismatched (prompt, completion) rows
    examples, kl_examples = _tokenize_records(train_records, spec.data, tokenizer, cfg, mismatched=kl_rows)
    eval_examples, eval_kl = _tokenize_records(eval_records, spec.data, tokenizer, cfg, mismatched=kl_rows)
    what = "pairs" if spec.data == "pairwise" else "examples"
    total_steps, steps_per_epoch = num_optimizer_steps(len(examples), cfg.optim, what=what)
    _announce(cfg, model, f"{len(examples)} {what}, {total_steps} steps", run.dir, par)

    # 2. Reference log-probs, once, before the first update (and before a checkpoint replaces the weights).
    kl_sets = {"train_kl": kl_examples, "eval_kl": eval_kl} if kl_examples is not None else {}
    sets = {"train": examples, "eval": eval_examples, **kl_sets}
    amp, pad_id = mixed_precision(cfg.model, device), tokenizer.pad_token_id
    # With several processes each computes its share of the rows; the main one writes the cache.
    ref_cache, ref_perf, live = _setup_reference(cfg, model, device, pad_id, run.dir, sets, spec, par)
    # Sharded across the processes under FSDP: after the reference pass, before the optimizer sees it.
    model = par.prepare(model)
    shift = BCORewardShift() if spec.inputs == "unpaired_shift" else None
    ctx = PreferenceContext(model, spec, cfg.algo, device, pad_id, ref_cache, live, amp, reward_shift=shift)
    optimizer, scheduler = build_optimizer(model, cfg.optim, total_steps)
    par.attach(model, optimizer, cfg.optim)
    state = (lambda: {"reward_shift": shift.state_dict()}) if shift is not None else None
    snapshot = functools.partial(save_model, model, tokenizer, merge_lora=cfg.model.lora.merge)
    loop = Loop(run, "dpo", cfg.logging, total_steps, model, optimizer, scheduler, resume=resume, state=state,
                snapshot=snapshot, parallel=par)  # fmt: skip
    if shift is not None and "reward_shift" in loop.resumed_state:
        shift.load_state_dict(loop.resumed_state["reward_shift"])
    if ref_perf:
        run.logger.log(loop.step, ref_perf)

    # 3. Loop: one optimizer step per batch; the batch order is a function of (seed, epoch).
    model.train()
    while loop.step < loop.total:
        epoch, position = divmod(loop.step, steps_per_epoch)
        indices = batch_schedule(len(examples), cfg.optim.batch_size, cfg.seed, epoch)[position]
        metrics, tokens, forward_only = _preference_gradients(
            ctx, examples, kl_examples, indices, cfg.optim.micro_batch_size or cfg.optim.batch_size, loop.step + 1,
            loop.last_ckpt, par,
        )  # fmt: skip
        # DeepSpeed's engine clips and applies the update itself (at the step's last micro-batch).
        grad_norm = (
            par.deepspeed_step(scheduler) if par.engine else clip_gradients(model, cfg.optim.max_grad_norm)
        )
        check_finite({"loss/grad_norm": grad_norm}, step=loop.step + 1, last_good=loop.last_ckpt)
        if par.engine is None:
            optimizer_step(optimizer, scheduler)
        loop.count(**_work(examples, kl_examples, indices, tokens, forward_only, live is not None))

        # 4. Log, evaluate, checkpoint.
        loop.end_step(
            {
                **metrics,
                "loss/grad_norm": grad_norm,
                "perf/lr": scheduler.get_last_lr()[0],
                "perf/epoch": (loop.step + 1) / steps_per_epoch,
            },
            perf=lambda counts, seconds: _perf(counts, seconds, matmul_params(model), what),
            show={"loss": f"loss/{cfg.algo.loss}"},
            evaluate=(lambda: evaluate(ctx, eval_examples, eval_kl)) if eval_examples else None,
        )
    loop.close()

    # 5. Save the final model (HF format) and the final evaluation: the main process does them.
    final_eval = (lambda: evaluate(ctx, eval_examples, eval_kl)) if eval_examples else None
    finish(par, run, model, "dpo", loop.step, final_eval,
           lambda: save_model(ctx.model, tokenizer, run.dir / "final", merge_lora=cfg.model.lora.merge))  # fmt: skip
    return run.dir / "final"
