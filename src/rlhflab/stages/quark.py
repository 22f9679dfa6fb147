"""Quark and binary reward conditioning (`rlhflab quark`): learn what each reward level looks like, then ask
for the best.

Quark (Lu et al. 2022, "Quark: Controllable Text Generation with Reinforced Unlearning") keeps a pool of scored
samples that grows every iteration, sorts it into K reward quantiles, each with its own control token in front of
the prompt (Keskar et al. 2019's control codes), and trains a conditional LM on every level, the low ones behind
their own tokens ("unlearning"); sampling with the best token asks for the best. Each iteration i:

    1. sample    i = 1: the initial model, without a token (or the demonstrations of algo.init_data_path:
                 algo.pool_init=data); i > 1: the policy with the best token; scored by the reward (the sources
                 `rlhflab rs` uses) and added to the pool
    2. quantize  the whole pool into K = algo.n_quantiles quantiles (`rlhflab.losses.reward_quantiles`): quantile
                 k is the token <|reward_k|>, K - 1 the best; RUN/iter-i/pool.jsonl holds the pool
    3. train     optim.steps_per_iteration steps (0: optim.epochs passes over the pool) of `quark_loss` on
                 (token + prompt, response): NLL + algo.kl_coef KL(policy || reference) - algo.entropy_coef H
    4. evaluate  reward/eval_mean: a sample with the best token on each of the first algo.eval_prompts prompts,
                 at one seed for the run (step 0: the initial model)

AlpacaFarm's binary reward conditioning (Dubois et al. 2023) is K = 2 (good / bad at the median), one iteration,
no KL and no entropy: configs/reward_conditioning_tiny.yaml. Where the papers leave room: the KL's reference is
the initial model seeing the prompt WITHOUT a token, as the authors' released code (and AlpacaFarm's
reimplementation) runs it; it has no control tokens, so the KL runs over its vocabulary (`quark_loss`). The token
goes first, after a leading BOS, and a long prompt keeps its last data.max_prompt_length - 1 tokens. Pool samples
are tokenized as SFT rows are, like the kept samples of `rlhflab rs` (`pool_tokens`). Equal rewards share a token.

RUN/final is a plain HF model directory whose tokenizer holds the tokens; its quark.json names them and the best
one: sample it with that token in front of every prompt (`best_token_prompts`). --resume continues from the
checkpoint every iteration ends with (logging.save_every adds more) and reads the pools back; batch orders and
sampling seeds are functions of (seed, iteration, step), so the weights come out the same. RUN/metrics.jsonl has a
row per optimizer step (loss/quark, loss/nll, kl/ref, loss/entropy) and per iteration (reward/sampled_mean,
reward/pool_mean, reward/top_quantile_mean, reward/queries: the reward calls for pool data so far,
reward/eval_mean, quark/pool_size, perf/wall_s).

Every sample comes from its own seed, a function of the draw and of its row (`quark_pool`), so `torchrun` /
`accelerate launch` run it data-parallel (`stages.parallel`): each process samples and scores its share of the
prompts, the shares are gathered in prompt order, so every process holds the pool one process draws (and computes
the same quantiles and tokens from it); each takes its share of every optimizer step's rows, the loss divided by
the whole step's response tokens, and the gradients are summed. The main process alone writes (pools,
checkpoints, metrics, RUN/final). W processes end at one process's weights up to the order of floating-point
additions, and --resume continues a run whatever the number of processes that began it. Not across processes:
algo.reward_combine=llama2_gate (it whitens over each scoring call's batch), and a sharded model (FSDP, DeepSpeed).

    rlhflab quark --config configs/quark_tiny.yaml model.name_or_path=runs/demo/sft/final \\
        algo.reward_model=runs/demo/rm/final data.train_path=runs/demo/data/prompts.jsonl
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from rlhflab.config import QuarkConfig
from rlhflab.core.checkpoint import save_checkpoint
from rlhflab.core.health import check_finite
from rlhflab.core.io import atomic_write_text
from rlhflab.core.metrics_log import read_metrics
from rlhflab.core.seeding import seed_everything
from rlhflab.data import load_records
from rlhflab.data.collate import collate_sft
from rlhflab.data.tokenize import encode_prompt, encode_response, fit_lengths
from rlhflab.errors import ConfigError, UserError
from rlhflab.losses.quark import quark_loss, reward_quantiles
from rlhflab.models.backbone import backbone_and_head, hidden_to_logits, position_ids_from_mask

# The control tokens live in `control_tokens` (best-of-n and the evaluation sample behind them too); re-exported.
from rlhflab.models.control_tokens import TOKEN_FORMAT as TOKEN_FORMAT
from rlhflab.models.control_tokens import TOKENS_FILE as TOKENS_FILE
from rlhflab.models.control_tokens import ControlTokens as ControlTokens
from rlhflab.models.control_tokens import add_control_tokens as add_control_tokens
from rlhflab.models.control_tokens import best_token_prompts as best_token_prompts
from rlhflab.models.control_tokens import conditioned_prompt_ids as conditioned_prompt_ids
from rlhflab.models.control_tokens import read_control_tokens as read_control_tokens
from rlhflab.models.control_tokens import with_token as with_token
from rlhflab.models.loading import (
    atomic_output_dir,
    is_peft_model,
    load_inference_lm,
    write_pretrained,
)
from rlhflab.stages.common import (
    Loop,
    Run,
    accumulate_metrics,
    build_optimizer,
    clip_gradients,
    load_policy,
    mixed_precision,
    open_run,
    optimizer_step,
    plain_json,
    resolve_device,
    resolve_model_path,
    snapshot_dir,
    write_jsonl_atomic,
)
from rlhflab.stages.data_source import require_train_path
from rlhflab.stages.on_policy import load_prompts, load_reward, require_reward
from rlhflab.stages.parallel import DataParallel

# The pool's pure functions live in `quark_pool`; re-exported.
from rlhflab.stages.quark_pool import plan_steps as plan_steps
from rlhflab.stages.quark_pool import pool_metrics, read_pool, sample_rows, score_rows
from rlhflab.stages.quark_pool import step_batch as step_batch
from rlhflab.stages.rejection_sampling import EVAL_SEED, round_prompt_ids

NAME = "quark"


def save_quark_model(model, tokenizer, tokens: ControlTokens, out: Path) -> Path:
    """The policy as a plain HF directory, its tokenizer with the tokens, and quark.json; whole or not at all."""
    with atomic_output_dir(out) as tmp:
        write_pretrained(model, tmp)
        tokenizer.save_pretrained(str(tmp))
        atomic_write_text(tmp / TOKENS_FILE, json.dumps(tokens.to_json(), indent=2) + "\n")
    return out


# ---- the conditional LM loss on a batch of the pool ------------------------------------------------------------


def pool_tokens(tokenizer, row: dict, cfg: QuarkConfig) -> tuple[list[int], list[int]]:
    """(prompt ids, response ids) of a pool sample, as `tokenize_sft` tokenizes a prompt + completion (a text
    answer to a chat prompt is an assistant turn), one position left for the token. An empty response stays (an
    SFT record would refuse it): its end of turn is what the model wrote, and its reward counts."""
    prompt, response, data = row["prompt"], row["response"], cfg.data
    response = [{"role": "assistant", "content": response}] if isinstance(prompt, list) else response
    ids = (encode_prompt(prompt, tokenizer), [encode_response(prompt, response, tokenizer)])
    prompt_ids, (response_ids,) = fit_lengths(
        *ids, tokenizer, data.max_length - 1, data.max_prompt_length - 1
    )
    return prompt_ids, response_ids


def collate_pair(pairs: list, token_ids: list[int], tokenizer) -> tuple[dict, dict]:
    """Right-padded batches of (token + prompt, response) for the policy and (prompt, response) for the
    reference, from (prompt ids, response ids) pairs; `loss_mask` marks the response tokens."""

    def row(p: list[int], r: list[int]) -> dict:
        m = [0] * len(p) + [1] * len(r)
        return {"input_ids": p + r, "attention_mask": [1] * len(m), "loss_mask": m}

    bos, pad = tokenizer.bos_token_id, tokenizer.pad_token_id
    policy = [row(with_token(p, t, bos), r) for (p, r), t in zip(pairs, token_ids)]
    ref = [row(p, r) for p, r in pairs]
    return collate_sft(policy, pad_token_id=pad), collate_sft(ref, pad_token_id=pad)


def response_logits(model, batch: dict, device) -> tuple[Tensor, Tensor, Tensor]:
    """The model's logits predicting each response token of a right-padded batch, response-aligned: ([B, R, V]
    logits, [B, R] labels, [B, R] mask), [b, j] for the j-th response token of row b; the LM head runs at response
    positions only. The alignment lets a policy that sees one more prompt token meet its reference."""
    ids, att = batch["input_ids"].to(device), batch["attention_mask"].to(device)
    target = batch["loss_mask"].to(device)[:, 1:]
    base, head = backbone_and_head(model)
    out = base(input_ids=ids, attention_mask=att, position_ids=position_ids_from_mask(att), use_cache=False)
    picked = hidden_to_logits(model, head, out.last_hidden_state[:, :-1][target])  # [N, V]
    lengths = target.sum(1)
    mask = torch.arange(int(lengths.max()), device=device)[None, :] < lengths[:, None]
    logits = picked.new_zeros(*mask.shape, picked.shape[-1])
    logits[mask] = picked
    labels = torch.zeros(mask.shape, dtype=torch.long, device=device)
    labels[mask] = ids[:, 1:][target]
    return logits, labels, mask


def micro_batch_loss(d: Driver, policy_batch: dict, ref_batch: dict, n_step_tokens: int):
    """(the micro-batch's share of the step loss, its `quark_loss` output): token losses summed, divided by the
    whole step's response tokens, so micro-batches add up to the step's token mean (Quark's reduction)."""
    algo = d.cfg.algo
    with d.amp():
        logits, labels, mask = response_logits(d.policy, policy_batch, d.device)
        ref_logits = None
        if d.ref is not None:
            with torch.no_grad():
                ref_logits, ref_labels, _ = response_logits(d.ref, ref_batch, d.device)
            if not torch.equal(ref_labels, labels):
                raise RuntimeError("the policy's and the reference's response tokens are out of step")
            ref_logits = ref_logits[..., : d.tokens.vocab_before]
    beta, alpha = algo.kl_coef, algo.entropy_coef
    out = quark_loss(logits, labels, mask, ref_logits, beta=beta, alpha=alpha, reduction="sequence_sum")
    return out.loss.sum() / n_step_tokens, out


# ---- the run ---------------------------------------------------------------------------------------------------


@dataclass
class Driver:
    """What the iterations of a run share: config, run directory, reward, prompts, models, counts and the processes
    (`par`: every process drives the same steps, the main one alone writes and prints)."""

    cfg: QuarkConfig
    run: Run
    reward: Any
    prompts: list
    prompt_ids: list[list[int]]  # each prompt encoded and cut to data.max_prompt_length - 1 tokens
    tokenizer: Any
    policy: Any
    device: torch.device
    amp: Any
    resume: bool
    par: DataParallel
    ref: Any = None
    tokens: ControlTokens | None = None
    queries: int = 0
    tokenized: list = field(default_factory=list)  # pool_tokens of the pool's rows, in pool order

    def evaluate(self) -> dict[str, float]:
        """reward/eval_mean: one sample on each of the first algo.eval_prompts prompts with the best token (the
        initial model, before the tokens exist: none), at a seed fixed for the run."""
        n = min(self.cfg.algo.eval_prompts, len(self.prompts))
        if not n:
            return {}
        token = None if self.tokens is None else self.tokens.best_id
        rows = sample_rows(self, list(range(n)), token, self.cfg.seed * 100_003 + EVAL_SEED)
        return {"reward/eval_mean": sum(score for _, score, _, _ in rows) / n}

    def grow(self, it: int) -> tuple[list[dict], dict]:
        """Step 1 of iteration `it`: the new scored samples as pool rows, and their metrics."""
        algo, k = self.cfg.algo, self.cfg.algo.samples_per_prompt
        if it == 1 and algo.pool_init == "data":
            return self.demonstrations(), {}
        ids = round_prompt_ids(len(self.prompts), algo.prompts_per_iteration, self.cfg.seed, it)
        token = None if it == 1 else self.tokens.best_id  # iteration 1 samples the initial model itself
        sampled = sample_rows(self, ids, token, self.cfg.seed * 100_003 + it, k)
        prompts = [(i, plain_json(self.prompts[i])) for i in ids for _ in range(k)]
        rows = [
            {"prompt_index": i, "prompt": p, "response": text, "score": s, "iteration": it}
            for (i, p), (text, s, _, _) in zip(prompts, sampled)
        ]
        metrics = {"perf/response_length": sum(n for _, _, n, _ in sampled) / len(sampled)}
        if self.tokens is not None:  # responses that hold a control token
            metrics["quark/control_token_rate"] = sum(has for *_, has in sampled) / len(sampled)
        return rows, metrics

    def demonstrations(self) -> list[dict]:
        """algo.pool_init=data: the (prompt, completion) records of algo.init_data_path, scored, as pool rows."""
        path = self.cfg.algo.init_data_path
        rows = []
        for n, r in enumerate(load_records(path, "sft", skip_bad=self.cfg.data.skip_bad_records).records):
            text = r.completion
            if r.messages is not None or (isinstance(text, list) and len(text) != 1):
                raise UserError(f"{path}: record {n + 1} is not a prompt with one completion, as quark needs")
            text = text[0]["content"] if isinstance(text, list) else text  # one assistant turn: its text
            rows.append({"prompt_index": None, "prompt": r.prompt, "response": text, "iteration": 1})
        return score_rows(self, rows)

    def pool_of(self, it: int, pool: list[dict] | None) -> tuple[list[dict], dict]:
        """The pool of iteration `it`, the previous one's plus its new samples, and step 1's metrics: read back
        on --resume when it was written, else grown from `pool` (None: the one iteration it - 1 wrote). The main
        process writes it; every process holds it."""
        step_dir = self.run.dir / f"iter-{it}"
        written = self.resume and (step_dir / "pool.jsonl").is_file() and (step_dir / "sample.json").is_file()
        # The main process's reading of the directory decides for all: every process samples, or none.
        if self.par.max(float(self.par.is_main and written)):
            saved = json.loads((step_dir / "sample.json").read_text())
            self.queries = int(saved.pop("queries_total"))
            return read_pool(step_dir), saved
        pool = read_pool(self.run.dir / f"iter-{it - 1}") if pool is None else pool
        new, metrics = self.grow(it)
        self.queries += len(new)
        rows = pool + new
        scores = torch.tensor([r["score"] for r in rows], dtype=torch.float64)
        quantiles = reward_quantiles(scores, self.cfg.algo.n_quantiles).tolist()
        metrics |= pool_metrics(rows, len(new), quantiles)
        if self.par.is_main:
            write_jsonl_atomic(
                step_dir / "pool.jsonl", [{**r, "quantile": q} for r, q in zip(rows, quantiles)]
            )
            saved = json.dumps({"queries_total": self.queries, **metrics})  # what --resume reads back
            atomic_write_text(step_dir / "sample.json", saved + "\n")
        self.par.wait()  # a later iteration's process may read it back (pool=None)
        return rows, metrics


def train_iteration(d: Driver, loop: Loop, it: int, pool: list[dict], quantiles: list[int], end: int) -> None:
    """Step 3 of iteration `it`: optimizer steps up to `end` on batches of the pool, each row behind its token.
    Each process takes its share of every step's rows (`par.shard`), its loss divided by the whole step's response
    tokens, and the gradients are summed across processes: one process's step."""
    optim, par = d.cfg.optim, d.par
    while len(d.tokenized) < len(pool):  # the pool only grows: each row is tokenized once
        d.tokenized.append(pool_tokens(d.tokenizer, pool[len(d.tokenized)], d.cfg))
    start = end - (optim.steps_per_iteration or optim.epochs * (len(pool) // optim.batch_size))
    micro = optim.micro_batch_size or optim.batch_size
    while loop.step < end:
        indices = step_batch(len(pool), optim.batch_size, d.cfg.seed, it, loop.step - start)
        n_tokens = sum(len(d.tokenized[i][1]) for i in indices)  # the whole step's, whoever holds the rows
        mine = par.shard(indices)
        sums, step_loss = {}, 0.0
        for s in range(0, len(mine), micro):
            rows = mine[s : s + micro]
            tokens = [d.tokens.ids[quantiles[i]] for i in rows]
            batches = collate_pair([d.tokenized[i] for i in rows], tokens, d.tokenizer)
            loss, out = micro_batch_loss(d, *batches, n_tokens)
            check_finite({"loss/quark": loss}, step=loop.step + 1, last_good=loop.last_ckpt)
            loss.backward()
            step_loss += float(loss.detach())
            accumulate_metrics(sums, {k: v for k, v in out.metrics.items() if k != "loss/quark"})
        par.sum_gradients(d.policy)
        grad_norm = clip_gradients(d.policy, optim.max_grad_norm)
        check_finite({"loss/grad_norm": grad_norm}, step=loop.step + 1, last_good=loop.last_ckpt)
        optimizer_step(loop.optimizer, loop.scheduler)
        loop.count(tokens=n_tokens, examples=len(indices))
        lr = loop.scheduler.get_last_lr()[0]
        # Per-sequence means over the whole step's rows; the loss is the sum of the processes' parts.
        metrics = {"loss/quark": par.sum(step_loss), **par.metric_means(sums)}
        loop.end_step(
            {**metrics, "loss/grad_norm": grad_norm, "perf/lr": lr},
            perf=lambda counts, seconds: {"perf/tokens_per_s": counts["tokens"] / seconds},
            show={"loss": "loss/quark"},
        )


def end_iteration(d: Driver, loop: Loop, it: int, metrics: dict, times: tuple[float, float]) -> None:
    """Step 4 and the bookkeeping: evaluate (every process samples its share), checkpoint (the unit of --resume),
    snapshot, log the iteration (the main process writes)."""
    log, t_eval = d.cfg.logging, time.time()
    metrics |= d.evaluate()
    loop_saved = log.save_every and loop.step % log.save_every == 0 and loop.step < loop.total
    # With the reward calls so far: a resumed run goes on counting from them.
    if not loop_saved and d.par.is_main:
        kw = {"optimizer": loop.optimizer, "scheduler": loop.scheduler, "keep": log.keep_checkpoints}
        state = {"queries": d.queries}
        loop.last_ckpt = save_checkpoint(d.run.dir, loop.step, model=d.policy, state=state, **kw)
    if log.snapshot_every and it % log.snapshot_every == 0 and d.par.is_main:
        save_quark_model(d.policy, d.tokenizer, d.tokens, snapshot_dir(d.run.dir, loop.step))
    (t0, t_train), now = times, time.time()
    metrics |= {"quark/iteration": float(it), "reward/queries": float(d.queries)}
    metrics |= {"perf/time_sample": t_train - t0, "perf/time_train": t_eval - t_train}
    metrics |= {"perf/time_eval": now - t_eval, "perf/wall_s": now - d.run.started}
    d.run.logger.log(loop.step, metrics)  # a silent logger on the other processes
    shown = "  ".join(f"{k}={v:.4g}" for k, v in metrics.items() if k.startswith(("reward/", "quark/pool")))
    if d.par.is_main:
        loop.progress.print(f"{NAME}: iteration {it}  {shown}")


def preflight(cfg: QuarkConfig, *, reward: Any = None, world: int = 1) -> None:
    """The checks that need no model or data file, run before anything is loaded or made (`world`: the number of
    data-parallel processes)."""
    require_reward(cfg.algo, reward)
    if cfg.algo.pool_init == "data" and not Path(cfg.algo.init_data_path).exists():
        raise UserError(f"algo.init_data_path '{cfg.algo.init_data_path}' does not exist; give an SFT file")
    if world > 1 and cfg.algo.reward_combine == "llama2_gate":
        # The gate whitens over each scoring call's batch; each process would whiten over its share only.
        raise ConfigError(
            f"config: algo.reward_combine=llama2_gate whitens the scores over the whole batch, which is not done "
            f"across processes (WORLD_SIZE={world}); run quark in one process"
        )


def setup(cfg: QuarkConfig, resume: bool, overwrite: bool, reward: Any) -> Driver:
    """The prompts, the reward, the run directory, the policy (still the initial model) and its tokenizer, on
    every process (the main one reports what loading says)."""
    preflight(cfg, reward=reward, world=int(os.environ.get("WORLD_SIZE", "1") or 1))
    par = DataParallel()  # one process, or one of those `accelerate launch` / `torchrun` started
    par.check_batch(cfg.optim.batch_size)
    require_train_path(cfg.data, "prompt")
    resolve_model_path(cfg.model.name_or_path)
    seed_everything(cfg.seed)
    device = par.device if par.device is not None else resolve_device(cfg.model.device)
    with contextlib.nullcontext() if par.is_main else contextlib.redirect_stdout(io.StringIO()):
        prompts, _ = load_prompts(cfg.data, cfg.algo.prompts_per_iteration or 1)
        policy, tokenizer, device = load_policy(cfg.model, device)
        reward = load_reward(cfg.algo, device) if reward is None else reward
    if is_peft_model(policy):  # started from a LoRA adapter directory (e.g. a LoRA SFT run): train all of it
        policy = policy.merge_and_unload().requires_grad_(True)
    run = open_run(cfg, NAME, cfg.logging, resume=resume, overwrite=overwrite, parallel=par)
    ids = [conditioned_prompt_ids(tokenizer, p, None, cfg.data.max_prompt_length) for p in prompts]
    amp = mixed_precision(cfg.model, device)
    return Driver(cfg, run, reward, prompts, ids, tokenizer, policy, device, amp, resume, par)


def train(cfg: QuarkConfig, *, resume: bool = False, overwrite: bool = False, reward: Any = None) -> Path:
    """Run Quark (or reward conditioning); returns RUN/final, the policy with its control tokens and quark.json.

    `reward`: any source with `score(prompts, responses) -> Tensor [B]` (`rlhflab.rewards`); by default the
    reward source(s) of algo.reward_model, combined as algo.reward_combine says. Launched in several processes
    (`torchrun`, `accelerate launch`), each samples its share of every draw and trains on its share of every
    step (`stages.parallel`); every process returns RUN/final.
    """
    algo = cfg.algo
    d = setup(cfg, resume, overwrite, reward)
    par = d.par
    # The initial model's reward/eval_mean: what every later one is read against. Whether it is logged already is
    # the main process's reading of the log, shared: every process samples, or none.
    logged = par.is_main and any(r["step"] == 0 for r in read_metrics(d.run.dir / "metrics.jsonl"))
    if algo.eval_prompts and par.max(float(par.is_main and not logged)):
        d.run.logger.log(0, d.evaluate())
    t0 = time.time()
    # 1. (iteration 1) the first pool: the initial model's samples, drawn before it has any control token
    pool, metrics = d.pool_of(1, [])
    d.tokens = add_control_tokens(d.policy, d.tokenizer, algo.n_quantiles, seed=cfg.seed)
    if algo.kl_coef > 0:  # the reference: the initial model, frozen, seeing prompts without a token
        d.ref = load_inference_lm(cfg.model.name_or_path, dtype=cfg.model.dtype, device=str(d.device))
    n_new = (algo.prompts_per_iteration or len(d.prompts)) * algo.samples_per_prompt
    cum = plan_steps(cfg, len(pool), n_new)
    optimizer, scheduler = build_optimizer(d.policy, cfg.optim, cum[-1])
    # Snapshots count iterations (end_iteration takes them); checkpoints keep the reward-call count.
    log = dataclasses.replace(cfg.logging, snapshot_every=0)
    state = lambda: {"queries": d.queries}  # noqa: E731
    loop = Loop(d.run, NAME, log, cum[-1], d.policy, optimizer, scheduler, resume=resume, state=state,
                parallel=par)  # fmt: skip
    d.queries = loop.resumed_state.get("queries", d.queries)
    if par.is_main:
        print(
            f"{NAME}: K = {algo.n_quantiles} reward tokens (best {d.tokens.tokens[-1]}), iterations: "
            f"{algo.iterations}, first pool: {len(pool)}, new samples per iteration: {n_new}, optimizer steps: "
            f"{cum[-1]}, run dir {d.run.dir}" + par.describe()
        )
    pool_at = 1  # the iteration whose pool `pool` is
    for it in range(1, algo.iterations + 1):
        if loop.step >= cum[it]:  # finished before --resume
            continue
        if it > 1:
            t0 = time.time()
            # 1. sample the policy with the best token, score, add to the pool (read back on --resume)
            pool, metrics = d.pool_of(it, pool if pool_at == it - 1 else None)
            pool_at = it
        # 2. quantize the whole pool's rewards: quantile k -> token k (every process holds the same pool)
        scores = torch.tensor([r["score"] for r in pool], dtype=torch.float64)
        quantiles = reward_quantiles(scores, algo.n_quantiles).tolist()
        # 3. train on (token + prompt, response); a fresh iteration's RNG is a function of (seed, iteration)
        if loop.step == cum[it - 1]:
            torch.manual_seed(cfg.seed * 100_003 + it)
        t_train = time.time()
        train_iteration(d, loop, it, pool, quantiles, cum[it])
        # 4. evaluate with the best token, checkpoint, log
        end_iteration(d, loop, it, dict(metrics), (t0, t_train))
    loop.close()
    # Save RUN/final: the policy, its tokenizer with the tokens, quark.json naming the best one.
    out = d.run.dir / "final"
    if par.is_main:
        save_quark_model(d.policy, d.tokenizer, d.tokens, out)
        d.run.close()
        print(
            f"{NAME}: {d.queries} reward queries, {time.time() - d.run.started:.1f} s; saved the policy to {out}"
        )
    par.wait()  # RUN/final is there before any process returns
    return out
