"""People as the segment Labeller: queries become segment items of the labelling app, labels given through the store
come back as 1 / 0 / 0.5 / NaN, and what is left unanswered is withdrawn."""

from __future__ import annotations

import math
import threading
import time

import numpy as np
import pytest

from rlhflab.control.clips import clip_data_uri
from rlhflab.control.human import HumanSegmentLabeller, segment_label
from rlhflab.control.segments import Segment
from rlhflab.errors import ConfigError, UserError
from rlhflab.label.store import Store

from ..label import conftest as label_databases

# The labelling app's test databases: a fresh SQLite file, and a fresh PostgreSQL database when one runs.
db_url, sqlite_url, cheap_argon2 = (
    label_databases.db_url,
    label_databases.sqlite_url,
    label_databases.cheap_argon2,
)

NAN = float("nan")


def _same(a, b) -> bool:
    return len(a) == len(b) and all((math.isnan(x) and math.isnan(y)) or x == y for x, y in zip(a, b))


def _segment(theta0: float, env_id: str = "Pendulum-v1", steps: int = 6) -> Segment:
    thetas = theta0 + 0.1 * np.arange(steps)
    obs = np.stack([np.cos(thetas), np.sin(thetas), np.ones(steps)], axis=1).astype(np.float32)
    return Segment(obs, np.zeros((steps, 1), np.float32), -(thetas**2).astype(np.float32), env_id)


def test_segment_label_is_the_majority_of_those_who_could_tell():
    first = {"preferred": 0, "verdict": "preferred"}
    second = {"preferred": 1, "verdict": "preferred"}
    equal = {"preferred": None, "verdict": "equal"}
    unsure = {"preferred": None, "verdict": "cannot_tell"}
    assert math.isnan(segment_label([])) and math.isnan(segment_label([unsure, unsure]))
    assert segment_label([first]) == 1.0 and segment_label([second]) == 0.0 and segment_label([equal]) == 0.5
    assert segment_label([first, unsure]) == 1.0  # "can't tell" abstains; it is not a vote for equal
    assert segment_label([first, second]) == 0.5  # a split vote
    assert segment_label([second, equal]) == 0.0  # (0 + 0.5) / 2 < 1/2
    assert segment_label([first, first, second]) == 1.0


class Annotator(threading.Thread):
    """Labels the project's items in the background: `decide(clips in shown order)` returns the choice (A, B,
    equal, cannot_tell), or None to leave the item unanswered."""

    def __init__(self, url: str, token: str, decide):
        super().__init__(daemon=True)
        self.store, self.decide = Store(url), decide
        self.who = self.store.user_by_token(token)
        self.stop, self.skipped = threading.Event(), set()

    def run(self) -> None:
        while not self.stop.is_set():
            view = self.store.next_assignment(self.who, "pendulum")
            if view is None or view["assignment"] in self.skipped:
                time.sleep(0.02)
                continue
            choice = self.decide([r["text"] for r in view["responses"]])
            if choice is None:
                self.skipped.add(view["assignment"])
                continue
            self.store.submit_label(
                self.who, view["assignment"], {"choice": choice}, f"k{view['assignment']}"
            )


def _project(url: str, names=("ann",)) -> dict[str, str]:
    store = Store(url)
    store.add_project("pendulum")
    tokens = {}
    for name in names:
        tokens[name] = store.add_user(name)
        store.add_member("pendulum", name)
    store.close()
    return tokens


def _wants(queries, rules):
    """decide(): per query, pick its first segment ("first"), its second, "equal", "cannot_tell" or None, in
    whatever positions the app showed them."""
    clip_of = {}
    for q, (a, b) in enumerate(queries):
        clip_of[clip_data_uri(a)] = (q, 0)
        clip_of[clip_data_uri(b)] = (q, 1)

    def decide(shown):
        q, _ = clip_of[shown[0]]
        want = rules[q]
        if want in ("first", "second"):
            return "AB"[[clip_of[c][1] for c in shown].index(0 if want == "first" else 1)]
        return want

    return decide


