"""General preference model training (`rlhflab pm`): P(first preferred | prompt) from both responses.

A reward model (`rlhflab rm`) scores each response alone, so the preferences it can express are transitive
(Bradley-Terry). A general preference model reads the prompt and BOTH responses (Jiang et al. 2023, PairRM;
Munos et al. 2023, "Nash Learning from Human Feedback", Sec. 3) and can represent any preference, intransitive
ones included: the preference that DNO (`rlhflab iterative-dpo algo.mode=dno`) and other Nash methods optimize.

The model is the SFT model's backbone plus a one-output head, read at the last token of

    prompt, response A, EOS, response B, EOS                  -> g(x, a, b)

and its preference logit is the antisymmetric s(x, a, b) = g(x, a, b) - g(x, b, a), so P(a > b) + P(b > a) = 1
holds exactly and one pair trains both orders (`rlhflab.models.preference_model`). It learns from the pairs
files `rlhflab rm` reads (prompt, chosen, rejected) by the binary cross-entropy of
`rlhflab.losses.general_preference` (label 1: chosen first), and is used as a feedback source with
`algo.feedback=preference_model algo.preference_model=RUN/final` (online-dpo, iterative-dpo).

    rlhflab pm --config configs/pm_tiny.yaml model.name_or_path=runs/sft_tiny/final

Every pair costs one forward of its two orders (2 rows) and one backward. Held-out loss and accuracy
(data.eval_path or data.eval_fraction) are logged as eval/loss and eval/accuracy. Setup -> loop -> save.

Launched by `torchrun` / `accelerate launch` it runs data-parallel (`stages.parallel`): every process walks the
same batch schedule and takes its share of each step's pairs, its loss divided by the whole step's pair count, and
the gradients are summed, so W processes take one process's steps with the same optim.batch_size (up to the order
of floating-point additions). The logged loss and per-pair metrics are the whole batch's; the main process alone
evaluates and writes (metrics, checkpoints, RUN/final), and --resume continues from a checkpoint whatever the
number of processes that wrote it. With an FSDP accelerate config the scorer is sharded as `rlhflab rm`'s reward
model is, and every process takes part in the evaluations and the gathering of the weights.
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch

from rlhflab.config import PMConfig
from rlhflab.core.health import check_finite
from rlhflab.core.seeding import batch_schedule, seed_everything
from rlhflab.errors import ConfigError
from rlhflab.losses import LossOutput
from rlhflab.losses.general_preference import general_preference
from rlhflab.models.flops import matmul_params, reward_model_train_flops
from rlhflab.models.loading import (
    apply_lora,
    count_parameters,
    enable_gradient_checkpointing,
    load_backbone,
    load_tokenizer,
)
from rlhflab.models.preference_model import PreferenceModel, collate_comparisons, encode_comparison
from rlhflab.models.reward_model import RewardModel
from rlhflab.stages.common import (
    Loop,
    accumulate_metrics,
    build_optimizer,
    clip_gradients,
    finish,
    lora_settings,
    mixed_precision,
    num_optimizer_steps,
    open_run,
    optimizer_step,
    resolve_device,
    resolve_model_path,
)
from rlhflab.stages.data_source import load_stage_records, require_train_path
from rlhflab.stages.parallel import DataParallel

NAME = "pm"
EVAL_BATCH = 64


def load_examples(cfg: PMConfig, tokenizer) -> tuple[list[dict], list[dict]]:
    """(train, eval) examples: each pair's two orders, (x, chosen, rejected) and (x, rejected, chosen)."""
    records, eval_records = load_stage_records(cfg.data, "pairwise", seed=cfg.seed)
    kw = {"max_length": cfg.data.max_length, "max_prompt_length": cfg.data.max_prompt_length}

    def example(r) -> dict:
        return {
            "forward": encode_comparison(r.prompt, r.chosen, r.rejected, tokenizer, **kw),
            "backward": encode_comparison(r.prompt, r.rejected, r.chosen, tokenizer, **kw),
        }

    return [example(r) for r in records], [example(r) for r in eval_records]


def batch_loss(model: PreferenceModel, examples: list[dict], pad_id: int, device, label_smoothing: float):
    """The loss of `examples` (every label 1: the chosen response is the first): LossOutput and real tokens."""
    batch = collate_comparisons([e["forward"] for e in examples], [e["backward"] for e in examples], pad_id)
    forward, backward = model.pair_logits(batch, device)
    labels = torch.ones_like(forward)
    return general_preference(forward, backward, labels, label_smoothing), int(batch["attention_mask"].sum())


