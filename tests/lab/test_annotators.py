import math
from collections import Counter

import numpy as np
import pytest

from rlhflab.data.records import LLAMA2_RATINGS
from rlhflab.errors import ConfigError
from rlhflab.lab.annotators import (
    AnnotatorPool,
    AnnotatorSettings,
    bt_probability,
    predicted_agreement,
    rating_for_gap,
)
from rlhflab.lab.gold import gold_scores, step_labels
from rlhflab.lab.tasks import get_task
from rlhflab.losses.reward import LLAMA2_MARGINS

N_PAIRS = 8000


@pytest.fixture(scope="module")
def pairs():
    task = get_task("sentiment")
    prompts = task.train_prompts(N_PAIRS, seed=11)
    a, b = task.demonstrations(prompts, seed=12), task.demonstrations(prompts, seed=13)
    gap = gold_scores(task, prompts, a) - gold_scores(task, prompts, b)
    return prompts, a, b, gap


def _agreement(labels):
    decided = [lab for lab in labels if lab.gold_a != lab.gold_b and lab.a_preferred is not None]
    agree = np.array([lab.a_preferred == (lab.gold_a > lab.gold_b) for lab in decided], dtype=float)
    gaps = np.array([lab.gold_a - lab.gold_b for lab in decided])
    return agree.mean(), gaps, len(decided)


@pytest.mark.parametrize("temperature,noise", [(0.05, 0.0), (0.3, 0.0), (0.3, 0.2), (0.0, 0.1)])
def test_agreement_with_gold_matches_bradley_terry(pairs, temperature, noise):
    prompts, a, b, _ = pairs
    settings = AnnotatorSettings(temperature=temperature, noise=noise)
    observed, gaps, n = _agreement(AnnotatorPool("sentiment", settings, seed=1).compare(prompts, a, b))
    predicted = predicted_agreement(gaps, settings)
    p_agree = (1 - 2 * noise) * bt_probability(np.abs(gaps), temperature) + noise
    sampling_se = math.sqrt(float(np.sum(p_agree * (1 - p_agree))) / n**2)
    assert abs(observed - predicted) < 4 * sampling_se + 1e-9, (observed, predicted, sampling_se)


def test_bradley_terry_test_can_tell_temperatures_apart(pairs):
    # The previous test is only meaningful if a wrong temperature would fail it.
    _, _, _, gap = pairs
    gap = gap[gap != 0]
    low = predicted_agreement(gap, AnnotatorSettings(temperature=0.05))
    high = predicted_agreement(gap, AnnotatorSettings(temperature=0.3))
    # More than twice the 4-standard-error tolerance used above.
    assert low - high > 8 * math.sqrt(0.25 / len(gap))


def test_noise_one_half_is_chance(pairs):
    prompts, a, b, _ = pairs
    observed, _, n = _agreement(
        AnnotatorPool("sentiment", AnnotatorSettings(temperature=0.0, noise=0.5), seed=2).compare(
            prompts, a, b
        )
    )
    assert abs(observed - 0.5) < 4 * math.sqrt(0.25 / n)


def test_ratings_follow_thresholds_and_margins(pairs):
    prompts, a, b, _ = pairs
    thresholds = (0.05, 0.2, 0.5)
    for table_name in ("small", "large"):
        table = dict(zip(LLAMA2_RATINGS, LLAMA2_MARGINS[table_name]))
        settings = AnnotatorSettings(rating_thresholds=thresholds, margin_table=table_name)
        labels = AnnotatorPool("sentiment", settings, seed=3).compare(prompts[:2000], a[:2000], b[:2000])
        for lab in labels:
            gap = abs(lab.gold_a - lab.gold_b)  # no annotator bias: perceived gap = gold gap
            assert lab.rating == rating_for_gap(gap, thresholds)
            assert lab.margin == table[lab.rating]
        counts = Counter(lab.rating for lab in labels)
        assert all(counts[r] > 50 for r in LLAMA2_RATINGS)


