"""`rlhflab run`: the InstructGPT pipeline and its alternatives on a lab task, judged by the hidden gold reward.

    0. data      the lab's simulated annotators label pairs; demonstrations and prompts are written to disk
    1. sft       supervised fine-tuning of the lab's pretrained base model on the demonstrations
    2. rm        a reward model initialized from the SFT model, trained on the preference pairs
    3. methods   each method of --methods from the SFT model (default: ppo, ppo_kl0, dpo, best_of_n):
       ppo         PPO against the reward model with a KL penalty to the SFT model
       ppo_kl0     the same with no KL penalty: the reward-hacking run (proxy up, gold down)
       dpo         DPO on the same preference pairs
       rloo, grpo  critic-free on-policy RL against the reward model
       online_dpo  DPO on the policy's own samples, labelled as it trains by the lab's simulated annotators
       iterative_dpo  rounds of offline DPO on the current policy's samples, labelled by the annotators
       pm, dno     a general preference model on the pairs, and DNO's rounds against it (best vs worst of 4)
       best_of_n   the best of n SFT samples by the reward model (a sampling procedure, nothing trained)
    4. eval      every policy sampled on held-out prompts and scored by the gold reward that no training stage
                 ever saw; and, from each trained method's snapshots, its gold and KL over training
    5. report    report.json, plots (gold against sqrt(KL) for every method on one plot) and report.html

Every stage is an ordinary stage run in OUTPUT_DIR/METHOD (config, metrics, snapshots, final model), so any
of them can be re-run alone with `rlhflab STAGE --config OUTPUT_DIR/METHOD/config.yaml`.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from rlhflab.config import (
    STAGE_CONFIGS,
    LabAnnotatorsSection,
    build_config,
    deep_merge,
    parse_overrides,
    read_yaml,
)
from rlhflab.core.progress import JobClock
from rlhflab.core.run_dir import prepare_run_dir
from rlhflab.core.seeding import seed_everything
from rlhflab.errors import ConfigError
from rlhflab.stages.parallel import DataParallel


@dataclass(frozen=True)
class Method:
    """A method `rlhflab run --methods` can run: its stage (a `STAGE_CONFIGS` key, or "best_of_n", a sampling
    procedure that trains nothing) and the methods it starts from."""

    stage: str
    needs: tuple[str, ...]
    title: str


METHODS: dict[str, Method] = {
    "sft": Method("sft", (), "supervised fine-tuning on the demonstrations"),
    "rm": Method("rm", ("sft",), "reward model on the preference pairs"),
    "ppo": Method("ppo", ("sft", "rm"), "PPO against the reward model, KL penalty to SFT"),
    "ppo_kl0": Method("ppo", ("sft", "rm"), "PPO with no KL penalty: the reward-hacking run"),
    "dpo": Method("dpo", ("sft",), "DPO on the preference pairs"),
    "rloo": Method("rloo", ("sft", "rm"), "RLOO against the reward model, KL to SFT in the reward"),
    "grpo": Method("grpo", ("sft", "rm"), "GRPO against the reward model, KL to SFT in the loss"),
    "online_dpo": Method(
        "online-dpo", ("sft",), "online DPO: the lab's annotators label the policy's samples"
    ),
    "iterative_dpo": Method(
        "iterative-dpo",
        ("sft",),
        "iterative DPO: rounds of DPO on the annotators' labels of the policy's samples",
    ),
    "pm": Method("pm", ("sft",), "general preference model on the preference pairs (no score per response)"),
    "dno": Method(
        "iterative-dpo",
        ("sft", "pm"),
        "DNO: rounds of DPO on the best vs worst of 4 samples, judged by the preference model",
    ),
    "best_of_n": Method("best_of_n", ("sft", "rm"), "best of n SFT samples by the reward model"),
    "expert_iteration": Method(
        "rs", ("sft", "rm"), "expert iteration: SFT on the best of 16 SFT samples per prompt under the RM"
    ),
    "rejection_sampling": Method(
        "rs", ("sft", "rm"), "rejection sampling (Llama 2): 3 rounds of best of 4 under the RM, then SFT"
    ),
    "rest": Method(
        "rs", ("sft", "rm"), "ReST: 2 Grow steps, each with Improve steps at rising RM thresholds"
    ),
    "feedme": Method("sft", ("sft",), "Binary FeedME: SFT on the preferred response of each pair"),
    "quark": Method(
        "quark", ("sft", "rm"), "Quark: reward-quantile tokens, conditional NLL + KL + entropy, the top token"
    ),
    "reward_conditioning": Method(
        "quark",
        ("sft", "rm"),
        "binary reward conditioning: good / bad token at the median RM score, then SFT",
    ),
}
# Methods --merge leaves alone: the preference model (always written merged: its settings live in config.json) and
# the control-token methods (no LoRA: their new tokens' embeddings must train).
NO_MERGE = ("pm", "quark", "reward_conditioning")
# Trained models that are judges, not policies: not evaluated by gold, no snapshots.
JUDGES = ("rm", "pm")
DEFAULT_METHODS = ("sft", "rm", "ppo", "ppo_kl0", "dpo", "best_of_n")
TRAINED = tuple(name for name, m in METHODS.items() if m.stage != "best_of_n")
# Non-stage sections of the pipeline config: how much lab data to make and how to evaluate. curve_points:
# snapshots per trained method (each evaluated on curve_prompts held-out prompts x curve_samples samples); rm_pairs:
# fresh held-out pairs the reward model's accuracy is measured on.
PIPELINE_SECTIONS = {
    "data": {
        "n_sft": 2000,
        "n_pairs": 2000,
        "n_prompts": 1000,
        "n_heldout": 256,
        # Tasks with rules (harm) only; 0 = not written (see `rlhflab.lab.make_data`).
        "n_helpful_pairs": 0,
        "n_safety_pairs": 0,
        "n_rule_labels": 0,
    },
    "eval": {
        "prompts": 64,
        "samples": 4,
        "best_of_n": 16,
        "curve_points": 5,
        "curve_prompts": 32,
        "curve_samples": 2,
        "rm_pairs": 512,
    },
}
# The simulated annotators who label the pairs (and, with the same settings, the online methods' samples): the
# keys and defaults of the online stages' `algo.annotators` section, so the two cannot drift apart. AlpacaFarm
# (Dubois et al. 2023) saw over-optimization with noisy annotators (25% flips) and not with noiseless ones.
ANNOTATOR_KEYS = {f.name: f.default for f in dataclasses.fields(LabAnnotatorsSection)}


def merge_overrides(trained: list[str]) -> list[str]:
    """`--merge`: the overrides that make each trained LoRA method write its full model."""
    return [f"{n}.model.lora.merge=true" for n in trained if n not in NO_MERGE]


def resolve_methods(names: list[str] | tuple[str, ...] | None) -> list[str]:
    """The methods to run, in METHODS order, with what they need added (ppo needs rm and sft); "all": every
    method. Unknown names are refused with the known ones."""
    if not names:
        names = DEFAULT_METHODS
    if list(names) == ["all"]:
        names = tuple(METHODS)
    unknown = [n for n in names if n not in METHODS]
    if unknown:
        raise ConfigError(f"--methods: unknown method {unknown[0]!r}; known: {', '.join(METHODS)} (or 'all')")
    wanted = set(names)
    for name in names:
        wanted |= set(METHODS[name].needs)
        for need in METHODS[name].needs:
            wanted |= set(METHODS[need].needs)
    return [n for n in METHODS if n in wanted]


_QUARK_COMMON = [
    "data.max_length=64", "data.max_prompt_length=24", "optim.lr=1e-3", "optim.batch_size=16",
    "sampling.max_new_tokens=24", "algo.eval_prompts=32", "logging.log_every=1",
]  # fmt: skip
_RS_COMMON = [
    "optim.lr=2e-4",
    "optim.batch_size=16",
    "optim.epochs=1",
    "sampling.max_new_tokens=24",
    "data.max_length=64",
    "data.max_prompt_length=24",
    "algo.eval_prompts=32",
    "logging.log_every=1",
]
# Defaults tuned so that the whole run takes about 2 minutes on 2 CPU cores (see BENCHMARKS.md).
DEFAULTS: dict[str, list[str]] = {
    "sft": [
        "optim.lr=1e-3",
        "optim.batch_size=32",
        "optim.epochs=1",
        "data.max_length=64",
        "data.max_prompt_length=24",
        "logging.log_every=5",
    ],
    # Binary FeedME (Dubois et al. 2023): the SFT run's settings, continued from the SFT model on the pairs' chosen
    # responses (its wiring maps the completion to the `chosen` column).
    "feedme": [
        "optim.lr=1e-3",
        "optim.batch_size=32",
        "optim.epochs=1",
        "data.max_length=64",
        "data.max_prompt_length=24",
        "logging.log_every=5",
    ],
    "rm": [
        "optim.lr=1e-3",
        "optim.batch_size=32",
        "optim.epochs=3",
        "algo.margin=small",
        "data.max_length=64",
        "data.max_prompt_length=24",
        "data.eval_fraction=0.1",
        "logging.log_every=5",
    ],
    "ppo": [
        "optim.lr=2e-4",
        "algo.iterations=100",
        "algo.rollout_batch_size=64",
        "algo.minibatch_size=32",
        "algo.ppo_epochs=2",
        # 0.2, not 0.05: at 0.05 the rollouts' gold peaked by iteration 30-70 and ended 0.1-0.3 lower on all of
        # seeds 0-4 (over-optimization of the learned reward, Gao et al. 2023). Chosen on the training prompts
        # only (benchmarks/ppo_kl_sweep.py): the smallest of 0.05 / 0.1 / 0.2 whose rollout gold ends within
        # 0.05 of its best 10-iteration window on every seed (0.1 dropped 0.063 on seed 3).
        "algo.kl_coef=0.2",
        "sampling.max_new_tokens=24",
        "logging.log_every=1",
    ],
    "ppo_kl0": ["algo.kl_coef=0"],  # on top of ppo's
    "dpo": [
        "optim.lr=2e-4",
        "optim.batch_size=32",
        "optim.epochs=1",
        "algo.beta=0.1",
        "data.max_length=64",
        "data.max_prompt_length=24",
        "logging.log_every=5",
    ],
    # The methods beyond the default set get PPO's sampling budget (6,400 responses) or, for online DPO,
    # offline DPO's label budget (2,000 pairs), and PPO's / DPO's learning rate: set before any run of them,
    # not tuned on the held-out prompts.
    "rloo": [
        "optim.lr=2e-4",
        "algo.iterations=100",
        "algo.prompts_per_iteration=16",
        "algo.num_generations=4",
        "algo.kl_coef=0.05",
        "sampling.max_new_tokens=24",
        "logging.log_every=1",
    ],
    "grpo": [
        "optim.lr=2e-4",
        "algo.iterations=100",
        "algo.prompts_per_iteration=16",
        "algo.num_generations=4",
        "sampling.max_new_tokens=24",
        "logging.log_every=1",
    ],
    "online_dpo": [
        "optim.lr=2e-4",
        "algo.iterations=125",
        "algo.prompts_per_step=16",
        "algo.beta=0.1",
        "algo.feedback=lab",
        "sampling.max_new_tokens=24",
        "logging.log_every=5",
    ],
    # The reward model's data and training, read by the preference model (prompt + both responses: 24 + 2 x 24
    # tokens plus two separators fit in 80).
    "pm": [
        "optim.lr=1e-3",
        "optim.batch_size=32",
        "optim.epochs=3",
        "data.max_length=80",
        "data.max_prompt_length=24",
        "data.eval_fraction=0.1",
        "logging.log_every=5",
    ],
    # DNO-Prct against the preference model: iterative DPO's rounds, prompts, batch and learning rate, 4 samples
    # per prompt (6 preference-model queries each, no new labels: its label budget is the preference model's
    # 2,000 pairs), the margin 1/3 of configs/iterative_dpo_dno_tiny.yaml. Set before any run, not tuned.
    "dno": [
        "optim.lr=2e-4",
        "optim.batch_size=32",
        "optim.epochs=1",
        "algo.mode=dno",
        "algo.rounds=3",
        "algo.prompts_per_round=667",
        "algo.samples_per_prompt=4",
        "algo.min_win_rate_margin=0.33",
        "algo.beta=0.1",
        "algo.feedback=preference_model",
        "sampling.max_new_tokens=24",
        "data.max_length=64",
        "data.max_prompt_length=24",
        "logging.log_every=5",
    ],
    # The sample-filter-fine-tune family: PPO's sampling budget (6,400 responses scored by the RM) and the learning
    # rate, batch and epochs of configs/rs_tiny.yaml, set before any run of them, not tuned on held-out prompts.
    "expert_iteration": [
        *_RS_COMMON,
        "algo.rounds=1",
        "algo.samples_per_prompt=16",
        "algo.prompts_per_round=400",
    ],
    "rejection_sampling": [
        *_RS_COMMON,
        "algo.rounds=3",
        "algo.samples_per_prompt=4",
        "algo.prompts_per_round=533",
        "algo.pool=true",
    ],
    "rest": [
        *_RS_COMMON,
        "algo.mode=rest",
        "algo.grow_steps=2",
        "algo.samples_per_prompt=4",
        "algo.prompts_per_round=800",
        "algo.thresholds=[0.5,0.75,0.9]",
        "algo.threshold_kind=quantile",
    ],
    # Quark (Lu et al. 2022) and AlpacaFarm's binary reward conditioning are `rlhflab quark` runs with the shipped
    # tiny configs' settings (2,048 and 1,024 responses scored by the RM); the alpacafarm experiment runs these.
    "quark": [
        *_QUARK_COMMON,
        "optim.steps_per_iteration=64",
        "algo.n_quantiles=5",
        "algo.iterations=4",
        "algo.samples_per_prompt=2",
        "algo.prompts_per_iteration=256",
        "algo.kl_coef=0.05",
        "algo.entropy_coef=0.06",
    ],
    "reward_conditioning": [
        *_QUARK_COMMON,
        "optim.epochs=2",
        "algo.n_quantiles=2",
        "algo.iterations=1",
        "algo.samples_per_prompt=4",
        "algo.prompts_per_iteration=256",
        "algo.kl_coef=0",
        "algo.entropy_coef=0",
    ],
    # 3 rounds x 667 prompts: offline DPO's label budget (2,000 pairs); DPO's batch, epochs and lengths.
    "iterative_dpo": [
        "optim.lr=2e-4",
        "optim.batch_size=32",
        "optim.epochs=1",
        "algo.rounds=3",
        "algo.prompts_per_round=667",
        "algo.beta=0.1",
        "algo.feedback=lab",
        "sampling.max_new_tokens=24",
        "data.max_length=64",
        "data.max_prompt_length=24",
        "logging.log_every=5",
    ],
}


# `rlhflab run --model DIR`: a real pretrained causal LM (e.g. SmolLM2-135M-Instruct from `rlhflab import-gguf`)
# instead of the lab's tiny base model, on the open-text task by default. Every method trains LoRA adapters (Hu et
# al. 2021) on top of the pipeline's settings above, with budgets sized so the default methods take at most 30
# minutes on 2 CPU cores (BENCHMARKS.md); checkpoints every few steps make a killed run resumable. Set before any
# run on the held-out prompts, not tuned on them; the first budgets (320 pairs, 16 PPO iterations) took 33-34
# minutes, so the pairs and PPO's iterations were cut by wall time alone to the figures below.
MODEL_TASK = "review"
MODEL_COMMON = ["model.lora.enabled=true", "model.lora.r=16", "model.lora.alpha=32"]
# The real model's chat template adds a system prompt (about 30 tokens) before the task prompt.
_TEXT = ["data.max_length=128", "data.max_prompt_length=64", "logging.save_every=10"]
_SAMPLED = ["data.max_prompt_length=64", "sampling.max_new_tokens=48", "logging.save_every=5"]
# Round-based methods resume at the first round without a saved model (no save_every).
_SAMPLED_TEXT = ["data.max_length=128", "data.max_prompt_length=64", "sampling.max_new_tokens=48"]
_QUARK_MODEL = [
    *_SAMPLED_TEXT, "model.lora.enabled=false", "optim.lr=1e-5", "optim.batch_size=8",
    "algo.prompts_per_iteration=48", "algo.eval_prompts=8",
]  # fmt: skip
MODEL_DEFAULTS: dict[str, list[str]] = {
    "sft": [*_TEXT, "optim.lr=3e-4", "optim.batch_size=8", "optim.epochs=1"],
    "feedme": [*_TEXT, "optim.lr=3e-4", "optim.batch_size=8", "optim.epochs=1"],
    # The reward statistics (for whitening) from 128 responses, not 1,024: a forward pass costs ~0.15 s here.
    "rm": [*_TEXT, "optim.lr=3e-4", "optim.batch_size=8", "optim.epochs=1", "algo.normalization_samples=128"],
    # The preference model reads both responses, and keeps its settings in config.json: always written merged.
    "pm": [
        "data.max_length=192",
        "data.max_prompt_length=64",
        "optim.lr=3e-4",
        "optim.batch_size=8",
        "optim.epochs=1",
        "model.lora.merge=true",
        "logging.save_every=10",
    ],
    "dpo": [*_TEXT, "optim.lr=1e-4", "optim.batch_size=8", "optim.epochs=1"],
    "ppo": [
        *_SAMPLED,
        "optim.lr=2e-4",
        "algo.iterations=12",
        "algo.rollout_batch_size=16",
        "algo.minibatch_size=8",
        "algo.ppo_epochs=1",
    ],
    # As on the lab task, the other methods get PPO's sampling budget (12 x 16 = 192 responses) or, for the
    # online DPO family, offline DPO's label budget (256 pairs), and PPO's / DPO's / SFT's learning rate.
    "rloo": [*_SAMPLED, "optim.lr=2e-4", "algo.iterations=12", "algo.prompts_per_iteration=4"],
    "grpo": [*_SAMPLED, "optim.lr=2e-4", "algo.iterations=12", "algo.prompts_per_iteration=4"],
    "online_dpo": [*_SAMPLED, "optim.lr=1e-4", "algo.iterations=32", "algo.prompts_per_step=8"],
    "iterative_dpo": [*_SAMPLED_TEXT, "optim.lr=1e-4", "optim.batch_size=8", "algo.prompts_per_round=85"],
    "dno": [*_SAMPLED_TEXT, "optim.lr=1e-4", "optim.batch_size=8", "algo.prompts_per_round=85"],
    "expert_iteration": [*_SAMPLED_TEXT, "optim.lr=3e-4", "optim.batch_size=8", "algo.prompts_per_round=12"],
    "rejection_sampling": [
        *_SAMPLED_TEXT,
        "optim.lr=3e-4",
        "optim.batch_size=8",
        "algo.prompts_per_round=16",
    ],
    "rest": [*_SAMPLED_TEXT, "optim.lr=3e-4", "optim.batch_size=8", "algo.prompts_per_round=24"],
    # Quark trains the whole model (its new tokens' embeddings must learn; LoRA freezes them), at a full
    # fine-tuning learning rate; PPO's sampling budget (192 responses), a few held-out reward checks.
    "quark": [
        *_QUARK_MODEL,
        "algo.iterations=2",
        "algo.samples_per_prompt=2",
        "optim.steps_per_iteration=12",
    ],
    "reward_conditioning": [
        *_QUARK_MODEL,
        "algo.iterations=1",
        "algo.samples_per_prompt=4",
        "optim.epochs=1",
    ],
}
MODEL_SECTIONS = {
    "data": {"n_sft": 320, "n_pairs": 256, "n_prompts": 256, "n_heldout": 64},
    "eval": {
        "prompts": 32,
        "samples": 2,
        "best_of_n": 4,
        # One snapshot per method on the held-out curve (~15 s each); PPO's rollouts give its curve every iteration.
        "curve_points": 1,
        "curve_prompts": 8,
        "curve_samples": 1,
        # 512 pairs are 1,024 reward-model passes, ~3 minutes on this model.
        "rm_pairs": 128,
    },
}


# Seconds each part of a run took on 2 CPU cores (the lab default's and --model SmolLM2-135M's runs in
# BENCHMARKS.md): the job's ETA scales them by the speed of the parts already finished.
EXPECTED_SECONDS = {
    "lab": {"data": 5, "sft": 10, "rm": 15, "ppo": 30, "ppo_kl0": 30, "dpo": 10, "eval": 25},
    "model": {"data": 2, "sft": 140, "rm": 160, "ppo": 300, "ppo_kl0": 330, "dpo": 400, "eval": 470},
}


def _stage_config(
    name: str,
    out: Path,
    seed: int,
    base: list[str],
    user: dict[str, Any],
    snapshot_every: int = 0,
    *,
    real_model: bool = False,
):
    """Stage config = stage defaults <- pipeline defaults (<- the real-model layer) <- wiring (`base`) <- the
    user's section."""
    data: dict[str, Any] = {}
    layers = [DEFAULTS["ppo"] if name == "ppo_kl0" else [], DEFAULTS[name]]
    if real_model:
        layers += [MODEL_COMMON, MODEL_DEFAULTS["ppo" if name == "ppo_kl0" else name]]
    for layer in (*layers, base):
        data = deep_merge(data, parse_overrides(layer))
    if snapshot_every:
        data = deep_merge(data, {"logging": {"snapshot_every": snapshot_every}})
    data = deep_merge(data, user.get(name, {}))
    data = deep_merge(data, {"seed": seed, "logging": {"output_dir": str(out / name)}})
    return build_config(STAGE_CONFIGS[METHODS[name].stage], data)


