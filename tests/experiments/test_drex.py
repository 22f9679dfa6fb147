"""`rlhflab experiment drex`: the verdict rule (T-REX's), refused overrides, a tiny run."""

from __future__ import annotations

import json

import pytest
import torch

from rlhflab.cli import main
from rlhflab.errors import ConfigError
from rlhflab.experiments import drex as E

TINY = [
    "demos.steps=64", "demos.episodes=2", "bc.steps=20", "noise.levels=2", "noise.rollouts=1",
    "reward.pairs=64", "reward.steps=20", "rl.steps=64", "eval.episodes=2", "eval.heldout=1",
]  # fmt: skip


@pytest.fixture(autouse=True)
def one_torch_thread():  # tiny networks: a second thread only adds synchronization
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_verdict_rule_is_trex_s():
    row = {
        "policy_ci_low": -400,
        "policy_return": -300,
        "best_demo_return": -500,
        "best_demonstrator_mean": -700,
    }
    assert E.decide([{**row, "spearman_heldout": 0.7}]) == "reproduced"
    assert E.decide([{**row, "spearman_heldout": None}]) == "partly reproduced"
    assert E.decide([{**row, "policy_ci_low": -800, "policy_return": -750, "spearman_heldout": 0.9}]) == (
        "not reproduced"
    )


def test_refused_settings(tmp_path):
    with pytest.raises(ConfigError, match="at least 2"):
        E.run([0], str(tmp_path / "a"), overrides=["noise.levels=1"])
    with pytest.raises(ConfigError, match="unknown key 'noise.epsilon'"):
        E.run([0], str(tmp_path / "b"), overrides=["noise.epsilon=1"])
    with pytest.raises(ConfigError, match="unknown key 'demos.checkpoints'"):
        E.run([0], str(tmp_path / "c"), overrides=["demos.checkpoints=3"])  # T-REX's key, not D-REX's
    with pytest.raises(ConfigError, match="does not run"):
        E.run([0], str(tmp_path / "d"), overrides=["ppo.algo.iterations=3"])


def test_tiny_run_writes_the_result(tmp_path):
    out = tmp_path / "exp"
    assert main(["experiment", "drex", *TINY, "--seeds", "0", "--output-dir", str(out)]) == 0
    result = json.loads((out / "result.json").read_text())
    assert result["experiment"] == "drex" and result["verdict"] == E.decide(result["table"])
    [row] = result["table"]
    assert {"bc_return", "random_return", "best_demo_return", "spearman_heldout"} <= set(row)
    assert "worst_demonstrator_mean" not in row and row["best_demo_return"] >= row["best_demonstrator_mean"]
    seed = json.loads((out / "seed-0" / "seed.json").read_text())["plot"]
    # Ranking: 1 rollout at epsilon 1.0 (rank 0), 1 at 0.02 (rank 1), then the 2 demonstrations (rank 2).
    assert sorted(seed["ranks"]) == [0, 1, 2, 2] and seed["labels"] == ["eps 1.00", "eps 0.02", "demos"]
    assert set(result["plots"]) == {"return_vs_rank", "predicted_vs_true"}
    assert (out / "report.html").is_file()
