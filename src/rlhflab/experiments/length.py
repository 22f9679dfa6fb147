"""Length and preference (`rlhflab experiment length`): how much of each method's gain is length.

Singhal et al. (2023, "A Long Way to Go: Investigating Length Correlations in RLHF") found that RLHF makes
outputs longer and that most of PPO's reward gain on their tasks came from length, because the preference data
and the reward models trained on them favour longer answers; Dubois et al. (2024, "Length-Controlled
AlpacaEval") control for it by regressing on length and reporting the gain at matched length. Here, per seed,
on the default lab task, the pipeline (SFT -> reward model -> PPO, DPO, and best-of-16 by the reward model)
runs twice on labels from the same annotators except for their length bias: none, or LENGTH_BIAS gold units
per 10 words added to what they perceive (`annotators.length_bias`). The gold reward never sees it.

Every policy is judged on the same held-out prompts against the SFT model's samples: the change in length
(words, as the annotators count them), the gold gain, and the gold gain at matched length, from the least
squares fit gold = a + b * words + c * [policy] on the pooled samples (`rlhflab.eval.length_control`): the
length part is b * delta words, c the rest. The gain the arm's own annotators would see is gold gain +
bias * delta words / 10.
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

NAME = "length"
CLAIM = (
    "With annotators who prefer longer answers, the policies RLHF trains write longer answers, and more of "
    "their gold gain is length: at matched length it shrinks."
)
SOURCE = (
    "Singhal et al. 2023, A Long Way to Go: Investigating Length Correlations in RLHF (Sec. 3-4: length "
    "increases explain most of PPO's reward gain); Dubois et al. 2024, Length-Controlled AlpacaEval (the gain "
    "at matched length, by regression on length)"
)
# The biased annotators' extra perceived gold per 10 words, set before any run: 5 more words (about two
# standard deviations of the sentiment task's demonstrations, 7.9 +- 2.8 words) are worth 0.25 gold, between
# the annotators' "slightly better" (0.1) and "better" (0.3) gaps.
LENGTH_BIAS = 0.5
ARMS = {"unbiased": 0.0, "length_biased": LENGTH_BIAS}
PIPELINE_METHODS = ("sft", "rm", "ppo", "dpo")
BEST_OF = 16
METHODS = ("ppo", "dpo", f"best_of_{BEST_OF}")
RULE = (
    "Per seed and method: 'longer' when the method trained on the length-biased labels writes more words than "
    "the same method on unbiased labels (per-prompt difference, its 95% interval above 0); 'more is length' "
    "when its length part of the gold gain (slope x delta words against SFT) is larger than the unbiased "
    "arm's. reproduced: both on every seed for every method; partly reproduced: 'longer' on every seed for "
    "every method, or both for at least one seed and method; otherwise not reproduced."
)
TASK = "sentiment"  # the lab's default task
# The judging budget (held-out prompts x samples per prompt), set before any run from the time limit.
EVAL = {"prompts": 256, "samples": 2}
# The pipeline's own evaluation (report.json: KL to SFT) is kept small: the experiment judges by its own.
PIPELINE_EVAL = ["eval.prompts=32", "eval.samples=2", "eval.curve_points=2", "eval.curve_prompts=16"]
EVAL_BATCH = 256


def judge_arm(task, run_dir: Path, seed: int, ev: Mapping[str, int]) -> dict[str, dict[str, Any]]:
    """Samples of SFT, every trained policy and best-of-16 on the held-out prompts: {method: {"gold", "words"
    ([P][N] lists), "kl_to_sft", "examples"}}."""
    from rlhflab.eval.best_of_n import best_of_n_kl_formula
    from rlhflab.experiments.alpacafarm import best_of_samples
    from rlhflab.lab.evaluate import sample_policy
    from rlhflab.models.loading import load_causal_lm, load_tokenizer
    from rlhflab.rewards import LearnedReward

    prompts = task.heldout_prompts(ev["prompts"], seed=seed)
    tokenizer = load_tokenizer(run_dir / "sft" / "final")
    report = json.loads((run_dir / "report.json").read_text())["policies"]
    drawn = {}
    for name in ("sft", "ppo", "dpo"):
        model = load_causal_lm(run_dir / name / "final")
        drawn[name] = sample_policy(
            model, tokenizer, task, prompts, n_samples=ev["samples"], seed=seed + 2, batch_size=EVAL_BATCH
        )
    reward = LearnedReward.from_pretrained(run_dir / "rm" / "final", batch_size=EVAL_BATCH)
    sft = load_causal_lm(run_dir / "sft" / "final")
    drawn[METHODS[-1]] = best_of_samples(task, sft, tokenizer, reward, prompts, BEST_OF, ev["samples"], seed)
    kl = {"sft": 0.0, "ppo": report["ppo"]["kl_to_sft"], "dpo": report["dpo"]["kl_to_sft"]}
    # The KL of best-of-n to its base policy is at most log n - (n - 1) / n (Stiennon et al. 2020).
    kl[METHODS[-1]] = best_of_n_kl_formula(BEST_OF)
    return {name: samples_record(s, kl[name]) for name, s in drawn.items()}


def samples_record(samples, kl_to_sft: float) -> dict[str, Any]:
    """What the table is computed from, as saved in ARM/samples.json: gold and word counts per sample."""
    from rlhflab.models.tiny import split_words

    return {
        "gold": samples.gold.tolist(),
        "words": [[len(split_words(r)) for r in rs] for rs in samples.responses],
        "kl_to_sft": kl_to_sft,
        "examples": [
            {"prompt": p, "response": rs[0]} for p, rs in zip(samples.prompts[:4], samples.responses)
        ],
    }


def method_row(record: Mapping, sft: Mapping, bias: float) -> dict[str, Any]:
    """One policy against SFT on the same prompts: words, gold gain, the gain at matched length and its
    length part, win rates raw and at matched length, and the gain the arm's annotators perceive."""
    from rlhflab.eval import metrics as M
    from rlhflab.eval.length_control import length_controlled_gain, length_controlled_win_rate

    gold, words = np.asarray(record["gold"], float), np.asarray(record["words"], float)
    ref_gold, ref_words = np.asarray(sft["gold"], float), np.asarray(sft["words"], float)
    fit = length_controlled_gain(gold, words, ref_gold, ref_words)
    gain = M.paired_gain(gold, ref_gold)
    delta = M.paired_gain(words, ref_words)
    row: dict[str, Any] = {"words": float(words.mean()), "kl_to_sft": record["kl_to_sft"]}
    for key, values in (
        ("delta_words", delta),
        ("gold_gain", gain),
        # Per prompt, the gain moved along the fitted slope to the reference's length; its mean is the fit's c.
        ("gain_at_matched_length", gain - fit.slope * delta),
        ("win_rate", M.win_rate_all_pairs(gold, ref_gold)),
        (
            "win_rate_at_matched_length",
            length_controlled_win_rate(gold, words, ref_gold, ref_words, fit.slope),
        ),
    ):
        mean, lo, hi = M.mean_ci95(values)
        row |= {key: mean, f"{key}_ci95_low": lo, f"{key}_ci95_high": hi}
    row |= {
        "slope_per_word": fit.slope,
        "length_part": fit.length_part,
        "annotator_gain": fit.raw_gain + bias * fit.delta_length / 10.0,
    }
    return row


