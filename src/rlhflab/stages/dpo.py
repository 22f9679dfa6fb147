"""Direct preference optimization and its family, one stage with the loss picked by name (algo.loss).

Tang et al. 2024 (GPO): DPO, IPO and SLiC are one convex f applied to beta times the log-ratio gap
h = (log pi(y_c) - log ref(y_c)) - (log pi(y_r) - log ref(y_r)); cDPO and robust DPO reweigh it for label
noise. KTO learns from unpaired good/bad completions against a KL reference point; ORPO, SimPO and CPL need
no reference model. The maths and the table of losses (data, reference, inputs, hyperparameters) live in
`rlhflab.losses.preference`; `loss_of_batch` runs a row of that table on a batch.

Cost: the reference policy's log-probs of every response (train and eval) are computed once before
training and cached in RUN/ref_logps.pt, so no reference model is held while training (--resume reuses the
cache); reference-free losses load none. Chosen and rejected go through the policy as one batch of 2B rows
(one forward, one backward), with the LM head applied only at response positions.

    rlhflab dpo --config configs/dpo_tiny.yaml model.name_or_path=runs/sft/final algo.loss=ipo

Setup -> reference pass -> loop -> save, read top to bottom.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import math
import os
import time
from array import array
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from rlhflab.config import DPOAlgo, DPOConfig
from rlhflab.core.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from rlhflab.core.health import check_finite
from rlhflab.core.progress import Progress
from rlhflab.core.seeding import batch_schedule, seed_everything
from rlhflab.data import UnpairedRecord, collate_pairs, collate_unpaired, tokenize_pair, tokenize_unpaired
from rlhflab.errors import DataError
from rlhflab.losses import LossOutput, kto_kl_estimate
from rlhflab.losses.preference import PREFERENCE_LOSS_TABLE, PreferenceLoss
from rlhflab.models.flops import MatmulParams, causal_lm_forward_flops, causal_lm_train_flops, matmul_params
from rlhflab.models.loading import count_parameters, is_peft_model, load_causal_lm, save_model
from rlhflab.models.logprobs import token_logps
from rlhflab.stages.common import (
    build_optimizer,
    clip_gradients,
    load_policy,
    mixed_precision,
    num_optimizer_steps,
    open_run,
    optimizer_step,
    resolve_model_path,
)
from rlhflab.stages.data_source import load_stage_records, require_train_path

REF_CACHE = "ref_logps.pt"

# ---- The loss table: name -> (how to call it, which data, whether it needs a reference) --------------------


@dataclass
class LossInputs:
    """Response log-probs of one micro-batch. Paired data: R = 2B rows, chosen rows 0..B-1 then rejected
    rows B..2B-1 (`collate_pairs(stack=True)` order); unpaired data: R = B rows.

    policy_logps [R] summed over response tokens; lengths [R] response token counts; token_logps [R, T-1]
    per-token (0 off the response) with token_mask [R, T-1]; ref_logps [R] summed (None without a
    reference); desirable [B] bool and kl_estimate 0-dim (KTO only).
    """

    policy_logps: Tensor
    lengths: Tensor
    token_logps: Tensor
    token_mask: Tensor
    ref_logps: Tensor | None = None
    desirable: Tensor | None = None
    kl_estimate: Tensor | None = None


def _halves(x: Tensor) -> tuple[Tensor, Tensor]:
    b = x.shape[0] // 2
    return x[:b], x[b:]


def _call_kto(row: PreferenceLoss, x: LossInputs, algo: DPOAlgo, kw: dict) -> LossOutput:
    out = row.fn(x.policy_logps, x.ref_logps, x.desirable, x.kl_estimate, **kw)
    implicit, good = out.metrics["reward/implicit"], x.desirable.bool()
    z0 = out.metrics["kl/reference_point"]
    nan = torch.full_like(implicit, math.nan)
    # NaN marks "not this kind": the step's metric means skip it, giving per-kind means.
    metrics = {"reward/chosen": torch.where(good, implicit, nan),
               "reward/rejected": torch.where(good, nan, implicit),
               "reward/accuracy": ((implicit > algo.beta * z0) == good).to(implicit.dtype),
               "kl/reference_point": z0}
    return LossOutput(out.loss, metrics)


def loss_of_batch(row: PreferenceLoss, x: LossInputs, algo: DPOAlgo) -> LossOutput:
    """Run one loss of the table on a micro-batch's log-probs: `row.inputs` says which log-probs its
    function takes, `row.params` which of algo's settings (by name) become which keyword."""
    kw = {keyword: getattr(algo, key) for key, keyword in row.params.items()}
    lengths = x.lengths.clamp(min=1).to(x.policy_logps.dtype)
    if row.inputs == "sums":
        policy, ref = x.policy_logps, x.ref_logps
        if algo.average_logps:
            policy, ref = policy / lengths, ref / lengths
        return row.fn(*_halves(policy), *_halves(ref), **kw)
    if row.inputs == "means":
        return row.fn(*_halves(x.policy_logps / lengths), **kw)
    if row.inputs == "sums_lengths":
        return row.fn(*_halves(x.policy_logps), *_halves(x.lengths), **kw)
    if row.inputs == "tokens":
        (chosen, rejected), (chosen_mask, rejected_mask) = _halves(x.token_logps), _halves(x.token_mask)
        return row.fn(chosen, chosen_mask, rejected, rejected_mask, **kw)
    if row.inputs == "unpaired":
        return _call_kto(row, x, algo, kw)
    raise ValueError(f"unknown loss inputs {row.inputs!r}")  # a bug in the table, not user input


