"""`rlhflab experiment alpacafarm`: the chain of the claim, the ranking against AlpacaFarm's, the verdict rule, the
win rates against the reference, and a tiny run."""

from __future__ import annotations

import math

import numpy as np
import pytest

from rlhflab.errors import ConfigError
from rlhflab.experiments import alpacafarm as E
from rlhflab.lab.evaluate import score_responses
from rlhflab.lab.tasks import get_task


def _rows(**wins):
    return {m: {"win_rate": w, "win_rate_ci95": 0.04} for m, w in wins.items()}


ORDERED = dict(ppo=0.60, dpo=0.58, best_of_64=0.50, expert_iteration=0.45, sft=0.40)


def test_chain_of_the_claim():
    assert E.chain_holds(_rows(**ORDERED)) == {"ppo_similar_to_dpo": True, "ordered": True, "chain": True}
    # PPO and DPO 0.06 apart: more than hypot(0.04, 0.04) = 0.057, so not "PPO ~ DPO", though ordered.
    check = E.chain_holds(_rows(**{**ORDERED, "dpo": 0.54}))
    assert check == {"ppo_similar_to_dpo": False, "ordered": True, "chain": False}
    assert E.chain_holds(_rows(**{**ORDERED, "dpo": 0.544}))["ppo_similar_to_dpo"]  # 0.056 < 0.0566
    # Best-of-64 above DPO: the order fails.
    assert not E.chain_holds(_rows(**{**ORDERED, "best_of_64": 0.59}))["ordered"]
    # Expert iteration no better than SFT (a tie is not ">").
    assert not E.chain_holds(_rows(**{**ORDERED, "expert_iteration": 0.40}))["ordered"]


def test_ranking_correlation_with_alpacafarm():
    # The same order as AlpacaFarm's, whose PPO = DPO tie takes rank 7.5 for both: ranks 1..8 against
    # 1..6, 7.5, 7.5. Deviations from 4.5: covariance 41.5, variances 42 and 41.5, r = sqrt(41.5 / 42).
    wins = dict(ppo=0.6, dpo=0.55, best_of_64=0.5, expert_iteration=0.45, sft=0.4, feedme=0.35, quark=0.3)
    wins["reward_conditioning"] = 0.25
    assert E.ranking_correlation(wins) == pytest.approx(math.sqrt(41.5 / 42))
    # Methods without an AlpacaFarm row (RLOO, best-of-16) do not enter; reversed order: r = -sqrt(41.5 / 42).
    reverse = {m: -w for m, w in wins.items()} | {"rloo": 9.0, "best_of_16": 9.0}
    assert E.ranking_correlation(reverse) == pytest.approx(-math.sqrt(41.5 / 42))


def test_verdict_rule():
    held, failed = {"chain": True}, {"chain": False}
    assert E.decide({0: held, 1: held}, spearman=-1.0) == "reproduced"
    assert E.decide({0: held, 1: failed}, spearman=-1.0) == "partly reproduced"
    assert E.decide({0: failed}, spearman=0.5) == "partly reproduced"
    assert E.decide({0: failed}, spearman=0.49) == "not reproduced"
    assert E.decide({0: failed}, spearman=float("nan")) == "not reproduced"


def test_win_rate_against_the_reference_by_hand():
    task = get_task("sentiment")
    prompts = ["review the film .", "review the book ."]
    # Gold of the texts below, by prompt: the policy's two samples against the reference's two.
    good, bad = "it was great .", "it was bad ."
    policy = score_responses(task, prompts, [[good, good], [bad, good]])
    reference = score_responses(task, prompts, [[bad, bad], [good, bad]])
    row = E.win_row(policy, reference)
    # Prompt 1: both samples beat both reference samples: 1. Prompt 2: bad vs (good, bad) = 0, 1/2; good vs
    # (good, bad) = 1/2, 1: mean 1/2. Mean over prompts 3/4.
    assert row["win_rate"] == pytest.approx(0.75)
    assert row["gold_reward_mean"] == pytest.approx(policy.gold.mean())
    assert row["win_rate_ci95"] > 0


