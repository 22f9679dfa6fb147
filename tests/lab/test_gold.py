import time

import numpy as np
import pytest

from rlhflab.eval.metrics import mean_ci95
from rlhflab.lab.gold import (
    arith_components,
    arith_step_labels,
    best_achievable,
    gold_scores,
    sentiment_components,
    step_labels,
    vader_compound,
)
from rlhflab.lab.tasks import get_task


def test_sentiment_gold_hand_worked():
    c = sentiment_components("review the film .", "the film was great great great .")
    # Word classes: <s> DET N WAS ADJ ADJ ADJ END </s> -> 8 transitions, ADJ->ADJ twice invalid.
    assert c["fluency"] == pytest.approx(6 / 8)
    # Content words film, great, great, great: two repeat an earlier one.
    assert c["repetition"] == pytest.approx(2 / 4)
    assert c["on_topic"] == 1.0 and c["extra_clauses"] == 0.0
    assert c["gold"] == pytest.approx(vader_compound("the film was great great great .") - 0.25 - 0.5)


def test_sentiment_gold_terms():
    p = "how was the hotel ?"
    good = sentiment_components(p, "the staff was wonderful and the pool was superb !")
    assert good["fluency"] == 1.0 and good["repetition"] == 0.0 and good["on_topic"] == 1.0
    assert good["gold"] == pytest.approx(good["sentiment"])
    assert sentiment_components(p, "the plot was wonderful .")["on_topic"] == 0.0
    assert sentiment_components(p, "the plot was wonderful and the room was nice .")["on_topic"] == 0.5
    assert sentiment_components(p, "it was wonderful .")["on_topic"] == 0.0  # names nothing
    assert sentiment_components(p, "")["gold"] == pytest.approx(-1.5)
    three = sentiment_components(p, "the room was nice and the pool was fun and the staff was good .")
    assert three["extra_clauses"] == 1.0


def test_sentiment_gold_is_hackable_only_through_terms_pairs_never_show():
    # VADER alone prefers the degenerate text; gold does not.
    p = "review the film ."
    fluent, hacked = (
        "the acting was wonderful and the plot was superb !",
        "great great great great great great",
    )
    assert vader_compound(hacked) > vader_compound(fluent)
    assert gold_scores("sentiment", [p, p], [fluent, hacked]).tolist()[0] > 0.8
    assert gold_scores("sentiment", [p], [hacked])[0] < -1.0


def test_arith_gold_hand_worked():
    p = "add 3 + 5 + 2 ."
    assert arith_components(p, "3 + 5 = 8 , 8 + 2 = 10 , answer 10 .")["gold"] == 1.0
    # The decoded form of the word-level tokenizer splits digits; gold reads it the same.
    assert arith_components(p, "3 + 5 = 8 , 8 + 2 = 1 0 , answer 1 0 .")["gold"] == 1.0
    # A slip in step 1 carried forward correctly: step 2 is right, the outcome is wrong.
    assert arith_step_labels(p, "3 + 5 = 9 , 9 + 2 = 11 , answer 11 .") == [False, True]
    assert arith_components(p, "3 + 5 = 9 , 9 + 2 = 11 , answer 11 .")["gold"] == pytest.approx(0.25)
    # Right answer, no steps: outcome 1, process 0.
    assert arith_components(p, "answer 10 .")["gold"] == pytest.approx(0.5)
    assert arith_components(p, "")["gold"] == 0.0
    assert arith_step_labels(p, "3 + 5 = 8 , 8 + 3 = 11 , answer 11 .") == [True, False]
    assert step_labels("arith", p, "3 + 5 = 8") == [True, False]
    assert step_labels("sentiment", "review the film .", "it was good .") is None


@pytest.mark.parametrize("name", ["sentiment", "arith"])
def test_demonstrator_is_below_best_achievable_and_above_base_corpus(name):
    task = get_task(name)
    prompts = task.heldout_prompts(600, seed=1)
    demo = gold_scores(task, prompts, task.demonstrations(prompts, seed=1))
    pairs = task.pretraining_pairs(600, seed=1)
    base = gold_scores(task, [p for p, _ in pairs], [r for _, r in pairs])
    best = best_achievable(task, prompts[:40], n_candidates=48)
    _, demo_lo, demo_hi = mean_ci95(demo)
    _, _, base_hi = mean_ci95(base)
    assert demo_hi < best.mean() - 0.1  # room for RLHF to improve
    assert base_hi < demo_lo  # the demonstrator is better than the unaligned corpus


def test_gold_is_fast_and_deterministic():
    task = get_task("sentiment")
    prompts = task.train_prompts(2000, seed=9)
    responses = task.demonstrations(prompts, seed=9)
    start = time.perf_counter()
    scores = gold_scores(task, prompts, responses)
    rate = len(prompts) / (time.perf_counter() - start)
    assert rate > 1000, f"gold scored only {rate:.0f} responses/s"
    assert np.array_equal(scores, gold_scores(task, prompts, responses))
    with pytest.raises(ValueError):
        gold_scores(task, prompts[:2], responses[:3])
