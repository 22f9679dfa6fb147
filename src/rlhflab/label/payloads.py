"""What a label of each item kind may hold, checked before anything is written.

An annotator sees the responses in a shuffled order (the assignment's `shown_order`) and answers about the
positions shown (A, B, ...); `normalize` turns the answer into response indices, so every stored label
means the same thing whatever order its annotator saw, and keeps what was shown first (position bias).

Kinds (answers as the JSON API takes them):

    pairwise  {"choice": "A"|"B"|"tie", "strength": one of STRENGTHS (not with a tie),
               "safety": "both"|"A"|"B"|"neither" (optional), "reason": text, "edited": text (optional)}
              Llama 2's four strengths (Touvron et al. 2023, Sec. 3.2.1) and safety judgement; an edited
              response ranks above the chosen one (edit > chosen > rejected).
    ranking   {"ranks": [rank of A, rank of B, ...]}  0 = best, equal ranks = a tie, ranks dense (0, 1, 1, 2);
              InstructGPT's K-wise ranking (Ouyang et al. 2022, Sec. 3.4).
    thumbs    {"thumb": "up"|"down"}  one response, desirable or not (KTO, Ethayarajh et al. 2024).
    ratings   {"ratings": {aspect: 1..7, ...}}  every aspect of the project, on a 7-point scale.
    segment   {"choice": "A"|"B"|"equal"|"cannot_tell"}  two clips of an agent (image data: URIs), compared as
              Christiano et al. (2017, Sec. 2.2) ask: one better, equally good, or cannot tell (which their
              learner drops from the comparisons it trains on).
"""

from __future__ import annotations

import re
import string
from collections.abc import Mapping, Sequence
from typing import Any

from rlhflab.errors import UserError

# Llama 2's strengths, strongest first, as `rlhflab.data.records.LLAMA2_RATINGS` names them (a test checks they
# agree): the server does not import the data package, which would pull in torch.
STRENGTHS = ("significantly_better", "better", "slightly_better", "negligibly_better")
SAFETY = ("both", "A", "B", "neither")
DEFAULT_ASPECTS = ("helpful", "honest", "harmless")
RATING_SCALE = (1, 7)
MAX_TEXT = 20_000
SEGMENT_CHOICES = ("A", "B", "equal", "cannot_tell")
# A clip is an image inlined as a data: URI, so the page needs no file store and no second request; only base64
# raster images, which a browser shows and never runs. 1.5 MB fits a 160-pixel GIF of a few seconds many times.
CLIP = re.compile(r"data:image/(gif|png|webp);base64,[A-Za-z0-9+/]+={0,2}")
MAX_CLIP = 1_500_000


class LabelInvalid(UserError):
    """A label that breaks the rules of its kind; `field` names the offending key."""

    status = 422

    def __init__(self, message: str, field: str | None = None):
        super().__init__(f"label field '{field}': {message}" if field else message)
        self.field = field


def positions(k: int) -> list[str]:
    """The letters the UI shows for k responses: A, B, C, ..."""
    return list(string.ascii_uppercase[:k])


def _text(answer: Mapping, key: str) -> str | None:
    value = answer.get(key)
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise LabelInvalid(f"expected text, got {type(value).__name__}", key)
    if len(value) > MAX_TEXT:
        raise LabelInvalid(f"is {len(value)} characters; at most {MAX_TEXT}", key)
    return value


def _one_of(answer: Mapping, key: str, allowed: Sequence[str], *, required: bool = True) -> str | None:
    value = answer.get(key)
    if value is None and not required:
        return None
    if value not in allowed:
        raise LabelInvalid(f"expected one of {', '.join(allowed)}, got {value!r}", key)
    return value


def _refuse_unknown(answer: Mapping, known: Sequence[str], kind: str) -> None:
    extra = sorted(set(answer) - set(known))
    if extra:
        raise LabelInvalid(f"a {kind} label has no such field; its fields are {', '.join(known)}", extra[0])


def _pairwise(answer: Mapping, shown: list[int]) -> dict[str, Any]:
    _refuse_unknown(answer, ("choice", "strength", "safety", "reason", "edited"), "pairwise")
    choice = _one_of(answer, "choice", ("A", "B", "tie"))
    if choice == "tie":
        if answer.get("strength") is not None:
            raise LabelInvalid("a tie has no strength; leave it out", "strength")
        if answer.get("edited"):
            raise LabelInvalid("an edit needs a chosen response (A or B), not a tie", "edited")
        strength, preferred = None, None
    else:
        strength = _one_of(answer, "strength", STRENGTHS)
        preferred = shown[0 if choice == "A" else 1]
    safety = _one_of(answer, "safety", SAFETY, required=False)
    safe = None
    if safety is not None:
        safe = sorted({"both": shown, "A": shown[:1], "B": shown[1:], "neither": []}[safety])
    return {
        "preferred": preferred,  # response index, None for a tie
        "strength": strength,
        "safe": safe,  # indices of the responses judged safe, None if not asked
        "reason": _text(answer, "reason"),
        "edited": _text(answer, "edited"),
        "shown_first": shown[0],
    }


