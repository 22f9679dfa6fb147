"""`rlhflab experiment mode-collapse`: the verdict rule and the table by hand; a tiny run whose table and
confidences are recomputed from its saved samples and models."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from rlhflab.cli import main
from rlhflab.errors import ConfigError
from rlhflab.eval import metrics as M
from rlhflab.eval.calibration import expected_calibration_error
from rlhflab.experiments import mode_collapse as E
from rlhflab.lab.gold import arith_components


def _cmp(seed, method, metric, holds):
    return {"seed": seed, "comparison": f"{method} - sft", "metric": metric, "difference": 0.0, "ci95_low": 0.0,
            "ci95_high": 0.0, "holds": holds}  # fmt: skip


def _seed(seed, diversity=True, calibration=True, skip=()):
    rows = []
    for m in E.ALIGNED:
        rows += [_cmp(seed, m, k, diversity) for k in ("distinct_2", "self_bleu") if (m, k) not in skip]
        rows.append(
            _cmp(seed, m, "ece", calibration if m in E.CALIBRATED else False)
        )  # best-of-n's never counts
        rows.append(_cmp(seed, m, "accuracy", None))
    return rows


def test_verdict_rule():
    assert E.decide(_seed(0) + _seed(1)) == "reproduced"
    # Diversity falls everywhere, calibration never worsens: partly.
    assert E.decide(_seed(0, calibration=False) + _seed(1, calibration=False)) == "partly reproduced"
    # Calibration worsens everywhere, diversity never falls: partly (either part counts).
    assert E.decide(_seed(0, diversity=False) + _seed(1, diversity=False)) == "partly reproduced"
    # Both parts on one seed only: partly.
    assert E.decide(_seed(0) + _seed(1, diversity=False, calibration=False)) == "partly reproduced"
    # One method's self-BLEU fails on every seed, and calibration never worsens: part D holds nowhere.
    one_off = [{**r, "holds": False} if r["comparison"] == "dpo - sft" and r["metric"] == "self_bleu" else r
               for r in _seed(0, calibration=False)]  # fmt: skip
    assert E.decide(one_off) == "not reproduced"
    # A comparison that is missing does not hold.
    assert E.decide(_seed(0, calibration=False, skip={("grpo", "distinct_2")})) == "not reproduced"
    assert E.decide(_seed(0, diversity=False, calibration=False)) == "not reproduced"
    assert E.decide([]) == "not reproduced"


def _record(responses, correct, confidence):
    return {"responses": responses, "correct": correct, "confidence": confidence}


def test_seed_rows_by_hand():
    # SFT: prompt 0 writes two different solutions, prompt 1 two more. PPO: the same solution twice per prompt.
    sft = _record(
        [["answer 8 .", "answer 9 ."], ["3 + 4 = 7 , answer 7 .", "answer 6 ."]],
        [[True, False], [True, False]],
        [[0.5, 0.5], [0.5, None]],  # the last one has no answer: left out of the ECE
    )
    ppo = _record(
        [["answer 8 .", "answer 8 ."], ["answer 7 .", "answer 7 ."]],
        [[True, True], [True, True]],
        [[0.2] * 2] * 2,
    )
    result = {"policies": {"sft": sft, "ppo": ppo}}
    rows = E.seed_rows(0, result, {"bins": 10, "bootstrap": 20})
    row = {r["policy"]: r for r in rows if "policy" in r}
    # SFT prompt 0: bigrams {answer 8, 8 ., answer 9, 9 .} all distinct -> 1; prompt 1: 7 bigrams + 2, all distinct.
    assert row["sft"]["distinct_2"] == 1.0 and row["ppo"]["distinct_2"] == 0.5
    # SFT prompt 0: BLEU("answer 8 ." | "answer 9 .") = (2/3 * 0.1/2 * 0.1/1) ** (1/3) both ways (no bigram or
    # trigram matches: epsilon over 2 bigrams, over 1 trigram); PPO: identical samples -> 1.
    p0 = (2 / 3 * 0.05 * 0.1) ** (1 / 3)
    p1 = M.self_bleu([s.split() for s in sft["responses"][1]])
    assert row["sft"]["self_bleu"] == pytest.approx((p0 + p1) / 2) and row["ppo"]["self_bleu"] == 1.0
    # ECE: SFT's three answered samples are one bin of confidence 0.5 with 2/3 right -> |2/3 - 1/2| = 1/6.
    assert row["sft"]["ece"] == pytest.approx(1 / 6) and row["sft"]["answered"] == 0.75
    assert row["ppo"]["ece"] == pytest.approx(0.8) and row["ppo"]["mean_confidence"] == pytest.approx(0.2)
    assert row["ppo"]["accuracy"] == 1.0 and row["sft"]["accuracy"] == 0.5
    # Agreement: SFT's two samples of each prompt answer differently (8/9, 7/6): confidence 0 with half right -> 0.5;
    # PPO's agree (confidence 1) and are right -> 0. Distinct responses: 2 of 2 for SFT, 1 of 2 for PPO.
    assert row["sft"]["ece_consistency"] == 0.5 and row["ppo"]["ece_consistency"] == 0.0
    assert row["sft"]["distinct_responses"] == 1.0 and row["ppo"]["distinct_responses"] == 0.5
    comps = {r["metric"]: r for r in rows if r.get("comparison") == "ppo - sft"}
    # Paired over the 2 prompts: distinct-2 falls by 0.5 on both -> no spread, the interval is [-0.5, -0.5].
    assert comps["distinct_2"]["difference"] == -0.5 and comps["distinct_2"]["holds"] is True
    assert comps["ece"]["difference"] == pytest.approx(0.8 - 1 / 6) and comps["accuracy"]["holds"] is None
    assert comps["ece"]["in_rule"] and not any(r.get("comparison", "").startswith("base") for r in rows)


def test_overrides_are_checked_before_any_work(tmp_path):
    for bad, pattern in [
        (["eval.samples=1"], "eval.samples must be >= 2"),
        (["eval.prompt=3"], "unknown key 'eval.prompt'"),
        (["eval.bins=0"], "'eval.bins' must be a positive integer"),
        (["grpo.algo.reward_model=[x]"], "'grpo.algo.reward_model' is set by the experiment"),
        (["rloo.optim.lr=1"], "'rloo.optim.lr' is for something this experiment does not run"),
        (["ppo.optim.lrr=1"], "lrr"),
    ]:
        with pytest.raises(ConfigError, match=pattern):
            E.run([0], str(tmp_path / "x"), overrides=bad)
        assert not (tmp_path / "x").exists()
    with pytest.raises(ConfigError, match="needs the 'arith' task"):
        E.run([0], str(tmp_path / "x"), task="sentiment")


TINY = [
    "data.n_sft=32", "data.n_pairs=64", "data.n_prompts=16", "data.n_heldout=8",
    "sft.model.name_or_path=lab:arith:tiny", "sft.optim.max_steps=2", "rm.optim.max_steps=2",
    "rm.optim.batch_size=4", "rm.algo.normalization_samples=8", "rm.data.eval_fraction=0.25",
    "dpo.optim.max_steps=2", "dpo.optim.batch_size=4", "ppo.algo.iterations=2", "ppo.algo.rollout_batch_size=8",
    "ppo.algo.minibatch_size=4", "grpo.algo.iterations=2", "grpo.algo.prompts_per_iteration=4", "eval.prompts=6",
    "eval.samples=3", "eval.best_of_n=2", "eval.bootstrap=50",
]  # fmt: skip


def _manual_confidence(model, tokenizer, prompt, response):
    """p(final answer) by hand: one unpadded forward per answer digit and one after them (nan: no answer)."""
    from rlhflab.lab.tasks import chat_prompt
    from rlhflab.rollout.generate import encode_prompts

    prompt_ids = encode_prompts(tokenizer, [chat_prompt(prompt)])[0]
    ids = tokenizer(response, add_special_tokens=False)["input_ids"]
    tokens = tokenizer.convert_ids_to_tokens(ids)
    digit_ids = tokenizer.convert_tokens_to_ids([str(d) for d in range(10)])
    spans = []
    for i, t in enumerate(tokens):
        if t == "answer":
            end = i + 1
            while end < len(tokens) and tokens[end].isdigit():
                end += 1
            if end > i + 1:
                spans.append((i + 1, end))
    if not spans:
        return math.nan
    start, end = spans[-1]
    prob = 1.0
    for t in range(start, end + 1):
        with torch.no_grad():
            p = torch.softmax(
                model(input_ids=torch.tensor([prompt_ids + ids[:t]])).logits[0, -1].double(), -1
            )
        prob *= float(p[ids[t]]) if t < end else 1.0 - float(p[digit_ids].sum())
    return prob


def _check_saved_samples(seed: dict, rows: dict) -> None:
    """The saved correctness is the gold's of the saved text; the table's ECE, self-BLEU and distinct-2 are those
    of the saved samples."""
    prompts = seed["prompts"]
    for name, rec in seed["policies"].items():
        want = [
            [arith_components(p, r)["outcome"] > 0.5 for r in rs] for p, rs in zip(prompts, rec["responses"])
        ]
        assert rec["correct"] == want, name
        conf = np.array([[np.nan if c is None else c for c in row] for row in rec["confidence"]])
        seen = ~np.isnan(conf)
        ece = expected_calibration_error(conf[seen], np.array(rec["correct"])[seen])
        assert rows[name]["ece"] == pytest.approx(ece, abs=1e-12, nan_ok=True)
        words = [[r.split() for r in rs] for rs in rec["responses"]]
        assert rows[name]["self_bleu"] == pytest.approx(np.mean([M.self_bleu(w) for w in words]))
        assert rows[name]["distinct_2"] == pytest.approx(np.mean([M.distinct_n(w, 2) for w in words]))


def test_each_policy_is_sampled_and_scored_by_its_own_model(tmp_path, monkeypatch):
    # A run directory of distinct random models (no training: fast); the reward model is replaced by the
    # verifier. A policy sampled or scored by another policy's model would fail the manual recomputation.
    from rlhflab.lab.tasks import get_task
    from rlhflab.models.tiny import build_word_tokenizer, tiny_causal_lm
    from rlhflab.rewards import ArithmeticVerifier, LearnedReward

    task = get_task("arith")
    tokenizer = build_word_tokenizer(task.vocabulary())
    run_dir = tmp_path / "run"
    models = {}
    for i, name in enumerate(("base", "sft", "ppo", "dpo", "grpo")):
        models[name] = tiny_causal_lm(
            tokenizer, hidden_size=32, num_layers=1, num_heads=2, seed=10 + i
        ).eval()
        where = tmp_path / "base" if name == "base" else run_dir / name / "final"
        models[name].save_pretrained(where)
        tokenizer.save_pretrained(where)
    monkeypatch.setattr(
        LearnedReward, "from_pretrained", classmethod(lambda cls, path, **kw: ArithmeticVerifier())
    )
    ev = {"prompts": 4, "samples": 4, "best_of_n": 2, "bins": 10, "bootstrap": 20}
    seed = E.sample_seed(task, 0, run_dir, str(tmp_path / "base"), ev)
    assert seed["prompts"] == task.heldout_prompts(4, seed=0) and set(seed["policies"]) == set(E.POLICIES)
    rows = {r["policy"]: r for r in E.seed_rows(0, seed, ev) if "policy" in r}
    _check_saved_samples(seed, rows)
    checked = 0
    for name, rec in seed["policies"].items():
        own = models["sft" if name == "best_of_n" else name]
        other = models["dpo" if name == "ppo" else "ppo"]
        for i, responses in enumerate(rec["responses"]):
            for j, response in enumerate(responses):
                want = _manual_confidence(own, tokenizer, seed["prompts"][i], response)
                got = rec["confidence"][i][j]
                assert (got is None and math.isnan(want)) or got == pytest.approx(want, rel=1e-4), (
                    name,
                    i,
                    j,
                )
                if got is not None:
                    checked += 1
                    assert got != pytest.approx(
                        _manual_confidence(other, tokenizer, seed["prompts"][i], response)
                    )
    assert checked >= 5  # random models write "answer N" often enough for the check to bite


@pytest.mark.slow
def test_tiny_run_recomputes_from_its_samples(tmp_path, tiny_lab_cache):
    # About a minute on one loaded core (the pipeline's five stages and its report); the fast test above checks
    # the same wiring on untrained models.
    from rlhflab.lab.launch import lab_model_dir
    from rlhflab.models.loading import load_causal_lm, load_tokenizer

    out = tmp_path / "exp"
    assert main(["experiment", "mode-collapse", *TINY, "--seeds", "0", "--output-dir", str(out)]) == 0
    result = json.loads((out / "result.json").read_text())
    fields = {
        "experiment",
        "claim",
        "source",
        "verdict",
        "rule",
        "findings",
        "table",
        "plots",
        "runtime_s",
        "seeds",
    }
    assert fields <= set(result) and result["experiment"] == E.NAME and result["seeds"] == [0]
    assert result["verdict"] == E.decide(result["table"]) and (out / "report.html").is_file()
    assert set(result["plots"]) == {"reliability", "diversity"} and (out / "reliability.png").is_file()
    rows = {r["policy"]: r for r in result["table"] if "policy" in r}
    assert set(rows) == set(E.POLICIES)
    seed = json.loads((out / "seed-0" / "seed.json").read_text())
    prompts = seed["prompts"]
    assert len(prompts) == 6 and all(
        len(r) == 3 for rec in seed["policies"].values() for r in rec["responses"]
    )
    _check_saved_samples(seed, rows)
    # --resume reads the finished seed back: the same table, nothing trained again.
    marker = out / "seed-0" / "run" / "sft" / "final" / "config.json"
    before = marker.stat().st_mtime_ns
    assert (
        main(["experiment", "mode-collapse", *TINY, "--seeds", "0", "--output-dir", str(out), "--resume"])
        == 0
    )
    assert json.loads((out / "result.json").read_text())["table"] == result["table"]
    assert marker.stat().st_mtime_ns == before
    # Each policy's confidence is its own model's probability of the saved answer (best-of-n: the SFT model's).
    run_dir = out / "seed-0" / "run"
    dirs = {"ppo": run_dir / "ppo" / "final", "best_of_n": run_dir / "sft" / "final",
            "base": lab_model_dir("lab:arith:tiny", seed=0)}  # fmt: skip
    for name, model_dir in dirs.items():
        model, tokenizer = load_causal_lm(model_dir).eval(), load_tokenizer(model_dir)
        rec = seed["policies"][name]
        for i in range(2):
            want = _manual_confidence(model, tokenizer, prompts[i], rec["responses"][i][0])
            got = rec["confidence"][i][0]
            assert (got is None and math.isnan(want)) or got == pytest.approx(want, rel=1e-4), (name, i)
