"""Reward-model training from pairwise comparisons or K-wise rankings (InstructGPT step 2).

The reward model is the SFT model's backbone plus a linear head read at the last real token (initialized
from the SFT model, as in Ouyang et al. 2022). It learns from

  - pairwise data: -log sigma(r_c - r_r - m), Bradley-Terry with Llama 2's margin m taken from the record's
    numeric `margin` or from its `rating` through the small/large table (Touvron et al. 2023, Table 27);
  - pairwise data with algo.loss=distributional: a mean and a log-variance per response (heads 'mean' and
    'log_var'), -log Phi((mu_c - mu_r) / sqrt(sigma_c^2 + sigma_r^2)) (Siththaranjan et al. 2023's
    mean-and-variance DPL); held-out accuracy and eval loss are those of the means (eval/mean/*);
  - K-wise rankings: Plackett-Luce, or InstructGPT's mean over all K-choose-2 pairs; tied responses
    are skipped by all_pairs and marginalized (every order of the tie) by Plackett-Luce.

  - single labelled responses (algo.loss=binary): a classifier, -[y log sigma(r) + (1 - y) log sigma(-r)],
    Sparrow's rule-violation models (Glaese et al. 2022), one head per rule with its own file, or an outcome
    reward model (label = the final answer is right; Lightman et al. 2023, Sec. 2.5);
  - solutions with a label per step (algo.loss=step): a process reward model, the same classifier read at the
    last token of each step + data.step_separator (Lightman et al. 2023, Sec. 2.6; TRL's stepwise format).

Several heads can share the backbone (algo.heads, one data file per head, e.g. helpfulness and safety);
a record trains only the head of its file, and all heads train in the same batches. Held-out accuracy is
reported overall and per Llama 2 rating (Table 28 layout, also written to RUN/eval_accuracy.md). After
training, the per-head mean/std of the rewards of training responses are stored in the model, so reward
sources can whiten them (Llama 2).

    rlhflab rm --config configs/rm_tiny.yaml model.name_or_path=runs/sft/final

All responses of a batch go through the model in one forward and one backward. Each example's prompt
runs once for all its responses (algo.share_prompt): one row prompt, chosen, rejected, where the rejected
response attends to the prompt but not to the chosen one, so rewards are those of separate rows.
Setup -> loop -> save, read top to bottom.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import torch

from rlhflab.config import RewardConfig
from rlhflab.core.health import check_finite
from rlhflab.core.io import atomic_write_text
from rlhflab.core.seeding import batch_schedule, seed_everything
from rlhflab.data.reward_batch import collate_reward_batch
from rlhflab.eval.reward_accuracy import format_accuracy_table
from rlhflab.losses import (
    LossOutput,
)
from rlhflab.losses.reward import (
    binary_classifier,
    process_reward_loss,
    ranked_loss,
    stacked_bradley_terry,
    stacked_distributional,
)
from rlhflab.models.final_layer import SHARED_PROMPT_MODEL_TYPES, supports_shared_prompt
from rlhflab.models.flops import matmul_params, reward_model_train_flops
from rlhflab.models.loading import (
    apply_lora,
    count_parameters,
    enable_gradient_checkpointing,
    load_backbone,
    load_tokenizer,
)
from rlhflab.models.reward_model import RewardModel, batch_rewards
from rlhflab.rewards.learned import SETTINGS_FILE
from rlhflab.stages.common import (
    Loop,
    build_optimizer,
    clip_gradients,
    lora_settings,
    mixed_precision,
    num_optimizer_steps,
    open_run,
    optimizer_step,
    resolve_device,
    resolve_model_path,
)
from rlhflab.stages.data_source import require_train_path
from rlhflab.stages.parallel import DataParallel
from rlhflab.stages.reward_data import MAX_TIE_ORDERS, load_examples
from rlhflab.stages.reward_eval import evaluate_with_tables, fit_normalization, fit_step_normalization

# --------------------------------------------------------------------------------------------------------
# Forward and losses (the maths is rlhflab.losses; here only which rows meet which)
# --------------------------------------------------------------------------------------------------------


# What each loss trains on: pairs, single labelled responses, solutions labelled step by step, or (every other
# loss) K-wise rankings.
DATA_KIND = {
    "bradley_terry": "pairwise",
    "binary": "unpaired",
    "step": "stepwise",
    "distributional": "pairwise",
}
# Losses whose model has heads of its own (not algo.heads): distributional DPL reads a mean and a log-variance.
OUTPUT_HEADS = {"distributional": ["mean", "log_var"]}


def _row_rewards(model: RewardModel, batch: dict, device: torch.device) -> torch.Tensor:
    """Each response's reward from the head it trains: [N] float32."""
    return batch_rewards(model, batch, device).gather(1, batch["row_head"].to(device)[:, None]).squeeze(1)