def _user_sections(config_file: str | None, overrides: list[str]) -> dict[str, Any]:
    """The user's pipeline config: one section per stage (a stage config's keys) plus `data` and `eval`."""
    user = read_yaml(config_file) if config_file else {}
    user = deep_merge(user, parse_overrides(overrides))
    where = config_file or "command line"
    sections = (*TRAINED, *PIPELINE_SECTIONS, "annotators")
    for key, value in user.items():
        if key not in sections:
            raise ConfigError(
                f"{where}: unknown pipeline section '{key}'; sections are {', '.join(sections)} "
                "(e.g. sft.optim.lr=1e-4 or data.n_pairs=4000)"
            )
        if not isinstance(value, dict):
            raise ConfigError(
                f"{where}: '{key}' must be a section of keys (e.g. {key}.KEY=VALUE), got {value!r}"
            )
    for name, defaults in PIPELINE_SECTIONS.items():
        for key, value in user.get(name, {}).items():
            if key not in defaults:
                raise ConfigError(
                    f"{where}: unknown key '{name}.{key}'; known: "
                    + ", ".join(f"{name}.{k}" for k in defaults)
                )
            low = 0 if defaults[key] == 0 else 1
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                what = "an integer >= 0" if low == 0 else "a positive integer"
                raise ConfigError(f"{where}: '{name}.{key}' must be {what}, got {value!r}")
    _annotator_settings(user, where)
    return user


