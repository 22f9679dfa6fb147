"""T-REX extrapolates beyond its best demonstration (`rlhflab experiment trex`).

Brown et al. (2019a, "Extrapolating Beyond Suboptimal Demonstrations via Inverse Reinforcement Learning from
Observations", ICML; their MuJoCo and Atari results) learn a per-state reward from ranked, suboptimal
demonstrations only (observations, no actions, no reward), run RL on it, and get policies whose true return
exceeds the best demonstration's; the learned reward's predicted returns correlate with the true ones, beyond
the demonstrated range too. Here, per seed, on Pendulum-v1 (see `rlhflab.control`): stable-baselines3 PPO on
the true reward is stopped at `demos.checkpoints` stages `demos.every` steps apart (the first after
`demos.every` steps); each stage gives `demos.episodes` demonstrations (its mean action), ranked by stage
(later = better, as a user who watched the training would rank them; the true returns are not looked at).
T-REX learns a reward from snippet pairs of them, PPO learns on it alone, and its mean action is evaluated on
the true reward from fixed start states. Held-out trajectories, `eval.heldout` episodes per stage from other
start states, measure the learned reward's ranking. Defaults: stages at 4k, 8k, 12k and 16k steps (PPO solves
the task near 25k), 5 demonstrations each, 32768 PPO steps on the learned reward.

The verdict compares the policy with the best single demonstration, as Brown et al. do; the best demonstrator
(the stage with the best mean return) is reported beside it.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from rlhflab.core.run_dir import prepare_run_dir
from rlhflab.experiments.result import publish

NAME = "trex"
CLAIM = (
    "A reward learned by T-REX from ranked suboptimal demonstrations lets RL exceed the best demonstration's "
    "true return, and its predicted returns rank held-out trajectories like the true returns."
)
SOURCE = (
    "Brown, Goo, Nagarajan and Niekum 2019, Extrapolating Beyond Suboptimal Demonstrations via Inverse "
    "Reinforcement Learning from Observations (ICML): the MuJoCo and Atari results (policies beyond the best "
    "demonstration; predicted vs true returns)"
)
MIN_SPEARMAN = 0.5
RULE = (
    "On each seed, the learned policy beats the best demonstration when the lower end of the 95% interval of its "
    "mean true return (over the evaluation episodes) is above the best demonstration's true return. reproduced: "
    f"it beats it on every seed and the Spearman correlation of predicted vs true returns on held-out "
    f"trajectories is at least {MIN_SPEARMAN} on every seed; partly reproduced: it beats it on at least one "
    "seed, or the policy's mean true return is above the best demonstrator's (the stage with the best mean "
    "demonstration return) on every seed; otherwise not reproduced."
)
TASK = "Pendulum-v1"
RANK_AXIS = "demonstrator's PPO checkpoint (rank, worst to best)"
DEMO_SEED, HELDOUT_SEED = 10_000, 20_000
OWN = {
    "demos": {"checkpoints": 4, "every": 4096, "episodes": 5},
    "reward": {"pairs": 2000, "length": 50, "steps": 300, "hidden": 64},
    "rl": {"steps": 32768},
    "eval": {"episodes": 10, "heldout": 3},
}


def decide(rows: Sequence[Mapping], min_spearman: float = MIN_SPEARMAN) -> str:
    """The verdict of RULE from the per-seed rows (policy_ci_low, policy_return, best_demo_return,
    best_demonstrator_mean, spearman_heldout); a missing interval (None, one episode) never beats anything."""
    if not rows:
        return "not reproduced"

    def beats(r):
        return r["policy_ci_low"] is not None and r["policy_ci_low"] > r["best_demo_return"]

    rho_ok = [r["spearman_heldout"] is not None and r["spearman_heldout"] >= min_spearman for r in rows]
    if all(beats(r) for r in rows) and all(rho_ok):
        return "reproduced"
    if any(beats(r) for r in rows) or all(r["policy_return"] > r["best_demonstrator_mean"] for r in rows):
        return "partly reproduced"
    return "not reproduced"


def seed_row(seed: int, demo_returns: Sequence[float], demo_ranks: Sequence[int], rex: Mapping) -> dict:
    """The table row of one seed from the demonstrations' true returns and ranks and `reward_extrapolation`."""
    by_rank = {k: [x for x, r in zip(demo_returns, demo_ranks) if r == k] for k in sorted(set(demo_ranks))}
    return {
        "seed": seed,
        "policy_return": rex["policy_return"],
        "policy_ci_low": _finite(rex["policy_ci_low"]),
        "policy_ci_high": _finite(rex["policy_ci_high"]),
        "best_demo_return": float(max(demo_returns)),
        "best_demonstrator_mean": float(max(np.mean(v) for v in by_rank.values())),
        "worst_demonstrator_mean": float(min(np.mean(v) for v in by_rank.values())),
        "spearman_heldout": _finite(rex["spearman_heldout"]),
        "spearman_with_policy": _finite(rex["spearman_with_policy"]),
        "heldout_pair_accuracy": _finite(rex["heldout_pair_accuracy"]),
        "reward_train_accuracy": rex["reward_train_accuracy"],
    }


