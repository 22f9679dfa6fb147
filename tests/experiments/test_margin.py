"""`rlhflab experiment margin`: intervals and accuracy by rating by hand, the verdict rule, fresh pairs, a tiny run."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from rlhflab.cli import main
from rlhflab.errors import ConfigError
from rlhflab.experiments import margin as E
from rlhflab.experiments.result import _clean

SIG, BETTER, SLIGHT, NEG = E.BUCKETS


def test_wilson_interval_by_hand():
    # 8 of 10: p = 0.8, z^2 = 3.8415; centre (0.8 + 0.19207) / 1.38415 = 0.71674, half 0.22658.
    lo, hi = E.wilson_ci95(8, 10)
    assert lo == pytest.approx(0.49016, abs=1e-4) and hi == pytest.approx(0.94331, abs=1e-4)
    # 10 of 10: [1 / (1 + z^2 / n), 1] = [0.72247, 1], not the empty interval a normal approximation gives.
    lo, hi = E.wilson_ci95(10, 10)
    assert lo == pytest.approx(0.72247, abs=1e-4) and hi == pytest.approx(1.0)
    assert all(math.isnan(x) for x in E.wilson_ci95(0, 0))


def test_pair_correctness_and_gold_order():
    assert E.pair_correct([1.0, 2.0, 3.0], [0.0, 2.0, 4.0]).tolist() == [1.0, 0.5, 0.0]
    # The gold prefers the rejected response of pair 2 and ties on pair 3 (no order: nan).
    scores = {"m": {"chosen": [1.0, 1.0, 1.0], "rejected": [0.0, 0.0, 0.0]}}
    label, gold = E.correctness(scores, [0.9, 0.1, 0.5], [0.2, 0.7, 0.5])
    assert label["m"].tolist() == [1.0, 1.0, 1.0]
    assert gold["m"][:2].tolist() == [1.0, 0.0] and math.isnan(gold["m"][2])


def _hand_rows():
    # Pairs: 2 significantly better, 2 negligibly better. No margin gets [1, 0, 1, 1] right, small [1, 1, 0, 1].
    # Gold: the chosen response is gold-better on pairs 1-3, pair 4 is a gold tie.
    scores = {
        "none": {"chosen": [1.0, 0.0, 1.0, 1.0], "rejected": [0.0, 1.0, 0.0, 0.0]},
        "small": {"chosen": [1.0, 1.0, 0.0, 1.0], "rejected": [0.0, 0.0, 1.0, 0.0]},
    }
    label, gold = E.correctness(scores, [1.0, 1.0, 1.0, 0.0], [0.0, 0.0, 0.0, 0.0])
    rows = E.bucket_rows(0, [SIG, SIG, NEG, NEG], label, gold)
    return {(r["margin"], r["rating"]): r for r in rows}


def test_bucket_rows_by_hand():
    by = _hand_rows()
    assert len(by) == 2 * 5  # 2 settings x (4 ratings + overall)
    assert by["none", SIG]["accuracy"] == 0.5 and by["none", NEG]["accuracy"] == 1.0
    assert by["none", "overall"]["accuracy"] == 0.75 and by["none", "overall"]["n"] == 4
    assert by["small", SIG]["accuracy"] == 1.0 and by["small", NEG]["accuracy"] == 0.5
    assert by["none", BETTER]["n"] == 0 and math.isnan(by["none", BETTER]["accuracy"])
    # Gains on the same pairs: significantly better [1-1, 1-0] -> +0.5, Student t (df 1): 0.5 +- 12.706 * 0.7071
    # / sqrt(2) = 0.5 +- 6.353; negligibly better -0.5; no gain for the reference.
    assert by["small", SIG]["gain_vs_none"] == 0.5
    assert by["small", SIG]["gain_vs_none_ci95_low"] == pytest.approx(0.5 - 6.353, abs=1e-3)
    assert by["small", NEG]["gain_vs_none"] == -0.5 and by["none", SIG]["gain_vs_none"] is None
    # Gold order: pair 4 (a gold tie) left out, so no margin gets 1 of 2 on significantly better, 1 of 1 on
    # negligibly better, 2 of 3 overall.
    assert by["none", SIG]["gold_accuracy"] == 0.5 and by["none", NEG]["gold_n"] == 1
    assert by["none", "overall"]["gold_accuracy"] == pytest.approx(2 / 3)
    assert by["small", SIG]["accuracy_ci95_low"] == pytest.approx(E.wilson_ci95(2, 2)[0])


def _pooled(gains):
    """Pooled rows with the given {margin: {rating: (gain, interval's low end)}}."""
    return [
        {"seed": "all", "margin": arm, "rating": b, "gain_vs_none": g, "gain_vs_none_ci95_low": low}
        for arm, by in gains.items()
        for b, (g, low) in by.items()
    ]


def _gains(sig, sig_low, better=0.0, slight=0.0, neg=0.0):
    return {SIG: (sig, sig_low), BETTER: (better, -1.0), SLIGHT: (slight, -1.0), NEG: (neg, -1.0)}


def test_verdict_rule():
    flat = _gains(0.0, -0.01)
    # Small margin: +0.03 on significantly better (interval above 0), the largest gain, -0.01 on negligibly better.
    assert E.decide(_pooled({"small": _gains(0.03, 0.01, 0.01, 0.0, -0.01), "large": flat})) == "reproduced"
    # The large one does it instead, at exactly the allowed cost.
    assert E.decide(_pooled({"small": flat, "large": _gains(0.03, 0.01, neg=-E.COST)})) == "reproduced"
    # Helps most but the interval reaches 0, or costs more than COST: partly.
    assert E.decide(_pooled({"small": _gains(0.03, -0.001), "large": flat})) == "partly reproduced"
    assert E.decide(_pooled({"small": _gains(0.03, 0.01, neg=-0.05), "large": flat})) == "partly reproduced"
    # A clear, cheap gain on significantly better pairs that is not the largest one: partly.
    assert (
        E.decide(_pooled({"small": _gains(0.02, 0.005, better=0.04), "large": flat})) == "partly reproduced"
    )
    # No gain on significantly better pairs (or one only as large as elsewhere but negative): not reproduced.
    assert E.decide(_pooled({"small": _gains(-0.01, -0.03), "large": flat})) == "not reproduced"
    # Without negligibly-better pairs, "costs little" cannot be shown.
    no_similar = _gains(0.03, 0.01, neg=float("nan"))
    assert E.decide(_pooled({"small": no_similar, "large": flat})) == "partly reproduced"
    assert E.margin_checks(_pooled({"small": no_similar, "large": flat}))["small"] == {
        "helps_most": True,
        "clear": True,
        "cheap": False,
    }


def test_overrides_that_would_not_act_are_refused(tmp_path):
    from rlhflab.pipeline import _user_sections

    def check(*overrides):
        E.check_overrides(
            E.NAME,
            _user_sections(None, list(overrides)),
            eval_keys=("rm_pairs",),
            varied={"rm.algo.margin": "x"},
        )

    check(
        "rm.optim.lr=1e-4",
        "sft.optim.epochs=2",
        "data.n_pairs=100",
        "eval.rm_pairs=64",
        "annotators.noise=0.1",
    )
    for bad, message in [
        ("rm.algo.margin=large", "rm.algo.margin is what this experiment varies"),
        ("ppo.optim.lr=1e-4", "section 'ppo' is for a method this experiment does not run"),
        ("data.n_prompts=10", "data.n_prompts does not act"),
        ("eval.prompts=10", "eval.prompts does not act"),
    ]:
        with pytest.raises(ConfigError, match=message):
            check(bad)
    with pytest.raises(ConfigError, match="rm.algo.margin is what this experiment varies"):
        E.run([0], str(tmp_path / "x"), overrides=["rm.algo.margin=small"])
    assert not (tmp_path / "x").exists()  # refused before any work


def test_fresh_pairs_are_held_out_and_judged_by_the_same_annotators(tmp_path):
    from rlhflab.lab.annotators import AnnotatorSettings, rating_for_gap
    from rlhflab.lab.gold import gold_scores
    from rlhflab.lab.make_data import make_task_data
    from rlhflab.lab.tasks import get_task, prompt_text
    from rlhflab.models.tiny import split_words

    task = get_task("sentiment")
    # One annotator with a strong length bias: the fresh pairs' ratings must use that annotator's bias.
    settings = AnnotatorSettings(bias_spread=1.0)
    make_task_data(
        task, tmp_path, n_sft=4, n_pairs=64, n_prompts=1, n_heldout=0, annotator_settings=settings, seed=3
    )
    manifest = json.loads((tmp_path / "lab_data.json").read_text())
    (bias,) = manifest["annotators"]["biases"]
    assert abs(bias) > 1.0  # seed 3's annotator; a pool drawn afresh with the held-out seed would have -0.38
    pairs = E.fresh_pairs(task, tmp_path, 3, 128)
    assert len(pairs) > 100 and {p["rating"] for p in pairs} <= set(E.BUCKETS)
    train = {
        json.dumps(json.loads(line)["prompt"]) for line in (tmp_path / "pairs.jsonl").read_text().splitlines()
    }
    assert not train & {json.dumps(p["prompt"]) for p in pairs}
    texts = [prompt_text(p["prompt"]) for p in pairs]
    gc = gold_scores(task, texts, [p["chosen"] for p in pairs])
    gr = gold_scores(task, texts, [p["rejected"] for p in pairs])
    lengths = np.array([len(split_words(p["chosen"])) - len(split_words(p["rejected"])) for p in pairs])
    expected = [rating_for_gap(g, settings.rating_thresholds) for g in gc - gr + bias * lengths / 10]
    assert [p["rating"] for p in pairs] == expected


def test_tiny_run_writes_the_result(tmp_path, tiny_lab_cache):
    tiny = [
        "data.n_sft=32", "data.n_pairs=64", "eval.rm_pairs=48", "sft.model.name_or_path=lab:sentiment:tiny",
        "sft.optim.max_steps=2", "sft.optim.batch_size=8", "rm.optim.max_steps=3", "rm.optim.batch_size=8",
        "rm.data.eval_fraction=0.25", "rm.algo.normalization_samples=0",
    ]  # fmt: skip
    out = tmp_path / "exp"
    assert main(["experiment", "margin", *tiny, "--seeds", "0", "--output-dir", str(out)]) == 0
    result = json.loads((out / "result.json").read_text())
    assert result["experiment"] == "margin" and result["seeds"] == [0] and result["rule"] == E.RULE
    assert result["verdict"] == E.decide(result["table"]) and result["plots"] == {
        "accuracy_by_rating": "accuracy_by_rating.png"
    }
    assert len(result["table"]) == 2 * len(E.ARMS) * 5  # seed 0 and pooled, 3 settings, 4 ratings + overall
    record = json.loads((out / "seed-0" / "heldout_scores.json").read_text())
    for arm in E.ARMS:  # each reward model trained with its own margin, from the SFT model
        config = (out / "seed-0" / f"rm-{arm}" / "config.yaml").read_text()
        assert f"margin: {arm}" in config and str(out / "seed-0" / "sft" / "final") in config
    assert record["scores"]["none"] != record["scores"]["large"]  # the margin changed the model
    # The table is what the saved scores say (as result.json writes numbers: nan as null).
    expected = _clean(E.table({0: record}))
    assert result["table"] == [pytest.approx(row) for row in expected]
    overall = next(r for r in result["table"] if r["seed"] == 0 and r["rating"] == "overall")
    assert overall["n"] == len(record["rating"]) > 0
    assert (out / "accuracy_by_rating.png").stat().st_size > 0 and (out / "report.html").exists()
