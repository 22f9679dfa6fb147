"""Online DPO / IPO (`rlhflab online-dpo`): preference optimization on pairs the current policy samples.

Offline DPO learns from pairs someone else's policy wrote; the further the trained policy moves from that
policy, the less the data says about its own samples. Guo et al. 2024 ("Direct Language Model Alignment from
Online AI Feedback", Algorithm 1) close the loop: every step samples two responses per prompt from the current
policy, asks an annotator (there an LM judge) which is better, and takes one step of DPO, IPO or SLiC on those
fresh pairs. Any paired loss of `rlhflab.losses.preference.PREFERENCE_LOSS_TABLE` runs here.

Each step:

    1. generate   two responses to each of P prompts from the current policy (rows 2i and 2i+1 are pair i)
    2. ask        the feedback source (`rlhflab.feedback`) which response of each pair is better; a pair whose
                  two responses are the same tokens is not asked (no preference to learn, a query saved)
    3. pairs      the label orders each pair into (chosen, rejected), built straight from the sampled token ids
                  (no decode / re-encode); ties and unanswered pairs are dropped and counted
    4. loss       the reference's log-probs of the pairs (live, the data is new each step), the policy's, the
                  loss, one optimizer step

Every pair is appended to RUN/rollouts.jsonl (prompt, both responses, the label, their scores when the source
scores responses, their sequence KL to the reference when measured). `feedback/queries` counts the pairs asked
since the run began: the label budget.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from rlhflab.config import OnlineDPOConfig
from rlhflab.core.io import atomic_write_text
from rlhflab.core.seeding import batch_schedule, seed_everything
from rlhflab.errors import ConfigError, UserError
from rlhflab.feedback import FIRST, SECOND, TIE
from rlhflab.losses.preference import PREFERENCE_LOSS_TABLE
from rlhflab.models.flops import causal_lm_forward_flops, causal_lm_train_flops, matmul_params
from rlhflab.models.loading import count_parameters, is_peft_model, load_causal_lm, save_model
from rlhflab.rollout.generate import Rollout
from rlhflab.stages.common import (
    Loop,
    build_optimizer,
    finish,
    load_policy,
    mixed_precision,
    open_run,
    resolve_model_path,
)
from rlhflab.stages.data_source import require_train_path
from rlhflab.stages.feedback_checkpoint import FeedbackCheckpoint
from rlhflab.stages.on_policy import (
    check_data_parallel,
    default_feedback,
    load_prompts,
    require_feedback,
    rollout_engine,
    sample_share,
    sampling_settings,
)
from rlhflab.stages.online_dpo_step import StepContext, update  # step 4: the loss and one optimizer step
from rlhflab.stages.parallel import VARYING, DataParallel

NAME = "online-dpo"


# --------------------------------------------------------------------------------------------------------
# Steps 2 and 3: feedback and pairs
# --------------------------------------------------------------------------------------------------------


def identical_pairs(rollout: Rollout) -> Tensor:
    """[P] bool: pair i's two responses (rows 2i, 2i+1) are the same tokens."""
    ids = rollout.response_ids.masked_fill(~rollout.response_mask, -1)
    return (ids[0::2] == ids[1::2]).all(-1).cpu()


def check_labels(labels: Tensor, n: int, source: Any) -> Tensor:
    """The labels as float32 [n], refusing a shape or value outside the feedback contract."""
    labels = torch.as_tensor(labels, dtype=torch.float32).cpu()
    name = getattr(source, "name", type(source).__name__)
    if labels.shape != (n,):
        raise UserError(f"feedback source {name} answered {tuple(labels.shape)} labels for {n} pairs")
    valid = labels.isnan() | (labels == FIRST) | (labels == SECOND) | (labels == TIE)
    if not valid.all():
        bad = f"{labels[~valid][0].item():.6g}"
        raise UserError(
            f"feedback source {name} answered the label {bad}; labels are 1 (first preferred), 0 (second), "
            "0.5 (tie) or NaN (no answer)"
        )
    return labels


