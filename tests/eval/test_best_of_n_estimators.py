"""Best-of-n estimators, by hand: the subset weights, the expected value over subsets, the log-ratio to the
policy with repeated responses (Beirami et al. 2024) and without (Stiennon et al. 2020's formula)."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from rlhflab.eval.best_of_n import (
    best_of_n_expectation,
    best_of_n_kl_formula,
    best_of_n_log_ratio,
    best_of_n_weights,
    pool_cdf,
)


def test_subset_weights_by_hand():
    # M = 3, n = 2: C(3, 2) = 3 subsets; rank 0 is never the best, rank 1 in one subset, rank 2 in two.
    assert best_of_n_weights(3, 2) == pytest.approx([0.0, 1 / 3, 2 / 3])
    assert best_of_n_weights(3, 1) == pytest.approx([1 / 3] * 3)  # n = 1: a uniform draw
    assert best_of_n_weights(3, 3) == pytest.approx([0.0, 0.0, 1.0])  # n = M: the top of the pool
    w = best_of_n_weights(2048, 512)
    assert w.sum() == pytest.approx(1.0) and np.all(np.isfinite(w))
    with pytest.raises(ValueError, match="n <= M"):
        best_of_n_weights(3, 4)


def test_expectation_equals_enumerating_every_subset():
    # scores 0.1, 0.9, 0.5 with values 1, 2, 3; pairs {0,1} -> item 1 (2), {0,2} -> item 2 (3), {1,2} -> item 1
    # (2): mean 7/3.
    scores, values = np.array([[0.1, 0.9, 0.5]]), np.array([[1.0, 2.0, 3.0]])
    assert best_of_n_expectation(scores, values, 2) == pytest.approx([7 / 3])
    rng = np.random.default_rng(0)
    scores, values = rng.normal(size=(2, 7)), rng.normal(size=(2, 7))
    for n in (1, 3, 7):
        by_hand = [
            np.mean([v[max(c, key=lambda j: s[j])] for c in itertools.combinations(range(7), n)])
            for s, v in zip(scores, values)
        ]
        assert best_of_n_expectation(scores, values, n) == pytest.approx(by_hand)


def test_pool_cdf_counts_ties_and_itself():
    # sorted 1, 2, 2, 3: the 3 beats or ties k = 4 items, the 1 only itself (k = 1), each 2 three (k = 3); F is
    # exp(-(1/k + ... + 1/4)): exp(-1/4), exp(-(1 + 1/2 + 1/3 + 1/4)), exp(-(1/3 + 1/4)).
    expected = np.exp([-0.25, -2.0833333, -0.5833333, -0.5833333])
    assert pool_cdf(np.array([[3.0, 1.0, 2.0, 2.0]]))[0] == pytest.approx(expected)


def test_log_ratio_by_hand():
    # A rare response (p -> 0): log n + (n - 1) log F = log 4 + 3 log 0.5 = -log 2.
    assert best_of_n_log_ratio(np.array([0.5]), np.array([-50.0]), 4) == pytest.approx([-math.log(2)])
    # F = 0.5, p = 0.25, n = 2: pi_bon = 0.5^2 - 0.25^2 = 0.1875, ratio 0.75 (the formula's limit says 1).
    assert best_of_n_log_ratio(np.array([0.5]), np.log([0.25]), 2) == pytest.approx([math.log(0.75)])
    # A policy that always writes the same response: best-of-n is the policy.
    assert best_of_n_log_ratio(np.array([1.0]), np.array([0.0]), 16) == pytest.approx([0.0])
    with pytest.raises(ValueError, match="cdf"):
        best_of_n_log_ratio(np.array([0.0]), np.array([-1.0]), 2)


def test_kl_of_a_three_response_policy_is_below_the_formula():
    # pi = (0.5, 0.3, 0.2) in ascending reward: F = (0.5, 0.8, 1.0); best of 2: (0.25, 0.39, 0.36).
    # KL = 0.25 log 0.5 + 0.39 log 1.3 + 0.36 log 1.8 = -0.1732868 + 0.1023221 + 0.2116032 = 0.1406385,
    # below log 2 - 1/2 = 0.193147 (Beirami et al. 2024).
    p, f = np.array([0.5, 0.3, 0.2]), np.array([0.5, 0.8, 1.0])
    lr = best_of_n_log_ratio(f, np.log(p), 2)
    bon = p * np.exp(lr)
    assert bon == pytest.approx([0.25, 0.39, 0.36])
    assert float((bon * lr).sum()) == pytest.approx(0.1406385, abs=1e-6)
    assert best_of_n_kl_formula(2) == pytest.approx(0.193147, abs=1e-6)


def test_many_rare_responses_give_the_formula():
    # 20000 equally likely responses with distinct rewards: the KL of best-of-8 is log 8 - 7/8 to 1e-3.
    m = 20_000
    f = np.arange(1, m + 1) / m
    lr = best_of_n_log_ratio(f, np.full(m, -math.log(m)), 8)
    kl = float((np.exp(lr) * lr).sum() / m)
    assert kl == pytest.approx(best_of_n_kl_formula(8), abs=1e-3)
