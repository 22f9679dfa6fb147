import math

import numpy as np
import pytest

from rlhflab.eval import metrics as M


def test_mean_ci95_hand_worked():
    # mean 2.5, s = sqrt(5/3) = 1.29099, se = 0.645497, t(0.975, 3) = 3.18245 -> half width 2.05428
    mean, lo, hi = M.mean_ci95([1, 2, 3, 4])
    assert mean == 2.5
    assert lo == pytest.approx(2.5 - 2.05428, abs=1e-4) and hi == pytest.approx(2.5 + 2.05428, abs=1e-4)
    assert M.mean_ci95([7.0])[0] == 7.0 and math.isnan(M.mean_ci95([7.0])[1])
    assert all(math.isnan(x) for x in M.mean_ci95([]))
    assert M.mean_ci95([3.0, 3.0, 3.0]) == (3.0, 3.0, 3.0)


def test_t_quantiles():
    assert M.t_quantile_975(1) == pytest.approx(12.7062, abs=1e-4)
    assert M.t_quantile_975(10) == pytest.approx(2.2281, abs=1e-4)
    assert M.t_quantile_975(31) == pytest.approx(2.0395, abs=2e-4)
    assert M.t_quantile_975(60) == pytest.approx(2.0003, abs=2e-4)
    assert M.t_quantile_975(10_000) == pytest.approx(1.9602, abs=2e-4)
    with pytest.raises(ValueError):
        M.t_quantile_975(0)


def test_ci_covers_the_true_mean_95_percent_of_the_time():
    rng = np.random.default_rng(0)
    covered = 0
    for _ in range(2000):
        _, lo, hi = M.mean_ci95(rng.normal(1.0, 2.0, size=8))
        covered += lo <= 1.0 <= hi
    assert abs(covered / 2000 - 0.95) < 0.02


def test_win_rates_count_ties_as_half():
    assert M.win_rate([1, 2, 3], [1, 1, 4]) == pytest.approx(0.5)  # tie, win, loss
    assert M.win_rate([2, 2], [1, 1]) == 1.0
    per_prompt = M.win_rate_all_pairs(np.array([[1.0, 3.0], [0.0, 0.0]]), np.array([[2.0], [0.0]]))
    assert per_prompt.tolist() == [0.5, 0.5]
    with pytest.raises(ValueError):
        M.win_rate([1, 2], [1])


def test_paired_gain_removes_prompt_difficulty():
    # Prompt 0 is easy (scores near 10), prompt 1 hard (near 0): per-prompt means 2.0 - 1.0 and 0.5 - (-0.5).
    gain = M.paired_gain(np.array([[1.0, 3.0], [0.0, 1.0]]), np.array([[1.0], [-0.5]]))
    assert gain.tolist() == [1.0, 1.0]
    easy_hard = np.array([[10.0, 10.2], [0.0, 0.2]])
    gain = M.paired_gain(easy_hard + 1.0, easy_hard)
    mean, lo, hi = M.mean_ci95(gain)
    assert (mean, lo, hi) == pytest.approx((1.0, 1.0, 1.0))  # the same gain on every prompt: no spread
    # Unpaired, the two policies' intervals over prompt means overlap completely.
    _, plo, phi = M.mean_ci95((easy_hard + 1.0).mean(axis=1))
    _, rlo, rhi = M.mean_ci95(easy_hard.mean(axis=1))
    assert plo < rhi and rlo < phi
    with pytest.raises(ValueError):
        M.paired_gain(np.zeros((2, 1)), np.zeros((3, 1)))
    with pytest.raises(ValueError):
        M.paired_gain(np.zeros(2), np.zeros(2))


def test_distinct_n_and_entropy():
    seqs = [["a", "b", "a", "b"]]
    assert M.distinct_n(seqs, 1) == 0.5
    assert M.distinct_n(seqs, 2) == pytest.approx(2 / 3)  # ab, ba, ab
    assert M.distinct_n([["a"], []], 2) == 0.0
    assert M.unigram_entropy([["a", "a"], ["b", "b"]]) == pytest.approx(math.log(2))
    assert M.unigram_entropy([["x"] * 5]) == 0.0
    assert M.unigram_entropy([]) == 0.0


