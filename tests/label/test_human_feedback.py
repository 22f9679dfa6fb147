"""People as the online loop's feedback source: pairs become labelling items, labels come back as 1 / 0 / 0.5 /
NaN, and online DPO trains on what the annotators said."""

from __future__ import annotations

import json
import math
import threading
import time

import pytest

from rlhflab.config import load_config
from rlhflab.core.metrics_log import read_metrics
from rlhflab.errors import ConfigError, UserError
from rlhflab.label.feedback import HumanFeedback, pair_label
from rlhflab.label.store import Store
from rlhflab.stages import online_dpo
from rlhflab.stages.on_policy import require_feedback

from ..helpers import PPO_PROMPTS, stage_config

NAN = float("nan")


def _same(a, b) -> bool:
    return all((math.isnan(x) and math.isnan(y)) or x == y for x, y in zip(a, b)) and len(a) == len(b)


def test_pair_label_is_the_majority_of_first_second_tie():
    first, second, tie = {"preferred": 0}, {"preferred": 1}, {"preferred": None}
    assert math.isnan(pair_label([]))
    assert pair_label([first]) == 1.0 and pair_label([second]) == 0.0 and pair_label([tie]) == 0.5
    assert pair_label([first, second]) == 0.5  # a split vote: (1 + 0) / 2
    assert pair_label([first, first, second]) == 1.0  # 2/3 > 1/2
    assert pair_label([second, tie]) == 0.0  # (0 + 0.5) / 2 = 0.25 < 1/2
    assert pair_label([first, tie, second]) == 0.5  # exactly 1/2


class Labeller(threading.Thread):
    """An annotator working through the project in the background: `decide(prompt, texts_in_shown_order)`
    returns the answer, or None to leave the item unanswered."""

    def __init__(self, url: str, token: str, project: str, decide):
        super().__init__(daemon=True)
        self.store, self.project, self.decide = Store(url), project, decide
        self.who = self.store.user_by_token(token)
        self.stop, self.skipped, self.done = threading.Event(), set(), 0

    def run(self) -> None:
        while not self.stop.is_set():
            view = self.store.next_assignment(self.who, self.project)
            if view is None or view["assignment"] in self.skipped:
                time.sleep(0.02)
                continue
            answer = self.decide(view["prompt"], [r["text"] for r in view["responses"]])
            if answer is None:
                self.skipped.add(view["assignment"])
                continue
            self.store.submit_label(self.who, view["assignment"], answer, f"k{view['assignment']}")
            self.done += 1


def _project(url: str) -> str:
    store = Store(url)
    store.add_project("online")
    token = store.add_user("ann")
    store.add_member("online", "ann")
    store.close()
    return token


def test_ask_queues_items_and_collect_maps_labels_to_first_and_second(db_url):
    token = _project(db_url)
    rules = {"p0": "first", "p1": "second", "p2": None}  # p2 stays unanswered

    def decide(prompt, shown):
        want = rules[prompt]
        if want is None:
            return None
        target = {"first": f"{prompt}-a", "second": f"{prompt}-b"}[want]
        return {"choice": "AB"[shown.index(target)], "strength": "slightly_better"}

    source = HumanFeedback(db_url, "online", poll_seconds=0.05)
    labeller = Labeller(db_url, token, "online", decide)
    labeller.start()
    try:
        ticket = source.ask(["p0", "p1", "p2"], ["p0-a", "p1-a", "p2-a"], ["p0-b", "p1-b", "p2-b"])
        labels = source.collect(ticket, timeout=5.0)
    finally:
        labeller.stop.set()
        labeller.join()
    assert _same(labels.tolist(), [1.0, 0.0, NAN]) and source.queries == 3
    # The unanswered pair was withdrawn: nobody is handed it any more.
    assert Store(db_url).next_assignment(labeller.who, "online") is None
    with pytest.raises(UserError, match="already collected"):
        source.collect(ticket)
    assert source.state_dict() == {"queries": 3}


