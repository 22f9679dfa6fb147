"""Gold rewards of the built-in tasks: the hidden "what people want" that every method is judged by.

ONLY the simulated annotators (`rlhflab.lab.annotators`) and the evaluator (`rlhflab.eval`) may call
this module. Training code that reads gold is no longer measuring RLHF; it is measuring a cheat.

sentiment (range about [-3, 1]):
    gold = vader_compound(response)            # sentiment in [-1, 1], the vaderSentiment lexicon
           - 1.0 * (1 - fluency)              # fluency: share of word-class bigrams the grammar allows
           - 1.0 * repetition                 # share of content words that repeat an earlier one
           - 0.5 * (1 - on_topic)             # 1 if every noun belongs to the prompt's subject, 0.5 mixed
           - 0.3 * extra_clauses              # clauses beyond the grammar's two
    VADER alone rewards "great great great" (compound 0.98); the other terms are what a reward model
    trained on grammatical pairs never sees, which is what makes the proxy hackable.

arith (range [0, 1]):
    gold = 0.5 * outcome + 0.5 * process
    outcome: the number after the last "answer" equals the true sum; process: share of the k-1 steps
    "a + b = c" that are right, where step i must add the i+1-th operand to the previous step's stated
    result (the first operand for step 1) and get the sum right (PRM800K-style step correctness: a step
    that correctly continues from an earlier slip counts as right, while the outcome stays wrong).

Deterministic and fast (tens of thousands of responses per second; VADER results are cached).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from functools import lru_cache

import numpy as np

from rlhflab.lab.tasks import LabTask, get_task
from rlhflab.lab.tasks import arith as _arith
from rlhflab.lab.tasks import sentiment as _sent
from rlhflab.models.tiny import split_words

SENTIMENT_WEIGHTS = {"fluency": 1.0, "repetition": 1.0, "off_topic": 0.5, "extra_clause": 0.3}


@lru_cache(maxsize=1)
def _vader():
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    return SentimentIntensityAnalyzer()


@lru_cache(maxsize=200_000)
def vader_compound(text: str) -> float:
    """VADER compound sentiment of `text`, in [-1, 1]."""
    return float(_vader().polarity_scores(text)["compound"])


def _fluency(words: list[str]) -> float:
    classes = ["<s>", *(_sent.WORD_CLASS.get(w, "OOV") for w in words), "</s>"]
    pairs = list(zip(classes[:-1], classes[1:]))
    return sum(p in _sent.VALID_TRANSITIONS for p in pairs) / len(pairs)


def _repetition(words: list[str]) -> float:
    content = [w for w in words if _sent.WORD_CLASS.get(w) in _sent.CONTENT_CLASSES]
    return (len(content) - len(set(content))) / len(content) if content else 0.0


def _on_topic(prompt: str, words: list[str]) -> float:
    nouns = [w for w in words if w in _sent.NOUNS]
    if not nouns:
        return 0.0
    subject = _sent.prompt_subject(prompt)
    if subject is None:
        return 1.0
    own = {subject, *_sent.SUBJECTS[subject]}
    n_own = sum(w in own for w in nouns)
    return 1.0 if n_own == len(nouns) else (0.5 if n_own else 0.0)


def sentiment_components(prompt: str, response: str) -> dict[str, float]:
    """The sentiment task's gold and its terms (see the module docstring)."""
    words = split_words(response)
    sentiment = vader_compound(" ".join(words))
    fluency, repetition = _fluency(words), _repetition(words)
    on_topic = _on_topic(prompt, words)
    extra = max(0, sum(w in _sent.CONJUNCTIONS for w in words) - 1)
    w = SENTIMENT_WEIGHTS
    gold = (
        sentiment
        - w["fluency"] * (1 - fluency)
        - w["repetition"] * repetition
        - w["off_topic"] * (1 - on_topic)
        - w["extra_clause"] * extra
    )
    return {
        "gold": gold,
        "sentiment": sentiment,
        "fluency": fluency,
        "repetition": repetition,
        "on_topic": on_topic,
        "extra_clauses": float(extra),
        "n_words": float(len(words)),
    }


def _numbers_text(response: str) -> str:
    # The word-level tokenizer decodes 10 as "1 0": glue digit runs back into numbers before parsing.
    return re.sub(r"(?<=\d) (?=\d)", "", " ".join(split_words(response)))


def arith_step_labels(prompt: str, response: str) -> list[bool]:
    """Correctness of each of the k-1 expected steps (missing steps are wrong). Process supervision."""
    operands = _arith.prompt_operands(prompt)
    steps = [tuple(map(int, m)) for m in re.findall(r"(\d+) \+ (\d+) = (\d+)", _numbers_text(response))]
    labels, expected_left = [], operands[0] if operands else 0
    for i, right in enumerate(operands[1:]):
        if i >= len(steps):
            labels.append(False)
            continue
        a, b, c = steps[i]
        labels.append(a == expected_left and b == right and c == a + b)
        expected_left = c
    return labels


def arith_components(prompt: str, response: str) -> dict[str, float]:
    """The arith task's gold = 0.5 outcome + 0.5 process, with both terms."""
    operands = _arith.prompt_operands(prompt)
    answers = re.findall(r"answer (\d+)", _numbers_text(response))
    outcome = float(bool(answers) and bool(operands) and int(answers[-1]) == sum(operands))
    labels = arith_step_labels(prompt, response)
    process = sum(labels) / len(labels) if labels else outcome
    return {"gold": 0.5 * outcome + 0.5 * process, "outcome": outcome, "process": process}


GOLD_COMPONENTS: dict[str, Callable[[str, str], dict[str, float]]] = {
    "sentiment": sentiment_components,
    "arith": arith_components,
}
# Tasks whose responses have steps that can be labeled one by one.
STEP_LABELS: dict[str, Callable[[str, str], list[bool]]] = {"arith": arith_step_labels}


def _components_fn(task: str | LabTask) -> Callable[[str, str], dict[str, float]]:
    return GOLD_COMPONENTS[get_task(task).name]


def gold_components(task: str | LabTask, prompt: str, response: str) -> dict[str, float]:
    """Gold reward of one response with its named terms; key "gold" is the reward."""
    return _components_fn(task)(prompt, response)


def gold_scores(task: str | LabTask, prompts: Sequence[str], responses: Sequence[str]) -> np.ndarray:
    """Gold rewards [N] of responses[i] to prompts[i]."""
    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
    fn = _components_fn(task)
    return np.array([fn(p, r)["gold"] for p, r in zip(prompts, responses)], dtype=np.float64)


def step_labels(task: str | LabTask, prompt: str, response: str) -> list[bool] | None:
    """Per-step correctness for tasks with steps (arith), else None."""
    fn = STEP_LABELS.get(get_task(task).name)
    return fn(prompt, response) if fn else None


def best_achievable(
    task: str | LabTask, prompts: Sequence[str], n_candidates: int = 64, seed: int = 0
) -> np.ndarray:
    """Estimated best gold per prompt [N]: the gold-best of `n_candidates` oracle responses.

    A lower bound on the true maximum, and a tight one for these tasks (arith's oracle is exact).
    """
    t = get_task(task)
    best = []
    for p in prompts:
        cands = t.oracle_responses(p, n_candidates, seed)
        best.append(float(gold_scores(t, [p] * len(cands), cands).max()))
    return np.array(best, dtype=np.float64)
