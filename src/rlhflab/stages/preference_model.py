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
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch

from rlhflab.config import PMConfig
from rlhflab.core.health import check_finite
from rlhflab.core.seeding import batch_schedule, seed_everything
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
    lora_settings,
    metric_means,
    mixed_precision,
    num_optimizer_steps,
    open_run,
    optimizer_step,
    resolve_device,
    resolve_model_path,
)
from rlhflab.stages.data_source import load_stage_records, require_train_path

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


def _gradients(model, examples, cfg: PMConfig, device, pad_id: int, step: int, last_ckpt):
    """Forward/backward of one optimizer step's micro-batches: (mean metrics, real tokens seen)."""
    size = cfg.optim.micro_batch_size or len(examples)
    amp = mixed_precision(cfg.model, device)
    sums: dict[str, list[float]] = {}
    total, tokens = 0.0, 0
    for s in range(0, len(examples), size):
        with amp():
            out, n_tokens = batch_loss(
                model, examples[s : s + size], pad_id, device, cfg.algo.label_smoothing
            )
        # Normalized by the whole step's pair count, so accumulation gives the full batch's gradient.
        loss = out.loss.sum() / len(examples)
        check_finite({"loss/pm": loss}, step=step, last_good=last_ckpt)
        loss.backward()
        total += float(loss.detach())
        tokens += n_tokens
        accumulate_metrics(sums, out.metrics)
    return {"loss/pm": total, **metric_means(sums)}, tokens


def _build_model(cfg: PMConfig, path: str, tokenizer) -> tuple[PreferenceModel, torch.device]:
    """The SFT model's backbone (its LM head never loaded) with a fresh one-output head."""
    device = resolve_device(cfg.model.device)
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


def _report(run, step: int, metrics: dict[str, float]) -> None:
    run.logger.log(step, metrics)
    print(f"{NAME}: " + "  ".join(f"{k}={v:.4f}" for k, v in metrics.items()))


def train(cfg: PMConfig, *, resume: bool = False, overwrite: bool = False) -> Path:
    """Train a general preference model; returns RUN/final (a *ForSequenceClassification directory marked as a
    preference model, loaded by `PreferenceModel.from_pretrained`)."""
    # 1. Setup: seeds, run directory, model, data.
    require_train_path(cfg.data, "pairwise")
    seed_everything(cfg.seed)
    run = open_run(cfg, NAME, cfg.logging, resume=resume, overwrite=overwrite)
    path = resolve_model_path(cfg.model.name_or_path)
    tokenizer = load_tokenizer(path)
    model, device = _build_model(cfg, path, tokenizer)
    examples, eval_examples = load_examples(cfg, tokenizer)
    pad_id = tokenizer.pad_token_id
    total_steps, steps_per_epoch = num_optimizer_steps(len(examples), cfg.optim, what="pairwise records")
    optimizer, scheduler = build_optimizer(model, cfg.optim, total_steps)
    print(
        f"{NAME}: {len(examples)} pairs ({len(eval_examples)} held out), {total_steps} steps, "
        f"{count_parameters(model) / 1e6:.2f}M parameters, run dir {run.dir}"
    )
    if not eval_examples:
        print(
            f"{NAME}: no held-out data, so no accuracy is reported; set data.eval_path or data.eval_fraction"
        )
    snapshot = functools.partial(model.save_pretrained, tokenizer=tokenizer)
    loop = Loop(
        run, NAME, cfg.logging, total_steps, model, optimizer, scheduler, resume=resume, snapshot=snapshot
    )
    evaluate_now = (
        functools.partial(evaluate, model, eval_examples, pad_id, device) if eval_examples else None
    )
    if loop.step == 0 and evaluate_now is not None and cfg.logging.eval_every:  # the untrained baseline
        run.logger.log(0, evaluate_now())

    # 2. Loop: one optimizer step per batch of pairs; the batch order is a function of (seed, epoch).
    model.train()
    while loop.step < loop.total:
        epoch, position = divmod(loop.step, steps_per_epoch)
        order = batch_schedule(len(examples), cfg.optim.batch_size, cfg.seed, epoch)[position]
        batch = [examples[i] for i in order]
        stats, n_tokens = _gradients(model, batch, cfg, device, pad_id, loop.step + 1, loop.last_ckpt)
        grad_norm = clip_gradients(model, cfg.optim.max_grad_norm)
        check_finite({"loss/grad_norm": grad_norm}, step=loop.step + 1, last_good=loop.last_ckpt)
        optimizer_step(optimizer, scheduler)
        loop.count(tokens=n_tokens, pairs=len(batch), reads=2 * len(batch))

        # 3. Log, evaluate, checkpoint.
        loop.end_step(
            {
                **stats,
                "loss/grad_norm": grad_norm,
                "perf/lr": scheduler.get_last_lr()[0],
                "perf/epoch": (loop.step + 1) / steps_per_epoch,
            },
            perf=lambda counts, seconds: _perf(counts, seconds, model),
            show={"loss": "loss/pm", "acc": "reward/accuracy"},
            evaluate=evaluate_now,
        )
    loop.close()

    # 4. Final evaluation, save (a reward-model directory marked as a preference model, with the tokenizer).
    if evaluate_now is not None:
        _report(run, loop.step, evaluate_now())
    final = model.save_pretrained(run.dir / "final", tokenizer)
    run.close()
    print(f"{NAME}: saved the preference model to {final}")
    return final
