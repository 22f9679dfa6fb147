"""Constitutional AI, `rlhflab cai sl|rl` (Bai et al. 2022, "Constitutional AI: Harmlessness from AI Feedback").

No person labels harmfulness: a short list of principles written in natural language (the constitution, a YAML
principles file, `rlhflab.stages.constitution`) does, read by a language model. Each principle has a critique request and
a comparison question; three templates say how a model is asked.

SL-CAI (Sec. 3.1), `rlhflab cai sl`:

    1. sample    one response per prompt from the policy (a helpful model, which also obeys harmful requests)
    2. critique  the critic (by default the policy itself, as in the paper) critiques the response under a principle
                 drawn at random
    3. revise    the critic rewrites the response in the light of its critique; 2-3 repeat algo.revisions times,
                 each round under a fresh principle (an empty revision leaves the response as it was); critiques
                 and revisions are sampled at algo.critic_temperature
    4. train     the `sft` stage fine-tunes sft.model.name_or_path (the policy; the paper fine-tunes the
                 pretrained LM) on (prompt, final revision) pairs, RUN/sft.jsonl, into RUN/sft

RUN/revisions.jsonl holds each prompt's original response, principles, critiques, revisions and final response.
Every prompt goes through the loop, harmful or not: the paper mixes helpfulness samples into the SL data so that
the model does not learn to refuse everything, and a revision of a harmless answer mostly keeps it.

RL-CAI (Sec. 4.1), `rlhflab cai rl`:

    1. sample    two responses per prompt from the policy (the SL-CAI model in the paper)
    2. compare   the feedback model is asked which response is better under a principle drawn at random, as a
                 multiple-choice question whose answer is read from the answer tokens' probabilities, in both
                 orders (`rlhflab.models.judge.LMJudge`): the paper's normalized answer probability. chosen = the
                 side it prefers; exact ties, identical pairs and pairs with an empty response are dropped
    3. rm        the `rm` stage trains a reward model on RUN/pairs.jsonl, into RUN/rm: the paper's preference
                 model on AI labels
    4. ppo       the `ppo` stage optimizes the policy against it with a KL penalty, into RUN/ppo: RL from AI
                 feedback

RUN/pairs.jsonl keeps each pair's principle and the probability of the chosen side (p_chosen). The paper trains
its preference model on these soft labels; the rm stage's Bradley-Terry loss reads the chosen side only.
The trained models are RUN/sft/final (SL) and RUN/ppo/final (RL); RUN/metrics.jsonl has one row of the run's
counts and times. There is no --resume: a run is minutes of sampling and one call of each stage.

Both phases run unchanged under `torchrun` / `accelerate launch` (`stages.parallel`): each process samples its
share of every generation call's batches (responses, critiques, revisions) and asks its share of the feedback
model's comparison calls, each batch exactly as one process would (`stages.cai_sampling`), and every process
gets every result back in order. The principles are drawn from one stream seeded by `seed`, which every process
replays whole. The main process alone writes the files and prints; every process then calls the sft (rm, ppo)
stage, which is data-parallel itself. W processes write the files one process writes, byte for byte, and end at
its models up to the order of floating-point additions.
"""

from __future__ import annotations

import dataclasses
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rlhflab.config import CAIRLConfig, CAISLConfig, LoggingSection, ModelSection
from rlhflab.core.progress import Progress
from rlhflab.core.seeding import seed_everything
from rlhflab.data import PromptRecord, load_records, write_jsonl
from rlhflab.errors import ConfigError, UserError
from rlhflab.stages.cai_sampling import (
    Writer,
    calls,
    critique_and_revise,
    judges_for,
    label_pairs,
    quote,
    sft_rows,
)
from rlhflab.stages.common import open_run, resolve_device, resolve_model_path
from rlhflab.stages.constitution import Constitution, check_answer_tokens, load_constitution
from rlhflab.stages.data_source import load_train_records, require_train_path
from rlhflab.stages.parallel import DataParallel

