"""AlpacaFarm's comparison of RLHF methods, on the lab (`rlhflab experiment alpacafarm`).

Dubois et al. (2023, "AlpacaFarm: A Simulation Framework for Methods that Learn from Human Feedback", Table 2)
trained every method from one SFT model (SFT 10k) on one set of simulated preferences and judged each by its
simulated win rate against a fixed reference, Davinci003, the model whose outputs were Alpaca's SFT data:

    PPO 46.8, DPO 46.8 (Rafailov et al. 2023), best-of-1024 45.0, expert iteration 41.9, SFT 52k 39.2,
    SFT 10k 36.7, Binary FeedME 36.6, Quark 35.6, binary reward conditioning 32.4.

Here, per seed, on the default lab task (`rlhflab run`'s pipeline with these methods, its budgets and its
annotators):

    1. pipeline  lab data (demonstrations and annotated pairs), SFT, the reward model, then every method from
                 the SFT model: Binary FeedME, expert iteration, Quark and binary reward conditioning (each
                 sampled behind its best reward token), PPO, DPO, and RLOO, GRPO and online DPO (no AlpacaFarm
                 row)
    2. judge     on held-out prompts, samples of every policy and best-of-16 / best-of-64 picks among SFT samples
                 by the reward model, each against the reference's samples on the same prompts by the hidden
                 gold reward: the win rate (ties count half) over all sample pairs of a prompt, averaged over
                 prompts, with a 95% interval over prompts
    3. compare   the ranking of the methods both tables have against AlpacaFarm's (Spearman), and the claim's
                 chain of inequalities, seed by seed

The reference is the task's demonstrator, the source of the SFT data, as Davinci003 was for Alpaca's: the SFT
model imitates it imperfectly, so its win rate is below 1/2, as SFT 10k's 36.7% is.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from rlhflab.core.run_dir import prepare_run_dir
from rlhflab.experiments.result import publish_run

NAME = "alpacafarm"
CLAIM = (
    "Against a fixed reference, PPO ~ DPO > best-of-n > expert iteration > SFT, with Binary FeedME, Quark and "
    "binary reward conditioning near or below SFT."
)
SOURCE = (
    "Dubois et al. 2023, AlpacaFarm: A Simulation Framework for Methods that Learn from Human Feedback, Table 2 "
    "(simulated win rates against Davinci003); Rafailov et al. 2023 (DPO's row, on the same simulator)"
)
RULE = (
    "Per seed, the chain holds when the win rates against the reference order min(PPO, DPO) > best-of-64 > "
    "expert iteration > SFT (means) and PPO ~ DPO (their difference inside its 95% interval, the two "
    "half-widths combined as if independent). reproduced: the chain holds on every seed; partly reproduced: it "
    "holds on at least one seed, or the Spearman correlation between the mean win rates over seeds and "
    "AlpacaFarm's, over the methods both tables have, is at least 0.5; otherwise not reproduced."
)
TASK = "sentiment"  # the lab's default task
# AlpacaFarm's simulated win rates (%) against Davinci003. "sft" is SFT 10k, the model its methods started from
# (SFT 52k, trained on all of Alpaca's data: 39.2); "best_of_64" stands for its best-of-1024.
PUBLISHED = {
    "ppo": 46.8,
    "dpo": 46.8,
    "best_of_64": 45.0,
    "expert_iteration": 41.9,
    "sft": 36.7,
    "feedme": 36.6,
    "quark": 35.6,
    "reward_conditioning": 32.4,
}
PIPELINE_METHODS = (
    "sft", "rm", "feedme", "expert_iteration", "quark", "reward_conditioning", "ppo", "dpo", "rloo", "grpo",
    "online_dpo",
)  # fmt: skip
BEST_OF = (16, 64)
TITLES = {
    "sft": "SFT",
    "feedme": "Binary FeedME",
    "reward_conditioning": "binary reward conditioning",
    "quark": "Quark",
    "expert_iteration": "expert iteration",
    "best_of_16": "best-of-16",
    "best_of_64": "best-of-64",
    "ppo": "PPO",
    "dpo": "DPO",
    "rloo": "RLOO",
    "grpo": "GRPO",
    "online_dpo": "online DPO",
}
# The judging budget: held-out prompts x samples per prompt of every policy and of the reference. Set from the
# time limit (12 minutes for one seed on 2 CPU cores) before any run, never tuned on the held-out prompts.
EVAL = {"prompts": 256, "samples": 2}
# The pipeline's own evaluation (report.json: KL to SFT, label budgets) is kept small: this experiment judges
# by its own, larger one.
PIPELINE_EVAL = ["eval.prompts=32", "eval.samples=2", "eval.curve_points=2", "eval.curve_prompts=16"]
EVAL_BATCH = 256


def user_sections(overrides: Sequence[str]) -> tuple[list[str], dict[str, int]]:
    """(pipeline overrides, the judging section) from the user's overrides: `eval.prompts` and `eval.samples`
    set the judging; the sections of the stages it runs, `data.*` and `annotators.*` go to the pipeline;
    anything else is refused."""
    from rlhflab.experiments.common import split_overrides

    pipeline, own = split_overrides(
        NAME, overrides, own={"eval": EVAL}, pipeline=(*PIPELINE_METHODS, "data", "annotators")
    )
    return pipeline, own["eval"]


# --------------------------------------------------------------------------------------------------------
# Judging: win rates against the reference on held-out prompts
# --------------------------------------------------------------------------------------------------------


def reference_samples(task, prompts: Sequence[str], n: int, seed: int):
    """`n` responses of the task's demonstrator (the reference) per prompt, scored by gold: `PolicySamples`."""
    from rlhflab.lab.evaluate import score_responses

    draws = [task.demonstrations(list(prompts), seed=10_000 + 100 * seed + j) for j in range(n)]
    return score_responses(task, list(prompts), [[d[i] for d in draws] for i in range(len(prompts))])


