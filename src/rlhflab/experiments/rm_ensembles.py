"""Reward-model ensembles against over-optimization (`rlhflab experiment rm-ensembles`).

Coste et al. (2024, "Reward Model Ensembles Help Mitigate Overoptimization", ICLR 2024) trained ensembles of
reward models that differ only in their seed, on the same preferences with 25% of the labels flipped, and
optimized an aggregation of the members: their mean, the worst case (WCO, the minimum over the members) or the
uncertainty-weighted objective (UWO, the mean minus lambda times the variance over the members). Against a
single reward model the gold reward of best-of-n and of PPO peaked and then fell as optimization went on; with
WCO and UWO the fall was much smaller or gone, while the plain mean still over-optimized under label noise
(their best-of-n and PPO results with 25% label noise).

Here, per seed, on the default lab task with `annotators.noise=0.25`:

    1. pipeline   `rlhflab run --methods rm`: the lab's pairs labelled by the noisy annotators, SFT, and the
                  first reward model (member 0), all with the pipeline's settings
    2. members    the other members (SETTINGS["members"] in all): reward models from the same SFT model on the
                  same pairs, each with its own seed (its head's initialization, data order and 10% held-out
                  split); every member's and every aggregation's accuracy on the same fresh annotated pairs
    3. best-of-n  n_max SFT samples per held-out prompt, each scored by every member; for n = 1, 2, 4, ...,
                  n_max the expected gold of the best of n picked by member 0 alone ("single"), by the members'
                  mean, by WCO and by UWO (lambda UWO_COEF), against n and against the KL bound
                  log n - (n - 1)/n
    4. PPO        the pipeline's PPO (its KL coefficient and budget) from the SFT model against each of the
                  four, given as a user would (algo.reward_combine=ensemble_mean / ensemble_min /
                  ensemble_uwo); every iteration's rollouts scored by the hidden gold afterwards; each final
                  policy's gold and KL to SFT on held-out prompts

Every member is whitened by its own training-response statistics (`:normalize=true`) in every arm, single
included: a Bradley-Terry reward is defined only up to a constant, so without one scale the minimum would mostly
be the member with the lowest offset; one scale also keeps the KL coefficient's weight the same in every arm.

Budgets (members, samples, prompts) were set from the time limit (one seed within 15 minutes on 2 CPU cores)
before any run of this experiment, as were UWO_COEF and the rule; none was tuned on the results.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from rlhflab.core.run_dir import prepare_run_dir
from rlhflab.errors import ConfigError
from rlhflab.experiments.annotator_noise import DROP as PPO_DROP
from rlhflab.experiments.annotator_noise import WINDOW, overoptimization, window_means
from rlhflab.experiments.result import publish_run

NAME = "rm-ensembles"
CLAIM = (
    "With 25% label noise, optimizing a conservative aggregation of a reward-model ensemble (worst case, WCO; "
    "uncertainty-weighted, UWO) shrinks the fall of the gold reward from its peak under best-of-n and PPO, "
    "compared with a single reward model and with the ensemble's mean."
)
SOURCE = (
    "Coste et al. 2024, Reward Model Ensembles Help Mitigate Overoptimization (ICLR 2024): the mean, WCO and UWO "
    "objectives, and their best-of-n and PPO results with 25% label noise"
)
TASK = "sentiment"
NOISE = 0.25
# Arm -> the reward combination PPO is given (None: member 0 alone) and the aggregation best-of-n picks by.
ARMS: dict[str, str | None] = {
    "single": None,
    "mean": "ensemble_mean",
    "wco": "ensemble_min",
    "uwo": "ensemble_uwo",
}
CONSERVATIVE = ("wco", "uwo")
# Lambda of UWO, on whitened members (unit standard deviation on training responses): one member of four off by d
# from the other three costs 0.5 x (3/16) d^2, 0.09 at d = 1. Set before any run, not tuned.
UWO_COEF = 0.5
# The experiment's own budgets (`ensemble.KEY=VALUE` overrides them): members of the ensemble; best-of-n's
# held-out prompts and samples per prompt (a power of 2; n runs over the powers of 2 up to it); held-out prompts
# for the final PPO policies. Set from the 15-minute limit for one seed on 2 CPU cores before any run, from
# single-threaded CPU costs measured on a busy machine (a member 10 s, PPO 35-50 s per arm, 2,048 samples 2 s to
# draw and 1.4 s per member to score): about 6 minutes, leaving room for a slower or shared machine.
SETTINGS = {"members": 4, "bon_prompts": 48, "n_max": 512, "eval_prompts": 128}
EVAL_SAMPLES = 2
BON_DROP = 0.02
RULE = (
    "Gold drop = the gold's peak minus its end. Best-of-n: the expected gold of the best of n SFT samples "
    "(over n-subsets of the pool of n_max samples per prompt, mean over held-out prompts) at its best n minus at "
    f"n = n_max. PPO: the gold of its rollouts in windows of {WINDOW} iterations, best window minus last. The "
    f"single reward model over-optimizes when its drop exceeds {BON_DROP} with the paired 95% interval over "
    f"prompts above 0 (best-of-n), or {PPO_DROP} (PPO, the annotator-noise criterion). On a seed, conservative "
    "aggregation helps an optimizer when the single model over-optimizes and the drops of both WCO and UWO are "
    "below the single model's; it helps fully when they are also below the mean's. reproduced: it helps fully "
    "for best-of-n and PPO on every seed; partly reproduced: it helps at least one optimizer on at least one "
    "seed; otherwise not reproduced."
)
OPTIMIZERS = ("best_of_n", "ppo")
# The pipeline's own evaluation is kept small: this experiment judges by its own.
PIPELINE_EVAL = ["eval.prompts=16", "eval.samples=2", "eval.curve_points=1", "eval.curve_prompts=2"]
# Keys the experiment sets itself: a user's value would be overwritten or would change what is compared.
FIXED_KEYS = (
    "annotators.noise",
    "ppo.algo.reward_model",
    "ppo.algo.reward_combine",
    "ppo.algo.reward_weights",
    "ppo.algo.uwo_coef",
    "rm.seed",
    "ppo.seed",
    "sft.seed",
)
SECTIONS = ("sft", "rm", "ppo", "data", "eval", "annotators")
BATCH = 256


# --------------------------------------------------------------------------------------------------------
# The maths: best-of-n from a pool, aggregations, drops
# --------------------------------------------------------------------------------------------------------


def aggregate(arm: str, members: np.ndarray, uwo_coef: float = UWO_COEF) -> np.ndarray:
    """The score an arm picks by, from the members' scores [K, ...]: member 0 alone, or the ensemble
    aggregation of `rlhflab.losses.combine` (the same functions the ensemble_* reward combinations call)."""
    import torch

    from rlhflab.losses.combine import ENSEMBLE_AGGREGATIONS

    m = np.asarray(members, dtype=np.float64)
    if ARMS[arm] is None:
        return m[0]
    flat = torch.from_numpy(m.reshape(m.shape[0], -1))
    name = ARMS[arm][len("ensemble_") :]
    fn = ENSEMBLE_AGGREGATIONS[name]
    out = fn(flat, uwo_coef) if name == "uwo" else fn(flat)
    return out.numpy().reshape(m.shape[1:])


def bon_curve(selector: np.ndarray, gold: np.ndarray, ns: Sequence[int]) -> dict[str, Any]:
    """Best-of-n by `selector` [P, N] for each n of `ns`: per-prompt expected gold [P, len(ns)], its mean and
    95% half-width over prompts, and the expected selector score of the pick (the proxy)."""
    from rlhflab.eval import metrics as M
    from rlhflab.eval.best_of_n import best_of_n_expectation, best_of_n_kl_formula

    per_prompt = np.stack([best_of_n_expectation(selector, gold, n) for n in ns], axis=1)
    stats = [M.mean_ci95(per_prompt[:, j]) for j in range(len(ns))]
    return {
        "n": list(ns),
        "kl_bound": [best_of_n_kl_formula(n) for n in ns],
        "gold": [s[0] for s in stats],
        "gold_ci95": [(s[2] - s[1]) / 2 for s in stats],
        "proxy": [float(best_of_n_expectation(selector, selector, n).mean()) for n in ns],
        "per_prompt": per_prompt,
    }


def bon_drop(curve: Mapping[str, Any]) -> dict[str, Any]:
    """The fall of a best-of-n gold curve from its peak to its last n, with the paired 95% interval over prompts,
    and whether it over-optimizes (drop > BON_DROP, interval above 0)."""
    from rlhflab.eval import metrics as M

    gold = np.asarray(curve["gold"])
    peak = int(np.argmax(gold))
    diffs = curve["per_prompt"][:, peak] - curve["per_prompt"][:, -1]
    drop, lo, hi = M.mean_ci95(diffs)
    half = 0.0 if peak == len(gold) - 1 else (hi - lo) / 2
    return {
        "gold_peak": float(gold[peak]),
        "peak_at": int(curve["n"][peak]),
        "gold_end": float(gold[-1]),
        "gold_end_ci95": float(curve["gold_ci95"][-1]),
        "gold_drop": float(drop),
        "gold_drop_ci95": float(half),
        "overoptimizes": bool(drop > BON_DROP and drop - half > 0),
        "proxy_end": float(curve["proxy"][-1]),
        "kl_end": float(curve["kl_bound"][-1]),
    }


def ppo_drop(curve: Sequence[Mapping]) -> dict[str, Any]:
    """annotator-noise's criterion on a PPO rollout curve (best window minus last window of WINDOW iterations),
    with a 95% interval of the drop over the iterations of the two windows (Welch, t with 2 WINDOW - 2 degrees of
    freedom; 0 when the last window is the best)."""
    from rlhflab.eval import metrics as M

    o = overoptimization(curve)
    gold = np.array([p["gold/mean"] for p in curve], dtype=np.float64)
    means = window_means(gold)
    best = int(np.argmax(means))
    half = 0.0
    if best != len(means) - 1 and len(gold) >= 2 * WINDOW:
        a = gold[best * WINDOW : (best + 1) * WINDOW]
        b = gold[(len(means) - 1) * WINDOW : len(means) * WINDOW]
        se = math.sqrt(a.var(ddof=1) / len(a) + b.var(ddof=1) / len(b))
        half = M.t_quantile_975(len(a) + len(b) - 2) * se
    return {
        "gold_peak": o["gold_best_window"],
        "peak_at": o["gold_best_at"],
        "gold_end": o["gold_last_window"],
        "gold_drop": o["gold_drop"],
        "gold_drop_ci95": float(half),
        "overoptimizes": o["overoptimizes"],
        "proxy_end": o["proxy_last_window"],
        "kl_end": float(np.mean([p["kl/ref"] for p in curve[-WINDOW:]])),
    }


def helps(by_arm: Mapping[str, Mapping]) -> dict[str, bool]:
    """One seed and optimizer ({arm: drop row}): does the single model over-optimize, and are WCO's and UWO's
    drops below the single model's (helps) and also below the mean's (helps fully)?"""
    over = bool(by_arm["single"]["overoptimizes"])
    drops = [by_arm[a]["gold_drop"] for a in CONSERVATIVE]
    below_single = all(d < by_arm["single"]["gold_drop"] for d in drops)
    below_mean = all(d < by_arm["mean"]["gold_drop"] for d in drops)
    return {
        "single_overoptimizes": over,
        "helps": over and below_single,
        "helps_fully": over and below_single and below_mean,
    }


def decide(rows: Sequence[Mapping]) -> str:
    """The verdict of RULE from the drop rows ({seed, optimizer, arm, gold_drop, overoptimizes})."""
    drops = [
        r for r in rows if r.get("optimizer") in OPTIMIZERS and r.get("arm") in ARMS and "gold_drop" in r
    ]
    keys = sorted({(r["seed"], r["optimizer"]) for r in drops})
    checks = [helps({r["arm"]: r for r in drops if (r["seed"], r["optimizer"]) == k}) for k in keys]
    if checks and all(c["helps_fully"] for c in checks) and {o for _, o in keys} == set(OPTIMIZERS):
        return "reproduced"
    if any(c["helps"] for c in checks):
        return "partly reproduced"
    return "not reproduced"


# --------------------------------------------------------------------------------------------------------
# Settings and stage configs, all checked before any work
# --------------------------------------------------------------------------------------------------------


def user_settings(overrides: Sequence[str]) -> tuple[list[str], list[str], dict[str, int]]:
    """(the pipeline's overrides, the PPO arms' overrides (ppo.*), the experiment's settings) from the user's
    overrides: `ensemble.KEY=VALUE` sets SETTINGS; keys the experiment sets itself are refused."""
    from rlhflab.config import parse_overrides

    pipeline, ppo, settings = [], [], dict(SETTINGS)
    for item in overrides:
        key = item.split("=", 1)[0].strip()
        if key.startswith("ensemble."):
            name = key[len("ensemble.") :]
            if name not in SETTINGS:
                known = ", ".join(f"ensemble.{k}" for k in SETTINGS)
                raise ConfigError(f"{NAME}: unknown key '{key}'; the experiment's own keys are {known}")
            value = parse_overrides([item])["ensemble"][name]
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{NAME}: '{key}' must be a positive integer, got {value!r}")
            settings[name] = value
        elif key in FIXED_KEYS:
            raise ConfigError(f"{NAME}: {key} is set by this experiment (what it compares); leave it out")
        elif key.split(".", 1)[0] not in SECTIONS:
            raise ConfigError(
                f"{NAME}: section '{key.split('.', 1)[0]}' is for a method this experiment does not run; its "
                f"sections are {', '.join((*SECTIONS, 'ensemble'))}"
            )
        else:
            (ppo if key.startswith("ppo.") else pipeline).append(item)
    if settings["members"] < 2:
        raise ConfigError(f"{NAME}: ensemble.members must be >= 2 (an ensemble), got {settings['members']}")
    n_max = settings["n_max"]
    if n_max & (n_max - 1):
        raise ConfigError(
            f"{NAME}: ensemble.n_max must be a power of 2 (n runs over 1, 2, 4, ...), got {n_max}"
        )
    return pipeline, ppo, settings


def member_dirs(seed_dir: Path, members: int) -> list[Path]:
    """Where each member's model is: member 0 is the pipeline's reward model, the others their own rm runs."""
    return [seed_dir / "run" / "rm" / "final"] + [
        seed_dir / f"member-{k}" / "rm" / "final" for k in range(1, members)
    ]


def member_seed(seed: int, k: int) -> int:
    """Member k's rm seed: member 0 has the pipeline's (the experiment's seed); the others differ from it and from
    every other seed's members."""
    return seed + 1000 * k


def reward_overrides(arm: str, members: Sequence[Path]) -> list[str]:
    """PPO's reward keys for an arm: member 0 alone, or every member aggregated as the arm says; members
    whitened by their stored statistics."""
    specs = [f"{d}:normalize=true" for d in (members[:1] if ARMS[arm] is None else members)]
    keys = [f"algo.reward_model={json.dumps(specs)}"]  # the list form: a path may hold a ','
    if ARMS[arm] is not None:
        keys.append(f"algo.reward_combine={ARMS[arm]}")
    if arm == "uwo":
        keys.append(f"algo.uwo_coef={UWO_COEF}")
    return keys


def stage_configs(seed: int, seed_dir: Path, task: str, user: Mapping, settings: Mapping) -> dict[str, Any]:
    """The stage configs of one seed (built, so validated): {"pipeline": the pipeline's, "members": [rm config of
    members 1..K-1], "ppo": {arm: ppo config}}."""
    from rlhflab.pipeline import _configs, _section, _stage_config

    run_dir = seed_dir / "run"
    data = {name: run_dir / "data" / f"{name}.jsonl" for name in ("sft", "pairs", "prompts")}
    pipeline_user = {k: v for k, v in user.items() if k != "ppo"}
    pipeline = _configs(
        ["sft", "rm"], run_dir, seed, task, pipeline_user, data, _section(pipeline_user, "eval")
    )
    if pipeline["rm"].algo.normalization_samples == 0:
        raise ConfigError(
            f"{NAME}: rm.algo.normalization_samples is 0, but the members are whitened by the statistics it "
            "stores; leave it > 0"
        )
    sft = run_dir / "sft" / "final"
    rm_base = [f"model.name_or_path={sft}", f"data.train_path={data['pairs']}"]
    members = [
        _stage_config("rm", seed_dir / f"member-{k}", member_seed(seed, k), rm_base, user)
        for k in range(1, settings["members"])
    ]
    dirs = member_dirs(seed_dir, settings["members"])
    ppo_base = [f"model.name_or_path={sft}", f"data.train_path={data['prompts']}"]
    ppo = {
        arm: _stage_config(
            "ppo", seed_dir / f"ppo-{arm}", seed, [*ppo_base, *reward_overrides(arm, dirs)], user
        )
        for arm in ARMS
    }
    return {"pipeline": pipeline, "members": members, "ppo": ppo}


# --------------------------------------------------------------------------------------------------------
# One seed: train, then judge by gold
# --------------------------------------------------------------------------------------------------------


def load_members(dirs: Sequence[Path]) -> list:
    """Every member as a reward source, whitened by its stored training statistics."""
    from rlhflab.rewards import LearnedReward

    return [LearnedReward.from_pretrained(d, normalize=True, batch_size=BATCH) for d in dirs]


def member_scores(members: Sequence, prompts: Sequence, responses: Sequence[str]) -> np.ndarray:
    """[K, B] scores of every member for B (prompt, response) pairs."""
    from rlhflab.stages.best_of_n import score_in_batches

    return np.stack([score_in_batches(m, list(prompts), list(responses), BATCH).numpy() for m in members])


def accuracy_rows(task, seed: int, members: Sequence, n_pairs: int) -> list[dict]:
    """Each member's and each aggregation's agreement with the lab's (noiseless) annotators and with the gold
    order, on the same fresh pairs (the pipeline's eval.rm_pairs)."""
    from rlhflab.lab.evaluate import evaluate_reward_model

    cache: dict[tuple, np.ndarray] = {}

    def scores(prompts, responses) -> np.ndarray:  # every scorer reads the same pairs: the members run once
        key = (json.dumps(list(prompts)), tuple(responses))
        if key not in cache:
            cache[key] = member_scores(members, prompts, responses)
        return cache[key]

    scorers = {f"member-{k}": (lambda p, r, k=k: scores(p, r)[k]) for k in range(len(members))}
    scorers.update({arm: (lambda p, r, a=arm: aggregate(a, scores(p, r))) for arm in ARMS if arm != "single"})
    rows = []
    for name, fn in scorers.items():
        m = evaluate_reward_model(lambda p, r, fn=fn: fn(p, r).tolist(), task, n_pairs=n_pairs, seed=seed)
        rows.append(
            {
                "seed": seed,
                "reward": name,
                "rm_accuracy": m["rm/accuracy"],
                "rm_gold_accuracy": m["rm/gold_accuracy"],
            }
        )
    return rows


def judge_best_of_n(task, seed: int, sft_dir: Path, members: Sequence, settings: Mapping) -> dict[str, dict]:
    """Step 3: n_max SFT samples on each of bon_prompts held-out prompts, scored by gold and by every member; the
    best-of-n curve of every arm."""
    from rlhflab.lab.evaluate import sample_policy
    from rlhflab.lab.tasks import chat_prompt
    from rlhflab.models.loading import load_inference_lm, load_tokenizer

    prompts = task.heldout_prompts(settings["bon_prompts"], seed=seed + 20)
    n_max = settings["n_max"]
    sft, tokenizer = load_inference_lm(sft_dir), load_tokenizer(sft_dir)
    samples = sample_policy(sft, tokenizer, task, prompts, n_samples=n_max, seed=seed + 21, batch_size=BATCH)
    chats = [chat_prompt(p) for p in prompts for _ in range(n_max)]
    flat = [r for rs in samples.responses for r in rs]
    scores = member_scores(members, chats, flat).reshape(len(members), len(prompts), n_max)
    ns = [2**j for j in range(int(math.log2(n_max)) + 1)]
    return {arm: bon_curve(aggregate(arm, scores), samples.gold, ns) for arm in ARMS}


def train_ppo_arms(task, seed: int, seed_dir: Path, configs: Mapping, settings: Mapping) -> dict[str, dict]:
    """Step 4: PPO against every arm's reward; its rollout curve (gold scored here, after training) and its final
    policy's gold and KL to SFT on held-out prompts."""
    from rlhflab.lab.evaluate import evaluate_policy, sample_policy
    from rlhflab.models.loading import load_inference_lm, load_tokenizer
    from rlhflab.pipeline import _gold_curve, _train

    sft_dir = seed_dir / "run" / "sft" / "final"
    prompts = task.heldout_prompts(settings["eval_prompts"], seed=seed + 30)
    sft, tokenizer = load_inference_lm(sft_dir), load_tokenizer(sft_dir)
    ref = sample_policy(
        sft, tokenizer, task, prompts, n_samples=EVAL_SAMPLES, seed=seed + 31, batch_size=BATCH
    )
    out = {}
    for arm, cfg in configs.items():
        print(f"== {NAME}: seed {seed}, PPO against {arm} ({ARMS[arm] or 'member 0 alone'})")
        run_dir = Path(cfg.logging.output_dir)
        _train("ppo", cfg, task=task.name)
        m = evaluate_policy(
            load_inference_lm(run_dir / "final"), tokenizer, task, prompts=prompts, n_samples=EVAL_SAMPLES,
            ref_model=sft, ref_samples=ref, seed=seed + 32, batch_size=BATCH,
        )  # fmt: skip
        ci = m["gold/ci95"]
        out[arm] = {
            "curve": _gold_curve(task, run_dir),
            "heldout_gold": m["gold/mean"],
            "heldout_gold_ci95": float((ci[1] - ci[0]) / 2),
            "heldout_kl_to_sft": m["kl/ref"],
            "heldout_win_rate_vs_sft": m["gold/win_rate"],
        }
    out["sft"] = {"heldout_gold": float(ref.gold.mean())}
    return out


def run_seed(task, seed: int, seed_dir: Path, plan: Mapping, configs: Mapping) -> dict:
    """One seed, steps 1-4; writes SEED_DIR/seed.json (what the table and plots are made of)."""
    from rlhflab.core.io import atomic_write_text
    from rlhflab.pipeline import _train, run_pipeline

    settings = plan["settings"]
    if seed_dir.exists():  # a seed without seed.json (an interrupted one) runs again from the start
        shutil.rmtree(seed_dir)
    run_pipeline(
        task=task.name, seed=seed, output_dir=str(seed_dir / "run"), overwrite=True, methods=["rm"],
        overrides=[*PIPELINE_EVAL, *plan["pipeline"], f"annotators.noise={NOISE}"],
    )  # fmt: skip
    for k, cfg in enumerate(configs["members"], 1):
        print(f"== {NAME}: seed {seed}, reward model member {k} (rm seed {cfg.seed})")
        _train("rm", cfg, task=task.name)
    members = load_members(member_dirs(seed_dir, settings["members"]))
    rm_pairs = plan["rm_pairs"]
    print(
        f"== {NAME}: seed {seed}, members and aggregations on {rm_pairs} fresh pairs; best-of-n by each arm"
    )
    accuracy = accuracy_rows(task, seed, members, rm_pairs)
    bon = judge_best_of_n(task, seed, seed_dir / "run" / "sft" / "final", members, settings)
    ppo = train_ppo_arms(task, seed, seed_dir, configs["ppo"], settings)
    result = {
        "accuracy": accuracy,
        "best_of_n": {arm: {k: v for k, v in c.items() if k != "per_prompt"} for arm, c in bon.items()},
        "best_of_n_drop": {arm: bon_drop(c) for arm, c in bon.items()},
        "ppo": ppo,
        "ppo_drop": {arm: ppo_drop(ppo[arm]["curve"]) for arm in ARMS},
    }
    atomic_write_text(seed_dir / "seed.json", json.dumps(result, indent=2) + "\n")
    return result


# --------------------------------------------------------------------------------------------------------
# Table, verdict, plots
# --------------------------------------------------------------------------------------------------------


def seed_rows(seed: int, result: Mapping) -> list[dict]:
    """The drop rows of one seed (one per optimizer and arm), the accuracy rows, one check row per optimizer."""
    rows = []
    for optimizer in OPTIMIZERS:
        drops = result[f"{optimizer}_drop"]
        for arm in ARMS:
            row = {"seed": seed, "optimizer": optimizer, "arm": arm, **drops[arm]}
            if optimizer == "ppo":
                row.update({k: v for k, v in result["ppo"][arm].items() if k != "curve"})
            rows.append(row)
    rows += list(result["accuracy"])
    for optimizer in OPTIMIZERS:
        rows.append({"seed": seed, "check": optimizer, **helps(result[f"{optimizer}_drop"])})
    return rows


def summary_rows(table: Sequence[Mapping]) -> list[dict]:
    """Per optimizer and arm, over seeds: the mean drop with its 95% interval (none for one seed), the seeds that
    over-optimize, and the mean gold at the end."""
    from rlhflab.eval import metrics as M

    out = []
    for optimizer in OPTIMIZERS:
        for arm in ARMS:
            rows = [
                r
                for r in table
                if r.get("optimizer") == optimizer and r.get("arm") == arm and "gold_drop" in r
            ]
            if not rows:
                continue
            drop, lo, hi = M.mean_ci95([r["gold_drop"] for r in rows])
            out.append(
                {
                    "summary": optimizer,
                    "arm": arm,
                    "seeds": len(rows),
                    "gold_drop_mean": drop,
                    "gold_drop_ci95_over_seeds": (hi - lo) / 2 if len(rows) > 1 else float("nan"),
                    "seeds_overoptimizing": sum(bool(r["overoptimizes"]) for r in rows),
                    "gold_end_mean": float(np.mean([r["gold_end"] for r in rows])),
                }
            )
    return out


def findings(results: Mapping[int, Mapping]) -> list[str]:
    lines = []
    for seed, result in results.items():
        acc = ", ".join(f"{r['reward']} {r['rm_accuracy']:.3f}" for r in result["accuracy"])
        lines.append(f"seed {seed}: agreement with the lab's noiseless annotators on fresh pairs: {acc}")
        for optimizer, unit in (("best_of_n", "n"), ("ppo", "the window from iteration")):
            d = result[f"{optimizer}_drop"]
            text = "; ".join(
                f"{arm} peak {d[arm]['gold_peak']:.3f} (at {unit} {d[arm]['peak_at']}), end "
                f"{d[arm]['gold_end']:.3f}, drop {d[arm]['gold_drop']:.3f} ± {d[arm]['gold_drop_ci95']:.3f}"
                + (" over-optimizes" if d[arm]["overoptimizes"] else "")
                for arm in ARMS
            )
            check = helps(d)
            verdict = (
                "helps fully" if check["helps_fully"] else "helps" if check["helps"] else "does not help"
            )
            lines.append(f"seed {seed}, {optimizer}: {text}. Conservative aggregation {verdict}.")
        ppo = result["ppo"]
        held = ", ".join(
            f"{arm} {ppo[arm]['heldout_gold']:.3f} ± {ppo[arm]['heldout_gold_ci95']:.3f} "
            f"(KL {ppo[arm]['heldout_kl_to_sft']:.2f})"
            for arm in ARMS
        )
        lines.append(
            f"seed {seed}, PPO policies on held-out prompts: SFT {ppo['sft']['heldout_gold']:.3f}; {held}"
        )
    return lines


def run(
    seeds: Sequence[int] = (0,),
    output_dir: str = "runs/rm-ensembles",
    *,
    task: str | None = None,
    overrides: Sequence[str] = (),
    overwrite: bool = False,
    resume: bool = False,
) -> Path:
    """Run the experiment; returns the path of report.html. With `resume`, seeds whose seed.json exists are read
    back, not run again."""
    from rlhflab.lab.tasks import get_task
    from rlhflab.pipeline import _section, _user_sections

    t0 = time.time()
    task_obj = get_task(task or TASK)
    pipeline, ppo, settings = user_settings(overrides)
    user = _user_sections(None, [*PIPELINE_EVAL, *pipeline, *ppo, f"annotators.noise={NOISE}"])
    plan = {"pipeline": pipeline, "settings": settings, "rm_pairs": _section(user, "eval")["rm_pairs"]}
    # Every seed's stage configs built (and so validated) before any work: a typo fails in a second.
    configs = {
        s: stage_configs(s, Path(output_dir) / f"seed-{s}", task_obj.name, user, settings) for s in seeds
    }
    out = prepare_run_dir(output_dir, "experiment", resume=resume, overwrite=overwrite)
    results: dict[int, dict] = {}
    for i, seed in enumerate(seeds, 1):
        seed_dir = out / f"seed-{seed}"
        if resume and (seed_dir / "seed.json").is_file():
            results[seed] = json.loads((seed_dir / "seed.json").read_text())
            continue
        print(
            f"== {NAME}: seed {seed} ({i}/{len(seeds)}), {settings['members']} reward models, noise {NOISE}"
        )
        results[seed] = run_seed(task_obj, seed, seed_dir, plan, configs[seed])
    table = [row for seed in seeds for row in seed_rows(seed, results[seed])]
    drop_rows = [r for r in table if r.get("optimizer") in OPTIMIZERS]
    table += summary_rows(table)
    return publish_run(
        __name__,
        out,
        verdict=decide(drop_rows),
        findings=findings(results),
        table=table,
        images={"best_of_n_gold": plot_best_of_n(results), "ppo_gold": plot_ppo(results)},
        started=t0,
        seeds=seeds,
        output_dir=output_dir,
        overrides=overrides,
    )


def plot_best_of_n(results: Mapping[int, Mapping]) -> bytes | None:
    """Best-of-n gold per arm against n (left) and against the KL bound log n - (n - 1)/n (right), each seed a
    line, the 95% interval over prompts as a band."""
    import matplotlib.pyplot as plt

    from rlhflab.eval.report import figure_png

    fig, axes = plt.subplots(1, 2, figsize=(10.0, 3.8))
    for k, arm in enumerate(ARMS):
        for j, result in enumerate(results.values()):
            c = result["best_of_n"][arm]
            gold, half = np.asarray(c["gold"]), np.asarray(c["gold_ci95"])
            for ax, x in zip(axes, (c["n"], c["kl_bound"])):
                ax.plot(x, gold, color=f"C{k}", marker=".", label=arm if j == 0 else None)
                ax.fill_between(x, gold - half, gold + half, color=f"C{k}", alpha=0.08)
    axes[0].set_xscale("log", base=2)
    axes[0].set_xlabel("n (best of n SFT samples)")
    axes[1].set_xlabel("KL bound log n - (n - 1)/n (nats)")
    for ax in axes:
        ax.set_ylabel("gold reward of the pick")
    axes[0].legend(fontsize=8, title=f"picked by (noise {NOISE})", title_fontsize=8)
    return figure_png(fig)


def plot_ppo(results: Mapping[int, Mapping]) -> bytes | None:
    """PPO per arm: the gold of each iteration's rollouts (thin) and its WINDOW-iteration means (thick), and the
    proxy (the reward PPO optimized, each arm its own) per iteration; one row per seed."""
    import matplotlib.pyplot as plt

    from rlhflab.eval.report import figure_png

    fig, axes = plt.subplots(len(results), 2, figsize=(10.0, 3.4 * len(results)), squeeze=False)
    for (seed, result), (ax_gold, ax_proxy) in zip(results.items(), axes):
        for k, arm in enumerate(ARMS):
            curve = result["ppo"][arm]["curve"]
            steps = [p["step"] for p in curve]
            gold = [p["gold/mean"] for p in curve]
            ax_gold.plot(steps, gold, color=f"C{k}", lw=0.6, alpha=0.5)
            means = window_means(gold)
            centres = [steps[min(len(steps) - 1, i * WINDOW + WINDOW // 2)] for i in range(len(means))]
            ax_gold.plot(centres, means, color=f"C{k}", lw=2.0, label=arm)
            ax_proxy.plot(steps, [p["reward/score"] for p in curve], color=f"C{k}", lw=0.8, label=arm)
        ax_gold.set_title(f"seed {seed}: gold of the rollouts", fontsize=9)
        ax_proxy.set_title(f"seed {seed}: proxy (the reward optimized)", fontsize=9)
        for ax in (ax_gold, ax_proxy):
            ax.set_xlabel("PPO iteration")
    axes[0][0].legend(fontsize=8)
    return figure_png(fig)
