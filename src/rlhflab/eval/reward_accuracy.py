"""Reward-model accuracy tables: by Llama 2 rating (Touvron et al. 2023, Table 28) and for K-wise rankings."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from rlhflab.data.records import LLAMA2_RATINGS
from rlhflab.eval.metrics import accuracy_by_bucket

# Llama 2 Table 28 column titles, in the paper's order; "avg" pools every pair.
RATING_TITLES = {
    "significantly_better": "Significantly Better",
    "better": "Better",
    "slightly_better": "Slightly Better",
    "negligibly_better": "Negligibly Better / Unsure",
    "unrated": "Unrated",
    "avg": "Avg",
}


def accuracy_by_rating(
    chosen: Sequence[float], rejected: Sequence[float], ratings: Sequence[str | None]
) -> dict[str, dict[str, float]]:
    """Pairwise accuracy per Llama 2 rating bucket, in Table 28's order, then "avg" pooled over all pairs.

    Returns {bucket: {"accuracy": share of pairs with chosen > rejected (a tie counts 1/2; nan when the
    bucket is empty), "n": pairs}}. The four Llama 2 buckets always appear; pairs without a rating go to
    "unrated" and other rating names to their own buckets (both only when present).
    """
    table = accuracy_by_bucket(
        torch.as_tensor(chosen, dtype=torch.float64).numpy(),
        torch.as_tensor(rejected, dtype=torch.float64).numpy(),
        [x or "unrated" for x in ratings],
        order=LLAMA2_RATINGS,
    )
    table["avg"] = table.pop("overall")
    return table


def format_accuracy_table(tables: dict[str, dict[str, dict[str, float]]]) -> str:
    """Markdown table in Llama 2 Table 28's layout: one row per head, accuracy in % with the pair count."""
    columns = list(dict.fromkeys(b for t in tables.values() for b in t))
    lines = [
        "| head | " + " | ".join(RATING_TITLES.get(b, b) for b in columns) + " |",
        "|---" * (len(columns) + 1) + "|",
    ]
    for head, table in tables.items():
        cells = [
            f"{100 * table[b]['accuracy']:.1f} (n={table[b]['n']})" if table.get(b, {}).get("n") else "-"
            for b in columns
        ]
        lines.append(f"| {head} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def ranking_metrics(scores: torch.Tensor, ex: dict) -> tuple[float, float, float]:
    """(pair accuracy, Kendall tau over strictly ordered pairs, top-1 hit) of one ranking."""
    concordant = sum(float(scores[i] > scores[j]) for i, j in ex["pairs"])
    discordant = sum(float(scores[i] < scores[j]) for i, j in ex["pairs"])
    tau = (concordant - discordant) / max(concordant + discordant, 1.0)
    top1 = float(ex["ranks"][int(scores.argmax())] == 0)
    return concordant / len(ex["pairs"]), tau, top1


def binary_auc(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """Area under the ROC curve of scores [N] for boolean labels [N]: the probability that a random positive
    scores above a random negative, ties counting 1/2 (the Mann-Whitney U statistic / (n_pos n_neg); Hanley and
    McNeil 1982). NaN without both classes."""
    pos, neg = scores[labels.bool()].double(), scores[~labels.bool()].double()
    if len(pos) == 0 or len(neg) == 0:
        return float("nan")
    diff = pos[:, None] - neg[None, :]
    return float(((diff > 0).double() + 0.5 * (diff == 0).double()).mean())
