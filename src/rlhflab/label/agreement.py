"""Inter-annotator agreement: pure functions, numbers in, numbers out (numpy, no models, no database).

Used by ``rlhflab label stats``. Every chance-corrected coefficient here has the shape
(observed agreement - chance agreement) / (1 - chance agreement); they differ in how chance is modelled:

* Cohen's kappa: each rater has their own label distribution (two raters, same items).
* Fleiss' kappa: one pooled label distribution, a fixed number of raters per item (any raters).
* Krippendorff's alpha: one pooled distribution of *pairable* values, any number of raters per unit,
  missing values allowed, nominal or interval distances.

Conventions for degenerate input, shared by all of them: when chance agreement is 1 (every label is the
same category, so there is no variation to agree on) the coefficient is 0/0 and the function returns
``nan``, even when observed agreement is perfect; when there is nothing to measure (no pairable data) the
function returns ``nan`` as well. Malformed input (lengths that do not match, negative counts, an unknown
metric) raises ``ValueError``. In the mapping-based functions a rating of ``None`` or a float NaN counts
as missing, exactly as if the rater had not labelled the item.
"""

from __future__ import annotations

import itertools
import math
import numbers
import operator
from collections import Counter
from collections.abc import Hashable, Mapping, Sequence

import numpy as np

__all__ = [
    "cohen_kappa",
    "fleiss_kappa",
    "fleiss_kappa_from_labels",
    "krippendorff_alpha",
    "mean_pairwise_cohen_kappa",
    "position_bias",
]

# Two-sided 95% normal quantile, Phi^-1(0.975).
_Z975 = 1.959963984540054


def _is_missing(value: object) -> bool:
    return value is None or (isinstance(value, (float, np.floating)) and math.isnan(value))


def _present(ratings: Mapping[Hashable, Hashable]) -> dict[Hashable, Hashable]:
    """The ratings of one item without the missing ones."""
    return {rater: value for rater, value in ratings.items() if not _is_missing(value)}


def cohen_kappa(a: Sequence[Hashable], b: Sequence[Hashable]) -> float:
    """Cohen's kappa for two raters who labelled the same items (Cohen, 1960).

    ``a[i]`` and ``b[i]`` are the two raters' labels of item i (any hashable labels; every value, ``None``
    included, is a category here: pairing items up and dropping missing ones is the caller's job).

        kappa = (p_o - p_e) / (1 - p_e),   p_o = (1/N) sum_i [a_i == b_i],   p_e = sum_k p_a(k) p_b(k),

    where p_a(k), p_b(k) are each rater's own share of label k. Computed exactly from counts as
    (N * agreements - S) / (N^2 - S) with S = sum_k count_a(k) count_b(k).

    Degenerate input: when p_e == 1 (both raters used one and the same single category for every item) the
    coefficient is 0/0 and ``nan`` is returned, even though observed agreement is perfect: with no
    variation there is nothing to tell chance from agreement. Raises ``ValueError`` when the sequences
    differ in length or are empty.
    """
    if len(a) != len(b):
        raise ValueError(f"cohen_kappa needs two equally long label sequences, got {len(a)} and {len(b)}")
    n = len(a)
    if n == 0:
        raise ValueError("cohen_kappa needs at least one labelled item")
    agreements = sum(1 for x, y in zip(a, b) if x == y)
    count_a, count_b = Counter(a), Counter(b)
    s = sum(c * count_b[k] for k, c in count_a.items())
    denominator = n * n - s
    if denominator == 0:
        return math.nan
    return (n * agreements - s) / denominator


def mean_pairwise_cohen_kappa(
    labels: Mapping[Hashable, Mapping[Hashable, Hashable]],
) -> tuple[float, int]:
    """Mean of Cohen's kappa (Cohen, 1960) over rater pairs, as Light (1971) proposed for many raters.

    ``labels[item][rater]`` is the rater's label of the item. For every unordered pair of raters that
    share at least 2 items, Cohen's kappa is computed on exactly their shared items (see ``cohen_kappa``);
    the result is the plain mean of those kappas and the number of pairs averaged.

    Degenerate input: a pair whose kappa is undefined (both used one single category on their shared
    items, so chance agreement is 1) is left out of the mean and out of the count. When no pair is left,
    the result is ``(nan, 0)``.
    """
    by_rater: dict[Hashable, dict[Hashable, Hashable]] = {}
    for item, ratings in labels.items():
        for rater, value in _present(ratings).items():
            by_rater.setdefault(rater, {})[item] = value
    kappas: list[float] = []
    for r, s in itertools.combinations(by_rater, 2):
        first, second = by_rater[r], by_rater[s]
        shared = [item for item in first if item in second]
        if len(shared) < 2:
            continue
        kappa = cohen_kappa([first[i] for i in shared], [second[i] for i in shared])
        if not math.isnan(kappa):
            kappas.append(kappa)
    if not kappas:
        return math.nan, 0
    return math.fsum(kappas) / len(kappas), len(kappas)


