"""`rlhflab experiment list`: every registered experiment, its claim and its source, from the module itself."""

from __future__ import annotations

import importlib

from rlhflab.cli import main
from rlhflab.experiments import EXPERIMENTS


def test_every_experiment_module_has_its_claim_rule_and_run():
    for name, (path, help_text) in EXPERIMENTS.items():
        module = importlib.import_module(path)
        assert name == module.NAME and help_text
        for field in ("CLAIM", "SOURCE", "RULE"):
            assert isinstance(getattr(module, field), str) and getattr(module, field).strip(), (name, field)
        assert callable(module.run)


def test_experiment_list_prints_each_claim_and_source(capsys):
    assert main(["experiment", "list"]) == 0
    out = capsys.readouterr().out
    for name, (path, _) in EXPERIMENTS.items():
        module = importlib.import_module(path)
        block = out.split(f"{name}\n", 1)[1]
        assert block.startswith(f"  claim:  {module.CLAIM}\n  source: {module.SOURCE}\n")
    assert len(EXPERIMENTS) >= 12