def test_rating_boundaries():
    t = (0.1, 0.3, 0.6)
    assert rating_for_gap(0.0, t) == "negligibly_better"
    assert rating_for_gap(0.0999, t) == "negligibly_better"
    assert rating_for_gap(0.1, t) == "slightly_better"
    assert rating_for_gap(-0.3, t) == "better"
    assert rating_for_gap(0.6, t) == "significantly_better"
    assert rating_for_gap(5.0, t) == "significantly_better"


def test_bt_probability_values():
    assert bt_probability(0.0, 0.5) == pytest.approx(0.5)
    assert bt_probability(1.0, 1.0) == pytest.approx(1 / (1 + math.exp(-1)))
    assert bt_probability(-0.2, 0.1) == pytest.approx(1 / (1 + math.exp(2)))
    assert bt_probability(np.array([0.3, -0.3, 0.0]), 0.0).tolist() == [1.0, 0.0, 0.5]
    assert bt_probability(1e6, 0.01) == 1.0  # no overflow


def test_ties(pairs):
    prompts, a, b, _ = pairs
    labels = AnnotatorPool("sentiment", AnnotatorSettings(tie_margin=0.1), seed=4).compare(
        prompts[:2000], a[:2000], b[:2000]
    )
    for lab in labels:
        assert (lab.a_preferred is None) == (abs(lab.gold_a - lab.gold_b) < 0.1)
        if lab.a_preferred is None:
            assert lab.rating == "negligibly_better" and lab.margin == 0.0
    assert sum(lab.a_preferred is None for lab in labels) > 100


def test_annotators_have_their_own_biases_and_disagree(pairs):
    prompts, a, b, _ = pairs
    settings = AnnotatorSettings(temperature=0.0, n_annotators=4, bias_spread=1.0)
    pool = AnnotatorPool("sentiment", settings, seed=5)
    assert pool.biases.shape == (4,) and np.std(pool.biases) > 0.1
    labels = pool.compare(prompts[:2000], a[:2000], b[:2000])
    assert {lab.annotator for lab in labels} == {0, 1, 2, 3}
    # Deterministic annotators (T = 0) only deviate from gold through their length bias.
    observed, _, _ = _agreement(labels)
    assert 0.6 < observed < 0.97
    same = AnnotatorPool("sentiment", AnnotatorSettings(temperature=0.0), seed=5)
    assert _agreement(same.compare(prompts[:2000], a[:2000], b[:2000]))[0] == 1.0


def test_a_shared_length_bias_prefers_the_longer_answer_by_its_word_count():
    # perceived = gold + length_bias * n_words / 10: with T = 0, a 10-word answer of gold 0 beats a 2-word
    # answer of gold 0.5 exactly when length_bias * (10 - 2) / 10 > 0.5, i.e. length_bias > 0.625.
    short, long = "the plot was lovely .", "the film was okay . the plot was okay ."
    prompt = "review the film ."
    gold_short, gold_long = gold_scores(get_task("sentiment"), [prompt, prompt], [short, long])
    assert gold_short > gold_long
    words = (len(long.split()) - len(short.split())) / 10
    threshold = (gold_short - gold_long) / words
    for bias, long_wins in ((threshold * 0.9, False), (threshold * 1.1, True)):
        pool = AnnotatorPool("sentiment", AnnotatorSettings(temperature=0.0, length_bias=bias), seed=0)
        assert np.allclose(pool.biases, bias)
        (lab,) = pool.compare([prompt], [long], [short])
        assert lab.a_preferred is long_wins
        assert lab.gap == pytest.approx((gold_long - gold_short) + bias * words)
    with pytest.raises(ConfigError, match="length_bias"):
        AnnotatorSettings(length_bias=float("nan"))