def _as_count(value: object, row: int, column: int) -> int:
    try:
        count = operator.index(value)
    except TypeError:
        if isinstance(value, (float, np.floating)) and float(value).is_integer():
            count = int(value)
        else:
            raise ValueError(
                f"fleiss_kappa counts must be whole numbers, got {value!r} at row {row}, column {column}"
            ) from None
    if count < 0:
        raise ValueError(f"fleiss_kappa counts must be >= 0, got {count} at row {row}, column {column}")
    return count


def fleiss_kappa(counts: Sequence[Sequence[int]]) -> float:
    """Fleiss' kappa for a fixed number of raters per item (Fleiss, 1971).

    ``counts[i][j]`` is how many of the n raters put item i in category j; every row sums to the same n.
    With N items:

        p_j   = (1 / (N n)) sum_i n_ij                       (pooled share of category j)
        P_i   = (sum_j n_ij^2 - n) / (n (n - 1))             (agreeing rater pairs on item i)
        P_bar = (1/N) sum_i P_i,    P_e = sum_j p_j^2
        kappa = (P_bar - P_e) / (1 - P_e)

    With n == 2 this is Scott's (1955) pi. Degenerate input: when P_e == 1 (every rating falls in a single
    category) the coefficient is 0/0 and ``nan`` is returned. Raises ``ValueError`` when there are no
    items or no categories, rows differ in length, a count is negative or not a whole number, rows sum to
    different totals, or the raters per item are fewer than 2.
    """
    rows = [list(row) for row in counts]
    if not rows:
        raise ValueError("fleiss_kappa needs at least one item (row)")
    width = len(rows[0])
    if width == 0:
        raise ValueError("fleiss_kappa needs at least one category (column)")
    for i, row in enumerate(rows):
        if len(row) != width:
            raise ValueError(f"fleiss_kappa rows must all have {width} categories; row {i} has {len(row)}")
    table = [[_as_count(v, i, j) for j, v in enumerate(row)] for i, row in enumerate(rows)]
    n = sum(table[0])
    for i, row in enumerate(table):
        if sum(row) != n:
            raise ValueError(
                f"fleiss_kappa needs the same number of raters for every item: row 0 sums to {n}, "
                f"row {i} to {sum(row)}"
            )
    if n < 2:
        raise ValueError(f"fleiss_kappa needs at least 2 raters per item, got {n}")
    n_items = len(table)
    total = n_items * n
    column_sums = [sum(row[j] for row in table) for j in range(width)]
    sum_sq_columns = sum(c * c for c in column_sums)
    if sum_sq_columns == total * total:  # P_e == 1: a single category holds every rating
        return math.nan
    p_bar = math.fsum((sum(c * c for c in row) - n) / (n * (n - 1)) for row in table) / n_items
    p_e = sum_sq_columns / (total * total)
    return (p_bar - p_e) / (1 - p_e)


def fleiss_kappa_from_labels(labels: Mapping[Hashable, Mapping[Hashable, Hashable]]) -> tuple[float, int]:
    """Fleiss' kappa (Fleiss, 1971) from ``labels[item][rater] = label``; returns (kappa, items used).

    Fleiss' kappa needs the same number of raters per item, so only the items rated by the most common
    number of raters (counting only items with at least 2 ratings; a tie goes to the larger number of
    raters) are used; their label counts form the table passed to ``fleiss_kappa``. The raters need not be
    the same people on every item.

    Degenerate input: ``(nan, 0)`` when no item has 2 or more ratings; ``(nan, items)`` when every used
    rating is one single category (chance agreement 1).
    """
    present = [list(_present(ratings).values()) for ratings in labels.values()]
    present = [values for values in present if len(values) >= 2]
    if not present:
        return math.nan, 0
    sizes = Counter(len(values) for values in present)
    n = max(sizes, key=lambda size: (sizes[size], size))
    used = [Counter(values) for values in present if len(values) == n]
    categories = list(dict.fromkeys(label for counter in used for label in counter))
    table = [[counter[c] for c in categories] for counter in used]
    return fleiss_kappa(table), len(used)


