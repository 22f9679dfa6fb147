"""A feedback source answered by people: the online loop's pairs become items of a labelling project.

    source = HumanFeedback("sqlite:///labels.db", project="online", overlap=1)
    ticket = source.ask(prompts, first, second)      # queues B pairwise items, returns at once
    labels = source.collect(ticket, timeout=600)     # waits for the labels people give in the web app

Each ticket is one batch of items. `collect` polls the database until every item has `overlap` labels or
`timeout` seconds have passed; then it withdraws the batch's unlabelled items (nobody should label a pair the
loop no longer waits for) and answers, per pair, the mean over its annotators of 1 (first preferred), 0
(second) or 0.5 (tie), rounded to 1, 0 or 0.5 by majority; NaN where nobody answered. The strengths, safety
judgements and reasons stay in the database for `rlhflab label export`.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from rlhflab.feedback.base import FIRST, SECOND, TIE, Prompt, Ticket, check_pairs
from rlhflab.label.store import Store


def pair_label(payloads: list[dict]) -> float:
    """The label of one pair from its annotators' payloads (response 0 = first): the majority of
    first / second / tie, 0.5 on a split vote, NaN with no payload."""
    if not payloads:
        return float("nan")
    votes = [TIE if p["preferred"] is None else (FIRST if p["preferred"] == 0 else SECOND) for p in payloads]
    mean = sum(votes) / len(votes)
    return FIRST if mean > 0.5 else SECOND if mean < 0.5 else TIE


class HumanFeedback:
    """Pairs judged by the annotators of `project` in the labelling app at `db` (see the module docstring)."""

    name = "human"

    def __init__(self, db: str, project: str, *, overlap: int = 1, poll_seconds: float = 1.0):
        self.store = Store(db)
        self.project, self.overlap, self.poll_seconds = project, overlap, poll_seconds
        self.store.counts(project)  # refuses an unknown project now, not at the first question
        self.queries = 0
        self._batches: dict[int, str] = {}
        self._next_id = 0

    def ask(self, prompts: Sequence[Prompt], first: Sequence[str], second: Sequence[str]) -> Ticket:
        prompts, first, second = check_pairs(prompts, first, second)
        batch = uuid.uuid4().hex
        items = [
            {"prompt": p, "responses": [a, b], "meta": {"source": "online loop"}}
            for p, a, b in zip(prompts, first, second)
        ]
        if items:
            self.store.push(self.project, "pairwise", items, overlap=self.overlap, batch=batch)
        ticket = Ticket(self._next_id, len(items))
        self._next_id += 1
        self._batches[ticket.id] = batch
        self.queries += len(items)
        return ticket

    def collect(self, ticket: Ticket, timeout: float | None = None) -> Tensor:
        from rlhflab.errors import UserError

        if ticket.id not in self._batches:
            raise UserError(f"{self.name}: ticket {ticket.id} is unknown or was already collected")
        batch = self._batches.pop(ticket.id)
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            answers = self.store.batch_labels(batch)
            done = all(len(v) >= self.overlap for v in answers.values())
            if done or (deadline is not None and time.monotonic() >= deadline):
                break
            left = self.poll_seconds if deadline is None else max(0.0, deadline - time.monotonic())
            time.sleep(min(self.poll_seconds, left))
        self.store.withdraw(batch)
        answers = self.store.batch_labels(batch)  # a label given while we withdrew still counts
        return torch.tensor([pair_label(v) for _, v in sorted(answers.items())], dtype=torch.float32)

    def state_dict(self) -> dict[str, Any]:
        return {"queries": self.queries}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.queries = int(state["queries"])

    def __repr__(self) -> str:
        return f"HumanFeedback(project={self.project!r}, overlap={self.overlap}, queries={self.queries})"
