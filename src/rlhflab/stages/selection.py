"""The selection maths of rejection sampling and ReST (`rlhflab rs`, `rlhflab.stages.rejection_sampling`): pure
functions of the scored candidates, which sample to keep for fine-tuning."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

from rlhflab.stages.best_of_n import BestOfN
from rlhflab.stages.common import plain_json


@dataclass
class Candidates:
    """K scored samples for each of P prompts: ids [P] (indices into the prompts file), texts [P][K] (in sampling
    order), scores [P, K] float32 (the reward, minus algo.missing_eos_penalty for a response cut off)."""

    ids: list[int]
    texts: list[list[str]]
    scores: Tensor

    def rows(self, prompts: list) -> list[dict]:
        return [
            {"prompt_index": i, "prompt": plain_json(prompts[i]), "samples": t, "scores": s}
            for i, t, s in zip(self.ids, self.texts, self.scores.tolist())
        ]

    @classmethod
    def from_rows(cls, rows: list[dict]) -> Candidates:
        return cls(
            [r["prompt_index"] for r in rows],
            [r["samples"] for r in rows],
            torch.tensor([r["scores"] for r in rows], dtype=torch.float32),
        )


class Kept(NamedTuple):
    """A sample kept for fine-tuning: its text, its score and the round (rest: Grow step) that sampled it."""

    text: str
    score: float
    round: int


def best_per_prompt(c: Candidates, rnd: int) -> dict[int, Kept]:
    """Rejection sampling's step 2: {prompt index: its highest-scoring sample} (on a tie the first sampled, as
    `BestOfN`). Empty responses are passed over, since a fine-tuning row needs a completion: a prompt whose K
    samples are all empty keeps nothing."""
    usable = torch.tensor([[bool(t.strip()) for t in row] for row in c.texts], dtype=torch.bool)
    best = BestOfN.from_scores(c.texts, c.scores.masked_fill(~usable, float("-inf")))
    return {
        i: Kept(text, float(score), rnd)
        for i, text, score in zip(c.ids, best.texts, best.scores.tolist())
        if math.isfinite(score)
    }


def pool_best(pool: dict[int, Kept], new: dict[int, Kept]) -> dict[int, Kept]:
    """Llama 2's pooled selection: per prompt, the higher-scoring of the pool's sample and the new one (the
    pool's, from the earlier round, on a tie); prompts seen in only one of them keep theirs."""
    out = dict(pool)
    for i, kept in new.items():
        if i not in out or kept.score > out[i].score:
            out[i] = kept
    return out


def threshold_values(scores: Tensor, thresholds: list[float], kind: str) -> list[float]:
    """ReST's tau_i in reward units: the thresholds as given (kind=reward), or the q-quantiles (linear
    interpolation) of the grown set's scores [P, K] (kind=quantile)."""
    if kind == "reward":
        return [float(t) for t in thresholds]
    flat = scores.double().flatten()
    return [float(torch.quantile(flat, q)) for q in thresholds]


def above_threshold(c: Candidates, tau: float, rnd: int) -> list[tuple[int, Kept]]:
    """ReST's Improve filter: every (prompt index, sample) of the Grow set with score >= tau, prompt by prompt in
    sampling order; empty responses are dropped (no completion to fine-tune on)."""
    keep = c.scores.double() >= tau
    return [
        (i, Kept(text, float(c.scores[p, j]), rnd))
        for p, (i, row) in enumerate(zip(c.ids, c.texts))
        for j, text in enumerate(row)
        if keep[p, j] and text.strip()
    ]
