"""A tournament among K responses to one prompt: every pair judged, each response's win rate, the best and the
worst response as a preference pair (Rosset et al. 2024, "Direct Nash Optimization", Algorithm 2, DNO-Prct).

DNO optimizes against a general preference function P(y > y' | x), which need not come from a reward. Each
round samples K responses per prompt from the current policy, ranks them by their win rate against the
others under P, and trains a DPO-style contrastive step on (best, worst) pairs whose win-rate margin is large.
The win rate of y_i, W_i = mean over j != i of P(y_i > y_j), estimates E_{y' ~ pi}[P(y_i > y')], the quantity
whose maximizer in the soft policy iteration of DNO (Algorithm 1) is the next policy.

Pairs are laid out in `itertools.combinations(range(K), 2)` order: (0, 1), (0, 2), ..., (K-2, K-1). A label is
1 (the first of the pair preferred), 0 (the second), 0.5 (a tie), a probability in between, or NaN (no answer:
it leaves both responses' win rates untouched).
"""

from __future__ import annotations

import itertools

import torch
from torch import Tensor

from rlhflab.losses.utils import check_unit_interval


def tournament_pairs(k: int) -> list[tuple[int, int]]:
    """The K(K-1)/2 pairs (i, j), i < j, in the order their labels come."""
    if k < 2:
        raise ValueError(f"a tournament needs at least 2 responses, got K={k}")
    return list(itertools.combinations(range(k), 2))


def tournament_matrix(labels: Tensor, k: int) -> Tensor:
    """The preference matrix of each prompt's tournament.

    labels: [P, K(K-1)/2], pair (i, j)'s label in `tournament_pairs(k)` order (1: i preferred). Returns
    [P, K, K] float with M[i, j] = P(y_i > y_j) as labelled: M[i, j] = label, M[j, i] = 1 - label (the
    antisymmetry of a preference), NaN where unanswered and on the diagonal (no response plays itself);
    float64.
    """
    pairs = tournament_pairs(k)
    if labels.dim() != 2 or labels.shape[1] != len(pairs):
        raise ValueError(f"labels must be [P, {len(pairs)}] for K={k}, got {tuple(labels.shape)}")
    # float64: win rates such as 2/3 - 1/3 then meet a margin threshold of 1/3 as exact fractions would.
    labels = labels.double()
    out = torch.full((labels.shape[0], k, k), float("nan"), dtype=labels.dtype, device=labels.device)
    first = torch.tensor([i for i, _ in pairs], device=labels.device)
    second = torch.tensor([j for _, j in pairs], device=labels.device)
    out[:, first, second] = labels
    out[:, second, first] = 1 - labels  # NaN stays NaN
    return out


def tournament_win_rates(prefs: Tensor) -> Tensor:
    """W_i = mean over the answered j != i of M[i, j] (Rosset et al. 2024, Algorithm 2, "rank responses").

    prefs: [P, K, K] from `tournament_matrix` (NaN = unanswered, ignored). Returns [P, K]; NaN for a
    response with no answered game.
    """
    answered = ~prefs.isnan()
    total = torch.where(answered, prefs, torch.zeros_like(prefs)).sum(-1)
    games = answered.sum(-1).to(prefs.dtype)
    return torch.where(games > 0, total / games.clamp(min=1), torch.full_like(total, float("nan")))


def best_worst_pairs(win_rates: Tensor, min_margin: float = 0.0) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Each prompt's preference pair: the response with the highest win rate as chosen, the lowest as rejected,
    kept when the win-rate margin is positive and at least `min_margin` (Algorithm 2, "filter preference pairs":
    large-margin pairs only).

    win_rates: [P, K] (NaN = no answered game: never picked). Returns (best [P] long, worst [P] long, margin [P]
    = W_best - W_worst (NaN when fewer than two responses have a win rate), keep [P] bool). Equal win rates go
    to the lowest index for both best and worst, so an all-equal tournament keeps nothing (margin 0).
    """
    check_unit_interval("min_margin", min_margin, upper_open=True)
    if win_rates.dim() != 2:
        raise ValueError(f"win_rates must be [P, K], got {tuple(win_rates.shape)}")
    known = ~win_rates.isnan()
    best = torch.where(known, win_rates, torch.full_like(win_rates, float("-inf"))).argmax(-1)
    worst = torch.where(known, win_rates, torch.full_like(win_rates, float("inf"))).argmin(-1)
    rows = torch.arange(win_rates.shape[0], device=win_rates.device)
    margin = win_rates[rows, best] - win_rates[rows, worst]
    margin = torch.where(known.sum(-1) >= 2, margin, torch.full_like(margin, float("nan")))
    keep = (margin > 0) & (margin >= min_margin) & (best != worst)  # NaN compares False
    return best, worst, margin, keep


__all__ = ["best_worst_pairs", "tournament_matrix", "tournament_pairs", "tournament_win_rates"]