def _step_rewards(model: RewardModel, batch: dict, device: torch.device) -> torch.Tensor:
    """Each row's score at every position from the head it trains: [B, T] float32."""
    scores = model.token_rewards(batch["input_ids"].to(device), batch["attention_mask"].to(device))
    heads = batch["row_head"].to(device)[:, None, None].expand(-1, scores.shape[1], 1)
    return scores.gather(2, heads).squeeze(2)


def _bradley_terry_pairs(model: RewardModel, batch: dict, cfg: RewardConfig, device) -> LossOutput:
    algo = cfg.algo
    margin = batch["margin"].to(device) if algo.margin != "none" else None
    return stacked_bradley_terry(
        _row_rewards(model, batch, device),
        margin,
        label_smoothing=algo.label_smoothing,
        center_coef=algo.center_rewards_coef,
    )


def _distributional_pairs(model: RewardModel, batch: dict, cfg: RewardConfig, device) -> LossOutput:
    # Both heads of every row: column 0 the mean, column 1 the log-variance (OUTPUT_HEADS).
    return stacked_distributional(
        batch_rewards(model, batch, device), center_coef=cfg.algo.center_rewards_coef
    )


# algo.loss -> the loss of a pairwise batch.
PAIRWISE_LOSSES = {"bradley_terry": _bradley_terry_pairs, "distributional": _distributional_pairs}


def _batch_loss(model: RewardModel, batch: dict, kind: str, cfg: RewardConfig, device) -> LossOutput:
    if kind == "pairwise":
        return PAIRWISE_LOSSES[cfg.algo.loss](model, batch, cfg, device)
    if kind == "stepwise":
        scores = _step_rewards(model, batch, device)
        return process_reward_loss(scores, batch["step_labels"].to(device), batch["step_mask"].to(device))
    scores = _row_rewards(model, batch, device)
    algo = cfg.algo
    if kind == "unpaired":
        return binary_classifier(scores, batch["label"].to(device), center_coef=algo.center_rewards_coef)
    return ranked_loss(
        scores,
        batch["num_responses"],
        batch["ranks"],
        loss=algo.loss,
        label_smoothing=algo.label_smoothing,
        center_coef=algo.center_rewards_coef,
        max_orders=MAX_TIE_ORDERS,
    )


# --------------------------------------------------------------------------------------------------------
# The stage
# --------------------------------------------------------------------------------------------------------


def _build_model(
    cfg: RewardConfig, path: str, head_names: list[str], device: torch.device | None = None
) -> tuple[RewardModel, torch.device]:
    """The SFT model's backbone (its LM head never loaded) with fresh reward heads; `device` overrides
    model.device (the device a data-parallel launcher gave this process)."""
    device = device if device is not None else resolve_device(cfg.model.device)
    backbone = load_backbone(path, dtype=cfg.model.dtype, device=str(device))
    if cfg.model.gradient_checkpointing:
        enable_gradient_checkpointing(backbone)
    if cfg.model.lora.enabled:
        backbone = apply_lora(backbone, lora_settings(cfg.model.lora))
        # Saved (without model.lora.merge) as a delta from this directory's backbone.
        backbone.peft_config["default"].base_model_name_or_path = str(Path(path).resolve())
    return RewardModel(backbone, len(head_names), head_names), device


