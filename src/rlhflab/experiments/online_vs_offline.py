"""Online vs offline preference optimization at the same label budget (`rlhflab experiment online-vs-offline`).

Guo et al. (2024, "Direct Language Model Alignment from Online AI Feedback", Figure 3 and Table 2) found
online DPO, whose pairs are sampled from the current policy and labelled as it trains, clearly ahead of
offline DPO on a fixed dataset; Xu et al. (2023, "Some things are more CRINGE than others") and the Llama 3
post-training rounds label the current policy's samples round by round (iterative DPO). Here, on the lab
task and for each seed, `rlhflab run --methods dpo,online_dpo,iterative_dpo` trains the three from the same
SFT model with the same annotators and learning rate:

    dpo            2,000 pairs labelled once, from the lab's demonstrator responses (one epoch)
    online_dpo     125 steps x 16 prompts: each step's pairs sampled from the current policy (2,000 labels)
    iterative_dpo  3 rounds x 667 prompts, each round a DPO run on the current policy's labelled pairs

and every method is judged on held-out prompts by the gold reward training never saw, finally and along
training (snapshots: gold against KL to SFT, so a method that is ahead only by moving further is visible).

The verdict rule, fixed before the first run: on a seed, an online method *beats* offline DPO when its gold
interval lies above DPO's (the 95% intervals do not overlap). reproduced: both online methods beat offline
DPO on every seed; partly reproduced: at least one beats it on at least one seed and at least one has a
higher mean gold over seeds; otherwise not reproduced.
"""

from __future__ import annotations

import json
import math
import statistics
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from rlhflab.core.run_dir import prepare_run_dir
from rlhflab.experiments.result import command_line, write_result
from rlhflab.pipeline import run_pipeline

NAME = "online-vs-offline"
CLAIM = (
    "Online preference optimization (labels on the current policy's own samples) beats offline DPO on a "
    "fixed dataset at the same label budget."
)
SOURCE = (
    "Guo et al. 2024, Direct Language Model Alignment from Online AI Feedback (Figure 3, Table 2); Xu et al. "
    "2023, Some things are more CRINGE than others (iterative DPO)"
)
RULE = (
    "On a seed an online method beats offline DPO when its gold 95% interval lies above DPO's. reproduced: "
    "online_dpo and iterative_dpo both beat DPO on every seed; partly reproduced: at least one beats it on at "
    "least one seed and at least one has a higher mean gold over seeds; otherwise not reproduced."
)
OFFLINE = "dpo"
ONLINE = ("online_dpo", "iterative_dpo")
METHODS = (OFFLINE, *ONLINE)


def gold_at_kl(curve: Sequence[Mapping], kl: float) -> float | None:
    """Gold reward where a method's held-out curve (points in step order with kl/ref and gold/mean) first
    reaches KL `kl`, linearly interpolated between the two snapshots around it; None if it never gets there.
    Compares methods at matched distance from the reference (Gao et al. 2023 plot gold against sqrt(KL))."""
    pts = [
        (p["kl/ref"], p["gold/mean"])
        for p in curve
        if p.get("kl/ref") is not None and p.get("gold/mean") is not None
    ]
    for (k0, g0), (k1, g1) in zip(pts, pts[1:]):
        if k0 <= kl <= k1:
            return g0 if k1 == k0 else g0 + (g1 - g0) * (kl - k0) / (k1 - k0)
    if pts and pts[0][0] == kl:
        return pts[0][1]
    return None


