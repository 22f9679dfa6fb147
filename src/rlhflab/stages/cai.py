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
"""

from __future__ import annotations

import dataclasses
import random
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from rlhflab.config import CAIRLConfig, CAISLConfig, LoggingSection, ModelSection, SamplingSection
from rlhflab.core.progress import Progress
from rlhflab.core.seeding import seed_everything
from rlhflab.data import PromptRecord, load_records, write_jsonl
from rlhflab.errors import ConfigError, UserError
from rlhflab.rollout.generate import generate
from rlhflab.stages.common import mixed_precision, open_run, resolve_device, resolve_model_path
from rlhflab.stages.constitution import Constitution, check_answer_tokens, load_constitution
from rlhflab.stages.data_source import load_train_records, require_train_path
from rlhflab.stages.on_policy import sampling_settings

# ---- asking a model ------------------------------------------------------------------------------------------


def quote(prompt: Any) -> str:
    """A prompt as a question quotes it: text as is, a one-message chat as its content, a longer chat as
    'role: content' lines."""
    if isinstance(prompt, str):
        return prompt
    if len(prompt) == 1:
        return str(prompt[0].get("content", ""))
    return "\n".join(f"{m.get('role', 'user')}: {m.get('content', '')}" for m in prompt)


class Writer:
    """A causal LM that writes, in batches and sampled: responses to prompts (`write`) and answers to questions
    (`ask`: each question is the user's message of a chat when the tokenizer has a chat template, as instruct
    models and the lab's base models were trained, else raw text)."""

    def __init__(
        self,
        path: str,
        model_cfg: ModelSection,
        sampling: SamplingSection,
        batch_size: int,
        tick: Callable[[], None] = lambda: None,
        ask_temperature: float | None = None,
    ):
        from rlhflab.models.loading import load_causal_lm, load_tokenizer

        device = resolve_device(model_cfg.device)
        self.path, self.batch_size, self.tick = path, batch_size, tick
        self.model = load_causal_lm(path, dtype=model_cfg.dtype, device=str(device)).eval()
        self.tokenizer = load_tokenizer(path)
        self.settings = sampling_settings(sampling)
        self.ask_temperature = ask_temperature or sampling.temperature
        self.amp = mixed_precision(model_cfg, device)

    def write(
        self,
        prompts: Sequence,
        max_new_tokens: int,
        seed: int,
        max_prompt_tokens: int | None = None,
        temperature: float | None = None,
    ) -> list[str]:
        settings = dataclasses.replace(
            self.settings, max_new_tokens=max_new_tokens, temperature=temperature or self.settings.temperature
        )
        texts: list[str] = []
        for i, start in enumerate(range(0, len(prompts), self.batch_size)):
            with self.amp():
                rollout = generate(
                    self.model,
                    self.tokenizer,
                    list(prompts[start : start + self.batch_size]),
                    settings,
                    batch_size=self.batch_size,
                    seed=seed * 100_003 + i,  # a fresh stream per batch, a function of the call's seed
                    max_prompt_tokens=max_prompt_tokens,
                )
            texts += rollout.texts
            self.tick()
        return texts

    def ask(self, questions: Sequence[str], max_new_tokens: int, seed: int) -> list[str]:
        chat = bool(getattr(self.tokenizer, "chat_template", None))
        questions = [[{"role": "user", "content": q}] if chat else q for q in questions]
        return self.write(questions, max_new_tokens, seed, temperature=self.ask_temperature)


def _calls(n: int, batch_size: int) -> int:
    return -(-n // batch_size)


# ---- SL-CAI --------------------------------------------------------------------------------------------------


def critique_and_revise(
    prompts: Sequence,
    responses: Sequence[str],
    constitution: Constitution,
    critic: Any,
    *,
    rounds: int,
    rng: random.Random,
    critique_tokens: int,
    revision_tokens: int,
    seed: int = 0,
) -> list[dict]:
    """Steps 2-3 of SL-CAI: `rounds` critique -> revision rounds over every response (Bai et al. 2022, Sec. 3.1).

    critic: anything with `ask(questions, max_new_tokens, seed) -> list[str]` (a `Writer`). Each round draws one
    principle per prompt with `rng` (in prompt order), asks for every critique, then for every revision of the
    current response given its critique; a non-empty revision becomes the current response. Returns one record
    per prompt: prompt, original, principles, critiques, revisions (one per round) and final.
    """
    quoted = [quote(p) for p in prompts]
    current = list(responses)
    records = [
        {"prompt": p, "original": r, "principles": [], "critiques": [], "revisions": []}
        for p, r in zip(prompts, responses)
    ]
    for rnd in range(rounds):
        drawn = [rng.choice(constitution.principles) for _ in prompts]
        questions = [constitution.critique_question(c, q, r) for c, q, r in zip(drawn, quoted, current)]
        critiques = critic.ask(questions, critique_tokens, seed * 1000 + 2 * rnd + 1)
        questions = [
            constitution.revision_question(c, q, r, k)
            for c, q, r, k in zip(drawn, quoted, current, critiques)
        ]
        revisions = critic.ask(questions, revision_tokens, seed * 1000 + 2 * rnd + 2)
        for i, (principle, critique, revision) in enumerate(zip(drawn, critiques, revisions)):
            records[i]["principles"].append(principle.name)
            records[i]["critiques"].append(critique)
            records[i]["revisions"].append(revision)
            if revision.strip():  # an empty revision: the critic wrote nothing, the response stands
                current[i] = revision
    for record, final in zip(records, current):
        record["final"] = final
    return records


def sft_rows(records: Sequence[dict]) -> list[dict]:
    """The SFT data of SL-CAI: (prompt, final revision) of every record whose final response is not empty."""
    return [{"prompt": r["prompt"], "completion": r["final"]} for r in records if r["final"].strip()]


def _prompts(cfg: CAISLConfig | CAIRLConfig) -> list:
    records = load_train_records(cfg.data, "prompt")
    prompts = [r.prompt if isinstance(r, PromptRecord) else r for r in records]
    return prompts[: cfg.algo.max_prompts] if cfg.algo.max_prompts else prompts


def _open(cfg: CAISLConfig | CAIRLConfig, name: str, overwrite: bool):
    logging = LoggingSection(
        output_dir=cfg.logging.output_dir, tensorboard=False, progress=cfg.logging.progress
    )
    return open_run(cfg, name, logging, resume=False, overwrite=overwrite)


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


def train_sl(cfg: CAISLConfig, *, overwrite: bool = False, critic: Any = None) -> Path:
    """SL-CAI; returns the fine-tuned model's directory (RUN/sft/final). `critic`: anything with
    `ask(questions, max_new_tokens, seed)` to write the critiques and revisions instead of critic_model."""
    from rlhflab.stages import sft

    constitution = preflight(cfg)
    require_train_path(cfg.data, "prompt")
    policy_dir = resolve_model_path(cfg.model.name_or_path)
    critic_dir = resolve_model_path(cfg.critic_model) if cfg.critic_model and critic is None else ""
    seed_everything(cfg.seed)
    run = _open(cfg, "cai-sl", overwrite)
    prompts, algo = _prompts(cfg), cfg.algo
    print(
        f"cai-sl: {len(prompts)} prompts, {algo.revisions} critique-revision round(s) under "
        f"{len(constitution.principles)} principles of {constitution.path}, critic "
        f"{critic_dir or ('given' if critic is not None else 'the policy')}, run dir {run.dir}"
    )
    n_calls = _calls(len(prompts), algo.batch_size) * (1 + (2 * algo.revisions if critic is None else 0))
    progress = Progress(n_calls, "cai-sl", enabled=cfg.logging.progress)
    t0 = time.time()
    # 1. sample one response per prompt from the policy
    writer = dict(batch_size=algo.batch_size, tick=progress.update, ask_temperature=algo.critic_temperature)
    policy = Writer(policy_dir, cfg.model, cfg.sampling, **writer)
    originals = policy.write(
        prompts, cfg.sampling.max_new_tokens, cfg.seed * 1000, cfg.data.max_prompt_length
    )
    if critic is None:
        critic = Writer(critic_dir, cfg.model, cfg.sampling, **writer) if critic_dir else policy
    t1 = time.time()
    # 2-3. critique and revise, each round under a principle drawn at random
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
    del policy, critic  # the models are not needed while SFT trains
    write_jsonl(records, run.dir / "revisions.jsonl")
    rows = sft_rows(records)
    write_jsonl(rows, run.dir / "sft.jsonl")
    changed = sum(r["final"] != r["original"] for r in records)
    print(
        f"cai-sl: {changed} of {len(records)} responses changed by revision; {len(rows)} (prompt, revision) pairs "
        f"in {run.dir / 'sft.jsonl'}"
    )
    # 4. fine-tune on the revisions
    t2 = time.time()
    final = sft.train(sl_sft_config(cfg, run.dir, policy_dir), overwrite=True)
    run.logger.log(
        1,
        {
            "feedback/prompts": float(len(records)),
            "feedback/revised": changed / max(len(records), 1),
            "feedback/empty_final": float(len(records) - len(rows)),
            "perf/time_sample": t1 - t0,
            "perf/time_critique_revise": t2 - t1,
            "perf/time_train": time.time() - t2,
        },
    )
    run.close()
    print(f"cai-sl: the SL-CAI model is {final}")
    return final


# ---- RL-CAI --------------------------------------------------------------------------------------------------


def label_pairs(
    prompts: Sequence,
    first: Sequence[str],
    second: Sequence[str],
    drawn: Sequence[str],
    judges: Mapping[str, Any],
) -> tuple[list[dict], dict[str, float]]:
    """Step 2 of RL-CAI: pair i is judged by judges[drawn[i]] (its principle's question), anything with
    `compare(prompts, first, second)` returning p_first (P(first better), both orders averaged) and consistent
    (the same response picked in both orders), as `LMJudge` does (Bai et al. 2022, Sec. 4.1).

    Identical pairs and pairs with an empty response are not asked; exact ties (p_first == 1/2) are dropped.
    Returns (rows {prompt, chosen, rejected, principle, p_chosen}, statistics under feedback/*)."""
    n = len(prompts)
    asked = [i for i in range(n) if first[i] != second[i] and first[i].strip() and second[i].strip()]
    p_first = torch.full((n,), float("nan"), dtype=torch.float64)
    consistent = torch.zeros(n, dtype=torch.bool)
    for name in dict.fromkeys(drawn[i] for i in asked):  # one batch of questions per principle
        idx = [i for i in asked if drawn[i] == name]
        verdict = judges[name].compare(
            [quote(prompts[i]) for i in idx], [first[i] for i in idx], [second[i] for i in idx]
        )
        p_first[idx] = torch.as_tensor(verdict.p_first, dtype=torch.float64)
        consistent[idx] = torch.as_tensor(verdict.consistent, dtype=torch.bool)
    rows = []
    for i in asked:
        p = float(p_first[i])
        if p == 0.5:  # the judge cannot tell them apart: no preference to learn
            continue
        chosen, rejected = (first[i], second[i]) if p > 0.5 else (second[i], first[i])
        rows.append(
            {
                "prompt": prompts[i],
                "chosen": chosen,
                "rejected": rejected,
                "principle": drawn[i],
                "p_chosen": max(p, 1 - p),
            }
        )
    identical = sum(first[i] == second[i] for i in range(n))
    stats = {
        "feedback/pairs": float(n),
        "feedback/identical": float(identical),
        "feedback/empty_response": float(n - len(asked) - identical),
        "feedback/ties": float(len(asked) - len(rows)),
        "feedback/pairs_kept": float(len(rows)),
        "feedback/confidence": sum(r["p_chosen"] for r in rows) / max(len(rows), 1),
        "feedback/position_consistency": float(consistent[asked].float().mean()) if asked else float("nan"),
    }
    return rows, stats


def judges_for(constitution: Constitution, model, tokenizer, *, batch_size: int, name: str) -> dict[str, Any]:
    """One `LMJudge` per principle over one model: the principle's comparison question, the file's answers."""
    from rlhflab.models.judge import LMJudge

    return {
        p.name: LMJudge(
            model,
            tokenizer,
            template=constitution.comparison_template_for(p),
            answers=constitution.answers,
            scale=(),
            batch_size=batch_size,
            name=f"{name}:{p.name}",
        )
        for p in constitution.principles
    }


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
    """Step 2 with the feedback model (the policy's own weights when feedback_model is empty)."""
    if cfg.feedback_model:
        from rlhflab.models.loading import load_causal_lm, load_tokenizer

        path = resolve_model_path(cfg.feedback_model)
        device = resolve_device(cfg.model.device)
        model = load_causal_lm(path, dtype=cfg.model.dtype, device=str(device))
        tokenizer = load_tokenizer(path, padding_side="left")
    else:
        path, model, tokenizer = policy.path, policy.model, policy.tokenizer
    check_answer_tokens(constitution, tokenizer, path)
    judges = judges_for(constitution, model, tokenizer, batch_size=cfg.algo.batch_size, name=path)
    rng = random.Random(cfg.seed)
    drawn = [rng.choice(constitution.principles).name for _ in prompts]
    return label_pairs(prompts, pairs[0::2], pairs[1::2], drawn, judges)


def train_rl(cfg: CAIRLConfig, *, overwrite: bool = False) -> Path:
    """RL-CAI; returns the PPO policy's directory (RUN/ppo/final)."""
    from rlhflab.stages import ppo, reward

    constitution = preflight(cfg)
    require_train_path(cfg.data, "prompt")
    policy_dir = resolve_model_path(cfg.model.name_or_path)
    human = load_records(cfg.helpful_pairs, "pairwise").records if cfg.helpful_pairs else []
    seed_everything(cfg.seed)
    run = _open(cfg, "cai-rl", overwrite)
    prompts, algo = _prompts(cfg), cfg.algo
    print(
        f"cai-rl: {len(prompts)} prompts x 2 samples, compared by {cfg.feedback_model or 'the policy'} under "
        f"{len(constitution.principles)} principles of {constitution.path}"
        + (f", with {len(human)} human helpfulness pairs of {cfg.helpful_pairs}" if human else "")
        + f", run dir {run.dir}"
    )
    progress = Progress(_calls(2 * len(prompts), algo.batch_size), "cai-rl", enabled=cfg.logging.progress)
    t0 = time.time()
    # 1. two samples per prompt (rows 2i and 2i + 1 answer prompt i)
    policy = Writer(policy_dir, cfg.model, cfg.sampling, algo.batch_size, tick=progress.update)
    doubled = [p for p in prompts for _ in range(2)]
    texts = policy.write(doubled, cfg.sampling.max_new_tokens, cfg.seed * 1000, cfg.data.max_prompt_length)
    progress.close()
    # 2. AI feedback under a principle drawn at random
    t1 = time.time()
    rows, stats = _ask_feedback(cfg, constitution, policy, prompts, texts)
    del policy
    write_jsonl(rows, run.dir / "pairs.jsonl")
    shown = "  ".join(f"{k.split('/')[1]}={v:.4g}" for k, v in stats.items())
    print(f"cai-rl: AI feedback {shown}; pairs in {run.dir / 'pairs.jsonl'}")
    if len(rows) < cfg.rm.optim.batch_size:
        raise UserError(
            f"cai-rl: the feedback model decided {len(rows)} pairs, fewer than rm.optim.batch_size "
            f"({cfg.rm.optim.batch_size}); use more prompts (algo.max_prompts, data.train_path) or a smaller batch"
        )
    # 3-4. a reward model on the AI labels (and helpful_pairs' human labels), then PPO against it
    t2 = time.time()
    rm_data = run.dir / "pairs.jsonl"
    if human:  # the paper's mix: helpfulness from human labels, harmlessness from the AI's
        rm_data = run.dir / "rm_pairs.jsonl"
        write_jsonl([*rows, *human], rm_data)
    rm_cfg, ppo_cfg = rl_stage_configs(cfg, run.dir, policy_dir, rm_data)
    reward.train(rm_cfg, overwrite=True)
    t3 = time.time()
    final = ppo.train(ppo_cfg, overwrite=True)
    stats.update(
        {
            "perf/time_sample": t1 - t0,
            "perf/time_feedback": t2 - t1,
            "perf/time_rm": t3 - t2,
            "perf/time_ppo": time.time() - t3,
        }
    )
    run.logger.log(1, stats)
    run.close()
    print(f"cai-rl: the RL-CAI policy is {final}")
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
