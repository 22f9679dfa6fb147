"""`rlhflab experiment pluralism`: each group's gold of each policy's pick and the verdict rule by hand, the checks
on overrides, and a tiny run through the command line whose saved pool is re-scored here, so scoring a group with
the wrong tag or a policy with the wrong reward model fails."""

from __future__ import annotations

import json

import numpy as np
import pytest

from rlhflab.cli import main
from rlhflab.errors import ConfigError
from rlhflab.experiments import pluralism as E


def test_policy_gold_by_hand():
    """One prompt, a pool of 3, n = 3 (the pick is the argmax). Scores: bt prefers sample 0, dpl_mean sample 1,
    dpl_risk_averse sample 2, conditioned/majority sample 0 and conditioned/minority sample 2."""
    gold = {"majority": np.array([[0.9, 0.1, -0.5]]), "minority": np.array([[-0.9, 0.2, 0.6]])}
    scores = {
        "bt": np.array([[3.0, 2.0, 1.0]]),
        "dpl_mean": np.array([[1.0, 3.0, 2.0]]),
        "dpl_risk_averse": np.array([[0.0, 1.0, 2.0]]),
        "conditioned/majority": np.array([[5.0, 0.0, 1.0]]),
        "conditioned/minority": np.array([[0.0, 1.0, 4.0]]),
    }
    got = E.policy_gold(scores, gold, n=3)
    assert got["sft"]["majority"][0] == pytest.approx(0.5 / 3) and got["sft"]["minority"][0] == pytest.approx(
        -0.1 / 3
    )
    assert (got["bt"]["majority"][0], got["bt"]["minority"][0]) == (0.9, -0.9)
    assert (got["dpl_mean"]["majority"][0], got["dpl_mean"]["minority"][0]) == (0.1, 0.2)
    assert (got["dpl_risk_averse"]["majority"][0], got["dpl_risk_averse"]["minority"][0]) == (-0.5, 0.6)
    # Each group's conditioned policy picks by its own tag's scores.
    assert (got["conditioned"]["majority"][0], got["conditioned"]["minority"][0]) == (0.9, 0.6)
    # n = 2 of 3: the best of each 2-subset by bt: {0,1} -> 0, {0,2} -> 0, {1,2} -> 1; majority (0.9 + 0.9 + 0.1) / 3.
    assert E.policy_gold(scores, gold, n=2)["bt"]["majority"][0] == pytest.approx(1.9 / 3)


def test_comparisons_by_hand():
    """Two prompts. Gains over SFT (0 gold): bt majority (1.0, 0.8), minority (-0.2, -0.4): gap (1.2, 1.2), sd 0,
    interval [1.2, 1.2]. Minority: conditioned (0.3, 0.1) - bt (-0.2, -0.4) = (0.5, 0.5)."""
    zero = np.zeros(2)
    per_prompt = {
        "sft": {"majority": zero, "minority": zero},
        "bt": {"majority": np.array([1.0, 0.8]), "minority": np.array([-0.2, -0.4])},
        "dpl_mean": {"majority": np.array([0.5, 0.1]), "minority": np.array([0.0, 0.0])},
        "dpl_risk_averse": {"majority": zero, "minority": zero},
        "conditioned": {"majority": np.array([1.0, 0.8]), "minority": np.array([0.3, 0.1])},
    }
    rows = {r["comparison"]: r for r in E.comparison_rows(0, per_prompt)}
    assert rows["gap/bt"]["diff"] == pytest.approx(1.2) and rows["gap/bt"]["ci95_low"] == pytest.approx(1.2)
    assert rows["gap/bt"]["holds"] and rows["gap/sft"]["diff"] == 0 and not rows["gap/sft"]["holds"]
    b = rows["minority/conditioned_vs_bt"]
    assert b["diff"] == pytest.approx(0.5) and b["holds"]
    # dpl_mean's gap: (0.5, 0.1): mean 0.3, sd 0.282843, half-width t(1) 12.706205 x 0.2 = 2.541241: not above 0.
    d = rows["gap/dpl_mean"]
    assert d["diff"] == pytest.approx(0.3) and d["ci95_low"] == pytest.approx(0.3 - 2.541241, abs=1e-5)
    assert not d["holds"]
    policy = {(r["policy"], r["group"]): r for r in E.policy_rows(0, per_prompt)}
    assert policy[("bt", "minority")]["gain"] == pytest.approx(-0.3)


def _rows(seed, a, b):
    """Comparison rows of one seed: (diff, ci95_low) of check A and of check B."""
    return [
        {"seed": seed, "comparison": E.CHECKS["A"], "diff": a[0], "ci95_low": a[1], "ci95_high": a[0] + 1},
        {"seed": seed, "comparison": E.CHECKS["B"], "diff": b[0], "ci95_low": b[1], "ci95_high": b[0] + 1},
        {"seed": seed, "comparison": "gap/dpl_mean", "diff": -1.0, "ci95_low": -2.0, "ci95_high": 0.0},
    ]