def _finite(x: float) -> float | None:
    return float(x) if x is not None and np.isfinite(x) else None


def findings(rows: Sequence[Mapping], what: str = "demonstration") -> list[str]:
    def num(x):
        return "n/a" if x is None else f"{x:.3f}"

    return [
        f"seed {r['seed']}: learned policy's true return {r['policy_return']:.1f} (95% interval "
        f"{num(r['policy_ci_low'])} to {num(r['policy_ci_high'])}) vs best {what} {r['best_demo_return']:.1f} and "
        f"best demonstrator mean {r['best_demonstrator_mean']:.1f}"
        + (f" (worst {r['worst_demonstrator_mean']:.1f})" if "worst_demonstrator_mean" in r else "")
        + "; "
        f"held-out Spearman {num(r['spearman_heldout'])} ({num(r['spearman_with_policy'])} with the policy's "
        f"episodes), held-out pair accuracy {num(r['heldout_pair_accuracy'])}"
        for r in rows
    ]


def demonstrations(env_id: str, seed: int, demos: Mapping[str, int], heldout: int):
    """(demos, their ranks, held-out trajectories, their ranks, stages): rollouts of PPO checkpoints on the
    true reward, with the checkpoint's mean action; the held-out ones from other start states."""
    import gymnasium as gym

    from rlhflab.control.ppo import checkpoints, policy_of
    from rlhflab.control.trajectories import rollout

    # Not the untrained policy: its mean action is near 0, so the pendulum hangs still, which the true reward
    # scores above the flailing of the first updates; ranked first by its stage, it would teach the wrong order.
    stages = [k * demos["every"] for k in range(1, demos["checkpoints"] + 1)]
    env = gym.make(env_id)
    ranked, ranks, held, held_ranks = [], [], [], []
    for rank, (_, model) in enumerate(checkpoints(env_id, seed, stages)):
        ranked += rollout(env, policy_of(model), demos["episodes"], seed=DEMO_SEED + 100 * rank)
        held += rollout(env, policy_of(model), heldout, seed=HELDOUT_SEED + 100 * rank)
        ranks += [rank] * demos["episodes"]
        held_ranks += [rank] * heldout
    env.close()
    return ranked, ranks, held, held_ranks, stages


def run_seed(env_id: str, seed: int, own: Mapping[str, Mapping[str, int]]) -> dict:
    """One seed: demonstrations, T-REX, PPO on the learned reward; the row and the data of the plots."""
    from rlhflab.control.rex import reward_extrapolation
    from rlhflab.core.seeding import seed_everything

    seed_everything(seed)
    ranked, ranks, held, held_ranks, stages = demonstrations(
        env_id, seed, own["demos"], own["eval"]["heldout"]
    )
    rex = reward_extrapolation(env_id, ranked, ranks, held, held_ranks, rex_settings(own), seed)
    demo_returns = [t.true_return for t in ranked]
    return {
        "row": seed_row(seed, demo_returns, ranks, rex),
        "plot": {"ranks": ranks, "labels": [f"{s} steps" for s in stages], "demo_true": demo_returns, **rex},
    }


def rex_settings(own: Mapping[str, Mapping[str, int]]):
    from rlhflab.control.rex import RexSettings

    r = own["reward"]
    return RexSettings(
        pairs=r["pairs"],
        length=r["length"],
        reward_steps=r["steps"],
        hidden=r["hidden"],
        rl_steps=own["rl"]["steps"],
        eval_episodes=own["eval"]["episodes"],
    )


def run(
    seeds: Sequence[int] = (0,),
    output_dir: str = "runs/trex",
    *,
    task: str | None = None,
    overrides: Sequence[str] = (),
    overwrite: bool = False,
    resume: bool = False,
) -> Path:
    """Run the experiment; returns the path of report.html. With `resume`, seeds whose seed.json exists are
    read back, not run again."""
    import sys

    return run_experiment(sys.modules[__name__], seeds, output_dir, task, overrides, overwrite, resume)


