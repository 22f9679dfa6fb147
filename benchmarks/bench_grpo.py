"""The GRPO and sampler comparisons of `compare_trl.py`: the settings both sides share, how each side spells
them, the reward both compute, and the figures and tables of these runs.

    grpo      `rlhflab grpo` (stages/critic_free.py) vs TRL's GRPOTrainer: completions/s (steady and end to
              end), peak RSS above the post-import baseline, where an iteration's time goes, and the mean
              completion length of each side (a side writing shorter completions would do less work).
    generate  rlhflab's sampler (`rlhflab.rollout.generate`) vs a plain `model.generate` call on the same model,
              prompts, seeds and sampling settings: new tokens/s.

Standard library only at import time (imported by the driver, by both children and by tests/benchmarks), so
neither venv needs anything of the other's.
"""

from __future__ import annotations

import hashlib
import json
import statistics
from collections.abc import Sequence
from typing import Any

from bench_common import json_line, memory_above_baseline, steady_stats

# One GRPO iteration on both sides: 16 prompts x 4 samples = 64 completions of at most 32 new tokens (the
# setting of DESIGN.md's TRL measurement), sampled at temperature 1 with no top-k / top-p, then one
# optimizer step on all 64 (one epoch, one minibatch: the ratio is exactly 1, so neither side needs a
# separate pass for the old log-probs). KL coefficient 0, TRL's default (beta = 0.0): neither side loads a
# reference model. lr 1e-6 (TRL's GRPO default) barely moves the policy over a few iterations, so both sides
# keep sampling from about the model they started from and their completion lengths stay comparable.
GRPO = {
    "prompts_per_iteration": 16,
    "num_generations": 4,
    "max_new_tokens": 32,
    "temperature": 1.0,
    "top_k": 0,
    "top_p": 1.0,
    "lr": 1e-6,
    "beta": 0.0,
    "clip_eps": 0.2,
    # The reward: -coef * |words - target|, words = whitespace-separated words of the decoded completion
    # (`rlhflab.rewards.rules.LengthPenalty`, spec rule:length). coef is a power of two, so the score of an
    # integer word count is exact in float32 and float64 alike: both sides compute the same bits.
    "reward_coef": 0.125,
    "reward_target": 24,
    "max_prompt_length": 256,
}
# Per shape: (warm-up iterations, measured iterations) of GRPO, and (warm-up calls, measured calls) of the
# sampler comparison. A SmolLM2-shape GRPO iteration takes tens of seconds on 2 cores.
GRPO_SHAPE_DEFAULTS = {"tiny": (1, 5), "smollm2": (1, 3)}
GEN_SHAPE_DEFAULTS = {"tiny": (1, 8), "smollm2": (1, 4)}
# How TRL is set for GRPO, as the tables name it.
TRL_GRPO_LABEL = (
    "TRL GRPOTrainer: fp32, no grad ckpt, no vLLM, beta 0, loss dapo (= rlhflab token_mean), scale_rewards "
    "group, fused AdamW / wd 0 / constant lr set explicitly, one generation batch of 64 = one optimizer step"
)
GEN_LABEL = (
    "peer: transformers model.generate (tokenize + generate + decode), same model, prompts, seeds and "
    "sampling (T 1, top_k 0, top_p 1, KV cache)"
)
GRPO_PHASES = ("startup", "load", "data", "generate", "score", "update", "save", "other")
GRPO_PHASE_LABELS = {
    "startup": "python + imports (spawn to post-import baseline)",
    "load": "model load",
    "data": "prompt data",
    "generate": "generation (tokenize + sample + decode)",
    "score": "reward",
    "update": "update (log-probs, loss, backward, optimizer, bookkeeping)",
    "save": "save the model",
    "other": "other (config, trainer setup, exit)",
}


def per_iteration(s: dict = GRPO) -> int:
    """Completions per GRPO iteration (= per optimizer step on both sides)."""
    return s["prompts_per_iteration"] * s["num_generations"]


# --------------------------------------------------------------------------------------------------------
# The reward, computed identically on both sides
# --------------------------------------------------------------------------------------------------------


def reward_spec(s: dict = GRPO) -> str:
    """The `algo.reward_model` spec rlhflab's side runs (rewards/spec.py)."""
    return f"rule:length:coef={s['reward_coef']}:target={s['reward_target']}"


