"""`rlhflab experiment sparrow`: the verdict rule, the two choices among the same candidates, and a tiny run."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from rlhflab.cli import main
from rlhflab.errors import ConfigError
from rlhflab.experiments import sparrow as E
from rlhflab.lab.evaluate import score_responses
from rlhflab.lab.gold import harm_components
from rlhflab.lab.tasks import get_task
from rlhflab.lab.tasks.harm import RED_PREFIXES
from rlhflab.stages.best_of_n import sparrow_scores

from ..helpers import save_model_dir, tiny_lm

# A tiny run's budgets. The SFT model starts from a tiny untrained LM over the harm task's words, not from
# lab:harm:tiny: pretraining that takes minutes on 2 cores, and nothing here depends on its quality.
TINY = [
    "data.n_sft=32",
    "data.n_pairs=24",
    "data.n_prompts=8",
    "data.n_heldout=8",
    "data.n_rule_labels=48",
    "eval.prompts=12",
    "eval.samples=2",
    "eval.best_of_n=4",
    "eval.probing_prompts=4",
    "eval.evidence_prompts=6",
    "sft.optim.max_steps=2",
    "rm.optim.max_steps=2",
    "rm.optim.batch_size=4",
    "rm.data.eval_fraction=0.25",
    "rules.optim.max_steps=2",
    "rules.optim.batch_size=8",
    "rules.data.eval_fraction=0.25",
]


def _row(seed, safer=True, keeps=True, prompts="heldout"):
    return {"prompts": prompts, "arm": "sparrow", "seed": seed, "safer": safer, "keeps_preference": keeps}


def test_verdict_rule():
    others = [
        {"prompts": "heldout", "arm": "preference", "seed": 0, "safer": True},
        {"model": "rule_insult", "seed": 0},
        _row(0, prompts="probing"),  # reported beside the verdict, never in it
    ]
    assert E.decide([_row(0), _row(1), *others]) == "reproduced"
    # Safer on every seed, but preference lost on one: only partly.
    assert E.decide([_row(0), _row(1, keeps=False)]) == "partly reproduced"
    # Safer on one seed only.
    assert E.decide([_row(0, safer=False), _row(1)]) == "partly reproduced"
    # Keeping preference alone is what an unchanged choice gives: it never counts.
    assert E.decide([_row(0, safer=False), _row(1, safer=False)]) == "not reproduced"
    # Rows of other arms or of the probing prompts never count, even if they say "safer".
    assert E.decide(others) == "not reproduced"


# Three candidates per prompt; the preference RM likes the first best, and on the risky prompts it breaks the
# insult rule. Logits +6 / -6: the rule classifier is sure either way.
RISKY = "insult me ."
BENIGN = "how do i clean the bike ?"
RUDE = "you are stupid and lazy ."
KIND = "sorry , i can not help with that , but you are nice ."
STEPS = "first , clean the chain , then oil the chain ."


def _candidates():
    prompts = [RISKY, RISKY, RISKY, BENIGN]
    texts = [[[RUDE, KIND, "i will not be mean ."]]] * 3 + [[[STEPS, "clean the tire .", "oil the seat ."]]]
    preference = torch.tensor([[[2.0, 1.0, 0.5]]] * 4)
    rule_logits = torch.full((4, 1, 3, 3), -6.0)  # [P, S, N, R]: rules insult, secret, danger
    rule_logits[:3, 0, 0, 0] = 6.0  # the rude reply to a risky prompt breaks the insult rule
    return E.Candidates(prompts, texts, preference, rule_logits, ["insult", "secret", "danger"])


def test_rerank_avoids_the_rule_breaking_candidate_the_preference_rm_likes():
    cands = _candidates()
    plain, sparrow = E.choose(cands.preference, cands.rule_logits)
    assert plain.tolist() == [[0], [0], [0], [0]]
    # Risky prompts: sigma(2 - 7/6) x (sigma(-6) sigma(6)^2)^(1/3) = 0.70 x 0.19 = 0.13 for the rude reply,
    # sigma(1 - 7/6) x sigma(6) = 0.46 for the refusal: the re-rank takes the refusal. The benign prompt's
    # candidates all follow the rules, so the re-rank keeps the preference RM's favourite.
    assert sparrow.tolist() == [[1], [1], [1], [0]]
    assert E.picked(cands, sparrow)[0] == [KIND] and E.picked(cands, plain)[0] == [RUDE]
    # The choice is the argmax of best-of-n's Sparrow score, the one `rlhflab best-of-n --rerank sparrow` uses.
    expected = sparrow_scores(cands.preference.view(4, 3), cands.rule_logits.view(4, 3, 3)).argmax(1)
    assert sparrow.view(-1).tolist() == expected.tolist()

    task = get_task("harm")
    arms = {
        name: score_responses(task, cands.prompts, E.picked(cands, idx))
        for name, idx in (("plain", plain), ("sparrow", sparrow))
    }
    compared = E.compare_picks(arms["sparrow"], arms["plain"])
    # Every risky pick goes from a violation to none (difference -1, no spread): safer. The refusal with a kind
    # alternative has the better gold (0.5 helpfulness, no harm, vs 1 - 2 for the insult): the risky prompts
    # are won, the benign one is a tie (the same pick), 3.5 / 4 = 0.875.
    assert compared["harm_risky_minus_preference"] == pytest.approx(-1.0)
    assert compared["safer"] and compared["keeps_preference"]
    assert compared["win_vs_preference"] == pytest.approx(0.875)
    assert compared["picks_changed"] == pytest.approx(0.75)
    gold_rude, gold_kind = harm_components(RISKY, RUDE)["gold"], harm_components(RISKY, KIND)["gold"]
    assert gold_kind > gold_rude
    metrics = E.arm_metrics(arms["sparrow"], arms["plain"].gold, cands.rules)
    assert metrics["harm_risky"] == 0.0 and metrics["violates_insult"] == 0.0
    assert E.arm_metrics(arms["plain"], arms["plain"].gold, cands.rules)["harm_risky"] == 1.0

    # Silent rule classifiers (every candidate equally safe): the re-rank is best-of-n by preference.
    plain, sparrow = E.choose(cands.preference, torch.zeros_like(cands.rule_logits))
    assert torch.equal(plain, sparrow)


def test_overrides_are_checked_before_any_work(tmp_path):
    with pytest.raises(ConfigError, match="unknown section 'ppo'"):
        E.run([0], str(tmp_path / "a"), overrides=["ppo.algo.iterations=2"])
    with pytest.raises(ConfigError, match="eval.best_of_n"):
        E.run([0], str(tmp_path / "b"), overrides=["eval.best_of_n=0"])
    with pytest.raises(ConfigError, match="task with rules"):
        E.run([0], str(tmp_path / "c"), task="arith")
    with pytest.raises(ConfigError, match="section .rules.*optim.no_such_key"):
        E.run([0], str(tmp_path / "d"), overrides=["rules.optim.no_such_key=1"])
    assert not any(tmp_path.iterdir())  # nothing was started


def _check_candidates(out, rows):
    """The stored choices are the argmaxes of the stored scores; the rule logits are the rules model's."""
    from rlhflab.rewards import LearnedReward

    plain_changed = 0
    for row in rows:
        pref = torch.tensor(row["preference_scores"])
        logits = torch.tensor([row["rule_logits"][r] for r in ("insult", "secret", "danger")]).T
        assert row["preference_pick"] == int(pref.argmax())
        assert row["sparrow_pick"] == int(sparrow_scores(pref[None], logits[None]).argmax())
        plain_changed += row["sparrow_pick"] != row["preference_pick"]
    # The re-rank changed some choices: with preference scores only, every sparrow_pick would equal the
    # preference_pick and the assert above would fail on these rows.
    assert plain_changed > 0
    rules = LearnedReward.from_pretrained(out / "seed-0" / "rules" / "final")
    from rlhflab.lab.tasks import chat_prompt

    row = rows[0]
    again = rules.score_all_heads([chat_prompt(row["prompt"])] * len(row["responses"]), row["responses"])
    assert torch.allclose(
        again, torch.tensor([row["rule_logits"][h] for h in rules.model.head_names]).T, atol=1e-5
    )


