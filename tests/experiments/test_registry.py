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


def test_the_default_seeds_are_the_experiments_own(monkeypatch):
    """Without --seeds an experiment runs seeds 0 1 2, or its DEFAULT_SEEDS (christiano: one seed, so its default
    run stays within 20 minutes); --seeds overrides both."""
    seen = {}
    for name in ("christiano", "trex"):
        module = importlib.import_module(EXPERIMENTS[name][0])
        monkeypatch.setattr(module, "run", lambda seeds, name=name, **kw: seen.__setitem__(name, list(seeds)))
    assert main(["experiment", "christiano"]) == 0 and main(["experiment", "trex"]) == 0
    assert seen == {"christiano": [0], "trex": [0, 1, 2]}
    assert main(["experiment", "christiano", "--seeds", "4", "5"]) == 0 and seen["christiano"] == [4, 5]
