"""Supervised fine-tuning on demonstrations (InstructGPT step 1).

The model learns to imitate the completions; prompt tokens are masked out of the loss (mask True = the
token counts), so it is never trained to produce the user's side of a conversation.

    rlhflab sft --config configs/sft_tiny.yaml optim.lr=3e-4

Setup -> loop -> save, read top to bottom.
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch

from rlhflab.config import SFTConfig
from rlhflab.core.health import check_finite
from rlhflab.core.seeding import batch_schedule, seed_everything
from rlhflab.data import collate_packed, collate_sft, pack_sequences, tokenize_sft
from rlhflab.losses import sft_nll
from rlhflab.models.flops import causal_lm_train_flops, matmul_params
from rlhflab.models.loading import count_parameters, save_model
from rlhflab.models.logprobs import token_logps
from rlhflab.stages.common import (
    Loop,
    build_optimizer,
    clip_gradients,
    finish,
    load_policy,
    mixed_precision,
    num_optimizer_steps,
    open_run,
    optimizer_step,
)
from rlhflab.stages.data_source import load_stage_records, require_train_path
from rlhflab.stages.parallel import DataParallel


def _micro_batches(examples: list[dict], indices: list[int], cfg: SFTConfig, pad_id: int):
    """Collated micro-batches of one optimizer step (packed rows when data.packing is on)."""
    chosen = [examples[i] for i in indices]
    if cfg.data.packing:
        rows = pack_sequences(chosen, cfg.data.max_length)
        return [collate_packed(rows, pad_token_id=pad_id)]
    size = cfg.optim.micro_batch_size or len(chosen)
    return [collate_sft(chosen[i : i + size], pad_token_id=pad_id) for i in range(0, len(chosen), size)]


def _loss(model, batch: dict, device, reduction: str, n_batch_tokens: int, n_batch_seqs: int):
    """Loss of one micro-batch, scaled so that the micro-batches of a step add up to the step's loss."""
    batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    mask = batch["loss_mask"].bool()
    logps = token_logps(
        model,
        batch["input_ids"],
        batch["attention_mask"],
        mask,
        position_ids=batch.get("position_ids"),
        attention_mask_4d=batch.get("attention_mask_4d"),
    )
    target = mask[:, 1:]
    per_example = sft_nll(logps, target, reduction="sequence_sum").loss
    # Normalize by the whole step's token (or sequence) count, not the micro-batch's, so gradient
    # accumulation gives exactly the gradient of the full batch.
    total = per_example.sum() / (n_batch_tokens if reduction == "token_mean" else n_batch_seqs)
    return total, int(target.sum())


def _announce(examples: list[dict], total_steps: int, model, run_dir: Path, par: DataParallel) -> None:
    if not par.is_main:
        return
    n_params = count_parameters(model)
    print(
        f"sft: {len(examples)} demonstrations, {total_steps} steps, {n_params / 1e6:.2f}M parameters "
        f"({count_parameters(model, trainable_only=True) / 1e6:.2f}M trainable), run dir {run_dir}"
        + par.describe()
    )


def evaluate(model, examples: list[dict], device, pad_id: int, batch_size: int = 32) -> dict[str, float]:
    """Token-mean NLL and perplexity on held-out demonstrations."""
    model.eval()
    nll, tokens = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(examples), batch_size):
            batch = collate_sft(examples[i : i + batch_size], pad_token_id=pad_id)
            batch = {k: v.to(device) for k, v in batch.items()}
            mask = batch["loss_mask"].bool()
            logps = token_logps(model, batch["input_ids"], batch["attention_mask"], mask)
            nll -= float(logps.sum())
            tokens += int(mask[:, 1:].sum())
    model.train()
    mean = nll / max(tokens, 1)
    return {"eval/nll": mean, "eval/ppl": float(torch.tensor(mean).exp())}


