"""On-policy RL without a critic: RLOO / REINFORCE / ReMax (`rlhflab rloo`) and GRPO (`rlhflab grpo`).

PPO learns a value function to tell a good response from a lucky one. These methods sample k responses to
each prompt instead, and the other samples' scores give the baseline (Ahmadian et al. 2024, "Back to
Basics: Revisiting REINFORCE Style Optimization for Learning from Human Feedback in LLMs"; Shao et al. 2024,
DeepSeekMath, GRPO). One loop serves both; they differ in the baseline and where the KL term goes.

Each iteration:

    1. generate   k responses to each of P prompts from the current policy, prompt-major (the k samples of
                  prompt 0 first); ReMax also decodes one greedy response per prompt for its baseline
    2. score      sequence scores from the reward source(s), minus the missing-EOS penalty
    3. old/ref    log-probs of the sampled tokens under the rollout policy (only when the batch takes more
                  than one update: with one, the ratio is exactly 1) and under the reference (when beta > 0)
    4. KL         placement "reward": score - beta * sum_t KL_t before the baseline (RLOO); "loss": later
    5. baseline   advantages from each group (leave-one-out, batch mean, greedy, or group-normalized);
                  groups with a NaN score, and with dynamic sampling groups whose k scores are all equal,
                  are left out of the loss
    6. optimize   ppo_epochs passes of minibatches of PPO's clipped surrogate (+ beta * KL in the loss)

Every response is appended to RUN/rollouts.jsonl (prompt, response, score, KL), as PPO does.
"""

from __future__ import annotations

import contextlib
import functools
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from rlhflab.config import GRPOConfig, RLOOConfig
from rlhflab.core.health import check_finite
from rlhflab.core.seeding import batch_schedule, seed_everything
from rlhflab.errors import TrainingHealthError
from rlhflab.losses import (
    dynamic_sampling_mask,
    entropy_from_logits,
    finite_groups,
    group_normalized_advantages,
    kl_penalty_loss,
    masked_sum,
    ppo_policy_loss,
    reinforce_advantages,
    remax_advantages,
    rloo_advantages,
)
from rlhflab.losses.kl import KL_ESTIMATORS
from rlhflab.models.backbone import backbone_and_head, hidden_to_logits
from rlhflab.models.flops import critic_free_iteration_flops, matmul_params
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
    require_reward,
    rollout_engine,
    sample,
    sample_share,
    sampling_settings,
)
from rlhflab.stages.parallel import DataParallel

Config = RLOOConfig | GRPOConfig


def method_name(cfg: Config) -> str:
    return "grpo" if isinstance(cfg, GRPOConfig) else "rloo"