def test_collect_without_a_timeout_waits_for_every_label(sqlite_url):
    token = _project(sqlite_url)
    source = HumanFeedback(sqlite_url, "online", overlap=1, poll_seconds=0.05)
    ticket = source.ask(["q"], ["long answer"], ["short"])

    def late():
        time.sleep(0.5)
        labeller = Labeller(sqlite_url, token, "online", lambda p, shown: {"choice": "tie"})
        labeller.start()
        time.sleep(1.0)
        labeller.stop.set()

    thread = threading.Thread(target=late)
    thread.start()
    started = time.monotonic()
    assert source.collect(ticket, timeout=None).tolist() == [0.5]
    assert time.monotonic() - started >= 0.4
    thread.join()


def test_config_and_early_checks(sqlite_url, tmp_path):
    with pytest.raises(ConfigError, match="algo.label_db is required"):
        load_config("online-dpo", None, ["algo.feedback=human", "algo.label_project=online"])
    with pytest.raises(ConfigError, match="apply to algo.feedback=human"):
        load_config("online-dpo", None, ["algo.reward_model=rule:length", "algo.label_db=sqlite:///x.db"])
    with pytest.raises(ConfigError, match="algo.reward_model is set but algo.feedback=human"):
        load_config(
            "online-dpo",
            None,
            [
                "algo.feedback=human",
                "algo.label_db=x",
                "algo.label_project=p",
                "algo.reward_model=rule:length",
            ],
        )
    cfg = load_config(
        "online-dpo", None, ["algo.feedback=human", f"algo.label_db={sqlite_url}", "algo.label_project=nope"]
    )
    with pytest.raises(UserError, match="no project 'nope'"):
        require_feedback(cfg.algo)  # before any model loads
    empty = f"sqlite:///{tmp_path / 'empty.db'}"
    cfg = load_config(
        "online-dpo", None, ["algo.feedback=human", f"algo.label_db={empty}", "algo.label_project=p"]
    )
    with pytest.raises(UserError, match="label init"):
        require_feedback(cfg.algo)


def test_online_dpo_trains_on_what_people_said(sqlite_url, tiny_model_dir, tmp_path):
    token = _project(sqlite_url)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PPO_PROMPTS[:8] * 2))

    def longer(prompt, shown):  # the annotator prefers the longer response; equal lengths are a tie
        a, b = shown
        return (
            {"choice": "tie"}
            if len(a) == len(b)
            else {"choice": "A" if len(a) > len(b) else "B", "strength": "better"}
        )

    cfg = stage_config(
        "online-dpo",
        tiny_model_dir,
        "algo.feedback=human",
        f"algo.label_db={sqlite_url}",
        "algo.label_project=online",
        "algo.feedback_timeout=30",
        "algo.prompts_per_step=4",
        "algo.iterations=2",
        "sampling.max_new_tokens=6",
        data=prompts,
        out=tmp_path / "run",
    )
    labeller = Labeller(sqlite_url, token, "online", longer)
    labeller.start()
    try:
        online_dpo.train(cfg)  # the source comes from the config: HumanFeedback over the project
    finally:
        labeller.stop.set()
        labeller.join()
    pairs = [json.loads(line) for line in (tmp_path / "run" / "rollouts.jsonl").read_text().splitlines()]
    asked = [p for p in pairs if p["first"] != p["second"]]
    rows = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "feedback/queries" in r]
    labelled = Store(sqlite_url).labelled("online")
    assert rows[-1]["feedback/queries"] == len(asked) == len(labelled) == labeller.done
    for p in asked:  # every label the stage used is the annotator's, mapped back to first / second
        want = 0.5 if len(p["first"]) == len(p["second"]) else float(len(p["first"]) > len(p["second"]))
        assert p["label"] == want
    assert {r["prompt"] for r in labelled} <= set(PPO_PROMPTS[:8])