def win_row(samples, reference) -> dict[str, float]:
    """Win rate against the reference (ties 1/2, all sample pairs of a prompt, mean over prompts) and gold,
    each with the half-width of its 95% interval over prompts."""
    from rlhflab.eval import metrics as M

    win, lo, hi = M.mean_ci95(M.win_rate_all_pairs(samples.gold, reference.gold))
    gold, glo, ghi = M.mean_ci95(samples.gold.mean(axis=1))
    return {
        "win_rate": win,
        "win_rate_ci95": (hi - lo) / 2,
        "gold_reward_mean": gold,
        "gold_reward_ci95": (ghi - glo) / 2,
    }


def best_of_samples(task, sft, tokenizer, reward, prompts: Sequence[str], n: int, draws: int, seed: int):
    """`draws` best-of-`n` picks per prompt among SFT samples by the reward model, scored by gold."""
    from rlhflab.lab.evaluate import score_responses
    from rlhflab.lab.tasks import chat_prompt
    from rlhflab.rollout.generate import SamplingSettings
    from rlhflab.stages.best_of_n import best_of_n

    settings = SamplingSettings(max_new_tokens=task.max_new_tokens)
    chats = [chat_prompt(p) for p in prompts]
    picks = [
        best_of_n(
            sft, tokenizer, chats, reward, n=n, settings=settings, batch_size=EVAL_BATCH, seed=seed + 10 + j
        ).texts
        for j in range(draws)
    ]
    return score_responses(task, list(prompts), [[p[i] for p in picks] for i in range(len(prompts))])


def judge_seed(task, seed_dir: Path, seed: int, ev: Mapping[str, int]) -> dict[str, dict[str, float]]:
    """Step 2: every trained policy and both best-of-n against the reference on the same held-out prompts."""
    from rlhflab.lab.evaluate import conditioning_of, sample_policy
    from rlhflab.models.loading import load_causal_lm, load_tokenizer
    from rlhflab.rewards import LearnedReward
    from rlhflab.stages.best_of_n import best_of_n_kl

    run_dir = seed_dir / "run"
    prompts = task.heldout_prompts(ev["prompts"], seed=seed)
    reference = reference_samples(task, prompts, ev["samples"], seed)
    tokenizer = load_tokenizer(run_dir / "sft" / "final")
    report = json.loads((run_dir / "report.json").read_text())["policies"]
    rows: dict[str, dict[str, float]] = {}
    for name in (m for m in PIPELINE_METHODS if m != "rm"):
        model_dir = run_dir / name / "final"
        # A Quark model is sampled behind its best reward token, with its own tokenizer (which has the tokens);
        # its KL to SFT in report.json is read on the plain prompt, as every other policy's.
        samples = sample_policy(
            load_causal_lm(model_dir), load_tokenizer(model_dir), task, prompts, n_samples=ev["samples"],
            seed=seed + 2, batch_size=EVAL_BATCH, conditioning=conditioning_of(model_dir),
        )  # fmt: skip
        rows[name] = {
            **win_row(samples, reference),
            "kl_to_sft": report[name]["kl_to_sft"],
            "label_queries": report[name]["label_queries"],
        }
    sft = load_causal_lm(run_dir / "sft" / "final")
    reward = LearnedReward.from_pretrained(run_dir / "rm" / "final", batch_size=EVAL_BATCH)
    for n in BEST_OF:
        samples = best_of_samples(task, sft, tokenizer, reward, prompts, n, ev["samples"], seed)
        rows[f"best_of_{n}"] = {
            **win_row(samples, reference),
            # The KL of best-of-n to its base policy is at most log n - (n - 1) / n (Stiennon et al. 2020).
            "kl_to_sft": best_of_n_kl(n),
            "label_queries": report["ppo"]["label_queries"],  # the reward model's pairs, as PPO's
        }
    return rows