def seed_rows(seed: int, arms: Mapping[str, Mapping[str, Mapping]]) -> list[dict]:
    """Per arm and method the `method_row`; then per method the check across arms."""
    from rlhflab.eval import metrics as M

    rows = []
    for arm, records in arms.items():
        for method in METHODS:
            row = method_row(records[method], records["sft"], ARMS[arm])
            rows.append({"seed": seed, "arm": arm, "method": method, **row})
    by = {(r["arm"], r["method"]): r for r in rows}
    for method in METHODS:
        biased, unbiased = (
            np.asarray(arms[a][method]["words"], float) for a in ("length_biased", "unbiased")
        )
        longer, lo, hi = M.mean_ci95(biased.mean(axis=1) - unbiased.mean(axis=1))
        parts = {a: by[a, method]["length_part"] for a in ARMS}
        rows.append(
            {
                "seed": seed,
                "method": method,
                "check": "arms",
                "longer_by": longer,
                "longer_by_ci95_low": lo,
                "longer_by_ci95_high": hi,
                "longer": bool(lo > 0),
                "length_part_unbiased": parts["unbiased"],
                "length_part_length_biased": parts["length_biased"],
                "more_is_length": bool(parts["length_biased"] > parts["unbiased"]),
            }
        )
    return rows


def decide(rows: Sequence[Mapping]) -> str:
    """The verdict of RULE from the per-seed "arms" check rows."""
    checks = [r for r in rows if r.get("check") == "arms"]
    both = [r["longer"] and r["more_is_length"] for r in checks]
    if checks and all(both):
        return "reproduced"
    if (checks and all(r["longer"] for r in checks)) or any(both):
        return "partly reproduced"
    return "not reproduced"


def summary_rows(rows: Sequence[Mapping]) -> list[dict]:
    """Per arm and method, the mean over seeds of the headline numbers (seed "all")."""
    keys = ("words", "delta_words", "gold_gain", "gain_at_matched_length", "length_part", "annotator_gain")
    out = []
    for arm in ARMS:
        for method in METHODS:
            mine = [r for r in rows if r.get("arm") == arm and r["method"] == method and "check" not in r]
            out.append(
                {
                    "seed": "all",
                    "arm": arm,
                    "method": method,
                    **{k: float(np.mean([r[k] for r in mine])) for k in keys},
                }
            )
    return out


