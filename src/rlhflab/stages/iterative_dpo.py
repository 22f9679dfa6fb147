"""Iterative DPO, sDPO and DNO (`rlhflab iterative-dpo`): rounds of offline DPO, each from the previous round's model.

Online DPO takes one optimizer step per batch of fresh pairs. Iterative DPO sits between it and offline DPO:
each round labels a whole batch of the current policy's pairs and trains an ordinary offline DPO run on
them (Xu et al. 2023, "Some things are more CRINGE than others: Iterative preference optimization with the
pairwise cringe loss"; the Llama 3 post-training rounds). algo.mode=iterative, each round R:

    1. sample    two responses to each of algo.prompts_per_round prompts from the round's starting policy
    2. ask       the feedback source (the keys and semantics of online-dpo: `rlhflab.feedback`); identical pairs,
                 ties and unanswered pairs are dropped; the labelled pairs go to RUN/round-R/pairs.jsonl as
                 prompt/chosen/rejected records
    3. train     `rlhflab.stages.dpo.train` on that file into RUN/round-R/dpo, from the round's starting model,
                 against algo.reference: round_start (the round's starting policy) or initial (the first model)

algo.mode=sdpo (Kim et al. 2024, "sDPO: Don't Use Your Data All at Once") skips steps 1-2: data.pairs_path is
split in file order into algo.rounds contiguous stages, and stage R trains against stage R-1's model.

algo.mode=dno (Rosset et al. 2024, "Direct Nash Optimization", Algorithm 2, DNO-Prct) optimizes against a general
preference, which need not come from a reward: step 1 samples algo.samples_per_prompt (K) responses per prompt;
step 2 asks the feedback source about every pair among them (K(K-1)/2 queries per prompt), ranks each prompt's
responses by win rate and keeps the (best, worst) pair when its win-rate margin reaches algo.min_win_rate_margin
(`rlhflab.stages.tournament`, maths in `rlhflab.losses.tournament`; every prompt's tournament goes to
RUN/round-R/tournament.jsonl); step 3 trains against the round's starting policy, DNO's pi_t. With
algo.feedback=preference_model the source is a general preference model from `rlhflab pm`.

A round is the unit of --resume: a round whose RUN/round-R/dpo/final exists is skipped; an unfinished round
runs again from its start (its sampling seed and the feedback source's saved state make it the same round).
Each round logs one row of RUN/metrics.jsonl at step R (feedback/queries: the pairs asked since the run
began, the label budget; pairs kept, ties, the samples' entropy and sequence KL from the initial model, the
DPO run's last loss, accuracy and FLOP/s, the round's time split), saves RUN/snapshots/step-R
every logging.snapshot_every rounds, and RUN/final is the last round's model.

Every response comes from its own seed, a function of the round and of its row in the round (prompt-major: a
prompt's responses are consecutive rows), so it does not depend on how the prompts are batched. That is what lets
`torchrun` / `accelerate launch` run it data-parallel (`stages.parallel`): each process samples its share of the
round's prompts (all responses of each) and asks the feedback source about their pairs, the shares are gathered in
prompt order on every process, every process builds the same pairs, and each round's DPO run is data-parallel; the
main process alone writes and prints. Sources that draw their labels from one random stream (feedback_mode=
bradley_terry, the lab's annotators) and people (feedback=human) are refused across processes.
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

from rlhflab.config import DataSection, DPOAlgo, DPOConfig, IterativeDPOConfig
from rlhflab.core.io import atomic_write_text
from rlhflab.core.metrics_log import read_metrics
from rlhflab.core.seeding import seed_everything
from rlhflab.errors import ConfigError, UserError
from rlhflab.feedback import FIRST, SECOND, TIE
from rlhflab.losses.kl import kl_k1
from rlhflab.losses.preference import PREFERENCE_LOSS_TABLE
from rlhflab.losses.utils import masked_sum
from rlhflab.models.loading import load_causal_lm, load_tokenizer
from rlhflab.stages import dpo
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
from rlhflab.stages.critic_free import rollout_logps
from rlhflab.stages.data_source import load_train_records, require_train_path
from rlhflab.stages.on_policy import (
    default_feedback,
    load_prompts,
    require_feedback,
    row_seeds,
    sample,
    sampling_settings,
)
from rlhflab.stages.online_dpo import ask_feedback
from rlhflab.stages.parallel import DataParallel
from rlhflab.stages.rejection_sampling import round_prompt_ids
from rlhflab.stages.tournament import ask_tournament, best_worst_rows

NAME = "iterative-dpo"
# Sequences per generation batch: bounds memory when a round samples thousands of responses.
SAMPLE_BATCH = 128


def preflight(cfg: IterativeDPOConfig, *, feedback: Any = None, world: int | None = None) -> None:
    """The checks that need no model or data file, run before anything is loaded or made (`world`: the number of
    data-parallel processes, by default WORLD_SIZE's)."""
    if cfg.algo.mode == "sdpo":
        return
    world = int(os.environ.get("WORLD_SIZE", "1") or 1) if world is None else world
    # Each process asks about its share of the pairs: a source that draws labels from one random stream would
    # give labels that depend on the number of processes, and people answer through one queue.
    algo, drawn = cfg.algo, getattr(feedback, "mode", cfg.algo.feedback_mode) == "bradley_terry"
    why = {
        "human": "asks people through one labelling queue",
        "lab": "draws the simulated annotators' labels from one random stream",
    }.get(algo.feedback, "draws labels from one random stream (feedback_mode=bradley_terry)" if drawn else "")
    if world > 1 and why:
        raise ConfigError(
            f"config: algo.feedback={algo.feedback} {why}, which is not shared across processes "
            f"(WORLD_SIZE={world}); run iterative-dpo in one process"
            + (" or use algo.feedback_mode=argmax" if algo.feedback not in ("human", "lab") else "")
        )
    require_feedback(cfg.algo, feedback)


_LAB_NEEDS_A_SOURCE = (
    "config: algo.feedback=lab asks the lab's simulated annotators, which a stage cannot build (training code "
    "never imports the lab); run `rlhflab iterative-dpo algo.feedback=lab` with a lab model, or pass "
    "train(cfg, feedback=rlhflab.lab.feedback.AnnotatorFeedback(task)) in Python"
)


def labelled_pairs(prompts: list, texts: list[str], labels: torch.Tensor) -> tuple[list[dict], int]:
    """Step 2: pair i is prompts[i] with texts 2i (first) and 2i + 1 (second). Returns (a prompt/chosen/rejected
    record for each pair labelled 1 (first chosen) or 0 (second chosen), the number of decided pairs dropped
    because a response is empty text: a pairs file holds no empty response, so a policy that answers with EOS
    alone cannot be trained on here as online-dpo can)."""
    rows, empty = [], 0
    for i, label in enumerate(labels.tolist()):
        if label not in (FIRST, SECOND):  # a tie, or no answer (NaN)
            continue
        first, second = texts[2 * i], texts[2 * i + 1]
        if not first.strip() or not second.strip():
            empty += 1
            continue
        chosen, rejected = (first, second) if label == FIRST else (second, first)
        rows.append({"prompt": plain_json(prompts[i]), "chosen": chosen, "rejected": rejected})
    return rows, empty


def dpo_config(cfg: IterativeDPOConfig, round_dir: Path, model: str, reference: str) -> DPOConfig:
    """Round R's offline DPO run: the loss and its hyperparameters, the optim section, the round's pairs,
    `model` as the policy and `reference` as ref_model (empty for a reference-free loss)."""
    loss_keys = {f.name for f in dataclasses.fields(DPOAlgo)} - {"precompute_ref_logps"}
    uses_ref = PREFERENCE_LOSS_TABLE[cfg.algo.loss].reference
    return DPOConfig(
        seed=cfg.seed,
        model=dataclasses.replace(cfg.model, name_or_path=model),
        ref_model=reference if uses_ref else "",
        data=DataSection(
            train_path=str(round_dir / "pairs.jsonl"),
            max_length=cfg.data.max_length,
            max_prompt_length=cfg.data.max_prompt_length,
        ),
        optim=cfg.optim,
        logging=inner_run_logging(cfg.logging, round_dir / "dpo"),
        algo=DPOAlgo(**{k: getattr(cfg.algo, k) for k in loss_keys}),
    )


def _sdpo_stages(cfg: IterativeDPOConfig) -> list[list[dict]]:
    """sDPO: data.pairs_path split in file order into algo.rounds contiguous stages of near-equal size."""
    data = DataSection(
        train_path=cfg.data.pairs_path,
        split=cfg.data.split,
        skip_bad_records=cfg.data.skip_bad_records,
        max_length=cfg.data.max_length,
        max_prompt_length=cfg.data.max_prompt_length,
    )
    records = load_train_records(data, "pairwise")
    n, k = len(records), cfg.algo.rounds
    if n < k * cfg.optim.batch_size:
        raise ConfigError(
            f"config: data.pairs_path has {n} pairs, fewer than algo.rounds ({k}) x optim.batch_size "
            f"({cfg.optim.batch_size}); lower one of them or add pairs"
        )
    rows = [
        {key: plain_json(v) for key, v in dataclasses.asdict(r).items() if v is not None} for r in records
    ]
    bounds = [round(i * n / k) for i in range(k + 1)]
    return [rows[bounds[i] : bounds[i + 1]] for i in range(k)]


def _sample(cfg: IterativeDPOConfig, model_dir: str, rows: list, seeds: list[int], initial: str, device):
    """Step 1: one response to each of `rows` (prompts, each repeated per_prompt times) from `model_dir`, row i
    from its own seed `seeds[i]`, and each response's sequence KL from `initial` (None when `model_dir` is it)."""
    policy = load_causal_lm(model_dir, dtype=cfg.model.dtype, device=str(device)).eval()
    rollout = sample(
        policy,
        load_tokenizer(model_dir),
        rows,
        sampling_settings(cfg.sampling),
        model_cfg=cfg.model,
        data=cfg.data,
        device=device,
        batch_size=min(len(rows), SAMPLE_BATCH),
        seed=seeds[0],
        row_seeds=seeds,
    )
    if Path(model_dir) == Path(initial):  # round 1 samples the initial model itself
        return rollout, None
    ref = load_causal_lm(initial, dtype=cfg.model.dtype, device=str(device)).eval()
    return rollout, _sequence_kl(policy, ref, rollout, cfg.sampling.temperature)


@torch.no_grad()
def _sequence_kl(policy, ref, rollout, temperature: float) -> torch.Tensor:
    """Per response of the rollout, sum_t [log pi(y_t) - log ref(y_t)] (the k1 estimate of KL(pi || ref) per
    sequence, as PPO logs it) [B], in batches of SAMPLE_BATCH rows."""
    out = []
    for lo in range(0, len(rollout), SAMPLE_BATCH):
        part = rollout.select(torch.arange(lo, min(lo + SAMPLE_BATCH, len(rollout))))
        pol, _ = rollout_logps(policy, part, temperature)
        base, _ = rollout_logps(ref, part, temperature)
        out.append(masked_sum(kl_k1(pol, base), part.response_mask, dim=-1).float().cpu())
    return torch.cat(out)


def _sample_share(rs: Rounds, model_dir: str, ids: list[int], rnd: int, k: int, ask) -> list[dict]:
    """Steps 1-2 of round `rnd` for the prompts `ids`, k responses each: this process samples its share of them
    (`par.shard`; row i of the round's prompt-major rows from `row_seeds(...)[i]`, so a response does not depend
    on which process samples it, nor on the batching), asks `ask(rollout)` about them (one dict per prompt), and
    every process gets one dict per prompt of the round, in prompt order (`par.gather`): its k texts, response
    lengths, sequence KLs (None in round 1), entropy (sum, count) or None, and what `ask` said."""
    cfg, par = rs.cfg, rs.par
    # A function of the round: a resumed round samples the same responses.
    seeds = row_seeds(cfg.seed * 100_003 + rnd, len(ids) * k)
    mine, share = par.shard(list(range(len(ids)))), []
    if mine:  # more processes than prompts: this one has none
        rows = [rs.prompts[ids[q]] for q in mine for _ in range(k)]
        own = [seeds[q * k + j] for q in mine for j in range(k)]
        rollout, kl = _sample(cfg, model_dir, rows, own, rs.initial, rs.device)
        asked, lengths = ask(rollout), rollout.response_lengths.tolist()
        for p in range(len(mine)):
            span = slice(p * k, (p + 1) * k)
            entropy = None
            if rollout.entropy is not None:  # the round's starting policy's entropy per sampled token
                mask = rollout.response_mask[span]
                entropy = (float(rollout.entropy[span][mask].sum()), float(mask.sum()))
            share.append(
                {
                    "texts": rollout.texts[span],
                    "lengths": lengths[span],
                    "kl": kl[span].tolist() if kl is not None else None,
                    "entropy": entropy,
                    **asked[p],
                }
            )
    return par.gather(share)


def _sample_metrics(shares: list[dict]) -> dict[str, float]:
    """The round's samples: mean response length, mean sequence KL from the initial model, mean entropy."""
    lengths = [n for s in shares for n in s["lengths"]]
    kls = [x for s in shares if s["kl"] is not None for x in s["kl"]]
    out = {
        "perf/response_length": sum(lengths) / len(lengths),
        "kl/sequence": sum(kls) / len(kls) if kls else 0.0,
    }
    entropy = [s["entropy"] for s in shares if s["entropy"] is not None]
    if entropy and sum(c for _, c in entropy):
        out["loss/entropy_rollout"] = sum(e for e, _ in entropy) / sum(c for _, c in entropy)
    return out


def _sample_and_ask(rs: Rounds, model_dir: str, ids: list[int], rnd: int) -> tuple:
    """Steps 1-2 of round `rnd` from `model_dir`: (pair records, per-round feedback metrics)."""

    def ask(rollout) -> list[dict]:  # this process's pairs, one per prompt
        labels, identical, scores = ask_feedback(rs.feedback, rollout, rs.cfg.algo.feedback_timeout)
        first, second = scores if scores is not None else (labels * float("nan"),) * 2
        return [
            {
                "label": labels[p].item(),
                "identical": bool(identical[p]),
                "scores": (first[p].item(), second[p].item()),
            }
            for p in range(len(labels))
        ]

    shares = _sample_share(rs, model_dir, ids, rnd, 2, ask)
    labels = torch.tensor([s["label"] for s in shares], dtype=torch.float32)
    identical = torch.tensor([s["identical"] for s in shares], dtype=torch.bool)
    texts = [t for s in shares for t in s["texts"]]
    rows, empty = labelled_pairs([rs.prompts[i] for i in ids], texts, labels)
    metrics = {
        "feedback/pairs_kept": float(len(rows)),
        "feedback/empty_response": float(empty),
        "feedback/ties": float((labels == TIE).sum()),
        "feedback/unanswered": float((labels.isnan() & ~identical).sum()),
        "feedback/identical": float(identical.sum()),
        **_sample_metrics(shares),
    }
    both = torch.tensor([x for s in shares for x in s["scores"]], dtype=torch.float32)
    if torch.isfinite(both).any():
        metrics["reward/score"] = float(both[torch.isfinite(both)].mean())
    return rows, metrics


def _sample_and_rank(rs: Rounds, model_dir: str, ids: list[int], rnd: int, round_dir: Path):
    """DNO's steps 1-2 of round `rnd`: K samples per prompt, every pair among them asked, the (best, worst) pair by
    win rate kept when its margin passes; each prompt's tournament written to round_dir/tournament.jsonl.
    Returns (pair records, per-round feedback metrics)."""
    algo, k = rs.cfg.algo, rs.cfg.algo.samples_per_prompt

    def ask(rollout) -> list[dict]:  # this process's tournaments, one per prompt
        labels, identical = ask_tournament(
            rs.feedback, rollout.prompts, rollout.texts, k, algo.feedback_timeout
        )
        return [
            {"labels": labels[p].tolist(), "identical": identical[p].tolist()} for p in range(len(labels))
        ]

    shares = _sample_share(rs, model_dir, ids, rnd, k, ask)
    labels = torch.tensor([s["labels"] for s in shares], dtype=torch.float32)
    identical = torch.tensor([s["identical"] for s in shares], dtype=torch.bool)
    plain = [plain_json(rs.prompts[i]) for i in ids for _ in range(k)]
    texts = [t for s in shares for t in s["texts"]]
    rows, records, metrics = best_worst_rows(plain, texts, labels, k, algo.min_win_rate_margin)
    if rs.par.is_main:  # every process goes on once the round's pairs file is written after it
        write_jsonl_atomic(round_dir / "tournament.jsonl", records)
    asked = ~identical
    metrics.update(
        {
            "feedback/ties": float((labels[asked] == TIE).sum()),
            "feedback/unanswered": float(labels[asked].isnan().sum()),
            "feedback/identical": float(identical.sum()),
            **_sample_metrics(shares),
        }
    )
    return rows, metrics


def _dpo_metrics(run_dir: Path, loss: str) -> dict[str, float]:
    """The DPO run's last logged training loss, implicit-reward accuracy and FLOP/s."""
    rows = [r for r in read_metrics(run_dir / "metrics.jsonl") if f"loss/{loss}" in r]
    if not rows:
        return {}
    last = rows[-1]
    out = {"dpo/loss": last[f"loss/{loss}"], "dpo/steps": float(last["step"])}
    if "reward/accuracy" in last:
        out["dpo/accuracy"] = last["reward/accuracy"]
    flops = [r["perf/flops_per_s"] for r in rows if "perf/flops_per_s" in r]
    if flops:  # the DPO run's training FLOP/s (`rlhflab.models.flops`), its last logged value
        out["perf/flops_per_s"] = flops[-1]
    return out


def _setup(cfg: IterativeDPOConfig, feedback: Any, device, par: DataParallel):
    """The rounds' inputs: (prompts or None, sDPO stages or None, feedback source or None)."""
    if cfg.algo.mode == "sdpo":
        return None, _sdpo_stages(cfg), None
    require_train_path(cfg.data, "prompt")
    # The main process reports what loading says.
    with contextlib.redirect_stdout(io.StringIO()) if not par.is_main else contextlib.nullcontext():
        if feedback is None:
            feedback = default_feedback(cfg.algo, device, cfg.seed)
        prompts, _ = load_prompts(cfg.data, cfg.algo.prompts_per_round)
    return prompts, None, feedback


@dataclass
class Rounds:
    """What every round of a run shares (`par`: every process runs every round, the main one alone writes and
    prints)."""

    cfg: IterativeDPOConfig
    run: Run
    par: DataParallel
    device: torch.device
    initial: str
    prompts: list | None  # mode=iterative, dno
    stages: list | None  # mode=sdpo
    feedback: Any

    def say(self, message: str) -> None:
        if self.par.is_main:
            print(message)

    def skip(self, rnd: int, round_dir: Path) -> int:
        """A finished round on --resume: its model carries over, and so does its label count (returned)."""
        self.say(f"{NAME}: round {rnd} is finished ({round_dir / 'dpo' / 'final'}); skipped")
        state = round_dir / "feedback.pt"
        if state.is_file():
            self.feedback.load_state_dict(torch.load(state, weights_only=False))
        return json.loads((round_dir / "round.json").read_text()).get("queries", 0)


def _round(rs: Rounds, rnd: int, model: str, queries: int) -> tuple[dict[str, float], int]:
    """Round `rnd` from the model `model` (`queries`: the labels asked before it): steps 1-3, saved and logged.
    Returns (its metrics, its labels asked)."""
    cfg, algo, par = rs.cfg, rs.cfg.algo, rs.par
    round_dir, t_round = rs.run.dir / f"round-{rnd}", time.time()
    final = round_dir / "dpo" / "final"
    # 1-2. sample from the round's starting policy and ask, or take the sDPO stage's pairs
    metrics: dict[str, float] = {}
    round_queries = 0
    if rs.feedback is not None:
        asked_before = rs.feedback.queries
        ids = round_prompt_ids(len(rs.prompts), algo.prompts_per_round, cfg.seed, rnd)
        if algo.mode == "dno":
            rows, metrics = _sample_and_rank(rs, model, ids, rnd, round_dir)
        else:
            rows, metrics = _sample_and_ask(rs, model, ids, rnd)
        round_queries = int(par.sum(float(rs.feedback.queries - asked_before)))  # each asked about its share
        metrics["feedback/queries"] = float(queries + round_queries)
    else:
        rows = rs.stages[rnd - 1]
        metrics["feedback/pairs_kept"] = float(len(rows))
    if par.is_main:
        write_jsonl_atomic(round_dir / "pairs.jsonl", rows)
    par.wait()
    t_train = time.time()
    # 3. offline DPO on the round's pairs, from the round's starting model; every process runs it (data-parallel)
    reference = model if algo.reference == "round_start" else rs.initial
    if len(rows) < cfg.optim.batch_size:  # too few decided pairs for one step: the policy stays
        rs.say(f"{NAME}: round {rnd} kept {len(rows)} pairs, fewer than one batch; the model is unchanged")
        if par.is_main:
            copy_model_dir(Path(model), final)
    else:
        dpo.train(dpo_config(cfg, round_dir, model, reference), overwrite=True)
        if par.is_main:
            metrics.update(_dpo_metrics(round_dir / "dpo", algo.loss))
    metrics["perf/time_sample_and_ask"] = t_train - t_round  # sDPO: reading its stage's pairs
    metrics["perf/time_train"] = time.time() - t_train
    if par.is_main:
        if rs.feedback is not None and hasattr(rs.feedback, "state_dict"):
            torch.save(rs.feedback.state_dict(), round_dir / "feedback.pt")
        atomic_write_text(round_dir / "round.json", json.dumps({"queries": round_queries, **metrics}) + "\n")
        if cfg.logging.snapshot_every and rnd % cfg.logging.snapshot_every == 0:
            copy_model_dir(final, snapshot_dir(rs.run.dir, rnd))
        rs.run.logger.log(rnd, {"round/index": float(rnd), **metrics})
        shown = "  ".join(f"{k}={v:.4g}" for k, v in metrics.items() if not k.startswith("perf/"))
        print(f"{NAME}: round {rnd}/{algo.rounds}  {shown}")
    par.wait()  # the round's model and files are there before any process goes on
    return metrics, round_queries


def train(
    cfg: IterativeDPOConfig, *, resume: bool = False, overwrite: bool = False, feedback: Any = None
) -> Path:
    """Run the rounds; returns RUN/final (the last round's model, a plain HF causal LM).

    `feedback` (mode=iterative, dno): any source of `rlhflab.feedback`; by default a `RewardFeedback` of the
    reward source(s) in algo.reward_model, or a `PreferenceModelFeedback` of algo.preference_model.

    Launched in several processes (`torchrun`, `accelerate launch`), each samples and asks about its share of
    every round's prompts and runs its share of every DPO step (`stages.parallel`); every process returns
    RUN/final. A source passed in is asked by every process about its share, so it must judge each pair alone.
    """
    algo, iterative = cfg.algo, cfg.algo.mode != "sdpo"  # iterative: the rounds sample and ask
    preflight(cfg, feedback=feedback)
    if iterative and feedback is None and algo.feedback == "lab":
        raise ConfigError(_LAB_NEEDS_A_SOURCE)
    if cfg.algo.mode == "sdpo" and feedback is not None:
        raise UserError("iterative-dpo: algo.mode=sdpo asks no feedback source; do not pass feedback=")
    par = DataParallel()  # one process, or one of those `accelerate launch` / `torchrun` started
    par.check_batch(cfg.optim.batch_size)  # each round's DPO run's, checked before a round samples
    initial = resolve_model_path(cfg.model.name_or_path)
    seed_everything(cfg.seed)
    device = par.device if par.device is not None else resolve_device(cfg.model.device)
    run = open_run(cfg, NAME, cfg.logging, resume=resume, overwrite=overwrite, parallel=par)
    prompts, stages, feedback = _setup(cfg, feedback, device, par)
    rs = Rounds(cfg, run, par, device, initial, prompts, stages, feedback)
    source = getattr(feedback, "name", type(feedback).__name__) if iterative else f"{cfg.data.pairs_path}"
    rs.say(
        f"{NAME}: mode {algo.mode}, loss {algo.loss}, {algo.rounds} rounds, pairs from {source}, run dir {run.dir}"
        + par.describe()
    )
    model, queries = initial, 0
    for rnd in range(1, algo.rounds + 1):
        round_dir = run.dir / f"round-{rnd}"
        # Whether a round is finished is the main process's reading, shared: all skip it, or none.
        if resume and par.max(float(par.is_main and (round_dir / "dpo" / "final").is_dir())):
            queries += rs.skip(rnd, round_dir)
        else:
            queries += _round(rs, rnd, model, queries)[1]
        model = str(round_dir / "dpo" / "final")

    # Save RUN/final: the last round's model.
    out = run.dir / "final"
    if par.is_main:
        copy_model_dir(Path(model), out)
        run.final_step = algo.rounds
        run.close()
        asked = f"{queries} feedback queries; " if iterative else ""
        print(f"{NAME}: {asked}saved the policy to {out}")
    par.wait()  # RUN/final is there before any process returns
    return out
