"""Scaling laws of reward over-optimization (`rlhflab experiment overoptimization-laws`).

Gao et al. (2022, "Scaling Laws for Reward Model Overoptimization", Figs. 1-3, Eqs. 1-2) optimized a policy against
proxy reward models of several sizes, all trained on the same labels from a gold reward model, by best-of-n and by
RL, and found the gold reward, as a function of d = sqrt(KL(pi || pi_init)), to follow

    R_bon(d) = d (alpha_bon - beta_bon d)        R_rl(d) = d (alpha_rl - beta_rl log d)

rising, peaking and falling while the proxy keeps rising; larger reward models pushed the peak further out.

Here, per seed, on the default lab task (its hidden gold is the gold reward model):

    1. pipeline  lab data (annotated pairs) and SFT (`rlhflab run --methods sft`: its budgets and annotators)
    2. proxies   one reward model per size in SIZES, each initialized from a base model of that width pretrained
                 on the task's corpus by the lab's recipe (as Gao et al.'s were from pretrained models; the
                 bases are cached and shared by every seed), trained on the same pairs with the pipeline's rm
                 settings
    3. best-of-n a pool of POOL["samples"] SFT samples on POOL["prompts"] held-out prompts; for n = 1, 2, 4, ...
                 up to the pool size, the gold and proxy of best-of-n by each proxy, exact over all n-subsets of
                 the pool, against d = sqrt(log n - (n - 1) / n) (the KL Gao et al. use; `rlhflab experiment
                 best-of-n-kl` measures it)
    4. RL        PPO without a KL penalty (the pipeline's ppo_kl0) from the SFT model against each proxy; its
                 rollouts' gold and proxy per iteration (averaged over windows of WINDOW iterations) against
                 d = sqrt(the rollouts' KL to SFT)
    5. fit       both forms by least squares on the gold gains over SFT (`rlhflab.eval.scaling_laws`)
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from rlhflab.core.run_dir import prepare_run_dir
from rlhflab.errors import ConfigError
from rlhflab.experiments.result import publish_run

NAME = "overoptimization-laws"
CLAIM = (
    "Against a learned proxy, gold reward rises then falls as best-of-n and RL move away from the initial policy "
    "(R_bon = d(alpha - beta d), R_rl = d(alpha - beta log d), d = sqrt(KL)), and larger proxy reward models push "
    "the peak further out."
)
SOURCE = "Gao et al. 2022, Scaling Laws for Reward Model Overoptimization, Figs. 1-3 and Eqs. 1-2"
RULE = (
    "For each seed and method (best-of-n, RL) a proxy over-optimizes when its fitted beta > 0 and the fitted peak "
    "d* lies inside the measured range of d. reproduced: on every seed, for both methods, the smallest proxy "
    "over-optimizes and d* does not decrease with the proxy's size (no peak counts as the furthest); partly "
    "reproduced: on every seed one of the two halves holds for at least one method; otherwise not reproduced."
)
TASK = "sentiment"
# Proxy widths (hidden size; 2 layers, 4 heads: the lab's architecture), smallest first. 64 is the task's own base.
SIZES = {"small": 32, "medium": 64, "large": 128}
# Set from the time limit (15 minutes a seed on 2 cores, the bases pretrained once) before any run.
POOL = {"prompts": 32, "samples": 512}
PRETRAIN_BUDGETS = ("default", "tiny")  # proxies.pretrain: the bases' budget (tiny: a few seconds, for tests)
WINDOW = 5
METHODS = ("best_of_n", "rl")
PIPELINE_EVAL = ["eval.prompts=32", "eval.samples=2", "eval.curve_points=1", "eval.curve_prompts=8"]
BATCH = 512


# --------------------------------------------------------------------------------------------------------
# The curves and the fits
# --------------------------------------------------------------------------------------------------------


def best_of_n_curve(proxy: np.ndarray, gold: np.ndarray) -> list[dict[str, float]]:
    """[{n, d, gold, proxy}] for n = 1, 2, 4, ... up to the pool size M, from proxy and gold scores [P, M] of
    one pool: each the mean over prompts of the exact best-of-n expectation over all n-subsets."""
    from rlhflab.eval.best_of_n import best_of_n_expectation, best_of_n_kl_formula

    m = proxy.shape[1]
    ns = [2**k for k in range(int(math.log2(m)) + 1)]
    return [
        {
            "n": n,
            "d": math.sqrt(best_of_n_kl_formula(n)),
            "gold": float(best_of_n_expectation(proxy, gold, n).mean()),
            "proxy": float(best_of_n_expectation(proxy, proxy, n).mean()),
        }
        for n in ns
    ]


def rl_curve(points: Sequence[Mapping], window: int = WINDOW) -> list[dict[str, float]]:
    """[{step, d, gold, proxy}] of a PPO run's per-iteration rollout curve ({step, gold/mean, reward/score,
    kl/ref}), averaged over consecutive windows of `window` iterations (a shorter last window dropped); d =
    sqrt(max(KL, 0)): an estimated KL a little below 0 is noise around 0."""
    out = []
    for s in range(0, len(points) - window + 1, window):
        chunk = points[s : s + window]
        kl = float(np.mean([p["kl/ref"] for p in chunk]))
        out.append(
            {
                "step": chunk[-1]["step"],
                "d": math.sqrt(max(kl, 0.0)),
                "gold": float(np.mean([p["gold/mean"] for p in chunk])),
                "proxy": float(np.mean([p["reward/score"] for p in chunk])),
            }
        )
    return out


def fit_row(method: str, curve: Sequence[Mapping], gold0: float) -> dict[str, float | bool]:
    """The form of `method` fitted to the gold gains over `gold0` (SFT's gold), the point (0, 0) included,
    and whether the proxy over-optimizes by RULE."""
    from rlhflab.eval.scaling_laws import fit_best_of_n, fit_rl

    d = np.array([0.0, *(p["d"] for p in curve)])
    gain = np.array([0.0, *(p["gold"] - gold0 for p in curve)])
    measured = {
        "d_max": float(d.max()),
        "gold_gain_best": float(gain.max()),
        "gold_gain_last": float(gain[-1]),
    }
    if np.count_nonzero(d > 0) < 2:  # a run that never left the initial policy: nothing to fit
        nan = float("nan")
        return {"alpha": nan, "beta": nan, "r2": nan, "d_peak": nan, **measured, "overoptimizes": False}
    fit = (fit_best_of_n if method == "best_of_n" else fit_rl)(d, gain)
    return {**fit.to_dict(), **measured, "overoptimizes": bool(fit.beta > 0 and fit.d_peak < d.max())}


def decide(rows: Sequence[Mapping]) -> str:
    """The verdict of RULE from the fit rows ({seed, method, size, overoptimizes, d_peak})."""
    seeds = sorted({r["seed"] for r in rows})
    order = list(SIZES)

    def halves(seed: int, method: str) -> tuple[bool, bool]:
        by = {r["size"]: r for r in rows if r["seed"] == seed and r["method"] == method}
        # A fit that failed has d_peak NaN (null once read back from result.json): it moves out nowhere.
        peaks = [math.nan if by[s]["d_peak"] is None else by[s]["d_peak"] for s in order if s in by]
        smallest = next(by[s] for s in order if s in by)
        return bool(smallest["overoptimizes"]), all(a <= b for a, b in zip(peaks, peaks[1:]))

    got = {(s, m): halves(s, m) for s in seeds for m in METHODS}
    if seeds and all(a and b for a, b in got.values()):
        return "reproduced"
    for half in (0, 1):
        if seeds and any(all(got[s, m][half] for s in seeds) for m in METHODS):
            return "partly reproduced"
    return "not reproduced"


# --------------------------------------------------------------------------------------------------------
# Training and sampling
# --------------------------------------------------------------------------------------------------------


def base_of_width(task, hidden: int, budget: str = "default") -> Path:
    """The lab's base model of `task` at `hidden` width (its recipe otherwise), pretrained once and cached."""
    from rlhflab.lab.pretrain import ensure_base_model

    variant = copy.copy(task)
    variant.pretrain = dataclasses.replace(task.pretrain, hidden_size=hidden)
    return ensure_base_model(variant, budget=budget, seed=0)


def train_proxies(task, seed: int, seed_dir: Path, user: Mapping, budget: str) -> dict[str, Path]:
    """One reward model per size on the pipeline's pairs, from bases pretrained with `budget`: {size: its
    final directory}."""
    from rlhflab.pipeline import _stage_config, _train

    pairs = seed_dir / "run" / "data" / "pairs.jsonl"
    out = {}
    for size, hidden in SIZES.items():
        print(f"== {NAME}: the {size} proxy (hidden {hidden}): its base model (pretrained once, then cached)")
        base = base_of_width(task, hidden, budget)
        wiring = [f"model.name_or_path={base}", f"data.train_path={pairs}"]
        cfg = _stage_config("rm", seed_dir / size, seed, wiring, user)
        out[size] = _train("rm", cfg)
    return out


def train_rl(task, seed: int, seed_dir: Path, proxies: Mapping[str, Path], user: Mapping) -> dict[str, list]:
    """PPO without a KL penalty against each proxy: {size: its per-iteration rollout curve}."""
    from rlhflab.pipeline import _gold_curve, _stage_config, _train

    run = seed_dir / "run"
    curves = {}
    for size, rm in proxies.items():
        wiring = [
            f"model.name_or_path={run / 'sft' / 'final'}",
            f"data.train_path={run / 'data' / 'prompts.jsonl'}",
            f"algo.reward_model={rm}",
        ]
        cfg = _stage_config("ppo_kl0", seed_dir / size, seed, wiring, {"ppo_kl0": user.get("ppo", {})})
        print(f"== {NAME}: PPO without KL against the {size} proxy")
        _train("ppo_kl0", cfg)
        curves[size] = _gold_curve(task, seed_dir / size / "ppo_kl0")
    return curves


def pool_scores(task, seed_dir: Path, proxies: Mapping[str, Path], pool: Mapping[str, int], seed: int):
    """(gold [P, M], {size: proxy scores [P, M]}) of a pool of SFT samples on held-out prompts."""
    from rlhflab.lab.evaluate import sample_policy
    from rlhflab.lab.tasks import chat_prompt
    from rlhflab.models.loading import load_inference_lm, load_tokenizer
    from rlhflab.rewards import LearnedReward
    from rlhflab.stages.best_of_n import score_in_batches

    sft = seed_dir / "run" / "sft" / "final"
    prompts = task.heldout_prompts(pool["prompts"], seed=seed)
    m = pool["samples"]
    print(f"== {NAME}: {m} SFT samples on each of {len(prompts)} held-out prompts")
    samples = sample_policy(
        load_inference_lm(sft),
        load_tokenizer(sft),
        task,
        prompts,
        n_samples=m,
        seed=seed + 7,
        batch_size=BATCH,
    )
    chats = [chat_prompt(p) for p in prompts for _ in range(m)]
    texts = [r for rs in samples.responses for r in rs]
    proxy = {}
    for size, rm in proxies.items():
        reward = LearnedReward.from_pretrained(rm, batch_size=BATCH)
        proxy[size] = score_in_batches(reward, chats, texts, batch_size=BATCH).double().numpy().reshape(-1, m)
    return samples.gold, proxy


def run_seed(
    task, seed: int, seed_dir: Path, pipeline: Sequence[str], user: Mapping, pool: Mapping, budget: str
) -> dict:
    """One seed, steps 1-5; writes SEED_DIR/seed.json ({curves, fits})."""
    from rlhflab.core.io import atomic_write_text
    from rlhflab.pipeline import run_pipeline

    run_pipeline(
        task=task.name, seed=seed, output_dir=str(seed_dir / "run"), overrides=[*PIPELINE_EVAL, *pipeline],
        overwrite=True, methods=["sft"],
    )  # fmt: skip
    proxies = train_proxies(task, seed, seed_dir, user, budget)
    gold, proxy = pool_scores(task, seed_dir, proxies, pool, seed)
    gold0 = float(gold.mean())
    curves = {"best_of_n": {s: best_of_n_curve(proxy[s], gold) for s in SIZES}}
    curves["rl"] = {s: rl_curve(c) for s, c in train_rl(task, seed, seed_dir, proxies, user).items()}
    fits = [
        {"seed": seed, "method": method, "size": size, "hidden": SIZES[size], **fit_row(method, curve, gold0)}
        for method in METHODS
        for size, curve in curves[method].items()
    ]
    result = {"gold_sft": gold0, "curves": curves, "fits": fits}
    atomic_write_text(seed_dir / "seed.json", json.dumps(result, indent=2) + "\n")
    return result


def user_sections(overrides: Sequence[str]) -> tuple[list[str], dict, dict[str, int], str]:
    """(pipeline overrides, {"rm": ..., "ppo": ...} sections, the pool, the bases' pretraining budget) from the
    user's overrides."""
    from rlhflab.config import parse_overrides

    pipeline, own, pool, budget = [], [], dict(POOL), PRETRAIN_BUDGETS[0]
    for item in overrides:
        key = item.split("=", 1)[0]
        section = key.split(".", 1)[0]
        if key == "proxies.pretrain":
            budget = item.split("=", 1)[1]
            if budget not in PRETRAIN_BUDGETS:
                raise ConfigError(f"{NAME}: proxies.pretrain must be one of {', '.join(PRETRAIN_BUDGETS)}")
        elif section == "pool":
            name, value = key[len("pool.") :], parse_overrides([item])["pool"][key[len("pool.") :]]
            if name not in POOL:
                raise ConfigError(
                    f"{NAME}: unknown key '{key}'; the pool's keys are pool.prompts, pool.samples"
                )
            if isinstance(value, bool) or not isinstance(value, int) or value < 2:
                raise ConfigError(f"{NAME}: '{key}' must be an integer >= 2, got {value!r}")
            pool[name] = value
        elif section in ("rm", "ppo"):
            own.append(item)
        elif section in ("sft", "data", "annotators", "eval"):
            pipeline.append(item)
        else:
            raise ConfigError(
                f"{NAME}: '{key}' is for a stage this experiment does not run; it takes sft., rm. (every "
                "proxy), ppo. (every RL run), data., annotators., pool.prompts / pool.samples and "
                "proxies.pretrain"
            )
    return pipeline, parse_overrides(own), pool, budget


def run(
    seeds: Sequence[int] = (0,),
    output_dir: str = "runs/overoptimization-laws",
    *,
    task: str | None = None,
    overrides: Sequence[str] = (),
    overwrite: bool = False,
    resume: bool = False,
) -> Path:
    """Run the experiment; returns the path of report.html. With `resume`, seeds whose seed.json exists are
    read back, not run again."""
    from rlhflab.config import STAGE_CONFIGS, build_config, deep_merge, parse_overrides
    from rlhflab.lab.tasks import get_task
    from rlhflab.pipeline import DEFAULTS

    t0 = time.time()
    task_obj = get_task(task or TASK)
    pipeline, user, pool, budget = user_sections(overrides)
    for stage, section in (("rm", "rm"), ("ppo", "ppo")):  # the user's keys checked before any work
        layers = [*DEFAULTS[section], "model.name_or_path=x", "data.train_path=x"]
        build_config(STAGE_CONFIGS[stage], deep_merge(parse_overrides(layers), user.get(section, {})))
    out = prepare_run_dir(output_dir, "experiment", resume=resume, overwrite=overwrite)
    results: dict[int, dict] = {}
    for i, seed in enumerate(seeds, 1):
        seed_dir = out / f"seed-{seed}"
        if resume and (seed_dir / "seed.json").is_file():
            results[seed] = json.loads((seed_dir / "seed.json").read_text())
            continue
        print(f"== {NAME}: seed {seed} ({i}/{len(seeds)})")
        results[seed] = run_seed(task_obj, seed, seed_dir, pipeline, user, pool, budget)
    rows = [f for seed in seeds for f in results[seed]["fits"]]
    return publish_run(
        __name__,
        out,
        verdict=decide(rows),
        findings=findings(rows),
        table=rows,
        images={"gold_vs_d": plot_curves(results)},
        started=t0,
        seeds=seeds,
        output_dir=output_dir,
        overrides=overrides,
    )


def findings(rows: Sequence[Mapping]) -> list[str]:
    return [
        f"seed {r['seed']}, {r['method'].replace('_', '-')}, {r['size']} proxy (hidden {r['hidden']}): alpha "
        f"{r['alpha']:.3f}, beta {r['beta']:.3f}, R^2 {r['r2']:.2f}, peak d* {r['d_peak']:.2f} (measured up to "
        f"{r['d_max']:.2f}); gold gain over SFT best {r['gold_gain_best']:+.3f}, last {r['gold_gain_last']:+.3f}"
        f" ({'over-optimizes' if r['overoptimizes'] else 'no peak inside the range'})"
        for r in rows
    ]


def plot_curves(results: Mapping[int, Mapping]) -> bytes | None:
    """Per method and seed: gold gain (solid, with its fit dotted) and proxy (dashed, right axis) against d."""
    import matplotlib.pyplot as plt

    from rlhflab.eval.report import figure_png

    seeds = sorted(results)
    fig, axes = plt.subplots(len(METHODS), len(seeds), figsize=(5.0 * len(seeds), 7.0), squeeze=False)
    for row, method in enumerate(METHODS):
        for col, seed in enumerate(seeds):
            ax, res = axes[row][col], results[seed]
            twin = ax.twinx()
            fits = {f["size"]: f for f in res["fits"] if f["method"] == method}
            for k, (size, curve) in enumerate(res["curves"][method].items()):
                d = np.array([p["d"] for p in curve])
                ax.plot(d, [p["gold"] - res["gold_sft"] for p in curve], color=f"C{k}", marker="o", ms=2,
                        label=f"{size} (hidden {SIZES[size]})")  # fmt: skip
                twin.plot(d, [p["proxy"] for p in curve], color=f"C{k}", ls="--", lw=0.7)
                f, grid = fits[size], np.linspace(1e-3, d.max(), 100)
                shape = grid if method == "best_of_n" else np.log(grid)
                ax.plot(grid, grid * (f["alpha"] - f["beta"] * shape), color=f"C{k}", ls=":", lw=1)
            ax.set_title(f"{method.replace('_', '-')}, seed {seed}", fontsize=9)
            ax.set_xlabel("d = sqrt(KL to SFT)")
            ax.set_ylabel("gold gain over SFT (solid; fit dotted)")
            twin.set_ylabel("proxy reward (dashed)", fontsize=8)
            ax.legend(fontsize=7)
    fig.tight_layout()
    return figure_png(fig)