# --------------------------------------------------------------------------------------------------------
# Table, ranking, verdict
# --------------------------------------------------------------------------------------------------------


def chain_holds(rows: Mapping[str, Mapping[str, float]]) -> dict[str, Any]:
    """The claim's chain on one seed's rows ({method: row}): min(PPO, DPO) > best-of-64 > expert iteration >
    SFT, and PPO ~ DPO (|difference| <= the half-widths combined as if independent)."""
    w = {m: rows[m]["win_rate"] for m in ("ppo", "dpo", "best_of_64", "expert_iteration", "sft")}
    half = float(np.hypot(rows["ppo"]["win_rate_ci95"], rows["dpo"]["win_rate_ci95"]))
    similar = abs(w["ppo"] - w["dpo"]) <= half
    ordered = min(w["ppo"], w["dpo"]) > w["best_of_64"] > w["expert_iteration"] > w["sft"]
    return {"ppo_similar_to_dpo": bool(similar), "ordered": bool(ordered), "chain": bool(similar and ordered)}


def ranking_correlation(win_rates: Mapping[str, float]) -> float:
    """Spearman correlation between our win rates and AlpacaFarm's over the methods both have (ties in
    AlpacaFarm's table, PPO = DPO, get their mean rank)."""
    from rlhflab.eval import metrics as M

    common = [m for m in PUBLISHED if m in win_rates]
    return M.spearman([win_rates[m] for m in common], [PUBLISHED[m] for m in common])


def seed_rows(seed: int, rows: Mapping[str, Mapping[str, float]]) -> list[dict]:
    return [
        {"seed": seed, "method": m, **rows[m], "alpacafarm_win_rate": PUBLISHED.get(m, float("nan")) / 100}
        for m in TITLES
        if m in rows
    ]


def summary_rows(table: Sequence[Mapping]) -> list[dict]:
    """Per method: the mean win rate over seeds, its spread (standard deviation, 0 for one seed) and
    AlpacaFarm's."""
    out = []
    for m in TITLES:
        wins = [r["win_rate"] for r in table if r.get("method") == m and "seed" in r]
        if wins:
            out.append(
                {
                    "method": m,
                    "seeds": len(wins),
                    "win_rate_mean": float(np.mean(wins)),
                    "win_rate_sd": float(np.std(wins, ddof=1)) if len(wins) > 1 else 0.0,
                    "alpacafarm_win_rate": PUBLISHED.get(m, float("nan")) / 100,
                }
            )
    return out


def decide(per_seed: Mapping[int, Mapping[str, Any]], spearman: float) -> str:
    """The verdict of RULE from each seed's chain check and the Spearman correlation of the mean win rates."""
    chains = [bool(v["chain"]) for v in per_seed.values()]
    if chains and all(chains):
        return "reproduced"
    if any(chains) or spearman >= 0.5:
        return "partly reproduced"
    return "not reproduced"


def findings(table: Sequence[Mapping], per_seed: Mapping[int, Mapping], spearman: float) -> list[str]:
    lines = []
    for seed, check in per_seed.items():
        rows = {r["method"]: r for r in table if r.get("seed") == seed and "win_rate" in r}
        ranked = sorted(rows, key=lambda m: -rows[m]["win_rate"])
        text = ", ".join(
            f"{TITLES[m]} {rows[m]['win_rate']:.3f} ± {rows[m]['win_rate_ci95']:.3f}" for m in ranked
        )
        lines.append(f"seed {seed}, win rate against the reference, best first: {text}")
        lines.append(
            f"seed {seed}: min(PPO, DPO) > best-of-64 > expert iteration > SFT "
            f"{'holds' if check['ordered'] else 'fails'}; PPO ~ DPO {'holds' if check['ppo_similar_to_dpo'] else 'fails'}; "
            f"Spearman with AlpacaFarm {check['spearman']:.3f}"
        )
    lines.append(f"mean win rates over seeds: Spearman with AlpacaFarm's table {spearman:.3f}")
    return lines


# --------------------------------------------------------------------------------------------------------
# The experiment
# --------------------------------------------------------------------------------------------------------


