"""Quark's pool (`rlhflab.stages.quark`): the scored samples, shared out among the processes that draw them, and
the pure functions that read, measure and batch it.

Every sample comes from its own seed, a function of the draw's seed and of its row (prompt-major: the k samples of
a prompt are consecutive rows, `on_policy.row_seeds`), so a sample does not depend on which process draws it or
with which other rows. Across processes (`stages.parallel`) each samples and scores its share of the prompts and
the shares are gathered in prompt order on every process: every process holds the pool one process draws, so the
reward quantiles, the control tokens and the batch orders computed from it are the same everywhere.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from rlhflab.config import QuarkConfig
from rlhflab.core.seeding import batch_schedule
from rlhflab.errors import ConfigError
from rlhflab.models.control_tokens import with_token
from rlhflab.stages.best_of_n import score_in_batches
from rlhflab.stages.on_policy import row_seeds, sample, sampling_settings
from rlhflab.stages.rejection_sampling import SAMPLE_BATCH


def sample_rows(d, ids: list[int], token_id: int | None, seed: int, n: int = 1) -> list[tuple]:
    """n samples of each prompt of `ids` from the policy of `d` (a `quark.Driver`; `token_id` in front, None: none),
    scored against the plain prompts, row i of the prompt-major rows from `row_seeds(seed, ...)[i]`: per row (text,
    score, response length, whether the response holds a control token), prompt-major, on every process. Each
    process samples its share of the prompts (`par.shard`), gathered in prompt order (`par.gather`)."""
    seeds = row_seeds(seed, len(ids) * n)
    mine = d.par.shard(list(range(len(ids))))
    share: list[list[tuple]] = []
    if mine:  # more processes than prompts: this one has none
        rows = [ids[q] for q in mine for _ in range(n)]
        inputs = [with_token(d.prompt_ids[i], token_id, d.tokenizer.bos_token_id) for i in rows]
        kw = {"model_cfg": d.cfg.model, "data": d.cfg.data, "device": d.device, "seed": seed}
        mine_seeds = [seeds[q * n + j] for q in mine for j in range(n)]
        settings = sampling_settings(d.cfg.sampling)
        rollout = sample(
            d.policy, d.tokenizer, inputs, settings, batch_size=SAMPLE_BATCH, row_seeds=mine_seeds, **kw
        )
        scores = score_in_batches(d.reward, [d.prompts[i] for i in rows], rollout.texts)
        if d.cfg.algo.missing_eos_penalty:  # a response cut off at max_new_tokens is worth less
            scores = scores - d.cfg.algo.missing_eos_penalty * (~rollout.ended_with_eos.cpu()).float()
        has = torch.zeros(len(rows), dtype=torch.bool)
        if d.tokens is not None:  # responses that hold a control token (decoded texts drop it)
            written = rollout.response_ids.masked_fill(~rollout.response_mask, -1).cpu()
            has = torch.isin(written, torch.tensor(d.tokens.ids)).any(1)
        flat = list(zip(rollout.texts, scores.tolist(), rollout.response_lengths.tolist(), has.tolist()))
        share = [flat[p * n : (p + 1) * n] for p in range(len(mine))]
    return [row for group in d.par.gather(share) for row in group]


def score_rows(d, rows: list[dict]) -> list[dict]:
    """`rows` (prompt, response) with their reward as "score", in order, on every process: each process scores
    its share (`par.shard`), gathered back (`par.gather`)."""
    mine = d.par.shard(rows)
    scores = (
        score_in_batches(d.reward, [r["prompt"] for r in mine], [r["response"] for r in mine]) if mine else []
    )
    return d.par.gather([{**r, "score": float(s)} for r, s in zip(mine, list(scores))])


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
