"""Inter-annotator agreement: hand-worked examples, published examples, invariants and bad input."""

from __future__ import annotations

import itertools
import math
import random
import subprocess
import sys

import pytest

from rlhflab.label.agreement import (
    cohen_kappa,
    fleiss_kappa,
    fleiss_kappa_from_labels,
    krippendorff_alpha,
    mean_pairwise_cohen_kappa,
    position_bias,
)

# Krippendorff (2011), "Computing Krippendorff's Alpha-Reliability", the reliability-data example:
# 4 observers, 12 units, "." = missing. Published: nominal alpha = 0.743, interval alpha = 0.849
# (cross-checked against the `krippendorff` 0.9.0 package: 0.743421..., 0.849107...).
_KRIPPENDORFF_ROWS = {
    "A": "1 2 3 3 2 1 4 1 2 . . .",
    "B": "1 2 3 3 2 2 4 1 2 5 . 3",
    "C": ". 3 3 3 2 3 4 2 2 5 1 .",
    "D": "1 2 3 3 2 4 4 1 2 5 1 .",
}

# Wikipedia, "Fleiss' kappa", worked example: 10 subjects, 14 raters, 5 categories.
_FLEISS_WIKIPEDIA = [
    [0, 0, 0, 0, 14],
    [0, 2, 6, 4, 2],
    [0, 0, 3, 5, 6],
    [0, 3, 9, 2, 0],
    [2, 2, 8, 1, 1],
    [7, 7, 0, 0, 0],
    [3, 2, 6, 3, 0],
    [2, 5, 3, 2, 2],
    [6, 5, 2, 1, 0],
    [0, 2, 2, 3, 7],
]


def _krippendorff_units(transform=lambda v: v):
    units: dict[int, dict[str, object]] = {}
    for rater, row in _KRIPPENDORFF_ROWS.items():
        for unit, value in enumerate(row.split()):
            ratings = units.setdefault(unit, {})
            if value != ".":
                ratings[rater] = transform(int(value))
    return units


def _scott_pi(a, b):
    """Scott (1955): like Cohen's kappa, but chance agreement from the pooled label distribution."""
    n = len(a)
    p_o = sum(x == y for x, y in zip(a, b)) / n
    pooled = list(a) + list(b)
    p_e = sum((pooled.count(c) / (2 * n)) ** 2 for c in set(pooled))
    return (p_o - p_e) / (1 - p_e)


def _alpha_by_pairs(units, delta2):
    """Krippendorff's alpha from its value-pair definition, without a coincidence matrix:
    D_o = (1/n) sum_u 1/(m_u-1) sum_{i!=j in u} delta2,  D_e = 1/(n(n-1)) sum_{i!=j over all pairable values}."""
    pairable = [[v for v in r.values() if v is not None] for r in units.values()]
    pairable = [vs for vs in pairable if len(vs) >= 2]
    flat = [v for vs in pairable for v in vs]
    n = len(flat)
    d_o = sum(sum(delta2(x, y) for x, y in itertools.permutations(vs, 2)) / (len(vs) - 1) for vs in pairable)
    d_o /= n
    d_e = sum(delta2(x, y) for x, y in itertools.permutations(flat, 2)) / (n * (n - 1))
    return 1 - d_o / d_e


def _nominal(x, y):
    return float(x != y)


def _interval(x, y):
    return float(x - y) ** 2


# ----------------------------------------------------------------------------------------------- Cohen


def test_cohen_kappa_hand_worked_2x2():
    # 50 items; A yes & B yes: 20, A yes & B no: 5, A no & B yes: 10, A no & B no: 15.
    # p_o = (20 + 15) / 50 = 0.70
    # A says yes 25/50 = 0.5, B says yes 30/50 = 0.6
    # p_e = 0.5 * 0.6 + 0.5 * 0.4 = 0.30 + 0.20 = 0.50
    # kappa = (0.70 - 0.50) / (1 - 0.50) = 0.40
    a = ["yes"] * 20 + ["yes"] * 5 + ["no"] * 10 + ["no"] * 15
    b = ["yes"] * 20 + ["no"] * 5 + ["yes"] * 10 + ["no"] * 15
    assert cohen_kappa(a, b) == pytest.approx(0.4)
    assert cohen_kappa(b, a) == pytest.approx(0.4)  # symmetric in the raters