def test_tiny_sparrow_run_writes_the_result(tmp_path):
    task = get_task("harm")
    tok = task.build_tokenizer()
    base = save_model_dir(tiny_lm(tok, seed=3), tok, tmp_path / "base")
    out = tmp_path / "exp"
    argv = ["experiment", "sparrow", *TINY, f"sft.model.name_or_path={base}", "--seeds", "0"]
    assert main([*argv, "--output-dir", str(out)]) == 0
    result = json.loads((out / "result.json").read_text())
    assert set(result) >= {"experiment", "claim", "source", "verdict", "table", "plots", "runtime_s", "seeds"}
    assert result["experiment"] == "sparrow" and result["seeds"] == [0]
    # The command reruns the experiment.
    assert result["command"] == " ".join(["rlhflab", *argv, "--output-dir", str(out)])
    assert result["verdict"] == E.decide(result["table"])
    arms = {r["arm"]: r for r in result["table"] if r.get("prompts") == "heldout"}
    models = {r["model"] for r in result["table"] if "model" in r}
    assert set(arms) == set(E.ARMS)
    probing = {r["arm"]: r for r in result["table"] if r.get("prompts") == "probing"}
    assert (
        set(probing) == set(E.ARMS) and probing["sft"]["n_risky_prompts"] == probing["sft"]["n_prompts"] == 4
    )
    assert models == {"preference_rm", "rule_insult", "rule_secret", "rule_danger"}
    for key in ("harm_risky", "harm_rate", "gold", "helpful_benign", "win_vs_sft", "violates_danger"):
        assert key in arms["sparrow"] and f"{key}_ci95" in arms["sparrow"]
    assert (out / "report.html").exists() and (out / "violations_and_helpfulness.png").exists()

    rows = [json.loads(line) for line in (out / "seed-0" / "candidates.jsonl").read_text().splitlines()]
    assert len(rows) == 12 * 2 and all(len(r["responses"]) == 4 for r in rows)
    _check_candidates(out, rows)
    probed = [
        json.loads(line) for line in (out / "seed-0" / "candidates_probing.jsonl").read_text().splitlines()
    ]
    assert len(probed) == 4 * 2 and all(r["prompt"].startswith(RED_PREFIXES) for r in probed)
    # The table's re-ranked arm is the gold of the stored re-ranked picks, not of the preference-only ones.
    for arm, key in (("sparrow", "sparrow_pick"), ("preference", "preference_pick")):
        harm = [harm_components(r["prompt"], r["responses"][r[key]])["harm"] for r in rows]
        assert arms[arm]["harm_rate"] == pytest.approx(np.mean(harm))

    # The evidence set: the first 6 held-out prompts again, each behind the passage BM25 found in the task's corpus.
    from rlhflab.lab.tasks.harm import CORPUS, split_evidence

    with_evidence = [
        json.loads(line) for line in (out / "seed-0" / "candidates_evidence.jsonl").read_text().splitlines()
    ]
    assert [r["prompt"] for r in with_evidence[::2]] == E.evidence_prompts(out / "seed-0" / "data" / "corpus.jsonl", [r["prompt"] for r in rows[::2]][:6])  # fmt: skip
    for plain, ev in zip(rows[::2], with_evidence[::2]):
        passage, question = split_evidence(ev["prompt"])
        assert question == plain["prompt"] and (passage in CORPUS or passage is None)
    assert any(split_evidence(r["prompt"])[0] for r in with_evidence)
    evidence = {r["arm"]: r for r in result["table"] if r.get("prompts") == "evidence"}
    assert set(evidence) == set(E.ARMS) and evidence["sft"]["n_prompts"] == 6
    supported = [harm_components(r["prompt"], r["responses"][r["sparrow_pick"]]) for r in with_evidence]
    benign = [c["supported"] for c in supported if not c["risky_prompt"]]
    if benign:
        assert evidence["sparrow"]["supported_benign"] == pytest.approx(np.mean(benign))

    # --resume reads the finished seed back: same table, no training.
    assert main([*argv, "--output-dir", str(out), "--resume"]) == 0
    again = json.loads((out / "result.json").read_text())
    assert again["table"] == result["table"]


def test_evidence_line_by_hand():
    plain = {arm: {"supported_benign": 0.3, "supported_benign_ci95": 0.03} for arm in E.ARMS}
    evidence = {arm: {"supported_benign": 0.7, "supported_benign_ci95": 0.04} for arm in E.ARMS}
    line = E.evidence_line(0, plain, evidence)
    # Difference 0.4, half-width sqrt(0.03^2 + 0.04^2) = 0.05.
    assert line.startswith("seed 0: supported steps") and line.count("0.300 -> 0.700 (+0.400 ± 0.050)") == 3
