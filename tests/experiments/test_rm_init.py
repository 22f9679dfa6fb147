"""`rlhflab experiment rm-init`: best-of-n picks and rows by hand, the verdict rule, the random backbone, a tiny run."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from rlhflab.cli import main
from rlhflab.errors import ConfigError
from rlhflab.experiments import rm_init as E
from rlhflab.experiments.result import _clean

# 2 prompts x 3 samples. Picks: sft [1, 2], base [2, 0], scratch [0, 1].
BEST = {
    "gold": [[0.1, 0.5, 0.3], [0.2, 0.0, 0.9]],
    "best_index": {"sft": [1, 2], "base": [2, 0], "scratch": [0, 1]},
}
# 4 held-out pairs; the gold prefers the chosen response on pairs 1-3, pair 4 is a gold tie. Right by label:
# sft on all 4, base on [1, 1, 0, 1], scratch on [0, 1, 0, 1] (equal scores on pair 2: 1/2).
HELDOUT = {
    "rating": ["better"] * 4,
    "gold_chosen": [1.0, 1.0, 1.0, 0.0],
    "gold_rejected": [0.0, 0.0, 0.0, 0.0],
    "scores": {
        "sft": {"chosen": [1.0, 1.0, 1.0, 1.0], "rejected": [0.0, 0.0, 0.0, 0.0]},
        "base": {"chosen": [1.0, 1.0, 0.0, 1.0], "rejected": [0.0, 0.0, 1.0, 0.0]},
        "scratch": {"chosen": [0.0, 1.0, 0.0, 1.0], "rejected": [1.0, 1.0, 1.0, 0.0]},
    },
}


def test_picked_gold_by_hand():
    picks = E.picked_gold(BEST)
    assert picks["sft"].tolist() == [0.5, 0.9] and picks["base"].tolist() == [0.3, 0.2]
    assert picks["scratch"].tolist() == [0.1, 0.0] and picks["gold-best sample"].tolist() == [0.5, 0.9]
    assert picks["random sample"] == pytest.approx([0.3, 1.1 / 3])


def test_rows_by_hand():
    rows = E.init_rows(0, HELDOUT, BEST)
    by = {r["init"]: r for r in rows}
    assert list(by) == [*E.INITS, *E.REFERENCES]
    assert by["sft"]["accuracy"] == 1.0 and by["base"]["accuracy"] == 0.75
    assert by["scratch"]["accuracy"] == pytest.approx((0 + 0.5 + 0 + 1) / 4)
    # Gold order: pair 4 left out; base gets pairs 1, 2 right of 3, scratch pair 2 half.
    assert by["base"]["gold_n"] == 3 and by["base"]["gold_accuracy"] == pytest.approx(2 / 3)
    assert by["scratch"]["gold_accuracy"] == pytest.approx(0.5 / 3)
    # Best-of-n: mean of the picks' gold over prompts, t-interval with 1 degree of freedom (12.706).
    assert by["sft"]["best_of_n_gold"] == pytest.approx(0.7)
    half = 12.706 * np.std([0.5, 0.9], ddof=1) / math.sqrt(2)
    assert by["sft"]["best_of_n_gold_ci95_high"] == pytest.approx(0.7 + half, abs=1e-3)
    assert "accuracy" not in by["random sample"] and by["random sample"]["best_of_n_gold"] == pytest.approx(
        (0.3 + 1.1 / 3) / 2
    )
    comp = {r["comparison"]: r for r in E.comparison_rows(HELDOUT, BEST)}
    assert list(comp) == ["sft - base", "base - scratch", "sft - scratch"]
    assert comp["sft - base"]["accuracy_difference"] == 0.25  # per pair [0, 0, 1, 0]
    assert comp["base - scratch"]["accuracy_difference"] == pytest.approx((1 + 0.5 + 0 + 0) / 4)
    assert comp["sft - base"]["gold_accuracy_difference"] == pytest.approx(1 / 3)  # pairs 1-3 only
    assert comp["sft - scratch"]["best_of_n_gold_difference"] == pytest.approx(0.65)  # [0.4, 0.9]


def _rows(per_seed, pooled, lows):
    """Per-seed and pooled accuracy rows ({init: accuracy}) and comparison rows with the intervals' low ends."""
    rows = [{"seed": s, "init": i, "accuracy": a} for s, acc in enumerate(per_seed) for i, a in acc.items()]
    rows += [{"seed": "all", "init": i, "accuracy": a} for i, a in pooled.items()]
    return rows + [
        {"seed": "all", "comparison": f"{a} - {b}", "accuracy_difference_ci95_low": low}
        for (a, b), low in zip(E.COMPARISONS, lows)
    ]