def test_cohen_kappa_perfect_disagreement_and_perfect_agreement():
    # p_o = 0, p_e = 0.5 * 0.5 + 0.5 * 0.5 = 0.5 -> kappa = (0 - 0.5) / 0.5 = -1
    assert cohen_kappa([1, 0], [0, 1]) == pytest.approx(-1.0)
    assert cohen_kappa(["a", "b", "c", "a"], ["a", "b", "c", "a"]) == pytest.approx(1.0)


def test_cohen_kappa_three_categories_hand_worked():
    # a = x x y z, b = x y x z: agreements on items 1 and 4 -> p_o = 2/4
    # both raters: x 2/4, y 1/4, z 1/4 -> p_e = 4/16 + 1/16 + 1/16 = 6/16
    # kappa = (8/16 - 6/16) / (10/16) = 0.2
    assert cohen_kappa("xxyz", "xyxz") == pytest.approx(0.2)


def test_cohen_kappa_single_category_is_undefined():
    # p_e = 1 * 1 = 1 -> 0/0: perfect agreement on one category carries no information.
    assert math.isnan(cohen_kappa(["a", "a", "a"], ["a", "a", "a"]))


def test_cohen_kappa_invariant_under_relabelling():
    a = [1, 2, 3, 1, 2, 2, 3, 1]
    b = [1, 2, 2, 1, 3, 2, 3, 2]
    relabel = {1: "cat", 2: "dog", 3: "eel"}
    assert cohen_kappa([relabel[x] for x in a], [relabel[x] for x in b]) == pytest.approx(cohen_kappa(a, b))


def test_cohen_kappa_bad_input():
    with pytest.raises(ValueError, match="equally long"):
        cohen_kappa([1, 2], [1])
    with pytest.raises(ValueError, match="at least one"):
        cohen_kappa([], [])


def test_mean_pairwise_cohen_kappa_hand_worked():
    # items 1-4:   R1: a a b b   R2: a a b a   R3: a b b b
    # R1-R2: p_o = 3/4, p_e = (2*3 + 2*1)/16 = 8/16 -> kappa = (12 - 8) / (16 - 8) = 0.5
    # R1-R3: p_o = 3/4, p_e = (2*1 + 2*3)/16 = 8/16 -> kappa = 0.5
    # R2-R3: p_o = 2/4, p_e = (3*1 + 1*3)/16 = 6/16 -> kappa = (8 - 6) / (16 - 6) = 0.2
    # R4 shares only item 1 with anyone (< 2 items): no pair. R5 and R6 agree on "a" for items 5-6: kappa
    # is undefined (p_e = 1), so that pair is left out. Mean = (0.5 + 0.5 + 0.2) / 3 = 0.4 over 3 pairs.
    labels = {
        1: {"R1": "a", "R2": "a", "R3": "a", "R4": "b"},
        2: {"R1": "a", "R2": "a", "R3": "b"},
        3: {"R1": "b", "R2": "b", "R3": "b"},
        4: {"R1": "b", "R2": "a", "R3": "b", "R4": None},  # None = missing
        5: {"R5": "a", "R6": "a"},
        6: {"R5": "a", "R6": "a"},
    }
    kappa, pairs = mean_pairwise_cohen_kappa(labels)
    assert pairs == 3
    assert kappa == pytest.approx(0.4)


def test_mean_pairwise_cohen_kappa_degenerate():
    assert _is_nan_zero(mean_pairwise_cohen_kappa({}))
    assert _is_nan_zero(mean_pairwise_cohen_kappa({1: {"a": 1, "b": 2}, 2: {"a": 1, "c": 2}}))


def _is_nan_zero(result):
    value, count = result
    return math.isnan(value) and count == 0


# ---------------------------------------------------------------------------------------------- Fleiss


def test_fleiss_kappa_wikipedia_example():
    # Recompute the article's intermediate numbers here, then compare the function's kappa.
    n, total = 14, 14 * len(_FLEISS_WIKIPEDIA)
    p_j = [sum(row[j] for row in _FLEISS_WIKIPEDIA) / total for j in range(5)]
    # column sums 20, 28, 39, 21, 32 of 140 ratings
    assert [round(p, 3) for p in p_j] == [0.143, 0.200, 0.279, 0.150, 0.229]
    p_bar = sum((sum(c * c for c in row) - n) / (n * (n - 1)) for row in _FLEISS_WIKIPEDIA) / 10
    p_e = sum(p * p for p in p_j)
    assert round(p_bar, 3) == 0.378
    assert round(p_e, 3) == 0.213
    kappa = fleiss_kappa(_FLEISS_WIKIPEDIA)
    assert kappa == pytest.approx((p_bar - p_e) / (1 - p_e))
    assert round(kappa, 3) == 0.210