@torch.no_grad()
def evaluate(model: PreferenceModel, examples: list[dict], pad_id: int, device) -> dict[str, float]:
    """Held-out eval/loss (without label smoothing) and eval/accuracy (P(chosen first) > 1/2)."""
    was_training = model.training
    model.eval()
    outs: list[LossOutput] = []
    for s in range(0, len(examples), EVAL_BATCH):
        outs.append(batch_loss(model, examples[s : s + EVAL_BATCH], pad_id, device, 0.0)[0])
    model.train(was_training)
    loss = torch.cat([o.loss for o in outs])
    accuracy = torch.cat([o.metrics["reward/accuracy"] for o in outs])
    return {"eval/loss": float(loss.mean()), "eval/accuracy": float(accuracy.mean())}


def _gradients(model, examples, cfg: PMConfig, device, pad_id: int, step: int, last_ckpt, n_batch: int):
    """Forward/backward of one optimizer step's micro-batches of `examples` (this process's share of a step of
    `n_batch` pairs): (the loss, normalized by `n_batch`, {metric: [sum, count]}, real tokens seen)."""
    size = cfg.optim.micro_batch_size or len(examples)
    amp = mixed_precision(cfg.model, device)
    sums: dict[str, list[float]] = {}
    total, tokens = 0.0, 0
    for s in range(0, len(examples), size):
        with amp():
            out, n_tokens = batch_loss(
                model, examples[s : s + size], pad_id, device, cfg.algo.label_smoothing
            )
        # Normalized by the whole step's pair count, so the micro-batches of every process add up to the full
        # batch's gradient.
        loss = out.loss.sum() / n_batch
        check_finite({"loss/pm": loss}, step=step, last_good=last_ckpt)
        loss.backward()
        total += float(loss.detach())
        tokens += n_tokens
        accumulate_metrics(sums, out.metrics)
    return total, sums, tokens


def _build_model(
    cfg: PMConfig, path: str, tokenizer, device: torch.device | None = None
) -> tuple[PreferenceModel, torch.device]:
    """The SFT model's backbone (its LM head never loaded) with a fresh one-output head; `device` overrides
    model.device (the device a data-parallel launcher gave this process)."""
    device = device if device is not None else resolve_device(cfg.model.device)
    backbone = load_backbone(path, dtype=cfg.model.dtype, device=str(device))
    if cfg.model.gradient_checkpointing:
        enable_gradient_checkpointing(backbone)
    if cfg.model.lora.enabled:
        backbone = apply_lora(backbone, lora_settings(cfg.model.lora))
    scorer = RewardModel(backbone, 1, ["preference"])
    model = PreferenceModel(
        scorer, tokenizer, max_length=cfg.data.max_length, max_prompt_length=cfg.data.max_prompt_length
    )
    return model, device


def _perf(counts: dict[str, float], seconds: float, model: PreferenceModel) -> dict[str, float]:
    # Model FLOPs (rlhflab.models.flops): a reward model's, two reads (the two orders) per pair.
    flops = reward_model_train_flops(
        matmul_params(model.scorer), counts.get("tokens", 0), counts.get("reads", 0)
    )
    return {
        "perf/pairs_per_s": counts.get("pairs", 0) / seconds,
        "perf/tokens_per_s": counts.get("tokens", 0) / seconds,
        "perf/flops_per_s": flops / seconds,
    }


def _announce(
    model, examples: list, eval_examples: list, total_steps: int, run_dir: Path, spread: str
) -> None:
    print(
        f"{NAME}: {len(examples)} pairs ({len(eval_examples)} held out), {total_steps} steps, "
        f"{count_parameters(model) / 1e6:.2f}M parameters, run dir {run_dir}" + spread
    )
    if not eval_examples:
        print(
            f"{NAME}: no held-out data, so no accuracy is reported; set data.eval_path or data.eval_fraction"
        )


def _check_processes(par: DataParallel, batch_size: int) -> None:
    """Each process needs pairs in every step; a sharded model (FSDP) also the same number on each, since every
    forward pass gathers the weights from all of them."""
    par.check_batch(batch_size)
    if par.sharded and batch_size % par.world:
        raise ConfigError(
            f"config: optim.batch_size={batch_size} does not split evenly over the {par.world} processes, which a "
            f"sharded model needs (each forward pass gathers the weights from all); make it a multiple of {par.world}"
        )


