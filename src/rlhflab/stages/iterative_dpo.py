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
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any

import torch

from rlhflab.config import DataSection, DPOAlgo, DPOConfig, IterativeDPOConfig
from rlhflab.core.io import atomic_write_text
from rlhflab.core.metrics_log import read_metrics
from rlhflab.core.seeding import batch_schedule, seed_everything
from rlhflab.errors import ConfigError, UserError
from rlhflab.feedback import FIRST, SECOND, TIE
from rlhflab.losses.kl import kl_k1
from rlhflab.losses.preference import PREFERENCE_LOSS_TABLE
from rlhflab.losses.utils import masked_sum
from rlhflab.models.loading import load_causal_lm, load_tokenizer
from rlhflab.stages import dpo
from rlhflab.stages.common import (
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
    sample,
    sampling_settings,
)
from rlhflab.stages.online_dpo import ask_feedback
from rlhflab.stages.tournament import ask_tournament, best_worst_rows

NAME = "iterative-dpo"
# Sequences per generation batch: bounds memory when a round samples thousands of responses.
SAMPLE_BATCH = 128


def preflight(cfg: IterativeDPOConfig, *, feedback: Any = None) -> None:
    """The checks that need no model or data file, run before anything is loaded or made."""
    if cfg.algo.mode != "sdpo":
        require_feedback(cfg.algo, feedback)


_LAB_NEEDS_A_SOURCE = (
    "config: algo.feedback=lab asks the lab's simulated annotators, which a stage cannot build (training code "
    "never imports the lab); run `rlhflab iterative-dpo algo.feedback=lab` with a lab model, or pass "
    "train(cfg, feedback=rlhflab.lab.feedback.AnnotatorFeedback(task)) in Python"
)


def labelled_pairs(rollout, labels: torch.Tensor) -> tuple[list[dict], int]:
    """Step 2: (a prompt/chosen/rejected record for each pair labelled 1 (first chosen) or 0 (second chosen),
    the number of decided pairs dropped because a response is empty text: a pairs file holds no empty
    response, so a policy that answers with EOS alone cannot be trained on here as online-dpo can)."""
    rows, empty = [], 0
    for i, label in enumerate(labels.tolist()):
        if label not in (FIRST, SECOND):  # a tie, or no answer (NaN)
            continue
        first, second = rollout.texts[2 * i], rollout.texts[2 * i + 1]
        if not first.strip() or not second.strip():
            empty += 1
            continue
        chosen, rejected = (first, second) if label == FIRST else (second, first)
        rows.append({"prompt": plain_json(rollout.prompts[2 * i]), "chosen": chosen, "rejected": rejected})
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


def _sample(cfg: IterativeDPOConfig, model_dir: str, prompts: list, rnd: int, per_prompt: int, initial: str):
    """Step 1 of round `rnd`: `per_prompt` responses to each of the round's prompts from `model_dir` (rows
    per_prompt * p .. per_prompt * (p + 1) - 1 answer prompt p), and their mean sequence KL from `initial`."""
    algo = cfg.algo
    device = resolve_device(cfg.model.device)
    policy = load_causal_lm(model_dir, dtype=cfg.model.dtype, device=str(device)).eval()
    tokenizer = load_tokenizer(model_dir)
    per_epoch = len(prompts) // algo.prompts_per_round
    epoch, position = divmod(rnd - 1, per_epoch)
    order = batch_schedule(len(prompts), algo.prompts_per_round, cfg.seed, epoch)[position]
    repeated = [prompts[i] for i in order for _ in range(per_prompt)]
    rollout = sample(
        policy,
        tokenizer,
        repeated,
        sampling_settings(cfg.sampling),
        model_cfg=cfg.model,
        data=cfg.data,
        device=device,
        batch_size=min(len(repeated), SAMPLE_BATCH),
        seed=cfg.seed * 100_003 + rnd,  # a function of the round: a resumed round samples the same responses
    )
    if Path(model_dir) == Path(initial):  # round 1 samples the initial model itself
        return rollout, 0.0
    ref = load_causal_lm(initial, dtype=cfg.model.dtype, device=str(device)).eval()
    return rollout, _sequence_kl(policy, ref, rollout, cfg.sampling.temperature)