def ask_feedback(feedback, rollout: Rollout, timeout: float | None) -> tuple[Tensor, Tensor, tuple | None]:
    """Step 2: (labels [P], identical [P], (scores of first [P], of second [P]) or None). Identical pairs are not
    asked (label NaN); scores are the source's `last_scores` when it keeps them (NaN where not asked)."""
    identical = identical_pairs(rollout)
    asked = (~identical).nonzero().squeeze(-1).tolist()

    def spread(values) -> Tensor:  # the asked pairs' values at their places among all P pairs, NaN elsewhere
        out = torch.full((len(identical),), float("nan"))
        out[asked] = torch.as_tensor(values, dtype=torch.float32).cpu()
        return out

    if not asked:
        return spread([]), identical, None
    ticket = feedback.ask(
        [rollout.prompts[2 * i] for i in asked],
        [rollout.texts[2 * i] for i in asked],
        [rollout.texts[2 * i + 1] for i in asked],
    )
    labels = spread(check_labels(feedback.collect(ticket, timeout), len(asked), feedback))
    last = getattr(feedback, "last_scores", None)
    return labels, identical, (spread(last[0]), spread(last[1])) if last is not None else None


def pair_examples(rollout: Rollout, labels: Tensor) -> tuple[list[dict], list[int]]:
    """Step 3: (examples, their pair indices) for the pairs labelled 1 (first chosen) or 0 (second chosen), in
    `rlhflab.data.tokenize.tokenize_pair`'s format, from the rollout's own token ids: the prompt as sampled
    (already cut to data.max_prompt_length) and each response up to and including its EOS."""
    examples, kept = [], []
    for i, label in enumerate(labels.tolist()):
        if label not in (FIRST, SECOND):  # a tie, or no answer (NaN)
            continue
        first, second = 2 * i, 2 * i + 1
        prompt = rollout.prompt_ids[first][rollout.prompt_mask[first]].tolist()
        example: dict[str, Any] = {"prompt_input_ids": prompt}
        for side, row in zip(("chosen", "rejected"), (first, second) if label == FIRST else (second, first)):
            response = rollout.response_ids[row][rollout.response_mask[row]].tolist()
            example[f"{side}_input_ids"] = prompt + response
            example[f"{side}_attention_mask"] = [1] * (len(prompt) + len(response))
            example[f"{side}_loss_mask"] = [False] * len(prompt) + [True] * len(response)
        example["margin"] = None
        examples.append(example)
        kept.append(i)
    return examples, kept


# --------------------------------------------------------------------------------------------------------
# Setup, logging, the loop
# --------------------------------------------------------------------------------------------------------


def _reference(cfg: OnlineDPOConfig, policy, device) -> tuple[Callable | None, Any]:
    """(a context factory yielding the reference model or None, the model whose FLOPs it costs). The initial
    policy is the reference unless ref_model is set; a LoRA policy switches its adapters off instead of
    keeping a second copy."""
    if not PREFERENCE_LOSS_TABLE[cfg.algo.loss].reference:
        return None, None
    if not cfg.ref_model and is_peft_model(policy):

        @contextlib.contextmanager
        def adapters_off():
            with policy.disable_adapter():
                yield policy

        return adapters_off, policy
    path = resolve_model_path(cfg.ref_model or cfg.model.name_or_path)
    ref = load_causal_lm(path, dtype=cfg.model.dtype, device=str(device)).eval().requires_grad_(False)
    return (lambda: contextlib.nullcontext(ref)), ref


def _feedback_metrics(
    feedback, labels: Tensor, identical: Tensor, scores, kept: int, par
) -> dict[str, float]:
    """The step's feedback counts (summed over the processes) and mean score."""
    asked = ~identical
    out = par.sum_all(
        {
            "feedback/queries": float(feedback.queries),
            "feedback/pairs_kept": float(kept),
            "feedback/ties": float((labels == TIE).sum()),
            "feedback/unanswered": float((labels.isnan() & asked).sum()),
            "feedback/identical": float(identical.sum()),
        }
    )
    both = torch.cat(scores) if scores is not None else torch.empty(0)
    ok = torch.isfinite(both)
    out.update(par.metric_means({"reward/score": [float(both[ok].sum()), float(ok.sum())]}))
    return out