def krippendorff_alpha(
    units: Mapping[Hashable, Mapping[Hashable, Hashable]],
    metric: str = "nominal",
) -> float:
    """Krippendorff's alpha in its coincidence-matrix form (Krippendorff, 2004; "Computing Krippendorff's
    Alpha-Reliability", 2011).

    ``units[u][rater]`` is the value a rater gave unit u; missing ratings (absent, ``None`` or NaN) are
    allowed, and units with fewer than 2 values are not pairable and are ignored. With m_u the number of
    values in unit u, the coincidence matrix counts every ordered pair of values from different raters,

        o_ck = sum_u (number of ordered (c, k) pairs in u) / (m_u - 1),   n_c = sum_k o_ck,  n = sum_c n_c,

    and

        alpha = 1 - D_o / D_e = 1 - (n - 1) * sum_{c,k} o_ck delta2(c, k) / sum_{c,k} n_c n_k delta2(c, k),

    with delta2(c, k) = [c != k] for ``metric="nominal"`` and (c - k)^2 for ``metric="interval"`` (values
    must then be finite real numbers).

    Degenerate input: ``nan`` when no unit is pairable, and ``nan`` when all pairable values are equal
    (expected disagreement D_e == 0, nothing to be reliable about). Raises ``ValueError`` for an unknown
    metric or a non-numeric value under the interval metric.
    """
    if metric not in ("nominal", "interval"):
        raise ValueError(f"krippendorff_alpha metric must be 'nominal' or 'interval', got {metric!r}")
    pairable = [list(_present(ratings).values()) for ratings in units.values()]
    pairable = [values for values in pairable if len(values) >= 2]
    if not pairable:
        return math.nan
    if metric == "interval":
        for values in pairable:
            for value in values:
                if not isinstance(value, numbers.Real) or not math.isfinite(value):
                    raise ValueError(
                        f"krippendorff_alpha with metric='interval' needs finite numbers, got {value!r}"
                    )
        pairable = [[float(value) for value in values] for values in pairable]
    categories = list(dict.fromkeys(value for values in pairable for value in values))
    index = {value: i for i, value in enumerate(categories)}
    coincidences = np.zeros((len(categories), len(categories)))
    for values in pairable:
        unit_counts = np.zeros(len(categories))
        for value in values:
            unit_counts[index[value]] += 1
        # Ordered pairs of values from different raters: n_uc n_uk off the diagonal, n_uc (n_uc - 1) on it.
        coincidences += (np.outer(unit_counts, unit_counts) - np.diag(unit_counts)) / (len(values) - 1)
    marginals = coincidences.sum(axis=1)
    n = marginals.sum()
    if metric == "nominal":
        delta2 = 1.0 - np.eye(len(categories))
    else:
        numeric = np.asarray(categories, dtype=float)
        delta2 = (numeric[:, None] - numeric[None, :]) ** 2
    expected = float(marginals @ delta2 @ marginals)
    if expected == 0.0:
        return math.nan
    observed = float((coincidences * delta2).sum())
    return 1.0 - (n - 1.0) * observed / expected


def position_bias(first_shown_chosen: int, decided: int) -> tuple[float, float, float]:
    """Share of decided pairwise labels that picked the response shown first, with a 95% Wilson interval.

    ``decided`` counts the pairwise labels that were not ties; ``first_shown_chosen`` how many of them
    chose the response displayed first. An unbiased annotator sits near 0.5. The interval is the Wilson
    (1927) score interval with z = Phi^-1(0.975) ~ 1.96, for p = k / n:

        centre = (p + z^2 / (2n)) / (1 + z^2 / n)
        half   = z / (1 + z^2 / n) * sqrt(p (1 - p) / n + z^2 / (4 n^2))

    Returns ``(p, centre - half, centre + half)``, clipped to [0, 1]. Degenerate input: with
    ``decided == 0`` there is no estimate and the result is ``(nan, 0.0, 1.0)``. Raises ``ValueError``
    unless 0 <= first_shown_chosen <= decided are whole numbers.
    """
    try:
        k, n = operator.index(first_shown_chosen), operator.index(decided)
    except TypeError:
        raise ValueError(
            f"position_bias needs whole-number counts, got {first_shown_chosen!r} and {decided!r}"
        ) from None
    if n < 0 or k < 0 or k > n:
        raise ValueError(f"position_bias needs 0 <= first_shown_chosen <= decided, got {k} and {n}")
    if n == 0:
        return math.nan, 0.0, 1.0
    p = k / n
    z2 = _Z975 * _Z975
    scale = 1.0 + z2 / n
    centre = (p + z2 / (2 * n)) / scale
    half = _Z975 / scale * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n))
    return p, max(0.0, centre - half), min(1.0, centre + half)
