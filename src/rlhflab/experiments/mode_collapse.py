"""Diversity and calibration before and after alignment (`rlhflab experiment mode-collapse`).

Kirk et al. (2024, "Understanding the effects of RLHF on LLM generalisation and diversity") found RLHF policies
less diverse than the SFT model they started from, both among several outputs for one input and across inputs.
The GPT-4 technical report (OpenAI 2023, Figure 8) shows the pre-trained model's answer probabilities on MMLU
calibrated (expected calibration error 0.007) and the post-trained (RLHF) model's not (0.074); Kadavath et al.
(2022, "Language Models (Mostly) Know What They Know") found pretrained LMs calibrated on multiple-choice answers
and RLHF policies less so.

Here, per seed, on the lab's `arith` task (add 2-4 one-digit numbers step by step, "3 + 5 = 8 , 8 + 2 = 1 0 ,
answer 1 0 ."; the task has a verifiable answer, so a probability of it and whether it is right both exist):

    1. pipeline  the lab's data, SFT from the task's pretrained base model, the reward model on the annotators'
                 pairs, then from the SFT model: PPO against the reward model, DPO on the pairs, and GRPO against
                 the verifiable reward `rule:arithmetic` (1 when the final answer is the prompt's sum)
    2. sample    `eval.samples` (K) responses of every policy to each of `eval.prompts` held-out problems at
                 temperature 1: the base model, SFT, PPO, DPO, GRPO, and best-of-n (each of its K responses the
                 reward model's pick among `eval.best_of_n` fresh SFT samples)
    3. measure   per prompt, over its K samples (words split on spaces): distinct-1, distinct-2 (Li et al.
                 2016), unigram entropy and self-BLEU (BLEU-4, Zhu et al. 2018); accuracy (the final answer is the
                 true sum, by the lab's gold); the confidence of each answered sample: the probability the policy
                 gives the number it wrote after "answer", teacher-forced on its own response up to there
                 (`rlhflab.eval.calibration.answer_logprob`), and the ECE of those confidences against
                 correctness (10 equal-width bins). Best-of-n is a procedure, not a model: its confidences are
                 the SFT model's, the model that wrote the picks. Beside the rule (added after the first full
                 run, which showed why they are needed): the share of distinct responses per prompt, and a
                 second confidence, the share of the prompt's other samples that reach the same answer
                 (`consistency_confidence`): the answer probability given the policy's own steps mostly measures
                 whether the answer copies the last step's result, so a slip carried forward is a confident
                 wrong answer; the agreement of samples estimates the answer's probability with the steps
                 marginalised out, closer to the direct-answer probabilities of the GPT-4 report, and for
                 best-of-n it is the procedure's own (its K picks come from K independent pools).
    4. compare   each method against SFT on the same prompts: paired per-prompt Student-t 95% intervals for the
                 diversity metrics and accuracy; a percentile bootstrap over prompts (paired) for ECE

A caveat the numbers need: each arith problem has one right solution, so a policy that gets more problems right
must also write fewer distinct solutions to each. Kirk et al.'s tasks (summarisation, instruction following) had
many good outputs. The accuracy column is there to read the diversity columns against.

The verdict rule (RULE) was fixed before the first full run.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from rlhflab.core.run_dir import prepare_run_dir
from rlhflab.errors import ConfigError
from rlhflab.experiments.result import publish_run

NAME = "mode-collapse"
CLAIM = (
    "Alignment (PPO, DPO, best-of-n, GRPO) makes a model's outputs less diverse than the SFT model's (lower "
    "distinct-2, higher self-BLEU), and a policy trained by it (PPO, DPO, GRPO) gives worse-calibrated "
    "probabilities to its answers (higher expected calibration error)."
)
SOURCE = (
    "Kirk et al. 2024, Understanding the effects of RLHF on LLM generalisation and diversity (RLHF lowers per-input "
    "and across-input output diversity relative to SFT); OpenAI 2023, GPT-4 Technical Report, Figure 8 (calibration "
    "on MMLU: pre-trained ECE 0.007, post-trained 0.074); Kadavath et al. 2022, Language Models (Mostly) Know What "
    "They Know (pretrained LMs calibrated on multiple-choice answers, RLHF policies less so); Guo et al. 2017, eq. 3 "
    "(ECE); Zhu et al. 2018, Texygen (self-BLEU)"
)
TASK = "arith"
POLICIES = ("base", "sft", "ppo", "dpo", "best_of_n", "grpo")
ALIGNED = ("ppo", "dpo", "best_of_n", "grpo")
CALIBRATED = ("ppo", "dpo", "grpo")  # the trained policies: their own probabilities are read
TITLES = {
    "base": "base (pretrained)",
    "sft": "SFT",
    "ppo": "PPO",
    "dpo": "DPO",
    "best_of_n": "best-of-n",
    "grpo": "GRPO (rule:arithmetic)",
}
RULE = (
    "Per seed, each alignment method is compared with the SFT model on the same held-out problems. Diversity falls "
    "for a method when the 95% interval of the paired per-prompt difference (method minus SFT; Student-t over "
    "prompts) of distinct-2 among a prompt's samples lies below 0 and that of self-BLEU (BLEU-4) lies above 0. "
    "Calibration worsens for a trained method (PPO, DPO, GRPO) when the percentile-bootstrap 95% interval (prompts "
    "resampled, paired) of its ECE minus the SFT model's ECE (10 equal-width bins, answered samples) lies above 0. "
    "Part D holds on a seed when diversity falls for all of PPO, DPO, best-of-n and GRPO; part C when calibration "
    "worsens for all of PPO, DPO and GRPO. reproduced: D and C hold on every seed; partly reproduced: otherwise, if "
    "D or C holds on at least one seed; otherwise not reproduced. Best-of-n's ECE (the SFT model's probabilities on "
    "its picks), the base model, distinct-1, entropy and accuracy are reported beside the verdict."
)
# Which way each metric moves if the claim holds (+1 up, -1 down, 0 no direction), and which the rule reads.
DIRECTION = {
    "distinct_1": -1, "distinct_2": -1, "entropy": -1, "self_bleu": 1, "distinct_responses": -1, "ece": 1,
    "ece_consistency": 1, "accuracy": 0,
}  # fmt: skip
# The two confidences: the answer's probability given the policy's own steps (the rule's), and the agreement of
# the prompt's other samples with the answer (its probability with the steps marginalised out; beside the rule).
CONFIDENCES = {"ece": "confidence", "ece_consistency": "consistency"}
IN_RULE = {"distinct_2": ALIGNED, "self_bleu": ALIGNED, "ece": CALIBRATED}
PIPELINE_METHODS = ("sft", "rm", "ppo", "dpo", "grpo")
# GRPO against the verifier, not the reward model; PPO and GRPO may write the longest arith solution (about 30
# tokens; the pipeline's 24 would cut 4-number solutions before their answer).
PIPELINE_FIXED = [
    "grpo.algo.reward_model=[rule:arithmetic]",
    "ppo.sampling.max_new_tokens=32",
    "grpo.sampling.max_new_tokens=32",
]
# The pipeline's own evaluation (report.json) is kept small: this experiment measures with its own.
PIPELINE_EVAL = [
    "eval.prompts=16", "eval.samples=1", "eval.curve_points=1", "eval.curve_prompts=8", "eval.curve_samples=1",
    "eval.rm_pairs=64",
]  # fmt: skip
# The measuring budget, set from the time limit (about 10 minutes for one seed on 2 CPU cores) before any run,
# never tuned on the held-out problems: 256 x 8 samples per policy, best-of-16 (32,768 SFT samples) the largest part.
EVAL = {"prompts": 256, "samples": 8, "best_of_n": 16, "bins": 10, "bootstrap": 1000}
EVAL_BATCH = 512


def user_sections(overrides: Sequence[str]) -> tuple[list[str], dict[str, int]]:
    """(pipeline overrides, the measuring section): `eval.*` keys set the measuring (EVAL); every other key goes
    to the pipeline (its stage sections, `data.*`, `annotators.*`)."""
    from rlhflab.experiments.common import split_overrides

    pipeline, own = split_overrides(
        NAME,
        overrides,
        own={"eval": EVAL},
        pipeline=(*PIPELINE_METHODS, "data", "annotators"),
        fixed={"grpo.algo.reward_model": "GRPO against rule:arithmetic"},
    )
    ev = own["eval"]
    if ev["samples"] < 2:
        raise ConfigError(f"{NAME}: eval.samples must be >= 2 (self-BLEU compares a prompt's samples)")
    return pipeline, ev


def check_configs(seeds: Sequence[int], output_dir: str, pipeline: Sequence[str]) -> list[str]:
    """Build every seed's stage configs (and so validate them) before any work; returns the pipeline overrides."""
    from rlhflab.pipeline import _configs, _section, _user_sections

    overrides = [*PIPELINE_EVAL, *PIPELINE_FIXED, *pipeline]
    user = _user_sections(None, overrides)
    for seed in seeds:
        run_dir = Path(output_dir) / f"seed-{seed}" / "run"
        data = {name: run_dir / "data" / f"{name}.jsonl" for name in ("sft", "pairs", "prompts")}
        _configs(list(PIPELINE_METHODS), run_dir, seed, TASK, user, data, _section(user, "eval"))
    return overrides


