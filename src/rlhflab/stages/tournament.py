"""DNO's round between sampling and training (`rlhflab iterative-dpo algo.mode=dno`): a tournament of the feedback
source among each prompt's K samples, and the (best, worst) pairs by win rate (Rosset et al. 2024, "Direct Nash
Optimization", Algorithm 2, DNO-Prct). The maths (win rates, selection, margin filter) is
`rlhflab.losses.tournament`; here only which texts meet which question.

Rows k*p .. k*p + K-1 of a round's samples are prompt p's K responses. Every pair (i, j), i < j, of them is one
query (`feedback/queries`, the label budget: K(K-1)/2 per prompt), except a pair of identical texts: it is a tie
by the antisymmetry of any preference (P(y > y) = 1/2), known without asking. Any feedback source works (a reward,
the lab's annotators, a general preference model from `rlhflab pm`); with a preference model, DNO optimizes
against preferences no reward can express.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from rlhflab.feedback import TIE
from rlhflab.losses.tournament import (
    best_worst_pairs,
    tournament_matrix,
    tournament_pairs,
    tournament_win_rates,
)
from rlhflab.stages.online_dpo import check_labels


def ask_tournament(
    feedback, prompts: list, texts: list[str], k: int, timeout: float | None
) -> tuple[Tensor, Tensor]:
    """Ask `feedback` about every pair among each prompt's `k` responses, in one ticket.

    prompts, texts: [P * K] (row p*K + i: prompt p's response i). Returns (labels [P, K(K-1)/2] float32 in
    `tournament_pairs(k)` order: 1 the first of the pair preferred, 0 the second, 0.5 a tie (also for identical
    texts, which are not asked), NaN unanswered; identical [P, K(K-1)/2] bool).
    """
    pairs = tournament_pairs(k)
    n_prompts = len(texts) // k
    identical = torch.zeros(n_prompts, len(pairs), dtype=torch.bool)
    asked: list[tuple[int, int]] = []  # (prompt, pair index)
    for p in range(n_prompts):
        for c, (i, j) in enumerate(pairs):
            if texts[p * k + i] == texts[p * k + j]:
                identical[p, c] = True
            else:
                asked.append((p, c))
    labels = torch.full((n_prompts, len(pairs)), float("nan"))
    labels[identical] = TIE
    if asked:
        ticket = feedback.ask(
            [prompts[p * k] for p, _ in asked],
            [texts[p * k + pairs[c][0]] for p, c in asked],
            [texts[p * k + pairs[c][1]] for p, c in asked],
        )
        answers = check_labels(feedback.collect(ticket, timeout), len(asked), feedback)
        rows, cols = (torch.tensor(x, dtype=torch.long) for x in zip(*asked))
        labels[rows, cols] = answers
    return labels, identical


def best_worst_rows(
    prompts: list, texts: list[str], labels: Tensor, k: int, min_margin: float
) -> tuple[list[dict], list[dict], dict[str, float]]:
    """Each prompt's (highest, lowest win rate) pair as a prompt/chosen/rejected row when its margin passes.

    prompts: [P * K] as JSON-ready values (the rows and records hold them). Returns (rows for the round's DPO
    run, one record per prompt for RUN/round-R/tournament.jsonl: responses, win rates, the picked indices,
    margin, kept; counts). A kept pair with an empty response is dropped and counted: a pairs file holds no
    empty response.
    """
    win_rates = tournament_win_rates(tournament_matrix(labels, k))
    best, worst, margin, keep = best_worst_pairs(win_rates, min_margin)
    rows, records, empty = [], [], 0
    for p in range(len(texts) // k):
        responses = texts[p * k : (p + 1) * k]
        chosen, rejected = responses[int(best[p])], responses[int(worst[p])]
        kept = bool(keep[p])
        if kept and (not chosen.strip() or not rejected.strip()):
            kept, empty = False, empty + 1
        if kept:
            rows.append({"prompt": prompts[p * k], "chosen": chosen, "rejected": rejected})
        records.append(
            {
                "prompt": prompts[p * k],
                "responses": responses,
                "win_rates": [_num(w) for w in win_rates[p].tolist()],
                "chosen": int(best[p]),
                "rejected": int(worst[p]),
                "margin": _num(float(margin[p])),
                "kept": kept,
            }
        )
    counts = {
        "feedback/pairs_kept": float(len(rows)),
        "feedback/empty_response": float(empty),
        # prompts whose best and worst responses are closer than the margin filter allows (or tied)
        "feedback/below_margin": float((~keep).sum()),
    }
    if keep.any():
        counts["feedback/win_rate_margin"] = float(margin[keep].mean())
    return rows, records, counts


def _num(v: float) -> Any:
    return v if math.isfinite(v) else None  # NaN is not JSON


__all__ = ["ask_tournament", "best_worst_rows"]