def rollout_logps(
    model,
    rollout: Rollout,
    temperature: float,
    *,
    amp: Callable = contextlib.nullcontext,
    entropy: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-probs [B, R] (float32) of the sampled response tokens under `model`, and optionally the
    policy's per-token entropy [B, R] there (computed without gradient: it is logged, not optimized)."""
    target = torch.cat([torch.zeros_like(rollout.prompt_mask), rollout.response_mask], dim=1)
    start = rollout.response_start
    with amp():
        logps, hidden = token_logps(
            model,
            rollout.input_ids,
            rollout.attention_mask,
            target,
            position_ids=rollout.position_ids,
            temperature=temperature,
            return_hidden=True,
        )
        ent = None
        if entropy:
            with torch.no_grad():
                _, head = backbone_and_head(model)
                logits = hidden_to_logits(model, head, hidden[:, start - 1 : -1].detach())
                ent = entropy_from_logits(logits.float() / temperature)
    return logps[:, start - 1 :].float(), ent


def advantages_of(
    cfg: Config, scores: torch.Tensor, greedy_scores: torch.Tensor | None, batch_mean: float | None = None
) -> torch.Tensor:
    """Step 5's advantages [N] from the (KL-adjusted) scores [N] of P groups of k samples; `batch_mean`: the
    REINFORCE baseline when these are some processes' share of the batch (default: their own mean)."""
    k = cfg.algo.num_generations
    if isinstance(cfg, GRPOConfig):
        return group_normalized_advantages(scores, k, scale_by_std=cfg.algo.scale_rewards)
    if cfg.algo.baseline == "leave_one_out":
        return rloo_advantages(scores, k)
    if cfg.algo.baseline == "greedy":
        return remax_advantages(scores, greedy_scores, k)
    return reinforce_advantages(scores, batch_mean)


def needs_old_pass(cfg: Config, n: int) -> bool:
    """Whether step 3 runs the rollout policy over the batch: when the batch takes more than one update (the
    ratio then moves away from 1), or for the KL in the reward (needed before the advantages)."""
    algo = cfg.algo
    several_updates = algo.ppo_epochs > 1 or 0 < algo.minibatch_size < n
    return several_updates or (algo.kl_coef > 0 and algo.kl_placement == "reward")


def _setup(cfg: Config, device: torch.device | None = None):
    """(policy, reference or None, tokenizer, device); no reference is loaded when beta = 0. `device` overrides
    model.device (the one a data-parallel launcher gave this process)."""
    policy, tokenizer, device = load_policy(cfg.model, device=device)
    ref = None
    if cfg.algo.kl_coef > 0:
        ref_path = resolve_model_path(cfg.ref_model or cfg.model.name_or_path)
        ref = load_inference_lm(ref_path, dtype=cfg.model.dtype, device=str(device))
    return policy, ref, tokenizer, device


def _score(reward, cfg: Config, rollout: Rollout) -> tuple[torch.Tensor, torch.Tensor]:
    """Step 2: (scores with the missing-EOS penalty, raw scores), [N] float32."""
    raw = reward.score(rollout.prompts, rollout.texts).to(rollout.response_ids.device, torch.float32)
    scores = raw - cfg.algo.missing_eos_penalty * (~rollout.ended_with_eos).float()
    return scores, raw


@torch.no_grad()
def make_experience(
    policy, ref, reward, rollout: Rollout, greedy: Rollout | None, cfg: Config, step: int, last, par=None
):
    """Steps 2-5 on one batch: returns the tensors the update needs and the iteration's metrics. Across
    processes (`par`) each holds whole groups of the batch; the metrics (and REINFORCE's batch mean) are the
    whole batch's."""
    par = par or DataParallel()
    algo, temp = cfg.algo, cfg.sampling.temperature
    amp = mixed_precision(cfg.model, rollout.response_ids.device)
    mask = rollout.response_mask
    t = time.time()
    # 2. score
    scores, raw = _score(reward, cfg, rollout)
    greedy_scores = _score(reward, cfg, greedy)[0] if greedy is not None else None
    if par.sum(float(torch.isfinite(scores).sum())) == 0:  # every process stops together
        raise TrainingHealthError(
            f"iteration {step}: every score of the batch is NaN/inf; check the reward source "
            f"(last good checkpoint: {last or 'none'})"
        )
    t_score = time.time() - t
    t = time.time()
    # 3. old (rollout policy) and reference log-probs
    old_logps = None
    if needs_old_pass(cfg, len(rollout)):
        policy.eval()
        old_logps, _ = rollout_logps(policy, rollout, temp, amp=amp)
        policy.train()
        check_finite({"old_logps": old_logps[mask]}, step=step, last_good=last)
    ref_logps = rollout_logps(ref, rollout, temp, amp=amp)[0] if ref is not None else None
    t_forward = time.time() - t
    # 4. KL in the reward: the sequence's summed estimate under the rollout policy
    seq_kl = torch.full_like(scores, float("nan"))  # NaN: not known yet (measured in the update, step 6)
    if ref_logps is not None:
        check_finite({"ref_logps": ref_logps[mask]}, step=step, last_good=last)
        if old_logps is not None:  # logged in both placements; only "reward" uses it in the advantages
            seq_kl = masked_sum(KL_ESTIMATORS[algo.kl_estimator](old_logps, ref_logps), mask, dim=-1)
    adjusted = scores - algo.kl_coef * seq_kl if algo.kl_placement == "reward" and ref is not None else scores
    # 5. baseline -> advantages; groups without a usable signal are left out
    k = algo.num_generations
    keep = dynamic_sampling_mask(adjusted, k) if algo.dynamic_sampling else finite_groups(adjusted, k)
    if greedy_scores is not None:
        keep &= torch.isfinite(greedy_scores).repeat_interleave(k)
    advantages = torch.zeros_like(adjusted)
    batch_mean = None
    if par.world > 1:  # REINFORCE's constant baseline is the mean over the whole batch's kept scores
        kept = adjusted[keep][torch.isfinite(adjusted[keep])]
        batch_mean = par.means({"b": (float(kept.sum()), float(kept.numel()))})["b"]
    if keep.any():
        kept_groups = keep.view(-1, k)[:, 0]
        g_scores = greedy_scores[kept_groups] if greedy_scores is not None else None
        advantages[keep] = advantages_of(cfg, adjusted[keep], g_scores, batch_mean)
    metrics = _experience_metrics(par, raw, adjusted, advantages, keep, greedy_scores, rollout, k)
    metrics.update({"kl/coef": algo.kl_coef, "perf/time_score": t_score, "perf/time_forward": t_forward})
    exp = {"old_logps": old_logps, "ref_logps": ref_logps, "advantages": advantages, "keep": keep}
    exp.update(scores=raw, seq_kl=seq_kl)
    return exp, metrics


def _experience_metrics(
    par, raw, adjusted, advantages, keep, greedy_scores, rollout: Rollout, k: int
) -> dict:
    """The iteration's reward and batch metrics, over the whole batch whichever process holds which groups."""
    finite, mask = torch.isfinite(raw), rollout.response_mask
    rows, n = float(len(raw)), float(finite.sum())
    parts = {
        "reward/score": (float(raw[finite].sum()), n),
        "score_sq": (float((raw[finite].double() ** 2).sum()), n),
        "reward/total": (float(adjusted[finite].sum()), n),
        "reward/advantage_abs": (float(advantages[keep].abs().sum()), float(keep.sum())),
        "reward/nan_scores": (float((~finite).sum()), 1.0 / par.world),  # a count: the sum over processes
        "perf/groups_kept": (float(keep.view(-1, k)[:, 0].sum()), rows / k),
        "perf/response_length": (float(mask.sum()), rows),
        "perf/ended_with_eos": (float(rollout.ended_with_eos.sum()), rows),
        "n": (n, 1.0 / par.world),
    }
    if greedy_scores is not None:
        ok = torch.isfinite(greedy_scores)
        parts["reward/greedy_score"] = (float(greedy_scores[ok].sum()), float(ok.sum()))
    out = par.means(parts)
    n, mean_sq = out.pop("n"), out.pop("score_sq")
    out["reward/score_std"] = (
        (max(mean_sq - out["reward/score"] ** 2, 0.0) * n / (n - 1)) ** 0.5 if n > 1 else 0.0
    )
    return out


def minibatch_loss(logps, old_logps, ref_logps, advantages, mask, cfg: Config, size=None, tokens=None):
    """Step 6's loss on one minibatch: PPO's clipped surrogate with the group advantages (+ beta * KL to the
    reference in the loss), aggregated over tokens as algo.loss_aggregation says. Returns (loss, metrics).

    Across processes each holds some rows of a minibatch of `size` rows and `tokens` real response tokens (by
    default: this call's): its loss and metrics are then its share, and the shares sum to the minibatch's."""
    algo = cfg.algo
    # Dr. GRPO's constant normalizer is the longest response the sampler may write.
    reduce = {"reduction": algo.loss_aggregation}
    if algo.loss_aggregation == "constant":
        reduce["max_tokens"] = cfg.sampling.max_new_tokens
    # token_mean is the sum over the minibatch's tokens divided by their number: per-sequence sums, divided
    # by the whole minibatch's token count (which no process alone knows); the others average per sequence.
    divide = float(len(advantages) if size is None else size)
    if algo.loss_aggregation == "token_mean":
        reduce["reduction"] = "sequence_sum"
        divide = float(mask.sum() if tokens is None else tokens)
    old = logps.detach() if old_logps is None else old_logps
    clip = {"clip_eps": algo.clip_eps, "clip_eps_high": algo.clip_eps_high or None}
    pg = ppo_policy_loss(logps, old, advantages, mask, **clip, **reduce)
    loss = pg.loss.sum() / divide
    rows = float(len(advantages) if size is None else size)
    metrics = {"loss/policy": loss.detach(), **{k: v.sum() / rows for k, v in pg.metrics.items()}}
    if algo.kl_placement == "loss" and ref_logps is not None and algo.kl_coef > 0:
        kl = kl_penalty_loss(logps, ref_logps, mask, estimator=algo.kl_estimator, **reduce)
        loss = loss + algo.kl_coef * kl.loss.sum() / divide
        metrics["loss/kl"] = (kl.loss.sum() / divide).detach()
    metrics["loss/total"] = loss.detach()
    return loss, metrics


def _update(
    policy, optimizer, scheduler, rollout: Rollout, exp: dict, cfg: Config, step: int, last, par=None
):
    """Step 6: ppo_epochs passes over the kept samples in minibatches. Returns averaged metrics.

    The minibatches are drawn from the whole batch's kept rows; across processes (`par`, each holding whole
    groups) each computes the terms of the rows it holds as its share of the minibatch's loss, and the
    gradients are summed: one process's step."""
    par = par or DataParallel()
    k = cfg.algo.num_generations
    kept = (
        torch.tensor(par.gather(exp["keep"].view(-1, k)[:, 0].tolist())).repeat_interleave(k).nonzero()[:, 0]
    )
    if kept.numel() == 0:
        return {"perf/updates": 0.0, "perf/train_tokens": 0.0, "perf/train_response_tokens": 0.0}
    size = cfg.algo.minibatch_size or cfg.algo.rollouts_per_iteration
    g = torch.Generator().manual_seed(cfg.seed * 7919 + step)
    sums: dict[str, float] = dict.fromkeys(_update_keys(cfg), 0.0)
    grad_norms: list[float] = []
    for epoch in range(cfg.algo.ppo_epochs):
        order = kept[torch.randperm(kept.numel(), generator=g)]
        for s in range(0, order.numel(), size):
            rows = order[s : s + size].tolist()
            idx = torch.tensor(
                par.local_rows(rows, group=k), dtype=torch.long, device=rollout.response_ids.device
            )
            tokens = par.sum(float(rollout.response_mask[idx].sum()))  # the minibatch's, for token_mean
            # A process may hold none of a minibatch's rows: it adds zero gradients (and with a sharded policy, or
            # DeepSpeed's collective gradient reduction, still joins the passes, on one row weighted 0).
            held = len(idx) > 0
            if held or par.lockstep:
                first = epoch == 0 and s == 0  # before any update: the rollout policy's entropy
                idx = idx if held else torch.zeros(1, dtype=torch.long, device=idx.device)
                row = _minibatch_step(policy, rollout, exp, idx, (len(rows), tokens), cfg, epoch, first, step, last,
                                      held, par.backward)  # fmt: skip
                for key, v in row.items():
                    sums[key] += float(v)
            par.sum_gradients(policy)
            # DeepSpeed's engine clips and applies the update itself.
            clip = functools.partial(clip_gradients, policy, cfg.optim.max_grad_norm)
            grad_norm = par.deepspeed_step(scheduler) if par.engine else clip()
            check_finite({"loss/grad_norm": grad_norm}, step=step, last_good=last)
            if par.engine is None:
                optimizer_step(optimizer, scheduler)
            grad_norms.append(grad_norm)
    updates = len(grad_norms)
    sums = par.sum_all(sums)
    entropy_tokens = sums.pop("perf/entropy_tokens")
    entropy = sums.pop("entropy_sum") / entropy_tokens if entropy_tokens else None
    local = rollout.select(torch.tensor(par.local_rows(kept.tolist(), group=k), dtype=torch.long))
    train = par.sum_all(
        {"all": float(local.attention_mask.sum()), "response": float(local.response_mask.sum())}
    )
    return {
        **{key: v / updates for key, v in sums.items()},
        "loss/grad_norm": sum(grad_norms) / updates,
        **({"loss/entropy": entropy, "perf/entropy_tokens": entropy_tokens} if entropy is not None else {}),
        "perf/updates": float(updates),
        "perf/train_tokens": cfg.algo.ppo_epochs * train["all"],
        "perf/train_response_tokens": cfg.algo.ppo_epochs * train["response"],
    }


def _update_keys(cfg: Config) -> list[str]:
    """The metrics step 6 sums over minibatches (and processes): minibatch_loss's, and the entropy's parts."""
    keys = ["loss/policy", "loss/clipfrac", "loss/ratio", "kl/approx", "loss/total", "entropy_sum"]
    keys.append("perf/entropy_tokens")
    if cfg.algo.kl_placement == "loss" and cfg.algo.kl_coef > 0:
        keys.append("loss/kl")
    return keys


def _minibatch_step(policy, rollout, exp, idx, whole, cfg: Config, epoch: int, first: bool, step, last,
                    held=True, backward=None) -> dict:  # fmt: skip
    """This process's rows `idx` of one minibatch (`whole`: its rows and response tokens): the loss's share,
    back-propagated; returns its metric shares. The `first` minibatch also gives the entropy; with no old
    pass, epoch 0 measures each sample's KL to the reference. `held` False: this process holds none of the
    minibatch's rows but joins its passes (a sharded policy's every pass needs all): `idx` is any row, weighted
    0, and nothing is recorded. `backward`: `DataParallel.backward` (DeepSpeed's engine), else `loss.backward()`."""
    backward = backward or torch.Tensor.backward
    mb = rollout.select(idx)
    amp = mixed_precision(cfg.model, rollout.response_ids.device)
    logps, entropy = rollout_logps(policy, mb, cfg.sampling.temperature, amp=amp, entropy=first)
    old = exp["old_logps"][idx] if exp["old_logps"] is not None else None
    ref = exp["ref_logps"][idx] if exp["ref_logps"] is not None else None
    loss, row = minibatch_loss(logps, old, ref, exp["advantages"][idx], mb.response_mask, cfg, *whole)
    if not held:
        backward(loss * 0.0)
        return {}
    if ref is not None and old is None and epoch == 0:  # the KL of the samples the policy wrote
        kl = KL_ESTIMATORS[cfg.algo.kl_estimator](logps.detach(), ref)
        exp["seq_kl"][idx] = masked_sum(kl, mb.response_mask, dim=-1)
    check_finite({"loss/total": loss}, step=step, last_good=last)
    backward(loss)
    if entropy is not None:
        row["entropy_sum"] = float(masked_sum(entropy, mb.response_mask))
        row["perf/entropy_tokens"] = float(mb.response_mask.sum())
    return row


def _perf(metrics: dict[str, float], rollout: Rollout, greedy: Rollout | None, cfg: Config, params) -> dict:
    """perf/time_iteration, perf/flops_per_s and perf/tokens_per_s of one iteration
    (`rlhflab.models.flops.critic_free_iteration_flops` of what ran)."""
    seconds = sum(metrics[f"perf/time_{k}"] for k in ("generate", "score", "forward", "optimize"))
    tokens = int(rollout.attention_mask.sum())
    flops = critic_free_iteration_flops(
        *params,
        tokens,
        int(rollout.response_mask.sum()),
        train_tokens=int(metrics["perf/train_tokens"]),
        train_response_tokens=int(metrics["perf/train_response_tokens"]),
        old_pass=needs_old_pass(cfg, len(rollout)),
        greedy=(int(greedy.attention_mask.sum()), int(greedy.response_mask.sum())) if greedy else (0, 0),
        entropy_tokens=int(metrics.get("perf/entropy_tokens", 0)),
    )
    return {
        "perf/time_iteration": seconds,
        "perf/flops_per_s": flops / max(seconds, 1e-9),
        "perf/tokens_per_s": tokens / max(seconds, 1e-9),
    }


def preflight(cfg: Config, *, reward: Any = None) -> None:
    """The checks that need no model or data file, run before anything is loaded or made."""
    require_reward(cfg.algo, reward)


def train(cfg: Config, *, resume: bool = False, overwrite: bool = False, reward: Any = None) -> Path:
    """Run RLOO (an `RLOOConfig`) or GRPO (a `GRPOConfig`); returns RUN/final, a plain HF causal LM.

    `reward`: any object with `score(prompts, responses) -> Tensor[B]` (Python API); by default the reward
    source(s) named in algo.reward_model.
    """
    name, algo = method_name(cfg), cfg.algo
    require_train_path(cfg.data, "prompt")
    preflight(cfg, reward=reward)
    par = DataParallel()  # one process, or one of those `accelerate launch` / `torchrun` started
    check_data_parallel(algo, par, "algo.prompts_per_iteration", algo.prompts_per_iteration)
    seed_everything(cfg.seed)
    run = open_run(cfg, name, cfg.logging, resume=resume, overwrite=overwrite, parallel=par)
    policy, ref, tokenizer, device = _setup(cfg, par.device)
    policy = par.prepare(policy)  # sharded across the processes under FSDP, before the optimizer sees it
    reward = reward if reward is not None else load_reward(algo, device)
    prompts, steps_per_epoch = load_prompts(cfg.data, algo.prompts_per_iteration)
    n = algo.rollouts_per_iteration
    updates_per_iteration = algo.ppo_epochs * -(-n // (algo.minibatch_size or n))
    optimizer, scheduler = build_optimizer(policy, cfg.optim, algo.iterations * updates_per_iteration)
    par.attach(policy, optimizer, cfg.optim, micro_batches=1)  # under DeepSpeed: one backward pass per update
    sampling, engine = sampling_settings(cfg.sampling), rollout_engine(cfg, policy, tokenizer)
    greedy_baseline = isinstance(cfg, RLOOConfig) and algo.baseline == "greedy"
    flop_params = (matmul_params(policy), matmul_params(ref) if ref is not None else None)
    if par.is_main:
        print(
            f"{name}: {len(prompts)} prompts, {algo.iterations} iterations x {algo.prompts_per_iteration} prompts "
            f"x {algo.num_generations} samples, {count_parameters(policy) / 1e6:.2f}M parameters, run dir {run.dir}"
            + par.describe()
        )
    snapshot = functools.partial(save_model, policy, tokenizer, merge_lora=cfg.model.lora.merge)
    loop = Loop(run, name, cfg.logging, algo.iterations, policy, optimizer, scheduler, resume=resume,
                snapshot=snapshot, parallel=par)  # fmt: skip
    while loop.step < loop.total:
        iteration = loop.step + 1
        epoch, position = divmod(loop.step, steps_per_epoch)
        order = batch_schedule(len(prompts), algo.prompts_per_iteration, cfg.seed, epoch)[position]
        batch = [prompts[i] for i in order]
        # 1. generate: k samples per prompt, prompt-major (+ the greedy responses for ReMax); each process
        # samples its share of the prompts, each row from its own seed (the rows one process would sample)
        t0 = time.time()
        seed, k = cfg.seed * 100_003 + loop.step, algo.num_generations
        rollout = sample_share(policy, tokenizer, batch, k, sampling, cfg, device, seed, par, engine)
        greedy = (
            _greedy(policy, tokenizer, batch, cfg, device, seed, par, engine) if greedy_baseline else None
        )
        t_gen = time.time() - t0
        # 2-5. score, old/ref log-probs, KL, baseline
        exp, metrics = make_experience(
            policy, ref, reward, rollout, greedy, cfg, iteration, loop.last_ckpt, par
        )
        # 6. optimize
        t0 = time.time()
        metrics.update(
            _update(policy, optimizer, scheduler, rollout, exp, cfg, iteration, loop.last_ckpt, par)
        )
        known = torch.isfinite(exp["seq_kl"])  # no reference (beta = 0): no KL is measured
        metrics.update(par.means({"kl/sequence": (float(exp["seq_kl"][known].sum()), float(known.sum()))}))
        metrics = {k: float(v) for k, v in metrics.items()}
        metrics["perf/time_generate"], metrics["perf/time_optimize"] = t_gen, time.time() - t0
        metrics.update({"perf/weight_sync_s": engine.weight_sync_s} if engine else {})
        metrics.update(_perf(metrics, rollout, greedy, cfg, flop_params))

        # Feedback budget: every scored response is one query to the reward source (ReMax's greedy ones too).
        metrics["feedback/queries"] = float(iteration * (n + (len(batch) if greedy_baseline else 0)))
        append_rollouts(run.dir / "rollouts.jsonl", iteration, rollout, exp["scores"], exp["seq_kl"], par, k)
        loop.count(rollouts=n, tokens=int(par.sum(float(rollout.attention_mask.sum()))))
        loop.end_step(metrics, show={"score": "reward/score", "kl": "kl/sequence"})
    loop.close()
    return _save_final(run, policy, tokenizer, cfg, name, par)


def _greedy(policy, tokenizer, batch: list, cfg: Config, device, seed: int, par, engine) -> Rollout:
    """ReMax's baseline: the greedy response to each of this process's prompts."""
    settings = sampling_settings(cfg.sampling, greedy=True)
    return sample(policy, tokenizer, par.shard(batch), settings, model_cfg=cfg.model, data=cfg.data, device=device,
                  batch_size=cfg.algo.rollouts_per_iteration, seed=seed, engine=engine, synced=par.sharded)  # fmt: skip


def _save_final(run, policy, tokenizer, cfg: Config, name: str, par) -> Path:
    """RUN/final, written by the main process (gathered whole from a sharded policy); the others return once it
    is there."""
    final = run.dir / "final"
    finish(par, run, policy, name, run.final_step, None,
           lambda: save_model(policy, tokenizer, final, merge_lora=cfg.model.lora.merge), "policy")  # fmt: skip
    return final