def train(cfg: PMConfig, *, resume: bool = False, overwrite: bool = False) -> Path:
    """Train a general preference model; returns RUN/final (a *ForSequenceClassification directory marked as a
    preference model, loaded by `PreferenceModel.from_pretrained`). Launched in several processes (`torchrun`,
    `accelerate launch`), each trains on its share of every step's pairs (`stages.parallel`); every process
    returns RUN/final."""
    # 1. Setup: seeds, run directory, model, data.
    require_train_path(cfg.data, "pairwise")
    seed_everything(cfg.seed)
    par = DataParallel()  # one process, or one of those `accelerate launch` / `torchrun` started
    _check_processes(par, cfg.optim.batch_size)
    run = open_run(cfg, NAME, cfg.logging, resume=resume, overwrite=overwrite, parallel=par)
    path = resolve_model_path(cfg.model.name_or_path)
    tokenizer = load_tokenizer(path)
    model, device = _build_model(cfg, path, tokenizer, par.device)
    # Under FSDP the scorer is sharded as a reward model is (its body and head are called apart); the wrapper
    # around it holds no parameter. Before the optimizer sees the parameters.
    model.scorer = par.prepare(model.scorer)
    examples, eval_examples = load_examples(cfg, tokenizer)
    pad_id = tokenizer.pad_token_id
    total_steps, steps_per_epoch = num_optimizer_steps(len(examples), cfg.optim, what="pairwise records")
    optimizer, scheduler = build_optimizer(model, cfg.optim, total_steps)
    if par.is_main:
        _announce(model, examples, eval_examples, total_steps, run.dir, par.describe())
    snapshot = functools.partial(model.save_pretrained, tokenizer=tokenizer)
    loop = Loop(run, NAME, cfg.logging, total_steps, model, optimizer, scheduler, resume=resume,
                snapshot=snapshot, parallel=par)  # fmt: skip
    evaluate_now = (
        functools.partial(evaluate, model, eval_examples, pad_id, device) if eval_examples else None
    )
    if loop.step == 0 and evaluate_now is not None and cfg.logging.eval_every:  # the untrained baseline
        baseline = par.on_main(evaluate_now)  # every process under FSDP, the main one otherwise
        if par.is_main:
            run.logger.log(0, baseline)

    # 2. Loop: one optimizer step per batch of pairs; the batch order is a function of (seed, epoch).
    model.train()
    while loop.step < loop.total:
        epoch, position = divmod(loop.step, steps_per_epoch)
        order = batch_schedule(len(examples), cfg.optim.batch_size, cfg.seed, epoch)[position]
        batch = [examples[i] for i in order]
        # Each process takes its share of the step's pairs, normalized by the whole batch's count, so the
        # gradients and losses summed across processes are the whole batch's.
        loss, sums, n_tokens = _gradients(
            model, par.shard(batch), cfg, device, pad_id, loop.step + 1, loop.last_ckpt, len(batch)
        )
        par.sum_gradients(model)
        grad_norm = clip_gradients(model, cfg.optim.max_grad_norm)
        check_finite({"loss/grad_norm": grad_norm}, step=loop.step + 1, last_good=loop.last_ckpt)
        optimizer_step(optimizer, scheduler)
        loop.count(tokens=par.sum(n_tokens), pairs=len(batch), reads=2 * len(batch))

        # 3. Log, evaluate, checkpoint.
        loop.end_step(
            {
                "loss/pm": par.sum(loss),
                **par.metric_means(sums),  # per-pair means over the whole batch
                "loss/grad_norm": grad_norm,
                "perf/lr": scheduler.get_last_lr()[0],
                "perf/epoch": (loop.step + 1) / steps_per_epoch,
            },
            perf=lambda counts, seconds: _perf(counts, seconds, model),
            show={"loss": "loss/pm", "acc": "reward/accuracy"},
            evaluate=evaluate_now,
        )
    loop.close()

    # 4. Final evaluation, save (a reward-model directory marked as a preference model, with the tokenizer), by
    # the main process; a sharded model's every process evaluates and gathers the weights.
    final = run.dir / "final"
    finish(par, run, model, NAME, loop.step, evaluate_now, lambda: model.save_pretrained(final, tokenizer),
           what="preference model")  # fmt: skip
    return final
