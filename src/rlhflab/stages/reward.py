"""Reward-model training from pairwise comparisons or K-wise rankings (InstructGPT step 2).

The reward model is the SFT model's backbone plus a linear head read at the last real token (initialized
from the SFT model, as in Ouyang et al. 2022). It learns from

  - pairwise data: -log sigma(r_c - r_r - m), Bradley-Terry with Llama 2's margin m taken from the record's
    numeric `margin` or from its `rating` through the small/large table (Touvron et al. 2023, Table 27);
  - K-wise rankings: Plackett-Luce, or InstructGPT's mean over all K-choose-2 pairs; tied responses
    are skipped by all_pairs and marginalized (every order of the tie) by Plackett-Luce.

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

import dataclasses
import itertools
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from rlhflab.config import RewardConfig
from rlhflab.core.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from rlhflab.core.health import check_finite
from rlhflab.core.io import atomic_write_text
from rlhflab.core.progress import Progress
from rlhflab.core.seeding import batch_schedule, seed_everything
from rlhflab.data import (
    LLAMA2_RATINGS,
    collate_pairs,
    collate_ranked,
    collate_shared_prompt,
    pad,
    tokenize_pair,
    tokenize_ranked,
)
from rlhflab.errors import ConfigError, DataError
from rlhflab.eval.metrics import accuracy_by_bucket
from rlhflab.losses import (
    LossOutput,
    all_pairs_with_ties,
    bradley_terry,
    llama2_margins,
    plackett_luce_with_ties,
    reward_centering,
)
from rlhflab.losses import tie_orders as losses_tie_orders
from rlhflab.models.backbone import last_token_index
from rlhflab.models.final_layer import SHARED_PROMPT_MODEL_TYPES, final_layer_only_at, supports_shared_prompt
from rlhflab.models.flops import matmul_params, reward_model_train_flops
from rlhflab.models.loading import (
    apply_lora,
    count_parameters,
    enable_gradient_checkpointing,
    load_backbone,
    load_tokenizer,
)
from rlhflab.models.reward_model import RewardModel
from rlhflab.rewards.learned import SETTINGS_FILE
from rlhflab.stages.common import (
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
from rlhflab.stages.data_source import load_stage_records, require_train_path

# Llama 2 Table 28 column titles, in the paper's order; "avg" pools every pair.
RATING_TITLES = {"significantly_better": "Significantly Better", "better": "Better",
                 "slightly_better": "Slightly Better", "negligibly_better": "Negligibly Better / Unsure",
                 "unrated": "Unrated", "avg": "Avg"}
# Plackett-Luce sums over every order of tied responses; past this many orders, all_pairs is the sane choice.
MAX_TIE_ORDERS = 120


# --------------------------------------------------------------------------------------------------------
# Data: one tokenized example per record, tagged with the head it trains
# --------------------------------------------------------------------------------------------------------


def _margin(record, mode: str, where: str) -> float | None:
    """The margin m of a pairwise record under algo.margin (None: no margin)."""
    if mode == "none":
        return None
    if mode == "data":
        return record.margin
    if record.rating not in LLAMA2_RATINGS:
        prompt = record.prompt if isinstance(record.prompt, str) else record.prompt[-1]["content"]
        raise DataError(f"algo.margin={mode} needs a Llama 2 rating ({', '.join(LLAMA2_RATINGS)}), got "
                        f"{record.rating!r}; add ratings, or use algo.margin=data / none", path=where,
                        record=f"with prompt {prompt[:40]!r}", field="rating")
    strength = torch.tensor([LLAMA2_RATINGS.index(record.rating)])
    return float(llama2_margins(strength, mode)[0])


def tie_orders(ranks: Sequence[int]) -> list[list[int]]:
    """Every order of the responses consistent with `ranks` (`rlhflab.losses.tie_orders`), refusing more
    than MAX_TIE_ORDERS with what to do instead."""
    try:
        return losses_tie_orders(ranks, MAX_TIE_ORDERS)
    except ValueError:
        raise ConfigError(f"a ranking with ranks {list(ranks)} has more than {MAX_TIE_ORDERS} orders of its ties; "
                          "use algo.loss=all_pairs, which skips tied pairs") from None


def _tokenize(record, kind: str, head: int, tokenizer, cfg: RewardConfig, where: str) -> dict[str, Any]:
    kw = {"max_length": cfg.data.max_length, "max_prompt_length": cfg.data.max_prompt_length}
    if kind == "pairwise":
        ex = tokenize_pair(record, tokenizer, **kw)
        ex["margin"] = _margin(record, cfg.algo.margin, where)
        ex["rating"] = record.rating
    else:
        ex = tokenize_ranked(record, tokenizer, **kw)
        ranks = ex["ranks"]
        ex["pairs"] = [(i, j) for i, j in itertools.combinations(range(len(ranks)), 2) if ranks[i] < ranks[j]]
        if cfg.algo.loss == "plackett_luce":
            tie_orders(ranks)  # refuse a ranking with too many tie orders before training starts
    ex["head"] = head
    return ex


def _load_examples(cfg: RewardConfig, kind: str, tokenizer, run_dir: Path) -> tuple[list[dict], list[dict]]:
    """(train, eval) examples of every head; a head with its own file reads it instead of data.train_path."""
    train, held = [], []
    for head, spec in enumerate(cfg.algo.head_specs()):
        data = dataclasses.replace(cfg.data, train_path=spec.data, eval_path="") if spec.data else cfg.data
        records, eval_records = load_stage_records(data, kind, seed=cfg.seed)
        where = spec.data or cfg.data.train_path
        train += [_tokenize(r, kind, head, tokenizer, cfg, where) for r in records]
        held += [_tokenize(r, kind, head, tokenizer, cfg, where) for r in eval_records]
    return train, held


def _collate(examples: Sequence[dict], kind: str, pad_id: int, *, shared: bool = False,
             dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """A batch of responses in a flat order (pairwise: B chosen, then B rejected; rankings: example 0's
    responses best first, then example 1's, ...) with, per response, the head it trains (`row_head`).

    shared: one row per example (prompt once, then its responses, `collate_shared_prompt`) when every
    example allows it, with `read_rows`/`read_positions` in that flat order; else one row per response.
    Ranked batches carry `num_responses` [B] and `ranks` [B, K_max] (-1 = no response).
    """
    heads = torch.tensor([e["head"] for e in examples])
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


# --------------------------------------------------------------------------------------------------------
# Forward and losses (the maths is rlhflab.losses; here only which rows meet which)
# --------------------------------------------------------------------------------------------------------


def _rewards(model: RewardModel, batch: dict, device: torch.device) -> torch.Tensor:
    """Every head's reward for each response of the batch, in its flat order: [N, H] float32."""
    ids = batch["input_ids"].to(device)
    # The head reads one position per response, so the final layer runs only there (forward and backward).
    if "read_rows" in batch:
        rows, positions = batch["read_rows"].to(device), batch["read_positions"].to(device)
        with final_layer_only_at(model.backbone, None, positions, rows=rows, key_mask=batch["key_mask"].to(device)):
            return model.rewards_at(ids, batch["attention_mask_4d"].to(device), batch["position_ids"].to(device),
                                    rows, positions)
    mask = batch["attention_mask"].to(device)
    with final_layer_only_at(model.backbone, mask, last_token_index(mask)):
        return model(ids, mask)


def _row_rewards(model: RewardModel, batch: dict, device: torch.device) -> torch.Tensor:
    """Each response's reward from the head it trains: [N] float32."""
    return _rewards(model, batch, device).gather(1, batch["row_head"].to(device)[:, None]).squeeze(1)


def pairwise_loss(rewards: torch.Tensor, margin: torch.Tensor | None, *, label_smoothing: float = 0.0,
                  center_coef: float = 0.0) -> LossOutput:
    """Bradley-Terry over a stacked batch: rewards [2B] (chosen rows, then rejected rows); margin [B] or None.

    Returns loss [B] (plus center_coef * `reward_centering`, (r_c + r_r)^2) and the `reward/*` metrics of
    bradley_terry.
    """
    b = rewards.shape[0] // 2
    chosen, rejected = rewards[:b], rewards[b:]
    out = bradley_terry(chosen, rejected, margin=margin, label_smoothing=label_smoothing)
    loss, metrics = out.loss, dict(out.metrics)
    if center_coef:
        center = reward_centering(torch.stack([chosen, rejected], dim=1))
        loss, metrics["loss/center"] = loss + center_coef * center, center.detach()
    return LossOutput(loss, metrics)


def ranked_loss(scores: torch.Tensor, batch: dict, *, loss: str, label_smoothing: float = 0.0,
                center_coef: float = 0.0) -> LossOutput:
    """K-wise loss of B rankings from flat per-response scores [N] (rows of `collate_ranked` order).

    all_pairs: `all_pairs_with_ties` (InstructGPT Eq. 1 over the strictly ordered pairs); plackett_luce:
    `plackett_luce_with_ties` (the likelihood summed over every order of the tied responses). Returns loss
    [B] (plus center_coef * `reward_centering`); metric reward/accuracy = share of strictly ordered pairs
    scored in order.
    """
    counts = batch["num_responses"].to(scores.device)
    present = torch.arange(int(counts.max()), device=scores.device)[None] < counts[:, None]
    table = scores.new_zeros(present.shape).masked_scatter(present, scores)  # [B, K_max], best first
    ranks = batch["ranks"].to(scores.device)
    if loss == "all_pairs":
        out = all_pairs_with_ties(table, ranks, label_smoothing=label_smoothing)
    elif loss == "plackett_luce":
        out = plackett_luce_with_ties(table, ranks, max_orders=MAX_TIE_ORDERS)
    else:
        raise ConfigError(f"unknown K-wise loss {loss!r}; use plackett_luce or all_pairs")
    per_example, metrics = out.loss, dict(out.metrics)
    if center_coef:
        center = reward_centering(table, present)
        per_example, metrics["loss/center"] = per_example + center_coef * center, center.detach()
    return LossOutput(per_example, metrics)


def _batch_loss(model: RewardModel, batch: dict, kind: str, cfg: RewardConfig, device) -> LossOutput:
    scores = _row_rewards(model, batch, device)
    algo = cfg.algo
    if kind == "pairwise":
        margin = batch["margin"].to(device) if algo.margin != "none" else None
        return pairwise_loss(scores, margin, label_smoothing=algo.label_smoothing,
                             center_coef=algo.center_rewards_coef)
    return ranked_loss(scores, batch, loss=algo.loss, label_smoothing=algo.label_smoothing,
                       center_coef=algo.center_rewards_coef)


# --------------------------------------------------------------------------------------------------------
# Evaluation: accuracy overall and per Llama 2 rating (Table 28), Kendall tau for rankings
# --------------------------------------------------------------------------------------------------------


def accuracy_by_rating(chosen: Sequence[float], rejected: Sequence[float],
                       ratings: Sequence[str | None]) -> dict[str, dict[str, float]]:
    """Pairwise accuracy per Llama 2 rating bucket, in Table 28's order, then "avg" pooled over all pairs.

    Returns {bucket: {"accuracy": share of pairs with chosen > rejected (a tie counts 1/2; nan when the
    bucket is empty), "n": pairs}}. The four Llama 2 buckets always appear; pairs without a rating go to
    "unrated" and other rating names to their own buckets (both only when present).
    """
    table = accuracy_by_bucket(torch.as_tensor(chosen, dtype=torch.float64).numpy(),
                               torch.as_tensor(rejected, dtype=torch.float64).numpy(),
                               [x or "unrated" for x in ratings], order=LLAMA2_RATINGS)
    table["avg"] = table.pop("overall")
    return table


def format_accuracy_table(tables: dict[str, dict[str, dict[str, float]]]) -> str:
    """Markdown table in Llama 2 Table 28's layout: one row per head, accuracy in % with the pair count."""
    columns = list(dict.fromkeys(b for t in tables.values() for b in t))
    lines = ["| head | " + " | ".join(RATING_TITLES.get(b, b) for b in columns) + " |",
             "|---" * (len(columns) + 1) + "|"]
    for head, table in tables.items():
        cells = [f"{100 * table[b]['accuracy']:.1f} (n={table[b]['n']})" if table.get(b, {}).get("n") else "-"
                 for b in columns]
        lines.append(f"| {head} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


@torch.no_grad()
def score_examples(model: RewardModel, examples: Sequence[dict], kind: str, device, pad_id: int,
                   batch_size: int = 64, *, shared: bool = False) -> list[torch.Tensor]:
    """Every head's rewards for each example's responses: one [n_responses, H] CPU tensor per example
    (pairwise: rows chosen, rejected). shared: shared-prompt rows where possible (see `_collate`)."""
    was_training = model.training
    model.eval()
    out: list[torch.Tensor] = []
    for s in range(0, len(examples), batch_size):
        chunk = examples[s:s + batch_size]
        batch = _collate(chunk, kind, pad_id, shared=shared, dtype=model.score.weight.dtype)
        rewards = _rewards(model, batch, device).cpu()
        if kind == "pairwise":
            b = len(chunk)
            out += [torch.stack([rewards[i], rewards[b + i]]) for i in range(b)]
        else:
            out += list(rewards.split(batch["num_responses"].tolist()))
    model.train(was_training)
    return out


def _ranking_metrics(scores: torch.Tensor, ex: dict) -> tuple[float, float, float]:
    """(pair accuracy, Kendall tau over strictly ordered pairs, top-1 hit) of one ranking."""
    concordant = sum(float(scores[i] > scores[j]) for i, j in ex["pairs"])
    discordant = sum(float(scores[i] < scores[j]) for i, j in ex["pairs"])
    tau = (concordant - discordant) / max(concordant + discordant, 1.0)
    top1 = float(ex["ranks"][int(scores.argmax())] == 0)
    return concordant / len(ex["pairs"]), tau, top1


def evaluate(model: RewardModel, examples: Sequence[dict], kind: str, device, pad_id: int, *,
             shared: bool = False) -> tuple[dict[str, float], dict[str, dict]]:
    """Held-out metrics, each head under `eval/HEAD/...` when there are several (plus the pooled
    `eval/accuracy`), and the per-head rating tables (pairwise data; empty for rankings)."""
    names = model.head_names
    scores = score_examples(model, examples, kind, device, pad_id, shared=shared)
    metrics: dict[str, float] = {}
    tables: dict[str, dict] = {}
    pooled: list[tuple[float, int]] = []  # (accuracy, examples) per head
    for h, name in enumerate(names):
        mine = [(ex, s[:, h]) for ex, s in zip(examples, scores) if ex["head"] == h]
        if not mine:
            continue
        prefix = "eval/" if len(names) == 1 else f"eval/{name}/"
        if kind == "pairwise":
            c, r = torch.stack([s[0] for _, s in mine]), torch.stack([s[1] for _, s in mine])
            tables[name] = table = accuracy_by_rating(c, r, [ex["rating"] for ex, _ in mine])
            # The training loss's own margins (0 under algo.margin=none), so eval and train losses compare.
            margin = torch.tensor([ex["margin"] or 0.0 for ex, _ in mine])
            metrics[f"{prefix}loss"] = float(bradley_terry(c, r, margin=margin).loss.mean())
            metrics[f"{prefix}accuracy"] = table["avg"]["accuracy"]
            pooled.append((table["avg"]["accuracy"], len(mine)))
            metrics.update({f"{prefix}accuracy/{b}": v["accuracy"] for b, v in table.items()
                            if b != "avg" and v["n"]})
        else:
            acc, tau, top1 = (sum(x) / len(mine) for x in zip(*(_ranking_metrics(s, ex) for ex, s in mine)))
            metrics.update({f"{prefix}accuracy": acc, f"{prefix}kendall_tau": tau, f"{prefix}top1_accuracy": top1})
            pooled.append((acc, len(mine)))
    if len(names) > 1 and pooled:
        metrics["eval/accuracy"] = sum(a * n for a, n in pooled) / sum(n for _, n in pooled)
    return metrics, tables


def _fit_normalization(model: RewardModel, examples: Sequence[dict], kind: str, device, pad_id: int,
                       n_samples: int, seed: int, *, shared: bool = False) -> dict[str, float]:
    """Store the per-head mean/std of the rewards of (up to) n_samples training responses in the model."""
    order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(seed)).tolist()
    picked, n_rows = [], 0
    for i in order:
        if n_rows >= n_samples:
            break
        picked.append(examples[i])
        n_rows += 2 if kind == "pairwise" else len(examples[i]["input_ids"])
    rewards = torch.cat(score_examples(model, picked, kind, device, pad_id, shared=shared))[:n_samples]
    mean, std = model.fit_normalization(rewards)
    return {f"reward/norm_{stat}/{name}": float(v[h]) for stat, v in (("mean", mean), ("std", std))
            for h, name in enumerate(model.head_names)}


# --------------------------------------------------------------------------------------------------------
# The stage
# --------------------------------------------------------------------------------------------------------


def _build_model(cfg: RewardConfig, path: str, head_names: list[str]) -> tuple[RewardModel, torch.device]:
    """The SFT model's backbone (its LM head never loaded) with fresh reward heads."""
    device = resolve_device(cfg.model.device)
    backbone = load_backbone(path, dtype=cfg.model.dtype, device=str(device))
    if cfg.model.gradient_checkpointing:
        enable_gradient_checkpointing(backbone)
    if cfg.model.lora.enabled:
        backbone = apply_lora(backbone, lora_settings(cfg.model.lora))
    return RewardModel(backbone, len(head_names), head_names), device


def _train_step(model, examples: list[dict], kind: str, cfg: RewardConfig, device, pad_id: int, step: int,
                last_ckpt, shared: bool = False) -> tuple[dict[str, float], int]:
    """Forward/backward of one optimizer step's micro-batches; returns (mean metrics, real tokens seen)."""
    size = cfg.optim.micro_batch_size or len(examples)
    amp = mixed_precision(cfg.model, device)
    sums: dict[str, float] = {}
    tokens = 0
    for s in range(0, len(examples), size):
        batch = _collate(examples[s:s + size], kind, pad_id, shared=shared, dtype=model.score.weight.dtype)
        with amp():
            out = _batch_loss(model, batch, kind, cfg, device)
        # Normalized by the whole step's example count, so accumulation gives the full batch's gradient.
        loss = out.loss.sum() / len(examples)
        check_finite({"loss/rm": loss}, step=step, last_good=last_ckpt)
        loss.backward()
        tokens += int(batch["attention_mask"].sum())
        sums["loss/rm"] = sums.get("loss/rm", 0.0) + float(loss.detach())
        for k, v in out.metrics.items():
            sums[k] = sums.get(k, 0.0) + float(v.sum()) / len(examples)
    return sums, tokens


def _report(run, step: int, model, eval_examples, kind, device, pad_id, shared: bool) -> None:
    metrics, tables = evaluate(model, eval_examples, kind, device, pad_id, shared=shared)
    run.logger.log(step, metrics)
    print("rm: " + "  ".join(f"{k}={v:.4f}" for k, v in metrics.items() if "/accuracy/" not in k))
    if tables:
        text = format_accuracy_table(tables)
        atomic_write_text(run.dir / "eval_accuracy.md", text)
        atomic_write_text(run.dir / "eval_accuracy.json", json.dumps(tables, indent=2))
        print(text, end="")


def train(cfg: RewardConfig, *, resume: bool = False, overwrite: bool = False) -> Path:
    """Train a reward model; returns the directory of the final model (RUN/final, a *ForSequenceClassification)."""
    # 1. Setup: seeds, run directory, model, data.
    kind = "pairwise" if cfg.algo.loss == "bradley_terry" else "ranked"
    if any(not h.data for h in cfg.algo.head_specs()):
        require_train_path(cfg.data, kind)
    seed_everything(cfg.seed)
    run = open_run(cfg, "rm", cfg.logging, resume=resume, overwrite=overwrite)
    path = resolve_model_path(cfg.model.name_or_path)
    tokenizer = load_tokenizer(path)
    model, device = _build_model(cfg, path, [h.name for h in cfg.algo.head_specs()])
    examples, eval_examples = _load_examples(cfg, kind, tokenizer, run.dir)
    pad_id = tokenizer.pad_token_id
    shared = cfg.algo.share_prompt and supports_shared_prompt(model)
    if cfg.algo.share_prompt and not shared:
        print(f"rm: one row per response: shared-prompt rows need a {'/'.join(SHARED_PROMPT_MODEL_TYPES)} backbone "
              "with sdpa or eager attention and no sliding window")
    total_steps, steps_per_epoch = num_optimizer_steps(len(examples), cfg.optim, what=f"{kind} records")
    optimizer, scheduler = build_optimizer(model, cfg.optim, total_steps)
    n_params = count_parameters(model)
    print(f"rm: {len(examples)} {kind} records ({len(eval_examples)} held out), heads {model.head_names}, "
          f"{total_steps} steps, {n_params / 1e6:.2f}M parameters, run dir {run.dir}")
    if not eval_examples:
        print("rm: no held-out data, so no accuracy is reported; set data.eval_path or data.eval_fraction")

    step, last_ckpt = 0, None
    if resume and (last_ckpt := latest_checkpoint(run.dir)) is not None:
        step = load_checkpoint(last_ckpt, model=model, optimizer=optimizer, scheduler=scheduler)["step"]
        print(f"rm: resumed from {last_ckpt} at step {step}")
    if step == 0 and eval_examples and cfg.logging.eval_every:
        run.logger.log(0, evaluate(model, eval_examples, kind, device, pad_id, shared=shared)[0])  # the untrained baseline

    # 2. Loop: one optimizer step per batch; the batch order is a function of (seed, epoch).
    model.train()
    progress = Progress(total_steps, "rm", enabled=cfg.logging.progress, completed=step)
    t_last, tokens_since, pairs_since, reads_since = time.time(), 0, 0, 0
    while step < total_steps:
        epoch, position = divmod(step, steps_per_epoch)
        batch = [examples[i] for i in batch_schedule(len(examples), cfg.optim.batch_size, cfg.seed, epoch)[position]]
        stats, n_tokens = _train_step(model, batch, kind, cfg, device, pad_id, step + 1, last_ckpt, shared)
        grad_norm = clip_gradients(model, cfg.optim.max_grad_norm)
        check_finite({"loss/grad_norm": grad_norm}, step=step + 1, last_good=last_ckpt)
        optimizer_step(optimizer, scheduler)
        step += 1
        tokens_since += n_tokens
        pairs_since += len(batch) if kind == "pairwise" else sum(len(e["pairs"]) for e in batch)
        reads_since += 2 * len(batch) if kind == "pairwise" else sum(len(e["input_ids"]) for e in batch)

        # 3. Log, evaluate, checkpoint.
        if step % cfg.logging.log_every == 0 or step == total_steps:
            elapsed = max(time.time() - t_last, 1e-9)
            row = run.logger.log(step, {
                **stats, "loss/grad_norm": grad_norm, "perf/lr": scheduler.get_last_lr()[0],
                "perf/pairs_per_s": pairs_since / elapsed, "perf/tokens_per_s": tokens_since / elapsed,
                # Model FLOPs (rlhflab.models.flops): no LM head, the final layer's non-K/V work at the reads.
                "perf/flops_per_s": reward_model_train_flops(matmul_params(model), tokens_since, reads_since) / elapsed,
                "perf/epoch": step / steps_per_epoch})
            t_last, tokens_since, pairs_since, reads_since = time.time(), 0, 0, 0
            progress.update(0, {"loss": row["loss/rm"], "acc": row["reward/accuracy"]})
        if eval_examples and cfg.logging.eval_every and step % cfg.logging.eval_every == 0 and step < total_steps:
            run.logger.log(step, evaluate(model, eval_examples, kind, device, pad_id, shared=shared)[0])
        if cfg.logging.save_every and step % cfg.logging.save_every == 0 and step < total_steps:
            last_ckpt = save_checkpoint(run.dir, step, model=model, optimizer=optimizer, scheduler=scheduler,
                                        keep=cfg.logging.keep_checkpoints)
        progress.update(1)
    progress.close()

    # 4. Final evaluation, reward normalization statistics, save (HF *ForSequenceClassification format).
    if eval_examples:
        _report(run, step, model, eval_examples, kind, device, pad_id, shared)
    if cfg.algo.normalization_samples:
        run.logger.log(step, _fit_normalization(model, examples, kind, device, pad_id,
                                                cfg.algo.normalization_samples, cfg.seed, shared=shared))
    final = model.save_pretrained(run.dir / "final", tokenizer)
    # How training tokenized, so `rlhflab.rewards.LearnedReward` scores new responses alike.
    atomic_write_text(final / SETTINGS_FILE, json.dumps({
        "max_length": cfg.data.max_length, "max_prompt_length": cfg.data.max_prompt_length,
        "head_names": model.head_names, "loss": cfg.algo.loss}, indent=2))
    run.close()
    print(f"rm: saved the reward model to {final}")
    return final
