"""PPO against a reward model with a KL penalty to a frozen reference (InstructGPT step 3).

Each iteration (Ouyang et al. 2022; the PPO loop of AlpacaFarm, Dubois et al. 2023):

    1. generate   sample responses to a batch of prompts with the current policy (KV-cached, batched)
    2. score      sequence rewards from the reward source(s); a penalty for responses cut off without EOS
    3. old/ref    log-probs of the sampled tokens under the policy (frozen copy: "old") and the reference,
                  and the values, all without gradients
    4. shape      per-token rewards r_t = -beta * KL_t, plus the score at the last real token
    5. GAE        advantages and returns; advantages whitened (and weighted by truncated importance sampling
                  when algo.tis_cap is set); the sampler / trainer log-prob mismatch is logged
    6. optimize   several epochs of minibatches of the clipped surrogate + clipped value loss (+ entropy)
    7. adapt      the KL controller moves beta toward the target KL (when adaptive)

Health guards stop the run (keeping the last good checkpoint) when a loss or log-prob goes NaN/inf, and
warn when the KL estimate goes negative (the policy found tokens the sampler did not: usually a
sampling/scoring mismatch) or when the clip fraction or KL explodes.

Every rollout (prompt, response, score, KL) is appended to RUN/rollouts.jsonl, so the proxy reward can be
compared afterwards with anything else (the lab's gold reward) without training code ever seeing it.
"""

from __future__ import annotations

import contextlib
import functools
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from rlhflab.config import PPOConfig
from rlhflab.core.health import check_finite
from rlhflab.core.seeding import batch_schedule, seed_everything
from rlhflab.losses import (
    AdaptiveKLController,
    FixedKLController,
    entropy_bonus,
    entropy_from_logits,
    gae,
    kl_shaped_rewards,
    masked_mean,
    ppo_policy_loss,
    ppo_value_loss,
    sampler_mismatch,
    truncated_importance_weights,
)
from rlhflab.models.backbone import backbone_and_head, hidden_size_of, hidden_to_logits
from rlhflab.models.flops import MatmulParams, matmul_params, ppo_iteration_flops
from rlhflab.models.heads import Critic, ValueHead
from rlhflab.models.loading import count_parameters, load_inference_lm, save_model
from rlhflab.models.logprobs import token_logps
from rlhflab.rollout.generate import Rollout
from rlhflab.stages.common import (
    Loop,
    build_optimizer,
    clip_gradients,
    finish,
    load_policy,
    mixed_precision,
    open_run,
    optimizer_step,
    resolve_model_path,
)
from rlhflab.stages.data_source import require_train_path
from rlhflab.stages.on_policy import (
    append_rollouts,
    check_data_parallel,
    load_prompts,
    load_reward,
    ppo_health_warnings,
    require_reward,
    rollout_engine,
    sample_share,
    sampling_settings,
)
from rlhflab.stages.parallel import DataParallel


def _response_pass(
    policy,
    value_model,
    rollout: Rollout,
    temperature: float,
    *,
    with_entropy: bool,
    amp: Callable = contextlib.nullcontext,
):
    """Log-probs [B, R] of the sampled tokens, values [B, R], and optionally per-token entropy [B, R], all
    float32 (the forward runs inside `amp()`, the model.autocast context).

    Values are read at the state before each response token (the position that predicts it).
    """
    ids, attn, start = rollout.input_ids, rollout.attention_mask, rollout.response_start
    target = torch.cat([torch.zeros_like(rollout.prompt_mask), rollout.response_mask], dim=1)
    with amp():
        logps, hidden = token_logps(
            policy,
            ids,
            attn,
            target,
            position_ids=rollout.position_ids,
            temperature=temperature,
            return_hidden=True,
        )
        logps = logps[:, start - 1 :]
        state_hidden = hidden[:, start - 1 : -1]
        if isinstance(value_model, ValueHead):
            values = value_model(state_hidden)
        else:
            values = value_model(ids, attn, rollout.position_ids)[:, start - 1 : -1]
        entropy = None
        if with_entropy:
            _, head = backbone_and_head(policy)
            entropy = entropy_from_logits(hidden_to_logits(policy, head, state_hidden).float() / temperature)
    return logps.float(), values.float(), entropy


def _load_reward(cfg: PPOConfig, device: torch.device):
    return load_reward(cfg.algo, device)


