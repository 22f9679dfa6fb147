"""`rlhflab experiment rm-ensembles`: the best-of-n estimator, the drops and the verdict rule by hand, the checks on
overrides, and a tiny run through the command line."""

from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pytest
import torch
import yaml

from rlhflab.cli import main
from rlhflab.errors import ConfigError
from rlhflab.experiments import rm_ensembles as E


def test_aggregate_is_the_loss_functions():
    from rlhflab.losses.combine import ensemble_min, ensemble_uwo

    members = np.array([[[1.0, 4.0]], [[3.0, 2.0]], [[2.0, 0.0]]])  # [K=3, P=1, N=2]
    assert E.aggregate("single", members).tolist() == [[1.0, 4.0]]
    assert E.aggregate("mean", members).tolist() == [[2.0, 2.0]]
    assert E.aggregate("wco", members).tolist() == [[1.0, 0.0]]
    np.testing.assert_allclose(E.aggregate("uwo", members), [[5.0 / 3.0, 2.0 / 3.0]])  # variances 2/3, 8/3
    flat = torch.tensor(members.reshape(3, -1))
    np.testing.assert_allclose(E.aggregate("wco", members).reshape(-1), ensemble_min(flat).numpy())
    np.testing.assert_allclose(
        E.aggregate("uwo", members).reshape(-1), ensemble_uwo(flat, E.UWO_COEF).numpy()
    )


def test_bon_drop_by_hand():
    """Three prompts x n = 1, 2, 4: per-prompt gold (0.1, 0.5, 0.3), (0.3, 0.7, 0.3), (0.2, 0.6, 0.3); means
    (0.2, 0.6, 0.3): peak 0.6 at n = 2, end 0.3, drop 0.3. Paired differences (0.2, 0.4, 0.3): sd 0.1, half-width
    t(2) 4.302653 x 0.1 / sqrt(3) = 0.248417 < 0.3, so the interval is above 0: over-optimizes."""
    per_prompt = np.array([[0.1, 0.5, 0.3], [0.3, 0.7, 0.3], [0.2, 0.6, 0.3]])
    curve = {
        "n": [1, 2, 4],
        "gold": per_prompt.mean(axis=0).tolist(),
        "gold_ci95": [0.0, 0.0, 0.05],
        "proxy": [0.0, 1.0, 2.0],
        "kl_bound": [0.0, math.log(2) - 0.5, math.log(4) - 0.75],
        "per_prompt": per_prompt,
    }
    d = E.bon_drop(curve)
    assert d["peak_at"] == 2 and d["gold_peak"] == pytest.approx(0.6) and d["gold_end"] == pytest.approx(0.3)
    assert d["gold_drop"] == pytest.approx(0.3) and d["gold_drop_ci95"] == pytest.approx(0.248417, abs=1e-6)
    assert d["overoptimizes"] and d["proxy_end"] == 2.0 and d["gold_end_ci95"] == 0.05
    # Two prompts only: differences (0.2, 0.4), half-width t(1) 12.706205 x 0.141421 / sqrt(2) = 1.27 > 0.3.
    two = {**curve, "per_prompt": per_prompt[:2], "gold": per_prompt[:2].mean(axis=0).tolist()}
    assert not E.bon_drop(two)["overoptimizes"]
    # A curve that peaks at its end has no drop.
    rising = {**curve, "per_prompt": per_prompt[:, [0, 2, 1]], "gold": [0.2, 0.3, 0.6]}
    assert E.bon_drop(rising)["gold_drop"] == 0.0 and E.bon_drop(rising)["gold_drop_ci95"] == 0.0


def _curve(golds):
    return [
        {"step": i + 1, "gold/mean": g, "reward/score": float(i), "kl/ref": 1.0} for i, g in enumerate(golds)
    ]