# What the stage's callers and tests reach as `cai.X`; they live in `stages.cai_sampling`.
__all__ = [
    "Writer",
    "critique_and_revise",
    "judges_for",
    "label_pairs",
    "preflight",
    "quote",
    "resolve_names",
    "rl_stage_configs",
    "sft_rows",
    "sl_sft_config",
    "train",
    "train_rl",
    "train_sl",
]


def _prompts(cfg: CAISLConfig | CAIRLConfig) -> list:
    records = load_train_records(cfg.data, "prompt")
    prompts = [r.prompt if isinstance(r, PromptRecord) else r for r in records]
    return prompts[: cfg.algo.max_prompts] if cfg.algo.max_prompts else prompts


def _open(cfg: CAISLConfig | CAIRLConfig, name: str, overwrite: bool, par: DataParallel):
    logging = LoggingSection(
        output_dir=cfg.logging.output_dir, tensorboard=False, progress=cfg.logging.progress
    )
    return open_run(cfg, name, logging, resume=False, overwrite=overwrite, parallel=par)


def _device(cfg: CAISLConfig | CAIRLConfig, par: DataParallel):
    """This process's device: its own accelerator under a launcher, else model.device."""
    return par.device if par.device is not None else resolve_device(cfg.model.device)


def _write(par: DataParallel, files: dict[Path, list[dict]]) -> None:
    """JSONL files of the run, written by the main process; every process goes on once they are there (the
    stages called next read them)."""
    if par.is_main:
        for path, rows in files.items():
            write_jsonl(rows, path)
    par.wait()


def _stage_logging(section: Any, run_dir: Path, name: str) -> Any:
    return dataclasses.replace(section, output_dir=str(run_dir / name))


def sl_sft_config(cfg: CAISLConfig, run_dir: Path, policy: str):
    """Step 4's SFT config: the sft section with the run's seed, the model to fine-tune (sft.model.name_or_path,
    else the policy), the revisions (RUN/sft.jsonl) and RUN/sft."""
    s = cfg.sft
    return dataclasses.replace(
        s,
        seed=cfg.seed,
        model=dataclasses.replace(s.model, name_or_path=s.model.name_or_path or policy),
        data=dataclasses.replace(s.data, train_path=str(run_dir / "sft.jsonl")),
        logging=_stage_logging(s.logging, run_dir, "sft"),
    )


def _sl_records(cfg: CAISLConfig, constitution, prompts, models: tuple[str, str], critic, par: DataParallel):
    """Steps 1-3 of SL-CAI: (the records of `critique_and_revise`, the seconds step 1 took). `models`: the
    policy's and the critic's directories (the critic's empty: `critic`, else the policy)."""
    algo, device = cfg.algo, _device(cfg, par)
    n_calls = calls(len(prompts), algo.batch_size, par.world) * (
        1 + (2 * algo.revisions if critic is None else 0)
    )
    progress = Progress(n_calls, "cai-sl", enabled=cfg.logging.progress and par.is_main)
    t0 = time.time()
    # 1. sample one response per prompt from the policy
    writer = dict(
        batch_size=algo.batch_size,
        tick=progress.update,
        ask_temperature=algo.critic_temperature,
        par=par,
        device=device,
    )
    policy = Writer(models[0], cfg.model, cfg.sampling, **writer)
    originals = policy.write(
        prompts, cfg.sampling.max_new_tokens, cfg.seed * 1000, cfg.data.max_prompt_length
    )
    if critic is None:
        critic = Writer(models[1], cfg.model, cfg.sampling, **writer) if models[1] else policy
    t_sample = time.time() - t0
    # 2-3. critique and revise, each round under a principle drawn at random (Bai et al. 2022, Sec. 3.1): from
    # one stream seeded by the run's seed, which every process replays whole, so that a prompt's principle does
    # not depend on which process writes its critique.
    records = critique_and_revise(
        prompts,
        originals,
        constitution,
        critic,
        rounds=algo.revisions,
        rng=random.Random(cfg.seed),
        critique_tokens=algo.critique_max_new_tokens,
        revision_tokens=algo.revision_max_new_tokens or cfg.sampling.max_new_tokens,
        seed=cfg.seed,
    )
    progress.close()
    return records, t_sample