def _critic_init(cfg: PPOConfig) -> str:
    """Where a separate critic starts: the first reward source when it is a reward model (InstructGPT
    initializes the value function from the reward model), else the policy."""
    from rlhflab.rewards.learned import resolve_reward_dir
    from rlhflab.rewards.spec import parse_spec

    if cfg.algo.reward_model:
        source, _ = parse_spec(cfg.algo.reward_model[0])
        if not source.startswith(("rule:", "lab:")) and any(
            (resolve_reward_dir(source) / f).is_file() for f in ("config.json", "adapter_config.json")
        ):
            return str(resolve_reward_dir(source))
    return resolve_model_path(cfg.model.name_or_path)


def _setup_models(cfg: PPOConfig, device: torch.device | None = None):
    """(policy, value model, reference, tokenizer, device). The reference is frozen and in eval mode. `device`
    overrides model.device (the one a data-parallel launcher gave this process)."""
    policy, tokenizer, device = load_policy(cfg.model, device=device)
    # Generation pads on the left; training collators pad on the right (rollout tensors carry their own).
    ref_path = resolve_model_path(cfg.ref_model or cfg.model.name_or_path)
    ref = load_inference_lm(ref_path, dtype=cfg.model.dtype, device=str(device))
    if cfg.algo.separate_critic:
        value_model: nn.Module = Critic.from_pretrained(_critic_init(cfg), device=str(device))
    else:
        value_model = ValueHead(hidden_size_of(policy)).to(device)
    return policy, value_model, ref, tokenizer, device


@torch.no_grad()
def _make_experience(
    policy, value_model, ref, reward, rollout: Rollout, kl_ctl, cfg: PPOConfig, step: int, last_ckpt, par=None
):
    """Steps 2-5: scores, old/ref log-probs and values, KL-shaped rewards, GAE. Returns tensors + metrics.
    Across processes (`par`), each holds some rows of the batch; the whitening and the metrics are the whole
    batch's."""
    par = par or DataParallel()
    timings = {}
    t = time.time()
    # 2. score
    scores = reward.score(rollout.prompts, rollout.texts).to(rollout.response_ids.device, torch.float32)
    raw_scores = scores.clone()
    if cfg.algo.missing_eos_penalty:
        scores = scores - cfg.algo.missing_eos_penalty * (~rollout.ended_with_eos).float()
    timings["perf/time_score"] = time.time() - t
    t = time.time()
    # 3. old and reference log-probs, values
    temp = cfg.sampling.temperature
    policy.eval()
    amp = mixed_precision(cfg.model, rollout.response_ids.device)
    old_logps, old_values, entropy = _response_pass(
        policy, value_model, rollout, temp, with_entropy=True, amp=amp
    )
    target = torch.cat([torch.zeros_like(rollout.prompt_mask), rollout.response_mask], dim=1)
    with amp():
        ref_logps = token_logps(
            ref,
            rollout.input_ids,
            rollout.attention_mask,
            target,
            position_ids=rollout.position_ids,
            temperature=temp,
        )[:, rollout.response_start - 1 :]
    policy.train()
    timings["perf/time_forward"] = time.time() - t
    mask = rollout.response_mask
    check_finite(
        {
            "old_logps": old_logps[mask],
            "ref_logps": ref_logps[mask],
            "values": old_values[mask],
            "reward/score": scores,
        },
        step=step,
        last_good=last_ckpt,
    )
    # 4. KL-shaped rewards
    shaped = kl_shaped_rewards(
        scores, old_logps, ref_logps, mask, beta=kl_ctl.value, estimator=cfg.algo.kl_estimator
    )
    # 5. GAE, then whitening across the whole rollout batch (more samples, steadier statistics)
    advantages, returns = gae(shaped.rewards, old_values, mask, gamma=cfg.algo.gamma, lam=cfg.algo.lam)
    if cfg.algo.whiten_advantages:
        advantages = par.masked_whiten(advantages, mask, shift_mean=True)
    # The sampler's log-probs of its tokens against the trainer's old ones: ~0 with one engine in float32; the
    # truncated importance weights correct the update when they differ (Yao et al. 2025).
    mismatch = sampler_mismatch(old_logps, rollout.sampler_logps, mask)
    if cfg.algo.tis_cap > 0:
        advantages = advantages * truncated_importance_weights(
            old_logps, rollout.sampler_logps, mask, cfg.algo.tis_cap
        )
    seq_kl = shaped.metrics["kl/sequence"]
    metrics = _experience_metrics(par, raw_scores, shaped.metrics, mask, rollout.ended_with_eos, mismatch,
                                  {"loss/entropy_rollout": entropy, "loss/value_error_rollout": (old_values - returns).abs()})  # fmt: skip
    metrics.update({"kl/coef": kl_ctl.value, **timings})
    exp = {
        "old_logps": old_logps,
        "ref_logps": ref_logps,
        "old_values": old_values,
        "advantages": advantages,
        "returns": returns,
        "scores": raw_scores,
        "seq_kl": seq_kl,
    }
    return exp, metrics


