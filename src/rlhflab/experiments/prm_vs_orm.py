"""Process vs outcome supervision for choosing among sampled solutions (`rlhflab experiment prm-vs-orm`).

Lightman et al. (2023, "Let's Verify Step by Step") train two kinds of reward model on a generator's own
solutions: an outcome-supervised reward model (ORM, Sec. 2.5), a classifier of whether the final answer is right,
and a process-supervised one (PRM, Sec. 2.6), a classifier of whether each step is right, read at the step's last
token; a solution's PRM score is the probability that every step is right, the product of its step probabilities.
Picking the best of N samples, the PRM solved more problems than the ORM, which solved more than majority voting
over final answers (Sec. 3, Figure 3); trained on the same samples with the same (synthetic) supervision, the PRM
still won (Sec. 4, Figure 4). Uesato et al. (2022, "Solving math word problems with process- and outcome-based
feedback") compare process- and outcome-supervised reward models for re-ranking on GSM8K.

Here, per seed, on the lab's `arith` task (add 2-4 one-digit numbers step by step, "3 + 5 = 8 , 8 + 2 = 10 ,
answer 10 ."; the SFT policy slips on a step now and then and carries the slip forward):

    1. sft      the pipeline's data and SFT model (`rlhflab run --task arith --methods sft`)
    2. samples  the SFT policy solves `samples.problems` training problems `samples.per_problem` times each.
                Each solution is labelled twice from the hidden gold, which stands in for a careful labeller:
                outcome (the final answer is the true sum) for the ORM, and per step for the PRM. A response's
                steps are its pieces between " , "; a step "a + b = c" is right when it adds the next number to
                the previous stated result correctly (the gold's step labels), the step "answer N ." when N is
                the true sum; labels stop at the first wrong step (Lightman et al. supervise only up to the first
                mistake, Sec. 2.6), so for a right solution both models learn the same thing.
    3. orm, prm `rlhflab rm` from the SFT model with one budget (steps, batch, learning rate): algo.loss=binary
                on the outcome labels, algo.loss=step on the step labels (data.step_separator=' , ')
    4. eval     `eval.samples` (64) SFT samples for each of `eval.problems` held-out problems. For N in 1, 2, 4,
                ..., 64: `eval.subsets` random subsets of N of them (as Lightman et al. estimate their best-of-N
                curves, from subsets of one large sample per problem), each picked from by the ORM, the PRM (product of
                step probabilities, and their minimum), majority voting over final answers, and an oracle that
                picks a right answer whenever the subset has one. Ties count as a uniform draw among the tied.
                Accuracy = the pick's final answer is right, averaged over subsets, with a Student-t 95% interval
                over problems; comparisons are paired per problem.
    5. rl       reported beside the verdict, not in it: GRPO (Shao et al. 2024) from the SFT model against a
                verifiable reward, `rule:arithmetic` (1 when the final answer is the prompt's sum: the rule reads
                the prompt and the response, never the lab's gold), with the pipeline's GRPO budget; its own
                samples (`eval.rl_samples` per held-out problem, 0 skips the arm) are judged like the picks.
                Reinforcement learning with verifiable rewards (Lambert et al. 2024, "Tulu 3", Sec. 6) trains the
                policy instead of choosing among its samples.

The verdict rule (RULE), fixed before the first full run, compares the picks at the largest N with paired
per-problem intervals.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from rlhflab.core.run_dir import prepare_run_dir
from rlhflab.errors import ConfigError
from rlhflab.experiments.result import publish_run

NAME = "prm-vs-orm"
CLAIM = (
    "Choosing the best of N sampled solutions, a process-supervised reward model (per-step labels) picks a right "
    "final answer more often than an outcome-supervised one (final-answer labels on the same samples), which "
    "beats majority voting."
)
SOURCE = (
    "Lightman et al. 2023, Let's Verify Step by Step, Sec. 2.5-2.6 (ORM; PRM read at each step's last token, "
    "product of step probabilities), Sec. 3 Figure 3 (best-of-N: PRM > ORM > majority voting) and Sec. 4 "
    "(process vs outcome supervision of the same samples); Uesato et al. 2022, Solving math word problems with "
    "process- and outcome-based feedback (process- and outcome-supervised reward models for re-ranking)"
)
TASK = "arith"
NS = (1, 2, 4, 8, 16, 32, 64)
SELECTORS = ("orm", "prm_product", "prm_min", "majority", "oracle")
RL_ARM = "grpo_verifier"
TITLES = {
    RL_ARM: "GRPO on rule:arithmetic (own samples)",
    "orm": "ORM",
    "prm_product": "PRM (product)",
    "prm_min": "PRM (min)",
    "majority": "majority vote",
    "oracle": "oracle (any right)",
}
# The verdict's two orderings, (better, worse), compared at the largest N.
ORDERINGS = (("prm_product", "orm"), ("orm", "majority"))
RULE = (
    "At the largest N evaluated (64 by default), per seed: an ordering A > B holds when the 95% interval of the "
    "paired per-problem difference in accuracy (A minus B) lies above 0. reproduced: PRM (product) > ORM and "
    "ORM > majority vote both hold on every seed; partly reproduced: otherwise, if PRM (product)'s accuracy is "
    "above the ORM's on every seed and at least one of the two orderings holds on at least one seed; otherwise "
    "not reproduced. PRM (min), the oracle and the smaller N are reported beside the verdict."
)
STEP_SEPARATOR = " , "
# Budgets, set from the time limit (15 minutes for one seed on 2 CPU cores, base model pretraining included)
# before any run, never tuned on the held-out problems: measured here, the SFT model samples 512 solutions of 32
# tokens in about 1 CPU-second, so the 32,768 evaluation samples cost about a minute, the reward models (two
# epochs of 8,000 solutions) and GRPO about a minute each on idle cores, about 6 minutes in all. The pipeline's
# data: its SFT demonstrations (its default 2,000), its training prompts (GRPO's), and few preference pairs
# (nothing here reads them).
DATA = {"n_sft": 2000, "n_pairs": 64, "n_prompts": 1000, "n_heldout": 64}
SAMPLES = {"problems": 2000, "per_problem": 4}
EVAL = {"problems": 512, "samples": 64, "subsets": 64, "rl_samples": 8}
SECTIONS = {"data": DATA, "samples": SAMPLES, "eval": EVAL}
# Both reward models: the pipeline's reward-model settings (rlhflab.pipeline.DEFAULTS["rm"]), without the Llama 2
# margin (a pairwise notion), 2 epochs of the training solutions.
RM_DEFAULTS = ["algo.margin=none", "optim.epochs=2"]
# What this experiment sets itself in the rm section (the two models differ only in their loss and data).
RM_FIXED = ("algo.loss", "data.step_separator", "data.train_path", "model.name_or_path", "algo.heads")
# The RL arm: the pipeline's GRPO settings (rlhflab.pipeline.DEFAULTS["grpo"]) with the task's response length
# (the longest arith solution is about 30 tokens) against the verifier, on the pipeline's training prompts.
RL_DEFAULTS = ["sampling.max_new_tokens=32"]
RL_FIXED = ("algo.reward_model", "model.name_or_path", "data.train_path")
STAGES = ("sft", "rm", "rl")
# Sequences per generate call and responses per reward-model forward: the lab's models are tiny.
EVAL_BATCH = 512


# --------------------------------------------------------------------------------------------------------
# Configuration: the user's sections, validated (and every stage config built) before any work
# --------------------------------------------------------------------------------------------------------


def user_sections(overrides: Sequence[str]) -> dict[str, Any]:
    """The user's overrides by section: sft (the pipeline's SFT stage), rm (both reward models, so their budget
    stays one), rl (the GRPO arm's stage keys), and data, samples, eval (integers)."""
    from rlhflab.config import parse_overrides

    user = parse_overrides(list(overrides))
    known = (*STAGES, *SECTIONS)
    for key, value in user.items():
        if key not in known:
            raise ConfigError(
                f"{NAME}: unknown section '{key}' in the overrides; sections are {', '.join(known)} "
                "(e.g. rm.optim.epochs=3 or eval.problems=128)"
            )
        if not isinstance(value, dict):
            raise ConfigError(f"{NAME}: '{key}' must be a section of keys ({key}.KEY=VALUE), got {value!r}")
    for name, defaults in SECTIONS.items():
        for key, value in user.get(name, {}).items():
            if key not in defaults:
                known_keys = ", ".join(f"{name}.{k}" for k in defaults)
                raise ConfigError(f"{NAME}: unknown key '{name}.{key}'; known: {known_keys}")
            low = 0 if key == "rl_samples" else 1  # 0 skips the RL arm
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                what = "an integer >= 0" if low == 0 else "a positive integer"
                raise ConfigError(f"{NAME}: '{name}.{key}' must be {what}, got {value!r}")
    why = {
        "rm": "(the ORM and the PRM differ only in their loss and labels, from the SFT model)",
        "rl": "(GRPO from the SFT model on the pipeline's prompts, against rule:arithmetic)",
    }
    for name, fixed in (("rm", RM_FIXED), ("rl", RL_FIXED)):
        flat = _flatten(user.get(name, {}))
        for key in (k for k in fixed if k in flat):
            raise ConfigError(f"{NAME}: {name}.{key} is set by the experiment {why[name]}; leave it out")
    ev = section(user, "eval")
    if ev["samples"] < 2:
        raise ConfigError(f"{NAME}: eval.samples must be >= 2 (best-of-N needs N > 1)")
    if user.get("rl") and not ev["rl_samples"]:
        raise ConfigError(
            f"{NAME}: the rl section configures the RL arm, which eval.rl_samples=0 skips; drop one"
        )
    return user


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def section(user: Mapping[str, Any], name: str) -> dict[str, int]:
    return {**SECTIONS[name], **user.get(name, {})}


def pipeline_overrides(user: Mapping[str, Any]) -> list[str]:
    """The pipeline's overrides: our data sizes, the user's sft section, and a small SFT evaluation (this
    experiment evaluates the SFT policy itself, at N = 1)."""
    data = [f"data.{k}={v}" for k, v in section(user, "data").items()]
    sft = [f"sft.{k}={json.dumps(v)}" for k, v in _flatten(user.get("sft", {})).items()]
    return [*data, *sft, "eval.prompts=16", "eval.samples=1"]


def check_sft(seed_dir: Path, seed: int, task: str, user: Mapping[str, Any]) -> None:
    """Build the pipeline's SFT config from our overrides, so a bad sft.* key fails before any work."""
    from rlhflab.pipeline import _configs, _section, _user_sections

    pipeline_user = _user_sections(None, pipeline_overrides(user))
    run_dir = seed_dir / "sft_run"
    data = {name: run_dir / "data" / f"{name}.jsonl" for name in ("sft", "pairs", "prompts")}
    try:
        _configs(["sft"], run_dir, seed, task, pipeline_user, data, _section(pipeline_user, "eval"))
    except ConfigError as e:
        raise ConfigError(f"{NAME}: section 'sft' (sft.KEY=VALUE): {e}") from None


def rm_configs(seed_dir: Path, seed: int, user: Mapping[str, Any]) -> dict[str, Any]:
    """The ORM's and the PRM's rm-stage configs: the pipeline's rm defaults <- RM_DEFAULTS <- the user's rm
    section <- what differs (loss, data, separator) and where they read and write."""
    from rlhflab.config import STAGE_CONFIGS, build_config, deep_merge, parse_overrides
    from rlhflab.pipeline import DEFAULTS

    sft = seed_dir / "sft_run" / "sft" / "final"
    own = {
        "orm": ["algo.loss=binary", f"data.train_path={seed_dir / 'data' / 'orm.jsonl'}"],
        "prm": ["algo.loss=step", f"data.train_path={seed_dir / 'data' / 'prm.jsonl'}"],
    }
    configs = {}
    for name, layer in own.items():
        merged = deep_merge(parse_overrides([*DEFAULTS["rm"], *RM_DEFAULTS]), user.get("rm", {}))
        merged = deep_merge(merged, parse_overrides([*layer, f"model.name_or_path={sft}"]))
        if name == "prm":
            merged = deep_merge(merged, {"data": {"step_separator": STEP_SEPARATOR}})
        merged = deep_merge(merged, {"seed": seed, "logging": {"output_dir": str(seed_dir / name)}})
        try:
            configs[name] = build_config(STAGE_CONFIGS["rm"], merged)
        except ConfigError as e:
            raise ConfigError(f"{NAME}: section 'rm' (rm.KEY=VALUE): {e}") from None
    return configs


def rl_config(seed_dir: Path, seed: int, user: Mapping[str, Any]):
    """The RL arm's GRPO config: the pipeline's GRPO defaults <- RL_DEFAULTS <- the user's rl section <- the SFT
    model, the pipeline's training prompts and the verifier."""
    from rlhflab.config import STAGE_CONFIGS, build_config, deep_merge, parse_overrides
    from rlhflab.pipeline import DEFAULTS

    run_dir = seed_dir / "sft_run"
    merged = deep_merge(parse_overrides([*DEFAULTS["grpo"], *RL_DEFAULTS]), user.get("rl", {}))
    fixed = {
        "seed": seed,
        "model": {"name_or_path": str(run_dir / "sft" / "final")},
        "data": {"train_path": str(run_dir / "data" / "prompts.jsonl")},
        "algo": {"reward_model": ["rule:arithmetic"]},
        "logging": {"output_dir": str(seed_dir / "rl")},
    }
    try:
        return build_config(STAGE_CONFIGS["grpo"], deep_merge(merged, fixed))
    except ConfigError as e:
        raise ConfigError(f"{NAME}: section 'rl' (rl.KEY=VALUE): {e}") from None


# --------------------------------------------------------------------------------------------------------
# Labels: what the labeller (the hidden gold) says about each training solution
# --------------------------------------------------------------------------------------------------------

_STEP = re.compile(r"(\d+) \+ (\d+) = (\d+)")
_ANSWER = re.compile(r"answer (\d+)")


def _glued(text: str) -> str:
    # The lab's word-level tokenizer decodes 10 as "1 0": glue digit runs back into numbers before parsing.
    return re.sub(r"(?<=\d) (?=\d)", "", " ".join(text.split()))


def final_answer(response: str) -> int | None:
    """The number after the response's last "answer" (what majority voting counts), or None."""
    found = _ANSWER.findall(_glued(response))
    return int(found[-1]) if found else None


def split_steps(response: str) -> list[str]:
    """A response's steps: its pieces between STEP_SEPARATOR, blank ones dropped (as `ProcessReward` splits)."""
    return [piece for piece in response.split(STEP_SEPARATOR) if piece.strip()]


def step_record(prompt: str, response: str, gold_steps: Sequence[bool], outcome: bool) -> tuple[list, list]:
    """(steps, labels) of one solution for the PRM, labels stopping at the first wrong step.

    gold_steps: the gold's labels of the k-1 additions the prompt needs, in order; outcome: the final answer is
    right. A piece "answer N ." is labelled by the outcome, the i-th piece of the form "a + b = c" by the i-th
    gold label (False past the k-1 needed), anything else False. Up to the first wrong piece every earlier piece
    was a well-formed addition, so the i-th such piece is the gold's i-th step."""
    steps, labels, i = split_steps(response), [], 0
    for piece in steps:
        text = _glued(piece)
        if text.startswith("answer"):
            right = outcome
        elif _STEP.fullmatch(text):
            right, i = (gold_steps[i] if i < len(gold_steps) else False), i + 1
        else:
            right = False
        labels.append(bool(right))
        if not right:
            break
    return steps[: len(labels)], labels


def label_solutions(task, samples) -> tuple[list[dict], list[dict]]:
    """The ORM's unpaired records and the PRM's stepwise records of the same solutions (`PolicySamples`)."""
    from rlhflab.lab.gold import step_labels
    from rlhflab.lab.tasks import chat_prompt

    orm, prm = [], []
    for p, responses, outcomes in zip(samples.prompts, samples.responses, samples.components["outcome"]):
        for response, outcome in zip(responses, outcomes):
            steps, labels = step_record(p, response, step_labels(task, p, response), bool(outcome))
            if not steps:  # an empty response: nothing for either model to read
                continue
            orm.append({"prompt": chat_prompt(p), "completion": response, "label": bool(outcome)})
            prm.append({"prompt": chat_prompt(p), "completions": steps, "labels": labels})
    return orm, prm


# --------------------------------------------------------------------------------------------------------
# Best-of-N from subsets of one large sample
# --------------------------------------------------------------------------------------------------------


def subset_indices(n_problems: int, n_samples: int, n: int, n_subsets: int, seed: int) -> np.ndarray:
    """[P, R, n] indices: per problem, R subsets of n of its n_samples samples, each drawn without replacement
    (one subset when n = n_samples: they would all be the same)."""
    rng = np.random.default_rng(seed)
    r = 1 if n == n_samples else n_subsets
    return np.argsort(rng.random((n_problems, r, n_samples)), axis=-1)[..., :n]


def _take(values: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """values [P, M] at idx [P, R, n] -> [P, R, n]."""
    return np.take_along_axis(values[:, None, :], idx, axis=-1)


def pick_accuracy(scores: np.ndarray, correct: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """Per problem [P]: the chance that the best-scored sample of a subset is right, averaged over the subsets
    idx [P, R, n] (scores, correct [P, M]); ties are a uniform draw among the tied best."""
    s, c = _take(scores, idx), _take(correct.astype(bool), idx)
    top = s == s.max(axis=-1, keepdims=True)
    return ((top & c).sum(-1) / top.sum(-1)).mean(axis=1)


def majority_accuracy(answers: np.ndarray, correct: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """Per problem [P]: the chance that the most common final answer of a subset is right (a tie: a uniform draw
    among the tied answers; samples without an answer do not vote; no vote at all is wrong). answers [P, M]
    int (-1 = none); correct [P, M] (right exactly when the answer is the true sum)."""
    p_count = answers.shape[0]
    # Each problem's answers as small ids 0..U-1 (U = its distinct answers), so votes are counted per id.
    ids = np.full(answers.shape, -1)
    right_id = np.full(p_count, -1)
    for p in range(p_count):
        values = sorted({int(a) for a in answers[p] if a >= 0})
        lookup = {a: i for i, a in enumerate(values)}
        ids[p] = [lookup.get(int(a), -1) for a in answers[p]]
        rights = {lookup[int(a)] for a, ok in zip(answers[p], correct[p]) if ok and a >= 0}
        right_id[p] = rights.pop() if rights else -1
    votes = _take(ids, idx)  # [P, R, n]
    counts = np.stack([(votes == u).sum(-1) for u in range(max(1, int(ids.max()) + 1))], axis=-1)
    best = counts.max(-1, keepdims=True)
    winners = (counts == best) & (best > 0)  # [P, R, U]
    won = winners[
        np.arange(p_count)[:, None], np.arange(votes.shape[1])[None, :], np.maximum(right_id, 0)[:, None]
    ]
    acc = np.where((right_id >= 0)[:, None], won / np.maximum(winners.sum(-1), 1), 0.0)
    return acc.mean(axis=1)


def oracle_accuracy(correct: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """Per problem [P]: the chance that a subset holds at least one right sample (pass@n)."""
    return _take(correct.astype(bool), idx).any(-1).mean(axis=1)


def best_of_n(cands: Mapping[str, np.ndarray], ns: Sequence[int], n_subsets: int, seed: int) -> dict:
    """{selector: {n: per-problem accuracy [P]}} on the same subsets for every selector (paired), from the
    candidates' scores ({orm, prm_product, prm_min} [P, M]), answers [P, M] and correct [P, M]."""
    correct, (p_count, m) = cands["correct"], cands["correct"].shape
    out: dict[str, dict[int, np.ndarray]] = {s: {} for s in SELECTORS}
    for k, n in enumerate(ns):
        idx = subset_indices(p_count, m, n, n_subsets, seed * 100 + k)
        for s in ("orm", "prm_product", "prm_min"):
            out[s][n] = pick_accuracy(cands[s], correct, idx)
        out["majority"][n] = majority_accuracy(cands["answers"], correct, idx)
        out["oracle"][n] = oracle_accuracy(correct, idx)
    return out


# --------------------------------------------------------------------------------------------------------
# One seed: SFT, labelled samples, the two reward models, the candidates and their picks
# --------------------------------------------------------------------------------------------------------


def _sample(model, tokenizer, task, prompts: Sequence[str], n: int, seed: int):
    from rlhflab.lab.evaluate import sample_policy

    return sample_policy(model, tokenizer, task, prompts, n_samples=n, seed=seed, batch_size=EVAL_BATCH)


def make_training_data(task, model, tokenizer, seed: int, sizes: Mapping[str, int], out: Path) -> dict:
    """Step 2: SFT solutions of training problems, labelled by outcome (DIR/orm.jsonl) and per step
    (DIR/prm.jsonl); returns their counts and label rates."""
    from rlhflab.data.readers import write_jsonl

    prompts = task.train_prompts(sizes["problems"], seed=seed * 1000 + 77)
    samples = _sample(model, tokenizer, task, prompts, sizes["per_problem"], seed=seed + 3)
    orm, prm = label_solutions(task, samples)
    out.mkdir(parents=True, exist_ok=True)
    write_jsonl(orm, out / "orm.jsonl")
    write_jsonl(prm, out / "prm.jsonl")
    steps = [y for r in prm for y in r["labels"]]
    return {
        "solutions": len(orm),
        "outcome_right": float(np.mean([r["label"] for r in orm])),
        "labelled_steps": len(steps),
        "steps_right": float(np.mean(steps)),
    }


def score_candidates(task, models: Mapping[str, Any], prompts: Sequence[str], n: int, seed: int) -> dict:
    """Step 4's candidates: n SFT samples per held-out problem, with the ORM's logit, the PRM's product and
    minimum of step probabilities, the final answer (-1: none) and whether it is right (gold), each [P, n]."""
    import torch

    from rlhflab.lab.tasks import chat_prompt
    from rlhflab.losses import PRM_AGGREGATES

    samples = _sample(models["sft"], models["tokenizer"], task, prompts, n, seed=seed + 5)
    flat_prompts = [chat_prompt(p) for p in prompts for _ in range(n)]
    flat = [r for rs in samples.responses for r in rs]
    orm = models["orm"].score(flat_prompts, flat).numpy()
    logits = [x[:, 0] for x in models["prm"].step_logits(flat_prompts, flat)]
    padded = torch.nn.utils.rnn.pad_sequence(
        [x if len(x) else torch.zeros(1) for x in logits], batch_first=True
    )
    present = torch.arange(padded.shape[1])[None] < torch.tensor([len(x) for x in logits])[:, None]
    shape = (len(prompts), n)
    return {
        "prompts": list(prompts),
        "responses": samples.responses,
        "orm": orm.reshape(shape),
        "prm_product": PRM_AGGREGATES["product"](padded, present).numpy().reshape(shape),
        "prm_min": PRM_AGGREGATES["min"](padded, present).numpy().reshape(shape),
        "answers": np.array([-1 if (a := final_answer(r)) is None else a for r in flat]).reshape(shape),
        "correct": samples.components["outcome"] > 0.5,
    }


def write_candidates(cands: Mapping[str, Any], path: Path) -> None:
    """Every candidate with its scores, answer and correctness: the evidence behind the table."""
    from rlhflab.data.readers import write_jsonl

    rows = (
        {
            "prompt": p,
            "responses": cands["responses"][i],
            **{k: cands[k][i].tolist() for k in ("orm", "prm_product", "prm_min", "answers", "correct")},
        }
        for i, p in enumerate(cands["prompts"])
    )
    write_jsonl(rows, path)


def _last_eval(run_dir: Path) -> dict[str, float]:
    from rlhflab.core.metrics_log import read_metrics

    rows = [r for r in read_metrics(run_dir / "metrics.jsonl") if "eval/accuracy" in r]
    return {k: v for k, v in rows[-1].items() if k.startswith("eval/")} if rows else {}


def run_rl(
    task, seed: int, seed_dir: Path, user: Mapping[str, Any], prompts: Sequence[str]
) -> dict[str, Any]:
    """Step 5: GRPO against the verifier, then `eval.rl_samples` of its own samples per held-out problem; returns
    the per-problem accuracy and the run's last logged score (the verifier's mean on its rollouts)."""
    from rlhflab.core.metrics_log import read_metrics
    from rlhflab.models.loading import load_causal_lm, load_tokenizer
    from rlhflab.stages import critic_free

    final = critic_free.train(rl_config(seed_dir, seed, user))
    samples = _sample(
        load_causal_lm(final),
        load_tokenizer(final),
        task,
        prompts,
        section(user, "eval")["rl_samples"],
        seed + 11,
    )
    scores = [
        r["reward/score"] for r in read_metrics(seed_dir / "rl" / "metrics.jsonl") if "reward/score" in r
    ]
    return {
        "per_problem": (samples.components["outcome"] > 0.5).mean(axis=1).tolist(),
        "train_score_first": scores[0] if scores else None,
        "train_score_last": scores[-1] if scores else None,
    }


def run_seed(task, seed: int, seed_dir: Path, user: Mapping[str, Any]) -> dict[str, Any]:
    """One seed, steps 1-5; writes SEED_DIR/seed.json (per-problem accuracies) and SEED_DIR/candidates.jsonl."""
    from rlhflab.core.io import atomic_write_text
    from rlhflab.models.loading import load_causal_lm, load_tokenizer
    from rlhflab.pipeline import run_pipeline
    from rlhflab.rewards import LearnedReward
    from rlhflab.stages import reward

    ev = section(user, "eval")
    steps = 5 if ev["rl_samples"] else 4
    prepare_run_dir(seed_dir, "run", resume=False, overwrite=True)
    print(f"[1/{steps}] sft: the pipeline's data and SFT model")
    run_pipeline(
        task=task.name, seed=seed, output_dir=str(seed_dir / "sft_run"), overrides=pipeline_overrides(user),
        overwrite=True, methods=["sft"],
    )  # fmt: skip
    sft_dir = seed_dir / "sft_run" / "sft" / "final"
    models: dict[str, Any] = {"tokenizer": load_tokenizer(sft_dir), "sft": load_causal_lm(sft_dir)}
    print(f"[2/{steps}] samples: SFT solutions of training problems, labelled by outcome and per step")
    samples = section(user, "samples")
    data = make_training_data(task, models["sft"], models["tokenizer"], seed, samples, seed_dir / "data")
    for name, cfg in rm_configs(seed_dir, seed, user).items():
        kind = "outcome (final answer)" if name == "orm" else "process (per step)"
        print(f"[3/{steps}] {name}: {kind} reward model")
        reward.train(cfg)
        models[name] = LearnedReward.from_pretrained(seed_dir / name / "final", batch_size=EVAL_BATCH)
    print(f"[4/{steps}] eval: {ev['samples']} samples of {ev['problems']} held-out problems, best-of-N")
    prompts = task.heldout_prompts(ev["problems"], seed=seed)
    cands = score_candidates(task, models, prompts, ev["samples"], seed)
    write_candidates(cands, seed_dir / "candidates.jsonl")
    per_problem = best_of_n(cands, [n for n in NS if n <= ev["samples"]], ev["subsets"], seed)
    result = {
        "data": data,
        "models": {"orm": _last_eval(seed_dir / "orm"), "prm": _last_eval(seed_dir / "prm")},
        "per_problem": {s: {str(n): a.tolist() for n, a in by_n.items()} for s, by_n in per_problem.items()},
        "sft_per_problem": cands["correct"]
        .mean(axis=1)
        .tolist(),  # the SFT policy's accuracy, all its samples
    }
    if ev["rl_samples"]:
        print(f"[5/{steps}] rl: GRPO against rule:arithmetic (reported beside the verdict)")
        result["rl"] = run_rl(task, seed, seed_dir, user, prompts)
    atomic_write_text(seed_dir / "seed.json", json.dumps(result, indent=2) + "\n")
    return result


# --------------------------------------------------------------------------------------------------------
# Table, verdict, findings
# --------------------------------------------------------------------------------------------------------


def _ci(values: Sequence[float]) -> tuple[float, float]:
    """(mean, half-width of its Student-t 95% interval) over problems."""
    from rlhflab.eval import metrics as M

    mean, lo, hi = M.mean_ci95(values)
    return mean, (hi - lo) / 2


def seed_rows(seed: int, result: Mapping[str, Any]) -> list[dict]:
    """One row per selector and N, one per ordering of ORDERINGS and N (the paired difference, and whether its
    interval lies above 0), the RL arm's when it ran, one per reward model (its held-out metrics on its own
    labels) and one for the training solutions."""
    acc = {s: {int(n): np.asarray(v) for n, v in by_n.items()} for s, by_n in result["per_problem"].items()}
    ns = sorted(acc["orm"])
    rows = []
    for s in SELECTORS:
        for n in ns:
            mean, half = _ci(acc[s][n])
            rows.append({"seed": seed, "selector": s, "n": n, "accuracy": mean, "accuracy_ci95": half})
    for better, worse in ORDERINGS:
        for n in ns:
            mean, half = _ci(acc[better][n] - acc[worse][n])
            rows.append(
                {
                    "seed": seed, "comparison": f"{better} - {worse}", "n": n, "difference": mean,
                    "difference_ci95": half, "holds": bool(mean - half > 0),
                }
            )  # fmt: skip
    if "rl" in result:  # beside the verdict: the RL policy's own samples, paired with the SFT policy's
        rl = np.asarray(result["rl"]["per_problem"])
        mean, half = _ci(rl)
        gain, gain_half = _ci(rl - np.asarray(result["sft_per_problem"]))
        rows.append(
            {
                "seed": seed, "arm": RL_ARM, "accuracy": mean, "accuracy_ci95": half, "gain_vs_sft": gain,
                "gain_vs_sft_ci95": gain_half, "train_score_first": result["rl"]["train_score_first"],
                "train_score_last": result["rl"]["train_score_last"],
            }
        )  # fmt: skip
    for name, m in result["models"].items():
        rows.append({"seed": seed, "model": name, **{k.removeprefix("eval/"): v for k, v in m.items()}})
    rows.append({"seed": seed, "training_data": "samples", **result["data"]})
    return rows


def decide(rows: Sequence[Mapping]) -> str:
    """The verdict of RULE from the comparison rows at the largest N."""
    comps = [r for r in rows if "comparison" in r]
    if not comps:
        return "not reproduced"
    top = max(r["n"] for r in comps)
    at = {(r["seed"], r["comparison"]): r for r in comps if r["n"] == top}
    seeds = sorted({s for s, _ in at})
    names = [f"{a} - {b}" for a, b in ORDERINGS]
    holds = [at[s, c]["holds"] for s in seeds for c in names]
    if all(holds):
        return "reproduced"
    prm_above = all(at[s, names[0]]["difference"] > 0 for s in seeds)
    return "partly reproduced" if prm_above and any(holds) else "not reproduced"


def findings(rows: Sequence[Mapping]) -> list[str]:
    """The numbers behind the verdict, in words, seed by seed."""
    lines = []
    for seed in sorted({r["seed"] for r in rows}):
        mine = [r for r in rows if r["seed"] == seed]
        acc = {(r["selector"], r["n"]): r for r in mine if "selector" in r}
        ns = sorted({n for _, n in acc})
        for s in SELECTORS:
            curve = ", ".join(
                f"N={n} {acc[s, n]['accuracy']:.3f} ± {acc[s, n]['accuracy_ci95']:.3f}" for n in ns
            )
            lines.append(f"seed {seed}, {TITLES[s]}: {curve}")
        for r in (r for r in mine if "comparison" in r and r["n"] == ns[-1]):
            a, b = r["comparison"].split(" - ")
            lines.append(
                f"seed {seed}, N={r['n']}: {TITLES[a]} minus {TITLES[b]} {r['difference']:+.3f} ± "
                f"{r['difference_ci95']:.3f} (paired over problems; {'holds' if r['holds'] else 'does not hold'})"
            )
        for r in (r for r in mine if r.get("arm") == RL_ARM):
            lines.append(
                f"seed {seed}, {TITLES[RL_ARM]} (beside the verdict): accuracy {r['accuracy']:.3f} ± "
                f"{r['accuracy_ci95']:.3f}, {r['gain_vs_sft']:+.3f} ± {r['gain_vs_sft_ci95']:.3f} vs an SFT sample "
                f"(paired); verifier score on its rollouts {_num(r['train_score_first'])} -> "
                f"{_num(r['train_score_last'])}"
            )
        models = {r["model"]: r for r in mine if "model" in r}
        data = next(r for r in mine if "training_data" in r)
        lines.append(
            f"seed {seed}: {data['solutions']} training solutions ({data['outcome_right']:.1%} with a right answer; "
            f"{data['labelled_steps']} labelled steps, {data['steps_right']:.1%} right); held out on their own "
            f"labels: ORM accuracy {_num(models['orm'].get('accuracy'))}, AUC {_num(models['orm'].get('auc'))}; "
            f"PRM step accuracy {_num(models['prm'].get('accuracy'))}, AUC {_num(models['prm'].get('auc'))}, "
            f"solution accuracy {_num(models['prm'].get('solution_accuracy'))}"
        )
    return lines


def _num(value) -> str:
    return "–" if value is None or value != value else f"{value:.3f}"


def plot_curves(rows: Sequence[Mapping]) -> bytes | None:
    """Per seed: accuracy of the pick against N (log scale), one line per selector with its 95% interval."""
    import matplotlib.pyplot as plt

    from rlhflab.eval.report import figure_png

    seeds = sorted({r["seed"] for r in rows})
    fig, axes = plt.subplots(1, len(seeds), figsize=(5.2 * len(seeds) + 2.4, 3.8), squeeze=False)
    for ax, seed in zip(axes[0], seeds):
        for k, s in enumerate(SELECTORS):
            mine = sorted(
                (r for r in rows if r["seed"] == seed and r.get("selector") == s), key=lambda r: r["n"]
            )
            n = [r["n"] for r in mine]
            y, half = np.array([r["accuracy"] for r in mine]), np.array([r["accuracy_ci95"] for r in mine])
            style = {"ls": ":"} if s == "oracle" else {}
            ax.plot(n, y, marker="o", ms=3, color=f"C{k}", label=TITLES[s], **style)
            ax.fill_between(n, y - np.nan_to_num(half), y + np.nan_to_num(half), color=f"C{k}", alpha=0.15)
        for r in (r for r in rows if r["seed"] == seed and r.get("arm") == RL_ARM):
            ax.axhline(r["accuracy"], color="k", ls="--", lw=1, label=f"{TITLES[RL_ARM]}, N = 1")
        ax.set_xscale("log", base=2)
        ax.set_title(f"seed {seed}", fontsize=9)
        ax.set_xlabel("N (samples per problem)")
        ax.set_ylabel("final answer right (held-out problems)")
    axes[0][-1].legend(
        fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0)
    )  # outside: the curves fill the axes
    return figure_png(fig)


# --------------------------------------------------------------------------------------------------------
# The experiment
# --------------------------------------------------------------------------------------------------------


def _task(task: str | None):
    from rlhflab.lab.gold import STEP_LABELS
    from rlhflab.lab.tasks import get_task

    task = TASK if task is None else task
    if task not in STEP_LABELS:
        raise ConfigError(
            f"{NAME} needs a lab task whose solutions have steps to label ({', '.join(STEP_LABELS)}), got --task {task}"
        )
    return get_task(task)


def run(
    seeds: Sequence[int] = (0,),
    output_dir: str = "runs/prm-vs-orm",
    *,
    task: str | None = None,
    overrides: Sequence[str] = (),
    overwrite: bool = False,
    resume: bool = False,
) -> Path:
    """Run the experiment; returns the path of report.html. With `resume`, seeds whose seed.json exists are
    read back, not run again."""
    t0 = time.time()
    task_obj = _task(task)
    user = user_sections(overrides)
    for seed in seeds:  # every seed's stage configs built (and so validated) before any work
        check_sft(Path(output_dir) / f"seed-{seed}", seed, task_obj.name, user)
        rm_configs(Path(output_dir) / f"seed-{seed}", seed, user)
        if section(user, "eval")["rl_samples"]:
            rl_config(Path(output_dir) / f"seed-{seed}", seed, user)
    out = prepare_run_dir(output_dir, "experiment", resume=resume, overwrite=overwrite)
    results = {}
    for i, seed in enumerate(seeds, 1):
        seed_dir = out / f"seed-{seed}"
        if resume and (seed_dir / "seed.json").is_file():
            results[seed] = json.loads((seed_dir / "seed.json").read_text())
            continue
        print(f"== {NAME}: seed {seed} ({i}/{len(seeds)})")
        results[seed] = run_seed(task_obj, seed, seed_dir, user)
    rows = [row for seed in seeds for row in seed_rows(seed, results[seed])]
    return publish_run(
        __name__,
        out,
        verdict=decide(rows),
        findings=findings(rows),
        table=rows,
        images={"accuracy_vs_n": plot_curves(rows)},
        started=t0,
        seeds=seeds,
        output_dir=output_dir,
        overrides=overrides,
    )
