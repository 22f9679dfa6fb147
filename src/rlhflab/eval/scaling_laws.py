"""The functional forms of reward over-optimization (Gao et al. 2022, "Scaling Laws for Reward Model
Overoptimization", Eqs. 1 and 2), fitted by least squares.

With d = sqrt(KL(pi || pi_init)) and R the gold reward's gain over the initial policy (R(0) = 0):

    best-of-n:  R_bon(d) = d (alpha_bon - beta_bon d)
    RL:         R_rl(d)  = d (alpha_rl - beta_rl log d)

Both are linear in (alpha, beta), so the fit is ordinary least squares without an intercept (the forms pass
through the origin by construction). Gold peaks at d* = alpha / (2 beta) (best-of-n) and d* = exp(alpha / beta -
1) (RL) when beta > 0; Gao et al. found alpha growing and beta shrinking with the reward model's size, so the peak
moves out.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Fit:
    """alpha, beta of a functional form, its R^2 on the fitted points (1 - SSE / SST about their mean), the
    d at which it peaks (inf when beta <= 0: no peak) and the number of points."""

    alpha: float
    beta: float
    r2: float
    d_peak: float
    points: int

    def to_dict(self) -> dict[str, float]:
        return {"alpha": self.alpha, "beta": self.beta, "r2": self.r2, "d_peak": self.d_peak}


def _least_squares(features: np.ndarray, r: np.ndarray) -> tuple[float, float, float]:
    coef, *_ = np.linalg.lstsq(features, r, rcond=None)
    resid = r - features @ coef
    sst = float(((r - r.mean()) ** 2).sum())
    r2 = 1.0 - float((resid**2).sum()) / sst if sst > 0 else float("nan")
    return float(coef[0]), float(coef[1]), r2


def _points(d, r) -> tuple[np.ndarray, np.ndarray]:
    d, r = np.asarray(d, dtype=np.float64), np.asarray(r, dtype=np.float64)
    if d.shape != r.shape or d.ndim != 1:
        raise ValueError(f"d and r must be 1-D of the same length, got {d.shape} and {r.shape}")
    if np.any(d < 0) or not np.all(np.isfinite(d)) or not np.all(np.isfinite(r)):
        raise ValueError("d must be finite and >= 0, r finite")
    if np.count_nonzero(d > 0) < 2:
        raise ValueError("a fit needs at least two points with d > 0")
    return d, r


def fit_best_of_n(d, r) -> Fit:
    """Least-squares alpha, beta of R = d (alpha - beta d) (Gao et al. 2022, Eq. 1) through the points."""
    d, r = _points(d, r)
    alpha, beta, r2 = _least_squares(np.stack([d, -(d**2)], axis=1), r)
    peak = alpha / (2 * beta) if beta > 0 else math.inf
    return Fit(alpha, beta, r2, peak, len(d))


def fit_rl(d, r) -> Fit:
    """Least-squares alpha, beta of R = d (alpha - beta log d) (Gao et al. 2022, Eq. 2); the point d = 0
    contributes 0 = 0 (d log d -> 0), as the form does."""
    d, r = _points(d, r)
    dlogd = np.where(d > 0, d * np.log(np.where(d > 0, d, 1.0)), 0.0)
    alpha, beta, r2 = _least_squares(np.stack([d, -dlogd], axis=1), r)
    peak = math.exp(alpha / beta - 1) if beta > 0 else math.inf
    return Fit(alpha, beta, r2, peak, len(d))
