"""Sample, filter by a reward, fine-tune (`rlhflab rs`): rejection-sampling fine-tuning, expert iteration, ReST.

The policy writes its own training data: it samples K responses per prompt, a reward source (`rlhflab.rewards`:
a reward model from `rlhflab rm`, rules, combinations) scores them, and an ordinary SFT run (`rlhflab.stages.sft`)
fine-tunes on the ones the reward ranks best. No value network, no reference forward, no policy gradient: the
filter does the optimizing, and each fine-tuning is a plain supervised run.

algo.mode=rejection_sampling (Touvron et al. 2023, Llama 2, Sec. 3.2.3, "Rejection Sampling fine-tuning"),
each round R of algo.rounds:

    1. sample    K = algo.samples_per_prompt responses per prompt from the round's starting model (Llama 2:
                 "the most recent model"), all scored by the reward; every sample and score goes to
                 RUN/round-R/candidates.jsonl
    2. keep      each prompt's highest-scoring sample (best-of-K, `rlhflab.stages.best_of_n`); algo.pool=true
                 keeps, per prompt, the best sample of all rounds so far: Llama 2 first kept only the previous
                 iteration's "bag" of samples, saw capabilities regress, and from RLHF V4 on pooled the top
                 samples of all prior iterations
    3. train     SFT on the kept samples (RUN/round-R/sft.jsonl) into RUN/round-R/sft, starting from
                 algo.finetune_from: round_start, the model that sampled the round, or initial, model.name_or_path

Which weights Llama 2 fine-tunes each round is not stated in the paper. Its text reads as a chain ("we applied
iterative model updates"; later versions apply PPO "on top of the resulted Rejection Sampling checkpoint before
sampling again"), so round_start is the default. initial is the choice of ReST-EM (Singh et al. 2023, "Beyond
Human Data"), which fine-tunes the base model every iteration to limit drift; pair it with pool=true, or
each round forgets the data of the rounds before. Expert iteration as AlpacaFarm runs it (Dubois et al. 2023:
best-of-n samples of the SFT model, scored by the surrogate reward, then fine-tuned on) is one round:
algo.rounds=1.

algo.mode=rest (Gulcehre et al. 2023, "Reinforced Self-Training (ReST) for Language Modeling", Algorithm 1), each
Grow step g of algo.grow_steps:

    1. grow      K responses per prompt from the current policy, scored by the reward (RUN/grow-g/candidates.jsonl)
    2. improve   for each threshold tau_1 < tau_2 < ... of algo.thresholds: keep the grown samples with
                 R(x, y) >= tau_i (ReST's filter F(x, y; tau) = 1[R(x, y) > tau]; the two agree on continuous
                 rewards, and >= lets quantile 0 keep everything) and fine-tune on them, NLL on the kept
                 responses (ReST's J(theta) = E_{D_g}[F(x, y; tau) L_NLL]), starting from the previous Improve
                 step's model (RUN/grow-g/improve-i/sft)

ReST sets its thresholds in the reward's own units, on a reward model scaled to [0, 1], and picks tau_1 above the
mean reward of the grown set; algo.threshold_kind=reward does that. A learned reward model here has no fixed
scale, so algo.threshold_kind=quantile reads each threshold as a quantile of the grown set's rewards (0.75 keeps
the top quarter). ReST's Grow set also carries the original dataset; here it holds only the policy's samples
(fine-tune on demonstrations with `rlhflab sft` first). ReST stops an Improve step when the reward on held-out
contexts stops improving; here each Improve step is one SFT run of optim.epochs, and reward/eval_mean logs the
model's reward on a fixed set of prompts after each one.

Every fine-tuning (a round; rest: an Improve step) logs one row of RUN/metrics.jsonl at its step: the candidates'
reward (reward/candidates_mean and _max, reward/best_mean the mean best-of-K), the kept data's (reward/kept_mean,
rs/kept, rs/kept_share of the samples), reward/queries (the reward calls for training data since the run began;
the evaluation's calls are measurement and not counted), reward/eval_mean (the new model's own reward, one sample
on each of the first algo.eval_prompts prompts at one fixed seed; step 0 is the initial model), the SFT run's last
loss and FLOP/s, the step's time split and perf/wall_s. A fine-tuning is the unit of --resume: one whose
sft/final and step.json exist is skipped; an unfinished one runs again from its start (its sampling seed is a
function of the round, so it samples the same responses). RUN/final is the last model.

Every sample comes from its own seed, a function of the round and of its row in the round (prompt-major: the K
samples of a prompt are consecutive rows), so a sample does not depend on how the prompts are batched. That is
what lets `torchrun` / `accelerate launch` run it data-parallel (`stages.parallel`): each process samples and
scores its share of the round's prompts (all K samples of each), the shares are gathered in prompt order on every
process, every process builds the same fine-tuning data, and each fine-tuning is a data-parallel SFT run; the
main process alone writes and prints. W processes write the candidates one process writes, and end at its model
up to the order of floating-point additions.

PPO on top, as Llama 2 does after RLHF V4, is the next command, from this run's model:

    rlhflab rs --config configs/rs_tiny.yaml model.name_or_path=runs/sft_tiny/final
    rlhflab ppo --config configs/ppo_tiny.yaml model.name_or_path=runs/rs_tiny/final
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from rlhflab.config import RejectionSamplingConfig, SFTConfig, SFTDataSection
from rlhflab.core.io import atomic_write_text
from rlhflab.core.metrics_log import read_metrics
from rlhflab.core.progress import Progress
from rlhflab.core.seeding import batch_schedule, seed_everything
from rlhflab.errors import ConfigError
from rlhflab.models.loading import load_causal_lm, load_tokenizer
from rlhflab.stages import sft
from rlhflab.stages.best_of_n import score_in_batches
from rlhflab.stages.common import (
    Run,
    copy_model_dir,
    inner_run_logging,
    open_run,
    plain_json,
    resolve_device,
    resolve_model_path,
    snapshot_dir,
    write_jsonl_atomic,
)
from rlhflab.stages.data_source import require_train_path
from rlhflab.stages.on_policy import (
    load_prompts,
    load_reward,
    require_reward,
    row_seeds,
    sample,
    sampling_settings,
)
from rlhflab.stages.parallel import DataParallel
from rlhflab.stages.selection import (
    Candidates,
    Kept,
    above_threshold,
    best_per_prompt,
    pool_best,
    threshold_values,
)

NAME = "rs"
# Sequences per generation batch: bounds memory when a round samples thousands of responses.
SAMPLE_BATCH = 128
# The evaluation's sampling seed offset: the same draws for every model of a run, so that reward/eval_mean moves
# with the model, not with the sampling noise.
EVAL_SEED = 7_919


# ---- sampling, scoring, fine-tuning ---------------------------------------------------------------------------


def preflight(cfg: RejectionSamplingConfig, *, reward: Any = None, world: int = 1) -> None:
    """The checks that need no model or data file, run before anything is loaded or made (`world`: the number of
    data-parallel processes)."""
    require_reward(cfg.algo, reward)
    if world > 1 and cfg.algo.reward_combine == "llama2_gate":
        # The gate whitens over each scoring call's batch; each process would whiten over its share only.
        raise ConfigError(
            f"config: algo.reward_combine=llama2_gate whitens the scores over the whole batch, which is not done "
            f"across processes (WORLD_SIZE={world}); run rs in one process"
        )


def round_prompt_ids(n_prompts: int, per_round: int, seed: int, index: int) -> list[int]:
    """The prompts of round (rest: Grow step) `index`, 1-based: all of them (per_round 0), or the index-th batch
    of a seeded order that reshuffles at each pass over the file (iterative-dpo's schedule)."""
    if not per_round:
        return list(range(n_prompts))
    epoch, position = divmod(index - 1, n_prompts // per_round)
    return batch_schedule(n_prompts, per_round, seed, epoch)[position]


def _sample_scored(
    cfg: RejectionSamplingConfig, model_dir: str, prompts: list, reward, seed: int, seeds: list[int], device
):
    """One response to each of `prompts` from `model_dir` (cut to data.max_prompt_length, under the model's
    autocast), row i from its own seed `seeds[i]`, scored: (rollout, scores [B] float32)."""
    policy = load_causal_lm(model_dir, dtype=cfg.model.dtype, device=str(device)).eval()
    rollout = sample(
        policy,
        load_tokenizer(model_dir),
        prompts,
        sampling_settings(cfg.sampling),
        model_cfg=cfg.model,
        data=cfg.data,
        device=device,
        batch_size=min(len(prompts), SAMPLE_BATCH),
        seed=seed,
        row_seeds=seeds,
    )
    scores = score_in_batches(reward, prompts, rollout.texts)
    if cfg.algo.missing_eos_penalty:  # a response cut off at max_new_tokens is a worse demonstration
        scores = scores - cfg.algo.missing_eos_penalty * (~rollout.ended_with_eos.cpu()).float()
    return rollout, scores


def sample_rows(
    cfg: RejectionSamplingConfig, model_dir: str, prompts: list, reward, seed: int, device, par, k: int = 1
) -> list[tuple[list[str], list[float], list[int]]]:
    """k scored samples of each of `prompts` from `model_dir`, row i of the prompt-major rows (prompt i // k) from
    `row_seeds(seed, ...)[i]`: per prompt, (its k texts, their scores, their response lengths), in prompt order.
    Across processes (`par`) each samples its share of the prompts (`par.shard`) and every process gets the
    whole list (`par.gather`): the rows one process samples."""
    seeds = row_seeds(seed, len(prompts) * k)
    mine = par.shard(list(range(len(prompts))))
    share = []
    if mine:  # more processes than prompts: this one has none
        rows = [prompts[q] for q in mine for _ in range(k)]
        rollout, scores = _sample_scored(
            cfg, model_dir, rows, reward, seed, [seeds[q * k + j] for q in mine for j in range(k)], device
        )
        lengths, values = rollout.response_lengths.tolist(), scores.tolist()
        share = [
            (rollout.texts[p * k : (p + 1) * k], values[p * k : (p + 1) * k], lengths[p * k : (p + 1) * k])
            for p in range(len(mine))
        ]
    return par.gather(share)


def sample_candidates(
    cfg: RejectionSamplingConfig, model_dir: str, prompts: list, ids: list[int], reward, seed, device, par
):
    """K scored samples of each prompt in `ids` from `model_dir` (`sample_rows`, shared out among the processes):
    (Candidates, the samples' metrics), the same on every process."""
    k = cfg.algo.samples_per_prompt
    rows = sample_rows(cfg, model_dir, [prompts[i] for i in ids], reward, seed, device, par, k)
    texts = [t for t, _, _ in rows]
    scores = torch.tensor([s for _, s, _ in rows], dtype=torch.float32).view(len(ids), k)
    lengths = torch.tensor([n for _, _, row in rows for n in row], dtype=torch.float32)
    return Candidates(ids, texts, scores), {
        "reward/candidates_mean": float(scores.mean()),
        "reward/candidates_max": float(scores.max()),
        "reward/best_mean": float(scores.max(dim=1).values.mean()),
        "rs/empty": float(sum(not t.strip() for row in texts for t in row)),
        "perf/response_length": float(lengths.mean()),
    }


def sft_config(cfg: RejectionSamplingConfig, step_dir: Path, start: str) -> SFTConfig:
    """The fine-tuning of one round (rest: Improve step): an SFT run on step_dir/sft.jsonl into step_dir/sft,
    from the weights `start`, with the optim section and the data lengths of `cfg`."""
    return SFTConfig(
        seed=cfg.seed,
        model=dataclasses.replace(cfg.model, name_or_path=start),
        data=SFTDataSection(
            train_path=str(step_dir / "sft.jsonl"),
            max_length=cfg.data.max_length,
            max_prompt_length=cfg.data.max_prompt_length,
        ),
        optim=cfg.optim,
        logging=inner_run_logging(cfg.logging, step_dir / "sft"),
    )


def _sft_metrics(run_dir: Path) -> dict[str, float]:
    """The SFT run's last logged loss, its step count and its last FLOP/s."""
    rows = [r for r in read_metrics(run_dir / "metrics.jsonl") if "loss/sft" in r]
    if not rows:
        return {}
    out = {"sft/loss": rows[-1]["loss/sft"], "sft/steps": float(rows[-1]["step"])}
    flops = [r["perf/flops_per_s"] for r in rows if "perf/flops_per_s" in r]
    if flops:
        out["perf/flops_per_s"] = flops[-1]
    return out


@dataclass
class Driver:
    """What every fine-tuning of a run shares: the run, the reward, the prompts, the label count, the progress
    bar and the processes (`par`: every process drives the same steps, the main one alone writes and prints);
    `finish` is the fine-tune -> evaluate -> save -> log tail of each round or Improve step."""

    cfg: RejectionSamplingConfig
    run: Run
    reward: Any
    prompts: list
    initial: str
    resume: bool
    progress: Progress
    par: DataParallel
    device: torch.device
    queries: int = 0

    def say(self, message: str) -> None:
        if self.par.is_main:
            self.progress.print(message)

    def sample(self, model_dir: str, ids: list[int], seed: int) -> tuple[Candidates, dict]:
        return sample_candidates(
            self.cfg, model_dir, self.prompts, ids, self.reward, seed, self.device, self.par
        )

    def write(self, path: Path, rows: list[dict]) -> None:
        """A JSONL file of the run, written by the main process; every process goes on once it is there."""
        if self.par.is_main:
            write_jsonl_atomic(path, rows)
        self.par.wait()

    def done(self, step_dir: Path) -> bool:
        return self.resume and (step_dir / "sft" / "final").is_dir() and (step_dir / "step.json").is_file()

    def skip(self, step: int, step_dir: Path) -> str:
        """A finished fine-tuning on --resume: its model carries over, and so does the reward-call count."""
        self.queries = int(json.loads((step_dir / "step.json").read_text())["reward/queries"])
        self.say(f"{NAME}: step {step} is finished ({step_dir / 'sft' / 'final'}); skipped")
        self.progress.update(1)
        return str(step_dir / "sft" / "final")

    def evaluate(self, model_dir: str) -> dict[str, float]:
        """reward/eval_mean: one sample on each of the first algo.eval_prompts prompts, at a seed fixed for the run."""
        n = min(self.cfg.algo.eval_prompts, len(self.prompts))
        if not n:
            return {}
        seed = self.cfg.seed * 100_003 + EVAL_SEED
        rows = sample_rows(self.cfg, model_dir, self.prompts[:n], self.reward, seed, self.device, self.par)
        return {"reward/eval_mean": float(torch.tensor([s for _, row, _ in rows for s in row]).mean())}

    def finish(
        self, step: int, step_dir: Path, kept: list[tuple[int, Kept]], start: str, metrics: dict, t0: float
    ) -> str:
        """Fine-tune `start` on the kept samples (SFT), evaluate, save and log step `step`; returns the model. Every
        process runs the SFT (data-parallel itself) and the evaluation; the main one writes, logs and prints."""
        rows = [
            {
                "prompt_index": i,
                "prompt": plain_json(self.prompts[i]),
                "completion": k.text,
                "score": k.score,
                "round": k.round,
            }
            for i, k in kept
        ]
        self.write(step_dir / "sft.jsonl", rows)
        final, t_train = step_dir / "sft" / "final", time.time()
        if len(rows) < self.cfg.optim.batch_size:  # too little kept for one step: the model stays as it is
            self.say(f"{NAME}: step {step} kept {len(rows)} samples, fewer than one batch; unchanged")
            if self.par.is_main:
                copy_model_dir(Path(start), final)
            self.par.wait()
        else:
            sft.train(sft_config(self.cfg, step_dir, start), overwrite=True)  # returns once final is saved
            if self.par.is_main:
                metrics.update(_sft_metrics(step_dir / "sft"))
        t_eval = time.time()
        metrics.update(self.evaluate(str(final)))
        if kept:
            metrics["reward/kept_mean"] = sum(k.score for _, k in kept) / len(kept)
        metrics.update(
            {
                "rs/kept": float(len(rows)),
                "reward/queries": float(self.queries),
                "perf/time_sample": t_train - t0,
                "perf/time_train": t_eval - t_train,
                "perf/time_eval": time.time() - t_eval,
                "perf/wall_s": time.time() - self.run.started,
            }
        )
        if self.par.is_main:
            atomic_write_text(step_dir / "step.json", json.dumps(metrics) + "\n")
            if self.cfg.logging.snapshot_every and step % self.cfg.logging.snapshot_every == 0:
                copy_model_dir(final, snapshot_dir(self.run.dir, step))
            self.run.logger.log(step, metrics)
            shown = "  ".join(f"{k}={v:.4g}" for k, v in metrics.items() if not k.startswith("perf/"))
            self.progress.print(f"{NAME}: step {step}  {shown}")
            self.progress.update(
                1, {k: metrics[k] for k in ("reward/kept_mean", "reward/eval_mean") if k in metrics}
            )
        self.par.wait()
        return str(final)


# ---- the two modes --------------------------------------------------------------------------------------------


def rejection_sampling(d: Driver) -> str:
    """Llama 2's rounds (algo.mode=rejection_sampling); returns the last round's model."""
    algo, model, pool = d.cfg.algo, d.initial, {}
    for rnd in range(1, algo.rounds + 1):
        step_dir = d.run.dir / f"round-{rnd}"
        if d.done(step_dir):
            model = d.skip(rnd, step_dir)
            if algo.pool:  # the pool after a round is that round's fine-tuning data
                pool = {
                    r["prompt_index"]: Kept(r["completion"], r["score"], r["round"]) for r in _read(step_dir)
                }
            continue
        t0 = time.time()
        # 1. sample K responses per prompt from the round's starting model; score them all
        ids = round_prompt_ids(len(d.prompts), algo.prompts_per_round, d.cfg.seed, rnd)
        cands, metrics = d.sample(model, ids, d.cfg.seed * 100_003 + rnd)
        d.queries += cands.scores.numel()
        d.write(step_dir / "candidates.jsonl", cands.rows(d.prompts))
        # 2. keep the best sample per prompt (pool: the best of every round so far)
        best = best_per_prompt(cands, rnd)
        pool = pool_best(pool, best) if algo.pool else best
        kept = sorted(pool.items())
        metrics["rs/kept_share"] = len(kept) / cands.scores.numel()
        metrics["rs/kept_from_earlier_rounds"] = float(sum(k.round < rnd for _, k in kept))
        # 3. fine-tune (SFT) on the kept samples, from the round's starting model or the initial one
        start = model if algo.finetune_from == "round_start" else d.initial
        model = d.finish(rnd, step_dir, kept, start, {"round/index": float(rnd), **metrics}, t0)
    return model


def rest(d: Driver) -> str:
    """ReST's Grow and Improve steps (algo.mode=rest); returns the last Improve step's model."""
    algo, model = d.cfg.algo, d.initial
    n_improve = len(algo.thresholds)
    for g in range(1, algo.grow_steps + 1):
        grow_dir = d.run.dir / f"grow-{g}"
        improve_dirs = [grow_dir / f"improve-{i}" for i in range(1, n_improve + 1)]
        if all(d.done(p) for p in improve_dirs):
            for i, p in enumerate(improve_dirs, 1):
                model = d.skip((g - 1) * n_improve + i, p)
            continue
        t0 = time.time()
        # 1. Grow: K responses per prompt from the current policy, scored (a resumed Grow reads its samples)
        cands, metrics = _grow(d, model, g, grow_dir)
        taus = threshold_values(cands.scores, algo.thresholds, algo.threshold_kind)
        if taus[0] <= metrics["reward/candidates_mean"]:
            d.say(
                f"{NAME}: grow {g}: tau_1 = {taus[0]:.4g} is not above the grown set's mean reward "
                f"{metrics['reward/candidates_mean']:.4g} (ReST picks tau_1 above it)"
            )
        for i, (tau, step_dir) in enumerate(zip(taus, improve_dirs), 1):
            step = (g - 1) * n_improve + i
            if d.done(step_dir):
                model = d.skip(step, step_dir)
                continue
            # 2. Improve i: the grown samples with reward >= tau_i, fine-tuned on from the previous Improve's model
            kept = above_threshold(cands, tau, g)
            row = {"rest/grow": float(g), "rest/improve": float(i), "rest/threshold": tau, **metrics}
            row["rs/kept_share"] = len(kept) / cands.scores.numel()
            model = d.finish(step, step_dir, kept, model, row, t0)
            t0 = time.time()
    return model


def _grow(d: Driver, model: str, g: int, grow_dir: Path) -> tuple[Candidates, dict]:
    """ReST's Grow step g: the scored samples and their metrics, sampled now or read back from an earlier run."""
    path = grow_dir / "candidates.jsonl"
    if d.resume and path.is_file() and (grow_dir / "grow.json").is_file():
        saved = json.loads((grow_dir / "grow.json").read_text())
        d.queries = saved.pop("queries_total")  # the reward calls of the run up to and with this Grow step
        return Candidates.from_rows(_read(grow_dir, "candidates.jsonl")), saved
    ids = round_prompt_ids(len(d.prompts), d.cfg.algo.prompts_per_round, d.cfg.seed, g)
    cands, metrics = d.sample(model, ids, d.cfg.seed * 100_003 + g)
    d.queries += cands.scores.numel()
    if d.par.is_main:  # grow.json after the candidates: a resumed Grow reads both or samples again
        write_jsonl_atomic(path, cands.rows(d.prompts))
        atomic_write_text(grow_dir / "grow.json", json.dumps({"queries_total": d.queries, **metrics}) + "\n")
    d.par.wait()
    return cands, metrics


def _read(step_dir: Path, name: str = "sft.jsonl") -> list[dict]:
    return [json.loads(line) for line in (step_dir / name).read_text().splitlines() if line.strip()]


def train(
    cfg: RejectionSamplingConfig, *, resume: bool = False, overwrite: bool = False, reward: Any = None
) -> Path:
    """Run the rounds (rest: Grow and Improve steps); returns RUN/final, the last model (a plain HF causal LM).

    `reward`: any source with `score(prompts, responses) -> Tensor [B]` (`rlhflab.rewards`); by default the
    reward source(s) of algo.reward_model, combined as algo.reward_combine says.

    Launched in several processes (`torchrun`, `accelerate launch`), each samples its share of every round's
    prompts and runs its share of every SFT step (`stages.parallel`); every process returns RUN/final.
    """
    algo = cfg.algo
    preflight(cfg, reward=reward, world=int(os.environ.get("WORLD_SIZE", "1") or 1))
    par = DataParallel()  # one process, or one of those `accelerate launch` / `torchrun` started
    par.check_batch(cfg.optim.batch_size)  # each fine-tuning's, checked before a round samples
    require_train_path(cfg.data, "prompt")
    initial = resolve_model_path(cfg.model.name_or_path)
    seed_everything(cfg.seed)
    device = par.device if par.device is not None else resolve_device(cfg.model.device)
    with _quiet(not par.is_main):  # the main process reports what loading says
        prompts, _ = load_prompts(cfg.data, algo.prompts_per_round or 1)
        if reward is None:
            reward = load_reward(algo, device)
    run = open_run(cfg, NAME, cfg.logging, resume=resume, overwrite=overwrite, parallel=par)
    steps = algo.rounds if algo.mode == "rejection_sampling" else algo.grow_steps * len(algo.thresholds)
    what = f"{algo.rounds} rounds" if algo.mode == "rejection_sampling" else f"{algo.grow_steps} Grow steps"
    name = getattr(reward, "name", type(reward).__name__)
    if par.is_main:
        print(
            f"{NAME}: mode {algo.mode}, {what}, {algo.samples_per_prompt} samples per prompt of "
            f"{algo.prompts_per_round or len(prompts)} prompts, scored by {name}, run dir {run.dir}"
            + par.describe()
        )
    progress = Progress(steps, NAME, enabled=cfg.logging.progress and par.is_main)
    d = Driver(cfg, run, reward, prompts, initial, resume, progress, par, device)
    # Whether step 0 is evaluated is the main process's reading of the log, shared: all evaluate, or none.
    logged = par.is_main and any(r["step"] == 0 for r in read_metrics(run.dir / "metrics.jsonl"))
    if algo.eval_prompts and par.max(float(par.is_main and not logged)):
        row = d.evaluate(initial)  # the point every later reward/eval_mean is read against
        if par.is_main:
            run.logger.log(0, row)
    model = rejection_sampling(d) if algo.mode == "rejection_sampling" else rest(d)
    progress.close()
    # Save RUN/final: the last fine-tuning's model.
    out = run.dir / "final"
    if par.is_main:
        copy_model_dir(Path(model), out)
        run.final_step = steps
        run.close()
        print(f"{NAME}: {d.queries} reward queries; saved the policy to {out}")
    par.wait()  # RUN/final is there before any process returns
    return out


@contextlib.contextmanager
def _quiet(silent: bool):
    """What the block prints dropped (silent: a process that is not the main one, which speaks for the run)."""
    if not silent:
        yield
        return
    with contextlib.redirect_stdout(io.StringIO()):
        yield