def test_ppo_drop_by_hand():
    """Windows of 10: (0.6, 0.4) x 5, mean 0.5, then (0.35, 0.25) x 5, mean 0.3: drop 0.2. Variances (ddof 1):
    10 x 0.1^2 / 9 = 0.011111 and 10 x 0.05^2 / 9 = 0.0027778; se sqrt(0.0011111 + 0.00027778) = 0.0372678;
    half-width t(18) 2.100922 x se = 0.078296."""
    d = E.ppo_drop(_curve([0.6, 0.4] * 5 + [0.35, 0.25] * 5))
    assert d["gold_peak"] == pytest.approx(0.5) and d["gold_end"] == pytest.approx(0.3)
    assert d["gold_drop"] == pytest.approx(0.2) and d["gold_drop_ci95"] == pytest.approx(0.078296, abs=1e-6)
    assert d["overoptimizes"] and d["peak_at"] == 0 and d["proxy_end"] == pytest.approx(14.5)
    assert E.ppo_drop(_curve([0.1] * 10 + [0.3] * 10))["gold_drop"] == 0.0  # rising: no drop
    assert not E.ppo_drop(_curve([0.5] * 10 + [0.46] * 10))["overoptimizes"]  # 0.04 is within 0.05


def _rows(seed, optimizer, drops, single_over=True):
    return [
        {
            "seed": seed,
            "optimizer": optimizer,
            "arm": arm,
            "gold_drop": d,
            "overoptimizes": arm == "single" and single_over,
        }
        for arm, d in zip(E.ARMS, drops)
    ]


def test_verdict_rule():
    # drops of (single, mean, wco, uwo)
    full = _rows(0, "best_of_n", (0.2, 0.1, 0.05, 0.0)) + _rows(0, "ppo", (0.1, 0.08, 0.02, 0.03))
    assert E.decide(full) == "reproduced"
    assert E.decide(
        full + _rows(1, "best_of_n", (0.2, 0.1, 0.05, 0.0)) + _rows(1, "ppo", (0.1, 0.1, 0.1, 0.0))
    ) == ("partly reproduced")  # seed 1, PPO: WCO's drop equals the single model's, so it does not help there
    # WCO below the single model but above the mean: helps, not fully.
    assert E.decide(
        _rows(0, "best_of_n", (0.2, 0.1, 0.15, 0.0)) + _rows(0, "ppo", (0.1, 0.08, 0.02, 0.03))
    ) == ("partly reproduced")
    assert E.helps({r["arm"]: r for r in _rows(0, "ppo", (0.2, 0.1, 0.15, 0.0))}) == {
        "single_overoptimizes": True,
        "helps": True,
        "helps_fully": False,
    }
    # The single model does not over-optimize: nothing to reduce, whatever the other drops.
    calm = _rows(0, "best_of_n", (0.01, 0.02, 0.0, 0.0), False) + _rows(
        0, "ppo", (0.03, 0.04, 0.0, 0.0), False
    )
    assert E.decide(calm) == "not reproduced"
    worse = _rows(0, "best_of_n", (0.2, 0.1, 0.3, 0.0)) + _rows(0, "ppo", (0.1, 0.05, 0.2, 0.2))
    assert E.decide(worse) == "not reproduced"
    # Only one optimizer's rows: at most partly.
    assert E.decide(_rows(0, "best_of_n", (0.2, 0.1, 0.05, 0.0))) == "partly reproduced"


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("annotators.noise=0.1", "annotators.noise is set by this experiment"),
        ("ppo.algo.reward_combine=ensemble_min", "ppo.algo.reward_combine is set by this experiment"),
        ("ppo.algo.uwo_coef=2", "ppo.algo.uwo_coef is set by this experiment"),
        ("dpo.algo.beta=0.2", "section 'dpo' is for a method this experiment does not run"),
        ("ensemble.size=3", "unknown key 'ensemble.size'"),
        ("ensemble.members=1", "ensemble.members must be >= 2"),
        ("ensemble.n_max=24", "must be a power of 2"),
        ("ensemble.bon_prompts=0", "must be a positive integer"),
        ("ppo.algo.minibatch_size=7", "algo.minibatch_size"),
        ("rm.algo.normalization_samples=0", "the members are whitened"),
    ],
)
def test_bad_overrides_are_refused_before_any_work(tmp_path, override, message):
    with pytest.raises(ConfigError, match=message):
        E.run([0], str(tmp_path / "x"), overrides=[override])
    assert not (tmp_path / "x").exists()