def _perf(metrics: dict[str, float], rollout: Rollout, policy_params, ref_params) -> dict[str, float]:
    """perf/time_iteration, perf/flops_per_s (`rlhflab.models.flops`: generation, the reference's forward and
    the policy's forward + backward over the pairs, LM heads at response tokens) and perf/tokens_per_s."""
    seconds = sum(metrics[f"perf/time_{k}"] for k in ("generate", "feedback", "reference", "optimize"))
    tokens, response_tokens = int(rollout.attention_mask.sum()), int(rollout.response_mask.sum())
    train, head = int(metrics.get("perf/train_tokens", 0)), int(metrics.get("perf/train_head_tokens", 0))
    flops = causal_lm_forward_flops(policy_params, tokens, response_tokens)
    flops += causal_lm_train_flops(policy_params, train, head)
    if ref_params is not None:
        flops += causal_lm_forward_flops(ref_params, train, head)
    return {
        "perf/time_iteration": seconds,
        "perf/flops_per_s": flops / max(seconds, 1e-9),
        "perf/tokens_per_s": (tokens + train) / max(seconds, 1e-9),
    }


def append_pairs(
    path: Path, iteration: int, rollout: Rollout, labels: Tensor, scores, kl: dict[int, tuple], par=None
) -> None:
    """Append one JSON line per pair to RUN/rollouts.jsonl: prompt, first, second, label (null: not asked or
    unanswered), score_first / score_second (when the source scores responses), kl_first / kl_second (when the
    pair was trained against a reference). Across processes the main one writes every process's pairs, in the
    step's order."""

    def num(v) -> float | None:  # NaN is not JSON
        return float(v) if v is not None and math.isfinite(float(v)) else None

    rows = []
    for i in range(len(labels)):
        row = {
            "iteration": iteration,
            "prompt": rollout.prompts[2 * i],
            "first": rollout.texts[2 * i],
            "second": rollout.texts[2 * i + 1],
            "label": num(labels[i]),
        }
        if scores is not None:
            row.update(score_first=num(scores[0][i]), score_second=num(scores[1][i]))
        row.update(zip(("kl_first", "kl_second"), map(num, kl.get(i, (None, None)))))
        rows.append(row)
    if par is not None and par.world > 1:
        rows = par.gather(rows)
        if not par.is_main:
            return
    with open(path, "a") as f:
        f.writelines(json.dumps(row) + "\n" for row in rows)


def _pair_kl(kept: list[int], labels: Tensor, seq_kl: Tensor | None) -> dict[int, tuple[float, float]]:
    """{pair index: (KL of first, KL of second)} from the trained rows (chosen ones, then rejected ones)."""
    if seq_kl is None:
        return {}
    chosen, rejected = seq_kl[: len(kept)].tolist(), seq_kl[len(kept) :].tolist()
    return {i: (c, r) if labels[i] == FIRST else (r, c) for i, c, r in zip(kept, chosen, rejected)}


def _trim_rollouts(path: Path, step: int) -> None:
    """On resume: drop the pairs logged after the checkpoint (their steps run again)."""
    if path.is_file():
        lines = path.read_text().splitlines(keepends=True)
        atomic_write_text(path, "".join(line for line in lines if json.loads(line)["iteration"] <= step))


def preflight(cfg: OnlineDPOConfig, *, feedback: Any = None) -> None:
    """The checks that need no model or data file, run before anything is loaded or made."""
    require_feedback(cfg.algo, feedback)


