"""`rlhflab experiment christiano`: the verdict rule and the score by hand, refused overrides, a tiny run."""

from __future__ import annotations

import json

import pytest
import torch

from rlhflab.cli import main
from rlhflab.errors import ConfigError
from rlhflab.experiments import christiano as E

TINY = [
    "labels.small=2", "labels.medium=3", "labels.large=4", "rl.steps=32", "rl.chunk=32", "reward.fit_steps=3",
    "reward.members=2", "reward.hidden=8", "eval.episodes=2",
]  # fmt: skip


@pytest.fixture(autouse=True)
def one_torch_thread():  # tiny networks: a second thread only adds synchronization
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _rows(seed, scores, random_scores=(0.0, 0.0, 0.0), budgets=(25, 50, 100)):
    """A seed's disagreement and random rows at three budgets with the given scores (floor -1000, ref -200)."""
    rows = [{"seed": seed, "arm": E.FLOOR, "budget": 0, "labels": 0, "score": 0.0, "true_return": -1000.0}]
    rows.append(
        {"seed": seed, "arm": E.REFERENCE, "budget": 0, "labels": 0, "score": 1.0, "true_return": -200.0}
    )
    for arm, ss in (("disagreement", scores), ("random", random_scores)):
        rows += [
            {
                "seed": seed,
                "arm": arm,
                "budget": b,
                "labels": b,
                "score": s,
                "true_return": -1000.0 + 800.0 * (s or 0.0),
            }
            for b, s in zip(budgets, ss)
        ]
    return rows


def test_score_by_hand():
    assert E.score(-300.0, -200.0, -1200.0) == pytest.approx(
        0.9
    )  # 900 of the 1000 between floor and reference
    assert E.score(-1200.0, -200.0, -1200.0) == 0.0
    assert E.score(-100.0, -200.0, -200.0) is None  # the reference did not beat the floor: no scale


def test_verdict_rule():
    # Only the largest budget's disagreement row counts; smaller budgets and random queries do not.
    assert E.decide(_rows(0, (0.1, 0.2, 0.85)) + _rows(1, (0.0, 0.0, 0.9))) == "reproduced"
    assert E.decide(_rows(0, (0.9, 0.9, 0.7), random_scores=(1, 1, 1))) == "partly reproduced"  # mean >= 0.5
    assert E.decide(_rows(0, (0.1, 0.2, 0.85)) + _rows(1, (0.0, 0.0, 0.1))) == "partly reproduced"  # one seed
    assert E.decide(_rows(0, (0.9, 0.9, 0.3)) + _rows(1, (0.9, 0.9, 0.4))) == "not reproduced"
    assert E.decide(_rows(0, (0.9, 0.9, None))) == "not reproduced"  # no scale on that seed
    summary = E.summary_rows(_rows(0, (0.1, 0.2, 0.3)))
    assert (
        E.decide(summary + _rows(0, (0.1, 0.2, 0.85))) == "reproduced"
    )  # summary rows (seed "mean") skipped
    assert E.decide([]) == "not reproduced"


def test_findings_compare_the_query_methods():
    rows = _rows(0, (0.1, 0.2, 0.9), random_scores=(0.1, 0.2, 0.5)) + _rows(1, (0.1, 0.2, 0.4), (0, 0, 0.6))
    lines = E.findings(rows)
    assert lines[0].startswith("seed 0: true-reward PPO -200, random policy -1000")
    assert lines[-1] == (
        "disagreement vs random queries at 100 labels: disagreement higher on 1 of 2 seeds, mean difference in "
        "true return +80.0"
    )  # (+320 - 160) / 2


def test_refused_settings(tmp_path):
    with pytest.raises(ConfigError, match="unknown key 'reward.lr'"):
        E.run([0], str(tmp_path / "a"), overrides=["reward.lr=3"])
    with pytest.raises(ConfigError, match="does not run"):
        E.run([0], str(tmp_path / "b"), overrides=["ppo.algo.iterations=3"])
    with pytest.raises(ConfigError, match="rl.chunk"):
        E.run([0], str(tmp_path / "c"), overrides=["rl.chunk=99999"])
    with pytest.raises(ConfigError, match="'sentiment' is not supported; known: Pendulum-v1"):
        E.run([0], str(tmp_path / "d"), task="sentiment")
    assert not any((tmp_path / x).exists() for x in "abcd")  # refused before any work


@pytest.mark.slow
def test_tiny_run_writes_the_result(tmp_path, monkeypatch):
    out = tmp_path / "exp"
    assert main(["experiment", "christiano", *TINY, "--seeds", "0", "--output-dir", str(out)]) == 0
    result = json.loads((out / "result.json").read_text())
    assert result["experiment"] == "christiano" and result["seeds"] == [0]
    assert result["command"] == f"rlhflab experiment christiano {' '.join(TINY)} --seeds 0 --output-dir {out}"
    assert result["verdict"] == E.decide(result["table"])
    seeded = [r for r in result["table"] if r["seed"] == 0]
    assert {(r["arm"], r["budget"]) for r in seeded} == {
        (E.FLOOR, 0), (E.REFERENCE, 0), *((m, b) for m in E.METHODS for b in (2, 3, 4))
    }  # fmt: skip
    ref = next(r for r in seeded if r["arm"] == E.REFERENCE)
    assert ref["score"] == pytest.approx(1.0) or ref["score"] is None
    assert all(r["labels"] <= r["budget"] for r in seeded if r["arm"] in E.METHODS)
    assert set(result["plots"]) == {"return_vs_labels", "return_vs_steps"}
    assert all((out / f).stat().st_size > 1000 for f in result["plots"].values())
    assert "Verdict" in (out / "report.html").read_text()
    monkeypatch.setattr(E, "run_seed", lambda *a: pytest.fail("a finished seed ran again"))
    E.run([0], str(out), overrides=TINY, resume=True)
    assert json.loads((out / "result.json").read_text())["table"] == result["table"]