def test_verdict_rule():
    order = {"sft": 0.80, "base": 0.75, "scratch": 0.70}
    assert E.decide(_rows([order, order], order, [0.01, 0.02, 0.05])) == "reproduced"
    # SFT above base only by chance (interval reaches below 0), clearly above scratch: partly.
    assert E.decide(_rows([order, order], order, [-0.01, 0.02, 0.05])) == "partly reproduced"
    # The intervals are above 0, but on seed 1 the base model's reward model is the more accurate: SFT is not
    # clearly above base (still clearly above scratch): partly.
    swapped = {"sft": 0.74, "base": 0.75, "scratch": 0.70}
    assert E.decide(_rows([order, swapped], order, [0.01, 0.02, 0.05])) == "partly reproduced"
    assert not E.clearly_above(_rows([order, swapped], order, [0.01, 0.02, 0.05]), "sft", "base")
    # Nothing clear, but the pooled accuracies in the claimed order: partly.
    assert E.decide(_rows([order], order, [-0.01, -0.01, -0.01])) == "partly reproduced"
    # No clear difference and the pooled order broken: not reproduced.
    flat = {"sft": 0.74, "base": 0.75, "scratch": 0.70}
    assert E.decide(_rows([flat], flat, [-0.02, 0.01, -0.01])) == "not reproduced"
    assert E.clearly_above(_rows([flat], flat, [-0.02, 0.01, -0.01]), "base", "scratch")
    assert not E.clearly_above(
        _rows([order], order, [None, None, None]), "sft", "base"
    )  # one pair: no interval


def test_overrides_that_would_not_act_are_refused(tmp_path):
    with pytest.raises(ConfigError, match="rm.model.name_or_path is what this experiment varies"):
        E.run([0], str(tmp_path / "x"), overrides=["rm.model.name_or_path=/some/model"])
    with pytest.raises(ConfigError, match="eval.samples does not act"):
        E.run([0], str(tmp_path / "x"), overrides=["eval.samples=2"])
    assert not (tmp_path / "x").exists()  # refused before any work


def test_scratch_model_is_the_base_architecture_with_random_weights(tmp_path, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    a = E.scratch_model(tiny_model_dir, tmp_path / "a", seed=3, resume=False)
    b = E.scratch_model(tiny_model_dir, tmp_path / "b", seed=3, resume=False)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).state_dict()
    wa = AutoModelForCausalLM.from_pretrained(a).state_dict()
    wb = AutoModelForCausalLM.from_pretrained(b).state_dict()
    assert {k: v.shape for k, v in wa.items()} == {k: v.shape for k, v in base.items()}
    assert all(torch.equal(wa[k], wb[k]) for k in wa)  # seeded
    key = next(k for k in base if k.endswith("q_proj.weight"))
    assert not torch.allclose(wa[key], base[key])
    assert (a / "tokenizer_config.json").is_file()


def test_tiny_run_writes_the_result(tmp_path, tiny_lab_cache):
    tiny = [
        "data.n_sft=32", "data.n_pairs=64", "eval.rm_pairs=48", "eval.prompts=6", "eval.best_of_n=4",
        "sft.model.name_or_path=lab:sentiment:tiny", "sft.optim.max_steps=2", "sft.optim.batch_size=8",
        "rm.optim.max_steps=3", "rm.optim.batch_size=8", "rm.data.eval_fraction=0.25",
        "rm.algo.normalization_samples=0",
    ]  # fmt: skip
    out = tmp_path / "exp"
    assert main(["experiment", "rm-init", *tiny, "--seeds", "0", "--output-dir", str(out)]) == 0
    result = json.loads((out / "result.json").read_text())
    assert result["experiment"] == "rm-init" and result["seeds"] == [0] and result["rule"] == E.RULE
    assert result["verdict"] == E.decide(result["table"]) and result["plots"] == {"rm_init": "rm_init.png"}
    seed_dir = out / "seed-0"
    from rlhflab.lab.launch import lab_model_dir

    starts = {
        "sft": seed_dir / "sft" / "final",
        "base": lab_model_dir("lab:sentiment:tiny", seed=0),
        "scratch": seed_dir / "scratch-init",
    }
    for init, start in starts.items():  # each reward model from its own backbone
        assert f"name_or_path: {start}\n" in (seed_dir / f"rm-{init}" / "config.yaml").read_text()
    heldout = json.loads((seed_dir / "heldout_scores.json").read_text())
    best = json.loads((seed_dir / "best_of_n.json").read_text())
    assert best["n"] == 4 and np.asarray(best["gold"]).shape == (6, 4)
    assert heldout["scores"]["base"] != heldout["scores"]["scratch"]
    # The table is what the saved scores and picks say (as result.json writes numbers: nan as null).
    assert result["table"] == [pytest.approx(row) for row in _clean(E.table({0: heldout}, {0: best}))]
    assert len(result["table"]) == 2 * (len(E.INITS) + len(E.REFERENCES)) + len(E.COMPARISONS)
    assert (out / "rm_init.png").stat().st_size > 0 and (out / "report.html").exists()