# --------------------------------------------------------------------------------------------------------
# Samples and their confidences
# --------------------------------------------------------------------------------------------------------


def answer_token_ids(tokenizer) -> tuple[int, list[int]]:
    """The ids of the answer marker "answer" and of the digits 0-9: each must be one token of the vocabulary."""
    words = ["answer", *map(str, range(10))]
    ids = tokenizer.convert_tokens_to_ids(words)
    missing = [w for w, i in zip(words, ids) if i is None or i == tokenizer.unk_token_id]
    if missing:
        raise ConfigError(
            f"{NAME}: the tokenizer has no single token for {missing}: it is not an arith model"
        )
    return ids[0], ids[1:]


def text_rollout(tokenizer, chats: Sequence, responses: Sequence[str]):
    """A `Rollout` of given response texts behind chat prompts (prompts left-padded, responses right-padded, no
    EOS), to teacher-force a model on them."""
    import torch

    from rlhflab.rollout.generate import Rollout, encode_prompts

    prompt_rows = encode_prompts(tokenizer, chats)
    resp_rows = [
        list(tokenizer(r, add_special_tokens=False)["input_ids"]) or [tokenizer.pad_token_id]
        for r in responses
    ]
    pad = tokenizer.pad_token_id
    p_width, r_width = max(map(len, prompt_rows)), max(map(len, resp_rows))
    prompt_ids = torch.full((len(chats), p_width), pad)
    prompt_mask = torch.zeros((len(chats), p_width), dtype=torch.bool)
    resp_ids = torch.full((len(chats), r_width), pad)
    resp_mask = torch.zeros((len(chats), r_width), dtype=torch.bool)
    for i, (p, r) in enumerate(zip(prompt_rows, resp_rows)):
        prompt_ids[i, p_width - len(p) :], prompt_mask[i, p_width - len(p) :] = torch.tensor(p), True
        resp_ids[i, : len(r)], resp_mask[i, : len(r)] = torch.tensor(r), bool(responses[i])
    ended = torch.zeros(len(chats), dtype=torch.bool)
    return Rollout(prompt_ids, prompt_mask, resp_ids, resp_mask, ended, list(responses), list(chats))


