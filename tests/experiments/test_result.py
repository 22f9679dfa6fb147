"""What every experiment writes (experiments/result.py): the rerun command and the module's claim in result.json."""

from __future__ import annotations

import json
import sys
import types

from rlhflab.experiments.result import command_line, publish_run


def test_the_command_reruns_the_experiment():
    assert (
        command_line("margin", [0, 1], "runs/m", [])
        == "rlhflab experiment margin --seeds 0 1 --output-dir runs/m"
    )
    assert (
        command_line("rm-init", [2], "o", ["rm.optim.lr=1e-4", "eval.rm_pairs=8"], flags="--task review")
        == "rlhflab experiment rm-init --task review --seeds 2 --output-dir o rm.optim.lr=1e-4 eval.rm_pairs=8"
    )


def test_publish_run_takes_the_claim_from_the_module(tmp_path, monkeypatch):
    module = types.ModuleType("fake_experiment")
    module.NAME, module.CLAIM, module.SOURCE, module.RULE = "fake", "a claim", "a paper", "a rule"
    monkeypatch.setitem(sys.modules, "fake_experiment", module)
    page = publish_run(
        "fake_experiment", tmp_path, verdict="partly reproduced", findings=["f"], table=[{"x": 1.0}], images={},
        started=0.0, seeds=[3], output_dir="out", overrides=["a.b=1"],
    )  # fmt: skip
    result = json.loads((tmp_path / "result.json").read_text())
    assert page == tmp_path / "report.html" and page.is_file()
    assert {k: result[k] for k in ("experiment", "claim", "source", "rule", "verdict", "seeds", "command")} == {
        "experiment": "fake", "claim": "a claim", "source": "a paper", "rule": "a rule",
        "verdict": "partly reproduced", "seeds": [3], "command": "rlhflab experiment fake --seeds 3 --output-dir out a.b=1",
    }  # fmt: skip
    assert result["runtime_s"] > 1e9  # since `started` (here the epoch)
