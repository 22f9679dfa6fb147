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
    command = command_line(
        "rm-init", [2], "o", ["rm.optim.lr=1e-4", "eval.rm_pairs=8"], flags="--task review"
    )
    assert (
        command
        == "rlhflab experiment rm-init rm.optim.lr=1e-4 eval.rm_pairs=8 --task review --seeds 2 --output-dir o"
    )
    # It parses back to the same experiment, overrides and options (`--seeds` would swallow overrides after it).
    from rlhflab.cli import build_parser

    args = build_parser().parse_args(command.split()[1:])
    assert (args.name, args.overrides, args.task, args.seeds, args.output_dir) == (
        "rm-init", ["rm.optim.lr=1e-4", "eval.rm_pairs=8"], "review", [2], "o"
    )  # fmt: skip


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
        "verdict": "partly reproduced", "seeds": [3], "command": "rlhflab experiment fake a.b=1 --seeds 3 --output-dir out",
    }  # fmt: skip
    assert result["runtime_s"] > 1e9  # since `started` (here the epoch)
