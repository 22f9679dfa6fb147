"""The reward stage's held-out evaluation and reward normalization (scoring examples with the model)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from rlhflab.data.reward_batch import collate_reward_batch
from rlhflab.eval.reward_accuracy import accuracy_by_rating, binary_auc, ranking_metrics
from rlhflab.losses import binary_classifier, bradley_terry
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
    (pairwise: rows chosen, rejected). shared: shared-prompt rows where possible (see `collate_reward_batch`)."""
    was_training = model.training
    model.eval()
    out: list[torch.Tensor] = []
    for s in range(0, len(examples), batch_size):
        chunk = examples[s : s + batch_size]
        batch = collate_reward_batch(chunk, kind, pad_id, shared=shared, dtype=model.score.weight.dtype)
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