def _annotator_settings(user: dict[str, Any], where: str = "command line"):
    """The `annotators` section as `AnnotatorSettings` (validated: unknown keys and bad values refused)."""
    from rlhflab.lab.annotators import AnnotatorSettings

    section = user.get("annotators", {})
    for key, value in section.items():
        if key not in ANNOTATOR_KEYS:
            known = ", ".join(f"annotators.{k}" for k in ANNOTATOR_KEYS)
            raise ConfigError(f"{where}: unknown key 'annotators.{key}'; known: {known}")
        kind = type(ANNOTATOR_KEYS[key])
        ok = (
            isinstance(value, bool)
            if kind is bool
            else not isinstance(value, bool) and isinstance(value, (int, float))
        )
        if not ok or (kind is int and not isinstance(value, int)):
            raise ConfigError(
                f"{where}: 'annotators.{key}' must be a{'n integer' if kind is int else ' ' + kind.__name__}, got {value!r}"
            )
    try:
        return AnnotatorSettings(**{**ANNOTATOR_KEYS, **section})
    except ConfigError as e:
        raise ConfigError(f"{where}: annotators: {e}") from None


def _section(user: dict[str, Any], name: str, *, real_model: bool = False) -> dict[str, int]:
    """The `data` or `eval` section: the defaults (a real model's smaller budgets) <- the user's keys."""
    defaults = {**PIPELINE_SECTIONS[name], **(MODEL_SECTIONS[name] if real_model else {})}
    return {**defaults, **user.get(name, {})}


