import numpy as np
import pytest

from rlhflab.lab.gold import GOLD_COMPONENTS, gold_scores, review_components, review_words, vader_compound
from rlhflab.lab.tasks import DEFAULT_TASK, TASKS, get_task
from rlhflab.lab.tasks.review import (
    HELDOUT_COMBOS,
    PROMPT_TEMPLATES,
    SUBJECT_NAMES,
    SUBJECTS,
    TRAIN_COMBOS,
    prompt_subject,
)
from rlhflab.models.tiny import split_words

HOTEL = "What did you think of the hotel?"
FILM = "What did you think of the film?"

# VADER compounds, printed once with `vader_compound` and hard-coded so the hand-worked numbers are exact.
VADER = {
    "The Hotel's rooms were lovely, lovely! The pool was fine, and the film was fine.": 0.8883,
    "Wonderful, amazing, fantastic!": 0.908,
    "The pool was wonderful and the room was amazing!": 0.8313,
    "Amazing amazing amazing hotel hotel hotel": 0.9081,
}


@pytest.fixture(scope="module")
def task():
    return get_task("review")


def test_registered_and_reachable_by_name(task):
    assert TASKS["review"] is type(task) and DEFAULT_TASK == "sentiment"
    assert task.name == "review" and task.max_new_tokens == 48
    assert GOLD_COMPONENTS["review"] is review_components
    prompts = task.train_prompts(5)
    scores = gold_scores("review", prompts, task.demonstrations(prompts))
    assert scores.shape == (5,) and np.isfinite(scores).all()


def test_vader_constants_are_current():
    for text, value in VADER.items():
        assert vader_compound(text) == pytest.approx(value, abs=1e-4)


def test_gold_hand_worked():
    text = "The Hotel's rooms were lovely, lovely! The pool was fine, and the film was fine."
    c = review_components(HOTEL, text)
    # words: the hotel's rooms were lovely lovely the pool was fine and the film was fine (15)
    assert c["n_words"] == 15 and c["over_length"] == 0
    # hotel's, rooms (plural of room) and pool name the hotel; film names another subject.
    assert (c["n_own"], c["n_other"], c["on_topic"]) == (3, 1, 0.75)
    # 14 bigrams: "lovely lovely" repeats one word, the second "was fine" was seen before.
    assert c["repetition"] == pytest.approx(2 / 14)
    assert c["sentiment"] == pytest.approx(0.8883)
    assert c["gold"] == pytest.approx(0.8883 - 0.5 * 0.25 - 2 / 14)


def test_gold_edge_cases_and_any_text():
    assert review_words("Don't   STOP, café-goers!") == ["don't", "stop", "cafe", "goers"]
    empty = review_components(HOTEL, "")
    assert empty["gold"] == pytest.approx(-0.5) and empty["repetition"] == 0.0
    assert review_components(HOTEL, "Pool.")["repetition"] == 0.0  # under two words
    # The word-level tokenizer decodes with spaces around punctuation; gold reads both forms alike.
    spaced, plain = "the room was great . i loved the pool !", "the room was great. i loved the pool!"
    assert review_components(HOTEL, spaced) == review_components(HOTEL, plain)
    # Aliases and accents: "movie" names the film, "café" the cafe.
    assert review_components(FILM, "The movie was great.")["on_topic"] == 1.0
    assert review_components("How was the cafe?", "A lovely café.")["on_topic"] == 1.0
    # Without a subject in the prompt, anything the task knows counts as on topic.
    assert review_components("Say something.", "The pool was nice.")["on_topic"] == 1.0


def test_each_known_hack_lowers_gold():
    good = "The pool was wonderful and the room was amazing!"
    # Positive words alone: VADER likes them more, but they name nothing (on_topic 0, a 0.5 penalty).
    words_only = "Wonderful, amazing, fantastic!"
    assert vader_compound(words_only) > vader_compound(good)
    assert review_components(HOTEL, words_only)["gold"] == pytest.approx(0.908 - 0.5)
    assert review_components(HOTEL, good)["gold"] == pytest.approx(0.8313)
    # Repetition: 4 of 5 bigrams repeat a word or an earlier bigram.
    stutter = review_components(HOTEL, "Amazing amazing amazing hotel hotel hotel")
    assert stutter["repetition"] == pytest.approx(0.8)
    assert stutter["gold"] == pytest.approx(0.9081 - 0.8)
    # Off-topic praise: the same rave is worth 0.5 less when asked about something else.
    rave = "This phone is amazing! The camera is superb and the battery lasts all day."
    on, off = review_components("How was the phone?", rave), review_components(FILM, rave)
    assert on["on_topic"] == 1.0 and off["on_topic"] == 0.0
    assert on["gold"] - off["gold"] == pytest.approx(0.5)
    # Length: 20 more glowing words raise VADER but cost 0.02 per word past 45.
    review = (
        "I stayed at this hotel for three nights and loved it. The room was spotless, the bed "
        "was comfortable and the breakfast was excellent. The staff were friendly and helpful."
    )
    padding = (
        " The pool was lovely and quiet, perfect for relaxing after a long day out in the city. "
        "Check in took only a couple of minutes."
    )
    short, long = review_components(HOTEL, review), review_components(HOTEL, review + padding)
    assert short["n_words"] == 30 and long["n_words"] == 55 and long["over_length"] == 10
    assert long["sentiment"] > short["sentiment"] and long["gold"] < short["gold"]
    assert long["gold"] == pytest.approx(long["sentiment"] - long["repetition"] - 0.2)


