"""`rlhflab run` over several seeds: gold reward, win rate and KL of each policy, mean and spread across seeds.

    .venv/bin/python benchmarks/pipeline_seeds.py --seeds 0 1 2 --work-dir runs/seeds

Each seed is a full, independent `rlhflab run` (its own lab data, annotator draws, training and evaluation)
in WORK_DIR/seed-S. Prints one JSON line per policy and a markdown table (the one kept in BENCHMARKS.md),
and writes WORK_DIR/seeds.json. For each seed it also checks the claim that PPO and DPO beat SFT's
gold reward by more than the 95% interval (the sum of both half-widths, i.e. the intervals do not overlap).
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

FIELDS = ("gold_reward_mean", "gold_reward_ci95", "win_rate_vs_sft", "kl_to_sft", "mean_length")


def run_seed(seed: int, work: Path, extra: list[str]) -> dict:
    out = work / f"seed-{seed}"
    cmd = [
        sys.executable,
        "-m",
        "rlhflab.cli",
        "run",
        "--seed",
        str(seed),
        "--output-dir",
        str(out),
        "--overwrite",
        *extra,
    ]
    t = time.time()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    report = json.loads((out / "report.json").read_text())
    report["wall_s"] = time.time() - t
    return report


def beats_sft(policies: dict, name: str) -> bool:
    sft, p = policies["sft"], policies[name]
    return p["gold_reward_mean"] - p["gold_reward_ci95"] > sft["gold_reward_mean"] + sft["gold_reward_ci95"]


def summarize(reports: list[dict]) -> dict:
    names = list(reports[0]["policies"])
    table = {}
    for name in names:
        row = {}
        for field in FIELDS:
            values = [r["policies"][name][field] for r in reports]
            row[field] = {
                "mean": statistics.fmean(values),
                "std": statistics.stdev(values) if len(values) > 1 else 0.0,
                "per_seed": values,
            }
        table[name] = row
    return table


def markdown(table: dict, reports: list[dict]) -> str:
    lines = [
        "| policy | gold reward (mean ± std over seeds) | per seed | win rate vs SFT | KL to SFT | mean length |",
        "|---|---|---|---|---|---|",
    ]
    for name, row in table.items():
        g = row["gold_reward_mean"]
        per = ", ".join(f"{v:.3f}" for v in g["per_seed"])
        lines.append(
            f"| {name} | {g['mean']:.3f} ± {g['std']:.3f} | {per} | {row['win_rate_vs_sft']['mean']:.2f} | "
            f"{row['kl_to_sft']['mean']:.2f} | {row['mean_length']['mean']:.1f} |"
        )
    accs = [r["reward_model"]["heldout_accuracy"] for r in reports]
    walls = [r["runtime_s"] for r in reports]
    lines.append("")
    lines.append(
        f"Reward model held-out accuracy: {statistics.fmean(accs):.3f} "
        f"(per seed {', '.join(f'{a:.3f}' for a in accs)}). "
        f"Pipeline runtime: {statistics.fmean(walls):.0f} s mean (per seed {', '.join(f'{w:.0f}' for w in walls)})."
    )
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--work-dir", default="runs/seeds")
    ap.add_argument("overrides", nargs="*", help="passed to `rlhflab run` (e.g. ppo.algo.kl_coef=0.1)")
    args = ap.parse_args()
    work = Path(args.work_dir)
    reports = []
    for seed in args.seeds:
        print(f"seed {seed}: running", file=sys.stderr, flush=True)
        reports.append(run_seed(seed, work, args.overrides))
        verdict = {n: beats_sft(reports[-1]["policies"], n) for n in ("ppo", "dpo")}
        print(
            f"seed {seed}: done in {reports[-1]['wall_s']:.0f} s; beats SFT beyond the 95% intervals: {verdict}",
            file=sys.stderr,
            flush=True,
        )
    table = summarize(reports)
    for name, row in table.items():
        print(
            json.dumps(
                {
                    "policy": name,
                    **{f: row[f]["mean"] for f in FIELDS},
                    "gold_reward_std_over_seeds": row["gold_reward_mean"]["std"],
                }
            )
        )
    md = markdown(table, reports)
    print(md)
    result = {
        "date": datetime.date.today().isoformat(),
        "seeds": args.seeds,
        "overrides": args.overrides,
        "table": table,
        "beats_sft": [{n: beats_sft(r["policies"], n) for n in ("ppo", "dpo")} for r in reports],
        "markdown": md,
    }
    (work / "seeds.json").write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