def seed_rows(seed: int, report: Mapping) -> list[dict]:
    """One table row per method of one seed's report.json. `curve_gold_at_dpo_kl` reads every method's
    held-out curve (one prompt set for all, other draws than the final evaluation's) at the KL where offline
    DPO's curve ends: methods compared at matched distance from SFT, on the same prompts."""
    policies, curves = report["policies"], report["curves"]
    dpo = policies[OFFLINE]
    dpo_curve = curves.get(OFFLINE) or [{}]
    target = dpo_curve[-1].get("kl/ref")
    rows = []
    for method in METHODS:
        p = policies[method]
        matched = None if target is None else gold_at_kl(curves.get(method, []), target)
        rows.append(
            {
                "method": method,
                "seed": seed,
                "gold": p["gold_reward_mean"],
                "gold_ci95": p["gold_reward_ci95"],
                "gold_minus_dpo": p["gold_reward_mean"] - dpo["gold_reward_mean"],
                "beats_dpo": p["gold_reward_mean"] - p["gold_reward_ci95"]
                > dpo["gold_reward_mean"] + dpo["gold_reward_ci95"],
                "curve_gold_at_dpo_kl": matched,
                "kl_to_sft": p["kl_to_sft"],
                "win_rate_vs_sft": p["win_rate_vs_sft"],
                "label_queries": p["label_queries"],
                "sft_gold": policies["sft"]["gold_reward_mean"],
            }
        )
    return rows


def summary_rows(rows: Sequence[Mapping]) -> list[dict]:
    """Per method over seeds: mean and standard deviation of gold, seeds where it beats offline DPO."""
    out = []
    for method in METHODS:
        mine = [r for r in rows if r["method"] == method]
        golds = [r["gold"] for r in mine]
        out.append(
            {
                "method": method,
                "seed": "mean",
                "gold": statistics.fmean(golds),
                "gold_std": statistics.stdev(golds) if len(golds) > 1 else 0.0,
                "gold_minus_dpo": statistics.fmean(r["gold_minus_dpo"] for r in mine),
                "beats_dpo": f"{sum(bool(r['beats_dpo']) for r in mine)}/{len(mine)}",
                "kl_to_sft": statistics.fmean(r["kl_to_sft"] for r in mine),
                "label_queries": statistics.fmean(r["label_queries"] for r in mine),
            }
        )
    return out


def decide(rows: Sequence[Mapping]) -> str:
    """The verdict of RULE from the per-seed rows (summary rows are ignored)."""
    per_seed = [r for r in rows if r["seed"] != "mean" and r["method"] in ONLINE]
    beats = {m: [bool(r["beats_dpo"]) for r in per_seed if r["method"] == m] for m in ONLINE}
    ahead = {
        m: statistics.fmean(r["gold_minus_dpo"] for r in per_seed if r["method"] == m) > 0 for m in ONLINE
    }
    if all(all(b) for b in beats.values()):
        return "reproduced"
    if any(any(b) for b in beats.values()) and any(ahead.values()):
        return "partly reproduced"
    return "not reproduced"


def findings(rows: Sequence[Mapping]) -> list[str]:
    """The numbers behind the verdict, in words."""
    summary = {r["method"]: r for r in rows if r["seed"] == "mean"}
    lines = []
    for m in METHODS:
        s = summary[m]
        lines.append(
            f"{m}: gold {s['gold']:.3f} ± {s['gold_std']:.3f} (mean ± sd over seeds), KL to SFT "
            f"{s['kl_to_sft']:.2f}, {s['label_queries']:.0f} labels"
            + (
                ""
                if m == OFFLINE
                else f", beats offline DPO on {s['beats_dpo']} seeds ({s['gold_minus_dpo']:+.3f})"
            )
        )
    budgets = [summary[m]["label_queries"] for m in METHODS]
    if max(budgets) > 1.05 * min(budgets):
        lines.append(f"label budgets differ by more than 5%: {budgets}")
    return lines