def test_plackett_luce_rankings_match_their_probabilities():
    task = get_task("sentiment")
    prompt = "review the film ."
    responses = [
        "the acting was superb and the plot was lovely !",
        "the plot was okay .",
        "the ending was dull .",
    ]
    gold = gold_scores(task, [prompt] * 3, responses)
    temperature = 0.5
    pool = AnnotatorPool(task, AnnotatorSettings(temperature=temperature), seed=6)
    n = 4000
    counts = Counter(tuple(pool.rank(prompt, responses)[0]) for _ in range(n))
    w = np.exp(gold / temperature)
    for order, c in counts.items():
        i, j, k = order
        p = w[i] / w.sum() * w[j] / (w[j] + w[k])
        assert abs(c / n - p) < 4 * math.sqrt(p * (1 - p) / n) + 2 / n, (order, c / n, p)
    # K = 2 is Bradley-Terry.
    first = sum(pool.rank(prompt, responses[1:])[0][0] == 0 for _ in range(n)) / n
    assert abs(first - bt_probability(gold[1] - gold[2], temperature)) < 0.03
    # Temperature 0: always the gold order; ties only when asked for.
    exact = AnnotatorPool(task, AnnotatorSettings(temperature=0.0), seed=7)
    assert exact.rank(prompt, responses) == ([0, 1, 2], [0, 1, 2])


def test_ranking_ties_within_margin():
    task = get_task("sentiment")
    prompt = "review the film ."
    responses = ["the plot was good .", "the ending was good .", "the acting was awful ."]
    pool = AnnotatorPool(task, AnnotatorSettings(temperature=0.0, tie_margin=0.05, keep_ties=True), seed=8)
    order, ranks = pool.rank(prompt, responses)
    assert order[2] == 2 and ranks == [0, 0, 1]


def test_unpaired_labels(pairs):
    prompts, a, _, _ = pairs
    task = get_task("sentiment")
    gold = gold_scores(task, prompts[:3000], a[:3000])
    labels = AnnotatorPool(task, AnnotatorSettings(temperature=0.0, good_threshold=0.3), seed=9).label(
        prompts[:3000], a[:3000]
    )
    assert labels == [bool(g > 0.3) for g in gold]
    median_split = AnnotatorPool(task, AnnotatorSettings(temperature=0.0), seed=9).label(
        prompts[:3000], a[:3000]
    )
    assert 0.35 < np.mean(median_split) < 0.65
    coin = AnnotatorPool(task, AnnotatorSettings(temperature=0.0, noise=0.5, good_threshold=0.3), seed=9)
    agree = np.mean([lab == (g > 0.3) for lab, g in zip(coin.label(prompts[:3000], a[:3000]), gold)])
    assert abs(agree - 0.5) < 4 * math.sqrt(0.25 / 3000)


def test_step_labels_for_process_supervision():
    task = get_task("arith")
    prompts = task.train_prompts(300, seed=0)
    demos = task.demonstrations(prompts, seed=0)
    clean = AnnotatorPool(task, AnnotatorSettings(), seed=0)
    assert all(clean.label_steps(p, d) == step_labels(task, p, d) for p, d in zip(prompts, demos))
    noisy = AnnotatorPool(task, AnnotatorSettings(noise=0.25), seed=0)
    flips = [
        x != y
        for p, d in zip(prompts, demos)
        for x, y in zip(noisy.label_steps(p, d), step_labels(task, p, d))
    ]
    assert abs(np.mean(flips) - 0.25) < 0.05
    assert AnnotatorPool("sentiment").label_steps("review the film .", "it was good .") is None


@pytest.mark.parametrize(
    "kwargs",
    [
        {"noise": 0.6},
        {"temperature": -1.0},
        {"n_annotators": 0},
        {"rating_thresholds": (0.5, 0.2, 0.9)},
        {"margin_table": "huge"},
        {"bias_spread": -1.0},
    ],
)
def test_invalid_settings(kwargs):
    with pytest.raises(ConfigError):
        AnnotatorSettings(**kwargs)
