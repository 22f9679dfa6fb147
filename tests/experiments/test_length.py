"""`rlhflab experiment length`: a policy's row against SFT by hand, the verdict rule, a tiny run whose table is
recomputed from its saved samples."""

from __future__ import annotations

import json

import pytest

from rlhflab.errors import ConfigError
from rlhflab.experiments import length as E
from rlhflab.experiments.result import _clean


def test_method_row_by_hand():
    # SFT: gold 0, 1 at 2, 4 words; the policy: gold 2, 3 at 6, 8 words, on one prompt. Within-group slope
    # 0.5 per word; the raw gain 2.5 - 0.5 = 2 is all length (0.5 x 4 more words), none left at matched length.
    sft = {"gold": [[0.0, 1.0]], "words": [[2, 4]], "kl_to_sft": 0.0}
    policy = {"gold": [[2.0, 3.0]], "words": [[6, 8]], "kl_to_sft": 1.5}
    row = E.method_row(policy, sft, bias=0.5)
    assert row["words"] == 7.0 and row["delta_words"] == 4.0 and row["kl_to_sft"] == 1.5
    assert row["gold_gain"] == pytest.approx(2.0) and row["slope_per_word"] == pytest.approx(0.5)
    assert row["length_part"] == pytest.approx(2.0) and row["gain_at_matched_length"] == pytest.approx(0.0)
    # Every policy sample beats every SFT one; moved to SFT's 3 words along the slope all four score 0.5.
    assert row["win_rate"] == 1.0 and row["win_rate_at_matched_length"] == pytest.approx(0.5)
    # Its annotators (0.5 gold per 10 words) perceive 2 + 0.5 x 4 / 10.
    assert row["annotator_gain"] == pytest.approx(2.2)


def _records(words_ppo, gold_slope):
    """Three prompts, two samples each; every method's gold is `gold_slope` per word."""
    sft_words = [[4, 6], [5, 5], [4, 4]]
    rec = {"sft": {"gold": [[0.1 * w for w in ws] for ws in sft_words], "words": sft_words, "kl_to_sft": 0.0}}
    for m in E.METHODS:
        words = words_ppo
        rec[m] = {"gold": [[gold_slope * w for w in ws] for ws in words], "words": words, "kl_to_sft": 1.0}
    return rec


def test_seed_rows_compare_the_arms_per_prompt():
    arms = {
        "unbiased": _records([[5, 7], [6, 6], [5, 5]], 0.1),
        "length_biased": _records([[9, 11], [10, 12], [9, 10]], 0.1),
    }
    rows = E.seed_rows(0, arms)
    checks = {r["method"]: r for r in rows if r.get("check") == "arms"}
    assert set(checks) == set(E.METHODS)
    c = checks["ppo"]
    # Per prompt the biased policy writes 4, 5 and 4.5 more words: mean 4.5, interval 4.5 +- 4.303 x 0.5 / sqrt 3.
    assert c["longer_by"] == pytest.approx(4.5) and c["longer"]
    assert c["longer_by_ci95_low"] == pytest.approx(4.5 - 4.303 * 0.5 / 3**0.5, abs=1e-3)
    # Gold is 0.1 per word everywhere, so the length part is 0.1 x delta words against SFT's 14 / 3 words:
    # 0.1 x (30.5 / 3 - 14 / 3) = 0.55 against 0.1 x (17 / 3 - 14 / 3) = 0.1.
    assert c["length_part_length_biased"] == pytest.approx(0.55)
    assert c["length_part_unbiased"] == pytest.approx(0.1) and c["more_is_length"]
    per_arm = [r for r in rows if "check" not in r]
    assert [(r["arm"], r["method"]) for r in per_arm] == [(a, m) for a in E.ARMS for m in E.METHODS]


def _check(seed, method, longer, more):
    return {"seed": seed, "method": method, "check": "arms", "longer": longer, "more_is_length": more}


def test_verdict_rule():
    every = [_check(s, m, True, True) for s in (0, 1) for m in E.METHODS]
    assert E.decide(every) == "reproduced"
    assert E.decide([*every[:-1], _check(1, "dpo", True, False)]) == "partly reproduced"  # longer everywhere
    one = [_check(0, "ppo", True, True), _check(0, "dpo", False, False)]
    assert E.decide(one) == "partly reproduced"
    assert E.decide([_check(0, "ppo", False, True), _check(0, "dpo", True, False)]) == "not reproduced"
    assert E.decide([]) == "not reproduced"


def test_overrides_checked_before_any_work():
    with pytest.raises(ConfigError, match="annotators.length_bias' is set by the experiment"):
        E.run([0], "unused", overrides=["annotators.length_bias=1.0"])
    with pytest.raises(ConfigError, match="does not run; it takes sft., rm., ppo., dpo., data., annotators."):
        E.run([0], "unused", overrides=["grpo.optim.lr=1e-4"])
    with pytest.raises(
        ConfigError, match="unknown key 'eval.curve_points'; known: eval.prompts, eval.samples"
    ):
        E.run([0], "unused", overrides=["eval.curve_points=3"])
    with pytest.raises(ConfigError, match="positive integer"):
        E.run([0], "unused", overrides=["eval.samples=0"])
    with pytest.raises(ConfigError, match="ppo"):  # the pipeline's own checks run before any work
        E.run([0], "unused", overrides=["ppo.algo.no_such_key=1"])


TINY = [
    "data.n_sft=32", "data.n_pairs=64", "data.n_prompts=16", "data.n_heldout=8", "eval.prompts=4",
    "eval.samples=2", "sft.model.name_or_path=lab:sentiment:tiny", "sft.optim.max_steps=2", "rm.optim.max_steps=2",
    "rm.data.eval_fraction=0.25", "dpo.optim.max_steps=2", "ppo.algo.iterations=2", "ppo.algo.rollout_batch_size=8",
    "ppo.algo.minibatch_size=4",
]  # fmt: skip


@pytest.mark.slow  # two pipelines and a resume: about a minute on 2 cores
def test_tiny_run_writes_the_result(tmp_path, tiny_lab_cache):
    from rlhflab.cli import main

    out = tmp_path / "exp"
    assert main(["experiment", "length", *TINY, "--seeds", "0", "--output-dir", str(out)]) == 0
    result = json.loads((out / "result.json").read_text())
    assert result["verdict"] == E.decide(result["table"]) and result["experiment"] == "length"
    arms = {}
    for arm, bias in E.ARMS.items():  # each arm's annotators, as the data manifest recorded them
        manifest = json.loads((out / "seed-0" / arm / "run" / "data" / "lab_data.json").read_text())
        assert manifest["annotators"]["length_bias"] == bias
        arms[arm] = json.loads((out / "seed-0" / arm / "samples.json").read_text())
        assert set(arms[arm]) == {"sft", *E.METHODS}
        assert len(arms[arm]["sft"]["gold"]) == 4 and all(len(g) == 2 for g in arms[arm]["ppo"]["gold"])
    # The table is the one the saved samples give (so it was computed from them, each against its own arm).
    expected = _clean(E.seed_rows(0, arms))  # as result.json writes them: NaN as null
    assert len(result["table"]) == len(expected) + len(E.ARMS) * len(E.METHODS)  # then the summary rows
    for got, want in zip(result["table"], expected):
        assert got == pytest.approx(want)
    assert (out / "length_and_gain.png").exists() and (out / "report.html").exists()
    # --resume reads the samples back instead of training again.
    assert main(["experiment", "length", *TINY, "--seeds", "0", "--output-dir", str(out), "--resume"]) == 0
    assert json.loads((out / "result.json").read_text())["table"] == result["table"]
