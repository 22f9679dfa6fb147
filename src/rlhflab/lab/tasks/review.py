"""The `review` task: write a short review of a named thing in normal English; gold prefers positive,
on-topic, non-repetitive reviews within a length budget.

Why this task: the other tasks speak a grammar of their own, so only a model pretrained on that grammar
can be judged by their gold. Here the prompts are natural English instructions ("What did you think of
the film?") and the gold reward (`rlhflab.lab.gold.review_components`) reads any English text: VADER
sentiment, mentions of the prompt's subject and its aspects against mentions of other subjects, repeated
word bigrams and length. So a real pretrained chat model (its own tokenizer, its own free English) and the
tiny word-level base model (`lab:review`, pretrained on `pretraining_pairs`) are trained by the same
pipeline and measured on the same ground.

The writer here produces 2-4 sentences of capitalized, punctuated English from sentence templates that mix
aspect judgements ("The pool was superb."), overall verdicts ("Overall, the hotel was lovely.") and
recommendations ("I would stay there again."). Its styles are the base corpus (balanced sentiment,
sometimes about another subject, may repeat itself and run long), the demonstrator (mildly positive,
rarely off topic, never repeats, the SFT data and the source of preference-pair candidates) and, for the
evaluator only, the oracle (positive, on topic, within the length budget). The templates never use
contractions, so the word-level tokenizer's vocabulary covers everything the writer can say.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

from rlhflab.lab.tasks.base import PretrainSpec, SubjectReviewTask
from rlhflab.models.tiny import split_words

# Each subject owns six aspects. The sets are disjoint, and the words were picked to be specific to their
# subject in ordinary reviews: words that reviews of several subjects use ("staff", "menu", "battery",
# "screen", "plot", "sound", "price") belong to nobody, since the gold's on-topic term counts mentions in
# any text.
SUBJECTS: dict[str, tuple[str, ...]] = {
    "film": ("acting", "cast", "director", "script", "scene", "soundtrack"),
    "book": ("author", "prose", "chapter", "narrator", "page", "epilogue"),
    "hotel": ("room", "bed", "breakfast", "pool", "lobby", "reception"),
    "restaurant": ("waiter", "dessert", "chef", "portion", "steak", "appetizer"),
    "phone": ("camera", "charger", "app", "ringtone", "selfie", "signal"),
    "laptop": ("keyboard", "trackpad", "processor", "hinge", "webcam", "port"),
    "game": ("graphics", "gameplay", "controller", "boss", "quest", "multiplayer"),
    "album": ("singer", "melody", "chorus", "lyrics", "track", "ballad"),
    "car": ("engine", "dashboard", "mileage", "steering", "trunk", "gearbox"),
    "park": ("lake", "playground", "bench", "trail", "fountain", "meadow"),
    "museum": ("exhibit", "exhibition", "gallery", "painting", "sculpture", "curator"),
    "concert": ("crowd", "venue", "encore", "setlist", "drummer", "stage"),
    "cafe": ("coffee", "latte", "pastry", "barista", "croissant", "muffin"),
    "bike": ("saddle", "pedal", "handlebar", "helmet", "frame", "brake"),
    "jacket": ("zipper", "sleeve", "hood", "lining", "collar", "cuff"),
    "headphones": ("earcup", "earpad", "cushion", "headband", "cable", "microphone"),
}
# Other words people use for the subject itself; they count as mentions of it ("the movie" for the film).
ALIASES: dict[str, tuple[str, ...]] = {
    "film": ("movie",),
    "book": ("novel",),
    "phone": ("smartphone",),
    "car": ("vehicle",),
    "bike": ("bicycle",),
    "jacket": ("coat",),
    "headphones": ("headphone",),
}
PLURAL_SUBJECTS = frozenset({"headphones"})
# Nouns that take "were" ("The lyrics were superb.").
PLURAL_NOUNS = PLURAL_SUBJECTS | {"lyrics", "graphics"}
# What you do again with a thing you liked: "I would stay there again."
ACTIONS: dict[str, str] = {
    "film": "watch it",
    "book": "read it",
    "hotel": "stay there",
    "restaurant": "eat there",
    "phone": "buy it",
    "laptop": "buy it",
    "game": "play it",
    "album": "listen to it",
    "car": "drive it",
    "park": "visit it",
    "museum": "visit it",
    "concert": "see them",
    "cafe": "go there",
    "bike": "ride it",
    "jacket": "wear it",
    "headphones": "buy them",
}
SUBJECT_NAMES = tuple(SUBJECTS)

PROMPT_TEMPLATES = (
    "Write a short review of the {s}.",
    "What did you think of the {s}?",
    "Give me your honest opinion of the {s}.",
    "How was the {s}?",
    "Tell me about the {s} you tried recently.",
    "Review the {s} in two or three sentences.",
    "I am thinking about the {s}. Is it any good?",
    "Share your thoughts on the {s}.",
)
# About one (template, subject) combination in five is held out; every subject keeps six or seven train
# templates, so held-out prompts test new phrasings of known subjects.
HELDOUT_COMBOS = tuple(
    (t, s) for s in range(len(SUBJECT_NAMES)) for t in range(len(PROMPT_TEMPLATES)) if (t + 3 * s) % 5 == 0
)
TRAIN_COMBOS = tuple(
    (t, s) for s in range(len(SUBJECT_NAMES)) for t in range(len(PROMPT_TEMPLATES)) if (t + 3 * s) % 5 != 0
)

# Adjectives by polarity. VADER scores most of the positive and negative ones (valence 1.3 to 3.1); the
# neutral ones it mostly ignores.
POSITIVE_ADJ = (
    "good",
    "great",
    "excellent",
    "wonderful",
    "lovely",
    "superb",
    "fantastic",
    "impressive",
    "pleasant",
    "brilliant",
    "outstanding",
    "nice",
    "amazing",
    "perfect",
    "delightful",
    "terrific",
    "enjoyable",
    "charming",
)
NEGATIVE_ADJ = (
    "bad",
    "poor",
    "awful",
    "terrible",
    "disappointing",
    "weak",
    "annoying",
    "frustrating",
    "dull",
    "horrible",
    "boring",
    "mediocre",
)
NEUTRAL_ADJ = ("okay", "fine", "average", "decent", "ordinary", "standard")
# Faint criticism after a softener: "The breakfast was a little plain, though."
MILD_ADJ = ("plain", "bland", "slow", "noisy", "dated", "pricey", "small")
INTENSIFIERS = ("very", "really", "truly", "quite", "extremely", "incredibly")
SOFTENERS = ("a little", "a bit", "slightly", "somewhat")
POSITIVE_VERBS = ("loved", "liked", "enjoyed", "appreciated")
NEGATIVE_VERBS = ("disliked", "hated")

# Sentence templates by polarity. Slots: {a}, {b} aspects; {s} the subject (or an alias); {be} was/were
# and {it} it/them agree with the subject; {j}, {k} adjectives of the sentence's polarity; {x} one of the
# opposite polarity; {n}, {n2} neutral adjectives; {m} a mildly critical one; {adv} an intensifier; {soft}
# a softener; {v} a verb of the polarity; {act} the subject's action; {an} "a"/"an" for the next word.
ASPECT_TEMPLATES: dict[int, tuple[str, ...]] = {
    1: (
        "The {a} was {j}.",
        "The {a} was {adv} {j}.",
        "I {v} the {a}.",
        "The {a} was {j}, and the {b} was {k}.",
        "The {a} was {j} and the {b} was {adv} {k}.",
        "I really {v} the {a}, and the {b} was {j}.",
        "The {a} was {j}, even if the {b} was {soft} {m}.",
    ),
    -1: (
        "The {a} was {j}.",
        "The {a} was {adv} {j}.",
        "I {v} the {a}.",
        "The {a} was {j}, and the {b} was {k}.",
        "The {a} was {x}, but the {b} was {j}.",
        "The {a} was {soft} {m}, though.",
        "The {a} could have been better.",
        "The {a} was not {x} at all.",
    ),
    0: (
        "The {a} was {n}.",
        "The {a} was {n}, nothing more.",
        "There was nothing special about the {a}.",
        "The {a} was {soft} {m}.",
        "The {a} was {n}, and the {b} was {n2}.",
    ),
}
VERDICT_TEMPLATES: dict[int, tuple[str, ...]] = {
    1: (
        "Overall, the {s} {be} {j}.",
        "All in all, it was {an} {j} {s}.",
        "I {v} this {s}.",
        "The {s} {be} {adv} {j}!",
        "This {s} is {adv} {j}.",
        "It was {an} {j} experience.",
    ),
    -1: (
        "Overall, the {s} {be} {j}.",
        "Sadly, the {s} {be} {j}.",
        "I was disappointed by the {s}.",
        "Honestly, the {s} {be} {adv} {j}.",
        "It was {an} {j} experience.",
    ),
    0: (
        "The {s} {be} {n} overall.",
        "It was {an} {n} {s}.",
        "The {s} {be} neither great nor terrible.",
        "It was {an} {n} experience.",
    ),
}
RECOMMEND_TEMPLATES: dict[int, tuple[str, ...]] = {
    1: (
        "I would {act} again.",
        "I would happily {act} again.",
        "I would recommend {it} to anyone.",
        "I would recommend {it} to a friend.",
        "Highly recommended!",
    ),
    -1: (
        "I would not {act} again.",
        "I would not recommend {it}.",
        "I cannot recommend {it}.",
    ),
    0: (
        "It is worth a try if you are curious.",
        "I might {act} again.",
        "Maybe give {it} a try.",
    ),
}


@dataclass(frozen=True)
class ReviewStyle:
    """How the writer samples a review. Probabilities are per response unless they say per sentence."""

    p_positive: float  # per sentence: positive
    p_negative: float  # per sentence: negative (the rest is neutral)
    sentence_weights: tuple[float, ...]  # weights of 1, 2, 3, ... sentences (a recommendation counts)
    p_on_topic: float  # the review is about the prompt's subject (else another subject)
    p_verdict: float = 0.5  # open with an overall verdict naming the subject
    p_recommend: float = 0.6  # close with a recommendation
    p_alias: float = 0.2  # per mention of the subject: use its alias when it has one ("movie")
    p_exclaim: float = 0.15  # per positive sentence: end with "!" instead of "."
    p_repeat_sentence: float = 0.0  # repeat one sentence verbatim
    p_stutter: float = 0.0  # repeat one word ("very very")
    allow_repeats: bool = True  # aspects and adjectives may repeat within a review
    min_words: int = 15  # resample until the review has at least this many words
    max_tokens: int | None = None  # ... and at most this many words + punctuation marks (None: any)


BASE_STYLE = ReviewStyle(
    p_positive=0.35,
    p_negative=0.35,
    sentence_weights=(0.1, 0.3, 0.3, 0.2, 0.1),
    p_on_topic=0.7,
    p_recommend=0.4,
    p_repeat_sentence=0.15,
    p_stutter=0.1,
    min_words=10,
)
# 46 tokens leave room for EOS within the task's 48 new tokens.
DEMO_STYLE = ReviewStyle(
    p_positive=0.55,
    p_negative=0.25,
    sentence_weights=(0.0, 0.35, 0.45, 0.2),
    p_on_topic=0.95,
    allow_repeats=False,
    max_tokens=46,
)
# The evaluator's oracle: what a careful positive reviewer writes. Used to estimate the best gold.
ORACLE_STYLE = ReviewStyle(
    p_positive=1.0,
    p_negative=0.0,
    sentence_weights=(0.0, 0.3, 0.5, 0.2),
    p_on_topic=1.0,
    p_verdict=0.7,
    p_recommend=0.8,
    p_exclaim=0.3,
    allow_repeats=False,
    max_tokens=46,
)


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z]+", text.lower())


def prompt_subject(prompt: str) -> str | None:
    """The subject a prompt asks about (the first subject word in it, any case or punctuation), or None."""
    for word in _words(prompt):
        if word in SUBJECTS:
            return word
    return None


class _Picker:
    """Draws words, without repeats within one review when the style forbids them."""

    def __init__(self, rng: random.Random, allow_repeats: bool):
        self.rng, self.allow_repeats, self.used = rng, allow_repeats, set()

    def __call__(self, options: tuple[str, ...]) -> str:
        fresh = options if self.allow_repeats else tuple(o for o in options if o not in self.used) or options
        word = self.rng.choice(fresh)
        self.used.add(word)
        return word


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


_ADJ = {1: POSITIVE_ADJ, -1: NEGATIVE_ADJ, 0: NEUTRAL_ADJ}
_VERBS = {1: POSITIVE_VERBS, -1: NEGATIVE_VERBS, 0: POSITIVE_VERBS}


def _fill(template: str, topic: str, polarity: int, style: ReviewStyle, rng: random.Random, pick) -> str:
    """`template` with its slots filled for a review of `topic` (see the slot list above the templates)."""
    slots: dict[str, str] = {}
    for name in re.findall(r"\{(\w+)\}", template):
        if name in slots:
            continue
        if name in ("a", "b"):
            value = pick(SUBJECTS[topic])
        elif name == "s":
            aliases = ALIASES.get(topic, ())
            value = rng.choice(aliases) if aliases and rng.random() < style.p_alias else topic
        elif name in ("j", "k"):
            value = pick(_ADJ[polarity])
        elif name == "x":
            value = pick(_ADJ[-polarity or 1])
        elif name in ("n", "n2"):
            value = pick(NEUTRAL_ADJ)
        elif name == "m":
            value = pick(MILD_ADJ)
        elif name == "adv":
            value = pick(INTENSIFIERS)
        elif name == "soft":
            value = rng.choice(SOFTENERS)
        elif name == "v":
            value = pick(_VERBS[polarity])
        else:  # be, it, act, an: depend on other slots, filled below
            continue
        slots[name] = value
    plural = topic in PLURAL_SUBJECTS and slots.get("s", topic) == topic
    slots["be"] = "were" if plural else "was"
    slots["it"] = "them" if topic in PLURAL_SUBJECTS else "it"
    slots["act"] = ACTIONS[topic]
    following = re.search(r"\{an\} \{(\w+)\}", template)
    if following:
        slots["an"] = _article(slots[following.group(1)])
    text = template.format(**slots)
    for noun in PLURAL_NOUNS & {slots.get("a"), slots.get("b")}:
        text = text.replace(f"{noun} was", f"{noun} were")
    return text


def _polarity(style: ReviewStyle, rng: random.Random) -> int:
    r = rng.random()
    return 1 if r < style.p_positive else (-1 if r < style.p_positive + style.p_negative else 0)


def _sentences(topic: str, style: ReviewStyle, rng: random.Random) -> list[str]:
    n = rng.choices(range(1, len(style.sentence_weights) + 1), weights=style.sentence_weights)[0]
    pick = _Picker(rng, style.allow_repeats)
    kinds = ["aspect"] * n
    if n >= 2 and rng.random() < style.p_verdict:
        kinds[0] = "verdict"
    if n >= 2 and rng.random() < style.p_recommend:
        kinds[-1] = "recommend"
    tables = {"aspect": ASPECT_TEMPLATES, "verdict": VERDICT_TEMPLATES, "recommend": RECOMMEND_TEMPLATES}
    out = []
    for kind in kinds:
        polarity = _polarity(style, rng)
        sentence = _fill(rng.choice(tables[kind][polarity]), topic, polarity, style, rng, pick)
        if polarity > 0 and sentence.endswith(".") and rng.random() < style.p_exclaim:
            sentence = sentence[:-1] + "!"
        out.append(sentence)
    return out


def _stutter(text: str, rng: random.Random) -> str:
    words = text.split(" ")
    i = rng.randrange(len(words))
    word = re.sub(r"[.,!?]$", "", words[i])
    return " ".join(words[:i] + [word] + words[i:])


def sample_review(subject: str, style: ReviewStyle, rng: random.Random) -> str:
    """One review of `subject` written in `style`: sentences of English with capitals and punctuation."""
    topic = (
        subject if rng.random() < style.p_on_topic else rng.choice([s for s in SUBJECT_NAMES if s != subject])
    )
    for _ in range(100):
        sentences = _sentences(topic, style, rng)
        if rng.random() < style.p_repeat_sentence:
            i = rng.randrange(len(sentences))
            sentences.insert(i + 1, sentences[i])
        text = " ".join(sentences)
        if rng.random() < style.p_stutter:
            text = _stutter(text, rng)
        # What `split_words` counts for text of letters and punctuation, without building a pre-tokenizer.
        n_tokens = len(re.findall(r"[A-Za-z]+|[^\sA-Za-z]", text))
        if len(_words(text)) >= style.min_words and (
            style.max_tokens is None or n_tokens <= style.max_tokens
        ):
            return text
    raise RuntimeError(f"no review of {subject!r} of {style.min_words} words to {style.max_tokens} tokens")


def _template_words(templates) -> list[str]:
    words: list[str] = []
    for t in templates:
        words += split_words(re.sub(r"\{\w+\}", " ", t))
    return words


class ReviewTask(SubjectReviewTask):
    """Short English reviews; gold = sentiment - off topic - repetition - length (see `rlhflab.lab.gold`)."""

    name = "review"
    description = (
        "write a short review of a film, hotel, phone, ... in normal English; gold (VADER sentiment, "
        "on-topic mentions, repeated bigrams, length) reads any English text, so a real pretrained chat "
        "model can be trained and judged"
    )
    version = "1"
    max_new_tokens = 48
    # Wider than sentiment's 64: reviews are three times longer and must keep one subject across
    # sentences (at 64 the base model's on-topic share fell to 0.59 against the corpus's 0.70, at 96 0.66).
    # 800 steps take about 1.6 minutes on 2 idle CPU cores (64: about 1.1).
    pretrain = PretrainSpec(hidden_size=96, num_layers=2, num_heads=4, default_steps=800, tiny_steps=150)
    prompt_templates, subject_names = PROMPT_TEMPLATES, SUBJECT_NAMES
    train_combos, heldout_combos = TRAIN_COMBOS, HELDOUT_COMBOS
    base_style, demo_style, oracle_style = BASE_STYLE, DEMO_STYLE, ORACLE_STYLE
    prompt_subject, sample_review = staticmethod(prompt_subject), staticmethod(sample_review)

    def vocabulary(self) -> list[str]:
        words = _template_words(PROMPT_TEMPLATES)
        for table in (ASPECT_TEMPLATES, VERDICT_TEMPLATES, RECOMMEND_TEMPLATES):
            words += _template_words(t for ts in table.values() for t in ts)
        words += list(SUBJECTS) + [a for aspects in SUBJECTS.values() for a in aspects]
        words += [a for aliases in ALIASES.values() for a in aliases]
        words += POSITIVE_ADJ + NEGATIVE_ADJ + NEUTRAL_ADJ + MILD_ADJ + INTENSIFIERS
        words += POSITIVE_VERBS + NEGATIVE_VERBS
        words += _template_words(SOFTENERS) + _template_words(ACTIONS.values())
        words += ["a", "an", "was", "were", "it", "them", "!"]
        return list(dict.fromkeys(words))
