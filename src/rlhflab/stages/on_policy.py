"""What the on-policy stages (PPO, RLOO, GRPO) share: the reward sources, the prompts, sampling from the
current policy, and the rollouts log. The maths of each method stays in its own stage."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch

from rlhflab.config import (
    ModelSection,
    PairFeedbackSection,
    PromptDataSection,
    RewardSourcesSection,
    SamplingSection,
)
from rlhflab.data import PromptRecord
from rlhflab.errors import ConfigError
from rlhflab.rollout.generate import Rollout, SamplingSettings, encode_prompts, generate
from rlhflab.stages.common import mixed_precision
from rlhflab.stages.data_source import load_train_records


def require_reward(algo: RewardSourcesSection, reward: Any = None) -> None:
    """Refuse a run with no reward source (checked before anything is loaded)."""
    if reward is None and not algo.reward_model:
        raise ConfigError(
            "config: algo.reward_model is empty; give a reward model directory (from `rlhflab rm`) "
            "or a reward spec such as 'rule:length'"
        )


def load_reward(algo: RewardSourcesSection, device: torch.device):
    """The reward source the config names (several combined as algo.reward_combine says)."""
    from rlhflab.rewards import load_rewards

    return load_rewards(
        algo.reward_model,
        weights=algo.reward_weights or None,
        device=device,
        combine=algo.reward_combine,
        safety_threshold=algo.safety_threshold,
        unsafe_prompt_pattern=algo.unsafe_prompt_pattern,
        uwo_coef=algo.uwo_coef if algo.reward_combine == "ensemble_uwo" else None,
    )


def require_feedback(algo: PairFeedbackSection, feedback: Any = None) -> None:
    """Refuse a pairwise-feedback run whose source is missing (online-dpo, iterative-dpo): no reward, or no
    preference model directory. Reads config.json at most, so it runs before anything is loaded. The lab's
    annotators are built above the stages; a source passed in Python needs nothing."""
    if feedback is not None:
        return
    if algo.feedback == "reward":
        require_reward(algo)
    elif algo.feedback == "preference_model":
        from rlhflab.models.preference_model import check_preference_model_dir

        check_preference_model_dir(algo.preference_model)
    elif algo.feedback == "judge":
        from rlhflab.models.loading import check_model_dir

        check_model_dir(algo.judge_model, what="algo.judge_model")
    elif algo.feedback == "human":
        from rlhflab.label.store import Store

        store = Store(algo.label_db)  # refuses a database `rlhflab label init` did not make
        store.counts(algo.label_project)  # and a project it does not hold
        store.close()


def default_feedback(algo: PairFeedbackSection, device: torch.device, seed: int):
    """The feedback source algo.feedback names, when none was passed in: a `RewardFeedback` of algo.reward_model
    or a `PreferenceModelFeedback` of algo.preference_model or of the LM judge algo.judge_model (algo.feedback_mode
    either way, seeded by `seed`), or a `HumanFeedback` of the labelling project algo.label_project."""
    from rlhflab.feedback import PreferenceModelFeedback, RewardFeedback

    if algo.feedback == "preference_model":
        return PreferenceModelFeedback.from_pretrained(
            algo.preference_model, mode=algo.feedback_mode, seed=seed, device=device
        )
    if algo.feedback == "judge":
        from rlhflab.models.judge import LMJudge

        judge = LMJudge.from_pretrained(algo.judge_model, device=device)
        return PreferenceModelFeedback(judge, mode=algo.feedback_mode, seed=seed)
    if algo.feedback == "human":
        from rlhflab.label.feedback import HumanFeedback

        return HumanFeedback(algo.label_db, algo.label_project, overlap=algo.label_overlap)
    return RewardFeedback(load_reward(algo, device), mode=algo.feedback_mode, seed=seed)


def load_prompts(data: PromptDataSection, per_iteration: int) -> tuple[list, int]:
    """(prompts, iterations per pass over them), refusing fewer prompts than one iteration takes."""
    records = load_train_records(data, "prompt")
    prompts = [r.prompt if isinstance(r, PromptRecord) else r for r in records]
    steps_per_epoch = len(prompts) // per_iteration
    if steps_per_epoch == 0:
        raise ConfigError(
            f"config: {len(prompts)} prompts are fewer than the {per_iteration} one iteration samples; "
            "lower the prompts per iteration or add prompts"
        )
    return prompts, steps_per_epoch


def sampling_settings(s: SamplingSection, *, greedy: bool = False) -> SamplingSettings:
    """The rollout engine's settings from the config's sampling section (greedy: argmax decoding)."""
    return SamplingSettings(
        max_new_tokens=s.max_new_tokens,
        temperature=s.temperature,
        top_k=s.top_k,
        top_p=s.top_p,
        do_sample=not greedy,
    )


def rollout_engine(cfg, policy, tokenizer):
    """The rollout engine cfg.sampling.engine names, built once per run: None for hf (`generate` on the policy
    itself), else a `VLLMEngine` colocated with the policy (`rlhflab.rollout.vllm_engine`). `cfg`: the stage
    config (its seed and its sampling, model and data sections)."""
    if cfg.sampling.engine == "hf":
        return None
    from rlhflab.models.loading import is_peft_model
    from rlhflab.rollout.vllm_engine import VLLMEngine
    from rlhflab.stages.common import resolve_model_path

    lora = policy.peft_config["default"] if is_peft_model(policy) else None
    # Under bf16 autocast the trainer's forward passes run in bfloat16: vLLM samples in bfloat16 as well.
    dtype = "bfloat16" if cfg.model.autocast == "bf16" else cfg.model.dtype
    return VLLMEngine(
        lora.base_model_name_or_path if lora is not None else resolve_model_path(cfg.model.name_or_path),
        tokenizer,
        sampling_settings(cfg.sampling),
        dtype=dtype,
        gpu_memory_utilization=cfg.sampling.vllm_gpu_memory_utilization,
        sleep=cfg.sampling.vllm_sleep,
        seed=cfg.seed,
        lora_rank=None if lora is None else int(lora.r),
        max_model_len=cfg.data.max_prompt_length + cfg.sampling.max_new_tokens,
    )


def sample(
    policy,
    tokenizer,
    prompts: list,
    settings: SamplingSettings,
    *,
    model_cfg: ModelSection,
    data: PromptDataSection,
    device: torch.device,
    batch_size: int,
    seed: int,
    row_seeds: list[int] | None = None,
    engine=None,
    synced: bool = False,
) -> Rollout:
    """One response per prompt from the current policy (repeat a prompt for several), prompts cut to
    data.max_prompt_length, under the model's autocast setting; with `row_seeds`, each row from its own seed
    (`rlhflab.rollout.generate`), else all from `seed`. With a `VLLMEngine` (`rollout_engine`), the policy's
    weights are pushed to it first if they changed since the last push (its `weight_sync_s` says how long that
    took), and it samples. `synced`: the policy is sharded (FSDP) and every process samples (`generate`)."""
    if engine is not None:
        engine.sync_weights(policy)
        rows = [r[-data.max_prompt_length :] for r in encode_prompts(tokenizer, prompts)]
        return engine.sample(rows, settings, row_seeds, prompts=prompts, device=device, seed=seed)
    with mixed_precision(model_cfg, device)():
        return generate(
            policy,
            tokenizer,
            prompts,
            settings,
            batch_size=batch_size,
            seed=seed,
            max_prompt_tokens=data.max_prompt_length,
            row_seeds=row_seeds,
            synced=synced,
        )


def sample_share(
    policy,
    tokenizer,
    batch: list,
    group: int,
    settings: SamplingSettings,
    cfg,
    device,
    step_seed: int,
    par,
    engine=None,
) -> Rollout:
    """This process's share (`par.shard`) of a step's prompts, each sampled `group` times (rows prompt-major),
    each row from its own seed (`row_seeds` of the whole step's rows): the rows one process would sample.
    `cfg`: the stage config (its model and data sections); `engine`: `rollout_engine`'s (None: HF)."""
    mine = par.shard(list(range(len(batch))))
    seeds = row_seeds(step_seed, len(batch) * group)
    return sample(
        policy,
        tokenizer,
        [batch[q] for q in mine for _ in range(group)],
        settings,
        model_cfg=cfg.model,
        data=cfg.data,
        device=device,
        batch_size=len(batch) * group,
        seed=step_seed,
        row_seeds=[seeds[q * group + j] for q in mine for j in range(group)],
        engine=engine,
        synced=par.sharded,
    )


def row_seeds(step_seed: int, n: int) -> list[int]:
    """One sampling seed per row of a step's batch of n: a row keeps its seed whichever process samples it."""
    return [step_seed * 1_000_003 + i for i in range(n)]


def append_rollouts(
    path: Path, iteration: int, rollout: Rollout, scores, kl, par=None, group: int = 1
) -> None:
    """Append one JSON line per response (prompt, response, score, sequence KL) to RUN/rollouts.jsonl, so the
    proxy reward can be compared afterwards with anything else (the lab's gold reward).

    Across processes (`par`, each holding its `shard` of the batch's groups of `group` rows), the main process
    writes the whole batch, gathered in the batch's order."""
    rows = [(p, t, float(s), float(k)) for p, t, s, k in zip(rollout.prompts, rollout.texts, scores, kl)]
    if par is not None and par.world > 1:
        groups = par.gather([rows[i : i + group] for i in range(0, len(rows), group)])
        rows = [r for g in groups for r in g]
        if not par.is_main:
            return
    with open(path, "a") as f:
        for prompt, text, score, seq_kl in rows:
            row = {"iteration": iteration, "prompt": prompt, "response": text}
            # NaN (a failed score, a KL not measured) is written as null: NaN is not JSON.
            row.update({k: v if math.isfinite(v) else None for k, v in (("score", score), ("kl", seq_kl))})
            f.write(json.dumps(row) + "\n")


def check_data_parallel(algo: RewardSourcesSection, par, batch_key: str, batch: int) -> None:
    """What an on-policy stage needs across processes: a share of every batch (`batch` under `batch_key`) for
    each process, and no reward that whitens over the batch (the Llama 2 gate), which each would do over its
    share only."""
    par.check_batch(batch, batch_key)
    if par.sharded and batch % par.world:
        # Each process's forward passes over its rows are collective under FSDP: the shares must be equal.
        raise ConfigError(
            f"config: {batch_key}={batch} does not split evenly over the {par.world} processes, which a sharded "
            f"model needs (each process's forward passes gather the weights from all); make it a multiple of "
            f"{par.world}"
        )
    if par.world > 1 and algo.reward_combine == "llama2_gate":
        raise ConfigError(
            "config: algo.reward_combine=llama2_gate whitens the scores over the whole batch, which is not yet "
            "done across processes; run it in one process"
        )


# PPO's thresholds of the health warnings (not errors: these happen in healthy runs now and then).
NEGATIVE_KL_WARN = -0.5
CLIPFRAC_WARN = 0.3
APPROX_KL_WARN = 0.5


def ppo_health_warnings(metrics: dict[str, float], iteration: int, log=print) -> None:
    """PPO's warnings of a run going astray (not errors: each happens in healthy runs now and then)."""
    if metrics["kl/sequence"] < NEGATIVE_KL_WARN:
        log(
            f"ppo warning (iteration {iteration}): the KL estimate is negative ({metrics['kl/sequence']:.3f}); "
            "sampling and scoring disagree (temperature, top-k/top-p, or a tokenizer mismatch)"
        )
    if metrics.get("loss/clipfrac", 0.0) > CLIPFRAC_WARN:
        log(
            f"ppo warning (iteration {iteration}): clip fraction {metrics['loss/clipfrac']:.2f} is high; "
            "lower optim.lr or algo.ppo_epochs"
        )
    if metrics.get("kl/approx", 0.0) > APPROX_KL_WARN:
        log(
            f"ppo warning (iteration {iteration}): policy moved {metrics['kl/approx']:.2f} nats in one update; "
            "lower optim.lr"
        )