def test_fleiss_kappa_hand_worked_three_raters():
    # rows [3,0], [2,1], [0,3], n = 3 raters, N = 3 items
    # P_1 = (9 - 3)/6 = 1, P_2 = (4 + 1 - 3)/6 = 1/3, P_3 = 1 -> P_bar = 7/9
    # column sums 5, 4 of 9 -> P_e = 25/81 + 16/81 = 41/81
    # kappa = (63/81 - 41/81) / (40/81) = 22/40 = 0.55
    assert fleiss_kappa([[3, 0], [2, 1], [0, 3]]) == pytest.approx(0.55)


def test_fleiss_kappa_extremes():
    # P_i = 1 everywhere, P_e = 0.5 -> 1; P_i = 0 everywhere, P_e = 0.5 -> -1
    assert fleiss_kappa([[2, 0], [0, 2]]) == pytest.approx(1.0)
    assert fleiss_kappa([[1, 1], [1, 1]]) == pytest.approx(-1.0)
    # every rating in one category: P_e = 1 -> undefined
    assert math.isnan(fleiss_kappa([[3, 0], [3, 0]]))


def test_fleiss_kappa_accepts_numpy_and_integral_floats():
    np = pytest.importorskip("numpy")
    expected = fleiss_kappa(_FLEISS_WIKIPEDIA)
    assert fleiss_kappa(np.array(_FLEISS_WIKIPEDIA)) == pytest.approx(expected)
    assert fleiss_kappa([[float(c) for c in row] for row in _FLEISS_WIKIPEDIA]) == pytest.approx(expected)


@pytest.mark.parametrize(
    ("counts", "message"),
    [
        ([], "at least one item"),
        ([[]], "at least one category"),
        ([[1, 1], [2]], "rows must all have 2 categories"),
        ([[1, 1], [2, 1]], "same number of raters"),
        ([[1, 0], [0, 1]], "at least 2 raters"),
        ([[3, -1], [1, 1]], ">= 0"),
        ([[1.5, 0.5], [1, 1]], "whole numbers"),
    ],
)
def test_fleiss_kappa_bad_input(counts, message):
    with pytest.raises(ValueError, match=message):
        fleiss_kappa(counts)


def test_fleiss_kappa_from_labels_uses_modal_rater_count():
    # Items 1-3 have 3 raters (the most common count), item 4 has 2, item 5 has 1: only 1-3 are used,
    # giving the hand-worked table [[3,0],[2,1],[0,3]] of test_fleiss_kappa_hand_worked_three_raters.
    labels = {
        1: {"u": "good", "v": "good", "w": "good"},
        2: {"u": "good", "x": "bad", "y": "good"},
        3: {"v": "bad", "w": "bad", "z": "bad", "q": None},
        4: {"u": "bad", "v": "good"},
        5: {"u": "bad"},
    }
    kappa, used = fleiss_kappa_from_labels(labels)
    assert used == 3
    assert kappa == pytest.approx(0.55)


def test_fleiss_kappa_from_labels_degenerate():
    assert _is_nan_zero(fleiss_kappa_from_labels({}))
    assert _is_nan_zero(fleiss_kappa_from_labels({1: {"a": "x"}, 2: {"b": "y"}}))
    kappa, used = fleiss_kappa_from_labels({1: {"a": "x", "b": "x"}, 2: {"a": "x", "b": "x"}})
    assert math.isnan(kappa) and used == 2


