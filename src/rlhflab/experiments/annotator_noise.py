"""Noisy annotators and reward over-optimization (`rlhflab experiment annotator-noise`).

Dubois et al. (2023, "AlpacaFarm", Sec. 3.3 and Figure 4) found that PPO against a reward model trained on
noisy simulated preferences (25% of labels flipped, their annotators' level of disagreement with one another)
over-optimizes, as with human labels: the reward model's score keeps rising while the true (human or simulated)
win rate peaks and falls; with noiseless simulated annotators it did not. Here, per seed, on the default lab task,
`rlhflab run --methods ppo` twice with the same data sizes and the pipeline's PPO (its KL coefficient 0.2 and
budget, set before this experiment), once with `annotators.noise=0` and once with `annotators.noise=0.25`; the
rest of the annotators' settings are the lab's defaults. Every PPO iteration's rollouts are scored afterwards by
the hidden gold reward.

Over-optimization, fixed before the first run: the gold of PPO's rollouts, averaged over windows of WINDOW
iterations, ends more than DROP below its best window (the criterion that chose the pipeline's KL coefficient,
on training prompts). The proxy reward is reported beside it.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from rlhflab.core.run_dir import prepare_run_dir
from rlhflab.experiments.result import publish_run

NAME = "annotator-noise"
CLAIM = (
    "PPO against a reward model learned from noisy annotators (25% flipped labels) over-optimizes: gold peaks "
    "and falls while the proxy rises; with noiseless annotators it does not."
)
SOURCE = (
    "Dubois et al. 2023, AlpacaFarm: A Simulation Framework for Methods that Learn from Human Feedback, Sec. "
    "3.3 and Figure 4 (over-optimization appears with noisy simulated annotators, not with noiseless ones)"
)
WINDOW = 10
DROP = 0.05
RULE = (
    f"A run over-optimizes when the gold of its PPO rollouts, averaged over windows of {WINDOW} iterations, ends "
    f"more than {DROP} below its best window. reproduced: on every seed the noisy run over-optimizes and the "
    "noiseless one does not; partly reproduced: that holds on at least one seed, or the noisy run's drop is "
    "larger than the noiseless one's on every seed; otherwise not reproduced."
)
ARMS = {"noiseless": 0.0, "noisy": 0.25}
TASK = "sentiment"


def window_means(values: Sequence[float], window: int = WINDOW) -> np.ndarray:
    """Means of consecutive, non-overlapping windows of `window` values (a shorter last window is dropped
    unless it is the only one)."""
    v = np.asarray(values, dtype=np.float64)
    n = max(1, len(v) // window)
    if len(v) < window:
        return np.array([v.mean()]) if len(v) else np.array([])
    return v[: n * window].reshape(n, window).mean(axis=1)


def overoptimization(curve: Sequence[Mapping]) -> dict[str, float | bool]:
    """From a PPO rollout curve ([{step, gold/mean, reward/score, kl/ref}] in step order): gold's best and last
    window means, the drop between them, whether it exceeds DROP, and the proxy's first and last windows."""
    gold = window_means([p["gold/mean"] for p in curve])
    proxy = window_means([p["reward/score"] for p in curve])
    best, last = float(gold.max()), float(gold[-1])
    return {
        "gold_best_window": best,
        "gold_best_at": int(np.argmax(gold)) * WINDOW,
        "gold_last_window": last,
        "gold_drop": best - last,
        "overoptimizes": bool(best - last > DROP),
        "proxy_first_window": float(proxy[0]),
        "proxy_last_window": float(proxy[-1]),
    }


def decide(rows: Sequence[Mapping]) -> str:
    """The verdict of RULE from the per-seed, per-arm rows."""
    seeds = sorted({r["seed"] for r in rows})
    by = {(r["seed"], r["arm"]): r for r in rows}
    shown = [by[s, "noisy"]["overoptimizes"] and not by[s, "noiseless"]["overoptimizes"] for s in seeds]
    larger = [by[s, "noisy"]["gold_drop"] > by[s, "noiseless"]["gold_drop"] for s in seeds]
    if seeds and all(shown):
        return "reproduced"
    if any(shown) or (seeds and all(larger)):
        return "partly reproduced"
    return "not reproduced"