def _gold_curve(task, run_dir: Path) -> list[dict[str, float]]:
    """Per-iteration proxy score, gold reward and KL of a PPO run's logged rollouts (gold scored here, after
    training, so the training loop never sees it)."""
    import json

    from rlhflab.lab.gold import gold_scores
    from rlhflab.lab.tasks import prompt_text

    by_iter: dict[int, list[dict]] = {}
    with open(run_dir / "rollouts.jsonl") as f:
        for line in f:
            row = json.loads(line)
            by_iter.setdefault(row["iteration"], []).append(row)
    curve = []
    for it, rows in sorted(by_iter.items()):
        gold = gold_scores(task, [prompt_text(r["prompt"]) for r in rows], [r["response"] for r in rows])
        point = {
            "step": it,
            "reward/score": _mean(r["score"] for r in rows),
            "gold/mean": float(np.mean(gold)),
        }
        point["kl/ref"] = _mean(r["kl"] for r in rows)
        curve.append(point)
    return curve


def _mean(values) -> float:
    """Mean of the values that are not None (a rollout's score or KL can be null: not measured)."""
    known = [v for v in values if v is not None]
    return float(np.mean(known)) if known else float("nan")


def _evaluate_all(
    task, dirs: dict[str, Path], rm_dir: Path | None, seed: int, ev: dict[str, int], best_of_n: bool
) -> tuple[dict, dict]:
    """Gold evaluation of every policy against SFT samples on the same held-out prompts (and of the reward
    model and best-of-n when they were run)."""
    from rlhflab.lab.evaluate import conditioning_of, evaluate_policy, evaluate_reward_model, sample_policy
    from rlhflab.models.loading import load_inference_lm, load_tokenizer
    from rlhflab.rewards import LearnedReward

    prompts = task.heldout_prompts(ev["prompts"], seed=seed)
    tokenizer = load_tokenizer(dirs["sft"])
    sft = load_inference_lm(dirs["sft"])
    sft_samples = sample_policy(sft, tokenizer, task, prompts, n_samples=ev["samples"], seed=seed + 1)
    results = {}
    for name, directory in dirs.items():
        t0 = time.time()
        model = sft if name == "sft" else load_inference_lm(directory)
        # A control-token policy (Quark) samples behind its best token, with its own tokenizer (which has it).
        conditioning = conditioning_of(directory)
        results[name] = evaluate_policy(
            model,
            load_tokenizer(directory) if conditioning else tokenizer,
            task,
            conditioning=conditioning,
            prompts=prompts,
            n_samples=ev["samples"],
            ref_model=sft,
            ref_samples=sft_samples,
            seed=seed + 2,
        )
        results[name]["eval/seconds"] = time.time() - t0
    if rm_dir is None:
        return results, {}
    reward = LearnedReward.from_pretrained(rm_dir)
    if best_of_n:
        t0 = time.time()
        name = f"best_of_{ev['best_of_n']}"
        results[name] = _evaluate_best_of_n(
            task, sft, tokenizer, reward, prompts, sft_samples, seed, ev["samples"], ev["best_of_n"]
        )
        results[name]["eval/seconds"] = time.time() - t0
    t0 = time.time()
    rm_metrics = evaluate_reward_model(reward.score, task, n_pairs=ev["rm_pairs"], seed=seed)
    return results, {"rm": {**rm_metrics, "eval/seconds": time.time() - t0}}