def test_settings_split_the_overrides():
    pipeline, ppo, settings = E.user_settings(
        ["rm.optim.lr=1e-3", "ppo.algo.iterations=5", "ensemble.n_max=8"]
    )
    assert pipeline == ["rm.optim.lr=1e-3"] and ppo == ["ppo.algo.iterations=5"]
    assert settings == {**E.SETTINGS, "n_max": 8}
    assert E.reward_overrides("single", ["a", "b"]) == ['algo.reward_model=["a:normalize=true"]']
    assert E.reward_overrides("uwo", ["a", "b"]) == [
        'algo.reward_model=["a:normalize=true", "b:normalize=true"]',
        "algo.reward_combine=ensemble_uwo",
        f"algo.uwo_coef={E.UWO_COEF}",
    ]


TINY = [
    "data.n_sft=32", "data.n_pairs=64", "data.n_prompts=16", "data.n_heldout=8", "eval.prompts=4", "eval.samples=2",
    "eval.curve_points=1", "eval.curve_prompts=2", "eval.rm_pairs=16", "sft.model.name_or_path=lab:sentiment:tiny",
    "sft.optim.max_steps=2", "rm.optim.max_steps=2", "rm.data.eval_fraction=0.25", "ppo.algo.iterations=2",
    "ppo.algo.rollout_batch_size=8", "ppo.algo.minibatch_size=4", "ensemble.members=2", "ensemble.bon_prompts=3",
    "ensemble.n_max=4", "ensemble.eval_prompts=4",
]  # fmt: skip


def _first_rollouts(run_dir):
    rows = [json.loads(line) for line in (run_dir / "rollouts.jsonl").read_text().splitlines()]
    return [r for r in rows if r["iteration"] == rows[0]["iteration"]]


@pytest.mark.slow
def test_tiny_run_writes_the_result(tmp_path, tiny_lab_cache):
    out = tmp_path / "exp"
    assert main(["experiment", "rm-ensembles", *TINY, "--seeds", "0", "--output-dir", str(out)]) == 0
    result = json.loads((out / "result.json").read_text())
    drops = [r for r in result["table"] if r.get("optimizer") in E.OPTIMIZERS]
    assert result["verdict"] == E.decide(drops) and result["rule"] == E.RULE
    assert sorted((r["optimizer"], r["arm"]) for r in drops) == sorted(
        itertools.product(E.OPTIMIZERS, E.ARMS)
    )
    assert (out / "best_of_n_gold.png").exists() and (out / "ppo_gold.png").exists()
    manifest = json.loads((out / "seed-0" / "run" / "data" / "lab_data.json").read_text())
    assert manifest["annotators"]["noise"] == E.NOISE
    seed = json.loads((out / "seed-0" / "seed.json").read_text())
    bon = seed["best_of_n"]
    assert bon["single"]["n"] == [1, 2, 4]
    for arm in (
        E.ARMS
    ):  # best-of-1 is plain sampling, whoever picks; a pick by min or UWO never scores above the mean
        assert bon[arm]["gold"][0] == pytest.approx(bon["single"]["gold"][0])
    for arm in E.CONSERVATIVE:
        assert all(a <= b + 1e-9 for a, b in zip(bon[arm]["proxy"], bon["mean"]["proxy"]))
    # PPO: every arm drew the same first rollouts (same seed, same SFT model), each scored by its own aggregation
    # of the whitened members, as the pure functions compute it from the members' own scores.
    members = E.load_members(E.member_dirs(out / "seed-0", 2))
    first = {arm: _first_rollouts(out / "seed-0" / f"ppo-{arm}" / "ppo") for arm in E.ARMS}
    texts = [r["response"] for r in first["single"]]
    scores = E.member_scores(members, [r["prompt"] for r in first["single"]], texts)
    for arm, rows in first.items():
        assert [r["response"] for r in rows] == texts
        np.testing.assert_allclose([r["score"] for r in rows], E.aggregate(arm, scores), rtol=1e-4, atol=1e-4)
    member_config = yaml.safe_load((out / "seed-0" / "member-1" / "rm" / "config.yaml").read_text())
    assert member_config["seed"] == E.member_seed(0, 1) != 0