def run_seed(task, seed: int, seed_dir: Path, pipeline: Sequence[str], ev: Mapping[str, int]) -> dict:
    """One seed: the pipeline (step 1), the judging (step 2); writes SEED_DIR/seed.json."""
    from rlhflab.core.io import atomic_write_text
    from rlhflab.pipeline import run_pipeline

    run_pipeline(
        task=task.name,
        seed=seed,
        output_dir=str(seed_dir / "run"),
        overrides=[*PIPELINE_EVAL, *pipeline],
        overwrite=True,
        methods=list(PIPELINE_METHODS),
    )
    print(f"== {NAME}: judging every policy against the reference on {ev['prompts']} held-out prompts")
    rows = judge_seed(task, seed_dir, seed, ev)
    atomic_write_text(seed_dir / "seed.json", json.dumps(rows, indent=2) + "\n")
    return rows


def run(
    seeds: Sequence[int] = (0,),
    output_dir: str = "runs/alpacafarm",
    *,
    task: str | None = None,
    overrides: Sequence[str] = (),
    overwrite: bool = False,
    resume: bool = False,
) -> Path:
    """Run the experiment; returns the path of report.html. With `resume`, seeds whose seed.json exists are
    read back, not run again."""
    from rlhflab.lab.tasks import get_task
    from rlhflab.pipeline import _configs, _section, _user_sections

    t0 = time.time()
    task_obj = get_task(task or TASK)
    pipeline, ev = user_sections(overrides)
    user = _user_sections(None, [*PIPELINE_EVAL, *pipeline])
    for seed in seeds:  # every seed's stage configs built (and so validated) before any work
        seed_dir = Path(output_dir) / f"seed-{seed}"
        data = {name: seed_dir / "run" / "data" / f"{name}.jsonl" for name in ("sft", "pairs", "prompts")}
        _configs(
            list(PIPELINE_METHODS), seed_dir / "run", seed, task_obj.name, user, data, _section(user, "eval")
        )
    out = prepare_run_dir(output_dir, "experiment", resume=resume, overwrite=overwrite)
    results: dict[int, dict] = {}
    for i, seed in enumerate(seeds, 1):
        seed_dir = out / f"seed-{seed}"
        if resume and (seed_dir / "seed.json").is_file():
            results[seed] = json.loads((seed_dir / "seed.json").read_text())
            continue
        print(f"== {NAME}: seed {seed} ({i}/{len(seeds)})")
        results[seed] = run_seed(task_obj, seed, seed_dir, pipeline, ev)
    table = [row for seed in seeds for row in seed_rows(seed, results[seed])]
    per_seed = {
        seed: {
            **chain_holds(results[seed]),
            "spearman": ranking_correlation({m: r["win_rate"] for m, r in results[seed].items()}),
        }
        for seed in seeds
    }
    summary = summary_rows(table)
    spearman = ranking_correlation({r["method"]: r["win_rate_mean"] for r in summary})
    table += [{"seed": s, "check": "chain", **c} for s, c in per_seed.items()] + summary
    return publish_run(
        __name__,
        out,
        verdict=decide(per_seed, spearman),
        findings=findings(table, per_seed, spearman),
        table=table,
        images={"win_rates": plot_win_rates(summary, table)},
        started=t0,
        seeds=seeds,
        output_dir=output_dir,
        overrides=overrides,
    )


def plot_win_rates(summary: Sequence[Mapping], table: Sequence[Mapping]) -> bytes | None:
    """Win rate against the reference per method (mean over seeds, each seed's value as a dot) beside
    AlpacaFarm's published one, methods in AlpacaFarm's order."""
    import matplotlib.pyplot as plt

    from rlhflab.eval.report import figure_png

    methods = sorted(
        (r["method"] for r in summary), key=lambda m: -PUBLISHED.get(m, -1.0) if m in PUBLISHED else 1.0
    )
    mean = {r["method"]: r["win_rate_mean"] for r in summary}
    fig, ax = plt.subplots(figsize=(9.0, 3.8))
    xs = np.arange(len(methods))
    ax.bar(xs - 0.2, [mean[m] for m in methods], 0.4, color="C0", label="rlhflab lab (mean over seeds)")
    for k, m in enumerate(methods):
        seeds = [r["win_rate"] for r in table if r.get("method") == m and "win_rate" in r]
        ax.plot([k - 0.2] * len(seeds), seeds, "k.", markersize=4)
    ax.bar(
        xs + 0.2,
        [PUBLISHED.get(m, np.nan) / 100 for m in methods],
        0.4,
        color="C7",
        label="AlpacaFarm (Table 2)",
    )
    ax.axhline(0.5, color="k", lw=0.6, ls=":")
    ax.set_xticks(xs, [TITLES[m] for m in methods], rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("win rate against the reference")
    ax.legend(fontsize=8)
    return figure_png(fig)