# ---- Data: tokenized examples, and KTO's mismatched (prompt, other completion) rows ------------------------


def mismatched_partners(prompts: list[Any], search: int = 64) -> list[int]:
    """For each example i, the index of a later example (cyclically) with another prompt, or i+1 when none
    is near. KTO's reference point z0 is the policy/reference KL on such mismatched pairs (x_i, y_j)."""
    n = len(prompts)
    partners = []
    for i in range(n):
        steps = (s for s in range(1, min(n, search + 1)) if prompts[(i + s) % n] != prompts[i])
        partners.append((i + next(steps, 1)) % n)
    return partners


def _tokenize(records: list, kind: str, tokenizer, cfg: DPOConfig) -> tuple[list[dict], list[dict] | None]:
    """(examples, KTO's mismatched examples or None)."""
    kw = {"max_length": cfg.data.max_length, "max_prompt_length": cfg.data.max_prompt_length}
    if kind == "pairwise":
        return [tokenize_pair(r, tokenizer, **kw) for r in records], None
    examples = [tokenize_unpaired(r, tokenizer, **kw) for r in records]
    partners = mismatched_partners([r.prompt for r in records])
    kl = [tokenize_unpaired(UnpairedRecord(r.prompt, records[j].completion, r.label), tokenizer, **kw)
          for r, j in zip(records, partners)]
    return examples, kl


_DATA_HINTS = {
    "pairwise": "records with prompt, chosen and rejected; for good/bad completions use algo.loss=kto",
    "unpaired": "records with prompt, completion and label; for preference pairs use a paired loss such as "
                "algo.loss=sigmoid"}


def _load_records(cfg: DPOConfig, kind: str, run_dir: Path) -> tuple[list, list]:
    try:
        return load_stage_records(cfg.data, kind, seed=cfg.seed)
    except DataError as e:
        raise DataError(f"{e}. algo.loss={cfg.algo.loss} trains on {_DATA_HINTS[kind]}") from None


def _collate(examples: list[dict], kind: str, pad_id: int) -> dict[str, Tensor]:
    if kind == "pairwise":
        return collate_pairs(examples, pad_token_id=pad_id, stack=True)
    return collate_unpaired(examples, pad_token_id=pad_id)