def train_sl(cfg: CAISLConfig, *, overwrite: bool = False, critic: Any = None) -> Path:
    """SL-CAI; returns the fine-tuned model's directory (RUN/sft/final). `critic`: anything with
    `ask(questions, max_new_tokens, seed)` to write the critiques and revisions instead of critic_model (across
    processes each asks it every question; the main process's answers are the ones written and trained on)."""
    from rlhflab.stages import sft

    constitution = preflight(cfg)
    par = DataParallel()  # one process, or one of those `accelerate launch` / `torchrun` started
    par.check_batch(cfg.sft.optim.batch_size, "sft.optim.batch_size")  # the SFT's, before minutes of sampling
    require_train_path(cfg.data, "prompt")
    policy_dir = resolve_model_path(cfg.model.name_or_path)
    critic_dir = resolve_model_path(cfg.critic_model) if cfg.critic_model and critic is None else ""
    seed_everything(cfg.seed)
    run = _open(cfg, "cai-sl", overwrite, par)
    prompts, say = _prompts(cfg), par.voice()
    say(
        f"cai-sl: {len(prompts)} prompts, {cfg.algo.revisions} critique-revision round(s) under "
        f"{len(constitution.principles)} principles of {constitution.path}, critic "
        f"{critic_dir or ('given' if critic is not None else 'the policy')}, run dir {run.dir}{par.describe()}"
    )
    t0 = time.time()
    records, t_sample = _sl_records(cfg, constitution, prompts, (policy_dir, critic_dir), critic, par)
    rows = sft_rows(records)
    _write(par, {run.dir / "revisions.jsonl": records, run.dir / "sft.jsonl": rows})
    changed = sum(r["final"] != r["original"] for r in records)
    say(
        f"cai-sl: {changed} of {len(records)} responses changed by revision; {len(rows)} (prompt, revision) pairs "
        f"in {run.dir / 'sft.jsonl'}"
    )
    # 4. fine-tune on the revisions: every process, the sft stage being data-parallel itself
    t2 = time.time()
    final = sft.train(sl_sft_config(cfg, run.dir, policy_dir), overwrite=True)
    run.logger.log(
        1,
        {
            "feedback/prompts": float(len(records)),
            "feedback/revised": changed / max(len(records), 1),
            "feedback/empty_final": float(len(records) - len(rows)),
            "perf/time_sample": t_sample,
            "perf/time_critique_revise": t2 - t0 - t_sample,
            "perf/time_train": time.time() - t2,
        },
    )
    run.close()
    say(f"cai-sl: the SL-CAI model is {final}")
    return final


# ---- RL-CAI --------------------------------------------------------------------------------------------------


def rl_stage_configs(cfg: CAIRLConfig, run_dir: Path, policy: str, rm_data: Path):
    """Steps 3-4's configs: the reward model on `rm_data` (from rm.model.name_or_path, else the policy) into
    RUN/rm; PPO from the policy on data.train_path against RUN/rm/final into RUN/ppo."""
    rm, ppo = cfg.rm, cfg.ppo
    rm_cfg = dataclasses.replace(
        rm,
        seed=cfg.seed,
        model=dataclasses.replace(rm.model, name_or_path=rm.model.name_or_path or policy),
        data=dataclasses.replace(rm.data, train_path=str(rm_data)),
        logging=_stage_logging(rm.logging, run_dir, "rm"),
    )
    ppo_cfg = dataclasses.replace(
        ppo,
        seed=cfg.seed,
        model=dataclasses.replace(ppo.model, name_or_path=policy),
        data=dataclasses.replace(ppo.data, train_path=cfg.data.train_path),
        algo=dataclasses.replace(ppo.algo, reward_model=[str(run_dir / "rm" / "final")]),
        logging=_stage_logging(ppo.logging, run_dir, "ppo"),
    )
    return rm_cfg, ppo_cfg