def answer_confidence(
    model, tokenizer, prompts: Sequence[str], responses: Sequence[Sequence[str]]
) -> np.ndarray:
    """[P, K] the probability `model` gives the final answer of each response (nan: no answer), teacher-forced
    on the response behind its chat-formatted prompt."""
    from rlhflab.eval.calibration import answer_logprobs
    from rlhflab.lab.tasks import chat_prompt

    answer_id, digit_ids = answer_token_ids(tokenizer)
    k = len(responses[0])
    chats = [chat_prompt(p) for p in prompts for _ in range(k)]
    flat = [r for rs in responses for r in rs]
    logps = answer_logprobs(model, text_rollout(tokenizer, chats, flat), answer_id, digit_ids, EVAL_BATCH)
    return logps.exp().numpy().reshape(len(prompts), k)


def _policy_record(task, prompts, responses, model, tokenizer) -> dict[str, list]:
    """What seed.json keeps of one policy: its responses [P][K], correct [P][K], confidence [P][K] (None: no answer)."""
    from rlhflab.lab.evaluate import score_responses

    correct = score_responses(task, list(prompts), responses).components["outcome"] > 0.5
    conf = answer_confidence(model, tokenizer, prompts, responses)
    return {
        "responses": [list(r) for r in responses],
        "correct": correct.tolist(),
        "confidence": [[None if np.isnan(c) else float(c) for c in row] for row in conf],
    }


