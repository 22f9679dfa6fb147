"""`rlhflab experiment prm-vs-orm`: the labels, best-of-N from subsets and the verdict rule by hand; a tiny run."""

from __future__ import annotations

import json

import numpy as np
import pytest

from rlhflab.cli import main
from rlhflab.errors import ConfigError
from rlhflab.experiments import prm_vs_orm as E
from rlhflab.lab.gold import arith_components, arith_step_labels


@pytest.mark.parametrize(
    "response,steps,labels",
    [
        # Every step right, then the right answer: all three pieces right.
        ("3 + 5 = 8 , 8 + 2 = 1 0 , answer 1 0 .", ["3 + 5 = 8", "8 + 2 = 1 0", "answer 1 0 ."], [True] * 3),
        # A slip at step 1 (carried forward): labels stop there.
        ("3 + 5 = 9 , 9 + 2 = 1 1 , answer 1 1 .", ["3 + 5 = 9"], [False]),
        # Right steps, wrong answer: the answer piece is the first wrong one.
        ("3 + 5 = 8 , 8 + 2 = 1 0 , answer 1 2 .", ["3 + 5 = 8", "8 + 2 = 1 0", "answer 1 2 ."], [True, True, False]),
        # No steps at all, right answer: the one piece is right.
        ("answer 1 0 .", ["answer 1 0 ."], [True]),
        # A malformed piece is wrong; an addition past the k-1 needed is wrong.
        ("3 + = 8 , answer 1 0 .", ["3 + = 8"], [False]),
        ("3 + 5 = 8 , 8 + 2 = 1 0 , 1 0 + 1 = 1 1 , answer 1 1 .", ["3 + 5 = 8", "8 + 2 = 1 0", "1 0 + 1 = 1 1"],
         [True, True, False]),
    ],
)  # fmt: skip
def test_step_records_by_hand(response, steps, labels):
    prompt = "add 3 + 5 + 2 ."
    outcome = arith_components(prompt, response)["outcome"] > 0.5
    assert E.step_record(prompt, response, arith_step_labels(prompt, response), outcome) == (steps, labels)


def test_final_answer_reads_the_last_answer():
    assert E.final_answer("3 + 5 = 8 , answer 8 .") == 8
    assert E.final_answer("answer 1 2 . answer 1 3 .") == 13  # "1 3" as the tokenizer decodes 13
    assert E.final_answer("3 + 5 = 8 ,") is None


def test_pick_and_oracle_accuracy_by_hand():
    scores = np.array([[0.9, 0.1, 0.9, 0.2]])
    correct = np.array([[True, False, False, True]])
    # Subset {0,1}: 0 is the best, right (1). {1,3}: 3 beats 1 (0.2 > 0.1), right (1). {0,2}: tied at 0.9, one of the
    # two is right (1/2). {1,2}: 2, wrong (0). Mean over the four subsets: 2.5 / 4.
    idx = np.array([[[0, 1], [1, 3], [0, 2], [1, 2]]])
    assert E.pick_accuracy(scores, correct, idx).tolist() == [0.625]
    # Oracle: every subset but {1,2} holds a right sample.
    assert E.oracle_accuracy(correct, idx).tolist() == [0.75]


def test_majority_accuracy_by_hand():
    answers = np.array([[10, 11, 11, 10, -1, 12], [3, 3, 4, 4, 5, 5]])
    correct = np.array([[True, False, False, True, False, False], [False] * 6])
    # Problem 0: {0,1,2} -> 11 wins (wrong, 0); {0,3,1} -> 10 wins (1); {0,1,5} -> 10, 11, 12 tie (1/3); {4,1,2} ->
    # 11 (the blank does not vote; 0). Problem 1 has no right answer: 0 whatever wins.
    idx = np.array([[[0, 1, 2], [0, 3, 1], [0, 1, 5], [4, 1, 2]]] * 2)
    got = E.majority_accuracy(answers, correct, idx)
    np.testing.assert_allclose(got, [(0 + 1 + 1 / 3 + 0) / 4, 0.0])
    # A lone blank is no vote: wrong; a lone right answer: right.
    assert E.majority_accuracy(answers[:1], correct[:1], np.array([[[4], [0]]])).tolist() == [0.5]