_LAB_NEEDS_A_SOURCE = (
    "config: algo.feedback=lab asks the lab's simulated annotators, which a stage cannot build (training code "
    "never imports the lab); run `rlhflab online-dpo algo.feedback=lab` with a lab model, or pass "
    "train(cfg, feedback=rlhflab.lab.feedback.AnnotatorFeedback(task)) in Python"
)


def _steps_2_to_4(
    ctx: StepContext, feedback, rollout: Rollout, optimizer, scheduler, cfg, step: int, last, par=None
):
    """Ask, build the pairs, one optimizer step: (metrics, labels [P], scores or None, {pair: KLs}). Across
    processes (`par`) each asks about and trains on its share of the step's pairs."""
    par = par or DataParallel()
    t0 = time.time()
    labels, identical, scores = ask_feedback(feedback, rollout, cfg.algo.feedback_timeout)
    t_feedback = time.time() - t0
    examples, kept = pair_examples(rollout, labels)
    n = int(par.sum(len(examples)))
    t0 = time.time()
    metrics, seq_kl = {"perf/time_reference": 0.0}, None
    if n:  # no optimizer step when every pair was a tie or unanswered
        spare = pair_examples(rollout, torch.tensor([FIRST]))[0]  # pair 0, for passes joined at weight 0
        metrics, seq_kl = update(
            ctx, examples, optimizer, scheduler, cfg.optim.max_grad_norm, step, last, par, n, spare
        )
    metrics["perf/time_optimize"] = time.time() - t0 - metrics["perf/time_reference"]
    metrics["perf/time_feedback"] = t_feedback
    metrics.update(_feedback_metrics(feedback, labels, identical, scores, len(examples), par))
    mask = rollout.response_mask
    entropy = rollout.entropy if rollout.entropy is not None else torch.zeros_like(mask, dtype=torch.float32)
    rows = float(len(rollout))
    metrics.update(
        par.means(
            {
                "perf/response_length": (float(rollout.response_lengths.sum()), rows),
                "perf/ended_with_eos": (float(rollout.ended_with_eos.sum()), rows),
                # recorded while sampling: the policy's entropy per token
                "loss/entropy_rollout": (float(entropy[mask].sum()), float(mask.sum())),
            }
        )
    )
    return metrics, labels, scores, _pair_kl(kept, labels, seq_kl)