def test_verdict_rule():
    yes, no, wide = (0.3, 0.1), (-0.1, -0.3), (0.2, -0.05)
    assert E.decide(_rows(0, yes, yes) + _rows(1, yes, yes)) == "reproduced"
    assert (
        E.decide(_rows(0, yes, no) + _rows(1, yes, wide)) == "partly reproduced"
    )  # A on every seed, B never
    assert E.decide(_rows(0, no, yes)) == "partly reproduced"  # only B
    # A on one seed only, B on the other only: neither holds on every seed.
    assert E.decide(_rows(0, yes, no) + _rows(1, no, yes)) == "not reproduced"
    assert E.decide(_rows(0, wide, wide)) == "not reproduced"  # positive but the intervals reach 0
    nan = _rows(0, yes, yes)
    nan[0]["ci95_low"] = None  # one prompt: no interval, so nothing holds
    assert E.decide(nan) == "partly reproduced"
    assert E.decide([]) == "not reproduced"
    assert E.decide([{"seed": 0, "policy": "bt", "gain": 1.0}]) == "not reproduced"


def test_variance_rows_by_hand():
    """Pair std sqrt(sa^2 + sb^2): contested (3-4-5) 5, 5; uncontested sqrt(2), sqrt(2), sqrt(2)."""
    sa, sb = np.array([3.0, 3.0, 1.0, 1.0, 1.0]), np.array([4.0, 4.0, 1.0, 1.0, 1.0])
    rows = {r["pairs"]: r for r in E.variance_rows(0, sa, sb, np.array([True, True, False, False, False]))}
    assert rows["contested"]["dpl_pair_std"] == pytest.approx(5.0) and rows["contested"]["n"] == 2
    assert rows["uncontested"]["dpl_pair_std"] == pytest.approx(np.sqrt(2.0))
    assert rows["contested - uncontested"]["dpl_pair_std"] == pytest.approx(5.0 - np.sqrt(2.0))
    assert rows["contested - uncontested"]["ci95_half"] == 0.0  # no spread within either set
    # Contested (5, 3): var 2; uncontested (1, 1, 1): var 0. se sqrt(2 / 2) = 1; t(1) 12.706205.
    spread = E.variance_rows(
        0,
        np.array([3.0, 3.0, 1, 1, 1]),
        np.array([4.0, 0.0, 0, 0, 0]),
        rows_mask := np.array([True, True, False, False, False]),
    )
    assert rows_mask.sum() == 2 and spread[-1]["ci95_half"] == pytest.approx(12.706205, abs=1e-5)


def test_spread_row_by_hand():
    """std (1, 2, 3, 4, 5) against disagreement (2, 4, 6, 8, 10): r = 1 (clipped for the interval); against
    (10, 8, 6, 4, 2): r = -1; r = 0.8 for (1, 2, 3, 4, 5) vs (1, 3, 2, 5, 4): cov 2 / var 2.5 = 0.8, whose Fisher-z
    interval with n = 5 is tanh(atanh(0.8) -+ 1.959964 / sqrt 2) = [-0.2796, 0.9862]."""
    x = np.array([1.0, 2.0, 3.0, 4.0, 5.0])
    assert E.spread_row(0, x, 2 * x)["r"] == pytest.approx(1.0)
    assert E.spread_row(0, x, 12 - 2 * x)["r"] == pytest.approx(-1.0)
    row = E.spread_row(0, x, np.array([1.0, 3.0, 2.0, 5.0, 4.0]))
    assert row["r"] == pytest.approx(0.8) and row["n"] == 5
    assert row["ci95_low"] == pytest.approx(-0.2796, abs=1e-4)
    assert row["ci95_high"] == pytest.approx(0.9862, abs=1e-4)
    assert np.isnan(E.spread_row(0, x, np.ones(5))["r"])  # no spread: no correlation


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("rm.algo.loss=plackett_luce", "'rm.algo.loss' is set by the experiment"),
        ("rm.data.train_path=x.jsonl", "'rm.data.train_path' is set by the experiment"),
        ("ppo.algo.iterations=3", "'ppo.algo.iterations' is for something this experiment does not run"),
        ("pluralism.size=3", "unknown key 'pluralism.size'"),
        ("pluralism.pool=0", "must be a positive integer"),
        ("pluralism.n=64", "must be <= pluralism.pool"),
        ("rm.algo.margin=small", "'rm.algo.margin' is set by the experiment"),
        ("rm.optim.lr=-1", "optim.lr"),
    ],
)
def test_bad_overrides_are_refused_before_any_work(tmp_path, override, message):
    with pytest.raises(ConfigError, match=message):
        E.run([0], str(tmp_path / "x"), overrides=[override])
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize(
    ("task", "message"),
    [("arith", "not terms of the 'arith' task's gold"), ("review", "not distinct known words")],
)
def test_a_task_it_cannot_run_on_is_refused_before_any_work(tmp_path, task, message):
    with pytest.raises(ConfigError, match=message):
        E.run([0], str(tmp_path / "x"), task=task)
    assert not (tmp_path / "x").exists()