def _experience_metrics(par, scores, shaped: dict, mask, ended, mismatch: dict, token_values: dict) -> dict:
    """The rollout batch's metrics, over the whole batch whichever process holds which rows: per-row means of
    the scores and the KL-shaped rewards, per-token means of `token_values` [b, R] and of the sampler mismatch,
    its max, and reward/score_std (unbiased)."""
    rows, tokens = float(len(scores)), float(mask.sum())
    per_row = {
        "reward/score": scores,
        "reward/total": shaped["reward/total"],
        "reward/non_score": shaped["reward/non_score"],
        "kl/sequence": shaped["kl/sequence"],
        "perf/response_length": mask.sum(-1).float(),
        "perf/ended_with_eos": ended.float(),
    }
    parts = {key: (float(v.double().sum()), rows) for key, v in per_row.items()}
    parts["score_sq"] = (float((scores.double() ** 2).sum()), rows)
    parts.update({key: (float(masked_mean(v, mask)) * tokens, tokens) for key, v in token_values.items()})
    for key in ("kl/sampler_mismatch_mean", "kl/sampler_trainer_k1"):  # means over the real tokens
        parts[key] = (float(mismatch[key]) * tokens, tokens)
    out = par.means(parts)
    n, mean_sq = par.sum(rows), out.pop("score_sq")
    out["reward/score_std"] = (
        (max(mean_sq - out["reward/score"] ** 2, 0.0) * n / (n - 1)) ** 0.5 if n > 1 else 0.0
    )
    out["kl/sampler_mismatch_max"] = par.max(float(mismatch["kl/sampler_mismatch_max"]))
    return out


def _ppo_epochs(
    policy,
    value_model,
    params,
    optimizer,
    scheduler,
    rollout: Rollout,
    exp: dict,
    cfg: PPOConfig,
    step_for_errors: int,
    last_ckpt,
    par=None,
) -> dict[str, float]:
    """Step 6: several epochs of minibatch updates on one rollout batch. Returns averaged metrics.

    The minibatches are drawn from the whole batch's rows; across processes (`par`) each computes the terms of
    the rows it holds, divided by the whole minibatch's size, and the summed gradients are one process's."""
    par = par or DataParallel()
    n = cfg.algo.rollout_batch_size
    sums: dict[str, float] = {}
    grad_norms = []
    g = torch.Generator().manual_seed(cfg.seed * 7919 + step_for_errors)
    for _ in range(cfg.algo.ppo_epochs):
        order = torch.randperm(n, generator=g)
        for s in range(0, n, cfg.algo.minibatch_size):
            rows = order[s : s + cfg.algo.minibatch_size].tolist()
            idx = torch.tensor(par.local_rows(rows), dtype=torch.long, device=rollout.response_ids.device)
            # A process may hold none of a minibatch's rows: it adds zero gradients; with a sharded policy (or under
            # DeepSpeed, whose gradient reduction is collective) it still joins the passes, on one row weighted 0.
            held = float(len(idx) > 0)
            if held or par.lockstep:
                idx = idx if held else torch.zeros(1, dtype=torch.long, device=idx.device)
                terms = _minibatch_terms(policy, value_model, rollout, exp, idx, len(rows), cfg)
                check_finite({"loss/ppo": terms["loss/total"]}, step=step_for_errors, last_good=last_ckpt)
                par.backward(terms["loss/total"] * held)
                for k, v in terms.items():
                    sums[k] = sums.get(k, 0.0) + held * float(v.detach())
            par.sum_gradients(params)
            # DeepSpeed's engine clips and applies the update itself.
            clip = functools.partial(clip_gradients, params, cfg.optim.max_grad_norm)
            grad_norm = par.deepspeed_step(scheduler) if par.engine else clip()
            check_finite({"loss/grad_norm": grad_norm}, step=step_for_errors, last_good=last_ckpt)
            if par.engine is None:
                optimizer_step(optimizer, scheduler)
            grad_norms.append(grad_norm)
    count = len(grad_norms)
    sums = par.sum_all({k: sums.get(k, 0.0) for k in _EPOCH_METRICS})
    return {**{k: v / count for k, v in sums.items()}, "loss/grad_norm": sum(grad_norms) / count}


# The metrics of step 6: each minibatch's value is a mean over its rows (`_minibatch_terms`).
_EPOCH_METRICS = (
    "loss/policy",
    "loss/value",
    "loss/total",
    "loss/clipfrac",
    "loss/ratio",
    "kl/approx",
    "loss/value_clipfrac",
    "loss/value_error",
)


