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

    rlhflab quark --config configs/quark_tiny.yaml model.name_or_path=runs/demo/sft/final \\
        algo.reward_model=runs/demo/rm/final data.train_path=runs/demo/data/prompts.jsonl
"""

from __future__ import annotations

import dataclasses
import json
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
from rlhflab.core.seeding import batch_schedule, seed_everything
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
from rlhflab.stages.best_of_n import score_in_batches
from rlhflab.stages.common import (
    Loop,
    Run,
    accumulate_metrics,
    build_optimizer,
    clip_gradients,
    load_policy,
    metric_means,
    mixed_precision,
    open_run,
    optimizer_step,
    plain_json,
    resolve_model_path,
    snapshot_dir,
    write_jsonl_atomic,
)
from rlhflab.stages.data_source import require_train_path
from rlhflab.stages.on_policy import load_prompts, load_reward, require_reward, sample, sampling_settings
from rlhflab.stages.rejection_sampling import EVAL_SEED, SAMPLE_BATCH, round_prompt_ids

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


# ---- the pool --------------------------------------------------------------------------------------------------


def read_pool(step_dir: Path) -> list[dict]:
    """A pool written by an iteration, without its quantiles (the pure function decides them, not the file)."""
    rows = [json.loads(line) for line in (step_dir / "pool.jsonl").read_text().splitlines() if line.strip()]
    return [{k: v for k, v in r.items() if k != "quantile"} for r in rows]


def pool_metrics(rows: list[dict], n_new: int, quantiles: list[int]) -> dict[str, float]:
    scores, q = torch.tensor([r["score"] for r in rows], dtype=torch.float64), torch.tensor(quantiles)
    top, bottom = q == q.max(), q == q.min()
    return {
        "quark/pool_size": float(len(rows)),
        "quark/top_quantile_size": float(top.sum()),
        "reward/sampled_mean": float(scores[-n_new:].mean()),
        "reward/sampled_max": float(scores[-n_new:].max()),
        "reward/pool_mean": float(scores.mean()),
        "reward/top_quantile_mean": float(scores[top].mean()),
        "reward/bottom_quantile_mean": float(scores[bottom].mean()),
    }


def plan_steps(cfg: QuarkConfig, first_pool: int, n_new: int) -> list[int]:
    """Cumulative optimizer steps at the end of each iteration, [0, s_1, s_1 + s_2, ...]: known before training
    (every sample joins the pool), so one learning-rate schedule spans the run."""
    optim, algo = cfg.optim, cfg.algo
    if first_pool < max(optim.batch_size, algo.n_quantiles):
        raise ConfigError(
            f"config: the first pool holds {first_pool} samples, fewer than optim.batch_size "
            f"({optim.batch_size}) or algo.n_quantiles ({algo.n_quantiles}); sample more "
            "(algo.samples_per_prompt, algo.prompts_per_iteration) or lower them"
        )
    cum = [0]
    for it in range(1, algo.iterations + 1):
        size = first_pool + (it - 1) * n_new
        cum.append(cum[-1] + (optim.steps_per_iteration or optim.epochs * (size // optim.batch_size)))
    return cum


def step_batch(pool_size: int, batch_size: int, seed: int, it: int, j: int) -> list[int]:
    """The pool rows of step j (0-based) of iteration `it`: passes over the pool in orders drawn from (seed,
    iteration, pass), so a resumed run needs only the step number."""
    epoch, position = divmod(j, pool_size // batch_size)
    return batch_schedule(pool_size, batch_size, seed, it * 1_000_003 + epoch)[position]


# ---- the run ---------------------------------------------------------------------------------------------------


@dataclass
class Driver:
    """What the iterations of a run share: config, run directory, reward, prompts, models and counts."""

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
    ref: Any = None
    tokens: ControlTokens | None = None
    queries: int = 0
    tokenized: list = field(default_factory=list)  # pool_tokens of the pool's rows, in pool order

    def sample_scored(self, ids: list[int], token_id: int | None, seed: int, n: int = 1):
        """n samples of each prompt of `ids` from the policy (`token_id` in front; None: none), scored against
        the plain prompts: (rollout, scores [len(ids) * n] float32), prompt-major."""
        cfg, bos, ids = self.cfg, self.tokenizer.bos_token_id, [i for i in ids for _ in range(n)]
        inputs = [with_token(self.prompt_ids[i], token_id, bos) for i in ids]
        kw = {"model_cfg": cfg.model, "data": cfg.data, "device": self.device, "seed": seed}
        settings = sampling_settings(cfg.sampling)
        rollout = sample(self.policy, self.tokenizer, inputs, settings, batch_size=SAMPLE_BATCH, **kw)
        scores = score_in_batches(self.reward, [self.prompts[i] for i in ids], rollout.texts)
        if cfg.algo.missing_eos_penalty:  # a response cut off at max_new_tokens is worth less
            scores = scores - cfg.algo.missing_eos_penalty * (~rollout.ended_with_eos.cpu()).float()
        return rollout, scores

    def evaluate(self) -> dict[str, float]:
        """reward/eval_mean: one sample on each of the first algo.eval_prompts prompts with the best token (the
        initial model, before the tokens exist: none), at a seed fixed for the run."""
        n = min(self.cfg.algo.eval_prompts, len(self.prompts))
        if not n:
            return {}
        token = None if self.tokens is None else self.tokens.best_id
        _, scores = self.sample_scored(list(range(n)), token, self.cfg.seed * 100_003 + EVAL_SEED)
        return {"reward/eval_mean": float(scores.mean())}

    def grow(self, it: int) -> tuple[list[dict], dict]:
        """Step 1 of iteration `it`: the new scored samples as pool rows, and their metrics."""
        algo, k = self.cfg.algo, self.cfg.algo.samples_per_prompt
        if it == 1 and algo.pool_init == "data":
            return self.demonstrations(), {}
        ids = round_prompt_ids(len(self.prompts), algo.prompts_per_iteration, self.cfg.seed, it)
        token = None if it == 1 else self.tokens.best_id  # iteration 1 samples the initial model itself
        rollout, scores = self.sample_scored(ids, token, self.cfg.seed * 100_003 + it, k)
        prompts = [(i, plain_json(self.prompts[i])) for i in ids for _ in range(k)]
        rows = [
            {"prompt_index": i, "prompt": p, "response": text, "score": s, "iteration": it}
            for (i, p), text, s in zip(prompts, rollout.texts, scores.tolist())
        ]
        metrics = {"perf/response_length": float(rollout.response_lengths.float().mean())}
        if self.tokens is not None:  # responses that hold a control token (decoded texts drop it)
            written = rollout.response_ids.masked_fill(~rollout.response_mask, -1).cpu()
            has = torch.isin(written, torch.tensor(self.tokens.ids)).any(1)
            metrics["quark/control_token_rate"] = float(has.float().mean())
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
        scores = score_in_batches(self.reward, [r["prompt"] for r in rows], [r["response"] for r in rows])
        return [{**r, "score": s} for r, s in zip(rows, scores.tolist())]

    def pool_of(self, it: int, pool: list[dict] | None) -> tuple[list[dict], dict]:
        """The pool of iteration `it`, the previous one's plus its new samples, and step 1's metrics: read back
        on --resume when it was written, else grown from `pool` (None: the one iteration it - 1 wrote)."""
        step_dir = self.run.dir / f"iter-{it}"
        if self.resume and (step_dir / "pool.jsonl").is_file() and (step_dir / "sample.json").is_file():
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
        write_jsonl_atomic(step_dir / "pool.jsonl", [{**r, "quantile": q} for r, q in zip(rows, quantiles)])
        saved = json.dumps({"queries_total": self.queries, **metrics})  # what --resume reads back
        atomic_write_text(step_dir / "sample.json", saved + "\n")
        return rows, metrics


def train_iteration(d: Driver, loop: Loop, it: int, pool: list[dict], quantiles: list[int], end: int) -> None:
    """Step 3 of iteration `it`: optimizer steps up to `end` on batches of the pool, each row behind its token."""
    optim = d.cfg.optim
    while len(d.tokenized) < len(pool):  # the pool only grows: each row is tokenized once
        d.tokenized.append(pool_tokens(d.tokenizer, pool[len(d.tokenized)], d.cfg))
    start = end - (optim.steps_per_iteration or optim.epochs * (len(pool) // optim.batch_size))
    micro = optim.micro_batch_size or optim.batch_size
    while loop.step < end:
        indices = step_batch(len(pool), optim.batch_size, d.cfg.seed, it, loop.step - start)
        n_tokens = sum(len(d.tokenized[i][1]) for i in indices)
        sums, step_loss = {}, 0.0
        for s in range(0, len(indices), micro):
            rows = indices[s : s + micro]
            tokens = [d.tokens.ids[quantiles[i]] for i in rows]
            batches = collate_pair([d.tokenized[i] for i in rows], tokens, d.tokenizer)
            loss, out = micro_batch_loss(d, *batches, n_tokens)
            check_finite({"loss/quark": loss}, step=loop.step + 1, last_good=loop.last_ckpt)
            loss.backward()
            step_loss += float(loss.detach())
            accumulate_metrics(sums, {k: v for k, v in out.metrics.items() if k != "loss/quark"})
        grad_norm = clip_gradients(d.policy, optim.max_grad_norm)
        check_finite({"loss/grad_norm": grad_norm}, step=loop.step + 1, last_good=loop.last_ckpt)
        optimizer_step(loop.optimizer, loop.scheduler)
        loop.count(tokens=n_tokens, examples=len(indices))
        lr = loop.scheduler.get_last_lr()[0]
        loop.end_step(
            {"loss/quark": step_loss, **metric_means(sums), "loss/grad_norm": grad_norm, "perf/lr": lr},
            perf=lambda counts, seconds: {"perf/tokens_per_s": counts["tokens"] / seconds},
            show={"loss": "loss/quark"},
        )


def end_iteration(d: Driver, loop: Loop, it: int, metrics: dict, times: tuple[float, float]) -> None:
    """Step 4 and the bookkeeping: evaluate, checkpoint (the unit of --resume), snapshot, log the iteration."""
    log, t_eval = d.cfg.logging, time.time()
    metrics |= d.evaluate()
    loop_saved = log.save_every and loop.step % log.save_every == 0 and loop.step < loop.total
    if not loop_saved:  # with the reward calls so far: a resumed run goes on counting from them
        kw = {"optimizer": loop.optimizer, "scheduler": loop.scheduler, "keep": log.keep_checkpoints}
        state = {"queries": d.queries}
        loop.last_ckpt = save_checkpoint(d.run.dir, loop.step, model=d.policy, state=state, **kw)
    if log.snapshot_every and it % log.snapshot_every == 0:
        save_quark_model(d.policy, d.tokenizer, d.tokens, snapshot_dir(d.run.dir, loop.step))
    (t0, t_train), now = times, time.time()
    metrics |= {"quark/iteration": float(it), "reward/queries": float(d.queries)}
    metrics |= {"perf/time_sample": t_train - t0, "perf/time_train": t_eval - t_train}
    metrics |= {"perf/time_eval": now - t_eval, "perf/wall_s": now - d.run.started}
    d.run.logger.log(loop.step, metrics)
    shown = "  ".join(f"{k}={v:.4g}" for k, v in metrics.items() if k.startswith(("reward/", "quark/pool")))
    loop.progress.print(f"{NAME}: iteration {it}  {shown}")


def preflight(cfg: QuarkConfig, *, reward: Any = None) -> None:
    """The checks that need no model or data file, run before anything is loaded or made."""
    require_reward(cfg.algo, reward)
    if cfg.algo.pool_init == "data" and not Path(cfg.algo.init_data_path).exists():
        raise UserError(f"algo.init_data_path '{cfg.algo.init_data_path}' does not exist; give an SFT file")


def setup(cfg: QuarkConfig, resume: bool, overwrite: bool, reward: Any) -> Driver:
    """The prompts, the reward, the run directory, the policy (still the initial model) and its tokenizer."""
    preflight(cfg, reward=reward)
    require_train_path(cfg.data, "prompt")
    resolve_model_path(cfg.model.name_or_path)
    seed_everything(cfg.seed)
    prompts, _ = load_prompts(cfg.data, cfg.algo.prompts_per_iteration or 1)
    policy, tokenizer, device = load_policy(cfg.model)
    if is_peft_model(policy):  # started from a LoRA adapter directory (e.g. a LoRA SFT run): train all of it
        policy = policy.merge_and_unload().requires_grad_(True)
    reward = load_reward(cfg.algo, device) if reward is None else reward
    run = open_run(cfg, NAME, cfg.logging, resume=resume, overwrite=overwrite)
    ids = [conditioned_prompt_ids(tokenizer, p, None, cfg.data.max_prompt_length) for p in prompts]
    amp = mixed_precision(cfg.model, device)
    return Driver(cfg, run, reward, prompts, ids, tokenizer, policy, device, amp, resume)


def train(cfg: QuarkConfig, *, resume: bool = False, overwrite: bool = False, reward: Any = None) -> Path:
    """Run Quark (or reward conditioning); returns RUN/final, the policy with its control tokens and quark.json.

    `reward`: any source with `score(prompts, responses) -> Tensor [B]` (`rlhflab.rewards`); by default the
    reward source(s) of algo.reward_model, combined as algo.reward_combine says.
    """
    algo = cfg.algo
    d = setup(cfg, resume, overwrite, reward)
    # The initial model's reward/eval_mean: what every later one is read against.
    if algo.eval_prompts and not any(r["step"] == 0 for r in read_metrics(d.run.dir / "metrics.jsonl")):
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
    loop = Loop(d.run, NAME, log, cum[-1], d.policy, optimizer, scheduler, resume=resume, state=state)
    d.queries = loop.resumed_state.get("queries", d.queries)
    print(
        f"{NAME}: K = {algo.n_quantiles} reward tokens (best {d.tokens.tokens[-1]}), iterations: "
        f"{algo.iterations}, first pool: {len(pool)}, new samples per iteration: {n_new}, optimizer steps: "
        f"{cum[-1]}, run dir {d.run.dir}"
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
        # 2. quantize the whole pool's rewards: quantile k -> token k
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
    out = save_quark_model(d.policy, d.tokenizer, d.tokens, d.run.dir / "final")
    d.run.close()
    print(
        f"{NAME}: {d.queries} reward queries, {time.time() - d.run.started:.1f} s; saved the policy to {out}"
    )
    return out
