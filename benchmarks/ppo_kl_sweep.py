"""PPO's KL setting on the lab, judged on the training prompts only: does the gold reward of the rollouts hold
up to the last iteration?

    .venv/bin/python benchmarks/ppo_kl_sweep.py --runs /tmp/seeds/runs --seeds 0 1 2 3 4 \
        --settings algo.kl_coef=0.05 algo.kl_coef=0.1 "algo.adaptive_kl=true algo.target_kl=4"

For each seed directory made by `benchmarks/pipeline_seeds.py` (or `rlhflab run`), re-runs only its PPO stage
from its own config.yaml (the same SFT model, reward model and prompt file) with each setting, then scores
every logged rollout with the lab's gold reward. These are the *training* prompts: the held-out prompts the
report judges policies on are never read here, so a setting picked with this script is not tuned on them.

Per seed and setting it prints the gold reward of the rollouts, as 10-iteration means: the peak, where it is,
and the last one, the drop from peak to last, and the final KL. Writes OUT/sweep.json.
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import time
from pathlib import Path


def run_ppo(seed_dir: Path, out: Path, overrides: list[str]) -> Path:
    from rlhflab.config import load_config
    from rlhflab.pipeline import _train

    cfg = load_config("ppo", str(seed_dir / "ppo" / "config.yaml"), [f"logging.output_dir={out}", *overrides])
    cfg.logging.progress = False
    return _train("ppo", cfg)


def windows(curve: list[dict], key: str, width: int = 10) -> list[float]:
    values = [p[key] for p in curve]
    return [statistics.fmean(values[i : i + width]) for i in range(0, len(values), width)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", required=True, help="directory with seed-S run directories")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    ap.add_argument("--settings", nargs="+", required=True, help="each a space-separated override list")
    ap.add_argument("--out", default="/tmp/ppo-kl-sweep")
    args = ap.parse_args()

    from rlhflab.lab.tasks import get_task
    from rlhflab.pipeline import _gold_curve

    results = []
    for setting in args.settings:
        overrides = shlex.split(setting)
        for seed in args.seeds:
            seed_dir = Path(args.runs) / f"seed-{seed}"
            task = get_task(json.loads((seed_dir / "report.json").read_text())["task"])
            out = Path(args.out) / setting.replace(" ", "_").replace("=", "") / f"seed-{seed}"
            t = time.time()
            run_ppo(seed_dir, out, overrides)
            curve = _gold_curve(task, out)
            gold, kl = windows(curve, "gold/mean"), windows(curve, "kl/ref")
            peak = max(range(len(gold)), key=gold.__getitem__)
            row = {
                "setting": setting,
                "seed": seed,
                "gold_windows": gold,
                "kl_windows": kl,
                "peak": gold[peak],
                "peak_window": peak,
                "last": gold[-1],
                "drop": gold[peak] - gold[-1],
                "final_kl": kl[-1],
                "wall_s": time.time() - t,
            }
            results.append(row)
            print(json.dumps({k: v for k, v in row.items() if not k.endswith("windows")}), flush=True)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "sweep.json").write_text(json.dumps(results, indent=1))
    print("\n| setting | seed | gold by 10 iterations | peak | last | drop | final KL |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        g = " ".join(f"{v:.2f}" for v in r["gold_windows"])
        print(
            f"| {r['setting']} | {r['seed']} | {g} | {r['peak']:.2f} | {r['last']:.2f} | {r['drop']:.2f} "
            f"| {r['final_kl']:.1f} |"
        )


if __name__ == "__main__":
    main()