def test_subsets_and_best_of_n_agree_at_one_sample():
    idx = E.subset_indices(3, 8, 4, 5, seed=0)
    assert idx.shape == (3, 5, 4) and all(len(set(row)) == 4 for row in idx.reshape(-1, 4).tolist())
    assert E.subset_indices(3, 8, 8, 5, seed=0).shape == (3, 1, 8)  # all of them: one subset
    rng = np.random.default_rng(0)
    correct = rng.random((20, 8)) < 0.4
    cands = {
        "correct": correct,
        "answers": np.where(correct, 7, rng.integers(0, 5, (20, 8))),
        **{s: rng.random((20, 8)) for s in ("orm", "prm_product", "prm_min")},
    }
    out = E.best_of_n(cands, [1, 2, 8], n_subsets=6, seed=1)
    for s in E.SELECTORS:  # N = 1: every selector takes the one sample, so all equal the same mean
        np.testing.assert_allclose(out[s][1], out["oracle"][1])
    np.testing.assert_allclose(out["oracle"][8], correct.any(1))
    assert all((out["oracle"][n] >= out[s][n] - 1e-12).all() for s in E.SELECTORS for n in (1, 2, 8))


def _cmp(seed, name, diff, half):
    return {"seed": seed, "comparison": name, "n": 64, "difference": diff, "difference_ci95": half,
            "holds": diff - half > 0}  # fmt: skip


def test_verdict_rule():
    both = [_cmp(0, "prm_product - orm", 0.1, 0.05), _cmp(0, "orm - majority", 0.08, 0.05)]
    assert E.decide(both) == "reproduced"
    # A smaller N never counts: only the largest N evaluated decides.
    small = [{**_cmp(0, "prm_product - orm", -0.5, 0.01), "n": 8}]
    assert E.decide(both + small) == "reproduced"
    # PRM > ORM holds, ORM < majority: partly.
    assert E.decide([_cmp(0, "prm_product - orm", 0.1, 0.05), _cmp(0, "orm - majority", -0.2, 0.05)]) == (
        "partly reproduced"
    )
    # Both hold on seed 0; on seed 1 the PRM is below the ORM: not even partly (PRM must be above on every seed).
    seed1 = [_cmp(1, "prm_product - orm", -0.01, 0.05), _cmp(1, "orm - majority", 0.0, 0.05)]
    assert E.decide(both + seed1) == "not reproduced"
    # PRM above everywhere but nothing significant: not reproduced.
    assert E.decide([_cmp(0, "prm_product - orm", 0.02, 0.05), _cmp(0, "orm - majority", 0.02, 0.05)]) == (
        "not reproduced"
    )
    assert E.decide([]) == "not reproduced"


def test_overrides_are_checked_before_any_work(tmp_path):
    for bad, pattern in [
        (["rm.algo.loss=binary"], "rm.algo.loss is set by the experiment"),
        (["rm.data.step_separator=x"], "rm.data.step_separator is set by the experiment"),
        (["prm.optim.lr=1"], "unknown section 'prm'"),
        (["eval.samples=1"], "eval.samples must be >= 2"),
        (["samples.problems=0"], "'samples.problems' must be a positive integer"),
        (["sft.optim.lrr=1"], "section 'sft'.*unknown key 'optim.lrr'"),
        (["rm.optim.batch_size=0"], "section 'rm'"),
        (["rl.algo.reward_model=[x]"], "rl.algo.reward_model is set by the experiment"),
        (["rl.algo.iterations=2", "eval.rl_samples=0"], "eval.rl_samples=0 skips"),
        (["rl.algo.num_generations=1"], "section 'rl'"),
    ]:
        with pytest.raises(ConfigError, match=pattern):
            E.run([0], str(tmp_path / "x"), overrides=bad)
        assert not (tmp_path / "x").exists()
    with pytest.raises(ConfigError, match="needs a lab task whose solutions have steps"):
        E.run([0], str(tmp_path / "x"), task="sentiment")


