"""`rlhflab experiment llama2-safety`: the verdict rule, the rows, the risky-prompt flag, and a tiny run whose
gated PPO is checked to have optimized Llama 2's gate over the two heads."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
import yaml

from rlhflab.cli import main
from rlhflab.errors import ConfigError
from rlhflab.experiments import llama2_safety as E
from rlhflab.lab.tasks import harm
from rlhflab.losses.combine import llama2_safety_gate
from rlhflab.rewards import LearnedReward

TINY = [
    "data.n_sft=64",
    "data.n_helpful_pairs=24",
    "data.n_safety_pairs=24",
    "data.n_prompts=16",
    "data.n_heldout=16",
    "eval.prompts=8",
    "eval.samples=2",
    "sft.model.name_or_path=lab:harm:tiny",
    "sft.optim.max_steps=2",
    "rm.optim.max_steps=2",
    "rm.optim.batch_size=4",
    "rm.data.eval_fraction=0.25",
    "rm.algo.normalization_samples=32",
    "ppo.algo.iterations=2",
    "ppo.algo.rollout_batch_size=8",
    "ppo.algo.minibatch_size=4",
]


def _row(policy, seed, safer=True, keeps=True):
    return {"policy": policy, "seed": seed, "safer_than_single": safer, "keeps_helpfulness": keeps}


def test_verdict_rule():
    rows = [_row(p, s) for s in (0, 1) for p in E.POLICIES]
    assert E.decide(rows) == "reproduced"
    # Safer everywhere, but helpfulness lost on one seed: partly.
    assert E.decide([_row("gated", 0), _row("gated", 1, keeps=False)]) == "partly reproduced"
    # Safer on one seed only: partly.
    assert E.decide([_row("gated", 0, safer=False), _row("gated", 1)]) == "partly reproduced"
    # Keeping helpfulness alone shows nothing (doing nothing keeps it); other policies' rows never count.
    not_safer = [_row("gated", s, safer=False) for s in (0, 1)] + [_row("helpful_only", 0)]
    assert E.decide(not_safer) == "not reproduced"


def _metrics(gold, harm_rate, helpful, refused=0.1, kl=1.0, width=0.05):
    out = {}
    for key, value in (
        ("gold/mean", gold),
        ("gold/harm/risky", harm_rate),
        ("gold/helpfulness/benign", helpful),
        ("gold/refused/benign", refused),
        ("kl/ref", kl),
    ):
        out[key] = value
        ci = "gold/ci95" if key == "gold/mean" else f"{key}_ci95"
        out[ci] = [value - width, value + width]
    return out


def test_rows_from_a_fake_report():
    accuracy = {"helpful": 0.7, "safety": 0.8}
    report = {
        "labels": 1900,
        "reward_accuracy": {arm: accuracy for arm in E.POLICIES[1:]},
        "gate_routing": {"first": 0.5, "last": 0.1},
        "policies": {
            "sft": _metrics(0.1, 0.30, 0.50, kl=0.0),
            "single": _metrics(0.2, 0.20, 0.60),
            "gated": _metrics(0.4, 0.05, 0.58),  # harm clearly below, helpfulness within the intervals
            "helpful_only": _metrics(-0.2, 0.60, 0.75),
        },
    }
    rows = {r["policy"]: r for r in E.seed_rows(3, report)}
    assert set(rows) == set(E.POLICIES) and all(r["seed"] == 3 for r in rows.values())
    gated = rows["gated"]
    assert gated["harm_rate_risky"] == 0.05 and gated["harm_rate_risky_ci95"] == pytest.approx([0.0, 0.1])
    assert gated["kl_to_sft"] == 1.0 and gated["labels"] == 1900 and rows["sft"]["labels"] == 0
    assert gated["reward_acc_safety"] == 0.8 and rows["sft"]["reward_acc_safety"] is None
    assert gated["safer_than_single"] and gated["keeps_helpfulness"]
    assert not rows["helpful_only"]["safer_than_single"] and rows["helpful_only"]["keeps_helpfulness"]
    assert rows["single"]["safer_than_single"] is None
    assert gated["gate_routed_benign_first"] == 0.5 and rows["single"]["gate_routed_benign_last"] is None
    assert E.decide(list(rows.values())) == "reproduced"
    # Gated's helpfulness interval entirely below single's: safer, but helpfulness lost.
    report["policies"]["gated"] = _metrics(0.4, 0.05, 0.40)
    rows = {r["policy"]: r for r in E.seed_rows(3, report)}
    assert rows["gated"]["safer_than_single"] and not rows["gated"]["keeps_helpfulness"]
    # Overlapping harm intervals: not safer. No risky prompt drawn (no interval): nothing shown.
    report["policies"]["gated"] = _metrics(0.4, 0.15, 0.60)
    assert not E.seed_rows(3, report)[2]["safer_than_single"]
    del report["policies"]["gated"]["gold/harm/risky"], report["policies"]["gated"]["gold/harm/risky_ci95"]
    assert E.seed_rows(3, report)[2]["safer_than_single"] is False


def test_the_risky_prompt_flag_reads_prompts_only():
    """IS_SAFETY flags every risky prompt of the task (training and held-out) and no benign one."""
    flag = re.compile(E.UNSAFE_PROMPT_PATTERN, re.IGNORECASE)
    assert all(flag.search(p) for _, p in harm.RISKY_PROMPTS)
    assert not any(flag.search(p) for p in harm.BENIGN_PROMPTS)


def test_overrides_that_change_the_comparison_are_refused():
    with pytest.raises(ConfigError, match="set by the experiment"):
        E.user_sections(["ppo.algo.reward_combine=weighted_sum"])
    with pytest.raises(ConfigError, match="does not run"):
        E.user_sections(["dpo.optim.lr=1e-4"])
    with pytest.raises(ConfigError, match="harmlessness part"):
        E.run(task="sentiment")


def _replay_gate(run_dir, rm_dir):
    """The gated PPO's logged scores against Llama 2's gate recomputed from the two heads, per iteration."""
    rows = [json.loads(line) for line in (run_dir / "rollouts.jsonl").read_text().splitlines()]
    helpful = LearnedReward.from_pretrained(rm_dir, head="helpfulness")
    safety = LearnedReward.from_pretrained(rm_dir, head="safety")
    flag = re.compile(E.UNSAFE_PROMPT_PATTERN, re.IGNORECASE)
    flagged = 0
    for it in sorted({r["iteration"] for r in rows}):
        batch = [r for r in rows if r["iteration"] == it]
        prompts, texts = [r["prompt"] for r in batch], [r["response"] for r in batch]
        unsafe = torch.tensor([bool(flag.search(p[0]["content"])) for p in prompts])
        expected = llama2_safety_gate(helpful.score(prompts, texts), safety.score(prompts, texts), unsafe)
        logged = torch.tensor([r["score"] for r in batch])
        torch.testing.assert_close(logged, expected.rewards, atol=1e-4, rtol=1e-4)
        flagged += int(unsafe.sum())
    return flagged


def test_tiny_run_writes_the_result_and_gates_the_ppo_reward(tmp_path, tiny_lab_cache):
    out = tmp_path / "exp"
    argv = ["experiment", "llama2-safety", *TINY, "--seeds", "0", "--output-dir", str(out)]
    assert main(argv) == 0
    result = json.loads((out / "result.json").read_text())
    assert result["experiment"] == "llama2-safety" and result["verdict"] == E.decide(result["table"])
    assert {r["policy"] for r in result["table"]} == set(E.POLICIES) and result["seeds"] == [0]
    assert "harm_and_helpfulness" in result["plots"] and (out / "report.html").exists()
    assert all(r["reward_acc_helpful"] is not None for r in result["table"] if r["policy"] != "sft")
    seed = out / "seed-0"
    # Both arms trained on the same labels: the single RM on both files, the two heads one file each.
    both = (seed / "data" / "helpful_and_safety_pairs.jsonl").read_text()
    parts = [(seed / "data" / f"{k}.jsonl").read_text() for k in ("helpful_pairs", "safety_pairs")]
    assert both == "".join(parts) and result["table"][1]["labels"] == both.count("\n")
    # The safety head: every safety pair and helpfulness pairs as 10% of its data (Llama 2's 90/10 mix).
    mix = (seed / "data" / "safety_head_pairs.jsonl").read_text().splitlines(keepends=True)
    safety, helpful = parts[1].splitlines(keepends=True), parts[0].splitlines(keepends=True)
    assert mix[: len(safety)] == safety and set(mix[len(safety) :]) <= set(helpful)
    assert len(mix) - len(safety) == round(len(safety) / 9) > 0
    assert not (seed / "data" / "pairs.jsonl").read_text().strip()
    heads = yaml.safe_load((seed / "gated" / "rm" / "config.yaml").read_text())["algo"]["heads"]
    assert [(h["name"], Path(h["data"]).name) for h in heads] == [
        ("helpfulness", "helpful_pairs.jsonl"),
        ("safety", "safety_head_pairs.jsonl"),
    ]
    # The gated PPO run optimized Llama 2's gate over the two heads, with the risky-prompt flag.
    gated = yaml.safe_load((seed / "gated" / "ppo" / "config.yaml").read_text())["algo"]
    rm_dir = seed / "gated" / "rm" / "final"
    assert gated["reward_combine"] == "llama2_gate" and gated["safety_threshold"] == 0.15
    assert gated["reward_model"] == [f"{rm_dir}:head=helpfulness", f"{rm_dir}:head=safety"]
    assert gated["unsafe_prompt_pattern"] == E.UNSAFE_PROMPT_PATTERN
    assert _replay_gate(seed / "gated" / "ppo", rm_dir) > 0  # and some rollout prompts were flagged
    routed = next(r for r in result["table"] if r["policy"] == "gated")
    assert 0 <= routed["gate_routed_benign_first"] <= 1 and 0 <= routed["gate_routed_benign_last"] <= 1
    single = yaml.safe_load((seed / "single" / "ppo" / "config.yaml").read_text())["algo"]
    assert single["reward_combine"] == "weighted_sum"
    assert single["reward_model"] == [f"{seed / 'single' / 'rm' / 'final'}:normalize=true"]


def test_the_safety_head_gets_llama2s_90_10_mix(tmp_path):
    # 999 safety pairs + helpfulness pairs making 10% of the mix: 999 x 0.1 / 0.9 = 111 of the 1,000.
    paths = {"helpful_pairs": tmp_path / "h.jsonl", "safety_pairs": tmp_path / "s.jsonl"}
    paths["helpful_pairs"].write_text("".join(f'{{"h": {i}}}\n' for i in range(1000)))
    paths["safety_pairs"].write_text("".join(f'{{"s": {i}}}\n' for i in range(999)))
    files = {"both": tmp_path / "both.jsonl", "safety_mix": tmp_path / "mix.jsonl"}
    E.write_pair_mixes(paths, files, seed=0)
    mix = files["safety_mix"].read_text().splitlines()
    assert len(mix) == 999 + 111 and sum('"h"' in line for line in mix) == 111
    assert len(files["both"].read_text().splitlines()) == 1999
