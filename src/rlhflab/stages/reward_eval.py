"""The reward stage's held-out evaluation and reward normalization (scoring examples with the model)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from rlhflab.data.reward_batch import collate_reward_batch
from rlhflab.eval.reward_accuracy import accuracy_by_rating, binary_auc, ranking_metrics
from rlhflab.losses import PRM_AGGREGATES, binary_classifier, bradley_terry, process_reward_loss
from rlhflab.models.reward_model import RewardModel, batch_rewards


@torch.no_grad()
def score_examples(
    model: RewardModel,
    examples: Sequence[dict],
    kind: str,
    device,
    pad_id: int,
    batch_size: int = 64,
    *,
    shared: bool = False,
) -> list[torch.Tensor]:
    """Every head's rewards for each example's responses: one [n_responses, H] CPU tensor per example
    (pairwise: rows chosen, rejected; stepwise: one row per labelled step, its logit at the step's last token).
    shared: shared-prompt rows where possible (see `collate_reward_batch`)."""
    was_training = model.training
    model.eval()
    out: list[torch.Tensor] = []
    for s in range(0, len(examples), batch_size):
        chunk = examples[s : s + batch_size]
        batch = collate_reward_batch(chunk, kind, pad_id, shared=shared, dtype=model.score.weight.dtype)
        if kind == "stepwise":
            tokens = model.token_rewards(
                batch["input_ids"].to(device), batch["attention_mask"].to(device)
            ).cpu()
            out += [tokens[i, e["step_positions"]] for i, e in enumerate(chunk)]
            continue
        rewards = batch_rewards(model, batch, device).cpu()
        if kind == "pairwise":
            b = len(chunk)
            out += [torch.stack([rewards[i], rewards[b + i]]) for i in range(b)]
        elif kind == "unpaired":
            out += list(rewards.split(1))
        else:
            out += list(rewards.split(batch["num_responses"].tolist()))
    model.train(was_training)
    return out


def evaluate_with_tables(
    model: RewardModel, examples: Sequence[dict], kind: str, device, pad_id: int, *, shared: bool = False
) -> tuple[dict[str, float], dict[str, dict]]:
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
            metrics.update(
                {f"{prefix}accuracy/{b}": v["accuracy"] for b, v in table.items() if b != "avg" and v["n"]}
            )
        elif kind == "stepwise":
            metrics.update(_stepwise_metrics(prefix, [ex for ex, _ in mine], [s for _, s in mine]))
            pooled.append((metrics[f"{prefix}accuracy"], len(mine)))
        elif kind == "unpaired":
            r = torch.stack([s[0] for _, s in mine])
            y = torch.tensor([ex["label"] for ex, _ in mine])
            out = binary_classifier(r, y)
            metrics[f"{prefix}loss"] = float(out.loss.mean())
            metrics[f"{prefix}accuracy"] = float(out.metrics["reward/accuracy"].mean())
            # Accuracy at sign 0 depends on the offset; the ranking of good above bad does not (AUC).
            metrics[f"{prefix}auc"] = binary_auc(r, y)
            pooled.append((metrics[f"{prefix}accuracy"], len(mine)))
        else:
            acc, tau, top1 = (sum(x) / len(mine) for x in zip(*(ranking_metrics(s, ex) for ex, s in mine)))
            metrics.update(
                {f"{prefix}accuracy": acc, f"{prefix}kendall_tau": tau, f"{prefix}top1_accuracy": top1}
            )
            pooled.append((acc, len(mine)))
    if len(names) > 1 and pooled:
        metrics["eval/accuracy"] = sum(a * n for a, n in pooled) / sum(n for _, n in pooled)
    return metrics, tables


def _stepwise_metrics(
    prefix: str, examples: Sequence[dict], logits: Sequence[torch.Tensor]
) -> dict[str, float]:
    """A process reward model's held-out metrics: the loss, step accuracy and AUC over all labelled steps, and
    the solution accuracy (the product of step probabilities above 1/2 exactly when every step is right)."""
    steps = torch.cat(list(logits))
    labels = torch.tensor([y for ex in examples for y in ex["step_labels"]])
    mask = torch.ones_like(steps, dtype=torch.bool)
    solutions = torch.nn.utils.rnn.pad_sequence(list(logits), batch_first=True)
    present = torch.nn.utils.rnn.pad_sequence([torch.ones(len(x), dtype=torch.bool) for x in logits], True)
    product = PRM_AGGREGATES["product"](solutions, present)
    all_right = torch.tensor([all(ex["step_labels"]) for ex in examples])
    out = process_reward_loss(steps[None], labels[None], mask[None])
    return {
        f"{prefix}loss": float(out.loss[0]),
        f"{prefix}accuracy": float(out.metrics["reward/accuracy"][0]),
        f"{prefix}auc": binary_auc(steps, labels),
        f"{prefix}solution_accuracy": float(((product > 0.5) == all_right).float().mean()),
    }


def fit_step_normalization(
    model: RewardModel, examples: Sequence[dict], device, pad_id: int, n_samples: int, seed: int
) -> tuple[dict[str, dict[str, list[float]]], dict[str, float]]:
    """A process reward model's solution scores (each aggregate of `PRM_AGGREGATES`) on up to n_samples training
    solutions: ({aggregate: {"mean": [per head], "std": [per head]}}, the same as logged metrics)."""
    order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(seed)).tolist()
    picked = [examples[i] for i in order[:n_samples]]
    logits = score_examples(model, picked, "stepwise", device, pad_id)
    solutions = torch.nn.utils.rnn.pad_sequence(logits, batch_first=True)  # [N, S, H]
    present = torch.nn.utils.rnn.pad_sequence([torch.ones(len(x), dtype=torch.bool) for x in logits], True)
    stats, logged = {}, {}
    for name, aggregate in PRM_AGGREGATES.items():
        scores = torch.stack([aggregate(solutions[..., h], present) for h in range(model.num_heads)], dim=1)
        mean, std = scores.mean(0), scores.std(0, unbiased=False).clamp_min(1e-6)
        stats[name] = {"mean": mean.tolist(), "std": std.tolist()}
        for h, head in enumerate(model.head_names):
            logged[f"reward/norm_mean/{head}/{name}"] = float(mean[h])
            logged[f"reward/norm_std/{head}/{name}"] = float(std[h])
    return stats, logged


def fit_normalization(
    model: RewardModel,
    examples: Sequence[dict],
    kind: str,
    device,
    pad_id: int,
    n_samples: int,
    seed: int,
    *,
    shared: bool = False,
) -> dict[str, float]:
    """Store the per-head mean/std of the rewards of (up to) n_samples training responses in the model."""
    order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(seed)).tolist()
    picked, n_rows = [], 0
    for i in order:
        if n_rows >= n_samples:
            break
        picked.append(examples[i])
        n_rows += {"pairwise": 2, "unpaired": 1}.get(kind) or len(examples[i]["input_ids"])
    rewards = torch.cat(score_examples(model, picked, kind, device, pad_id, shared=shared))[:n_samples]
    mean, std = model.fit_normalization(rewards)
    return {
        f"reward/norm_{stat}/{name}": float(v[h])
        for stat, v in (("mean", mean), ("std", std))
        for h, name in enumerate(model.head_names)
    }