def _ask_feedback(cfg: CAIRLConfig, constitution: Constitution, policy: Writer, prompts: list, pairs: list):
    """Step 2 with the feedback model (the policy's own weights when feedback_model is empty), each process
    asking its share of the comparison calls (`label_pairs`)."""
    par = policy.par
    if cfg.feedback_model:
        from rlhflab.models.loading import load_causal_lm, load_tokenizer

        path = resolve_model_path(cfg.feedback_model)
        model = load_causal_lm(path, dtype=cfg.model.dtype, device=str(_device(cfg, par)))
        tokenizer = load_tokenizer(path, padding_side="left")
    else:
        path, model, tokenizer = policy.path, policy.model, policy.tokenizer
    check_answer_tokens(constitution, tokenizer, path)
    judges = judges_for(constitution, model, tokenizer, batch_size=cfg.algo.batch_size, name=path)
    # A principle per pair, drawn at random (Bai et al. 2022, Sec. 4.1) from one stream seeded by the run's seed
    # that every process replays whole: pair i's principle whichever process asks about it.
    rng = random.Random(cfg.seed)
    drawn = [rng.choice(constitution.principles).name for _ in prompts]
    return label_pairs(
        prompts, pairs[0::2], pairs[1::2], drawn, judges, batch_size=cfg.algo.batch_size, par=par
    )


def _rl_pairs(
    cfg: CAIRLConfig, constitution: Constitution, prompts: list, policy_dir: str, par: DataParallel
):
    """Steps 1-2 of RL-CAI: (the labelled rows, the feedback statistics, the seconds step 1 took)."""
    algo = cfg.algo
    progress = Progress(
        calls(2 * len(prompts), algo.batch_size, par.world),
        "cai-rl",
        enabled=cfg.logging.progress and par.is_main,
    )
    t0 = time.time()
    # 1. two samples per prompt (rows 2i and 2i + 1 answer prompt i)
    policy = Writer(
        policy_dir,
        cfg.model,
        cfg.sampling,
        algo.batch_size,
        tick=progress.update,
        par=par,
        device=_device(cfg, par),
    )
    doubled = [p for p in prompts for _ in range(2)]
    texts = policy.write(doubled, cfg.sampling.max_new_tokens, cfg.seed * 1000, cfg.data.max_prompt_length)
    progress.close()
    t_sample = time.time() - t0
    # 2. AI feedback under a principle drawn at random
    rows, stats = _ask_feedback(cfg, constitution, policy, prompts, texts)
    return rows, stats, t_sample


