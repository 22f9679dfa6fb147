"""`rlhflab experiment trex`: the verdict rule and the table row by hand, refused overrides, a tiny run."""

from __future__ import annotations

import json

import pytest
import torch

from rlhflab.cli import main
from rlhflab.errors import ConfigError
from rlhflab.experiments import trex as E

TINY = [
    "demos.checkpoints=2", "demos.every=64", "demos.episodes=2", "reward.pairs=64", "reward.steps=20",
    "rl.steps=64", "eval.episodes=2", "eval.heldout=1",
]  # fmt: skip


@pytest.fixture(autouse=True)
def one_torch_thread():  # tiny networks: a second thread only adds synchronization
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _row(seed, low, mean, best_demo=-500.0, best_mean=-700.0, rho=0.9):
    return {
        "seed": seed,
        "policy_ci_low": low,
        "policy_return": mean,
        "best_demo_return": best_demo,
        "best_demonstrator_mean": best_mean,
        "spearman_heldout": rho,
    }


def test_verdict_rule():
    assert E.decide([_row(0, -400, -300), _row(1, -450, -350)]) == "reproduced"
    # Beats the best demonstration on every seed but the learned reward ranks held-out trajectories poorly.
    assert E.decide([_row(0, -400, -300), _row(1, -450, -350, rho=0.3)]) == "partly reproduced"
    assert E.decide([_row(0, -400, -300), _row(1, -900, -800)]) == "partly reproduced"  # one seed of two
    # The interval reaches below the best demonstration, but the mean beats the best demonstrator's mean.
    assert E.decide([_row(0, -520, -450), _row(1, -600, -550)]) == "partly reproduced"
    assert E.decide([_row(0, -520, -450), _row(1, -900, -800)]) == "not reproduced"
    assert (
        E.decide([_row(0, None, -300)]) == "partly reproduced"
    )  # one episode: no interval, mean still counts
    assert E.decide([]) == "not reproduced"


def test_seed_row_by_hand():
    rex = {
        "policy_return": -300.0, "policy_ci_low": -350.0, "policy_ci_high": -250.0, "spearman_heldout": 0.8,
        "spearman_with_policy": float("nan"), "heldout_pair_accuracy": 0.75, "reward_train_accuracy": 1.0,
    }  # fmt: skip
    row = E.seed_row(3, [-900.0, -1100.0, -400.0, -600.0], [0, 0, 1, 1], rex)
    assert row["best_demo_return"] == -400.0  # the best single demonstration
    assert row["best_demonstrator_mean"] == -500.0 and row["worst_demonstrator_mean"] == -1000.0
    assert row["spearman_with_policy"] is None and row["seed"] == 3 and row["policy_ci_low"] == -350.0


def test_refused_settings(tmp_path):
    with pytest.raises(ConfigError, match="unknown key 'reward.lr'"):
        E.run([0], str(tmp_path / "a"), overrides=["reward.lr=3"])
    with pytest.raises(ConfigError, match="does not run"):
        E.run([0], str(tmp_path / "b"), overrides=["ppo.algo.iterations=3"])
    with pytest.raises(ConfigError, match="at least 2"):
        E.run([0], str(tmp_path / "c"), overrides=["demos.checkpoints=1"])
    with pytest.raises(ConfigError, match="'sentiment' is not supported; known: Pendulum-v1"):
        E.run([0], str(tmp_path / "d"), task="sentiment")
    assert not (tmp_path / "a").exists() and not (tmp_path / "d").exists()  # refused before any work


def test_tiny_run_writes_the_result(tmp_path, monkeypatch):
    out = tmp_path / "exp"
    assert main(["experiment", "trex", *TINY, "--seeds", "0", "--output-dir", str(out)]) == 0
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
    assert (
        result["experiment"] == "trex"
        and result["seeds"] == [0]
        and result["command"] == (f"rlhflab experiment trex {' '.join(TINY)} --seeds 0 --output-dir {out}")
    )  # rerunnable: the overrides before the options, where argparse takes them
    [row] = result["table"]
    assert result["verdict"] == E.decide(result["table"])
    assert row["best_demo_return"] >= row["best_demonstrator_mean"] >= row["worst_demonstrator_mean"]
    assert row["policy_ci_low"] <= row["policy_return"] <= row["policy_ci_high"]
    assert set(result["plots"]) == {"return_vs_rank", "predicted_vs_true"}
    assert all((out / f).stat().st_size > 1000 for f in result["plots"].values())
    assert "Verdict" in (out / "report.html").read_text()
    # --resume reads finished seeds back instead of running them again.
    monkeypatch.setattr(E, "run_seed", lambda *a: pytest.fail("a finished seed ran again"))
    E.run([0], str(out), overrides=TINY, resume=True)
    assert json.loads((out / "result.json").read_text())["table"] == result["table"]