def length_rewards(completions: Sequence[str], coef: float, target: float) -> list[float]:
    """-coef * |number of whitespace-separated words - target| per completion: what rlhflab's
    `LengthPenalty(coef, target, unit="words")` scores (str.split() ignores leading and trailing whitespace,
    so rlhflab's stripped texts and TRL's unstripped ones count the same words)."""
    return [-coef * abs(len(c.split()) - target) for c in completions]


def trl_reward_function(s: dict = GRPO):
    """The reward function handed to TRL's GRPOTrainer (its reward_funcs signature)."""
    coef, target = s["reward_coef"], s["reward_target"]

    def length_reward(prompts, completions, **kwargs) -> list[float]:
        return length_rewards(completions, coef, target)

    return length_reward


# --------------------------------------------------------------------------------------------------------
# One setting, spelled for each side
# --------------------------------------------------------------------------------------------------------


def rlhflab_overrides(s: dict, iterations: int) -> list[str]:
    """`rlhflab grpo` config overrides (besides paths and logging) for the shared settings."""
    return [
        "model.device=cpu",
        "model.dtype=float32",
        "model.autocast=none",
        "model.gradient_checkpointing=false",
        f"data.max_prompt_length={s['max_prompt_length']}",
        f"algo.reward_model={reward_spec(s)}",
        "algo.missing_eos_penalty=0",  # TRL has no such penalty
        f"algo.iterations={iterations}",
        f"algo.prompts_per_iteration={s['prompts_per_iteration']}",
        f"algo.num_generations={s['num_generations']}",
        "algo.ppo_epochs=1",
        "algo.minibatch_size=0",  # all completions in one update
        f"algo.kl_coef={s['beta']}",
        f"algo.clip_eps={s['clip_eps']}",
        "algo.clip_eps_high=0",
        "algo.scale_rewards=true",
        "algo.loss_aggregation=token_mean",  # TRL's default loss_type "dapo"
        "algo.dynamic_sampling=false",
        f"sampling.max_new_tokens={s['max_new_tokens']}",
        f"sampling.temperature={s['temperature']}",
        f"sampling.top_k={s['top_k']}",
        f"sampling.top_p={s['top_p']}",
        f"optim.lr={s['lr']}",
        "optim.weight_decay=0",
        "optim.warmup_steps=0",
        "optim.scheduler=constant",
        "optim.max_grad_norm=1.0",
        "seed=0",
    ]


def trl_options(s: dict, iterations: int) -> dict[str, Any]:
    """TRL GRPOConfig options for the shared settings (the driver adds float32, no gradient checkpointing
    and the optimizer, as for DPO). per_device_train_batch_size counts completions in TRL: 64 with one
    accumulation step makes one generation batch of 16 prompts x 4 and one optimizer step per generation,
    as rlhflab's iteration does."""
    return {
        "per_device_train_batch_size": per_iteration(s),
        "gradient_accumulation_steps": 1,
        "num_generations": s["num_generations"],
        "num_iterations": 1,
        "max_completion_length": s["max_new_tokens"],
        "temperature": s["temperature"],
        "top_k": s["top_k"],
        "top_p": s["top_p"],
        "min_p": None,
        "repetition_penalty": 1.0,
        "learning_rate": s["lr"],
        "beta": s["beta"],
        "epsilon": s["clip_eps"],
        "loss_type": "dapo",
        "scale_rewards": "group",
        "mask_truncated_completions": False,
        "use_vllm": False,
        "use_transformers_continuous_batching": False,
        "log_completions": False,
        "max_steps": iterations,
        "logging_steps": 1,
    }


# --------------------------------------------------------------------------------------------------------
# What a child records
# --------------------------------------------------------------------------------------------------------


def generation_record(prompt_lengths: Sequence[int], completion_lengths: Sequence[int], ended: int) -> dict:
    """One generation call of a GRPO iteration: its rows' prompt and completion lengths (EOS included) and
    how many ended with EOS (the rest were cut at max_new_tokens)."""
    return {
        "rows": len(completion_lengths),
        "prompt_tokens": [int(x) for x in prompt_lengths],
        "completion_tokens": [int(x) for x in completion_lengths],
        "ended_with_eos": int(ended),
    }


def token_digest(rows: Sequence[Sequence[int]]) -> str:
    """A short fingerprint of sampled token ids (each row up to and including its EOS): equal digests on
    both sides of the sampler comparison mean both sampled exactly the same tokens."""
    return hashlib.sha1(json.dumps([list(map(int, r)) for r in rows]).encode()).hexdigest()[:16]


