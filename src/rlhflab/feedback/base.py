"""The one notion of pairwise feedback that online methods ask about the current policy's samples.

A feedback source judges pairs of responses to the same prompt. The contract is asynchronous, because the
slowest source, a person, answers later:

    ticket = source.ask(prompts, first, second)       # B pairs; returns at once
    labels = source.collect(ticket, timeout=60.0)     # Tensor [B] float32, CPU

Each label is one of

    1.0  the first response is preferred         0.0  the second is preferred
    0.5  a tie (the source saw no difference)    NaN  no answer (yet, or refused)

`collect` returns what was answered within `timeout` seconds; the pairs still unanswered come back NaN, and the
ticket is closed (each ticket is collected once). A source that answers at once (a reward, a simulated
annotator, an LM judge) derives from `SyncFeedback` and only writes `judge`. Every source counts the pairs it
was asked in `queries`: the label budget an online method reports (Guo et al. 2024 compare methods at equal
numbers of feedback queries).

A source that keeps state across calls (a random generator, the query count) may offer `state_dict()` and
`load_state_dict(state)`: a training stage checkpoints it, so `--resume` continues bit for bit.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor

from rlhflab.errors import UserError

Prompt = str | list[dict[str, Any]]

FIRST, SECOND, TIE = 1.0, 0.0, 0.5


@dataclass(frozen=True)
class Ticket:
    """A question put to a source: `size` pairs, known to the source by `id`."""

    id: int
    size: int


@runtime_checkable
class FeedbackSource(Protocol):
    """Anything with `name`, `queries`, `ask` and `collect` as below is a feedback source."""

    name: str
    queries: int  # pairs asked so far (the label budget spent)

    def ask(self, prompts: Sequence[Prompt], first: Sequence[str], second: Sequence[str]) -> Ticket:
        """Put B pairs (prompt, first response, second response) to the source; returns at once."""
        ...

    def collect(self, ticket: Ticket, timeout: float | None = None) -> Tensor:
        """The labels [B] float32 of a ticket (1 first, 0 second, 0.5 tie, NaN no answer) answered within
        `timeout` seconds (None: wait for every answer); closes the ticket."""
        ...


def check_pairs(
    prompts: Sequence[Prompt], first: Sequence[str], second: Sequence[str]
) -> tuple[list, list[str], list[str]]:
    """The batch as lists, refusing mismatched lengths and responses that are not text."""
    prompts, first, second = list(prompts), list(first), list(second)
    if not len(prompts) == len(first) == len(second):
        raise UserError(
            f"a feedback source got {len(prompts)} prompts, {len(first)} first and {len(second)} second "
            "responses; give one prompt per pair"
        )
    for i, (a, b) in enumerate(zip(first, second)):
        if not isinstance(a, str) or not isinstance(b, str):
            raise UserError(f"pair {i} holds a {type(a).__name__} and a {type(b).__name__}, not two texts")
    return prompts, first, second


def labels_from_scores(first: Tensor, second: Tensor) -> Tensor:
    """Labels [B] of the higher score: 1 where first > second, 0 where first < second, 0.5 where equal,
    NaN where either score is NaN."""
    first, second = first.float(), second.float()
    labels = torch.where(first > second, FIRST, torch.where(first < second, SECOND, TIE))
    return labels.masked_fill(first.isnan() | second.isnan(), float("nan"))


def ask_and_collect(
    source: FeedbackSource,
    prompts: Sequence[Prompt],
    first: Sequence[str],
    second: Sequence[str],
    timeout: float | None = None,
) -> Tensor:
    """Ask and wait for the answers (up to `timeout` seconds): the labels [B]."""
    return source.collect(source.ask(prompts, first, second), timeout)


class SyncFeedback:
    """Base class of the sources that answer at once: subclasses write `judge`; the base class keeps the
    tickets and the query count (checkpointed by `state_dict`).

    `last_scores`: sources that score each response (a reward) leave the scores ([B] first, [B] second) of the
    last collected ticket here, for logging; the others leave None.
    """

    name: str = "feedback"

    def __init__(self) -> None:
        self.queries = 0
        self.last_scores: tuple[Tensor, Tensor] | None = None
        self._answers: dict[int, tuple[Tensor, tuple[Tensor, Tensor] | None]] = {}
        self._ids = itertools.count()

    def judge(
        self, prompts: list, first: list[str], second: list[str]
    ) -> Tensor | tuple[Tensor, tuple[Tensor, Tensor]]:
        """Labels [B] of the pairs, or (labels, (scores of first [B], scores of second [B]))."""
        raise NotImplementedError

    def ask(self, prompts: Sequence[Prompt], first: Sequence[str], second: Sequence[str]) -> Ticket:
        prompts, first, second = check_pairs(prompts, first, second)
        out = self.judge(prompts, first, second) if prompts else torch.empty(0)
        labels, scores = out if isinstance(out, tuple) else (out, None)
        labels = torch.as_tensor(labels, dtype=torch.float32).cpu()
        if labels.shape != (len(prompts),):
            raise ValueError(
                f"{type(self).__name__}.judge returned shape {tuple(labels.shape)} for {len(prompts)} pairs"
            )
        self.queries += len(prompts)
        ticket = Ticket(next(self._ids), len(prompts))
        self._answers[ticket.id] = (labels, scores)
        return ticket

    def collect(self, ticket: Ticket, timeout: float | None = None) -> Tensor:
        if ticket.id not in self._answers:
            raise UserError(f"{self.name}: ticket {ticket.id} is unknown or was already collected")
        labels, self.last_scores = self._answers.pop(ticket.id)
        return labels

    def state_dict(self) -> dict[str, Any]:
        return {"queries": self.queries}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.queries = int(state["queries"])

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, queries={self.queries})"


__all__ = [
    "FIRST",
    "SECOND",
    "TIE",
    "FeedbackSource",
    "Prompt",
    "SyncFeedback",
    "Ticket",
    "ask_and_collect",
    "check_pairs",
    "labels_from_scores",
]