def _reward_gradients(
    model,
    examples: list[dict],
    kind: str,
    cfg: RewardConfig,
    device,
    pad_id: int,
    step: int,
    last_ckpt,
    shared: bool = False,
    n_batch: int | None = None,
    backward=torch.Tensor.backward,
) -> tuple[dict[str, float], int]:
    """Forward/backward of one optimizer step's micro-batches; returns (mean metrics, real tokens seen).
    `n_batch`: the whole step's example count when `examples` is this process's share of it (data parallel):
    losses and metrics are normalized by it, so their sums over the processes are the step's. `backward(loss)`:
    `DataParallel.backward` (DeepSpeed's engine runs it), else the loss's own."""
    n_batch = n_batch or len(examples)
    size = cfg.optim.micro_batch_size or len(examples)
    amp = mixed_precision(cfg.model, device)
    sums: dict[str, float] = {}
    tokens = 0
    for s in range(0, len(examples), size):
        batch = collate_reward_batch(
            examples[s : s + size], kind, pad_id, shared=shared, dtype=model.score.weight.dtype
        )
        with amp():
            out = _batch_loss(model, batch, kind, cfg, device)
        # Normalized by the whole step's example count, so accumulation gives the full batch's gradient.
        loss = out.loss.sum() / n_batch
        check_finite({"loss/rm": loss}, step=step, last_good=last_ckpt)
        backward(loss)
        tokens += int(batch["attention_mask"].sum())
        sums["loss/rm"] = sums.get("loss/rm", 0.0) + float(loss.detach())
        for k, v in out.metrics.items():
            sums[k] = sums.get(k, 0.0) + float(v.sum()) / n_batch
    return sums, tokens


def _work(batch: list[dict], kind: str) -> dict[str, int]:
    """What a batch costs: comparisons it trains on (`pairs`; a labelled response counts one) and responses
    read (`reads`)."""
    if kind == "pairwise":
        return {"pairs": len(batch), "reads": 2 * len(batch)}
    if kind == "unpaired":
        return {"pairs": len(batch), "reads": len(batch)}
    if kind == "stepwise":  # every labelled step is a label; the final layer and head run at every token
        steps = sum(len(e["step_positions"]) for e in batch)
        return {"pairs": steps, "reads": sum(len(e["input_ids"]) for e in batch)}
    return {"pairs": sum(len(e["pairs"]) for e in batch), "reads": sum(len(e["input_ids"]) for e in batch)}


def _report(
    run, step: int, model, eval_examples, kind, device, pad_id, shared: bool, write: bool = True
) -> None:
    """The final evaluation, logged, printed and written (`write`: by the main process)."""
    metrics, tables = evaluate_with_tables(model, eval_examples, kind, device, pad_id, shared=shared)
    run.logger.log(step, metrics)
    if not write:
        return
    print("rm: " + "  ".join(f"{k}={v:.4f}" for k, v in metrics.items() if "/accuracy/" not in k))
    if tables:
        text = format_accuracy_table(tables)
        atomic_write_text(run.dir / "eval_accuracy.md", text)
        atomic_write_text(run.dir / "eval_accuracy.json", json.dumps(tables, indent=2))
        print(text, end="")


def _perf(counts: dict[str, float], seconds: float, model: RewardModel) -> dict[str, float]:
    # Model FLOPs (rlhflab.models.flops): no LM head, the final layer's non-K/V work only at the reads.
    flops = reward_model_train_flops(matmul_params(model), counts.get("tokens", 0), counts.get("reads", 0))
    return {
        "perf/pairs_per_s": counts.get("pairs", 0) / seconds,
        "perf/tokens_per_s": counts.get("tokens", 0) / seconds,
        "perf/flops_per_s": flops / seconds,
    }