def seed_row(seed: int, arm: str, report: Mapping) -> dict:
    ppo = report["policies"]["ppo"]
    return {
        "seed": seed,
        "arm": arm,
        "noise": ARMS[arm],
        **overoptimization(report["rollout_curves"]["ppo"]),
        "heldout_gold": ppo["gold_reward_mean"],
        "heldout_gold_ci95": ppo["gold_reward_ci95"],
        "kl_to_sft": ppo["kl_to_sft"],
        "rm_heldout_accuracy": report["reward_model"]["heldout_accuracy"],
    }


def findings(rows: Sequence[Mapping]) -> list[str]:
    return [
        f"seed {r['seed']}, {r['arm']} annotators (noise {r['noise']}): RM accuracy on fresh pairs "
        f"{r['rm_heldout_accuracy']:.3f}; rollout gold best window {r['gold_best_window']:.3f} (from iteration "
        f"{r['gold_best_at']}), last {r['gold_last_window']:.3f}, drop {r['gold_drop']:.3f} "
        f"({'over-optimizes' if r['overoptimizes'] else 'no over-optimization'}); proxy "
        f"{r['proxy_first_window']:.3f} -> {r['proxy_last_window']:.3f}; held-out gold "
        f"{r['heldout_gold']:.3f} ± {r['heldout_gold_ci95']:.3f} at KL {r['kl_to_sft']:.2f}"
        for r in rows
    ]


def run(
    seeds: Sequence[int] = (0,),
    output_dir: str = "runs/annotator-noise",
    *,
    task: str | None = None,
    overrides: Sequence[str] = (),
    overwrite: bool = False,
    resume: bool = False,
) -> Path:
    """Run the experiment; returns the path of report.html. With `resume`, arms whose report.json exists are
    read back, not run again."""
    from rlhflab.errors import ConfigError
    from rlhflab.pipeline import _user_sections, run_pipeline

    t0 = time.time()
    user = _user_sections(None, list(overrides))
    if "noise" in user.get("annotators", {}):
        raise ConfigError(
            f"{NAME}: annotators.noise is what this experiment varies (0 and 0.25); leave it out"
        )
    out = prepare_run_dir(output_dir, "experiment", resume=resume, overwrite=overwrite)
    rows = []
    for i, seed in enumerate(seeds, 1):
        for arm, noise in ARMS.items():
            arm_dir = out / f"seed-{seed}" / arm
            if not (resume and (arm_dir / "report.json").is_file()):
                print(f"== {NAME}: seed {seed} ({i}/{len(seeds)}), {arm} annotators (noise {noise})")
                run_pipeline(
                    task=task or TASK,
                    seed=seed,
                    output_dir=str(arm_dir),
                    overrides=[*overrides, f"annotators.noise={noise}"],
                    overwrite=True,
                    methods=["ppo"],
                )
            rows.append(seed_row(seed, arm, json.loads((arm_dir / "report.json").read_text())))
    curves = {
        (seed, arm): json.loads((out / f"seed-{seed}" / arm / "report.json").read_text())["rollout_curves"][
            "ppo"
        ]
        for seed in seeds
        for arm in ARMS
    }
    return publish_run(
        __name__,
        out,
        verdict=decide(rows),
        findings=findings(rows),
        table=rows,
        images={"gold_and_proxy": plot_curves(curves)},
        started=t0,
        seeds=seeds,
        output_dir=output_dir,
        overrides=overrides,
    )


def plot_curves(curves: Mapping[tuple[int, str], Sequence[Mapping]]) -> bytes | None:
    """Per seed: gold and proxy reward of PPO's rollouts against the iteration, noiseless beside noisy."""
    import matplotlib.pyplot as plt

    from rlhflab.eval.report import figure_png

    seeds = sorted({s for s, _ in curves})
    fig, axes = plt.subplots(1, len(seeds), figsize=(5.0 * len(seeds), 3.6), squeeze=False)
    for ax, seed in zip(axes[0], seeds):
        for k, arm in enumerate(ARMS):
            c = curves[seed, arm]
            steps = [p["step"] for p in c]
            ax.plot(steps, [p["gold/mean"] for p in c], color=f"C{k}", label=f"gold, {arm}")
            ax.plot(
                steps, [p["reward/score"] for p in c], color=f"C{k}", ls="--", lw=0.8, label=f"proxy, {arm}"
            )
        ax.set_title(f"seed {seed}", fontsize=9)
        ax.set_xlabel("PPO iteration")
        ax.set_ylabel("reward of the rollouts")
    axes[0][0].legend(fontsize=7)
    return figure_png(fig)
