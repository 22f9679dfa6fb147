"""Estimators for best-of-n from one pool of samples: its expected reward for every n, and its KL to the policy.

Best-of-n draws n responses from a policy pi and keeps the one a (proxy) reward ranks highest. Two things about
it are usually quoted, not measured:

- its value: with a pool of M >= n samples per prompt, the expected score of best-of-n is known exactly over
  all C(M, n) subsets of the pool, so one pool gives the whole curve n = 1..M without resampling (Nakano et al.
  2021, App. I; Gao et al. 2022, Sec. 2.2, "unbiased estimator");
- its KL to pi: KL(pi_bon || pi) = log n - (n - 1) / n (Stiennon et al. 2020, App. G.3), which assumes every
  response has a distinct reward and negligible probability. Beirami et al. (2024, "Theoretical guarantees on
  the best-of-n alignment policy", Thm. 1) show it is only an upper bound: where responses repeat (a sequence
  with probability p), the best-of-n probability of y is F(y)^n - (F(y) - p(y))^n, with F the reward's CDF
  under pi, and the log-ratio to pi(y) is smaller than the formula's.
"""

from __future__ import annotations

import math

import numpy as np


def best_of_n_weights(m: int, n: int) -> np.ndarray:
    """[M] probability that the pool item of ascending rank i (0 = lowest score) is the best of a uniformly
    random n-subset of the M items: C(i, n - 1) / C(M, n) (zero below rank n - 1). Sums to 1.

    Gao et al. 2022, Sec. 2.2: the unbiased best-of-n estimator from a pool of M >= n samples."""
    if not 1 <= n <= m:
        raise ValueError(f"best-of-n needs 1 <= n <= M (the pool size), got n={n}, M={m}")
    i = np.arange(m, dtype=np.float64)
    ok = i >= n - 1
    log_w = np.full(m, -np.inf)
    # log C(i, n-1) - log C(m, n) with log-gamma: exact for pools of thousands without overflow.
    lg = math.lgamma
    log_w[ok] = [lg(k + 1) - lg(n) - lg(k - n + 2) for k in i[ok]]
    log_w[ok] -= lg(m + 1) - lg(n + 1) - lg(m - n + 1)
    return np.exp(log_w)


def best_of_n_expectation(scores: np.ndarray, values: np.ndarray, n: int) -> np.ndarray:
    """[P] expected `values` of the best-of-n pick by `scores`, over every n-subset of each prompt's pool.

    scores, values: [P, M] (the proxy that picks, and what is measured at the pick: gold, or the proxy itself).
    Ties in `scores` are broken by pool order (a stable sort), as a sampler's argmax over a list would be."""
    scores, values = np.asarray(scores, dtype=np.float64), np.asarray(values, dtype=np.float64)
    if scores.shape != values.shape or scores.ndim != 2:
        raise ValueError(f"scores and values must both be [P, M], got {scores.shape} and {values.shape}")
    order = np.argsort(scores, axis=1, kind="stable")
    ranked = np.take_along_axis(values, order, axis=1)
    return ranked @ best_of_n_weights(scores.shape[1], n)


def best_of_n_kl_formula(n: int) -> float:
    """log n - (n - 1) / n: KL(best-of-n || pi) when rewards are distinct and each response rare (Stiennon et
    al. 2020, App. G.3); an upper bound otherwise (Beirami et al. 2024, Thm. 1)."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    return math.log(n) - (n - 1) / n


def best_of_n_log_ratio(cdf: np.ndarray, logp: np.ndarray, n: int) -> np.ndarray:
    """log pi_bon(y) / pi(y) for responses y, elementwise.

    cdf: F(y) = P_pi(reward <= reward(y)), the mass of responses that y beats or ties, y's own included;
    logp: log pi(y), the response's log-probability under the policy.

    pi_bon(y) = F^n - (F - p)^n for p = pi(y) (Beirami et al. 2024, Lemma 1: y is picked when all n draws
    score <= reward(y) and not all of them score below it), so

        log pi_bon(y) / pi(y) = n log F + log(1 - (1 - p / F)^n) - log p,

    computed as n log F + log(-expm1(n log1p(-p / F))) - log p; as p -> 0 it tends to log n + (n - 1) log F,
    whose mean under pi_bon is the formula log n - (n - 1) / n. F is clipped up to p (an estimated F below a
    response's own probability is an estimation error)."""
    cdf, logp = np.asarray(cdf, dtype=np.float64), np.asarray(logp, dtype=np.float64)
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if np.any(cdf <= 0) or np.any(cdf > 1) or np.any(logp > 0):
        raise ValueError("cdf must lie in (0, 1] and logp be <= 0")
    p = np.exp(logp)
    f = np.maximum(cdf, p)
    with np.errstate(divide="ignore"):
        tail = np.log(-np.expm1(n * np.log1p(-np.minimum(p / f, 1.0))))
    return n * np.log(f) + tail - logp


def pool_cdf(scores: np.ndarray) -> np.ndarray:
    """[P, M] an estimate of F for each pool item from its prompt's pool of M: exp(E[log F]) of the k-th
    smallest of M uniforms, exp(psi(k) - psi(M + 1)) = exp(-(1/k + 1/(k+1) + ... + 1/M)), with k the number of
    items scoring <= it (itself and its ties included).

    Why not k / M: the log-ratio's (n - 1) log F term then overstates the KL of best-of-64 by 4% on a pool of
    512 (the top item always gets F = 1); with E[log F] plugged in it is unbiased for a continuous reward."""
    scores = np.asarray(scores, dtype=np.float64)
    m = scores.shape[1]
    sorted_ = np.sort(scores, axis=1)
    k = np.stack([np.searchsorted(row, s, side="right") for row, s in zip(sorted_, scores)])
    harmonic = np.concatenate([[0.0], np.cumsum(1.0 / np.arange(1, m + 1))])  # harmonic[j] = 1 + ... + 1/j
    return np.exp(-(harmonic[m] - harmonic[k - 1]))