def train(
    cfg: OnlineDPOConfig, *, resume: bool = False, overwrite: bool = False, feedback: Any = None
) -> Path:
    """Run online DPO; returns RUN/final, a plain HF causal LM.

    `feedback`: any feedback source (`rlhflab.feedback.FeedbackSource`: the lab's annotators, an LM judge,
    people); by default a `RewardFeedback` of the reward source(s) in algo.reward_model, or with
    algo.feedback=preference_model a `PreferenceModelFeedback` of algo.preference_model.
    """
    algo = cfg.algo
    require_train_path(cfg.data, "prompt")
    preflight(cfg, feedback=feedback)
    if feedback is None and algo.feedback == "lab":
        raise ConfigError(_LAB_NEEDS_A_SOURCE)
    # 1. Setup: seeds, run directory, policy, reference, feedback source, prompts.
    par = DataParallel()  # one process, or one of those `accelerate launch` / `torchrun` started
    check_data_parallel(algo, par, "algo.prompts_per_step", algo.prompts_per_step)
    seed_everything(cfg.seed)
    run = open_run(cfg, NAME, cfg.logging, resume=resume, overwrite=overwrite, parallel=par)
    policy, tokenizer, device = load_policy(cfg.model, device=par.device)
    policy = par.prepare(policy)  # sharded across the processes under FSDP, before the optimizer sees it
    live_ref, ref_model = _reference(cfg, policy, device)
    if feedback is None:
        feedback = default_feedback(algo, device, cfg.seed)
    prompts, steps_per_epoch = load_prompts(cfg.data, algo.prompts_per_step)
    optimizer, scheduler = build_optimizer(policy, cfg.optim, algo.iterations)
    par.attach(policy, optimizer, cfg.optim, micro_batches=VARYING)  # DeepSpeed: as many passes as kept pairs
    amp = mixed_precision(cfg.model, device)
    ctx = StepContext(
        policy, PREFERENCE_LOSS_TABLE[algo.loss], algo, device, tokenizer.pad_token_id, live_ref, amp
    )
    params = (matmul_params(policy), matmul_params(ref_model) if ref_model is not None else None)
    sampling, rollouts = sampling_settings(cfg.sampling), run.dir / "rollouts.jsonl"
    engine = rollout_engine(cfg, policy, tokenizer)  # None: HF generate on the policy itself
    _announce(cfg, feedback, len(prompts), policy, run.dir, par)
    feedback_state = FeedbackCheckpoint(feedback, par)
    snapshot = functools.partial(save_model, policy, tokenizer, merge_lora=cfg.model.lora.merge)
    extra = {"state": feedback_state.state if feedback_state.active else None, "snapshot": snapshot}
    loop = Loop(run, NAME, cfg.logging, algo.iterations, policy, optimizer, scheduler, resume=resume,
                parallel=par, **extra)  # fmt: skip
    feedback_state.resume(loop.resumed_state)
    if resume and par.is_main:
        _trim_rollouts(rollouts, loop.step)

    policy.train()
    while loop.step < loop.total:
        iteration = loop.step + 1
        epoch, position = divmod(loop.step, steps_per_epoch)
        order = batch_schedule(len(prompts), algo.prompts_per_step, cfg.seed, epoch)[position]
        # 1. generate: two samples per prompt, each row from its own seed, a function of the step (exact
        # resume) and of the row (each process samples its share of the prompts: the rows one process would)
        t0 = time.time()
        seed = cfg.seed * 100_003 + loop.step
        rollout = sample_share(
            policy, tokenizer, [prompts[i] for i in order], 2, sampling, cfg, device, seed, par, engine
        )
        t_gen = time.time() - t0
        # 2-4. ask the feedback source; pairs (chosen, rejected) by the label, ties and unanswered pairs
        # dropped; reference and policy log-probs, the loss, one optimizer step
        metrics, labels, scores, pair_kl = _steps_2_to_4(
            ctx, feedback, rollout, optimizer, scheduler, cfg, iteration, loop.last_ckpt, par
        )
        metrics["perf/time_generate"] = t_gen
        metrics.update({"perf/weight_sync_s": engine.weight_sync_s} if engine else {})
        metrics.update(_perf(metrics, rollout, *params))
        append_pairs(rollouts, iteration, rollout, labels, scores, pair_kl, par)
        feedback_state.after_step()
        tokens = int(par.sum(float(rollout.attention_mask.sum())))
        loop.count(pairs=len(order), rollouts=2 * len(order), tokens=tokens)
        show = {"pairs": "feedback/pairs_kept", "score": "reward/score", "kl": "kl/sequence"}
        loop.end_step(metrics, show={k: v for k, v in show.items() if v in metrics})
    loop.close()

    # 5. Save the final model (HF format), gathered whole from a sharded policy, by the main process.
    final, queries = run.dir / "final", int(par.sum(float(feedback.queries)))
    finish(par, run, policy, NAME, loop.step, None,
           lambda: save_model(policy, tokenizer, final, merge_lora=cfg.model.lora.merge),
           f"policy ({queries} feedback queries)")  # fmt: skip
    return final


def _announce(cfg: OnlineDPOConfig, feedback, n_prompts: int, policy, run_dir: Path, par) -> None:
    if par.is_main:
        algo = cfg.algo
        print(
            f"{NAME}: loss {algo.loss}, feedback {getattr(feedback, 'name', type(feedback).__name__)}, "
            f"{n_prompts} prompts, {algo.iterations} steps x {algo.prompts_per_step} pairs, "
            f"{count_parameters(policy) / 1e6:.2f}M parameters, run dir {run_dir}" + par.describe()
        )
