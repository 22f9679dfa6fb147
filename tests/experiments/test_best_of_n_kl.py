"""`rlhflab experiment best-of-n-kl`: the KL rows from a pool, the agreement and verdict rules, a tiny run."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from rlhflab.cli import main
from rlhflab.errors import ConfigError
from rlhflab.experiments import best_of_n_kl as E


def test_a_pool_of_rare_distinct_responses_gives_the_formula():
    # 512 distinct responses per prompt, each of probability 1e-9: only the reward ranks matter, and the subset
    # average of log n + (n - 1) log F, with E[log F] of each rank plugged in, is log n - (n - 1) / n.
    rng = np.random.default_rng(0)
    scores = rng.normal(size=(3, 512))
    rows = E.kl_rows(scores, np.full((3, 512), math.log(1e-9)))
    for row in rows:
        assert row["formula"] == pytest.approx(math.log(row["n"]) - (row["n"] - 1) / row["n"])
        assert row["kl"] == pytest.approx(row["formula"], rel=1e-3)
        assert E.agrees(row)


def test_a_pool_of_one_repeated_response_has_no_kl():
    # The policy writes the same response every time (p = 1, every score tied): best-of-n is the policy.
    rows = E.kl_rows(np.zeros((2, 64)), np.zeros((2, 64)), ns=(2, 64))
    assert [r["kl"] for r in rows] == pytest.approx([0.0, 0.0], abs=1e-12)
    assert not any(E.agrees(r) for r in rows)


def _row(seed, n, kl, lo, hi, arm="full"):
    return {"seed": seed, "arm": arm, "n": n, "kl": kl, "kl_ci95": [lo, hi], "formula": 1.0}


def test_agreement_and_verdict_rule():
    assert E.agrees(_row(0, 2, 0.8, 0.7, 1.1))  # inside the interval
    assert E.agrees(_row(0, 2, 0.97, 0.96, 0.98))  # outside, but within 5% of the mean
    assert not E.agrees(_row(0, 2, 0.9, 0.85, 0.95))
    inside = [_row(0, 2, 1.0, 0.9, 1.1), _row(1, 2, 1.0, 0.9, 1.1)]
    short = [_row(0, 2, 0.1, 0.0, 0.2, arm="short")]  # the short arm never decides
    assert E.decide(inside + short) == "reproduced"
    below = [_row(0, 2, 0.8, 0.7, 0.9), _row(0, 4, 0.8, 0.7, 0.9)]
    assert E.decide(below) == "partly reproduced"  # an upper bound everywhere
    assert (
        E.decide([_row(0, 2, 1.0, 0.9, 1.1), _row(0, 4, 1.5, 1.4, 1.6)]) == "partly reproduced"
    )  # half agree
    assert E.decide([_row(0, 2, 1.5, 1.4, 1.6), _row(0, 4, 0.8, 0.7, 0.9)]) == "not reproduced"


def test_overrides_split_and_checked():
    pipeline, pool = E.user_sections(["rm.optim.lr=1e-4", "pool.prompts=8", "data.n_pairs=100"])
    assert pipeline == ["rm.optim.lr=1e-4", "data.n_pairs=100"] and pool == {"prompts": 8, "samples": 512}
    with pytest.raises(ConfigError, match="does not run"):
        E.user_sections(["ppo.optim.lr=1e-4"])
    with pytest.raises(ConfigError, match="at least 64"):
        E.user_sections(["pool.samples=32"])
    with pytest.raises(ConfigError, match="pool.prompts, pool.samples"):
        E.user_sections(["pool.size=3"])


def test_tiny_run_writes_the_result(tmp_path, tiny_lab_cache):
    tiny = [
        "data.n_sft=32", "data.n_pairs=64", "data.n_prompts=16", "data.n_heldout=8", "eval.prompts=4",
        "eval.samples=2", "sft.model.name_or_path=lab:sentiment:tiny", "sft.optim.max_steps=2",
        "rm.optim.max_steps=2", "rm.data.eval_fraction=0.25", "pool.prompts=2", "pool.samples=64",
    ]  # fmt: skip
    out = tmp_path / "exp"
    assert main(["experiment", "best-of-n-kl", *tiny, "--seeds", "0", "--output-dir", str(out)]) == 0
    result = json.loads((out / "result.json").read_text())
    assert result["experiment"] == "best-of-n-kl" and result["verdict"] == E.decide(result["table"])
    rows = result["table"]
    assert [(r["arm"], r["n"]) for r in rows] == [(a, n) for a in E.ARMS for n in E.NS]
    for r in rows:
        assert r["kl_ci95"][0] <= r["kl"] <= r["kl_ci95"][1] and 0 <= r["kl"] <= math.log(r["n"]) + 1e-9
    short = {r["n"]: r for r in rows if r["arm"] == "short"}
    full = {r["n"]: r for r in rows if r["arm"] == "full"}
    # Three tokens repeat far more often than twenty, and the measured KL is then further below the formula.
    assert short[2]["repeated_samples"] > full[2]["repeated_samples"]
    assert short[64]["formula"] - short[64]["kl"] > full[64]["formula"] - full[64]["kl"]
    assert (out / "kl_vs_n.png").is_file() and (out / "report.html").is_file()