def sample_seed(task, seed: int, run_dir: Path, base_dir: str, ev: Mapping[str, int]) -> dict[str, Any]:
    """Steps 2-3's raw material: every policy's samples of the held-out problems, with correctness and confidence."""
    from rlhflab.lab.evaluate import sample_policy
    from rlhflab.lab.tasks import chat_prompt
    from rlhflab.models.loading import load_causal_lm, load_tokenizer
    from rlhflab.rewards import LearnedReward
    from rlhflab.rollout.generate import SamplingSettings
    from rlhflab.stages.best_of_n import best_of_n

    prompts = task.heldout_prompts(ev["prompts"], seed=seed)
    dirs = {"base": Path(base_dir), **{m: run_dir / m / "final" for m in ("sft", "ppo", "dpo", "grpo")}}
    out: dict[str, Any] = {}
    for name in POLICIES:
        if name == "best_of_n":
            continue
        model, tokenizer = load_causal_lm(dirs[name]).eval(), load_tokenizer(dirs[name])
        samples = sample_policy(
            model, tokenizer, task, prompts, n_samples=ev["samples"], seed=seed + 2, batch_size=EVAL_BATCH
        )
        out[name] = _policy_record(task, prompts, samples.responses, model, tokenizer)
    # Best-of-n: each of the K responses is the reward model's pick among n fresh SFT samples.
    sft, tokenizer = load_causal_lm(dirs["sft"]).eval(), load_tokenizer(dirs["sft"])
    reward = LearnedReward.from_pretrained(run_dir / "rm" / "final", batch_size=EVAL_BATCH)
    settings = SamplingSettings(max_new_tokens=task.max_new_tokens)
    chats = [chat_prompt(p) for p in prompts]
    picks = [
        best_of_n(
            sft, tokenizer, chats, reward, n=ev["best_of_n"], settings=settings, batch_size=EVAL_BATCH,
            seed=seed + 100 + j,
        ).texts
        for j in range(ev["samples"])
    ]  # fmt: skip
    responses = [[picks[j][i] for j in range(ev["samples"])] for i in range(len(prompts))]
    out["best_of_n"] = _policy_record(task, prompts, responses, sft, tokenizer)
    return {"prompts": prompts, "best_of_n": ev["best_of_n"], "policies": out}


# --------------------------------------------------------------------------------------------------------
# Metrics, table, verdict
# --------------------------------------------------------------------------------------------------------


