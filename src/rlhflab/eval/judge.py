"""How far a judge can be trusted: `rlhflab judge` asks it about labelled pairs and compares.

For each pair (prompt, chosen, rejected) the judge gives P(chosen better), asked in both orders
(`rlhflab.models.judge`). Reported:

    agreement            share of pairs where the judge prefers the labelled choice (P = 1/2 counts half),
                         with a 95% interval over pairs
    gold_agreement       the same against the gold reward's choice, when gold scores are given (lab data);
                         beside it `label_gold_agreement`, how often the file's own labels match gold
    position_bias_rate   share of pairs where the judge picks the same POSITION in both orders (the order
                         decided; Zheng et al. 2023's inconsistency), and `p_answer_a`, its mean P("A")
    pairs_per_s          judged pairs per second (two forward rows each), on this machine

`judge_pointwise` does the same with the judge's pointwise mode: each response scored alone by its expected
rating (`LMJudge.rate`), the pair decided by the higher score (no position to be biased toward).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from rlhflab.eval.metrics import mean_ci95


def _agree(p_first: np.ndarray, first_better: np.ndarray) -> np.ndarray:
    """Per pair 1 if the judge's P(first better) sides with `first_better`, 0 if against, 1/2 at P = 1/2."""
    picked = np.where(p_first > 0.5, 1.0, np.where(p_first < 0.5, 0.0, 0.5))
    return np.where(picked == 0.5, 0.5, (picked == first_better).astype(float))


def _agreement(judge, p: np.ndarray) -> dict[str, Any]:
    """Who judged, how many pairs, and the agreement with the labels (chosen is first) with its interval."""
    mean, lo, hi = mean_ci95(_agree(p, np.ones_like(p)))
    return {
        "judge": getattr(judge, "name", type(judge).__name__),
        "n_pairs": len(p),
        "agreement": round(float(mean), 4),
        "agreement_ci95": [round(float(lo), 4), round(float(hi), 4)],
    }


def _timing(n_pairs: int, seconds: float) -> dict[str, Any]:
    return {"seconds": round(seconds, 4), "pairs_per_s": round(n_pairs / seconds, 3) if seconds > 0 else None}


def _gold(p: np.ndarray, gold_chosen, gold_rejected) -> dict[str, Any]:
    """Agreement with gold's own choice on the pairs gold decides (gold ties say nothing about either side),
    and how often the labels themselves agree with gold there; empty without gold scores."""
    if gold_chosen is None or gold_rejected is None:
        return {}
    g_c, g_r = np.asarray(gold_chosen, dtype=float), np.asarray(gold_rejected, dtype=float)
    decided = g_c != g_r
    gold_first = (g_c > g_r).astype(float)
    g_mean, g_lo, g_hi = (
        mean_ci95(_agree(p[decided], gold_first[decided])) if decided.any() else (np.nan,) * 3
    )
    return {
        "gold_pairs": int(decided.sum()),
        "gold_agreement": round(float(g_mean), 4),
        "gold_agreement_ci95": [round(float(g_lo), 4), round(float(g_hi), 4)],
        "label_gold_agreement": round(float(gold_first[decided].mean()), 4) if decided.any() else None,
    }


def judge_agreement(
    judge,
    prompts: Sequence,
    chosen: Sequence[str],
    rejected: Sequence[str],
    *,
    gold_chosen: Sequence[float] | None = None,
    gold_rejected: Sequence[float] | None = None,
) -> dict[str, Any]:
    """The judge's verdicts on labelled pairs and the statistics above (a JSON-ready dict); `per_pair` holds
    each pair's P(chosen better) and both orders' P("A")."""
    started = time.perf_counter()
    verdict = judge.compare(prompts, chosen, rejected)
    seconds = time.perf_counter() - started
    p = verdict.p_first.double().numpy()
    p_a = np.concatenate([verdict.p_a.double().numpy(), verdict.p_a_swapped.double().numpy()])
    out = {
        **_agreement(judge, p),
        "position_bias_rate": round(float(1.0 - verdict.consistent.numpy().mean()), 4),
        "p_answer_a": round(float(p_a.mean()), 4),
        **_timing(len(p), seconds),
        **_gold(p, gold_chosen, gold_rejected),
    }
    out["per_pair"] = [
        {"p_chosen": float(a), "p_a": float(b), "p_a_swapped": float(c)}  # unrounded: the summary's inputs
        for a, b, c in zip(p, verdict.p_a.tolist(), verdict.p_a_swapped.tolist())
    ]
    return out


def judge_pointwise(
    judge,
    prompts: Sequence,
    chosen: Sequence[str],
    rejected: Sequence[str],
    *,
    gold_chosen: Sequence[float] | None = None,
    gold_rejected: Sequence[float] | None = None,
) -> dict[str, Any]:
    """Agreement of the judge's pointwise ratings with the labels (and gold): a pair goes to the response with
    the higher expected rating (equal ratings count half). A JSON-ready dict; `per_pair` holds both ratings."""
    started = time.perf_counter()
    r_chosen = judge.rate(prompts, chosen).double().numpy()
    r_rejected = judge.rate(prompts, rejected).double().numpy()
    seconds = time.perf_counter() - started
    # The pairwise helpers read P(first better); a rating difference d maps to the same side through 1/2 + d.
    p = 0.5 + np.sign(r_chosen - r_rejected) / 4
    out = {
        "mode": "pointwise",
        **_agreement(judge, p),
        "mean_rating_chosen": round(float(r_chosen.mean()), 4),
        "mean_rating_rejected": round(float(r_rejected.mean()), 4),
        **_timing(len(p), seconds),
        **_gold(p, gold_chosen, gold_rejected),
    }
    out["per_pair"] = [
        {"rating_chosen": float(a), "rating_rejected": float(b)} for a, b in zip(r_chosen, r_rejected)
    ]
    return out
