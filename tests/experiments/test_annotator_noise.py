"""`rlhflab experiment annotator-noise`: the over-optimization criterion by hand, the verdict rule, a tiny run."""

from __future__ import annotations

import json

import pytest

from rlhflab.cli import main
from rlhflab.errors import ConfigError
from rlhflab.experiments import annotator_noise as E


def _curve(golds, proxies=None):
    proxies = proxies if proxies is not None else [0.0] * len(golds)
    return [
        {"step": i + 1, "gold/mean": g, "reward/score": p} for i, (g, p) in enumerate(zip(golds, proxies))
    ]


def test_window_means():
    assert E.window_means(list(range(25)), window=10).tolist() == [4.5, 14.5]  # the last 5 dropped
    assert E.window_means([1.0, 3.0], window=10).tolist() == [2.0]  # shorter than a window: one mean


def test_overoptimization_by_hand():
    # Windows of 10: gold 0.2, 0.5, 0.4 -> best 0.5 (from iteration 10), last 0.4, drop 0.1 > 0.05.
    golds = [0.2] * 10 + [0.5] * 10 + [0.4] * 10
    proxies = [0.0] * 10 + [1.0] * 10 + [2.0] * 10
    o = E.overoptimization(_curve(golds, proxies))
    assert o["gold_best_window"] == pytest.approx(0.5) and o["gold_best_at"] == 10
    assert o["gold_last_window"] == pytest.approx(0.4) and o["gold_drop"] == pytest.approx(0.1)
    assert o["overoptimizes"] and o["proxy_first_window"] == 0.0 and o["proxy_last_window"] == 2.0
    # A drop of 0.04 is within the tolerance; a rising curve has none.
    assert not E.overoptimization(_curve([0.5] * 10 + [0.46] * 10))["overoptimizes"]
    assert E.overoptimization(_curve([0.1] * 10 + [0.3] * 10))["gold_drop"] == 0.0


def _row(seed, arm, over, drop):
    return {"seed": seed, "arm": arm, "overoptimizes": over, "gold_drop": drop}


def test_verdict_rule():
    shown = [_row(0, "noisy", True, 0.2), _row(0, "noiseless", False, 0.0)]
    assert E.decide(shown + [_row(1, "noisy", True, 0.1), _row(1, "noiseless", False, 0.01)]) == "reproduced"
    both = [_row(1, "noisy", True, 0.1), _row(1, "noiseless", True, 0.2)]
    assert E.decide(shown + both) == "partly reproduced"  # shown on seed 0 only
    # Neither over-optimizes, but the noisy drop is larger on every seed: partly.
    assert E.decide([_row(0, "noisy", False, 0.04), _row(0, "noiseless", False, 0.0)]) == "partly reproduced"
    assert E.decide([_row(0, "noisy", False, 0.0), _row(0, "noiseless", False, 0.0)]) == "not reproduced"


def test_tiny_run_writes_the_result(tmp_path, tiny_lab_cache):
    tiny = [
        "data.n_sft=32", "data.n_pairs=64", "data.n_prompts=16", "data.n_heldout=8", "eval.prompts=4",
        "eval.samples=2", "eval.curve_points=1", "eval.curve_prompts=2", "sft.model.name_or_path=lab:sentiment:tiny",
        "sft.optim.max_steps=2", "rm.optim.max_steps=2", "rm.data.eval_fraction=0.25", "ppo.algo.iterations=3",
        "ppo.algo.rollout_batch_size=8", "ppo.algo.minibatch_size=4",
    ]  # fmt: skip
    out = tmp_path / "exp"
    assert main(["experiment", "annotator-noise", *tiny, "--seeds", "0", "--output-dir", str(out)]) == 0
    result = json.loads((out / "result.json").read_text())
    assert result["verdict"] == E.decide(result["table"]) and [r["arm"] for r in result["table"]] == list(
        E.ARMS
    )
    for arm, noise in E.ARMS.items():  # each arm's annotators, as the data manifest recorded them
        manifest = json.loads((out / "seed-0" / arm / "data" / "lab_data.json").read_text())
        assert manifest["annotators"]["noise"] == noise
        report = json.loads((out / "seed-0" / arm / "report.json").read_text())
        row = next(r for r in result["table"] if r["arm"] == arm)
        assert row == pytest.approx(E.seed_row(0, arm, report))
    assert (out / "gold_and_proxy.png").exists()
    with pytest.raises(ConfigError, match="annotators.noise is what this experiment varies"):
        E.run([0], str(tmp_path / "x"), overrides=["annotators.noise=0.1"])