TINY = [
    "data.n_sft=32", "data.n_pairs=64", "data.n_prompts=16", "data.n_heldout=8", "eval.prompts=4", "eval.samples=2",
    "eval.rm_pairs=16", "sft.model.name_or_path=lab:sentiment:tiny", "sft.optim.max_steps=2", "rm.optim.max_steps=3",
    "rm.data.eval_fraction=0.25", "pluralism.bon_prompts=6", "pluralism.pool=4", "pluralism.n=4",
]  # fmt: skip


def test_tiny_run_writes_the_result_and_scores_each_group_by_its_own_model(tmp_path, tiny_lab_cache):
    from rlhflab.lab.groups import group_gold, tag_prompt
    from rlhflab.lab.tasks import chat_prompt, get_task

    out = tmp_path / "exp"
    assert main(["experiment", "pluralism", *TINY, "--seeds", "0", "--output-dir", str(out)]) == 0
    result = json.loads((out / "result.json").read_text())
    assert result["experiment"] == "pluralism" and result["verdict"] == E.decide(result["table"])
    assert result["rule"] == E.RULE and result["seeds"] == [0] and result["findings"]
    assert set(result["plots"]) == {"group_gold", "dpl_variance"} and (out / "group_gold.png").exists()
    assert "pluralism" in (out / "report.html").read_text()
    policies = [(r["policy"], r["group"]) for r in result["table"] if "policy" in r and "seed" in r]
    assert sorted(policies) == sorted((p, g) for p in E.POLICIES for g in E.TAGS)

    # The data: every pair labelled by a group; the conditioned model's file is the same pairs, tagged.
    data = out / "seed-0" / "run" / "data"
    pairs = [json.loads(x) for x in (data / "pairs.jsonl").read_text().splitlines()]
    tagged = [json.loads(x) for x in (data / "pairs_tagged.jsonl").read_text().splitlines()]
    assert {p["group"] for p in pairs} <= set(E.TAGS) and len(pairs) == len(tagged)
    for p, t in zip(pairs, tagged):
        assert t["prompt"] == tag_prompt(p["prompt"], E.TAGS[p["group"]]) and t["chosen"] == p["chosen"]
    assert json.loads((out / "seed-0" / "dpl" / "rm" / "final" / "rlhflab_reward.json").read_text())[
        "loss"
    ] == ("distributional")

    # Re-score the saved pool with each model loaded here: bt from the pipeline's rm, dpl's mean and mean - std,
    # the conditioned model with each group's own tag; each group's gold from its own weights.
    seed_dir = out / "seed-0"
    pool = json.loads((seed_dir / "pool.json").read_text())
    saved = np.load(seed_dir / "pool.npz")
    chats = [chat_prompt(p) for p in pool["prompts"] for _ in pool["responses"][0]]
    flat = [r for rs in pool["responses"] for r in rs]
    rewards = E.load_rewards(seed_dir)
    mean, std = (x.numpy() for x in rewards["dpl"].mean_std(chats, flat))
    expected = {
        "bt": rewards["bt"].score(chats, flat).numpy(),
        "dpl_mean": mean,
        "dpl_risk_averse": mean - E.RISK_AVERSION * std,
        **{
            f"conditioned/{g}": rewards["conditioned"]
            .score([tag_prompt(c, tag) for c in chats], flat)
            .numpy()
            for g, tag in E.TAGS.items()
        },
    }
    for key, values in expected.items():
        np.testing.assert_allclose(
            saved[f"score:{key}"].reshape(-1), values, rtol=1e-4, atol=1e-5, err_msg=key
        )
    # The two tags must give the conditioned model different inputs (else it could not tell the groups apart).
    assert not np.allclose(expected["conditioned/majority"], expected["conditioned/minority"])
    task = get_task("sentiment")
    for g in E.groups():
        np.testing.assert_allclose(saved[f"gold:{g.name}"].reshape(-1), group_gold(task, g, chats, flat))
    # n = pool: each policy's gold is the group's gold at the argmax of its own selector, averaged over prompts.
    rows = {(r["policy"], r["group"]): r for r in result["table"] if "policy" in r and "seed" in r}
    shape = saved["gold:majority"].shape
    for policy in E.POLICIES:
        for g in E.TAGS:
            gold = saved[f"gold:{g}"]
            key = E.selector_key(policy, g)
            if key is None:
                want = gold.mean()
            else:
                pick = expected[key].reshape(shape).argmax(axis=1)
                want = gold[np.arange(shape[0]), pick].mean()
            assert rows[(policy, g)]["gold"] == pytest.approx(want, abs=1e-9), (policy, g)

    # --resume reads the finished seed back: the same table, no training.
    assert main(["experiment", "pluralism", *TINY, "--seeds", "0", "--output-dir", str(out), "--resume"]) == 0
    again = json.loads((out / "result.json").read_text())
    assert again["table"] == result["table"]