def _ranking(answer: Mapping, shown: list[int]) -> dict[str, Any]:
    _refuse_unknown(answer, ("ranks",), "ranking")
    ranks = answer.get("ranks")
    k = len(shown)
    if not isinstance(ranks, list) or any(isinstance(r, bool) or not isinstance(r, int) for r in ranks):
        raise LabelInvalid(f"expected a list of {k} integers (0 = best), got {ranks!r}", "ranks")
    if len(ranks) != k:
        raise LabelInvalid(f"has {len(ranks)} entries for {k} responses", "ranks")
    levels = sorted(set(ranks))
    if levels != list(range(len(levels))):
        raise LabelInvalid(
            f"{ranks} is not a ranking: the ranks used must be 0, 1, 2, ... with no gaps (a permutation of "
            f"0..{k - 1}, or with equal ranks for ties)",
            "ranks",
        )
    if len(levels) < 2:
        raise LabelInvalid("ties every response, so it carries no preference", "ranks")
    by_index = [0] * k
    for position, rank in enumerate(ranks):
        by_index[shown[position]] = rank
    return {"ranks": by_index, "shown_first": shown[0]}


def _thumbs(answer: Mapping, shown: list[int]) -> dict[str, Any]:
    _refuse_unknown(answer, ("thumb",), "thumbs")
    return {"good": _one_of(answer, "thumb", ("up", "down")) == "up"}


def _ratings(answer: Mapping, shown: list[int], aspects: Sequence[str]) -> dict[str, Any]:
    _refuse_unknown(answer, ("ratings",), "ratings")
    ratings = answer.get("ratings")
    if not isinstance(ratings, Mapping):
        raise LabelInvalid(f"expected an object {{aspect: 1..7}}, got {ratings!r}", "ratings")
    lo, hi = RATING_SCALE
    out = {}
    for aspect in aspects:
        value = ratings.get(aspect)
        if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
            raise LabelInvalid(f"expected an integer {lo}..{hi}, got {value!r}", f"ratings.{aspect}")
        out[aspect] = value
    extra = sorted(set(ratings) - set(aspects))
    if extra:
        raise LabelInvalid(f"this project rates {', '.join(aspects)}, not {extra[0]!r}", "ratings")
    return {"ratings": out}


def _segment(answer: Mapping, shown: list[int]) -> dict[str, Any]:
    _refuse_unknown(answer, ("choice",), "segment")
    choice = _one_of(answer, "choice", SEGMENT_CHOICES)
    decided = choice in ("A", "B")
    return {
        "preferred": shown["AB".index(choice)] if decided else None,  # None: equally good, or cannot tell
        "verdict": "preferred" if decided else choice,  # preferred | equal | cannot_tell
        "shown_first": shown[0],
    }


def normalize(kind: str, answer: Any, shown: list[int], aspects: Sequence[str] = DEFAULT_ASPECTS) -> dict:
    """The stored form of an annotator's `answer` to an item of `kind` shown in order `shown` (response
    indices, first shown first). Raises LabelInvalid naming the field for anything else."""
    if not isinstance(answer, Mapping):
        raise LabelInvalid(f"expected an object, got {type(answer).__name__}", "label")
    if kind == "pairwise":
        return _pairwise(answer, shown)
    if kind == "ranking":
        return _ranking(answer, shown)
    if kind == "thumbs":
        return _thumbs(answer, shown)
    if kind == "ratings":
        return _ratings(answer, shown, aspects)
    if kind == "segment":
        return _segment(answer, shown)
    raise ValueError(f"unknown item kind {kind!r}")


def check_item(kind: str, responses: Any, where: str) -> None:
    """Refuse an item whose responses do not fit its kind (pairwise: 2, ranking: >= 2, thumbs/ratings: 1,
    segment: 2 image data: URIs)."""
    if not isinstance(responses, list) or not responses:
        raise UserError(f"{where}: expected a non-empty list of responses")
    need = {
        "pairwise": (2, 2),
        "ranking": (2, 26),
        "thumbs": (1, 1),
        "ratings": (1, 1),
        "segment": (2, 2),
    }.get(kind)
    if need is None:
        raise UserError(
            f"{where}: unknown item kind {kind!r}; expected pairwise, ranking, thumbs, ratings or segment"
        )
    lo, hi = need
    if not lo <= len(responses) <= hi:
        want = str(lo) if lo == hi else f"{lo} to {hi}"
        raise UserError(f"{where}: a {kind} item needs {want} responses, got {len(responses)}")
    if kind == "segment":
        for j, clip in enumerate(responses):
            if not isinstance(clip, str) or len(clip) > MAX_CLIP or not CLIP.fullmatch(clip):
                size = f"{len(clip)} characters" if isinstance(clip, str) else type(clip).__name__
                raise UserError(
                    f"{where}, response {j}: a segment clip must be an image data: URI "
                    f"(data:image/gif;base64,...) of at most {MAX_CLIP} characters, got {size}"
                    + (f" starting {clip[:30]!r}" if isinstance(clip, str) else "")
                )