def _heldout_curves(task, dirs: dict[str, Path], out: Path, seed: int, ev: dict[str, int]) -> dict[str, list]:
    """Gold and KL to SFT over training, from each trained method's snapshots, on one set of held-out prompts
    (other seeds than the final evaluation's draws); step 0 is the SFT model for every method."""
    from rlhflab.lab.curves import gold_curve
    from rlhflab.lab.evaluate import evaluate_policy, sample_policy
    from rlhflab.models.loading import load_inference_lm, load_tokenizer

    prompts = task.heldout_prompts(ev["curve_prompts"], seed=seed + 7)
    tokenizer, sft = load_tokenizer(dirs["sft"]), load_inference_lm(dirs["sft"])
    ref_samples = sample_policy(sft, tokenizer, task, prompts, n_samples=ev["curve_samples"], seed=seed + 8)
    kw = {"prompts": prompts, "n_samples": ev["curve_samples"], "ref_samples": ref_samples, "seed": seed + 9}
    start = evaluate_policy(sft, tokenizer, task, ref_model=sft, **kw)
    return {
        name: gold_curve(task, out / name, ref_model=sft, tokenizer=tokenizer, start=start, **kw)
        for name in dirs
        if name != "sft"
    }


def _evaluate_best_of_n(
    task, sft, tokenizer, reward, prompts, sft_samples, seed, n_samples: int, n: int
) -> dict:
    """Best-of-n is a sampling procedure, not a model: evaluate its picks directly by gold."""
    from rlhflab.eval import metrics as M
    from rlhflab.lab.evaluate import gold_term_metrics, sample_metrics, score_responses
    from rlhflab.lab.tasks import chat_prompt
    from rlhflab.stages.best_of_n import best_of_n, best_of_n_kl

    picks = []
    for j in range(n_samples):
        out = best_of_n(sft, tokenizer, [chat_prompt(p) for p in prompts], reward, n=n, seed=seed + 10 + j)
        picks.append(out.texts)
    samples = score_responses(
        task, list(prompts), [[picks[j][i] for j in range(n_samples)] for i in range(len(prompts))]
    )
    win = M.win_rate_all_pairs(samples.gold, sft_samples.gold)
    wmean, wlo, whi = M.mean_ci95(win)
    gain, glo, ghi = M.mean_ci95(M.paired_gain(samples.gold, sft_samples.gold))
    return {
        **gold_term_metrics(samples),
        "gold/win_rate": wmean,
        "gold/win_rate_ci95": [wlo, whi],
        "gold/gain": gain,
        "gold/gain_ci95": [glo, ghi],
        # The KL of best-of-n to its base policy is at most log n - (n - 1) / n (Stiennon et al. 2020).
        "kl/ref": best_of_n_kl(n),
        **sample_metrics(samples),
        "examples": [
            {"prompt": p, "response": rs[0], "gold": float(g[0])}
            for p, rs, g in list(zip(samples.prompts, samples.responses, samples.gold))[:6]
        ],
    }


def _summary(policies: dict, label_queries: dict[str, int]) -> dict:
    """The report.json summary block: one row per policy."""
    out = {}
    for name, m in policies.items():
        ci = m.get("gold/ci95") or [np.nan, np.nan]
        out[name] = {
            "gold_reward_mean": m["gold/mean"],
            "gold_reward_ci95": float((ci[1] - ci[0]) / 2),
            "win_rate_vs_sft": m.get("gold/win_rate", 0.5),
            # Paired by prompt against the SFT samples every row is judged against (0 for SFT's own row up to
            # sampling noise): the interval that says whether a method beat SFT.
            "gold_gain_vs_sft": m.get("gold/gain", 0.0),
            "gold_gain_vs_sft_ci95": m.get("gold/gain_ci95", [0.0, 0.0]),
            "kl_to_sft": m.get("kl/ref", 0.0),
            "mean_length": m["sample/len_mean"],
            "label_queries": label_queries[name],
        }
        # Tasks with a harmlessness part (harm): both golds, and each where it matters.
        for key, metric in HARM_SUMMARY.items():
            if metric in m:
                out[name][key] = m[metric]
    return out