def findings(rows: Sequence[Mapping]) -> list[str]:
    out = []
    for r in (r for r in rows if r["seed"] == "all"):
        out.append(
            f"all seeds, {r['arm']} annotators, {r['method']}: {r['words']:.1f} words ({r['delta_words']:+.2f} "
            f"against SFT); gold gain {r['gold_gain']:+.3f}, at matched length {r['gain_at_matched_length']:+.3f} "
            f"(length part {r['length_part']:+.3f}); gain its annotators perceive {r['annotator_gain']:+.3f}"
        )
    for r in (r for r in rows if r.get("check") == "arms"):
        out.append(
            f"seed {r['seed']}, {r['method']}: length-biased labels make it {r['longer_by']:+.2f} words longer "
            f"[{r['longer_by_ci95_low']:+.2f}, {r['longer_by_ci95_high']:+.2f}] ({'longer' if r['longer'] else 'not longer'}); "
            f"length part {r['length_part_length_biased']:+.3f} against {r['length_part_unbiased']:+.3f} unbiased"
        )
    return out


def run_arm(
    task, seed: int, arm_dir: Path, bias: float, pipeline: Sequence[str], ev: Mapping[str, int]
) -> dict:
    """One seed and arm: the pipeline on labels from annotators with this length bias, then the judging;
    writes ARM_DIR/samples.json."""
    from rlhflab.core.io import atomic_write_text
    from rlhflab.pipeline import run_pipeline

    run_pipeline(
        task=task.name,
        seed=seed,
        output_dir=str(arm_dir / "run"),
        overrides=[*PIPELINE_EVAL, *pipeline, f"annotators.length_bias={bias}"],
        overwrite=True,
        methods=list(PIPELINE_METHODS),
    )
    print(f"== {NAME}: judging every policy against SFT on {ev['prompts']} held-out prompts")
    records = judge_arm(task, arm_dir / "run", seed, ev)
    atomic_write_text(arm_dir / "samples.json", json.dumps(records) + "\n")
    return records


def run(
    seeds: Sequence[int] = (0,),
    output_dir: str = "runs/length",
    *,
    task: str | None = None,
    overrides: Sequence[str] = (),
    overwrite: bool = False,
    resume: bool = False,
) -> Path:
    """Run the experiment; returns the path of report.html. With `resume`, arms whose samples.json exists are
    read back, not run again."""
    from rlhflab.experiments.common import split_overrides
    from rlhflab.lab.tasks import get_task
    from rlhflab.pipeline import _user_sections

    t0 = time.time()
    task_obj = get_task(task or TASK)
    pipeline, own = split_overrides(
        NAME,
        overrides,
        own={"eval": EVAL},
        pipeline=(*PIPELINE_METHODS, "data", "annotators"),
        fixed={"annotators.length_bias": "0 and 0.5: what the arms compare"},
    )
    _user_sections(None, [*PIPELINE_EVAL, *pipeline])  # the pipeline's own checks, before any work
    out = prepare_run_dir(output_dir, "experiment", resume=resume, overwrite=overwrite)
    rows = []
    for i, seed in enumerate(seeds, 1):
        arms = {}
        for arm, bias in ARMS.items():
            arm_dir = out / f"seed-{seed}" / arm
            if resume and (arm_dir / "samples.json").is_file():
                arms[arm] = json.loads((arm_dir / "samples.json").read_text())
                continue
            print(f"== {NAME}: seed {seed} ({i}/{len(seeds)}), {arm} annotators (length bias {bias})")
            arms[arm] = run_arm(task_obj, seed, arm_dir, bias, pipeline, own["eval"])
        rows += seed_rows(seed, arms)
    rows += summary_rows(rows)
    return publish_run(
        __name__,
        out,
        verdict=decide(rows),
        findings=findings(rows),
        table=rows,
        images={"length_and_gain": plot_length(rows)},
        started=t0,
        seeds=seeds,
        output_dir=output_dir,
        overrides=overrides,
    )


def plot_length(rows: Sequence[Mapping]) -> bytes | None:
    """Left: words against SFT per method and arm; right: gold gain, raw and at matched length (seed means,
    each seed a dot)."""
    import matplotlib.pyplot as plt

    from rlhflab.eval.report import figure_png

    per_seed = [r for r in rows if "check" not in r and r["seed"] != "all"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10.0, 3.6))
    x = np.arange(len(METHODS))
    for k, arm in enumerate(ARMS):
        shift = (k - 0.5) * 0.4
        for ax, keys in ((left, ("delta_words",)), (right, ("gold_gain", "gain_at_matched_length"))):
            width = 0.4 / len(keys)
            for j, key in enumerate(keys):
                pos = x + shift + (j - (len(keys) - 1) / 2) * width
                values = [[r[key] for r in per_seed if r["arm"] == arm and r["method"] == m] for m in METHODS]
                kind = "" if len(keys) == 1 else (", raw" if j == 0 else ", matched length")
                ax.bar(pos, [np.mean(v) for v in values], width, color=f"C{k}", alpha=1.0 - 0.55 * j,
                       label=arm + kind)  # fmt: skip
                for p, v in zip(pos, values):
                    ax.plot([p] * len(v), v, "k.", ms=3)
    for ax, label in ((left, "words against SFT"), (right, "gold gain against SFT")):
        ax.set_xticks(x, METHODS)
        ax.axhline(0.0, color="grey", lw=0.6)
        ax.set_ylabel(label)
        ax.legend(fontsize=7)
    return figure_png(fig)