def check(own: Mapping[str, Mapping[str, int]]) -> None:
    from rlhflab.errors import ConfigError

    if own["demos"]["checkpoints"] < 2:
        raise ConfigError(f"{NAME}: demos.checkpoints must be at least 2 (a ranking needs two stages)")


def run_experiment(module, seeds, output_dir, task, overrides, overwrite, resume) -> Path:
    """The loop T-REX and D-REX share: check everything before any work, run (or read back) each seed with
    `module.run_seed`, then publish `module`'s verdict, findings and plots."""
    from rlhflab.experiments.common import control_settings, seed_results

    t0 = time.time()
    name = module.NAME
    env_id, sections = control_settings(name, overrides, module.OWN, module.check, task, TASK)
    out = prepare_run_dir(output_dir, "experiment", resume=resume, overwrite=overwrite)
    work = lambda seed: module.run_seed(env_id, seed, sections)  # noqa: E731
    results = seed_results(name, seeds, out, resume, work, f" on {env_id}")
    rows = [r["row"] for r in results]
    # The overrides go before the options: argparse takes the positional ones only there.
    command = (
        f"rlhflab experiment {name}"
        + "".join(f" {o}" for o in overrides)
        + (f" --task {task}" if task else "")
        + f" --seeds {' '.join(map(str, seeds))} --output-dir {output_dir}"
    )
    return publish(
        out,
        experiment=name,
        claim=module.CLAIM,
        source=module.SOURCE,
        verdict=module.decide(rows),
        rule=module.RULE,
        findings=module.findings(rows),
        table=rows,
        images={
            "return_vs_rank": plot_return_vs_rank(results, module.RANK_AXIS),
            "predicted_vs_true": plot_predicted_vs_true(results),
        },
        runtime_s=time.time() - t0,
        seeds=seeds,
        command=command,
    )


def plot_return_vs_rank(results: Sequence[Mapping], xlabel: str = "") -> bytes | None:
    """Per seed: each ranked trajectory's true return against its rank (dots, mean line), its predicted return
    (right axis), and the learned policy's true return with its 95% interval (band) and the best one."""
    import matplotlib.pyplot as plt

    from rlhflab.eval.report import figure_png

    fig, axes = plt.subplots(1, len(results), figsize=(5.0 * len(results), 3.8), squeeze=False)
    for ax, res in zip(axes[0], results):
        p, row = res["plot"], res["row"]
        ranks, true = np.asarray(p["ranks"]), np.asarray(p["demo_true"])
        levels = sorted(set(ranks.tolist()))
        ax.scatter(ranks, true, s=12, color="C0", label="true return of each")
        ax.plot(levels, [true[ranks == k].mean() for k in levels], color="C0")
        ax.axhline(row["best_demo_return"], color="C0", ls=":", lw=1, label="best of them")
        ax.axhline(row["policy_return"], color="C3", label="policy on the learned reward")
        if row["policy_ci_low"] is not None:
            ax.axhspan(row["policy_ci_low"], row["policy_ci_high"], color="C3", alpha=0.15)
        right = ax.twinx()
        right.plot(ranks, p["ranked_predicted"], "x", color="C2", ms=4)
        right.set_ylabel("predicted return (x)", color="C2")
        ax.set_xticks(levels, [p["labels"][k] for k in levels], fontsize=7, rotation=20)
        ax.set_title(f"seed {row['seed']}", fontsize=9)
        ax.set_xlabel(xlabel or "rank (worst to best)")
        ax.set_ylabel("true return")
    axes[0][0].legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    return figure_png(fig)


def plot_predicted_vs_true(results: Sequence[Mapping]) -> bytes | None:
    """Predicted vs true returns of the held-out trajectories and the learned policy's episodes, every seed."""
    import matplotlib.pyplot as plt

    from rlhflab.eval.report import figure_png

    fig, ax = plt.subplots(figsize=(5.0, 4.0))
    for k, res in enumerate(results):
        p, seed = res["plot"], res["row"]["seed"]
        ax.scatter(
            p["heldout_true"], p["heldout_predicted"], s=12, color=f"C{k}", label=f"held out, seed {seed}"
        )
        ax.scatter(
            p["policy_returns"],
            p["policy_predicted"],
            s=18,
            marker="^",
            color=f"C{k}",
            label=f"learned policy, seed {seed}",
        )
    ax.set_xlabel("true return")
    ax.set_ylabel("predicted return (sum of the learned reward)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    return figure_png(fig)