def test_reference_is_the_demonstrator():
    task = get_task("sentiment")
    prompts = task.heldout_prompts(4, seed=0)
    ref = E.reference_samples(task, prompts, 3, seed=0)
    assert ref.gold.shape == (4, 3)
    for j in range(3):  # each draw is the demonstrator's answer under its own seed
        draw = task.demonstrations(prompts, seed=10_000 + j)
        assert [r[j] for r in ref.responses] == draw
    assert not np.array_equal(ref.gold, E.reference_samples(task, prompts, 3, seed=1).gold)


def test_overrides_split_and_checked():
    pipeline, ev = E.user_sections(["ppo.optim.lr=1e-4", "eval.prompts=8", "data.n_pairs=100"])
    assert pipeline == ["ppo.optim.lr=1e-4", "data.n_pairs=100"] and ev == {"prompts": 8, "samples": 2}
    with pytest.raises(ConfigError, match="eval.curve_points"):
        E.user_sections(["eval.curve_points=3"])
    with pytest.raises(ConfigError, match="positive integer"):
        E.user_sections(["eval.samples=0"])


TINY = [
    "data.n_sft=32", "data.n_pairs=64", "data.n_prompts=16", "data.n_heldout=8", "eval.prompts=4",
    "eval.samples=2", "sft.model.name_or_path=lab:sentiment:tiny", "sft.optim.max_steps=2", "rm.optim.max_steps=2",
    "rm.data.eval_fraction=0.25", "feedme.optim.max_steps=2", "dpo.optim.max_steps=2",
    "expert_iteration.algo.prompts_per_round=4", "expert_iteration.algo.samples_per_prompt=2",
    "expert_iteration.algo.eval_prompts=2", "ppo.algo.iterations=2", "ppo.algo.rollout_batch_size=8",
    "ppo.algo.minibatch_size=4", "rloo.algo.iterations=2", "rloo.algo.prompts_per_iteration=4",
    "grpo.algo.iterations=2", "grpo.algo.prompts_per_iteration=4", "online_dpo.algo.iterations=2",
    "online_dpo.algo.prompts_per_step=4",
    *(f"{q}.{k}" for q in ("quark", "reward_conditioning") for k in (
        "algo.iterations=1", "algo.prompts_per_iteration=4", "algo.samples_per_prompt=2", "algo.eval_prompts=2",
        "optim.batch_size=4")),
    "quark.optim.steps_per_iteration=2",
]  # fmt: skip


@pytest.mark.slow
def test_tiny_alpacafarm_run_writes_the_result(tmp_path, tiny_lab_cache):
    import json

    from rlhflab.cli import main

    out = tmp_path / "exp"
    assert main(["experiment", "alpacafarm", *TINY, "--seeds", "0", "--output-dir", str(out)]) == 0
    result = json.loads((out / "result.json").read_text())
    rows = {r["method"]: r for r in result["table"] if r.get("seed") == 0 and "win_rate" in r}
    assert set(rows) == set(E.TITLES)
    for row in rows.values():
        assert {"win_rate", "win_rate_ci95", "gold_reward_mean", "kl_to_sft", "label_queries"} <= set(row)
        assert 0 <= row["win_rate"] <= 1
    assert rows["best_of_64"]["kl_to_sft"] == pytest.approx(math.log(64) - 63 / 64)
    # Quark's KL is measured (read on the plain prompt), and it cost the reward model's pairs.
    assert math.isfinite(rows["quark"]["kl_to_sft"]) and rows["quark"]["kl_to_sft"] != 0
    assert rows["quark"]["label_queries"] == rows["ppo"]["label_queries"] > 0
    assert rows["sft"]["label_queries"] == 0 and rows["dpo"]["label_queries"] > 0
    assert rows["ppo"]["alpacafarm_win_rate"] == pytest.approx(0.468)
    chain = next(r for r in result["table"] if r.get("check") == "chain")
    assert chain["chain"] == E.chain_holds(rows)["chain"]
    assert result["verdict"] in ("reproduced", "partly reproduced", "not reproduced")
    # Quark was sampled behind its best token: its quark.json names it, and the stage's config is the wiring's.
    from rlhflab.config import load_config

    run = out / "seed-0" / "run"
    cfg = load_config("quark", run / "reward_conditioning" / "config.yaml")
    assert cfg.algo.n_quantiles == 2 and cfg.algo.reward_model == [str(run / "rm" / "final")]
    assert (run / "quark" / "final" / "quark.json").is_file() and (out / "win_rates.png").exists()