def test_fleiss_with_two_raters_is_scott_pi_and_equals_cohen_when_marginals_match():
    # Same data as test_cohen_kappa_three_categories_hand_worked: identical marginals, so Cohen's p_e
    # (per-rater distributions) equals Scott's/Fleiss' p_e (pooled distribution): all three give 0.2.
    a, b = "xxyz", "xyxz"
    labels = {i: {"A": x, "B": y} for i, (x, y) in enumerate(zip(a, b))}
    kappa, used = fleiss_kappa_from_labels(labels)
    assert used == 4
    assert kappa == pytest.approx(0.2)
    assert kappa == pytest.approx(_scott_pi(a, b))
    assert kappa == pytest.approx(cohen_kappa(a, b))
    # With different marginals Cohen and Fleiss differ, but Fleiss is still Scott's pi.
    a, b = "aabbab", "abbbbb"
    labels = {i: {"A": x, "B": y} for i, (x, y) in enumerate(zip(a, b))}
    assert fleiss_kappa_from_labels(labels)[0] == pytest.approx(_scott_pi(a, b))
    assert fleiss_kappa_from_labels(labels)[0] != pytest.approx(cohen_kappa(a, b))


# ---------------------------------------------------------------------------------------- Krippendorff


def test_krippendorff_alpha_published_example():
    units = _krippendorff_units()
    assert round(krippendorff_alpha(units), 3) == 0.743
    assert krippendorff_alpha(units, metric="nominal") == pytest.approx(0.743421052631579)
    assert round(krippendorff_alpha(units, metric="interval"), 3) == 0.849
    assert krippendorff_alpha(units, metric="interval") == pytest.approx(0.8491071428571428)


def test_krippendorff_alpha_hand_worked_nominal():
    # units (a,a), (a,b), (b,b): o_aa = 2, o_ab = o_ba = 1, o_bb = 2; n_a = n_b = 3, n = 6
    # alpha = 1 - (n-1) * sum o_ck d_ck / sum n_c n_k d_ck = 1 - 5 * 2 / (3*3 + 3*3) = 1 - 10/18 = 4/9
    units = {1: {"r": "a", "s": "a"}, 2: {"r": "a", "s": "b"}, 3: {"r": "b", "s": "b"}}
    assert krippendorff_alpha(units) == pytest.approx(4 / 9)


def test_krippendorff_alpha_hand_worked_interval():
    # units (1,2), (3,3): o_12 = o_21 = 1, o_33 = 2; n_1 = n_2 = 1, n_3 = 2, n = 4
    # sum o d2 = 2 * 1^2 = 2
    # sum n_c n_k d2 = 2*(1*1*1) + 2*(1*2*4) + 2*(1*2*1) = 2 + 16 + 4 = 22
    # alpha = 1 - 3 * 2 / 22 = 8/11
    units = {1: {"r": 1, "s": 2}, 2: {"r": 3, "s": 3}}
    assert krippendorff_alpha(units, metric="interval") == pytest.approx(8 / 11)


def test_krippendorff_alpha_two_raters_no_missing_is_adjusted_scott_pi():
    # With 2 raters, N units, no missing values: D_o = 1 - p_o, and D_e = (1 - p_e^Scott) * n/(n-1) with
    # n = 2N values, so alpha = 1 - (1 - pi)(2N - 1)/(2N) = pi + (1 - pi)/(2N).
    a, b = "aabbab", "abbbbb"
    units = {i: {"A": x, "B": y} for i, (x, y) in enumerate(zip(a, b))}
    pi, n_units = _scott_pi(a, b), len(a)
    assert krippendorff_alpha(units) == pytest.approx(pi + (1 - pi) / (2 * n_units))
    # and the 3-unit hand-worked case: pi = (2/3 - 1/2)/(1/2) = 1/3, 1/3 + (2/3)/6 = 4/9
    assert _scott_pi("aab", "abb") == pytest.approx(1 / 3)


def test_krippendorff_alpha_matches_value_pair_definition_on_random_data():
    rng = random.Random(1234)
    for _ in range(40):
        n_units, raters = rng.randint(3, 9), ["A", "B", "C", "D"][: rng.randint(2, 4)]
        units = {
            u: {r: (rng.randint(1, 4) if rng.random() > 0.25 else None) for r in raters}
            for u in range(n_units)
        }
        for metric, delta2 in (("nominal", _nominal), ("interval", _interval)):
            try:
                expected = _alpha_by_pairs(units, delta2)
            except ZeroDivisionError:  # no pairable values or no variation: alpha is undefined
                assert math.isnan(krippendorff_alpha(units, metric=metric))
                continue
            assert krippendorff_alpha(units, metric=metric) == pytest.approx(expected)