def test_labels_given_in_the_app_answer_the_queries(db_url):
    tokens = _project(db_url)
    queries = [(_segment(0.1 * q), _segment(2.0 + 0.1 * q)) for q in range(5)]
    rules = ["first", "second", "equal", "cannot_tell", None]  # the last stays unanswered
    labeller = HumanSegmentLabeller(db_url, "pendulum", timeout=3.0, poll=0.05)
    annotator = Annotator(db_url, tokens["ann"], _wants(queries, rules))
    annotator.start()
    try:
        answers = labeller(queries)
    finally:
        annotator.stop.set()
        annotator.join()
    assert _same(answers, [1.0, 0.0, 0.5, NAN, NAN])
    assert labeller.queries == 5 and labeller.state_dict() == {"queries": 5}
    store = Store(db_url)
    # The unanswered query was withdrawn: nobody is handed it any more.
    assert store.next_assignment(annotator.who, "pendulum") is None
    rows = store.labelled("pendulum")
    assert len(rows) == 4 and {r["kind"] for r in rows} == {"segment"}
    # Each item holds the two segments' clips, first first, and their true returns for later analysis.
    assert rows[0]["responses"] == [clip_data_uri(queries[0][0]), clip_data_uri(queries[0][1])]
    assert rows[0]["meta"]["true_returns"] == pytest.approx(
        [queries[0][0].true_return, queries[0][1].true_return]
    )
    assert rows[0]["prompt"].startswith("The goal: swing the pendulum up")
    store.close()
    labeller.close()


def test_overlap_waits_for_every_annotator_and_takes_the_majority(sqlite_url):
    tokens = _project(sqlite_url, ("ann", "bob"))
    queries = [(_segment(0.0), _segment(1.0)), (_segment(0.5), _segment(2.5))]
    labeller = HumanSegmentLabeller(sqlite_url, "pendulum", overlap=2, timeout=None, poll=0.05)
    ann = Annotator(sqlite_url, tokens["ann"], _wants(queries, ["first", "second"]))
    bob = Annotator(sqlite_url, tokens["bob"], _wants(queries, ["cannot_tell", "first"]))
    ann.start()

    def late():
        time.sleep(0.5)
        bob.start()

    starter = threading.Thread(target=late)
    starter.start()
    started = time.monotonic()
    try:
        answers = labeller(queries)  # no timeout: returns once bob has answered too
    finally:
        ann.stop.set()
        bob.stop.set()
        starter.join()
        ann.join()
        bob.join()
    assert time.monotonic() - started >= 0.4
    # Query 0: ann first, bob cannot tell -> first. Query 1: ann second, bob first -> a split vote.
    assert answers == [1.0, 0.5]
    assert Store(sqlite_url).counts("pendulum")["labels"] == 4


def test_nothing_answered_in_time_is_nan_and_withdrawn(sqlite_url):
    _project(sqlite_url)
    labeller = HumanSegmentLabeller(sqlite_url, "pendulum", timeout=0.2, poll=0.05)
    started = time.monotonic()
    assert _same(labeller([(_segment(0.0), _segment(1.0))]), [NAN])
    assert 0.2 <= time.monotonic() - started < 5
    store = Store(sqlite_url)
    ann = store.user_by_token(store.add_user("late"))
    store.add_member("pendulum", "late")
    assert store.next_assignment(ann, "pendulum") is None
    assert labeller([]) == [] and labeller.queries == 1


def test_bad_settings_and_undrawable_segments_are_refused(sqlite_url):
    _project(sqlite_url)
    with pytest.raises(UserError, match="nope"):
        HumanSegmentLabeller(sqlite_url, "nope")
    for kwargs, field in (({"overlap": 0}, "overlap"), ({"timeout": -1}, "timeout"), ({"poll": 0}, "poll")):
        with pytest.raises(ConfigError, match=field):
            HumanSegmentLabeller(sqlite_url, "pendulum", **kwargs)
    labeller = HumanSegmentLabeller(sqlite_url, "pendulum", timeout=0)
    with pytest.raises(ConfigError, match="CartPole-v1"):
        labeller(
            [(_segment(0.0), _segment(1.0)), (_segment(0.0, "CartPole-v1"), _segment(1.0, "CartPole-v1"))]
        )
    with pytest.raises(ConfigError, match="compares"):
        labeller([(_segment(0.0), _segment(1.0, "CartPole-v1"))])
    assert Store(sqlite_url).counts("pendulum")["items"] == 0  # refused before anything was queued
    assert labeller.queries == 0