def _minibatch_terms(
    policy, value_model, rollout: Rollout, exp: dict, idx, size: int, cfg: PPOConfig
) -> dict:
    """The rows `idx` of one minibatch of `size` rows: their share of the minibatch loss (sum over the rows /
    size: the clipped surrogate + value_coef x the value loss + entropy_coef x the entropy bonus) and of each
    metric's minibatch mean."""
    mb = rollout.select(idx)
    mask = mb.response_mask
    logps, values, entropy = _response_pass(
        policy,
        value_model,
        mb,
        cfg.sampling.temperature,
        with_entropy=cfg.algo.entropy_coef > 0,
        amp=mixed_precision(cfg.model, rollout.response_ids.device),
    )
    pg = ppo_policy_loss(
        logps, exp["old_logps"][idx], exp["advantages"][idx], mask, clip_eps=cfg.algo.clip_eps
    )
    vf = ppo_value_loss(
        values,
        exp["old_values"][idx],
        exp["returns"][idx],
        mask,
        clip_eps_value=cfg.algo.value_clip_eps or None,
    )
    loss = pg.loss.sum() / size + cfg.algo.value_coef * vf.loss.sum() / size
    if entropy is not None:
        loss = loss + cfg.algo.entropy_coef * entropy_bonus(entropy, mask).loss.sum() / size
    metrics = {k: v.sum() / size for k, v in {**pg.metrics, **vf.metrics}.items()}
    return {
        "loss/policy": pg.loss.sum() / size,
        "loss/value": vf.loss.sum() / size,
        "loss/total": loss,
        **metrics,
    }


def _iteration_perf(
    metrics: dict[str, float],
    rollout: Rollout,
    cfg: PPOConfig,
    params: tuple[MatmulParams, MatmulParams, MatmulParams],
) -> dict[str, float]:
    """perf/time_iteration and perf/flops_per_s of one iteration: `rlhflab.models.flops.ppo_iteration_flops`
    of the (policy, reference, value model) matmul weights over the rollout's real and response tokens."""
    seconds = sum(metrics[f"perf/time_{k}"] for k in ("generate", "score", "forward", "optimize"))
    tokens = int(rollout.attention_mask.sum())
    flops = ppo_iteration_flops(
        *params,
        tokens,
        int(rollout.response_mask.sum()),
        cfg.algo.ppo_epochs,
        entropy_in_loss=cfg.algo.entropy_coef > 0,
    )
    return {
        "perf/time_iteration": seconds,
        "perf/flops_per_s": flops / max(seconds, 1e-9),
        "perf/tokens_per_s": tokens / max(seconds, 1e-9),
    }


def _save_final(run_dir: Path, policy, value_model, tokenizer, merge_lora: bool) -> Path:
    """The policy as a plain HF causal LM or its LoRA adapter (+ value head file) in RUN/final; a separate critic
    in RUN/critic."""
    from rlhflab.models.heads import PolicyWithValueHead

    final = run_dir / "final"
    if isinstance(value_model, ValueHead):
        PolicyWithValueHead(policy, value_model).save_pretrained(final, tokenizer, merge_lora=merge_lora)
    else:
        save_model(policy, tokenizer, final, merge_lora=merge_lora)
        value_model.save_pretrained(run_dir / "critic", tokenizer)
    return final


def _kl_controller(cfg: PPOConfig):
    a = cfg.algo
    return (
        AdaptiveKLController(a.kl_coef, a.target_kl, a.kl_horizon)
        if a.adaptive_kl
        else FixedKLController(a.kl_coef)
    )


def preflight(cfg: PPOConfig, *, reward: Any = None) -> None:
    """The checks that need no model or data file, run before anything is loaded or made."""
    require_reward(cfg.algo, reward)