def test_krippendorff_alpha_invariants():
    base_nominal = krippendorff_alpha(_krippendorff_units())
    base_interval = krippendorff_alpha(_krippendorff_units(), metric="interval")
    # nominal: any relabelling of the categories
    names = {1: "one", 2: "two", 3: "three", 4: "four", 5: "five"}
    assert krippendorff_alpha(_krippendorff_units(names.__getitem__)) == pytest.approx(base_nominal)
    # interval: any affine change of scale a*v + b with a != 0
    shifted = _krippendorff_units(lambda v: -3.0 * v + 7.0)
    assert krippendorff_alpha(shifted, metric="interval") == pytest.approx(base_interval)
    # perfect agreement (with missing values) -> 1
    perfect = {1: {"A": 1, "B": 1}, 2: {"A": 2, "B": 2, "C": 2}, 3: {"B": 3, "C": 3, "D": None}}
    assert krippendorff_alpha(perfect) == pytest.approx(1.0)
    assert krippendorff_alpha(perfect, metric="interval") == pytest.approx(1.0)
    # units with a single value do not change anything
    padded = dict(_krippendorff_units())
    padded["lonely"] = {"A": 5}
    assert krippendorff_alpha(padded) == pytest.approx(base_nominal)


def test_krippendorff_alpha_degenerate_and_bad_input():
    assert math.isnan(krippendorff_alpha({}))
    assert math.isnan(krippendorff_alpha({1: {"A": 1}, 2: {"B": 2}}))  # nothing pairable
    assert math.isnan(krippendorff_alpha({1: {"A": 1, "B": 1}, 2: {"A": 1, "B": 1}}))  # no variation
    assert math.isnan(krippendorff_alpha({1: {"A": float("nan"), "B": 1}}))  # NaN counts as missing
    with pytest.raises(ValueError, match="'nominal' or 'interval'"):
        krippendorff_alpha(_krippendorff_units(), metric="ordinal")
    with pytest.raises(ValueError, match="finite numbers"):
        krippendorff_alpha({1: {"A": "x", "B": "y"}}, metric="interval")


# ------------------------------------------------------------------------------------------ position bias


def test_position_bias_wilson_hand_worked():
    # k = 7, n = 10, z = 1.959964, z^2 = 3.841459, z^2/n = 0.3841459
    # centre = (0.7 + 0.1920729) / 1.3841459 = 0.644493
    # half   = 1.959964 / 1.3841459 * sqrt(0.021 + 0.0096036) = 1.416009 * 0.1749389 = 0.247715
    # -> (0.3968, 0.8922)
    p, low, high = position_bias(7, 10)
    assert p == pytest.approx(0.7)
    assert low == pytest.approx(0.396778, abs=1e-5)
    assert high == pytest.approx(0.892209, abs=1e-5)
    # k = 50, n = 100: centre = 0.5, half = 1.959964 * sqrt(0.0025 + 0.00009604) / 1.03841459 = 0.096168
    p, low, high = position_bias(50, 100)
    assert (p, low, high) == pytest.approx((0.5, 0.403832, 0.596168), abs=1e-5)
    assert 0.5 - low == pytest.approx(high - 0.5)  # symmetric at p = 1/2


def test_position_bias_edges():
    # k = 0: low = 0 exactly and high = (z^2/n) / (1 + z^2/n) = 0.3841459 / 1.3841459 = 0.277533
    p, low, high = position_bias(0, 10)
    assert p == 0.0 and low == pytest.approx(0.0, abs=1e-12)
    assert high == pytest.approx(0.3841459 / 1.3841459, abs=1e-6)
    p, low, high = position_bias(10, 10)  # mirror image
    assert p == 1.0 and high == pytest.approx(1.0, abs=1e-12)
    assert low == pytest.approx(1 - 0.3841459 / 1.3841459, abs=1e-6)
    p, low, high = position_bias(0, 0)
    assert math.isnan(p) and (low, high) == (0.0, 1.0)


@pytest.mark.parametrize(("k", "n"), [(-1, 5), (6, 5), (1, -1), (1.5, 3)])
def test_position_bias_bad_input(k, n):
    with pytest.raises(ValueError):
        position_bias(k, n)


def test_module_imports_neither_torch_nor_sqlalchemy():
    code = (
        "import sys, rlhflab.label.agreement; "
        "bad = [m for m in ('torch', 'sqlalchemy') if m in sys.modules]; "
        "sys.exit(f'imported {bad}' if bad else 0)"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