def test_rank_correlation():
    assert M.rankdata([3, 1, 3]).tolist() == [2.5, 1.0, 2.5]
    assert M.spearman([1, 2, 3, 4], [10, 20, 30, 45]) == pytest.approx(1.0)
    assert M.spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    # ranks x = [1, 2.5, 2.5, 4], y = [1, 2, 3, 4]: cov 4.5, var 4.5 and 5 -> 4.5 / sqrt(22.5)
    assert M.spearman([1, 2, 2, 3], [1, 2, 3, 4]) == pytest.approx(4.5 / math.sqrt(22.5))
    assert math.isnan(M.spearman([1, 1, 1], [1, 2, 3]))


def test_accuracy_by_bucket_table():
    chosen = [2.0, 1.0, 0.5, 0.0, 3.0]
    rejected = [1.0, 2.0, 0.5, -1.0, 1.0]
    buckets = ["better", "better", "slightly_better", "slightly_better", "other"]
    table = M.accuracy_by_bucket(
        chosen, rejected, buckets, order=["significantly_better", "better", "slightly_better"]
    )
    assert list(table) == ["significantly_better", "better", "slightly_better", "other", "overall"]
    assert math.isnan(table["significantly_better"]["accuracy"]) and table["significantly_better"]["n"] == 0
    assert table["better"] == {"accuracy": 0.5, "n": 2}
    assert table["slightly_better"] == {"accuracy": 0.75, "n": 2}  # a tie counts 1/2
    assert table["overall"] == {"accuracy": pytest.approx(3.5 / 5), "n": 5}


def test_bleu_by_hand():
    # "a b c d" against "a b c e": p1 = 3/4, p2 = 2/3 (ab, bc), p3 = 1/2 (abc), p4 = no match -> epsilon 0.1 / 1.
    # Same length: BP = 1. BLEU-4 = (0.75 * 2/3 * 0.5 * 0.1) ** (1/4) = 0.025 ** 0.25 = 0.397635.
    assert M.bleu("a b c d".split(), ["a b c e".split()]) == pytest.approx(0.025**0.25)
    # Clipping: "the" counts at most twice, as often as in the reference that has it most -> p1 = 2/4.
    assert M.bleu("the the the the".split(), ["the cat".split(), "the the".split()], max_n=1) == 0.5
    # Brevity: c = 2 against the closest reference length r = 4 -> BP = exp(1 - 4/2) = exp(-1).
    assert M.bleu("a b".split(), ["a b c d".split(), "a b c d e f g".split()], max_n=1) == pytest.approx(
        math.exp(-1)
    )
    # A hypothesis too short for bigrams: only p1 counts (NLTK would put epsilon for p2); r = 1 = c so BP = 1.
    assert M.bleu(["a"], [["a"]], max_n=2) == 1.0
    # "a b c" against "a b d": orders 1..3 only, (2/3 * 1/2 * 0.1 / 1) ** (1/3).
    assert M.bleu("a b c".split(), ["a b d".split()]) == pytest.approx((2 / 3 * 0.5 * 0.1) ** (1 / 3))
    assert M.bleu([], [["a"]]) == 0.0
    with pytest.raises(ValueError):
        M.bleu(["a"], [])


def test_self_bleu_by_hand():
    # Two samples: BLEU("a b c d" | "a b c e") = BLEU("a b c e" | "a b c d") = 0.025 ** 0.25 (the same counts).
    assert M.self_bleu(["a b c d".split(), "a b c e".split()]) == pytest.approx(0.025**0.25)
    # Three samples, BLEU-1: "x y" vs {"x y", "x z"} -> 1; "x y" (the other copy) -> 1; "x z" vs {"x y", "x y"} -> 1/2.
    assert M.self_bleu([["x", "y"], ["x", "y"], ["x", "z"]], max_n=1) == pytest.approx(2.5 / 3)
    assert M.self_bleu([["same", "text"]] * 3) == pytest.approx(1.0)  # identical samples: no diversity
    with pytest.raises(ValueError):
        M.self_bleu([["only", "one"]])