@torch.no_grad()
def _sequence_kl(policy, ref, rollout, temperature: float) -> float:
    """Mean over the rollout's responses of sum_t [log pi(y_t) - log ref(y_t)] (the k1 estimate of
    KL(pi || ref) per sequence, as PPO logs it), in batches of SAMPLE_BATCH rows."""
    total = 0.0
    for lo in range(0, len(rollout), SAMPLE_BATCH):
        part = rollout.select(torch.arange(lo, min(lo + SAMPLE_BATCH, len(rollout))))
        pol, _ = rollout_logps(policy, part, temperature)
        base, _ = rollout_logps(ref, part, temperature)
        total += float(masked_sum(kl_k1(pol, base), part.response_mask, dim=-1).sum())
    return total / len(rollout)


def _sample_and_ask(
    cfg: IterativeDPOConfig, model_dir: str, prompts: list, feedback, rnd: int, initial: str
) -> tuple:
    """Steps 1-2 of round `rnd` from `model_dir`: (pair records, per-round feedback metrics)."""
    rollout, kl = _sample(cfg, model_dir, prompts, rnd, 2, initial)
    labels, identical, scores = ask_feedback(feedback, rollout, cfg.algo.feedback_timeout)
    rows, empty = labelled_pairs(rollout, labels)
    metrics = {
        "feedback/pairs_kept": float(len(rows)),
        "feedback/empty_response": float(empty),
        "feedback/ties": float((labels == TIE).sum()),
        "feedback/unanswered": float((labels.isnan() & ~identical).sum()),
        "feedback/identical": float(identical.sum()),
        "perf/response_length": float(rollout.response_lengths.float().mean()),
        "kl/sequence": kl,
    }
    if rollout.mean_entropy() is not None:  # the round's starting policy's entropy per sampled token
        metrics["loss/entropy_rollout"] = rollout.mean_entropy()
    if scores is not None:
        both = torch.cat(scores)
        if torch.isfinite(both).any():
            metrics["reward/score"] = float(both[torch.isfinite(both)].mean())
    return rows, metrics


def _sample_and_rank(
    cfg: IterativeDPOConfig, model_dir: str, prompts: list, feedback, rnd: int, round_dir: Path, initial: str
):
    """DNO's steps 1-2 of round `rnd`: K samples per prompt, every pair among them asked, the (best, worst) pair by
    win rate kept when its margin passes; each prompt's tournament written to round_dir/tournament.jsonl.
    Returns (pair records, per-round feedback metrics)."""
    algo, k = cfg.algo, cfg.algo.samples_per_prompt
    rollout, kl = _sample(cfg, model_dir, prompts, rnd, k, initial)
    labels, identical = ask_tournament(feedback, rollout.prompts, rollout.texts, k, algo.feedback_timeout)
    plain = [plain_json(p) for p in rollout.prompts]
    rows, records, metrics = best_worst_rows(plain, rollout.texts, labels, k, algo.min_win_rate_margin)
    write_jsonl_atomic(round_dir / "tournament.jsonl", records)
    asked = ~identical
    metrics.update(
        {
            "feedback/ties": float((labels[asked] == TIE).sum()),
            "feedback/unanswered": float(labels[asked].isnan().sum()),
            "feedback/identical": float(identical.sum()),
            "perf/response_length": float(rollout.response_lengths.float().mean()),
            "kl/sequence": kl,
        }
    )
    if rollout.mean_entropy() is not None:
        metrics["loss/entropy_rollout"] = rollout.mean_entropy()
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


def _feedback_state(path: Path) -> dict | None:
    return torch.load(path, weights_only=False) if path.is_file() else None


def _setup(cfg: IterativeDPOConfig, feedback: Any):
    """The rounds' inputs: (prompts or None, sDPO stages or None, feedback source or None)."""
    if cfg.algo.mode == "sdpo":
        return None, _sdpo_stages(cfg), None
    require_train_path(cfg.data, "prompt")
    if feedback is None:
        feedback = default_feedback(cfg.algo, resolve_device(cfg.model.device), cfg.seed)
    prompts, _ = load_prompts(cfg.data, cfg.algo.prompts_per_round)
    return prompts, None, feedback