def train_rl(cfg: CAIRLConfig, *, overwrite: bool = False) -> Path:
    """RL-CAI; returns the PPO policy's directory (RUN/ppo/final). Across processes each samples and asks its
    share of the calls, the main process writes the pairs, and every process runs the (data-parallel) rm and
    ppo stages; every process returns RUN/ppo/final."""
    from rlhflab.stages import ppo, reward

    constitution = preflight(cfg)
    par = DataParallel()  # one process, or one of those `accelerate launch` / `torchrun` started
    # The called stages' batches, checked before minutes of sampling and judging.
    par.check_batch(cfg.rm.optim.batch_size, "rm.optim.batch_size")
    par.check_batch(cfg.ppo.algo.rollout_batch_size, "ppo.algo.rollout_batch_size")
    require_train_path(cfg.data, "prompt")
    policy_dir = resolve_model_path(cfg.model.name_or_path)
    human = load_records(cfg.helpful_pairs, "pairwise").records if cfg.helpful_pairs else []
    seed_everything(cfg.seed)
    run = _open(cfg, "cai-rl", overwrite, par)
    prompts, say = _prompts(cfg), par.voice()
    say(
        f"cai-rl: {len(prompts)} prompts x 2 samples, compared by {cfg.feedback_model or 'the policy'} under "
        f"{len(constitution.principles)} principles of {constitution.path}"
        + (f", with {len(human)} human helpfulness pairs of {cfg.helpful_pairs}" if human else "")
        + f", run dir {run.dir}{par.describe()}"
    )
    t0 = time.time()
    rows, stats, t_sample = _rl_pairs(cfg, constitution, prompts, policy_dir, par)
    _write(par, {run.dir / "pairs.jsonl": rows})
    shown = "  ".join(f"{k.split('/')[1]}={v:.4g}" for k, v in stats.items())
    say(f"cai-rl: AI feedback {shown}; pairs in {run.dir / 'pairs.jsonl'}")
    if len(rows) < cfg.rm.optim.batch_size:  # every process has the same rows: all stop here
        raise UserError(
            f"cai-rl: the feedback model decided {len(rows)} pairs, fewer than rm.optim.batch_size "
            f"({cfg.rm.optim.batch_size}); use more prompts (algo.max_prompts, data.train_path) or a smaller batch"
        )
    rm_data = run.dir / "pairs.jsonl"
    if human:  # the paper's mix: helpfulness from human labels, harmlessness from the AI's
        rm_data = run.dir / "rm_pairs.jsonl"
        _write(par, {rm_data: [*rows, *human]})
    # 3-4. a reward model on the AI labels (and helpful_pairs' human labels), then PPO against it: every process,
    # the rm and ppo stages being data-parallel themselves
    t2 = time.time()
    rm_cfg, ppo_cfg = rl_stage_configs(cfg, run.dir, policy_dir, rm_data)
    reward.train(rm_cfg, overwrite=True)
    t3 = time.time()
    final = ppo.train(ppo_cfg, overwrite=True)
    stats.update(
        {
            "perf/time_sample": t_sample,
            "perf/time_feedback": t2 - t0 - t_sample,
            "perf/time_rm": t3 - t2,
            "perf/time_ppo": time.time() - t3,
        }
    )
    run.logger.log(1, stats)
    run.close()
    say(f"cai-rl: the RL-CAI policy is {final}")
    return final


# ---- the stage's entry points --------------------------------------------------------------------------------


def preflight(cfg: CAISLConfig | CAIRLConfig) -> Constitution:
    """The checks that need no model: a principles file that parses; returns the constitution."""
    if not cfg.principles:
        raise ConfigError(
            "config: principles is empty; give a YAML principles file, e.g. principles=configs/constitution.yaml "
            "(for the lab's harm task configs/constitution_harm.yaml)"
        )
    return load_constitution(cfg.principles)


def resolve_names(cfg: CAISLConfig | CAIRLConfig, resolve: Callable[[str], str], prompts: str = ""):
    """`cfg` with every model name passed through `resolve` (the command line turns lab:TASK into the lab's base
    model directory) and, when data.train_path is empty, `prompts` as the prompt file."""

    def name(value: str) -> str:
        return resolve(value) if value else value

    def model(section: ModelSection) -> ModelSection:
        return dataclasses.replace(section, name_or_path=name(section.name_or_path))

    fields: dict[str, Any] = {"model": model(cfg.model)}
    if isinstance(cfg, CAISLConfig):
        fields.update(
            critic_model=name(cfg.critic_model), sft=dataclasses.replace(cfg.sft, model=model(cfg.sft.model))
        )
    else:
        fields.update(
            feedback_model=name(cfg.feedback_model),
            rm=dataclasses.replace(cfg.rm, model=model(cfg.rm.model)),
            ppo=dataclasses.replace(cfg.ppo, ref_model=name(cfg.ppo.ref_model)),
        )
    if prompts and not cfg.data.train_path:
        fields["data"] = dataclasses.replace(cfg.data, train_path=prompts)
    return dataclasses.replace(cfg, **fields)


def train(cfg: CAISLConfig | CAIRLConfig, *, resume: bool = False, overwrite: bool = False) -> Path:
    """Run SL-CAI or RL-CAI, as the config's type says."""
    if resume:
        raise UserError("cai runs do not resume; run again with --overwrite")
    if isinstance(cfg, CAISLConfig):
        return train_sl(cfg, overwrite=overwrite)
    return train_rl(cfg, overwrite=overwrite)
