"""Simulated annotators: they read the hidden gold reward and turn it into the feedback people give.

The model of one annotator k judging response y to prompt x:

    perceived_k(x, y) = gold(x, y) + b_k * n_words(y) / 10       # b_k ~ N(length_bias, bias_spread^2): a
                                                                  # length (verbosity) bias: the pool's
                                                                  # shared one plus one of their own
    pairwise:  P(k prefers a over b) = sigmoid((perceived_k(a) - perceived_k(b)) / temperature)
               (Bradley-Terry; temperature 0 = always the higher perceived score)
    noise:     with probability 2 * noise the annotator ignores both and answers uniformly at random, so
               a pairwise label flips with probability exactly `noise` relative to the Bradley-Terry
               choice; noise = 0.5 is chance. Allowed range [0, 0.5].
    ties:      |perceived gap| < tie_margin is a tie: dropped, or kept as "negligibly_better" in random
               order (Llama 2's "Negligibly Better / Unsure") when keep_ties.
    rating:    Llama 2's four strength levels from the perceived |gap| and `rating_thresholds` = (t1, t2,
               t3): >= t3 significantly_better, >= t2 better, >= t1 slightly_better, else
               negligibly_better; the margin is Llama 2's table (Touvron et al. 2023, Table 27) for that rating.
               The rating reflects the perceived gap even when noise made the annotator pick the worse
               response (a confident mistake, as people make them).
    K-wise:    a Plackett-Luce draw with scores perceived / temperature (InstructGPT's rankings; for K = 2
               it is the Bradley-Terry choice above), or a uniformly random order with probability 2*noise.
    unpaired:  P(good) = sigmoid((perceived - threshold) / temperature), randomized with probability
               2*noise; threshold = `good_threshold`, else the median perceived score of the batch.

    aspect:    what the annotators judge: "gold" (everything, the default), or one named term of the task's gold,
               e.g. "helpfulness" on the harm task (Llama 2's helpfulness annotation, blind to safety).
    rules:     per-rule violation labels (Sparrow's rule ratings), each flipped with probability `noise`;
               Llama 2's safety label of a pair (both safe, one, neither) from those per-response labels.

Each item is judged by one annotator drawn uniformly from the pool, so disagreement comes from the
temperature, the noise and the annotators' different biases. Everything is seeded (numpy Generator).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from rlhflab.data.records import LLAMA2_RATINGS
from rlhflab.errors import ConfigError
from rlhflab.lab.gold import RULE_VIOLATIONS, gold_components, gold_scores, step_labels
from rlhflab.lab.tasks import LabTask, get_task, prompt_text
from rlhflab.losses.reward import LLAMA2_MARGINS
from rlhflab.models.tiny import split_words

# Rating -> margin, from the one Llama 2 table (Table 27, `rlhflab.losses.reward.LLAMA2_MARGINS`).
MARGIN_TABLES = {name: dict(zip(LLAMA2_RATINGS, margins)) for name, margins in LLAMA2_MARGINS.items()}


@dataclass(frozen=True)
class AnnotatorSettings:
    """How the simulated annotators behave (see the module docstring for the model).

    temperature: Bradley-Terry temperature in gold units (0 = deterministic, larger = noisier choices);
        at the default 0.1 a gold gap of 0.1 is a 73/27 call and a gap of 0.3 a 95/5 one.
    noise: probability that a pairwise label is flipped (answers at random with probability 2*noise).
    n_annotators: size of the pool; each item is judged by one of them at random.
    length_bias: the mean of the annotators' length bias, in gold units per 10 words: > 0 is a pool that
        prefers longer answers whatever their gold (the verbosity bias Singhal et al. 2023 found in
        preference data).
    bias_spread: std of each annotator's length bias around `length_bias`, in gold units per 10 words.
    tie_margin: perceived gaps below this are ties.
    keep_ties: write ties as "negligibly_better" pairs (random order) instead of dropping them.
    rating_thresholds: perceived |gap| at which a preference is slightly_better / better /
        significantly_better (increasing).
    margin_table: "small" or "large" (Llama 2 Table 27) to write a margin with each pair; None: rating only.
    good_threshold: unpaired labels: perceived score above which a response is good; None = batch median.
    """

    temperature: float = 0.1
    noise: float = 0.0
    n_annotators: int = 1
    length_bias: float = 0.0
    bias_spread: float = 0.0
    tie_margin: float = 0.0
    keep_ties: bool = False
    rating_thresholds: tuple[float, float, float] = (0.1, 0.3, 0.6)
    margin_table: str | None = "small"
    good_threshold: float | None = None

    def __post_init__(self) -> None:
        if not self.temperature >= 0:
            raise ConfigError(f"annotator temperature must be >= 0, got {self.temperature}")
        if not 0 <= self.noise <= 0.5:
            raise ConfigError(f"annotator noise must be in [0, 0.5] (0.5 = coin flip), got {self.noise}")
        if self.n_annotators < 1:
            raise ConfigError(f"n_annotators must be >= 1, got {self.n_annotators}")
        if not math.isfinite(self.length_bias):
            raise ConfigError(f"length_bias must be a finite number, got {self.length_bias}")
        if not self.bias_spread >= 0 or not self.tie_margin >= 0:
            raise ConfigError("bias_spread and tie_margin must be >= 0")
        t = tuple(float(x) for x in self.rating_thresholds)
        if len(t) != 3 or not 0 <= t[0] <= t[1] <= t[2]:
            raise ConfigError(
                f"rating_thresholds must be 3 increasing numbers >= 0, got {self.rating_thresholds}"
            )
        object.__setattr__(self, "rating_thresholds", t)
        if self.margin_table is not None and self.margin_table not in MARGIN_TABLES:
            raise ConfigError(f"margin_table must be 'small', 'large' or None, got {self.margin_table!r}")


def rating_for_gap(gap: float, thresholds: Sequence[float]) -> str:
    """Llama 2 rating name for a perceived |gap|, given increasing (slightly, better, significantly)."""
    gap = abs(gap)
    t1, t2, t3 = thresholds
    if gap >= t3:
        return LLAMA2_RATINGS[0]
    if gap >= t2:
        return LLAMA2_RATINGS[1]
    if gap >= t1:
        return LLAMA2_RATINGS[2]
    return LLAMA2_RATINGS[3]


def bt_probability(gap: np.ndarray | float, temperature: float) -> np.ndarray:
    """Bradley-Terry P(a over b) = sigmoid(gap / T), gap = score_a - score_b; T = 0: a step (0.5 at 0)."""
    gap = np.asarray(gap, dtype=np.float64)
    if temperature == 0:
        return np.where(gap > 0, 1.0, np.where(gap < 0, 0.0, 0.5))
    return 0.5 * (1.0 + np.tanh(gap / (2.0 * temperature)))  # = sigmoid, without overflow


def predicted_agreement(gold_gaps: np.ndarray, settings: AnnotatorSettings) -> float:
    """Expected share of pairs whose label picks the higher-gold response (unbiased annotators, no ties).

    E[(1 - 2 noise) sigmoid(|gap| / T) + noise] over the gaps: what `label_pairs` should reproduce.
    """
    p = bt_probability(np.abs(np.asarray(gold_gaps, dtype=np.float64)), settings.temperature)
    return float(np.mean((1 - 2 * settings.noise) * p + settings.noise))


@dataclass(frozen=True)
class PairLabel:
    """One pairwise judgment. `a_preferred` is None for a tie; `gap` is perceived(a) - perceived(b)."""

    a_preferred: bool | None
    rating: str
    margin: float | None
    gap: float
    gold_a: float
    gold_b: float
    annotator: int


class AnnotatorPool:
    """A seeded pool of simulated annotators over one task's gold reward."""

    def __init__(
        self,
        task: str | LabTask,
        settings: AnnotatorSettings | None = None,
        seed: int = 0,
        aspect: str = "gold",
    ):
        self.task = get_task(task)
        self.settings = settings or AnnotatorSettings()
        self.aspect = aspect
        if aspect != "gold":
            probe = self.task.train_prompts(1)[0]
            known = gold_components(self.task, probe, self.task.demonstrations([probe])[0])
            if aspect not in known:
                raise ConfigError(
                    f"annotator aspect {aspect!r} is not a term of the {self.task.name!r} task's gold; "
                    f"known: {', '.join(known)}"
                )
        self.rng = np.random.default_rng(seed)
        s = self.settings
        self.biases = s.length_bias + (
            self.rng.normal(0.0, s.bias_spread, s.n_annotators)
            if s.bias_spread > 0
            else np.zeros(s.n_annotators)
        )

    def _gold(self, prompts: Sequence, responses: Sequence[str]) -> np.ndarray:
        texts = [prompt_text(p) for p in prompts]
        if self.aspect == "gold":
            return gold_scores(self.task, texts, responses)
        return np.array(
            [gold_components(self.task, p, r)[self.aspect] for p, r in zip(texts, responses)],
            dtype=np.float64,
        )

    def _perceive(self, gold: np.ndarray, responses: Sequence[str], annotators: np.ndarray) -> np.ndarray:
        lengths = np.array([len(split_words(r)) for r in responses], dtype=np.float64)
        return gold + self.biases[annotators] * lengths / 10.0

    def _draw_annotators(self, n: int) -> np.ndarray:
        return self.rng.integers(0, self.settings.n_annotators, size=n)

    def compare(
        self, prompts: Sequence, responses_a: Sequence[str], responses_b: Sequence[str]
    ) -> list[PairLabel]:
        """Judge a-vs-b for each prompt. Returns one `PairLabel` per pair (ties included)."""
        s, n = self.settings, len(prompts)
        who = self._draw_annotators(n)
        gold_a, gold_b = self._gold(prompts, responses_a), self._gold(prompts, responses_b)
        gap = self._perceive(gold_a, responses_a, who) - self._perceive(gold_b, responses_b, who)
        choose_a = self.rng.random(n) < bt_probability(gap, s.temperature)
        guess = self.rng.random(n) < 2 * s.noise
        choose_a = np.where(guess, self.rng.random(n) < 0.5, choose_a)
        tie = np.abs(gap) < s.tie_margin
        table = MARGIN_TABLES.get(s.margin_table) if s.margin_table else None
        out = []
        for i in range(n):
            rating = LLAMA2_RATINGS[3] if tie[i] else rating_for_gap(gap[i], s.rating_thresholds)
            out.append(
                PairLabel(
                    a_preferred=None if tie[i] else bool(choose_a[i]),
                    rating=rating,
                    margin=None if table is None else float(table[rating]),
                    gap=float(gap[i]),
                    gold_a=float(gold_a[i]),
                    gold_b=float(gold_b[i]),
                    annotator=int(who[i]),
                )
            )
        return out

    def rank(self, prompt, responses: Sequence[str]) -> tuple[list[int], list[int]]:
        """Order K responses best to worst. Returns (order, ranks): `order` indexes `responses`; `ranks[j]`
        is the dense rank of `responses[order[j]]` (equal = tied: only with keep_ties, within tie_margin)."""
        s, k = self.settings, len(responses)
        who = self._draw_annotators(1).repeat(k)
        scores = self._perceive(self._gold([prompt] * k, responses), responses, who)
        if self.rng.random() < 2 * s.noise:
            order = [int(i) for i in self.rng.permutation(k)]
        else:
            order = self._plackett_luce(scores, s.temperature)
        ranks = [0]
        for prev, cur in zip(order[:-1], order[1:]):
            tied = s.keep_ties and abs(scores[prev] - scores[cur]) < s.tie_margin
            ranks.append(ranks[-1] if tied else ranks[-1] + 1)
        return order, ranks

    def _plackett_luce(self, scores: np.ndarray, temperature: float) -> list[int]:
        if temperature == 0:
            # Random tie-break first, then a stable sort by score: exact ties fall in random order.
            perm = self.rng.permutation(len(scores))
            return [int(perm[i]) for i in np.argsort(-scores[perm], kind="stable")]
        # Gumbel-max trick: sorting scores/T + Gumbel noise is an exact Plackett-Luce sample.
        keys = scores / temperature + self.rng.gumbel(size=len(scores))
        return [int(i) for i in np.argsort(-keys, kind="stable")]

    def label(self, prompts: Sequence, responses: Sequence[str]) -> list[bool]:
        """Unpaired good (True) / bad (False) labels, one per response."""
        s, n = self.settings, len(prompts)
        who = self._draw_annotators(n)
        scores = self._perceive(self._gold(prompts, responses), responses, who)
        threshold = s.good_threshold if s.good_threshold is not None else float(np.median(scores))
        good = self.rng.random(n) < bt_probability(scores - threshold, s.temperature)
        guess = self.rng.random(n) < 2 * s.noise
        return [bool(x) for x in np.where(guess, self.rng.random(n) < 0.5, good)]

    def label_steps(self, prompt, response: str) -> list[bool] | None:
        """Per-step correctness labels (process supervision) for tasks with steps, each flipped with
        probability `noise`; None for tasks without steps."""
        labels = step_labels(self.task, prompt_text(prompt), response)
        if labels is None:
            return None
        flips = self.rng.random(len(labels)) < self.settings.noise
        return [bool(lab) != bool(f) for lab, f in zip(labels, flips)]

    def label_rules(self, prompts: Sequence, responses: Sequence[str]) -> list[dict[str, bool]]:
        """Per-rule violation labels {rule: True = broken} of each response (Sparrow's rule ratings), each
        flipped with probability `noise`. Raises ConfigError for a task without rules."""
        fn = RULE_VIOLATIONS.get(self.task.name)
        if fn is None:
            raise ConfigError(f"task {self.task.name!r} has no rules to label (tasks with rules: harm)")
        out = []
        for p, r in zip(prompts, responses):
            truth = fn(prompt_text(p), r)
            flips = self.rng.random(len(truth)) < self.settings.noise
            out.append({rule: bool(v) != bool(f) for (rule, v), f in zip(truth.items(), flips)})
        return out

    def safety_labels(self, prompts: Sequence, chosen: Sequence[str], rejected: Sequence[str]) -> list[str]:
        """Llama 2's safety label of each pair (Touvron et al. 2023, Sec. 4.2.1): "both_safe", "chosen_safe"
        (only the chosen one), "rejected_safe" or "neither_safe", from this pool's (noisy) rule labels."""
        safe_c = [not any(v.values()) for v in self.label_rules(prompts, chosen)]
        safe_r = [not any(v.values()) for v in self.label_rules(prompts, rejected)]
        names = {(True, True): "both_safe", (True, False): "chosen_safe", (False, True): "rejected_safe"}
        return [names.get((c, r), "neither_safe") for c, r in zip(safe_c, safe_r)]