TINY = [
    "data.n_sft=32", "data.n_prompts=16", "sft.model.name_or_path=lab:arith:tiny", "sft.optim.max_steps=2",
    "samples.problems=12", "samples.per_problem=2", "rm.optim.max_steps=2", "rm.optim.batch_size=4",
    "rm.data.eval_fraction=0.25", "rm.algo.normalization_samples=8", "eval.problems=4", "eval.samples=4",
    "eval.subsets=3", "eval.rl_samples=2", "rl.algo.iterations=2", "rl.algo.prompts_per_iteration=2",
    "rl.algo.num_generations=2",
]  # fmt: skip


def test_tiny_run_writes_the_result(tmp_path, tiny_lab_cache):
    # About 30 s on 2 lightly loaded cores (the tiny arith base model is pretrained once per session).
    out = tmp_path / "exp"
    assert main(["experiment", "prm-vs-orm", *TINY, "--seeds", "0", "--output-dir", str(out)]) == 0
    result = json.loads((out / "result.json").read_text())
    table = result["table"]
    assert result["verdict"] == E.decide(table) and result["plots"] == {"accuracy_vs_n": "accuracy_vs_n.png"}
    acc = {(r["selector"], r["n"]): r["accuracy"] for r in table if "selector" in r}
    assert sorted({n for _, n in acc}) == [1, 2, 4] and {s for s, _ in acc} == set(E.SELECTORS)
    # N = 1: every selector takes the one sample, so all report the SFT policy's accuracy.
    assert len({round(acc[s, 1], 9) for s in E.SELECTORS}) == 1
    # The table is what the candidates file gives: N = 4 is all of each problem's samples.
    rows = [json.loads(line) for line in (out / "seed-0" / "candidates.jsonl").read_text().splitlines()]
    assert len(rows) == 4 and all(len(r["responses"]) == 4 for r in rows)
    correct = np.array([r["correct"] for r in rows])
    for s in ("orm", "prm_product", "prm_min"):
        scores = np.array([r[s] for r in rows])
        expected = E.pick_accuracy(scores, correct, np.arange(4)[None, None].repeat(4, 0)).mean()
        assert acc[s, 4] == pytest.approx(expected)
    assert acc["oracle", 4] == pytest.approx(correct.any(1).mean())
    # The two reward models read the same solutions; a PRM record labelled right to its answer is a right one.
    orm = [json.loads(line) for line in (out / "seed-0" / "data" / "orm.jsonl").read_text().splitlines()]
    prm = [json.loads(line) for line in (out / "seed-0" / "data" / "prm.jsonl").read_text().splitlines()]
    assert len(orm) == len(prm) > 0 and [o["prompt"] for o in orm] == [p["prompt"] for p in prm]
    for o, p in zip(orm, prm):
        assert " , ".join(p["completions"]) in o["completion"]
        if all(p["labels"]) and p["completions"][-1].startswith("answer"):
            assert o["label"]
    settings = json.loads((out / "seed-0" / "prm" / "final" / "rlhflab_reward.json").read_text())
    assert settings["loss"] == "step" and settings["step_separator"] == " , "
    # The RL arm trained against the verifier rule (never a learned or gold reward) and was judged beside the verdict.
    rl = next(r for r in table if r.get("arm") == E.RL_ARM)
    assert 0 <= rl["accuracy"] <= 1
    assert "rule:arithmetic" in (out / "seed-0" / "rl" / "config.yaml").read_text()
    assert (out / "seed-0" / "rl" / "final").is_dir()
    assert (out / "accuracy_vs_n.png").exists() and (out / "report.html").exists()
