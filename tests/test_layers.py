"""The import contract: which package of rlhflab may import which.

Every module's imports (top-level, function-local and TYPE_CHECKING ones alike) must point down this
table. A package imports only packages of a LOWER layer (never one beside it), so training code can never
reach the lab's gold reward, and there is no import cycle between packages.

    layer 0  errors, the package root (version)
    layer 1  core                    seeding, atomic IO, run dirs, logging, checkpoints, health guards
    layer 2  data, losses            records/loaders/collators; pure loss functions
    layer 3  models                  loading, heads, reward model, log-prob kernels
    layer 4  rollout, rewards,       generation; reward sources; feedback sources (pairwise labels the online
             feedback                methods ask for)
    layer 5  config, eval, label     typed stage configs (validated against the loss table); metrics, reports;
                                     the labelling web app, its database and its feedback source (people)
    layer 6  stages, control         one training loop per method; preference learning on control tasks
    layer 7  lab                     tasks, gold rewards, simulated annotators, gold-judged evaluation
    layer 8  pipeline                the main job
    layer 9  experiments             one module per claim: trains what it compares through the pipeline
    layer 10 cli                     `rlhflab <command>`
    layer 11 __main__                `python -m rlhflab` (what `accelerate launch -m` and `torchrun -m` start)
"""

from __future__ import annotations

import ast
from pathlib import Path

import rlhflab

LAYERS: dict[str, int] = {
    "errors": 0,
    "__init__": 0,
    "core": 1,
    "data": 2,
    "losses": 2,
    "models": 3,
    "rollout": 4,
    "rewards": 4,
    "feedback": 4,
    "config": 5,
    "eval": 5,
    "label": 5,
    "stages": 6,
    "control": 6,
    "lab": 7,
    "pipeline": 8,
    "experiments": 9,
    "cli": 10,
    "__main__": 11,
}
SRC = Path(rlhflab.__file__).parent


def _unit(module: str) -> str:
    """'rlhflab.stages.dpo' -> 'stages'; 'rlhflab' -> '__init__'."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def forbidden_imports(module: str, source: str) -> list[str]:
    """The imports of `module` (dotted name) in `source` that break the contract, as readable lines."""
    here = _unit(module)
    bad = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            targets = [node.module]
        else:
            continue
        for target in targets:
            if target.split(".")[0] != "rlhflab" or _unit(target) == here:
                continue
            there = _unit(target)
            if there not in LAYERS or here not in LAYERS or LAYERS[there] >= LAYERS[here]:
                bad.append(
                    f"{module} (layer {LAYERS.get(here)}) imports {target} (layer {LAYERS.get(there)}), "
                    f"line {node.lineno}"
                )
    return bad


def _modules() -> dict[str, Path]:
    out = {}
    for path in SRC.rglob("*.py"):
        parts = list(path.relative_to(SRC.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def test_every_package_has_a_layer():
    units = {_unit(m) for m in _modules()}
    assert units <= set(LAYERS), f"add {sorted(units - set(LAYERS))} to LAYERS (and this docstring)"


def test_every_import_points_down_the_layers():
    bad = [
        line
        for module, path in sorted(_modules().items())
        for line in forbidden_imports(module, path.read_text())
    ]
    assert not bad, "imports against the layer order:\n" + "\n".join(bad)


def test_a_planted_forbidden_import_is_caught():
    """The checker itself: training code reaching the gold reward, even lazily inside a function, fails."""
    planted = "def f():\n    from rlhflab.lab.gold import gold_scores\n    return gold_scores\n"
    assert forbidden_imports("rlhflab.stages.ppo", planted) == [
        "rlhflab.stages.ppo (layer 6) imports rlhflab.lab.gold (layer 7), line 2"
    ]
    assert forbidden_imports("rlhflab.models.heads", "import rlhflab.rewards.learned\n")
    assert forbidden_imports("rlhflab.data.records", "from rlhflab.losses import dpo\n")  # same layer
    assert forbidden_imports("rlhflab.rewards.spec", "from rlhflab.rewards.rules import x\n") == []
    assert forbidden_imports("rlhflab.pipeline", "from rlhflab.lab.gold import gold_scores\n") == []
