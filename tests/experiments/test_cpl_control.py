"""`rlhflab experiment cpl-control`: the verdict rule by hand, refused overrides, a tiny run."""

from __future__ import annotations

import json

import pytest
import torch

from rlhflab.cli import main
from rlhflab.errors import ConfigError
from rlhflab.experiments import cpl_control as E

TINY = [
    "oracle.steps=256", "data.checkpoints=2", "data.every=64", "data.episodes=1", "data.noise=2",
    "labels.smallest=8", "labels.factor=2", "labels.budgets=2", "cpl.bc_steps=20", "cpl.steps=20",
    "reward.steps=10", "rl.steps=64", "eval.episodes=2",
]  # fmt: skip


@pytest.fixture(autouse=True)
def one_torch_thread():  # tiny networks: a second thread only adds synchronization
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _row(seed, labels, cpl, rl, oracle=-150.0, mean=-950.0):
    return {
        "seed": seed, "labels": labels, "cpl_return": cpl, "rl_return": rl, "oracle_return": oracle,
        "dataset_mean": mean,
    }  # fmt: skip


def test_verdict_rule():
    # The tolerance is 0.1 x |-150 - (-950)| = 80: CPL at -280 still matches preference-based RL at -200.
    assert E.matches(_row(0, 100, -280.0, -200.0)) and not E.matches(_row(0, 100, -281.0, -200.0))
    grid = [(0, 100), (0, 400), (1, 100), (1, 400)]
    assert E.decide([_row(s, n, -200.0, -250.0) for s, n in grid]) == "reproduced"
    # Below at the small budget on both seeds, matching at the largest one on both: partly.
    rows = [_row(s, n, -500.0 if n == 100 else -200.0, -200.0) for s, n in grid]
    assert E.decide(rows) == "partly reproduced"
    # Half of the cells match (seed 0 only), none at seed 1's largest budget: still partly (half).
    rows = [_row(s, n, -200.0 if s == 0 else -900.0, -200.0) for s, n in grid]
    assert E.decide(rows) == "partly reproduced"
    # One cell of four, and not at the largest budget on every seed: not reproduced.
    rows = [_row(s, n, -200.0 if (s, n) == (0, 400) else -900.0, -200.0) for s, n in grid]
    assert E.decide(rows) == "not reproduced"
    assert E.decide([]) == "not reproduced"


def test_budgets_are_nested_powers():
    assert E.budgets({"smallest": 100, "factor": 4, "budgets": 3}) == [100, 400, 1600]


def test_refused_settings(tmp_path):
    with pytest.raises(ConfigError, match="unknown key 'cpl.alpha'"):
        E.run([0], str(tmp_path / "a"), overrides=["cpl.alpha=3"])
    with pytest.raises(ConfigError, match="does not run"):
        E.run([0], str(tmp_path / "b"), overrides=["ppo.algo.iterations=3"])
    with pytest.raises(ConfigError, match="data.noise must be at least 2"):
        E.run([0], str(tmp_path / "c"), overrides=["data.noise=1"])
    with pytest.raises(ConfigError, match="must exceed the last dataset checkpoint"):
        E.run([0], str(tmp_path / "d"), overrides=["oracle.steps=1000"])
    with pytest.raises(ConfigError, match="'sentiment' is not supported; known: Pendulum-v1"):
        E.run([0], str(tmp_path / "e"), task="sentiment")
    assert not any((tmp_path / x).exists() for x in "abcde")  # refused before any work


@pytest.mark.slow
def test_tiny_run_writes_the_result(tmp_path, monkeypatch):
    out = tmp_path / "exp"
    assert main(["experiment", "cpl-control", *TINY, "--seeds", "0", "--output-dir", str(out)]) == 0
    result = json.loads((out / "result.json").read_text())
    for key in (
        "experiment",
        "claim",
        "source",
        "verdict",
        "rule",
        "table",
        "plots",
        "runtime_s",
        "seeds",
        "command",
    ):
        assert key in result, key
    assert result["experiment"] == "cpl-control" and result["seeds"] == [0]
    assert (
        result["command"] == f"rlhflab experiment cpl-control {' '.join(TINY)} --seeds 0 --output-dir {out}"
    )
    assert [r["labels"] for r in result["table"]] == [8, 16] and result["verdict"] == E.decide(
        result["table"]
    )
    for row in result["table"]:
        assert row["dataset_best"] >= row["dataset_mean"] and 0.0 <= row["cpl_heldout_accuracy"] <= 1.0
        assert all(-2000 < row[k] < 0 for k in ("cpl_return", "rl_return", "oracle_return", "bc_return"))
    assert set(result["plots"]) == {"cpl_vs_labels", "preference_rl_vs_labels"}
    assert all((out / f).stat().st_size > 1000 for f in result["plots"].values())
    assert "Verdict" in (out / "report.html").read_text()
    # --resume reads finished seeds back instead of running them again.
    monkeypatch.setattr(E, "run_seed", lambda *a: pytest.fail("a finished seed ran again"))
    E.run([0], str(out), overrides=TINY, resume=True)
    assert json.loads((out / "result.json").read_text())["table"] == result["table"]