# Summary key -> evaluation metric, for tasks whose gold has helpfulness and harmlessness parts.
HARM_SUMMARY = {
    "helpfulness_gold": "gold/helpfulness",
    "harmlessness_gold": "gold/harmlessness",
    "helpfulness_benign": "gold/helpfulness/benign",
    "harm_rate_risky": "gold/harm/risky",
    "false_refusal_benign": "gold/refused/benign",
}


def _label_queries(out: Path, policies: dict) -> dict[str, int]:
    """Preference labels each policy cost (the label budget; Guo et al. 2024 compare methods at equal budgets).

    SFT learns from demonstrations: 0. A method trained on the lab's offline pairs (DPO, and the judge behind
    PPO, RLOO, GRPO, best-of-n (the reward model) and DNO (the preference model)) costs every pair the
    annotators were asked, ties included; a method the annotators label online costs the queries its feedback
    source logged (`feedback/queries`, last row of its metrics)."""
    import json

    from rlhflab.core.metrics_log import read_metrics

    pairs = json.loads((out / "data" / "lab_data.json").read_text())["pairs"]
    offline = int(pairs["n"] + pairs["ties"])
    result = {}
    for name in policies:  # best_of_N: the reward model's pairs
        if name == "sft":
            result[name] = 0
        elif name in ("online_dpo", "iterative_dpo"):
            rows = [r for r in read_metrics(out / name / "metrics.jsonl") if "feedback/queries" in r]
            result[name] = int(rows[-1]["feedback/queries"])
        else:
            result[name] = offline
    return result


def _wiring(
    task: str, data: dict[str, Path], final: dict[str, Path], base_model: str | None = None
) -> dict[str, list[str]]:
    """Each stage's model and data: the lab's base model (or `base_model`, a directory) and files, then each stage
    from the SFT model."""
    final = {name: final.get(name, Path("unused")) for name in METHODS}
    wiring = {
        "sft": [f"model.name_or_path={base_model or 'lab:' + task}", f"data.train_path={data['sft']}"],
        "rm": [f"model.name_or_path={final['sft']}", f"data.train_path={data['pairs']}"],
        "ppo": [
            f"model.name_or_path={final['sft']}",
            f"data.train_path={data['prompts']}",
            f"algo.reward_model={final['rm']}",
        ],
        "dpo": [f"model.name_or_path={final['sft']}", f"data.train_path={data['pairs']}"],
    }
    wiring["ppo_kl0"] = wiring["rloo"] = wiring["grpo"] = wiring["ppo"]
    wiring["expert_iteration"] = wiring["rejection_sampling"] = wiring["rest"] = wiring["ppo"]
    wiring["quark"] = wiring["reward_conditioning"] = wiring["ppo"]
    wiring["online_dpo"] = [f"model.name_or_path={final['sft']}", f"data.train_path={data['prompts']}"]
    wiring["iterative_dpo"] = wiring["online_dpo"]
    wiring["pm"] = wiring["rm"]
    wiring["feedme"] = [*wiring["rm"], "data.columns.completion=chosen"]
    wiring["dno"] = [*wiring["online_dpo"], f"algo.preference_model={final['pm']}"]
    return wiring