def train(cfg: PPOConfig, *, resume: bool = False, overwrite: bool = False, reward: Any = None) -> Path:
    """Run PPO; returns the final policy directory (RUN/final, a plain HF causal LM + value head).

    `reward`: any object with `score(prompts, responses) -> Tensor[B]` (Python API); by default the reward
    source(s) named in algo.reward_model.
    """
    # Setup: checks that need no model, seeds, run directory, models, reward, prompts, optimizer, KL controller.
    require_train_path(cfg.data, "prompt")
    preflight(cfg, reward=reward)
    par = DataParallel()  # one process, or one of those `accelerate launch` / `torchrun` started
    check_data_parallel(cfg.algo, par, "algo.rollout_batch_size", cfg.algo.rollout_batch_size)
    seed_everything(cfg.seed)
    run = open_run(cfg, "ppo", cfg.logging, resume=resume, overwrite=overwrite, parallel=par)
    policy, value_model, ref, tokenizer, device = _setup_models(cfg, par.device)
    # Sharded under FSDP (the value model too: one optimizer over both), before the optimizer sees them.
    policy, value_model = par.prepare(policy), par.prepare(value_model)
    reward = reward if reward is not None else _load_reward(cfg, device)
    prompts, steps_per_epoch = load_prompts(cfg.data, cfg.algo.rollout_batch_size)
    trainable = nn.ModuleDict({"policy": policy, "value": value_model})
    updates_per_iter = cfg.algo.ppo_epochs * (cfg.algo.rollout_batch_size // cfg.algo.minibatch_size)
    optimizer, scheduler = build_optimizer(trainable, cfg.optim, cfg.algo.iterations * updates_per_iter)
    par.attach(trainable, optimizer, cfg.optim, micro_batches=1)  # under DeepSpeed: one backward per update
    kl_ctl, sampling = _kl_controller(cfg), sampling_settings(cfg.sampling)
    engine = rollout_engine(cfg, policy, tokenizer)  # None: HF generate on the policy itself
    flop_params = (matmul_params(policy), matmul_params(ref), matmul_params(value_model))
    if par.is_main:
        print(
            f"ppo: {len(prompts)} prompts, {cfg.algo.iterations} iterations x {cfg.algo.rollout_batch_size} "
            f"rollouts, {count_parameters(policy) / 1e6:.2f}M parameters, run dir {run.dir}" + par.describe()
        )
    # The KL controller is checkpointed with the weights, so a resumed run adapts beta exactly as before.
    kl_state = lambda: {"kl_controller": kl_ctl.state_dict()}  # noqa: E731
    snapshot = functools.partial(save_model, policy, tokenizer, merge_lora=cfg.model.lora.merge)
    loop = Loop(run, "ppo", cfg.logging, cfg.algo.iterations, trainable, optimizer, scheduler, resume=resume,
                state=kl_state, snapshot=snapshot, parallel=par)  # fmt: skip
    if loop.resumed_state:
        kl_ctl.load_state_dict(loop.resumed_state["kl_controller"])

    while loop.step < loop.total:
        iteration = loop.step + 1  # 1-based, as logged
        epoch, position = divmod(loop.step, steps_per_epoch)
        batch = [
            prompts[i]
            for i in batch_schedule(len(prompts), cfg.algo.rollout_batch_size, cfg.seed, epoch)[position]
        ]
        # 1. generate: each process samples its share of the batch, each row from its own seed, so the rows
        # are the same whatever the number of processes
        t0 = time.time()
        step_seed = cfg.seed * 100_003 + loop.step
        rollout = sample_share(policy, tokenizer, batch, 1, sampling, cfg, device, step_seed, par, engine)
        t_gen = time.time() - t0
        # 2-5. score, old/ref log-probs and values, KL-shaped rewards, GAE
        exp, metrics = _make_experience(
            policy, value_model, ref, reward, rollout, kl_ctl, cfg, iteration, loop.last_ckpt, par
        )
        # 6. optimize
        t0 = time.time()
        models = (policy, value_model, trainable)
        metrics.update(
            _ppo_epochs(*models, optimizer, scheduler, rollout, exp, cfg, iteration, loop.last_ckpt, par)
        )
        metrics = {k: float(v) for k, v in metrics.items()}
        metrics["perf/time_generate"], metrics["perf/time_optimize"] = t_gen, time.time() - t0
        metrics.update({"perf/weight_sync_s": engine.weight_sync_s} if engine else {})
        metrics.update(_iteration_perf(metrics, rollout, cfg, flop_params))
        # 7. adapt the KL coefficient
        kl_ctl.update(metrics["kl/sequence"], cfg.algo.rollout_batch_size)

        append_rollouts(run.dir / "rollouts.jsonl", iteration, rollout, exp["scores"], exp["seq_kl"], par)
        if par.is_main:
            ppo_health_warnings(metrics, iteration, log=loop.progress.print)
        loop.count(
            rollouts=cfg.algo.rollout_batch_size, tokens=int(par.sum(int(rollout.attention_mask.sum())))
        )
        loop.end_step(metrics, show={"score": "reward/score", "kl": "kl/sequence"})
    loop.close()

    finish(par, run, trainable, "ppo", loop.step, None,
           lambda: _save_final(run.dir, policy, value_model, tokenizer, cfg.model.lora.merge), "policy")  # fmt: skip
    return run.dir / "final"
