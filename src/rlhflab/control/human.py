"""People as the `Labeller` of control segments: each query becomes a segment item of the labelling app.

    labeller = HumanSegmentLabeller("sqlite:///labels.db", project="pendulum", overlap=1, timeout=600)
    answers = labeller([(first, second), ...])   # queues the clips, waits for the labels people give

Christiano et al. (2017, Sec. 2.2) show a person two 1-2 s clips and ask which is better, with "equally good"
and "can't tell" as answers too. A call pushes the batch as one batch of segment items (two GIF clips each, see
`clips.py`), polls the database until every item has `overlap` labels or `timeout` seconds have passed, then
withdraws the items still open (nobody should label a pair the loop no longer waits for) and answers per query
1.0 (first preferred), 0.0 (second) or 0.5 (equally good) by majority over the annotators who could tell, as
`rlhflab.label.feedback.pair_label` does for text pairs, and NaN where nobody could tell or nobody answered:
Christiano et al. leave incomparable pairs out of the comparisons the reward model learns from.

This mirrors `rlhflab.label.feedback.HumanFeedback`, the feedback source of the text methods; the segments'
true returns go into each item's meta (which annotators never see) so the labels' accuracy can be measured
afterwards from `rlhflab label export --format segments`.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Sequence
from typing import Any

from rlhflab.control.clips import clip_data_uri
from rlhflab.control.segments import Segment
from rlhflab.errors import ConfigError
from rlhflab.label.feedback import pair_label
from rlhflab.label.store import Store

INSTRUCTIONS = {
    "Pendulum-v1": (
        "The goal: swing the pendulum up and keep it balanced upright (the blue ball straight above the pivot), "
        "using as little torque (orange arrow) as possible. Which clip does better?"
    ),
}


def segment_label(payloads: list[dict]) -> float:
    """One query's answer from its annotators' segment payloads (response 0 = the first segment): the majority
    of first / second / equal among those who could tell (`pair_label`'s rule, "equal" voting as a tie), 0.5 on
    a split vote, NaN when none could."""
    return pair_label([p for p in payloads if p["verdict"] != "cannot_tell"])


class HumanSegmentLabeller:
    """Segment queries answered by the annotators of `project` in the labelling app at `db_url` (see the module
    docstring). `timeout`: seconds a call waits for its labels (None: until every item has them); `poll`:
    seconds between looks at the database."""

    name = "human"

    def __init__(
        self,
        db_url: str,
        project: str,
        overlap: int = 1,
        timeout: float | None = 600.0,
        poll: float = 1.0,
        instruction: str | None = None,
    ):
        if isinstance(overlap, bool) or not isinstance(overlap, int) or overlap < 1:
            raise ConfigError(f"overlap must be an integer >= 1 (annotators per query), got {overlap!r}")
        if timeout is not None and not timeout >= 0:
            raise ConfigError(
                f"timeout must be >= 0 seconds, or None to wait for every label; got {timeout!r}"
            )
        if not poll > 0:
            raise ConfigError(f"poll must be > 0 seconds, got {poll!r}")
        self.store = Store(db_url)
        self.project, self.overlap, self.timeout, self.poll = project, overlap, timeout, poll
        self.instruction = instruction
        self.store.counts(project)  # refuses an unknown project now, not at the first query
        self.queries = 0

    def _items(self, queries: Sequence[tuple[Segment, Segment]]) -> list[dict[str, Any]]:
        items = []
        for i, (first, second) in enumerate(queries):
            if first.env_id != second.env_id:
                raise ConfigError(f"query {i} compares a {first.env_id} segment with a {second.env_id} one")
            prompt = self.instruction or INSTRUCTIONS.get(
                first.env_id, "Which clip shows the better behaviour?"
            )
            meta = {
                "source": "control",
                "env_id": first.env_id,
                "steps": [len(first), len(second)],
                "true_returns": [first.true_return, second.true_return],
                "query": self.queries + i,
            }
            items.append(
                {"prompt": prompt, "responses": [clip_data_uri(first), clip_data_uri(second)], "meta": meta}
            )
        return items

    def _wait(self, batch: str) -> None:
        deadline = None if self.timeout is None else time.monotonic() + self.timeout
        while True:
            answers = self.store.batch_labels(batch)
            if all(len(v) >= self.overlap for v in answers.values()):
                return
            if deadline is not None and time.monotonic() >= deadline:
                return
            left = self.poll if deadline is None else max(0.0, deadline - time.monotonic())
            time.sleep(min(self.poll, left))

    def __call__(self, queries: Sequence[tuple[Segment, Segment]]) -> list[float]:
        queries = list(queries)
        if not queries:
            return []
        # Drawn before anything is written: an undrawable env_id fails with nothing queued.
        items = self._items(queries)
        batch = uuid.uuid4().hex
        self.store.push(self.project, "segment", items, overlap=self.overlap, batch=batch)
        self.queries += len(items)
        self._wait(batch)
        self.store.withdraw(batch)
        answers = self.store.batch_labels(batch)  # a label given while we withdrew still counts
        return [segment_label(v) for _, v in sorted(answers.items())]

    def state_dict(self) -> dict[str, Any]:
        return {"queries": self.queries}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.queries = int(state["queries"])

    def close(self) -> None:
        self.store.close()

    def __repr__(self) -> str:
        return (
            f"HumanSegmentLabeller(project={self.project!r}, overlap={self.overlap}, timeout={self.timeout}, "
            f"queries={self.queries})"
        )


__all__ = ["HumanSegmentLabeller", "segment_label"]