def per_prompt_metrics(record: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """One policy's per-prompt [P] diversity (over its K samples, words split on spaces) and accuracy."""
    from rlhflab.eval import metrics as M

    words = [[r.split() for r in rs] for rs in record["responses"]]
    return {
        "distinct_1": np.array([M.distinct_n(w, 1) for w in words]),
        "distinct_2": np.array([M.distinct_n(w, 2) for w in words]),
        "entropy": np.array([M.unigram_entropy(w) for w in words]),
        "self_bleu": np.array([M.self_bleu(w) for w in words]),
        "distinct_responses": np.array([len(set(rs)) / len(rs) for rs in record["responses"]]),
        "accuracy": np.asarray(record["correct"], dtype=np.float64).mean(axis=1),
    }


def calibration_arrays(
    record: Mapping[str, Any], kind: str = "confidence"
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(confidence, correct, present) [P, K] of one policy's record (confidence nan where no answer). kind:
    "confidence" (the saved answer probabilities) or "consistency" (`consistency_confidence` of the final
    answers parsed from the saved responses)."""
    from rlhflab.eval.calibration import consistency_confidence
    from rlhflab.experiments.prm_vs_orm import final_answer

    if kind == "consistency":
        answers = [[-1 if (a := final_answer(r)) is None else a for r in rs] for rs in record["responses"]]
        conf = consistency_confidence(answers)
    else:
        conf = np.array(
            [[np.nan if c is None else c for c in row] for row in record["confidence"]], dtype=float
        )
    return conf, np.asarray(record["correct"], dtype=bool), ~np.isnan(conf)


def _t(values: np.ndarray) -> tuple[float, float, float]:
    from rlhflab.eval import metrics as M

    return M.mean_ci95(values)


def seed_rows(seed: int, result: Mapping[str, Any], ev: Mapping[str, int]) -> list[dict]:
    """One row per policy (each metric with the half-width of its 95% interval; each ECE with its bootstrap
    interval), then one per aligned method and metric: the paired difference from SFT, its interval, and whether
    it moves the claim's way with the interval excluding 0 (`holds`)."""
    from rlhflab.eval.calibration import bootstrap_ece

    policies = result["policies"]
    per = {name: per_prompt_metrics(rec) for name, rec in policies.items()}
    cal = {
        (n, m): calibration_arrays(rec, kind)
        for n, rec in policies.items()
        for m, kind in CONFIDENCES.items()
    }
    boot = {"n_bins": ev["bins"], "n_boot": ev["bootstrap"], "seed": seed}
    rows = []
    for name in (p for p in POLICIES if p in policies):
        row: dict[str, Any] = {"seed": seed, "policy": name}
        for metric, values in per[name].items():
            mean, lo, hi = _t(values)
            row[metric], row[f"{metric}_ci95"] = mean, (hi - lo) / 2
        for metric in CONFIDENCES:
            conf, correct, present = cal[name, metric]
            row[metric], row[f"{metric}_ci95_low"], row[f"{metric}_ci95_high"] = bootstrap_ece(
                conf, correct, present, **boot
            )
            mean_conf = float(conf[present].mean()) if present.any() else float("nan")
            row["mean_confidence" if metric == "ece" else "mean_consistency"] = mean_conf
        row["answered"] = float(cal[name, "ece"][2].mean())
        rows.append(row)
    for name in (m for m in ALIGNED if m in policies and "sft" in policies):
        for metric, sign in DIRECTION.items():
            if metric in CONFIDENCES:
                diff, lo, hi = bootstrap_ece(*cal[name, metric], baseline=cal["sft", metric], **boot)
            else:
                diff, lo, hi = _t(per[name][metric] - per["sft"][metric])
            holds = None if sign == 0 else bool((sign > 0 and lo > 0) or (sign < 0 and hi < 0))
            rows.append(
                {
                    "seed": seed, "comparison": f"{name} - sft", "metric": metric, "difference": diff,
                    "ci95_low": lo, "ci95_high": hi, "holds": holds, "in_rule": name in IN_RULE.get(metric, ()),
                }
            )  # fmt: skip
    return rows


def decide(rows: Sequence[Mapping]) -> str:
    """The verdict of RULE from the comparison rows (a missing comparison does not hold)."""
    holds = {
        (r["seed"], r["comparison"].split(" - ")[0], r["metric"]): bool(r["holds"])
        for r in rows
        if "comparison" in r
    }
    seeds = sorted({s for s, _, _ in holds})
    if not seeds:
        return "not reproduced"
    diversity = [
        all(holds.get((s, m, k), False) for m in ALIGNED for k in ("distinct_2", "self_bleu")) for s in seeds
    ]
    calibration = [all(holds.get((s, m, "ece"), False) for m in CALIBRATED) for s in seeds]
    if all(diversity) and all(calibration):
        return "reproduced"
    return "partly reproduced" if any(diversity) or any(calibration) else "not reproduced"


def _num(value) -> str:
    return "–" if value is None or value != value else f"{value:.3f}"


def findings(rows: Sequence[Mapping]) -> list[str]:
    """The numbers behind the verdict, in words, seed by seed."""
    lines = []
    for seed in sorted({r["seed"] for r in rows}):
        for r in (r for r in rows if r["seed"] == seed and "policy" in r):
            lines.append(
                f"seed {seed}, {TITLES[r['policy']]}: distinct-1 {_num(r['distinct_1'])}, distinct-2 "
                f"{_num(r['distinct_2'])} ± {_num(r['distinct_2_ci95'])}, entropy {_num(r['entropy'])}, self-BLEU "
                f"{_num(r['self_bleu'])} ± {_num(r['self_bleu_ci95'])}, distinct responses "
                f"{_num(r['distinct_responses'])}; accuracy {_num(r['accuracy'])} ± {_num(r['accuracy_ci95'])}, "
                f"ECE {_num(r['ece'])} [{_num(r['ece_ci95_low'])}, {_num(r['ece_ci95_high'])}] at mean confidence "
                f"{_num(r['mean_confidence'])}; ECE of the samples' agreement {_num(r['ece_consistency'])} at mean "
                f"{_num(r['mean_consistency'])}; answered {_num(r['answered'])}"
            )
        comps = [r for r in rows if r["seed"] == seed and "comparison" in r]
        for method in ALIGNED:
            mine = {r["metric"]: r for r in comps if r["comparison"] == f"{method} - sft"}
            if not mine:
                continue
            parts = [
                f"{metric} {mine[metric]['difference']:+.3f} [{_num(mine[metric]['ci95_low'])}, "
                f"{_num(mine[metric]['ci95_high'])}]" + ("" if mine[metric]["holds"] is None else
                (" (the claim's way)" if mine[metric]["holds"] else " (not shown)"))
                for metric in ("distinct_2", "self_bleu", "ece", "ece_consistency", "accuracy")
            ]  # fmt: skip
            lines.append(
                f"seed {seed}, {TITLES[method]} minus SFT (paired over prompts): " + "; ".join(parts)
            )
    return lines


# --------------------------------------------------------------------------------------------------------
# Plots
# --------------------------------------------------------------------------------------------------------


def plot_reliability(results: Mapping[int, Mapping[str, Any]], n_bins: int) -> bytes | None:
    """Reliability diagrams, every seed's answered samples pooled: one column per policy, one row per confidence
    (the answer probability; the agreement of the other samples). Bars: each bin's accuracy over its confidence
    range; grey steps: the share of the samples in the bin; dashed: perfect calibration."""
    import matplotlib.pyplot as plt

    from rlhflab.eval.calibration import expected_calibration_error, reliability_bins
    from rlhflab.eval.report import figure_png

    kinds = {"confidence": "answer probability", "consistency": "agreement of samples"}
    fig, axes = plt.subplots(len(kinds), len(POLICIES), figsize=(2.6 * len(POLICIES), 5.6), squeeze=False)
    for row, (kind, label) in enumerate(kinds.items()):
        for ax, name in zip(axes[row], POLICIES):
            arrays = [
                calibration_arrays(r["policies"][name], kind)
                for r in results.values()
                if name in r["policies"]
            ]
            conf = np.concatenate([c[p] for c, _, p in arrays]) if arrays else np.zeros(0)
            right = np.concatenate([y[p] for _, y, p in arrays]) if arrays else np.zeros(0, dtype=bool)
            bins = reliability_bins(conf, right, n_bins)
            accuracy = np.nan_to_num(bins["accuracy"])
            ax.bar(bins["lower"], accuracy, 1.0 / n_bins, align="edge", color="C0", edgecolor="k", lw=0.4)
            share = bins["count"] / max(1.0, bins["count"].sum())
            ax.stairs(share, np.append(bins["lower"], 1.0), color="0.5", lw=1.0)
            ax.plot([0, 1], [0, 1], "k--", lw=0.8)
            ece = _num(expected_calibration_error(conf, right, n_bins))
            ax.set_title(f"{TITLES[name]}\nECE {ece}", fontsize=8)
            ax.set_xlim(0, 1), ax.set_ylim(0, 1)
            ax.set_xlabel(label, fontsize=8)
        axes[row][0].set_ylabel("accuracy in bin", fontsize=8)
    fig.tight_layout()
    return figure_png(fig)


def plot_diversity(rows: Sequence[Mapping]) -> bytes | None:
    """Per-prompt diversity per policy: the mean over seeds as a bar, each seed's value as a dot."""
    import matplotlib.pyplot as plt

    from rlhflab.eval.report import figure_png

    metrics = (("distinct_1", "distinct-1"), ("distinct_2", "distinct-2"), ("entropy", "unigram entropy (nats)"),
               ("self_bleu", "self-BLEU (higher = less diverse)"))  # fmt: skip
    names = [p for p in POLICIES if any(r.get("policy") == p for r in rows)]
    fig, axes = plt.subplots(1, len(metrics), figsize=(3.4 * len(metrics), 3.4), squeeze=False)
    for ax, (metric, label) in zip(axes[0], metrics):
        for k, name in enumerate(names):
            values = [r[metric] for r in rows if r.get("policy") == name]
            ax.bar(k, float(np.mean(values)), color=f"C{k}")
            ax.plot([k] * len(values), values, "k.", ms=4)
        ax.set_xticks(range(len(names)), [TITLES[n] for n in names], rotation=40, ha="right", fontsize=7)
        ax.set_title(label, fontsize=9)
    return figure_png(fig)


# --------------------------------------------------------------------------------------------------------
# The experiment
# --------------------------------------------------------------------------------------------------------


def run_seed(task, seed: int, seed_dir: Path, overrides: Sequence[str], ev: Mapping[str, int]) -> dict:
    """One seed: the pipeline (step 1), the samples and their confidences (steps 2-3); writes SEED_DIR/seed.json."""
    from rlhflab.config import parse_overrides
    from rlhflab.core.io import atomic_write_text
    from rlhflab.lab.launch import lab_model_dir
    from rlhflab.pipeline import run_pipeline

    run_pipeline(
        task=task.name, seed=seed, output_dir=str(seed_dir / "run"), overrides=list(overrides), overwrite=True,
        methods=list(PIPELINE_METHODS),
    )  # fmt: skip
    # The base model is what the pipeline's SFT started from (the lab's pretrained model unless overridden).
    sft_model = (
        parse_overrides(list(overrides)).get("sft", {}).get("model", {}).get("name_or_path", f"lab:{TASK}")
    )
    print(f"== {NAME}: {ev['samples']} samples of {ev['prompts']} held-out problems from each policy")
    result = sample_seed(task, seed, seed_dir / "run", lab_model_dir(str(sft_model), seed=seed), ev)
    atomic_write_text(seed_dir / "seed.json", json.dumps(result) + "\n")
    return result


def run(
    seeds: Sequence[int] = (0,),
    output_dir: str = "runs/mode-collapse",
    *,
    task: str | None = None,
    overrides: Sequence[str] = (),
    overwrite: bool = False,
    resume: bool = False,
) -> Path:
    """Run the experiment; returns the path of report.html. With `resume`, seeds whose seed.json exists are
    read back, not run again."""
    from rlhflab.lab.tasks import get_task

    t0 = time.time()
    if task not in (None, TASK):
        raise ConfigError(
            f"{NAME} needs the '{TASK}' task (an answer whose probability can be read), got --task {task}"
        )
    task_obj = get_task(TASK)
    pipeline, ev = user_sections(overrides)
    pipeline_overrides = check_configs(seeds, output_dir, pipeline)
    out = prepare_run_dir(output_dir, "experiment", resume=resume, overwrite=overwrite)
    results: dict[int, dict] = {}
    for i, seed in enumerate(seeds, 1):
        seed_dir = out / f"seed-{seed}"
        if resume and (seed_dir / "seed.json").is_file():
            results[seed] = json.loads((seed_dir / "seed.json").read_text())
            continue
        print(f"== {NAME}: seed {seed} ({i}/{len(seeds)})")
        results[seed] = run_seed(task_obj, seed, seed_dir, pipeline_overrides, ev)
    rows = [row for seed in seeds for row in seed_rows(seed, results[seed], ev)]
    return publish_run(
        __name__,
        out,
        verdict=decide(rows),
        findings=findings(rows),
        table=rows,
        images={"reliability": plot_reliability(results, ev["bins"]), "diversity": plot_diversity(rows)},
        started=t0,
        seeds=seeds,
        output_dir=output_dir,
        overrides=overrides,
    )