def _response_logps(model, batch: dict[str, Tensor], device, amp: Callable = contextlib.nullcontext
                    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(summed log-probs [R], lengths [R], token log-probs [R, T-1], token mask [R, T-1]) of every row's
    response, from one forward with the LM head at response positions only, run inside `amp()` (the
    model.autocast context: policy and reference must share it, or DPO's log-ratios start away from zero)."""
    mask = batch["loss_mask"].to(device)
    with amp():
        logps = token_logps(model, batch["input_ids"].to(device), batch["attention_mask"].to(device), mask)
    target = mask[:, 1:]
    return logps.sum(-1), target.sum(-1), logps, target


def _cache_rows(values: Tensor, indices: list[int]) -> Tensor:
    """Cached per-example log-probs ([N, 2] pairs or [N]) as the rows of a collated batch ([2B] or [B])."""
    picked = values[indices]
    return torch.cat([picked[:, 0], picked[:, 1]]) if picked.ndim == 2 else picked


# ---- Reference log-probs: computed once, cached in the run directory ---------------------------------------


@torch.no_grad()
def reference_logps(model, examples: list[dict], kind: str, device, pad_id: int, batch_size: int = 32,
                    amp: Callable = contextlib.nullcontext) -> tuple[Tensor, int]:
    """Summed response log-probs of every example under `model`: ([N, 2] (chosen, rejected) for pairs or
    [N] for unpaired examples, float32 on the CPU; real tokens processed).

    Examples are batched by length, so little compute goes to padding.
    """
    was_training = model.training
    model.eval()
    ex = examples
    order = sorted(range(len(ex)), key=lambda i: -len(ex[i].get("input_ids") or ex[i]["chosen_input_ids"]))
    out = torch.zeros(len(examples), 2) if kind == "pairwise" else torch.zeros(len(examples))
    tokens = 0
    for s in range(0, len(order), batch_size):
        idx = order[s:s + batch_size]
        batch = _collate([examples[i] for i in idx], kind, pad_id)
        sums = _response_logps(model, batch, device, amp)[0].float().cpu()
        out[idx] = torch.stack(_halves(sums), dim=1) if kind == "pairwise" else sums
        tokens += int(batch["attention_mask"].sum())
    model.train(was_training)
    return out, tokens


def _fingerprint(ref_id: str, sets: dict[str, list[dict]]) -> str:
    """A hash of the reference's identity and every token and loss-mask entry the cache was made from."""
    h = hashlib.sha256(ref_id.encode())
    for name, examples in sorted(sets.items()):
        h.update(f"|{name}:{len(examples)}|".encode())
        for e in examples:
            for key in sorted(k for k in e if k.endswith(("input_ids", "loss_mask"))):
                h.update(key.encode() + array("q", (int(v) for v in e[key])).tobytes())
    return h.hexdigest()


def cached_reference_logps(run_dir: Path, ref_id: str, sets: dict[str, list[dict]], kind: str, load_ref,
                           device, pad_id: int, batch_size: int, log=print, amp: Callable = contextlib.nullcontext
                           ) -> tuple[dict[str, Tensor], dict]:
    """Reference log-probs of every example set ({"train": ..., "eval": ..., ...}), from RUN/ref_logps.pt
    when it was made for the same reference and tokens, else computed with `load_ref()` and cached.

    Returns ({set name: tensor}, perf metrics of the pass: {} when the cache was reused).
    """
    path = run_dir / REF_CACHE
    fingerprint = _fingerprint(ref_id, sets)
    if path.exists():
        cache = torch.load(path, map_location="cpu", weights_only=True)
        if cache.get("fingerprint") == fingerprint:
            log(f"dpo: reusing the reference log-probs cached in {path}")
            return cache["logps"], {}
        log(f"dpo: {path} was made for other data or another reference; computing it again")
    ref = load_ref()
    t0, tokens, logps = time.time(), 0, {}
    for name, examples in sets.items():
        logps[name], n = reference_logps(ref, examples, kind, device, pad_id, batch_size, amp)
        tokens += n
    elapsed = max(time.time() - t0, 1e-9)
    for name, values in logps.items():
        check_finite({f"reference log-probs ({name})": values}, step=0)
    tmp = path.with_name(f".{path.name}.tmp")  # a crash mid-write must not leave a cache that loads
    torch.save({"fingerprint": fingerprint, "logps": logps}, tmp)
    os.replace(tmp, path)
    n_examples = len(sets.get("train", []))
    head_tokens = sum(_response_tokens(s, range(len(s))) for s in sets.values())
    ref_flops = causal_lm_forward_flops(matmul_params(ref), tokens, head_tokens) if ref is not None else 0.0
    perf = {"perf/ref_examples_per_s": sum(len(s) for s in sets.values()) / elapsed,
            "perf/ref_tokens_per_s": tokens / elapsed,
            # A forward pass, the LM head at response tokens only (rlhflab.models.flops).
            "perf/ref_flops_per_s": ref_flops / elapsed, "perf/ref_seconds": elapsed}
    log(f"dpo: cached reference log-probs of {n_examples} training examples in {elapsed:.1f}s ({path})")
    return logps, perf


# ---- One micro-batch, one step, evaluation -----------------------------------------------------------------


@dataclass
class _Context:
    """What the loss of a batch needs: the policy, where reference log-probs come from, the loss."""

    model: Any
    row: PreferenceLoss
    algo: DPOAlgo
    device: torch.device
    pad_id: int
    ref_cache: dict[str, Tensor] | None  # cached reference log-probs per example set
    live_ref: Callable[[], contextlib.AbstractContextManager] | None  # context yielding a reference model
    amp: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext  # model.autocast context

    def ref_rows(self, split: str, indices: list[int], batch: dict) -> Tensor | None:
        if not self.row.reference:
            return None
        if self.ref_cache is not None:
            return _cache_rows(self.ref_cache[split], indices).to(self.device)
        with torch.no_grad(), self.live_ref() as ref:
            return _response_logps(ref, batch, self.device, self.amp)[0]


def _kl_estimate(ctx: _Context, split: str, kl_examples: list[dict], indices: list[int], chunk: int
                 ) -> Tensor:
    """KTO's z0 over the mismatched rows of `indices`: policy log-probs now, reference ones cached."""
    policy, ref = [], []
    with torch.no_grad():
        for s in range(0, len(indices), chunk):
            idx = indices[s:s + chunk]
            batch = _collate([kl_examples[i] for i in idx], "unpaired", ctx.pad_id)
            policy.append(_response_logps(ctx.model, batch, ctx.device, ctx.amp)[0])
            ref.append(ctx.ref_rows(f"{split}_kl", idx, batch))
    return kto_kl_estimate(torch.cat(policy), torch.cat(ref))


def batch_loss(ctx: _Context, split: str, examples: list[dict], indices: list[int],
               kl_estimate: Tensor | None = None) -> tuple[LossOutput, int]:
    """The loss [B] and metrics of examples[indices], and the real tokens the forward processed."""
    batch = _collate([examples[i] for i in indices], ctx.row.data, ctx.pad_id)
    sums, lengths, logps, mask = _response_logps(ctx.model, batch, ctx.device, ctx.amp)
    desirable = batch["label"].to(ctx.device) if "label" in batch else None
    inputs = LossInputs(sums, lengths, logps, mask, ref_logps=ctx.ref_rows(split, indices, batch),
                        desirable=desirable, kl_estimate=kl_estimate)
    return loss_of_batch(ctx.row, inputs, ctx.algo), int(batch["attention_mask"].sum())


def _accumulate(sums: dict[str, list[float]], out: LossOutput) -> None:
    """Add each metric's sum and count of non-NaN values (NaN = "not this kind", see `_call_kto`)."""
    for k, v in out.metrics.items():
        v = v.detach().float()
        seen = ~torch.isnan(v)
        acc = sums.setdefault(k, [0.0, 0.0])
        acc[0] += float(v[seen].sum())
        acc[1] += float(seen.sum())


def _means(sums: dict[str, list[float]]) -> dict[str, float]:
    return {k: total / count for k, (total, count) in sums.items() if count}


def _train_step(ctx: _Context, examples: list[dict], kl_examples, indices: list[int], micro: int, step: int,
                last_ckpt) -> tuple[dict[str, float], int, int]:
    """Forward/backward of one optimizer step; returns (metrics, trained tokens, forward-only tokens)."""
    z0 = _kl_estimate(ctx, "train", kl_examples, indices, micro) if kl_examples is not None else None
    metric = f"loss/{ctx.algo.loss}"
    sums: dict[str, list[float]] = {}
    total, tokens = 0.0, 0
    for s in range(0, len(indices), micro):
        out, n = batch_loss(ctx, "train", examples, indices[s:s + micro], kl_estimate=z0)
        # Normalized by the whole step's example count, so accumulation gives the full batch's gradient.
        loss = out.loss.sum() / len(indices)
        check_finite({metric: loss}, step=step, last_good=last_ckpt)
        loss.backward()
        total += float(loss.detach())
        tokens += n
        _accumulate(sums, out)
    forward_only = sum(len(kl_examples[i]["input_ids"]) for i in indices) if kl_examples is not None else 0
    return {metric: total, **_means(sums)}, tokens, forward_only


@torch.no_grad()
def evaluate(ctx: _Context, examples: list[dict], kl_examples: list[dict] | None, batch_size: int = 32
             ) -> dict[str, float]:
    """Held-out loss and metrics: eval/loss, eval/accuracy (the share of pairs whose chosen response gets
    the higher implicit reward; for KTO, of completions on the right side of the reference point),
    eval/chosen, eval/rejected, eval/margin, and the loss's other metrics under eval/."""
    was_training = ctx.model.training
    ctx.model.eval()
    everything = list(range(len(examples)))
    z0 = _kl_estimate(ctx, "eval", kl_examples, everything, batch_size) if kl_examples is not None else None
    sums: dict[str, list[float]] = {}
    for s in range(0, len(examples), batch_size):
        out, _ = batch_loss(ctx, "eval", examples, everything[s:s + batch_size], kl_estimate=z0)
        _accumulate(sums, LossOutput(out.loss, {"loss": out.loss, **out.metrics}))
    ctx.model.train(was_training)
    return {f"eval/{k.removeprefix('reward/')}": v for k, v in _means(sums).items()}


# ---- The stage ---------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _adapters_off(policy):
    with policy.disable_adapter():
        yield policy


def _setup_reference(cfg: DPOConfig, policy, device, pad_id: int, run_dir: Path, sets: dict[str, list[dict]],
                     kind: str) -> tuple[dict[str, Tensor] | None, dict[str, float], Callable | None]:
    """(cached reference log-probs or None, perf of the caching pass, live reference context or None).

    An empty cfg.ref_model means the initial policy: the policy itself fills the cache before its first
    update (nothing else is loaded), and a live LoRA policy switches its adapters off to act as reference.
    A reference model loaded only to fill the cache is dropped as soon as it is filled.
    """
    def load_other():
        path = resolve_model_path(cfg.ref_model or cfg.model.name_or_path)
        return load_causal_lm(path, dtype=cfg.model.dtype, device=str(device)).eval().requires_grad_(False)

    if not cfg.algo.precompute_ref_logps:
        if not cfg.ref_model and is_peft_model(policy):
            return None, {}, functools.partial(_adapters_off, policy)
        return None, {}, functools.partial(contextlib.nullcontext, load_other())
    precision = cfg.model.dtype + (f", autocast {cfg.model.autocast}" if cfg.model.autocast != "none" else "")
    ref_id = f"{cfg.ref_model or 'initial policy ' + cfg.model.name_or_path} ({precision})"
    batch_size = max(cfg.optim.micro_batch_size or cfg.optim.batch_size, 32)
    cache, perf = cached_reference_logps(run_dir, ref_id, sets, kind, lambda: load_other() if cfg.ref_model
                                         else policy, device, pad_id, batch_size,
                                         amp=mixed_precision(cfg.model, device))
    return cache, perf, None


def _response_tokens(examples: list[dict], indices) -> int:
    """Response tokens of examples[indices], both sides of a pair: where the LM head runs."""
    return sum(sum(m[1:]) for i in indices for k, m in examples[i].items() if k.endswith("loss_mask"))


def _perf(counts: dict[str, int], elapsed: float, params: MatmulParams, what: str) -> dict[str, float]:
    # Model FLOPs (rlhflab.models.flops): trained and forward-only rows, the LM head at response tokens only.
    flops = (causal_lm_train_flops(params, counts["tokens"], counts["head_tokens"])
             + causal_lm_forward_flops(params, counts["forward_tokens"], counts["forward_head_tokens"]))
    return {f"perf/{what}_per_s": counts["examples"] / elapsed,
            "perf/tokens_per_s": counts["tokens"] / elapsed,
            "perf/flops_per_s": flops / elapsed}


def train(cfg: DPOConfig, *, resume: bool = False, overwrite: bool = False) -> Path:
    """Train with algo.loss; returns the directory of the final model (RUN/final)."""
    # 1. Setup: seeds, run directory, policy, data.
    spec = PREFERENCE_LOSS_TABLE[cfg.algo.loss]
    require_train_path(cfg.data, spec.data)
    seed_everything(cfg.seed)
    run = open_run(cfg, "dpo", cfg.logging, resume=resume, overwrite=overwrite)
    model, tokenizer, device = load_policy(cfg.model)
    train_records, eval_records = _load_records(cfg, spec.data, run.dir)
    examples, kl_examples = _tokenize(train_records, spec.data, tokenizer, cfg)
    eval_examples, eval_kl = _tokenize(eval_records, spec.data, tokenizer, cfg)
    what = "pairs" if spec.data == "pairwise" else "examples"
    total_steps, steps_per_epoch = num_optimizer_steps(len(examples), cfg.optim, what=what)
    micro, n_params = cfg.optim.micro_batch_size or cfg.optim.batch_size, count_parameters(model)
    n_trainable = count_parameters(model, trainable_only=True)
    print(f"dpo: loss {cfg.algo.loss}, {len(examples)} {what}, {total_steps} steps, {n_params / 1e6:.2f}M "
          f"parameters ({n_trainable / 1e6:.2f}M trainable), run dir {run.dir}")

    # 2. Reference log-probs, once, before the first update (and before a checkpoint replaces the weights).
    ref_cache, ref_perf, live = None, {}, None
    if spec.reference:
        sets = {"train": examples, "eval": eval_examples}
        if kl_examples is not None:
            sets.update({"train_kl": kl_examples, "eval_kl": eval_kl})
        ref_cache, ref_perf, live = _setup_reference(cfg, model, device, tokenizer.pad_token_id, run.dir,
                                                     sets, spec.data)
    ctx = _Context(model, spec, cfg.algo, device, tokenizer.pad_token_id, ref_cache, live,
                   mixed_precision(cfg.model, device))
    optimizer, scheduler = build_optimizer(model, cfg.optim, total_steps)
    step, last_ckpt = 0, None
    if resume and (last_ckpt := latest_checkpoint(run.dir)) is not None:
        step = load_checkpoint(last_ckpt, model=model, optimizer=optimizer, scheduler=scheduler)["step"]
        print(f"dpo: resumed from {last_ckpt} at step {step}")
    if ref_perf:
        run.logger.log(step, ref_perf)

    # 3. Loop: one optimizer step per batch; the batch order is a function of (seed, epoch).
    model.train()
    progress = Progress(total_steps, "dpo", enabled=cfg.logging.progress, completed=step)
    t_last, counts = time.time(), dict.fromkeys(("examples", "tokens", "head_tokens", "forward_tokens",
                                                 "forward_head_tokens"), 0)
    while step < total_steps:
        epoch, position = divmod(step, steps_per_epoch)
        indices = batch_schedule(len(examples), cfg.optim.batch_size, cfg.seed, epoch)[position]
        metrics, tokens, forward_only = _train_step(ctx, examples, kl_examples, indices, micro, step + 1,
                                                    last_ckpt)
        grad_norm = clip_gradients(model, cfg.optim.max_grad_norm)
        check_finite({"loss/grad_norm": grad_norm}, step=step + 1, last_good=last_ckpt)
        optimizer_step(optimizer, scheduler)
        step += 1
        # Forward-only: the policy over KTO's KL rows; a live reference (counted as the policy's architecture)
        # over the same rows as the policy and the KL rows.
        live_runs = int(live is not None)
        head = _response_tokens(examples, indices)
        kl_head = _response_tokens(kl_examples, indices) if kl_examples is not None else 0
        for key, n in (("examples", len(indices)), ("tokens", tokens), ("head_tokens", head),
                       ("forward_tokens", (1 + live_runs) * forward_only + live_runs * tokens),
                       ("forward_head_tokens", (1 + live_runs) * kl_head + live_runs * head)):
            counts[key] += n

        # 4. Log, evaluate, checkpoint.
        if step % cfg.logging.log_every == 0 or step == total_steps:
            perf = _perf(counts, max(time.time() - t_last, 1e-9), matmul_params(model), what)
            perf.update({"perf/lr": scheduler.get_last_lr()[0], "perf/epoch": step / steps_per_epoch})
            row = run.logger.log(step, {**metrics, "loss/grad_norm": grad_norm, **perf})
            t_last, counts = time.time(), dict.fromkeys(counts, 0)
            progress.update(0, {"loss": row[f"loss/{cfg.algo.loss}"]})
        if eval_examples and cfg.logging.eval_every and step % cfg.logging.eval_every == 0:
            run.logger.log(step, evaluate(ctx, eval_examples, eval_kl))
        if cfg.logging.save_every and step % cfg.logging.save_every == 0 and step < total_steps:
            last_ckpt = save_checkpoint(run.dir, step, model=model, optimizer=optimizer, scheduler=scheduler,
                                        keep=cfg.logging.keep_checkpoints)
        progress.update(1)
    progress.close()

    # 5. Save the final model (HF format) and the final evaluation.
    if eval_examples:
        metrics = run.logger.log(step, evaluate(ctx, eval_examples, eval_kl))
        print("dpo: " + "  ".join(f"{k}={v:.4f}" for k, v in metrics.items()))
    final = save_model(model, tokenizer, run.dir / "final")
    run.close()
    print(f"dpo: saved the model to {final}")
    return final
