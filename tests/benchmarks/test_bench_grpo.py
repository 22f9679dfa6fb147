"""The pure helpers of the GRPO and sampler comparisons of benchmarks/compare_trl.py (benchmarks/bench_grpo.py):
the reward both sides compute, one setting spelled for each side, the driver's flags and job files, the
figures and the tables. No TRL here and nothing timed."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import bench_common as bc  # noqa: E402
import bench_grpo as bg  # noqa: E402
import bench_report as br  # noqa: E402
import compare_trl as ct  # noqa: E402

from rlhflab.config import load_config  # noqa: E402
from rlhflab.rewards.rules import LengthPenalty  # noqa: E402
from rlhflab.rewards.spec import load_reward  # noqa: E402
from rlhflab.stages.critic_free import needs_old_pass  # noqa: E402

# Completions as TRL hands them to its reward function (decoded, not stripped): words split by spaces,
# newlines, tabs and a no-break space, empty ones, and lengths on both sides of the target.
TEXTS = [
    " the of and to in is that",
    "\nthe  of\tand\n\nto ",
    "",
    "   ",
    "word\u00a0word word",
    " ".join(["w"] * 24),
    " " + " ".join(["w"] * 37) + "\n",
    "no-break-inside hyphen-ated words, and punctuation!",
]


# --------------------------------------------------------------------------------------------------------
# The reward
# --------------------------------------------------------------------------------------------------------


def test_trl_reward_function_gives_rlhflab_rule_numbers_bit_for_bit():
    spec = bg.reward_spec()
    rule = load_reward(spec)
    assert isinstance(rule, LengthPenalty)
    assert (rule.coef, rule.target, rule.unit) == (bg.GRPO["reward_coef"], bg.GRPO["reward_target"], "words")
    prompts = ["p"] * len(TEXTS)
    # rlhflab scores its rollout texts stripped (rollout/generate.py); TRL passes them as decoded.
    ours = rule.score(prompts, [t.strip() for t in TEXTS])
    theirs = bg.trl_reward_function()(
        prompts=prompts, completions=TEXTS, completion_ids=None, trainer_state=None
    )
    assert isinstance(theirs, list) and len(theirs) == len(TEXTS)
    # TRL turns the list into a float32 tensor (GRPOTrainer._calculate_rewards): the same bits as rlhflab's.
    assert torch.equal(torch.tensor(theirs, dtype=torch.float32), ours)
    assert theirs[5] == 0.0 and theirs[2] == -bg.GRPO["reward_coef"] * bg.GRPO["reward_target"]


def test_length_rewards_by_value():
    assert bg.length_rewards(["a b c", "", "a b c d e"], coef=0.5, target=3) == [0.0, -1.5, -1.0]
    # The benchmark's coefficient is a power of two: integer word counts score exactly in float32.
    coef = bg.GRPO["reward_coef"]
    assert coef == 2.0 ** round(__import__("math").log2(coef))


def test_token_digest():
    assert bg.token_digest([[1, 2, 2], [5]]) == bg.token_digest([[1, 2, 2], [5]])
    assert bg.token_digest([[1, 2, 2], [5]]) != bg.token_digest([[1, 2], [2, 5]])
    assert len(bg.token_digest([])) == 16


# --------------------------------------------------------------------------------------------------------
# One setting, both sides
# --------------------------------------------------------------------------------------------------------


def test_both_sides_run_the_same_grpo_setting():
    g, iterations = bg.GRPO, 6
    cfg = load_config("grpo", None, [*bg.rlhflab_overrides(g, iterations), "data.train_path=prompts.jsonl"])
    trl = bg.trl_options(g, iterations)
    algo, sampling, optim = cfg.algo, cfg.sampling, cfg.optim
    # 16 prompts x 4 samples = 64 completions per iteration, one optimizer step on all of them.
    assert algo.prompts_per_iteration == 16 and algo.num_generations == trl["num_generations"] == 4
    assert algo.rollouts_per_iteration == bg.per_iteration(g) == 64
    assert trl["per_device_train_batch_size"] * trl["gradient_accumulation_steps"] == 64
    assert algo.minibatch_size == 0 and algo.ppo_epochs == trl["num_iterations"] == 1
    assert algo.iterations == trl["max_steps"] == iterations
    # Neither side runs an old-policy pass: rlhflab's one update, TRL's generation aligned with its step.
    assert not needs_old_pass(cfg, 64)
    assert trl["gradient_accumulation_steps"] % trl["num_iterations"] == 0
    # Sampling: 32 new tokens, temperature 1, no top-k / top-p, stop at EOS or the limit.
    assert sampling.max_new_tokens == trl["max_completion_length"] == 32
    assert (sampling.temperature, sampling.top_k, sampling.top_p) == (
        trl["temperature"],
        trl["top_k"],
        trl["top_p"],
    )
    assert trl["min_p"] is None and trl["repetition_penalty"] == 1.0
    # The objective: KL coefficient (TRL's default beta 0.0: no reference on either side), clip, the
    # group-std scaling, token-level loss (TRL's default "dapo"), no penalty for a missing EOS.
    assert algo.kl_coef == trl["beta"] == 0.0
    assert algo.clip_eps == trl["epsilon"] and algo.clip_eps_high == 0.0
    assert algo.scale_rewards is True and trl["scale_rewards"] == "group"
    assert algo.loss_aggregation == "token_mean" and trl["loss_type"] == "dapo"
    assert algo.missing_eos_penalty == 0.0 and trl["mask_truncated_completions"] is False
    assert not algo.dynamic_sampling
    assert algo.reward_model == [bg.reward_spec(g)]
    # Numerics and optimizer: float32, no recompute, fused AdamW, wd 0, constant lr, clip 1.0.
    assert cfg.model.dtype == "float32" and cfg.model.autocast == "none"
    assert cfg.model.gradient_checkpointing is False
    variant = {**ct.GRPO_VARIANT, **trl}
    assert variant["bf16"] is False and variant["gradient_checkpointing"] is False
    assert optim.lr == trl["learning_rate"] == g["lr"]
    assert variant["optim"] == "adamw_torch_fused" and optim.weight_decay == variant["weight_decay"] == 0.0
    assert optim.scheduler == variant["lr_scheduler_type"] == "constant"
    assert optim.warmup_steps == variant["warmup_steps"] == 0
    assert optim.max_grad_norm == variant["max_grad_norm"] == 1.0
    assert tuple(optim.betas) == (variant["adam_beta1"], variant["adam_beta2"])
    assert trl["use_vllm"] is False and cfg.seed == 0


# --------------------------------------------------------------------------------------------------------
# The driver: flags, plans, job files
# --------------------------------------------------------------------------------------------------------


def test_only_selects_comparisons():
    every = {"sft", "dpo", "rm", "grpo", "ppo", "generate"}
    assert ct.parse_args([]).compare == every
    assert ct.parse_args(["--only", "grpo"]).compare == {"grpo"}
    assert ct.parse_args(["--only", "grpo, generate"]).compare == {"grpo", "generate"}
    assert ct.parse_args(["--only", "dpo,all"]).compare == every
    with pytest.raises(SystemExit, match="unknown --only"):
        ct.parse_args(["--only", "kto"])
    assert ct.parse_args(["--lora", "16"]).lora == 16 and ct.parse_args([]).lora == 0


def test_grpo_plan_defaults_and_flags():
    args = ct.parse_args([])
    assert ct.grpo_plan(args, "tiny") == {"warmup": 1, "steps": 5, "gen_warmup": 1, "gen_calls": 8}
    assert ct.grpo_plan(args, "smollm2") == {"warmup": 1, "steps": 3, "gen_warmup": 1, "gen_calls": 4}
    args = ct.parse_args(["--grpo-warmup", "0", "--grpo-steps", "2", "--gen-calls", "3"])
    assert ct.grpo_plan(args, "smollm2") == {"warmup": 0, "steps": 2, "gen_warmup": 0, "gen_calls": 3}
    # The DPO / RM plan is untouched by the GRPO flags.
    assert ct.shape_plan(args, "smollm2")["steps"] == 4


def test_grpo_jobs_write_the_shared_prompts(tmp_path):
    args = ct.parse_args(["--only", "grpo,generate", "--grpo-steps", "2"])
    jobs, meta = ct.grpo_jobs(args, "tiny", tmp_path)
    g = jobs["grpo"]
    assert g["iterations"] == 3 and g["warmup"] == 1
    prompts = [json.loads(x)["prompt"] for x in Path(g["prompts_path"]).read_text().splitlines()]
    # One prompt per group of each iteration, the benchmark's synthetic prompts, each used once.
    assert prompts == [p["prompt"] for p in bc.synthetic_pairs(48, seed=0)]
    assert jobs["grpo_options"] == bg.trl_options(bg.GRPO, 3)
    assert jobs["generate"]["rows"] == 64 and jobs["generate"]["calls"] == 8
    assert jobs["generate"]["prompts_path"] == g["prompts_path"]
    assert meta["grpo"]["per_iteration"] == 64 and meta["grpo"]["n_prompts"] == 48
    assert meta["grpo"]["reward"] == bg.reward_spec()
    assert ct.grpo_jobs(ct.parse_args(["--only", "dpo"]), "tiny", tmp_path) == ({}, {})


# --------------------------------------------------------------------------------------------------------
# The timing hook's spans
# --------------------------------------------------------------------------------------------------------


def test_clock_first_step_and_spans():
    clock = bc.Clock()

    class Stage:
        @staticmethod
        def sample():
            time.sleep(0.005)
            return "out"

    clock.wrap(Stage, "sample", "generate", first_step=True)
    assert clock.first_train is None
    before = time.monotonic()
    assert Stage.sample() == "out"
    first = clock.first_train
    assert first is not None and before <= first
    Stage.sample()
    assert clock.first_train == first  # only the first call stamps it
    spans = clock.result()["spans"]
    assert [s[0] for s in spans] == ["generate", "generate"]
    assert all(t1 - t0 >= 0.005 for _, t0, t1 in spans)
    assert clock.phases["generate"] == pytest.approx(sum(t1 - t0 for _, t0, t1 in spans))


# --------------------------------------------------------------------------------------------------------
# Figures and tables
# --------------------------------------------------------------------------------------------------------


def _grpo_run(gen: float, update: float, length: int, rss: float, eos: int = 0) -> dict:
    """A made-up GRPO process: spawn at 100, imports done at 102, 3 iterations of 64 completions from 110,
    each `gen` s of generation, 0.5 s of reward, `update` s of the rest; exit 10 s after the last step."""
    spans, ends, t = [], [], 110.0
    for _ in range(3):
        spans += [("generate", t, t + gen), ("score", t + gen, t + gen + 0.5)]
        t += gen + 0.5 + update
        ends.append(t)
    gens = [bg.generation_record([20] * 64, [length] * 64, eos) for _ in range(3)]
    return {
        "spawn": 100.0,
        "imports_done": 102.0,
        "first_train": 110.0,
        "step_ends": ends,
        "step_seconds": bc.step_seconds_from_stamps(110.0, ends),
        "spans": spans,
        "phases": {"load": 2.0, "data": 0.5, "generate": 3 * gen, "score": 1.5, "save": 1.0},
        "generations": gens,
        "process_seconds": ends[-1] + 10.0 - 100.0,
        "rss_after_imports_mb": 400.0,
        "peak_rss_mb_wait4": rss,
        "reward_max_abs_diff": 0.0,
    }


def _gen_run(seconds: list[float], tokens: int = 1024, digest: str = "d") -> dict:
    return {
        "calls": [
            {"seconds": s, "rows": 64, "tokens": tokens, "ended_with_eos": 0, "digest": digest}
            for s in seconds
        ],
        "rss_after_imports_mb": 400.0,
        "peak_rss_mb_wait4": 900.0,
    }


def test_grpo_figures_split_and_lengths():
    run = _grpo_run(gen=4.0, update=5.5, length=32, rss=2400)
    split = bg.iteration_split(run, warmup=1)
    assert split == pytest.approx({"generate": 4.0, "score": 0.5, "update": 5.5, "total": 10.0})
    whole = bg.grpo_time_split(run)
    assert list(whole) == list(bg.GRPO_PHASES)
    assert whole["startup"] == 2.0 and whole["generate"] == 12.0 and whole["update"] == pytest.approx(16.5)
    assert sum(whole.values()) == pytest.approx(run["process_seconds"])
    figs = bg.grpo_figures(run, warmup=1, per_iter=64)
    assert figs["completions_per_s"] == pytest.approx(6.4)  # 2 x 64 completions in 20 s
    assert figs["e2e_completions_per_s"] == pytest.approx(3 * 64 / 50.0)
    assert figs["rss_above_baseline_mb"] == 2000.0
    assert figs["lengths"]["completion_mean"] == 32.0 and figs["lengths"]["eos_share"] == 0.0
    assert figs["steady_lengths"]["completions"] == 128.0
    with pytest.raises(ValueError, match="no measured iterations"):
        bg.iteration_split(run, warmup=3)


def test_gen_rate_and_median():
    assert bg.gen_rate(_gen_run([9.0, 1.0, 3.0]), warmup=1) == pytest.approx(2048 / 4.0)
    runs = [_gen_run([1.0, 2.0]), _gen_run([1.0, 1.0]), _gen_run([1.0, 4.0])]
    picked = bg.median_gen_run(runs, warmup=1)
    assert picked is not runs[0] and picked["calls"] == runs[0]["calls"]
    assert picked["repeat_tokens_per_s"] == [512.0, 1024.0, 256.0]
    with pytest.raises(ValueError, match="no measured generation calls"):
        bg.gen_rate(_gen_run([1.0]), warmup=1)


def _meta() -> dict:
    shape = {
        "description": "toy",
        "n_params": 15_747_328,
        "params": bc.param_counts(bc.SHAPES["tiny"]),
        "warmup": 3,
        "steps": 20,
        "batch_size": 8,
        "n_pairs": 184,
        "n_eval": 16,
        "compares": ["generate", "grpo"],
        "grpo": {
            "warmup": 1,
            "steps": 2,
            "iterations": 3,
            "prompts_per_iteration": 16,
            "num_generations": 4,
            "max_new_tokens": 32,
            "lr": 1e-6,
            "beta": 0.0,
            "per_iteration": 64,
            "n_prompts": 48,
            "reward": bg.reward_spec(),
        },
        "generate": {
            "prompts": 16,
            "repeat": 4,
            "rows": 64,
            "max_new_tokens": 32,
            "temperature": 1.0,
            "top_k": 0,
            "top_p": 1.0,
            "warmup": 1,
            "calls": 2,
        },
    }
    return {"batch_size": 8, "shapes": {"tiny": shape}}


def test_summarize_reports_grpo_and_sampler_rows():
    runs = {
        "grpo_rlhflab": br.median_run([_grpo_run(2.0, 3.5, 32, 2400)], 1, 64, 192),
        "grpo_trl": br.median_run([_grpo_run(4.0, 7.5, 30, 5000, eos=8)], 1, 64, 192),
        "gen_rlhflab": bg.median_gen_run([_gen_run([1.0, 2.0, 2.0])], 1),
        "gen_transformers": bg.median_gen_run([_gen_run([1.0, 2.0, 2.0])], 1),
    }
    probe = {"peak_gflops": 50.0, "gflops_by_size": {"1024": 50.0}, "threads": 2}
    lines, table = br.summarize({"tiny": runs}, probe, _meta(), {"tiny": bc.SHAPES["tiny"]})
    rows = [bc.parse_json_line(x) for x in lines if "comparison" in json.loads(x)]
    by = {(r["comparison"], r["metric"]): r for r in rows}
    assert {r["comparison"] for r in rows} == {"grpo", "generate"}  # no DPO / RM runs, no lines
    steady = by["grpo", "completions_per_s_steady"]
    assert steady["rlhflab"] == pytest.approx(128 / 12.0, abs=1e-5)  # 2 iterations of 6 s
    assert steady["ratio"] == pytest.approx(2.0, abs=1e-4)
    assert steady["rlhflab_completion_tokens_mean"] == 32.0 and steady["trl_completion_tokens_mean"] == 30.0
    assert by["grpo", "rss_above_baseline"]["better"] == "lower"
    assert by["grpo", "completions_per_s_end_to_end"]["rlhflab"] == pytest.approx(
        192 / 38.0, abs=1e-5
    )  # 10 + 3 x 6 + 10 s
    gen = by["generate", "tokens_per_s"]
    assert gen["ratio"] == 1.0 and gen["identical_samples"] is True and gen["rlhflab"] == 512.0
    split = next(json.loads(x) for x in lines if json.loads(x).get("kind") == "grpo_time_split")
    assert split["iteration_seconds"]["grpo_trl"]["generate"] == 4.0
    # The table: rows with the shape, both lengths, the iteration split and the process split.
    assert (
        "| tiny grpo: completions_per_s_steady (completions/s) | 10.67 | 5.33 | 2.00x | TRL GRPOTrainer"
        in table
    )
    assert "mean completion length rlhflab 32.0 vs TRL 30.0 tokens, ended with EOS 0% vs 12%" in table
    assert "| generation | 2.00 | 4.00 |" in table and "| **total** | 6.00 | 12.00 |" in table
    assert "| generation (tokenize + sample + decode) | 6.0 | 12.0 |" in table
    assert "identical samples: yes" in table
    assert "- tiny: toy, 15.75M parameters, embedding / LM head 80% of them." in table  # no pair counts
    assert "  GRPO: 16 prompts x 4 samples = 64 completions per iteration" in table
    # Different sampled tokens are flagged.
    runs["gen_transformers"] = bg.median_gen_run([_gen_run([1.0, 2.0, 2.0], digest="other")], 1)
    _, table = br.summarize({"tiny": runs}, probe, _meta(), {"tiny": bc.SHAPES["tiny"]})
    assert "identical samples: NO" in table