# --------------------------------------------------------------------------------------------------------
# Figures
# --------------------------------------------------------------------------------------------------------


def lengths(run: dict, skip: int = 0) -> dict[str, float]:
    """Mean prompt and completion length (tokens, EOS included) and the share ended with EOS, over the
    generation calls after the first `skip`."""
    gens = run.get("generations", [])[skip:]
    comp = [n for g in gens for n in g["completion_tokens"]]
    prompt = [n for g in gens for n in g["prompt_tokens"]]
    rows = sum(g["rows"] for g in gens)
    return {
        "completion_mean": statistics.fmean(comp) if comp else 0.0,
        "prompt_mean": statistics.fmean(prompt) if prompt else 0.0,
        "eos_share": sum(g["ended_with_eos"] for g in gens) / rows if rows else 0.0,
        "completions": float(len(comp)),
    }


def _window(run: dict, warmup: int) -> tuple[float, float]:
    """(start, end) of the measured iterations: from the warm-up's last optimizer step (or the first
    iteration's start) to the last optimizer step."""
    ends = run["step_ends"]
    start = ends[warmup - 1] if warmup > 0 else run["first_train"]
    return start, ends[-1]


def iteration_split(run: dict, warmup: int) -> dict[str, float]:
    """Mean seconds per measured iteration: generation, reward, and the update (everything else of the
    iteration: log-probs, loss, backward, optimizer step, bookkeeping)."""
    start, end = _window(run, warmup)
    n = len(run["step_ends"]) - warmup
    if n < 1:
        raise ValueError(f"no measured iterations after {warmup} warm-up ones")
    inside = {"generate": 0.0, "score": 0.0}
    for phase, t0, t1 in run.get("spans", []):
        if phase in inside and t0 >= start and t1 <= end:
            inside[phase] += t1 - t0
    total = end - start
    split = {k: v / n for k, v in inside.items()}
    split["update"] = max(total / n - split["generate"] - split["score"], 0.0)
    split["total"] = total / n
    return split


def grpo_time_split(run: dict) -> dict[str, float]:
    """Seconds of each phase of a GRPO process (GRPO_PHASES), spawn to exit."""
    phases = run.get("phases", {})
    iterations = (run["step_ends"][-1] - run["first_train"]) if run["step_ends"] else 0.0
    split = {
        "startup": run["imports_done"] - run["spawn"],
        **{k: phases.get(k, 0.0) for k in ("load", "data", "generate", "score", "save")},
    }
    split["update"] = max(iterations - split["generate"] - split["score"], 0.0)
    split["other"] = max(run["process_seconds"] - sum(split.values()), 0.0)
    return {k: split[k] for k in GRPO_PHASES}


def grpo_figures(run: dict, warmup: int, per_iter: int) -> dict[str, Any]:
    steady = steady_stats(run["step_seconds"], warmup, per_iter)
    baseline = run["rss_after_imports_mb"]
    return {
        "completions_per_s": steady["items_per_s"],
        "steps": steady["steps"],
        "e2e_completions_per_s": per_iter * len(run["step_seconds"]) / run["process_seconds"],
        "process_seconds": run["process_seconds"],
        "peak_rss_mb": run["peak_rss_mb_wait4"],
        "baseline_rss_mb": baseline,
        "rss_above_baseline_mb": memory_above_baseline(run["peak_rss_mb_wait4"], baseline),
        "lengths": lengths(run),
        "steady_lengths": lengths(run, warmup),
        "iteration": iteration_split(run, warmup),
        "split": grpo_time_split(run),
        "repeats": run.get("repeat_pairs_per_s", []),
        "repeats_e2e": run.get("repeat_e2e_pairs_per_s", []),
    }


def gen_rate(run: dict, warmup: int) -> float:
    """New tokens per second (each row's tokens up to and including its EOS) over the measured calls."""
    calls = run["calls"][warmup:]
    if not calls:
        raise ValueError(f"no measured generation calls after {warmup} warm-up ones")
    return sum(c["tokens"] for c in calls) / sum(c["seconds"] for c in calls)