def _shared_prompt(cfg: RewardConfig, model: RewardModel) -> bool:
    """Whether batches run each prompt once for all its responses (algo.share_prompt, where the model can;
    never for single responses or solutions, which have no prompt to share)."""
    if DATA_KIND.get(cfg.algo.loss) in ("unpaired", "stepwise"):
        return False
    shared = cfg.algo.share_prompt and supports_shared_prompt(model)
    if cfg.algo.share_prompt and not shared:
        print(
            f"rm: one row per response: shared-prompt rows need a {'/'.join(SHARED_PROMPT_MODEL_TYPES)} "
            "backbone with sdpa or eager attention and no sliding window"
        )
    return shared


def _save(
    cfg: RewardConfig, model: RewardModel, tokenizer, out: Path, step_stats: dict | None = None
) -> Path:
    """The model in HF *ForSequenceClassification format (with LoRA and not model.lora.merge: the adapter and the
    heads), and how training tokenized beside it, so `rlhflab.rewards.LearnedReward` scores new responses alike
    (a process reward model: its step separator, and the statistics of its solution scores for whitening)."""
    final = model.save_pretrained(out, tokenizer, merge_lora=cfg.model.lora.merge)
    settings = {
        "max_length": cfg.data.max_length,
        "max_prompt_length": cfg.data.max_prompt_length,
        "head_names": model.head_names,
        "loss": cfg.algo.loss,
    }
    if cfg.algo.loss == "step":
        settings["step_separator"] = cfg.data.step_separator
        settings["score_stats"] = step_stats or {}
    atomic_write_text(final / SETTINGS_FILE, json.dumps(settings, indent=2))
    return final


def _normalize(
    run, step: int, cfg: RewardConfig, model, examples, kind: str, device, pad_id, shared
) -> dict | None:
    """Reward statistics for whitening, logged: per head in the model, or (a process reward model) per head and
    solution-score aggregate, returned for the settings file. None when algo.normalization_samples is 0."""
    n = cfg.algo.normalization_samples
    if not n:
        return None
    if kind == "stepwise":
        stats, logged = fit_step_normalization(model, examples, device, pad_id, n, cfg.seed)
        run.logger.log(step, logged)
        return stats
    run.logger.log(step, fit_normalization(model, examples, kind, device, pad_id, n, cfg.seed, shared=shared))
    return None


def _finish(
    cfg, par, run, step, model, tokenizer, examples, eval_examples, kind, device, pad_id, shared
) -> None:
    """The final evaluation, the reward statistics and the model, written by the main process (a sharded model's
    every process evaluates, and gathers the weights to save); the others return once it is saved."""
    if par.is_main or par.sharded:
        if eval_examples:
            _report(run, step, model, eval_examples, kind, device, pad_id, shared, write=par.is_main)
        step_stats = _normalize(run, step, cfg, model, examples, kind, device, pad_id, shared)
    with par.full_weights(model):
        if par.is_main:
            _save(cfg, model, tokenizer, run.dir / "final", step_stats)
            run.close()
            print(f"rm: saved the reward model to {run.dir / 'final'}")
    par.wait()


def _announce(
    model, kind: str, examples: list, eval_examples: list, total_steps: int, run_dir: Path, spread: str = ""
) -> None:
    print(
        f"rm: {len(examples)} {kind} records ({len(eval_examples)} held out), heads {model.head_names}, "
        f"{total_steps} steps, {count_parameters(model) / 1e6:.2f}M parameters, run dir {run_dir}" + spread
    )
    if not eval_examples:
        print("rm: no held-out data, so no accuracy is reported; set data.eval_path or data.eval_fraction")