def train(cfg: SFTConfig, *, resume: bool = False, overwrite: bool = False) -> Path:
    """Run SFT; returns the directory of the final model (RUN/final)."""
    # 1. Setup: seeds, run directory, model, data.
    require_train_path(cfg.data, "sft")
    seed_everything(cfg.seed)
    par = DataParallel()  # one process, or one of those `accelerate launch` / `torchrun` started
    par.check_batch(cfg.optim.batch_size)
    run = open_run(cfg, "sft", cfg.logging, resume=resume, overwrite=overwrite, parallel=par)
    model, tokenizer, device = load_policy(cfg.model, device=par.device)
    model = par.prepare(model)  # sharded across the processes under FSDP, before the optimizer sees it
    train_records, eval_records = load_stage_records(cfg.data, "sft", seed=cfg.seed)
    kw = {"max_length": cfg.data.max_length, "max_prompt_length": cfg.data.max_prompt_length}
    examples = [tokenize_sft(r, tokenizer, **kw) for r in train_records]
    eval_examples = [tokenize_sft(r, tokenizer, **kw) for r in eval_records]
    total_steps, steps_per_epoch = num_optimizer_steps(len(examples), cfg.optim)
    optimizer, scheduler = build_optimizer(model, cfg.optim, total_steps)
    par.attach(model, optimizer, cfg.optim, packed=cfg.data.packing)
    _announce(examples, total_steps, model, run.dir, par)
    snapshot = functools.partial(save_model, model, tokenizer, merge_lora=cfg.model.lora.merge)
    loop = Loop(run, "sft", cfg.logging, total_steps, model, optimizer, scheduler, resume=resume,
                snapshot=snapshot, parallel=par)  # fmt: skip

    # 2. Loop: one optimizer step per batch; the batch order is a function of (seed, epoch).
    model.train()
    amp = mixed_precision(cfg.model, device)  # forward passes in bf16 under model.autocast=bf16
    while loop.step < loop.total:
        epoch, position = divmod(loop.step, steps_per_epoch)
        indices = batch_schedule(len(examples), cfg.optim.batch_size, cfg.seed, epoch)[position]
        n_tokens = sum(sum(examples[i]["loss_mask"][1:]) for i in indices)
        step_loss, trained = 0.0, 0
        # Each process takes its share of the step's batch; the loss stays normalized by the whole batch's
        # count, so the gradients summed across processes are the whole batch's.
        for batch in _micro_batches(examples, par.shard(indices), cfg, tokenizer.pad_token_id):
            with amp():
                loss, n = _loss(model, batch, device, cfg.algo.loss_reduction, max(n_tokens, 1), len(indices))
            check_finite({"loss/sft": loss}, step=loop.step + 1, last_good=loop.last_ckpt)
            par.backward(loss)
            step_loss += float(loss.detach())
            trained += n
        par.sum_gradients(model)
        step_loss = par.sum(step_loss)
        # DeepSpeed's engine clips and applies the update itself (at the step's last micro-batch).
        grad_norm = (
            par.deepspeed_step(scheduler) if par.engine else clip_gradients(model, cfg.optim.max_grad_norm)
        )
        check_finite({"loss/grad_norm": grad_norm}, step=loop.step + 1, last_good=loop.last_ckpt)
        if par.engine is None:
            optimizer_step(optimizer, scheduler)
        # The body runs at every real token, the LM head only at the trained (response) tokens.
        loop.count(tokens=par.sum(trained), real=sum(len(examples[i]["input_ids"]) for i in indices))

        # 3. Log, evaluate, checkpoint.
        loop.end_step(
            {
                "loss/sft": step_loss,
                "loss/grad_norm": grad_norm,
                "perf/lr": scheduler.get_last_lr()[0],
                "perf/epoch": (loop.step + 1) / steps_per_epoch,
            },
            perf=lambda counts, seconds: {
                "perf/tokens_per_s": counts["tokens"] / seconds,
                "perf/flops_per_s": causal_lm_train_flops(
                    matmul_params(model), counts["real"], counts["tokens"]
                )
                / seconds,
            },
            show={"loss": "loss/sft"},
            evaluate=(lambda: evaluate(model, eval_examples, device, tokenizer.pad_token_id))
            if eval_examples
            else None,
        )
    loop.close()

    # 4. The final evaluation and the model (HF format), written by the main process.
    final_eval = (
        (lambda: evaluate(model, eval_examples, device, tokenizer.pad_token_id)) if eval_examples else None
    )
    finish(par, run, model, "sft", loop.step, final_eval,
           lambda: save_model(model, tokenizer, run.dir / "final", merge_lora=cfg.model.lora.merge))  # fmt: skip
    return run.dir / "final"
