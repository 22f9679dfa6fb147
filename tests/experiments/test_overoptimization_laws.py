"""`rlhflab experiment overoptimization-laws`: the curves by hand, the fits on known forms, the verdict rule, a
tiny run."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from rlhflab.cli import main
from rlhflab.errors import ConfigError
from rlhflab.experiments import overoptimization_laws as E


def test_best_of_n_curve_by_hand():
    # One prompt, a pool of 4: proxy ranks the samples 0 < 2 < 3 < 1, gold 0.1, 0.0, 0.5, 0.9.
    proxy, gold = np.array([[0.0, 3.0, 1.0, 2.0]]), np.array([[0.1, 0.0, 0.5, 0.9]])
    curve = E.best_of_n_curve(proxy, gold)
    assert [p["n"] for p in curve] == [1, 2, 4]
    # n = 1: the mean, 0.375; n = 2: the pick of each of the 6 pairs by proxy, gold 0.5 (1 pair), 0.9 (2),
    # 0.0 (3): (0.5 + 1.8) / 6; n = 4: the proxy's top, gold 0.0. Proxy: 1.5, (1 + 4 + 9) / 6, 3.
    assert [p["gold"] for p in curve] == pytest.approx([0.375, 2.3 / 6, 0.0])
    assert [p["proxy"] for p in curve] == pytest.approx([1.5, 14 / 6, 3.0])
    assert [p["d"] for p in curve] == pytest.approx(
        [0.0, math.sqrt(math.log(2) - 0.5), math.sqrt(math.log(4) - 0.75)]
    )


def test_rl_curve_averages_windows_and_clips_negative_kl():
    points = [{"step": i + 1, "gold/mean": g, "reward/score": 2 * g, "kl/ref": k} for i, (g, k) in
              enumerate(zip([0.1, 0.3, 0.5, 0.7, 0.9], [-0.2, 0.0, 1.0, 3.0, 9.0]))]  # fmt: skip
    curve = E.rl_curve(points, window=2)  # the fifth point is a shorter last window: dropped
    assert [p["step"] for p in curve] == [2, 4]
    assert [p["d"] for p in curve] == pytest.approx([0.0, math.sqrt(2.0)])  # mean KL -0.1 clipped to 0
    assert [p["gold"] for p in curve] == pytest.approx([0.2, 0.6])
    assert [p["proxy"] for p in curve] == pytest.approx([0.4, 1.2])


def test_fit_row_finds_the_peak_of_a_known_form():
    d = np.linspace(0.25, 3.0, 12)
    bon = [{"d": x, "gold": 0.5 + x * (1.0 - 0.25 * x)} for x in d]  # peak at 2, inside [0, 3]
    row = E.fit_row("best_of_n", bon, gold0=0.5)
    assert (row["alpha"], row["beta"], row["d_peak"]) == pytest.approx((1.0, 0.25, 2.0))
    assert row["overoptimizes"] and row["d_max"] == pytest.approx(3.0)
    rl = [{"d": x, "gold": x * (1.0 - 0.5 * math.log(x))} for x in d]  # peak at e: inside [0, 3]
    assert E.fit_row("rl", rl, gold0=0.0)["overoptimizes"]
    short = [p for p in rl if p["d"] < 2.0]  # measured only up to 2: the peak e lies beyond
    assert not E.fit_row("rl", short, gold0=0.0)["overoptimizes"]
    still = E.fit_row("rl", [{"d": 0.0, "gold": 0.1}, {"d": 0.5, "gold": 0.2}], gold0=0.0)  # one point past 0
    assert math.isnan(still["alpha"]) and not still["overoptimizes"] and still["gold_gain_best"] == 0.2


def _fit(seed, method, size, over, peak):
    return {"seed": seed, "method": method, "size": size, "overoptimizes": over, "d_peak": peak}


def _seed(seed, small_over=True, peaks=(1.0, 2.0, math.inf), methods=E.METHODS):
    return [_fit(seed, m, s, small_over if s == "small" else False, p) for m in methods for s, p in
            zip(E.SIZES, peaks)]  # fmt: skip


def test_verdict_rule():
    assert E.decide(_seed(0) + _seed(1)) == "reproduced"
    # The peak moves in with size on seed 1: the scaling half fails there, the over-optimization half holds.
    assert E.decide(_seed(0) + _seed(1, peaks=(2.0, 1.0, 3.0))) == "partly reproduced"
    # The smallest never over-optimizes, but peaks grow with size everywhere: partly.
    assert E.decide(_seed(0, small_over=False)) == "partly reproduced"
    assert E.decide(_seed(0, small_over=False, peaks=(3.0, 2.0, 1.0))) == "not reproduced"
    # A failed fit (d_peak NaN, null in result.json) moves out nowhere, whichever way the table was read.
    for failed in (float("nan"), None):
        rows = [{**r, "d_peak": failed} if r["size"] == "medium" else r for r in _seed(0)]
        assert E.decide(rows) == "partly reproduced"


def test_overrides_split_and_checked():
    pipeline, user, pool, budget = E.user_sections(
        [
            "sft.optim.lr=1e-4",
            "rm.optim.epochs=1",
            "ppo.algo.iterations=5",
            "pool.samples=64",
            "proxies.pretrain=tiny",
        ]
    )
    assert pipeline == ["sft.optim.lr=1e-4"] and budget == "tiny"
    assert user == {"rm": {"optim": {"epochs": 1}}, "ppo": {"algo": {"iterations": 5}}}
    assert pool == {"prompts": 32, "samples": 64}
    for bad, match in [("dpo.optim.lr=1", "does not run"), ("pool.samples=1", ">= 2"),
                       ("proxies.pretrain=big", "default, tiny")]:  # fmt: skip
        with pytest.raises(ConfigError, match=match):
            E.user_sections([bad])


def test_stage_keys_are_checked_before_any_work(tmp_path):
    for bad in ("ppo.algo.kl_coeff=0.1", "rm.optim.lr=-1"):
        with pytest.raises(ConfigError):
            E.run(overrides=[bad], output_dir=str(tmp_path / "never"))
    assert not (tmp_path / "never").exists()


@pytest.mark.slow
def test_tiny_run_writes_the_result(tmp_path, tiny_lab_cache):
    tiny = [
        "data.n_sft=32", "data.n_pairs=64", "data.n_prompts=16", "data.n_heldout=8", "eval.prompts=4",
        "eval.samples=2", "sft.model.name_or_path=lab:sentiment:tiny", "sft.optim.max_steps=2",
        "rm.optim.max_steps=2", "rm.data.eval_fraction=0.25", "ppo.algo.iterations=10",
        "ppo.algo.rollout_batch_size=8", "ppo.algo.minibatch_size=4", "pool.prompts=2", "pool.samples=8",
        "proxies.pretrain=tiny",
    ]  # fmt: skip
    out = tmp_path / "exp"
    args = ["experiment", "overoptimization-laws", *tiny, "--seeds", "0", "--output-dir", str(out)]
    assert main(args) == 0
    result = json.loads((out / "result.json").read_text())
    assert result["verdict"] == E.decide(result["table"])
    assert {(r["method"], r["size"]) for r in result["table"]} == {(m, s) for m in E.METHODS for s in E.SIZES}
    seed = json.loads((out / "seed-0" / "seed.json").read_text())
    assert [p["n"] for p in seed["curves"]["best_of_n"]["small"]] == [1, 2, 4, 8]
    # n = 1 is a uniform draw: its gold is the pool's mean for every proxy.
    assert {round(c[0]["gold"], 9) for c in seed["curves"]["best_of_n"].values()} == {
        round(seed["gold_sft"], 9)
    }
    assert [p["step"] for p in seed["curves"]["rl"]["large"]] == [5, 10]  # windows of 5 iterations
    # Each proxy came from a base of its own width.
    widths = {
        s: json.loads((out / "seed-0" / s / "rm" / "final" / "config.json").read_text()).get("hidden_size")
        for s in E.SIZES
    }
    assert widths == E.SIZES
    assert (out / "gold_vs_d.png").is_file()