def run(
    seeds: Sequence[int] = (0, 1, 2),
    output_dir: str = "runs/online-vs-offline",
    *,
    task: str = "sentiment",
    overrides: Sequence[str] = (),
    overwrite: bool = False,
    resume: bool = False,
) -> Path:
    """Run the experiment; returns the path of report.html. With `resume`, seeds already finished (their
    report.json written) are read back, not trained again."""
    t0 = time.time()
    out = prepare_run_dir(output_dir, "experiment", resume=resume, overwrite=overwrite)
    reports = {}
    for i, seed in enumerate(seeds, 1):
        seed_dir = out / f"seed-{seed}"
        if not (resume and (seed_dir / "report.json").is_file()):
            print(f"== {NAME}: seed {seed} ({i}/{len(seeds)})")
            run_pipeline(
                task=task,
                seed=seed,
                output_dir=str(seed_dir),
                overrides=list(overrides),
                overwrite=True,
                methods=list(METHODS),
            )
        reports[seed] = json.loads((seed_dir / "report.json").read_text())
    rows = [row for seed in seeds for row in seed_rows(seed, reports[seed])]
    rows += summary_rows(rows)
    command = command_line(NAME, seeds, output_dir, overrides)
    paths = write_result(
        out,
        experiment=NAME,
        claim=CLAIM,
        source=SOURCE,
        verdict=decide(rows),
        rule=RULE,
        findings=findings(rows),
        table=rows,
        images={"gold_vs_kl": plot_gold_vs_kl(reports), "gold_by_seed": plot_gold_by_seed(rows)},
        runtime_s=time.time() - t0,
        seeds=seeds,
        command=command,
    )
    print(f"{NAME}: {decide(rows)}")
    for line in findings(rows):
        print(f"  {line}")
    print(f"report: {paths['html']}")
    return paths["html"]


def plot_gold_vs_kl(reports: Mapping[int, Mapping]) -> bytes | None:
    """Held-out gold against sqrt(KL to SFT) over training: one colour per method, one line per seed."""
    import matplotlib.pyplot as plt

    from rlhflab.eval.report import figure_png

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for i, method in enumerate(METHODS):
        for j, report in enumerate(reports.values()):
            pts = [
                (math.sqrt(max(0.0, p["kl/ref"])), p["gold/mean"]) for p in report["curves"].get(method, [])
            ]
            ax.plot(
                [p[0] for p in pts],
                [p[1] for p in pts],
                marker=".",
                color=f"C{i}",
                alpha=0.8,
                label=method if j == 0 else None,
            )
            final = report["policies"][method]
            ax.plot(
                math.sqrt(max(0.0, final["kl_to_sft"])), final["gold_reward_mean"], "*", ms=9, color=f"C{i}"
            )
    ax.set_xlabel("sqrt(KL to SFT)")
    ax.set_ylabel("gold reward (held-out prompts)")
    ax.set_title(
        "gold vs distance from SFT over training (lines: snapshots on 32 prompts,\n"
        "one line per seed; stars: the final policies on the larger evaluation set)",
        fontsize=10,
    )
    ax.legend(fontsize=8)
    return figure_png(fig)


def plot_gold_by_seed(rows: Sequence[Mapping]) -> bytes | None:
    """Final gold with its 95% interval, per seed and method, SFT's gold as a dashed line per seed."""
    import matplotlib.pyplot as plt

    from rlhflab.eval.report import figure_png

    per_seed = [r for r in rows if r["seed"] != "mean"]
    seeds = sorted({r["seed"] for r in per_seed})
    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    width = 0.8 / len(METHODS)
    for i, method in enumerate(METHODS):
        mine = {r["seed"]: r for r in per_seed if r["method"] == method}
        xs = [k + (i - (len(METHODS) - 1) / 2) * width for k in range(len(seeds))]
        ax.bar(
            xs,
            [mine[s]["gold"] for s in seeds],
            width,
            yerr=[mine[s]["gold_ci95"] for s in seeds],
            capsize=3,
            color=f"C{i}",
            label=method,
        )
    for k, s in enumerate(seeds):
        sft = next(r["sft_gold"] for r in per_seed if r["seed"] == s)
        ax.hlines(sft, k - 0.45, k + 0.45, colors="k", linestyles="dashed", label="sft" if k == 0 else None)
    ax.set_xticks(range(len(seeds)), [f"seed {s}" for s in seeds])
    ax.set_ylabel("gold reward (held-out prompts)")
    ax.legend(fontsize=8, ncol=len(METHODS) + 1, loc="upper center", bbox_to_anchor=(0.5, -0.1))
    return figure_png(fig)
