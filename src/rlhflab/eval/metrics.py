"""Pure evaluation metrics: numbers in, numbers out (numpy, no models).

Confidence intervals are Student-t intervals for a mean, mean +- t(0.975, n-1) * s / sqrt(n), with s the
sample standard deviation (ddof=1). The evaluator applies them to per-prompt means, so that several
samples of one prompt (which are correlated through the prompt) count as one unit: an honest interval
for "a new prompt from this distribution". Win rates count ties as one half, as AlpacaFarm does.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Hashable, Sequence

import numpy as np

# Two-sided 95% quantiles t(0.975, df) for small df; beyond 30 a Cornish-Fisher expansion is exact to 1e-4.
_T975 = (
    12.7062,
    4.3027,
    3.1824,
    2.7764,
    2.5706,
    2.4469,
    2.3646,
    2.3060,
    2.2622,
    2.2281,
    2.2010,
    2.1788,
    2.1604,
    2.1448,
    2.1314,
    2.1199,
    2.1098,
    2.1009,
    2.0930,
    2.0860,
    2.0796,
    2.0739,
    2.0687,
    2.0639,
    2.0595,
    2.0555,
    2.0518,
    2.0484,
    2.0452,
    2.0423,
)
_Z975 = 1.959963984540054


def t_quantile_975(df: int) -> float:
    """t(0.975, df): the multiplier of the standard error in a two-sided 95% interval."""
    if df < 1:
        raise ValueError(f"df must be >= 1, got {df}")
    if df <= len(_T975):
        return _T975[df - 1]
    z = _Z975
    return z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)


def mean_ci95(values: Sequence[float] | np.ndarray) -> tuple[float, float, float]:
    """(mean, low, high) of a Student-t 95% interval; (nan, nan, nan) if empty, (x, nan, nan) if n = 1."""
    x = np.asarray(values, dtype=np.float64).reshape(-1)
    if x.size == 0:
        return math.nan, math.nan, math.nan
    mean = float(x.mean())
    if x.size == 1:
        return mean, math.nan, math.nan
    half = t_quantile_975(x.size - 1) * float(x.std(ddof=1)) / math.sqrt(x.size)
    return mean, mean - half, mean + half


def win_rate(scores: Sequence[float] | np.ndarray, ref_scores: Sequence[float] | np.ndarray) -> float:
    """Share of paired comparisons scores[i] vs ref_scores[i] won, ties counting 1/2."""
    a, b = np.asarray(scores, dtype=np.float64), np.asarray(ref_scores, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"win_rate needs paired scores, got shapes {a.shape} and {b.shape}")
    if a.size == 0:
        return math.nan
    return float(np.mean((a > b) + 0.5 * (a == b)))


def win_rate_all_pairs(scores: np.ndarray, ref_scores: np.ndarray) -> np.ndarray:
    """Per-prompt win rate over every (sample, reference sample) pair: [P, N] vs [P, M] -> [P]."""
    a = np.asarray(scores, dtype=np.float64)[:, :, None]
    b = np.asarray(ref_scores, dtype=np.float64)[:, None, :]
    return ((a > b) + 0.5 * (a == b)).mean(axis=(1, 2))


def paired_gain(scores: np.ndarray, ref_scores: np.ndarray) -> np.ndarray:
    """Per-prompt gain over a reference on the same prompts: [P, N] vs [P, M] -> [P], each prompt's mean score
    minus the reference's mean score on that prompt.

    A t-interval over these differences (`mean_ci95`) is the paired comparison of two policies: the prompts'
    own difficulty, which dominates the spread of either policy's scores, cancels out (the paired t-test; e.g.
    Dror et al. 2018, "The Hitchhiker's Guide to Testing Statistical Significance in NLP", section 3). Two
    unpaired intervals that overlap can still hide a gain the paired interval shows.
    """
    a, b = np.asarray(scores, dtype=np.float64), np.asarray(ref_scores, dtype=np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[0]:
        raise ValueError(f"paired_gain needs [P, N] and [P, M] scores, got shapes {a.shape} and {b.shape}")
    return a.mean(axis=1) - b.mean(axis=1)


def distinct_n(sequences: Sequence[Sequence[Hashable]], n: int) -> float:
    """Distinct-n: unique n-grams / all n-grams over all sequences (0 when there is no n-gram).

    Low values mean the samples repeat themselves or each other (mode collapse).
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    grams = [tuple(s[i : i + n]) for s in sequences for i in range(len(s) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


def unigram_entropy(sequences: Sequence[Sequence[Hashable]]) -> float:
    """Entropy in nats of the empirical token distribution pooled over all sequences (0 if empty)."""
    counts = np.array(list(Counter(t for s in sequences for t in s).values()), dtype=np.float64)
    if counts.size == 0:
        return 0.0
    p = counts / counts.sum()
    return float(-(p * np.log(p)).sum())


def rankdata(values: Sequence[float] | np.ndarray) -> np.ndarray:
    """Ranks 1..n, tied values getting the average of their ranks (as scipy.stats.rankdata)."""
    x = np.asarray(values, dtype=np.float64)
    order = np.argsort(x, kind="stable")
    ranks = np.empty(x.size, dtype=np.float64)
    sorted_x = x[order]
    i = 0
    while i < x.size:
        j = i
        while j + 1 < x.size and sorted_x[j + 1] == sorted_x[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def spearman(x: Sequence[float] | np.ndarray, y: Sequence[float] | np.ndarray) -> float:
    """Spearman rank correlation (Pearson on average ranks); nan if either side is constant or n < 2."""
    rx, ry = rankdata(x), rankdata(y)
    if rx.size != ry.size:
        raise ValueError(f"spearman needs paired values, got {rx.size} and {ry.size}")
    if rx.size < 2 or rx.std() == 0 or ry.std() == 0:
        return math.nan
    return float(np.corrcoef(rx, ry)[0, 1])


def pairwise_accuracy(
    chosen_scores: Sequence[float] | np.ndarray, rejected_scores: Sequence[float] | np.ndarray
) -> float:
    """Share of pairs a scorer orders like the label (chosen > rejected), ties counting 1/2."""
    return win_rate(chosen_scores, rejected_scores)


def accuracy_by_bucket(
    chosen_scores: Sequence[float] | np.ndarray,
    rejected_scores: Sequence[float] | np.ndarray,
    buckets: Sequence[str],
    order: Sequence[str] | None = None,
) -> dict[str, dict[str, float]]:
    """Pairwise accuracy per bucket (e.g. Llama 2 rating), plus "overall" pooled over all pairs.

    Returns {bucket: {"accuracy", "n"}} with the buckets in `order` first (empty ones included with nan, as a
    table column), then any others, then "overall" (Llama 2 Table 28's "Avg" is this pooled accuracy).
    """
    c, r = np.asarray(chosen_scores, dtype=np.float64), np.asarray(rejected_scores, dtype=np.float64)
    b = np.asarray(list(buckets), dtype=object)
    if not (c.shape == r.shape == b.shape):
        raise ValueError(f"accuracy_by_bucket needs equal lengths, got {c.shape}, {r.shape}, {b.shape}")
    names = list(order or []) + sorted({str(x) for x in b} - set(order or []))
    out: dict[str, dict[str, float]] = {}
    for name in names:
        m = b == name
        out[name] = {"accuracy": pairwise_accuracy(c[m], r[m]), "n": int(m.sum())}
    out["overall"] = {"accuracy": pairwise_accuracy(c, r), "n": int(c.size)}
    return out


def _ngrams(tokens: Sequence[Hashable], n: int) -> Counter:
    return Counter(tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1))


def bleu(
    hypothesis: Sequence[Hashable],
    references: Sequence[Sequence[Hashable]],
    max_n: int = 4,
    epsilon: float = 0.1,
) -> float:
    """Sentence BLEU-`max_n` of one tokenized hypothesis against tokenized references (Papineni et al. 2002).

    BLEU = BP * exp(sum_{n=1}^{N} (1/N) log p_n), with p_n the clipped n-gram precision (each hypothesis
    n-gram counts at most as often as it occurs in the reference that has it most; eq. in Sec. 2.1), and the
    brevity penalty BP = 1 if c > r else exp(1 - r / c) (Sec. 2.2.2), c the hypothesis length and r the
    reference length closest to c (the shorter on a tie). Smoothing: "method 1" of Chen & Cherry (2014), as
    NLTK's `SmoothingFunction().method1` that Texygen's self-BLEU uses: a precision with no clipped match is
    epsilon / (hypothesis n-grams). Orders above the hypothesis length (no n-gram at all) are left out and the
    geometric mean is over orders 1..min(max_n, c): NLTK would give them epsilon, so that two identical
    3-token answers scored BLEU-4 0.56 and looked diverse. An empty hypothesis scores 0. Raises ValueError
    without references or with max_n < 1.
    """
    if max_n < 1:
        raise ValueError(f"max_n must be >= 1, got {max_n}")
    if not references:
        raise ValueError("bleu needs at least one reference")
    grams = [[_ngrams(s, n) for n in range(1, max_n + 1)] for s in (hypothesis, *references)]
    return _bleu_of_counts(grams[0], grams[1:], len(hypothesis), [len(r) for r in references], epsilon)


def _bleu_of_counts(
    hyp: list[Counter], refs: list[list[Counter]], c: int, ref_lens: list[int], epsilon: float
) -> float:
    """`bleu` from n-gram counts (hyp[n-1]: the hypothesis's n-grams; refs[j][n-1]: reference j's), so that
    self-BLEU counts each sample's n-grams once, not once per sample it is compared with."""
    if c == 0:
        return 0.0
    log_p, orders = 0.0, min(len(hyp), c)
    for k in range(orders):
        most = Counter()
        for ref in refs:
            most |= ref[k]  # | keeps each n-gram's largest count over the references
        matches = sum(min(count, most[g]) for g, count in hyp[k].items())
        log_p += math.log((matches or epsilon) / sum(hyp[k].values())) / orders
    r = min(ref_lens, key=lambda length: (abs(length - c), length))
    brevity = 1.0 if c > r else math.exp(1 - r / c)
    return brevity * math.exp(log_p)


def self_bleu(samples: Sequence[Sequence[Hashable]], max_n: int = 4) -> float:
    """Self-BLEU (Zhu et al. 2018, "Texygen", Sec. 3.2): the mean over samples of the BLEU of each tokenized
    sample against all the others as references. Higher = the samples resemble each other more (less
    diverse); 1 when they are all the same (non-empty) sequence. Raises ValueError with fewer than 2 samples."""
    if len(samples) < 2:
        raise ValueError(f"self_bleu needs at least 2 samples, got {len(samples)}")
    if max_n < 1:
        raise ValueError(f"max_n must be >= 1, got {max_n}")
    grams = [[_ngrams(s, n) for n in range(1, max_n + 1)] for s in samples]
    lens = [len(s) for s in samples]
    scores = [
        _bleu_of_counts(grams[i], grams[:i] + grams[i + 1 :], lens[i], lens[:i] + lens[i + 1 :], 0.1)
        for i in range(len(samples))
    ]
    return float(np.mean(scores))