def test_prompts_heldout_disjoint_and_subjects_found(task):
    assert set(HELDOUT_COMBOS).isdisjoint(TRAIN_COMBOS)
    assert len(HELDOUT_COMBOS) + len(TRAIN_COMBOS) == len(PROMPT_TEMPLATES) * len(SUBJECT_NAMES)
    assert 0.15 < len(HELDOUT_COMBOS) / len(TRAIN_COMBOS + HELDOUT_COMBOS) < 0.25
    assert {s for _, s in TRAIN_COMBOS} == set(range(len(SUBJECT_NAMES)))  # every subject keeps train prompts
    train, heldout = task.train_prompts(3000, seed=0), task.heldout_prompts(500, seed=0)
    assert not set(train) & set(heldout)
    assert train[:50] == task.train_prompts(50, seed=0)
    assert task.train_prompts(20, seed=1) != task.train_prompts(20, seed=2)
    for t, template in enumerate(PROMPT_TEMPLATES):
        for s in SUBJECT_NAMES:
            assert prompt_subject(template.format(s=s)) == s, (t, s)


def test_demonstrations_deterministic_and_shaped(task):
    prompts = task.train_prompts(300, seed=0)
    demos = task.demonstrations(prompts, seed=5)
    assert demos == task.demonstrations(prompts, seed=5)
    assert demos != task.demonstrations(prompts, seed=6)
    for d in demos:
        assert d[0].isupper() and d.endswith((".", "!")), d
        assert 15 <= len(review_words(d)) <= 45, d
        assert len(split_words(d)) < task.max_new_tokens, d  # the tiny model can finish it, EOS included
    on_topic = sum(
        any(w.rstrip("s") in {prompt_subject(p), *SUBJECTS[prompt_subject(p)]} for w in review_words(d))
        for p, d in zip(prompts, demos)
    )
    assert on_topic > 250


def test_vocabulary_covers_every_word_written(task):
    vocab = set(task.vocabulary())
    prompts = [t.format(s=s) for t in PROMPT_TEMPLATES for s in SUBJECT_NAMES]
    texts = prompts + task.demonstrations(task.train_prompts(2000, seed=1), seed=1)
    texts += [r for _, r in task.pretraining_pairs(2000, seed=1)]
    for p in prompts[::7]:
        texts += task.oracle_responses(p, 30)
    missing = set(split_words("\n".join(texts))) - vocab  # one call: whitespace splits texts apart
    assert not missing
    tok = task.build_tokenizer()
    assert tok.unk_token_id not in tok(texts[0] + " " + texts[-1])["input_ids"]


def test_gold_orders_oracle_demonstrator_and_base(task):
    prompts = task.heldout_prompts(300, seed=2)
    demo = gold_scores(task, prompts, task.demonstrations(prompts, seed=2))
    pairs = task.pretraining_pairs(300, seed=2)
    base = gold_scores(task, [p for p, _ in pairs], [r for _, r in pairs])
    oracle = np.array([gold_scores(task, [p] * 4, task.oracle_responses(p, 4)).mean() for p in prompts[:40]])
    assert base.mean() + 0.2 < demo.mean() < oracle.mean() - 0.2
    assert oracle.mean() > 0.8
    assert demo.std() > 0.3  # spread enough for annotated pairs to teach something


def test_the_base_style_repeats_words_and_the_demonstrator_does_not():
    """BASE may reuse an aspect within a review (besides its repeated sentences and stutters); the demonstrator
    draws its content words without replacement."""
    import dataclasses
    import random

    from rlhflab.lab.tasks.review import BASE_STYLE, DEMO_STYLE, sample_review

    plain_base = dataclasses.replace(BASE_STYLE, p_repeat_sentence=0.0, p_stutter=0.0, p_on_topic=1.0)

    def repeats(style) -> int:
        rng, n = random.Random(0), 0
        for _ in range(300):
            words = [w for w in review_words(sample_review("hotel", style, rng)) if w in SUBJECTS["hotel"]]
            n += len(words) != len(set(words))
        return n

    # Drawn without replacement, an aspect comes back only when a review names more aspects than exist or names
    # one in another form (a few in 300): 136 against 8 here.
    without = repeats(dataclasses.replace(plain_base, allow_repeats=False))
    assert repeats(plain_base) > 5 * max(without, 1)
    assert repeats(dataclasses.replace(DEMO_STYLE, p_on_topic=1.0)) <= without