def _total_steps(name: str, cfg, n_records: dict[str, int]) -> int:
    """About how many optimizer steps (iterations) a method's run takes, for its snapshot spacing."""
    algo = cfg.algo
    if getattr(algo, "mode", None) == "rest":  # rs: each fine-tuning run is one step
        return algo.grow_steps * len(algo.thresholds)
    if hasattr(algo, "rounds"):  # iterative-dpo, rs: each round is one step (one snapshot at most)
        return algo.rounds
    if hasattr(algo, "iterations"):
        return algo.iterations
    if cfg.optim.max_steps:
        return cfg.optim.max_steps
    n = n_records["n_pairs" if name in ("rm", "dpo", "feedme") else "n_sft"]
    n_train = n - int(n * getattr(cfg.data, "eval_fraction", 0.0))
    return max(1, n_train // cfg.optim.batch_size) * cfg.optim.epochs


def _configs(
    names: list[str],
    out: Path,
    seed: int,
    task: str,
    user: dict,
    data: dict,
    ev: dict,
    *,
    base_model: str | None = None,
) -> dict:
    """Every method's stage config, built (and so validated) before any work starts: a typo in the last
    method's section fails in a second, not after ten minutes. Trained policies snapshot curve_points times.
    `base_model`: a model directory instead of the lab's base model (the real-model budgets and LoRA)."""
    final = {name: out / name / "final" for name in names}
    wiring = _wiring(task, data, final, base_model)
    real = base_model is not None
    # The annotators who labelled the pairs also label the online methods' samples (a stage section's own
    # algo.annotators keys still win: the user's section is merged last).
    same_annotators = [f"algo.annotators.{k}={v}" for k, v in user.get("annotators", {}).items()]
    for name in ("online_dpo", "iterative_dpo"):
        wiring[name] = [*wiring[name], *same_annotators]
    n_records = _section(user, "data", real_model=real)
    configs = {}
    for name in names:
        cfg = _stage_config(name, out, seed, wiring[name], user, real_model=real)
        if name != "sft" and name not in JUDGES and not cfg.logging.snapshot_every:
            every = max(1, -(-_total_steps(name, cfg, n_records) // ev["curve_points"]))
            cfg = _stage_config(name, out, seed, wiring[name], user, snapshot_every=every, real_model=real)
        configs[name] = cfg
    return configs


def _train(name: str, cfg, *, task: str | None = None, resume: bool = False, par=None) -> Path:
    """Run one method's stage as the command line would: lab names resolved, lab feedback built (from `task`'s
    annotators when given, else from the model's lab task); `resume` continues its run directory. Across
    processes (`par`) every process runs the stage (data-parallel itself); the main one resolves the lab's names
    first (it pretrains a missing base model), the others then find them cached."""
    import importlib

    from rlhflab.lab.launch import lab_feedback, resolve_lab
    from rlhflab.stages import STAGES

    stage = METHODS[name].stage
    module = importlib.import_module(STAGES[stage][0])
    log = par.voice() if par is not None else print
    feedback = lab_feedback(cfg, stage, task=task, log=log)
    extra = {"feedback": feedback} if feedback is not None else {}
    if resume:
        extra["resume"] = True
    resolved = par.main_first(lambda: resolve_lab(cfg, stage, log=log)) if par else resolve_lab(cfg, stage)
    return module.train(resolved, **extra)


def check_processes(names: list[str], par) -> None:
    """Across processes (`rlhflab run` under `accelerate launch` / `torchrun`) every trained method's stage must
    run across them, under the launch's engine (FSDP, DeepSpeed) when it has one."""
    from rlhflab.stages import DATA_PARALLEL_STAGES, DEEPSPEED_STAGES, FSDP_STAGES

    if par.world == 1:
        return
    engine, allowed = "", DATA_PARALLEL_STAGES
    if par.fsdp is not None:
        engine, allowed = " under FSDP", FSDP_STAGES
    elif par.zero is not None:
        engine, allowed = " under DeepSpeed", DEEPSPEED_STAGES
    for name in names:
        stage = METHODS[name].stage
        if stage != "best_of_n" and stage not in allowed:
            fit = [n for n in names if METHODS[n].stage in (*allowed, "best_of_n")]
            raise ConfigError(
                f"--methods: {name} trains with the {stage} stage, which does not run across processes{engine}; "
                f"run the methods that do ({', '.join(fit)}), or launch `rlhflab run` as one process"
                + (" or with configs/accelerate/ddp.yaml" if engine else "")
            )


def run_pipeline(
    *,
    task: str | None = None,
    seed: int = 0,
    output_dir: str = "runs/demo",
    config_file: str | None = None,
    overrides: list[str] | None = None,
    overwrite: bool = False,
    methods: list[str] | None = None,
    relabel: Callable[[Path], dict] | None = None,
    model: str | None = None,
    resume: bool = False,
    merge: bool = False,
) -> Path:
    """Run the whole pipeline with `methods` (default `DEFAULT_METHODS`); returns the path of report.html.

    `task`: the lab task (default "sentiment", or "review" with `model`). `model`: a local HF causal LM directory
    to start from instead of the task's tiny base model; every method then trains LoRA adapters (Quark and
    reward conditioning the whole model) with the real-model budgets (`MODEL_DEFAULTS`). `merge`: LoRA methods write merged models (model.lora.merge).
    `resume`: continue the run in `output_dir` (finished stages kept, an interrupted one resumed from its last
    checkpoint); it must be launched with the same arguments.
    `relabel(pairs_path) -> stats`: another labeller for the lab's candidate pairs (an LM judge, for RLAIF),
    called once the annotators' pairs.jsonl is written; it rewrites the file in place, and its stats go to
    DATA/relabel.json and the report's meta."""
    from rlhflab.lab.tasks import get_task

    t_start = time.time()
    if model is not None:
        model = _check_base_model(model)
    task = task or (MODEL_TASK if model else "sentiment")
    task_obj = get_task(task)
    names = resolve_methods(methods)
    trained = [n for n in names if n in TRAINED]
    merged = merge_overrides(trained) if merge else []
    user = _user_sections(config_file, [*(overrides or []), *merged])
    unused = [k for k in user if k in TRAINED and k not in trained]
    if unused:
        raise ConfigError(
            f"pipeline section '{unused[0]}' is for a method that is not run; add it to --methods or drop it"
        )
    real = model is not None
    ev = _section(user, "eval", real_model=real)
    out = Path(output_dir)
    data = {name: out / "data" / f"{name}.jsonl" for name in ("sft", "pairs", "prompts")}
    configs = _configs(trained, out, seed, task, user, data, ev, base_model=model)
    par = DataParallel()  # one process, or one of those `accelerate launch` / `torchrun` started
    check_processes(names, par)
    invocation = {"task": task, "seed": seed, "model": model, "methods": names, "user": user}
    out = _open_run(par, output_dir, invocation, resume=resume, overwrite=overwrite)
    seed_everything(seed)

    say = par.voice()
    clock = JobClock(["data", *trained, "eval"], EXPECTED_SECONDS["model" if real else "lab"], out=say)
    relabelled = _train_all(
        task_obj, out, seed, user, configs, clock, relabel=relabel, resume=resume, real=real, par=par
    )
    if not par.is_main:
        # The gold evaluation and the report are the main process's: it reads the saved models alone (the
        # held-out samples are one process's draws), while the others are done.
        return out / "report.html"
    dirs = {n: out / n / "final" for n in trained if n not in JUDGES}
    rm_dir = out / "rm" / "final" if "rm" in trained else None
    clock.start("eval", "gold evaluation of every policy on the held-out prompts")
    policies, reward_models = _evaluate_all(task_obj, dirs, rm_dir, seed, ev, "best_of_n" in names)
    t_curves = time.time()
    curves = _heldout_curves(task_obj, dirs, out, seed, ev)
    t_curves = time.time() - t_curves
    # The on-policy runs also logged every sample: their proxy score, gold (scored here) and KL per iteration.
    rollout_curves = {
        n: _gold_curve(task_obj, out / n) for n in trained if METHODS[n].stage in ("ppo", "rloo", "grpo")
    }
    clock.finish()
    meta = {"seed": seed, "runtime_s": time.time() - t_start, "methods": names, "relabel": relabelled}
    # Where the evaluation's time went (each policy's and the reward model's own seconds are in their metrics).
    meta["curves_eval_s"] = t_curves
    if model:
        meta["base_model"] = model
    return _report(out, task, meta, policies, reward_models, curves, rollout_curves)


def _open_run(par, output_dir: str, invocation: dict, *, resume: bool, overwrite: bool) -> Path:
    """The run directory, prepared by the main process (which records the invocation) while the others wait."""
    if par.world > 1 and not output_dir:
        raise ConfigError("--output-dir is empty: each process would name its own run directory; give one")
    out = Path(output_dir)
    if par.is_main:
        out = prepare_run_dir(output_dir, "run", resume=resume, overwrite=overwrite)
        _record_invocation(out, invocation, resume=resume)
    par.wait()
    return out


def _report(out: Path, task: str, meta: dict, policies, reward_models, curves, rollout_curves) -> Path:
    """Step 5: report.json (with the summary table), the plots and report.html; prints the table."""
    from rlhflab.eval.report import write_report

    summary = _summary(policies, _label_queries(out, policies))
    paths_out = write_report(
        out,
        task=task,
        policies=policies,
        reward_models=reward_models,
        curves=curves,
        rollout_curves=rollout_curves,
        meta={**meta, "summary": summary},
    )
    _patch_report_json(paths_out["json"], task, meta["seed"], meta["runtime_s"], reward_models, summary)
    _print_table(summary, paths_out["html"])
    return paths_out["html"]


def _check_base_model(model: str) -> str:
    """--model: an existing local HF causal LM directory (or a LoRA adapter directory), as an absolute path."""
    from rlhflab.models.loading import check_model_dir, is_adapter_dir, model_dir_config

    if is_adapter_dir(model):
        model_dir_config(model, what="--model")
    else:
        check_model_dir(model, what="--model")
    return str(Path(model).expanduser().resolve())


def _record_invocation(out: Path, invocation: dict, *, resume: bool) -> None:
    """Write what the run was launched with (OUT/pipeline.json); on resume, refuse a different launch: the
    finished stages would not be what the new arguments ask for."""
    import json

    from rlhflab.core.io import atomic_write_text
    from rlhflab.errors import UserError

    path = out / "pipeline.json"
    current = json.loads(json.dumps(invocation, default=str))
    if resume and path.is_file():
        before = json.loads(path.read_text())
        changed = [k for k in current if before.get(k) != current[k]]
        if changed:
            raise UserError(
                f"--resume: {out} was launched with other settings ({', '.join(changed)}: {before.get(changed[0])!r}, "
                f"now {current[changed[0]]!r}); resume with the same arguments, or start anew with --overwrite"
            )
    atomic_write_text(path, json.dumps(current, indent=2) + "\n")


def _train_all(
    task_obj, out: Path, seed: int, user, configs: dict, clock, *, relabel, resume: bool, real: bool, par
):
    """Step 0 (the lab's data) and each method's stage in order. On resume, what is finished is kept: the data
    when its manifest exists, a stage when its final model exists; a stage with a run directory continues from its
    last checkpoint. Across processes (`par`) the main process makes the data (the others wait) and decides what
    is kept; every process runs each stage. Returns the relabeller's stats (None without one, or off the main
    process)."""
    import json

    clock.start("data", f"simulated annotators label the '{task_obj.name}' task")
    relabel_file = out / "data" / "relabel.json"
    relabelled = None
    if par.is_main:
        if (
            resume
            and (out / "data" / "lab_data.json").is_file()
            and (relabel is None or relabel_file.is_file())
        ):
            print("data: kept (resumed run)")
            relabelled = json.loads(relabel_file.read_text()) if relabel is not None else None
        else:
            paths = _make_data(task_obj, out / "data", seed, user, real_model=real)
            relabelled = _relabel_pairs(relabel, paths["pairs"]) if relabel is not None else None
    par.wait()
    for name, cfg in configs.items():
        clock.start(name, METHODS[name].title)
        final, run_dir = out / name / "final", out / name
        if _main_says(par, resume and final.is_dir()):
            clock.out(f"{name}: kept its final model (resumed run)")
            continue
        continues = _main_says(par, resume and run_dir.is_dir() and any(run_dir.iterdir()))
        saved = _train(name, cfg, task=task_obj.name, resume=continues, par=par)
        if Path(saved) != final:
            raise RuntimeError(f"{name} saved its model to {saved}, expected {final}")
    return relabelled


def _main_says(par, flag: bool) -> bool:
    """The main process's `flag`, on every process: what it sees of the run directory is what counts (the others
    must not decide from a directory the main one may be writing)."""
    return bool(par.sum(float(flag) if par.is_main else 0.0))


def _make_data(
    task, out: Path, seed: int, user: dict[str, Any], *, real_model: bool = False
) -> dict[str, Path]:
    """Step 0: the lab's files, labelled by the user's annotators (the `annotators` section)."""
    from rlhflab.lab.make_data import make_task_data

    settings = _annotator_settings(user)
    sizes = _section(user, "data", real_model=real_model)
    return make_task_data(task, out, seed=seed, annotator_settings=settings, **sizes)


def _relabel_pairs(relabel: Callable[[Path], dict], pairs: Path) -> dict:
    """Another labeller's pass over the candidate pairs (rewriting pairs.jsonl); its stats in DATA/relabel.json."""
    import json

    from rlhflab.core.io import atomic_write_text

    stats = relabel(pairs)
    atomic_write_text(pairs.parent / "relabel.json", json.dumps(stats, indent=2) + "\n")
    return stats


def _patch_report_json(
    path: Path, task: str, seed: int, runtime: float, reward_models: dict, summary: dict
) -> None:
    """Add the top-level fields promised by `rlhflab run` (task, seed, runtime_s, reward_model, policies)."""
    import json

    from rlhflab.core.io import atomic_write_text

    report = json.loads(path.read_text())
    report.update(
        {
            "task": task,
            "seed": seed,
            "runtime_s": runtime,
            "reward_model": {"heldout_accuracy": reward_models.get("rm", {}).get("rm/accuracy")},
        }
    )
    report["policy_metrics"] = report.pop("policies")
    report["policies"] = json.loads(json.dumps(summary, default=float).replace("NaN", "null"))
    atomic_write_text(path, json.dumps(report, indent=2) + "\n")


def _gain_cell(row: dict) -> str:
    lo, hi = row["gold_gain_vs_sft_ci95"]
    return f"{row['gold_gain_vs_sft']:+.3f} [{lo:+.3f}, {hi:+.3f}]"


def _print_table(summary: dict, html: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="gold-reward evaluation (held-out prompts)")
    harm = all("harm_rate_risky" in row for row in summary.values())
    extra = ("helpful (benign)", "harm rate (risky)", "harmless") if harm else ()
    cols = ("policy", "gold reward", *extra, "gain vs SFT (paired 95% CI)", "win rate vs SFT", "KL to SFT")
    for col in (*cols, "mean length", "labels"):
        table.add_column(col, justify="right" if col != "policy" else "left")
    for name, row in summary.items():
        cells = (
            [
                f"{row['helpfulness_benign']:.3f}",
                f"{row['harm_rate_risky']:.3f}",
                f"{row['harmlessness_gold']:.3f}",
            ]
            if harm
            else []
        )
        table.add_row(
            name,
            f"{row['gold_reward_mean']:.3f} ± {row['gold_reward_ci95']:.3f}",
            *cells,
            _gain_cell(row),
            f"{row['win_rate_vs_sft']:.2f}",
            f"{row['kl_to_sft']:.2f}",
            f"{row['mean_length']:.1f}",
            str(row["label_queries"]),
        )
    Console().print(table)
    print(f"report: {html}")


__all__ = ["run_pipeline"]