def median_gen_run(results: list[dict], warmup: int) -> dict:
    """The run with the median tokens/s among repeats (the lower middle one for an even count), with every
    repeat's tokens/s in `repeat_tokens_per_s` (in run order)."""
    speeds = [gen_rate(r, warmup) for r in results]
    order = sorted(range(len(results)), key=speeds.__getitem__)
    return {**results[order[(len(order) - 1) // 2]], "repeat_tokens_per_s": [round(x, 2) for x in speeds]}


def gen_figures(run: dict, warmup: int) -> dict[str, Any]:
    calls = run["calls"][warmup:]
    rows = sum(c["rows"] for c in calls)
    baseline = run["rss_after_imports_mb"]
    return {
        "tokens_per_s": gen_rate(run, warmup),
        "calls": len(calls),
        "seconds_per_call": statistics.fmean(c["seconds"] for c in calls),
        "new_tokens_mean": sum(c["tokens"] for c in calls) / rows,
        "digests": [c["digest"] for c in run["calls"]],
        "rss_above_baseline_mb": memory_above_baseline(run["peak_rss_mb_wait4"], baseline),
        "repeats": run.get("repeat_tokens_per_s", []),
    }


# --------------------------------------------------------------------------------------------------------
# Lines and tables
# --------------------------------------------------------------------------------------------------------


def _rounds(label: str, mine: list[float], peer: list[float], who: str = "TRL") -> str:
    if len(mine) < 2:
        return ""
    return (
        f"; {label} of {len(mine)} interleaved runs (rlhflab {'/'.join(f'{x:.2f}' for x in mine)}, "
        f"{who} {'/'.join(f'{x:.2f}' for x in peer)})"
    )


class _Rows:
    """Collects JSON lines and table rows in the format of bench_report's."""

    def __init__(self, shape: str):
        self.shape, self.lines, self.rows = shape, [], []

    def add(self, comparison, metric, unit, ours, theirs, note, better="higher", fmt="{:.2f}", **extra):
        self.lines.append(
            json_line(
                comparison,
                metric,
                unit,
                ours,
                theirs,
                better=better,
                shape=self.shape,
                trl_variant=note,
                **extra,
            )
        )
        ratio = ours / theirs if theirs else float("nan")
        self.rows.append(
            (
                f"{self.shape} {comparison}: {metric} ({unit})",
                fmt.format(ours),
                fmt.format(theirs),
                f"{ratio:.2f}x",
                note,
            )
        )


def summarize_grpo(shape: str, runs: dict[str, dict], meta: dict) -> tuple[list[str], list[tuple], list[str]]:
    """(JSON lines, table rows, markdown lines) of the grpo and generate comparisons of one shape in
    `runs` ("grpo_rlhflab"/"grpo_trl", "gen_rlhflab"/"gen_transformers"); empty when neither ran."""
    out = _Rows(shape)
    md: list[str] = []
    g = meta.get("grpo") or {}
    if "grpo_rlhflab" in runs and "grpo_trl" in runs:
        w, per = g["warmup"], g["per_iteration"]
        r, t = (grpo_figures(runs[k], w, per) for k in ("grpo_rlhflab", "grpo_trl"))
        rl, tl = r["steady_lengths"], t["steady_lengths"]
        length_note = (
            f"mean completion length rlhflab {rl['completion_mean']:.1f} vs TRL {tl['completion_mean']:.1f} "
            f"tokens, ended with EOS {100 * rl['eos_share']:.0f}% vs {100 * tl['eos_share']:.0f}%"
        )
        extra = {
            "rlhflab_completion_tokens_mean": round(rl["completion_mean"], 3),
            "trl_completion_tokens_mean": round(tl["completion_mean"], 3),
            "rlhflab_prompt_tokens_mean": round(rl["prompt_mean"], 3),
            "trl_prompt_tokens_mean": round(tl["prompt_mean"], 3),
        }
        out.add(
            "grpo",
            "completions_per_s_steady",
            "completions/s",
            r["completions_per_s"],
            t["completions_per_s"],
            f"{TRL_GRPO_LABEL} ({t['steps']} steady iterations of {per}); {length_note}"
            + _rounds("median", r["repeats"], t["repeats"]),
            rlhflab_repeats=r["repeats"],
            trl_repeats=t["repeats"],
            **extra,
        )
        out.add(
            "grpo",
            "completions_per_s_end_to_end",
            "completions/s",
            r["e2e_completions_per_s"],
            t["e2e_completions_per_s"],
            f"{TRL_GRPO_LABEL}; process spawn to exit ({r['process_seconds']:.0f} s vs "
            f"{t['process_seconds']:.0f} s)"
            + _rounds("run with the median steady rate; rounds", r["repeats_e2e"], t["repeats_e2e"]),
            rlhflab_repeats=r["repeats_e2e"],
            trl_repeats=t["repeats_e2e"],
        )
        out.add(
            "grpo",
            "rss_above_baseline",
            "MiB",
            r["rss_above_baseline_mb"],
            t["rss_above_baseline_mb"],
            f"{TRL_GRPO_LABEL}; peak RSS minus RSS after imports (peaks {r['peak_rss_mb']:.0f} vs "
            f"{t['peak_rss_mb']:.0f} MiB, baselines {r['baseline_rss_mb']:.0f} vs {t['baseline_rss_mb']:.0f})",
            better="lower",
            fmt="{:.0f}",
        )
        out.lines.append(
            json.dumps(
                {
                    "kind": "grpo_time_split",
                    "shape": shape,
                    "iteration_seconds": {"grpo_rlhflab": r["iteration"], "grpo_trl": t["iteration"]},
                    "seconds": {"grpo_rlhflab": r["split"], "grpo_trl": t["split"]},
                    "lengths": {"grpo_rlhflab": r["lengths"], "grpo_trl": t["lengths"]},
                    "reward_max_abs_diff": runs["grpo_rlhflab"].get("reward_max_abs_diff"),
                }
            )
        )
        md += grpo_tables(shape, r, t, g)
    if "gen_rlhflab" in runs and "gen_transformers" in runs:
        gm = meta.get("generate") or {}
        w = gm["warmup"]
        r, t = (gen_figures(runs[k], w) for k in ("gen_rlhflab", "gen_transformers"))
        same = r["digests"] == t["digests"]
        out.add(
            "generate",
            "tokens_per_s",
            "tokens/s",
            r["tokens_per_s"],
            t["tokens_per_s"],
            f"{GEN_LABEL}; {gm['rows']} rows ({gm['prompts']} prompts x {gm['repeat']}), at most "
            f"{gm['max_new_tokens']} new tokens, {r['calls']} measured calls; new tokens per row "
            f"{r['new_tokens_mean']:.1f} vs {t['new_tokens_mean']:.1f}; identical samples: "
            f"{'yes' if same else 'NO'}" + _rounds("median", r["repeats"], t["repeats"], "transformers"),
            identical_samples=same,
            rlhflab_repeats=r["repeats"],
            trl_repeats=t["repeats"],
            peer="transformers model.generate",
        )
        out.add(
            "generate",
            "rss_above_baseline",
            "MiB",
            r["rss_above_baseline_mb"],
            t["rss_above_baseline_mb"],
            f"{GEN_LABEL}; peak RSS minus RSS after imports",
            better="lower",
            fmt="{:.0f}",
            peer="transformers model.generate",
        )
    return out.lines, out.rows, md


def grpo_tables(shape: str, r: dict, t: dict, g: dict) -> list[str]:
    """Markdown: one steady iteration's time split and the whole process's, rlhflab beside TRL."""
    out = [
        "",
        f"GRPO, {shape} shape: one measured iteration ({g['per_iteration']} completions, mean of "
        f"{r['steps']} after {g['warmup']} warm-up; seconds):",
        "",
        "| part | grpo_rlhflab | grpo_trl |",
        "|---|---|---|",
    ]
    labels = {"generate": "generation", "score": "reward", "update": "update", "total": "**total**"}
    for k, label in labels.items():
        out.append(f"| {label} | {r['iteration'][k]:.2f} | {t['iteration'][k]:.2f} |")
    rl, tl = r["lengths"], t["lengths"]
    out += [
        "",
        f"Completion length over all iterations (tokens, EOS included): rlhflab {rl['completion_mean']:.2f}, "
        f"TRL {tl['completion_mean']:.2f}; ended with EOS {100 * rl['eos_share']:.1f}% vs "
        f"{100 * tl['eos_share']:.1f}%; prompt length {rl['prompt_mean']:.2f} vs {tl['prompt_mean']:.2f}.",
        "",
        f"GRPO, {shape} shape, where the time goes (seconds, spawn to exit, the median run of each):",
        "",
        "| phase | grpo_rlhflab | grpo_trl |",
        "|---|---|---|",
    ]
    for phase in GRPO_PHASES:
        out.append(f"| {GRPO_PHASE_LABELS[phase]} | {r['split'][phase]:.1f} | {t['split'][phase]:.1f} |")
    out.append(f"| **total** | {sum(r['split'].values()):.1f} | {sum(t['split'].values()):.1f} |")
    return out