def train(cfg: RewardConfig, *, resume: bool = False, overwrite: bool = False) -> Path:
    """Train a reward model; returns the directory of the final model (RUN/final, a *ForSequenceClassification)."""
    # 1. Setup: seeds, run directory, model, data.
    kind = DATA_KIND.get(cfg.algo.loss, "ranked")
    if any(not h.data for h in cfg.algo.head_specs()):
        require_train_path(cfg.data, kind)
    seed_everything(cfg.seed)
    par = DataParallel()  # one process, or one of those `accelerate launch` / `torchrun` started
    par.check_batch(cfg.optim.batch_size)
    run = open_run(cfg, "rm", cfg.logging, resume=resume, overwrite=overwrite, parallel=par)
    path = resolve_model_path(cfg.model.name_or_path)
    tokenizer = load_tokenizer(path)
    heads = OUTPUT_HEADS.get(cfg.algo.loss) or [h.name for h in cfg.algo.head_specs()]
    model, device = _build_model(cfg, path, heads, par.device)
    model = par.prepare(model)  # sharded across the processes under FSDP, before the optimizer sees it
    examples, eval_examples = load_examples(cfg, kind, tokenizer, run.dir)
    pad_id = tokenizer.pad_token_id
    shared = _shared_prompt(cfg, model)
    total_steps, steps_per_epoch = num_optimizer_steps(len(examples), cfg.optim, what=f"{kind} records")
    optimizer, scheduler = build_optimizer(model, cfg.optim, total_steps)
    par.attach(model, optimizer, cfg.optim)
    if par.is_main:
        _announce(model, kind, examples, eval_examples, total_steps, run.dir, par.describe())

    snapshot = functools.partial(_save, cfg, model, tokenizer)
    loop = Loop(run, "rm", cfg.logging, total_steps, model, optimizer, scheduler, resume=resume,
                snapshot=snapshot, parallel=par)  # fmt: skip
    if loop.step == 0 and eval_examples and cfg.logging.eval_every:  # the untrained baseline
        baseline = par.on_main(
            lambda: evaluate_with_tables(model, eval_examples, kind, device, pad_id, shared=shared)
        )
        if par.is_main:
            run.logger.log(0, baseline[0])

    # 2. Loop: one optimizer step per batch; the batch order is a function of (seed, epoch).
    model.train()
    while loop.step < loop.total:
        epoch, position = divmod(loop.step, steps_per_epoch)
        batch = [
            examples[i]
            for i in batch_schedule(len(examples), cfg.optim.batch_size, cfg.seed, epoch)[position]
        ]
        # Each process takes its share of the step's batch, normalized by the whole batch's size, so the
        # gradients and metrics summed across processes are the whole batch's.
        stats, n_tokens = _reward_gradients(
            model, par.shard(batch), kind, cfg, device, pad_id, loop.step + 1, loop.last_ckpt, shared,
            n_batch=len(batch), backward=par.backward,
        )  # fmt: skip
        par.sum_gradients(model)
        stats = par.sum_all(stats)
        # DeepSpeed's engine clips and applies the update itself (at the step's last micro-batch).
        grad_norm = (
            par.deepspeed_step(scheduler) if par.engine else clip_gradients(model, cfg.optim.max_grad_norm)
        )
        check_finite({"loss/grad_norm": grad_norm}, step=loop.step + 1, last_good=loop.last_ckpt)
        if par.engine is None:
            optimizer_step(optimizer, scheduler)
        loop.count(tokens=par.sum(n_tokens), **_work(batch, kind))

        # 3. Log, evaluate, checkpoint.
        loop.end_step(
            {
                **stats,
                "loss/grad_norm": grad_norm,
                "perf/lr": scheduler.get_last_lr()[0],
                "perf/epoch": (loop.step + 1) / steps_per_epoch,
            },
            perf=lambda counts, seconds: _perf(counts, seconds, model),
            show={"loss": "loss/rm", "acc": "reward/accuracy"},
            evaluate=(
                lambda: evaluate_with_tables(model, eval_examples, kind, device, pad_id, shared=shared)[0]
            )
            if eval_examples
            else None,
        )
    loop.close()

    # 4. Final evaluation, reward normalization statistics, save (HF *ForSequenceClassification format).
    _finish(cfg, par, run, loop.step, model, tokenizer, examples, eval_examples, kind, device, pad_id, shared)
    return run.dir / "final"