def train(
    cfg: IterativeDPOConfig, *, resume: bool = False, overwrite: bool = False, feedback: Any = None
) -> Path:
    """Run the rounds; returns RUN/final (the last round's model, a plain HF causal LM).

    `feedback` (mode=iterative, dno): any source of `rlhflab.feedback`; by default a `RewardFeedback` of the
    reward source(s) in algo.reward_model, or a `PreferenceModelFeedback` of algo.preference_model.
    """
    algo, iterative = cfg.algo, cfg.algo.mode != "sdpo"  # iterative: the rounds sample and ask
    preflight(cfg, feedback=feedback)
    if iterative and feedback is None and algo.feedback == "lab":
        raise ConfigError(_LAB_NEEDS_A_SOURCE)
    if cfg.algo.mode == "sdpo" and feedback is not None:
        raise UserError("iterative-dpo: algo.mode=sdpo asks no feedback source; do not pass feedback=")
    initial = resolve_model_path(cfg.model.name_or_path)
    seed_everything(cfg.seed)
    run = open_run(cfg, NAME, cfg.logging, resume=resume, overwrite=overwrite)
    prompts, stages, feedback = _setup(cfg, feedback)
    source = getattr(feedback, "name", type(feedback).__name__) if iterative else f"{cfg.data.pairs_path}"
    print(
        f"{NAME}: mode {algo.mode}, loss {algo.loss}, {algo.rounds} rounds, pairs from {source}, run dir {run.dir}"
    )

    model, queries = initial, 0
    for rnd in range(1, algo.rounds + 1):
        round_dir = run.dir / f"round-{rnd}"
        final = round_dir / "dpo" / "final"
        if resume and final.is_dir():  # a finished round: its model and its label count carry over
            print(f"{NAME}: round {rnd} is finished ({final}); skipped")
            state = _feedback_state(round_dir / "feedback.pt")
            if state is not None:
                feedback.load_state_dict(state)
            queries += json.loads((round_dir / "round.json").read_text()).get("queries", 0)
            model = str(final)
            continue
        # 1-2. sample from the round's starting policy and ask, or take the sDPO stage's pairs
        metrics: dict[str, float] = {}
        t_round = time.time()
        round_queries = 0
        if iterative:
            asked_before = feedback.queries
            if algo.mode == "dno":
                rows, metrics = _sample_and_rank(cfg, model, prompts, feedback, rnd, round_dir, initial)
            else:
                rows, metrics = _sample_and_ask(cfg, model, prompts, feedback, rnd, initial)
            round_queries = feedback.queries - asked_before
            queries += round_queries
            metrics["feedback/queries"] = float(queries)
        else:
            rows = stages[rnd - 1]
            metrics["feedback/pairs_kept"] = float(len(rows))
        write_jsonl_atomic(round_dir / "pairs.jsonl", rows)
        t_train = time.time()
        # 3. offline DPO on the round's pairs, from the round's starting model
        reference = model if algo.reference == "round_start" else initial
        if len(rows) < cfg.optim.batch_size:  # too few decided pairs for one step: the policy stays
            print(f"{NAME}: round {rnd} kept {len(rows)} pairs, fewer than one batch; the model is unchanged")
            copy_model_dir(Path(model), final)
        else:
            dpo.train(dpo_config(cfg, round_dir, model, reference), overwrite=True)
            metrics.update(_dpo_metrics(round_dir / "dpo", algo.loss))
        metrics["perf/time_sample_and_ask"] = t_train - t_round  # sDPO: reading its stage's pairs
        metrics["perf/time_train"] = time.time() - t_train
        if iterative and hasattr(feedback, "state_dict"):
            torch.save(feedback.state_dict(), round_dir / "feedback.pt")
        atomic_write_text(round_dir / "round.json", json.dumps({"queries": round_queries, **metrics}) + "\n")
        model = str(final)
        if cfg.logging.snapshot_every and rnd % cfg.logging.snapshot_every == 0:
            copy_model_dir(final, snapshot_dir(run.dir, rnd))
        run.logger.log(rnd, {"round/index": float(rnd), **metrics})
        shown = "  ".join(f"{k}={v:.4g}" for k, v in metrics.items() if not k.startswith("perf/"))
        print(f"{NAME}: round {rnd}/{algo.rounds}  {shown}")

    # Save RUN/final: the last round's model.
    out = copy_model_dir(Path(model), run.dir / "final")
    run.final_step = algo.rounds
    run.close()
    asked = f"{queries} feedback queries; " if iterative else ""
    print(f"{NAME}: {asked}saved the policy to {out}")
    return out
