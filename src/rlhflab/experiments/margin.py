"""Llama 2's rating margin in the reward model's loss, by rating (`rlhflab experiment margin`).

Touvron et al. (2023, "Llama 2: Open Foundation and Fine-Tuned Chat Models", Sec. 3.2.2, Eq. 2) subtract a
margin m(r) that grows with the annotators' rating from the reward difference in the ranking loss,
-log sigmoid(r_c - r_r - m(r)). Table 27 gives two margin tables (significantly better / better / slightly
better / negligibly better): "small" 1, 2/3, 1/3, 0 and "large" 3, 2, 1, 0. Table 28 reports the helpful
reward model's held-out accuracy per rating:

                     significantly better   better   slightly better   negligibly better   average
    no margin              79.1              66.9         59.8               54.5             62.5
    small margin           80.4              67.3         60.4               55.0             63.0
    large margin           80.7              67.5         60.5               54.3             62.9

The margin helps most on the most separable pairs, and the large one costs a little on the least separable.

Here, per seed, on the default lab task: the pipeline's lab data (its simulated annotators give every pair one
of the four ratings) and its SFT model, then three reward models initialized from the SFT model and trained on
the same pairs with the pipeline's reward-model budget, one per margin setting (`rm.algo.margin` none, small,
large). Each is scored on fresh held-out pairs no reward model trained on: demonstrator responses to held-out
prompts, judged by the same annotators (the settings and length biases the data's manifest recorded), with
their rating. Accuracy is reported against the annotators' labels (Table 28's measure) and against the hidden
gold ordering, per rating, per seed and pooled over the seeds' pairs, with 95% Wilson intervals; each margin's
gain over no margin comes with the 95% interval of the paired per-pair differences (the same pairs, so the
pairs' difficulty cancels out).

The helpers for the shared part (data, SFT, reward models, fresh pairs, accuracy cells) also serve
`rlhflab.experiments.rm_init`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from rlhflab.core.run_dir import prepare_run_dir
from rlhflab.data.records import LLAMA2_RATINGS
from rlhflab.errors import ConfigError
from rlhflab.experiments.result import publish_run

NAME = "margin"
CLAIM = (
    "A Llama 2 rating margin in the reward model's loss helps most on 'significantly better' pairs and costs "
    "little on 'negligibly better' ones."
)
SOURCE = (
    "Touvron et al. 2023, Llama 2: Open Foundation and Fine-Tuned Chat Models, Sec. 3.2.2 (Eq. 2), Table 27 "
    "(the small and large margins) and Table 28 (reward-model accuracy by rating with no, small and large margin)"
)
ARMS = ("none", "small", "large")  # rm.algo.margin of each reward model; "none" is the reference
REFERENCE = "none"
BUCKETS = LLAMA2_RATINGS  # significantly_better, better, slightly_better, negligibly_better
HELPED, SIMILAR = BUCKETS[0], BUCKETS[3]
COST = 0.02  # "costs little": 2 accuracy points; Llama 2's large margin cost 0.2 on negligibly-better pairs
RULE = (
    "Accuracy is the share of fresh held-out pairs a reward model orders as the annotators did (equal scores "
    "count 1/2), per Llama 2 rating, pooled over the seeds' pairs; a margin's gain in a rating is its accuracy "
    "minus the no-margin model's on the same pairs, with the 95% interval of the paired per-pair differences. "
    "For each margin table (small, large): it 'helps most' when its gain on significantly-better pairs is "
    "positive and at least its gain in every other rating; the help is 'clear' when that gain's interval lies "
    f"above 0; it 'costs little' when its gain on negligibly-better pairs is at least -{COST}. reproduced: some "
    "table helps most, clearly, and costs little; partly reproduced: some table helps most (but not clearly, "
    "or at a larger cost), or helps clearly on significantly-better pairs at little cost without helping most "
    "there; otherwise not reproduced."
)
TASK = "sentiment"
# Fresh held-out pairs per seed (eval.rm_pairs): about 600 'negligibly better' ones at the lab's default
# annotators, enough for a +-4 point interval in the smallest rating; scoring them takes seconds per model.
HELDOUT_PAIRS = 4096
# Seeds of the held-out draws (prompts, the annotators' choices, the demonstrator's candidates): streams no
# file of `rlhflab.lab.make_data` uses, so the pairs are fresh.
HELDOUT_STREAM, HELDOUT_DRAW = 31, 9
# Pipeline sections this experiment reads: the data it trains on, the annotators, SFT and the reward model.
SECTIONS = ("data", "eval", "annotators", "sft", "rm")
DATA_KEYS = ("n_sft", "n_pairs")
Z95 = 1.959963984540054


# --------------------------------------------------------------------------------------------------------
# Accuracy with intervals (pure)
# --------------------------------------------------------------------------------------------------------


def wilson_ci95(successes: float, n: int) -> tuple[float, float]:
    """95% Wilson score interval of a proportion successes / n (nan, nan for n = 0). Unlike the normal
    interval it stays inside [0, 1] and is not empty at 0 or n successes, as a reward model's accuracy on
    clear-cut pairs often is."""
    if n <= 0:
        return math.nan, math.nan
    p, z2 = successes / n, Z95 * Z95
    denom = 1 + z2 / n
    centre = (p + z2 / (2 * n)) / denom
    half = Z95 * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / denom
    return centre - half, centre + half


def pair_correct(chosen_scores: Sequence[float], rejected_scores: Sequence[float]) -> np.ndarray:
    """Per pair: 1 when the chosen response scores higher, 1/2 on equal scores, else 0 ([N] float64)."""
    c, r = np.asarray(chosen_scores, dtype=np.float64), np.asarray(rejected_scores, dtype=np.float64)
    return (c > r) + 0.5 * (c == r)


def accuracy_cell(prefix: str, correct: np.ndarray) -> dict[str, float]:
    """{prefix: mean, prefix_ci95_low, prefix_ci95_high} of per-pair correctness (Wilson, ties as 1/2)."""
    correct = np.asarray(correct, dtype=np.float64)
    lo, hi = wilson_ci95(float(correct.sum()), correct.size)
    mean = float(correct.mean()) if correct.size else math.nan
    return {prefix: mean, f"{prefix}_ci95_low": lo, f"{prefix}_ci95_high": hi}


def paired_difference(prefix: str, correct_a: np.ndarray, correct_b: np.ndarray) -> dict[str, float]:
    """{prefix: mean of a - b, prefix_ci95_low, prefix_ci95_high}: a Student-t interval of the per-pair
    differences of two scorers on the same pairs (nan bounds below two pairs)."""
    from rlhflab.eval.metrics import mean_ci95

    mean, lo, hi = mean_ci95(
        np.asarray(correct_a, dtype=np.float64) - np.asarray(correct_b, dtype=np.float64)
    )
    return {prefix: mean, f"{prefix}_ci95_low": lo, f"{prefix}_ci95_high": hi}


def correctness(scores: Mapping[str, Mapping], gold_chosen, gold_rejected) -> tuple[dict, dict]:
    """Per scorer: per-pair agreement with the annotators' label, and with the gold order (nan where the two
    responses' gold is equal: no order to agree with). `scores`: {name: {"chosen": [N], "rejected": [N]}}."""
    gc, gr = np.asarray(gold_chosen, dtype=np.float64), np.asarray(gold_rejected, dtype=np.float64)
    label, gold = {}, {}
    for name, s in scores.items():
        c, r = np.asarray(s["chosen"], dtype=np.float64), np.asarray(s["rejected"], dtype=np.float64)
        label[name] = pair_correct(c, r)
        by_gold = pair_correct(np.where(gc > gr, c, r), np.where(gc > gr, r, c))
        gold[name] = np.where(gc == gr, np.nan, by_gold)
    return label, gold


def bucket_rows(seed: int | str, ratings: Sequence[str], label: Mapping, gold: Mapping) -> list[dict]:
    """One row per margin setting and rating (and "overall"): accuracy against the annotators' labels and the
    gold order with 95% intervals, and the gain over `REFERENCE` on the same pairs with its paired interval.
    `label` / `gold`: {setting: per-pair correctness [N]} from `correctness`."""
    ratings = np.asarray(list(ratings), dtype=object)
    rows = []
    for arm in label:
        for bucket in (*BUCKETS, "overall"):
            m = np.ones(ratings.size, dtype=bool) if bucket == "overall" else ratings == bucket
            g = gold[arm][m]
            g = g[~np.isnan(g)]
            row = {"seed": seed, "margin": arm, "rating": bucket, "n": int(m.sum())}
            row |= accuracy_cell("accuracy", label[arm][m])
            if arm == REFERENCE:
                row |= {"gain_vs_none": None, "gain_vs_none_ci95_low": None, "gain_vs_none_ci95_high": None}
            else:
                row |= paired_difference("gain_vs_none", label[arm][m], label[REFERENCE][m])
            row |= {"gold_n": int(g.size), **accuracy_cell("gold_accuracy", g)}
            rows.append(row)
    return rows


def is_finite_number(x: Any) -> bool:
    """A number that is neither None nor nan/inf (result.json writes non-finite numbers as null)."""
    return x is not None and math.isfinite(x)


def margin_checks(rows: Sequence[Mapping]) -> dict[str, dict[str, bool]]:
    """RULE's three checks ('helps_most', 'clear', 'cheap') for each margin table, from the pooled rows."""
    pooled = {(r["margin"], r["rating"]): r for r in rows if r["seed"] == "all"}
    out = {}
    for arm in (a for a in ARMS if a != REFERENCE):
        gains = {b: pooled[arm, b]["gain_vs_none"] for b in BUCKETS if (arm, b) in pooled}
        top = gains.get(HELPED)
        others = [g for b, g in gains.items() if b != HELPED and is_finite_number(g)]
        low = pooled.get((arm, HELPED), {}).get("gain_vs_none_ci95_low")
        similar = gains.get(SIMILAR)
        out[arm] = {
            "helps_most": is_finite_number(top) and top > 0 and all(top >= g for g in others),
            "clear": is_finite_number(low) and low > 0,
            "cheap": is_finite_number(similar) and similar >= -COST,
        }
    return out


def decide(rows: Sequence[Mapping]) -> str:
    """The verdict of RULE from the table's pooled rows (seed "all")."""
    checks = margin_checks(rows).values()
    if any(c["helps_most"] and c["clear"] and c["cheap"] for c in checks):
        return "reproduced"
    if any(c["helps_most"] or (c["clear"] and c["cheap"]) for c in checks):
        return "partly reproduced"
    return "not reproduced"


# --------------------------------------------------------------------------------------------------------
# Overrides: a key acts or is refused
# --------------------------------------------------------------------------------------------------------


def _has(section: Mapping, dotted: str) -> bool:
    head, _, rest = dotted.partition(".")
    if head not in section:
        return False
    return not rest or (isinstance(section[head], Mapping) and _has(section[head], rest))


def check_overrides(
    name: str,
    user: Mapping[str, Any],
    *,
    eval_keys: Sequence[str],
    varied: Mapping[str, str],
) -> None:
    """Refuse, with a ConfigError saying why, every override the experiment would ignore: sections of methods
    it does not run, data and eval keys it does not read, and the keys it varies itself (`varied`: dotted key ->
    the values it takes). Every annotators key acts: it labels the training pairs and the fresh ones."""
    for section in user:
        if section not in SECTIONS:
            raise ConfigError(
                f"{name}: section '{section}' is for a method this experiment does not run; it trains SFT and "
                f"reward models only (sections: {', '.join(SECTIONS)})"
            )
    for section, known in (("data", DATA_KEYS), ("eval", tuple(eval_keys))):
        for key in user.get(section, {}):
            if key not in known:
                raise ConfigError(
                    f"{name}: {section}.{key} does not act in this experiment; it reads "
                    + (", ".join(f"{section}.{k}" for k in known) or f"no {section} key")
                )
    for dotted, values in varied.items():
        if _has(user, dotted):
            raise ConfigError(f"{name}: {dotted} is what this experiment varies ({values}); leave it out")


# --------------------------------------------------------------------------------------------------------
# Data, SFT and reward models, as the pipeline makes them
# --------------------------------------------------------------------------------------------------------


def stage_configs(task: str, seed_dir: Path, seed: int, user: Mapping) -> dict:
    """The pipeline's SFT and reward-model configs for one seed (built, so validated, before any work)."""
    from rlhflab.pipeline import _configs, _section

    data = {kind: seed_dir / "data" / f"{kind}.jsonl" for kind in ("sft", "pairs", "prompts")}
    return _configs(["sft", "rm"], seed_dir, seed, task, dict(user), data, _section(dict(user), "eval"))


def rm_variant(cfg, out_dir: Path, *, margin: str | None = None, model: str | Path | None = None):
    """The pipeline's reward-model config with its own run directory, and another margin or initial model."""
    algo = cfg.algo if margin is None else dataclasses.replace(cfg.algo, margin=margin)
    section = cfg.model if model is None else dataclasses.replace(cfg.model, name_or_path=str(model))
    logging = dataclasses.replace(cfg.logging, output_dir=str(out_dir))
    return dataclasses.replace(cfg, algo=algo, model=section, logging=logging)


def train_once(name: str, cfg, task: str, resume: bool) -> Path:
    """Train a pipeline method ("sft" or "rm") into cfg.logging.output_dir; with `resume`, a finished run is
    kept and an interrupted one continues from its last checkpoint."""
    from rlhflab.pipeline import _train

    run_dir = Path(cfg.logging.output_dir)
    if resume and (run_dir / "final").is_dir():
        print(f"{run_dir}: kept its final model (resumed run)")
        return run_dir / "final"
    continues = resume and run_dir.is_dir() and any(run_dir.iterdir())
    return Path(_train(name, cfg, task=task, resume=continues))


def prepare_seed(task, seed_dir: Path, seed: int, user: Mapping, sft_cfg, resume: bool) -> Path:
    """The pipeline's lab data (labelled by the user's annotators) and SFT model for one seed; returns the SFT
    model's directory."""
    from rlhflab.pipeline import _make_data

    if not (resume and (seed_dir / "data" / "lab_data.json").is_file()):
        _make_data(task, seed_dir / "data", seed, dict(user))
    return train_once("sft", sft_cfg, task.name, resume)


def fresh_pairs(task, data_dir: Path, seed: int, n: int) -> list[dict]:
    """About `n` annotated pairs on held-out prompts (ties dropped unless the annotators keep them), judged by
    the annotators of `data_dir`'s manifest: the same settings and the same per-annotator length biases."""
    from rlhflab.lab.annotators import AnnotatorPool, AnnotatorSettings
    from rlhflab.lab.make_data import ResponseSource, _pair_rows
    from rlhflab.lab.tasks import chat_prompt

    recorded = json.loads((data_dir / "lab_data.json").read_text())["annotators"]
    fields = {f.name for f in dataclasses.fields(AnnotatorSettings)}
    settings = AnnotatorSettings(**{k: v for k, v in recorded.items() if k in fields})
    stream = seed * 1000 + HELDOUT_STREAM
    pool = AnnotatorPool(task, settings, seed=stream)
    pool.biases = np.asarray(recorded["biases"], dtype=np.float64)  # the training pairs' annotators
    prompts = task.heldout_prompts(n, seed=stream)
    source = ResponseSource(task, seed=seed)
    return _pair_rows(task, pool, source, n, seed, chat_prompt, prompts=prompts, draw=HELDOUT_DRAW)[0]


def score_pairs(reward_dir: Path, pairs: Sequence[Mapping]) -> dict[str, list[float]]:
    """A reward model's scores of every pair's chosen and rejected response."""
    from rlhflab.rewards import LearnedReward
    from rlhflab.stages.best_of_n import score_in_batches

    reward = LearnedReward.from_pretrained(reward_dir, batch_size=256)
    prompts = [p["prompt"] for p in pairs]
    scores = score_in_batches(
        reward, prompts + prompts, [p["chosen"] for p in pairs] + [p["rejected"] for p in pairs]
    )
    return {"chosen": scores[: len(pairs)].tolist(), "rejected": scores[len(pairs) :].tolist()}


def heldout_record(task, pairs: Sequence[Mapping], rm_dirs: Mapping[str, Path]) -> dict:
    """What the accuracy rows are computed from: every pair's rating and gold, and each model's scores."""
    from rlhflab.lab.gold import gold_scores
    from rlhflab.lab.tasks import prompt_text

    texts = [prompt_text(p["prompt"]) for p in pairs]
    return {
        "rating": [p["rating"] for p in pairs],
        "gold_chosen": gold_scores(task, texts, [p["chosen"] for p in pairs]).tolist(),
        "gold_rejected": gold_scores(task, texts, [p["rejected"] for p in pairs]).tolist(),
        "scores": {name: score_pairs(d, pairs) for name, d in rm_dirs.items()},
    }


def heldout_for_seed(
    task, seed_dir: Path, seed: int, n: int, rm_dirs: Mapping[str, Path], resume: bool
) -> dict:
    """Fresh pairs for one seed scored by each reward model, kept in SEED/heldout_scores.json (with the pairs in
    SEED/heldout_pairs.jsonl); with `resume`, read back when there."""
    from rlhflab.core.io import atomic_write_text
    from rlhflab.data.readers import write_jsonl

    path = seed_dir / "heldout_scores.json"
    if resume and path.is_file():
        return json.loads(path.read_text())
    pairs = fresh_pairs(task, seed_dir / "data", seed, n)
    if not pairs:
        raise ConfigError(f"no held-out pair survived (eval.rm_pairs={n}); raise eval.rm_pairs")
    write_jsonl(pairs, seed_dir / "heldout_pairs.jsonl")
    record = heldout_record(task, pairs, rm_dirs)
    atomic_write_text(path, json.dumps(record) + "\n")
    return record


def pooled(records: Sequence[Mapping]) -> dict:
    """Several seeds' held-out records as one (their pairs concatenated)."""
    names = list(records[0]["scores"])
    return {
        "rating": [r for rec in records for r in rec["rating"]],
        "gold_chosen": [g for rec in records for g in rec["gold_chosen"]],
        "gold_rejected": [g for rec in records for g in rec["gold_rejected"]],
        "scores": {
            n: {k: [s for rec in records for s in rec["scores"][n][k]] for k in ("chosen", "rejected")}
            for n in names
        },
    }


# --------------------------------------------------------------------------------------------------------
# The experiment
# --------------------------------------------------------------------------------------------------------


def run_seed(
    task, seed_dir: Path, seed: int, user: Mapping, configs: Mapping, n_pairs: int, resume: bool
) -> dict:
    """Data, SFT, one reward model per margin setting, and their scores on fresh pairs."""
    sft_dir = prepare_seed(task, seed_dir, seed, user, configs["sft"], resume)
    rm_dirs = {}
    for arm in ARMS:
        print(f"== {NAME}: seed {seed}, reward model with rm.algo.margin={arm}")
        cfg = rm_variant(configs["rm"], seed_dir / f"rm-{arm}", margin=arm, model=sft_dir)
        rm_dirs[arm] = train_once("rm", cfg, task.name, resume)
    return heldout_for_seed(task, seed_dir, seed, n_pairs, rm_dirs, resume)


def table(records: Mapping[int, Mapping]) -> list[dict]:
    """Rows per seed, then pooled over the seeds (seed "all")."""
    rows = []
    for seed, rec in [*records.items(), ("all", pooled(list(records.values())))]:
        label, gold = correctness(rec["scores"], rec["gold_chosen"], rec["gold_rejected"])
        rows += bucket_rows(seed, rec["rating"], label, gold)
    return rows


def findings(rows: Sequence[Mapping]) -> list[str]:
    def cell(r: Mapping, key: str) -> str:
        return f"{r[key]:.3f} [{r[key + '_ci95_low']:.3f}, {r[key + '_ci95_high']:.3f}]"

    out = []
    by = {(r["seed"], r["margin"], r["rating"]): r for r in rows}
    seeds = list(dict.fromkeys(r["seed"] for r in rows))
    for arm in ARMS:
        r = by["all", arm, "overall"]
        line = (
            f"all seeds, margin {arm}: accuracy {cell(r, 'accuracy')} (gold order {cell(r, 'gold_accuracy')})"
        )
        parts = []
        for b in BUCKETS:
            rb = by["all", arm, b]
            gain = "" if arm == REFERENCE else f", gain {cell(rb, 'gain_vs_none')}"
            parts.append(f"{b} {rb['accuracy']:.3f} (n={rb['n']}{gain})")
        out.append(f"{line}; " + "; ".join(parts))
    for seed in (s for s in seeds if s != "all"):
        out.append(
            f"seed {seed}: "
            + ", ".join(
                f"{arm}: {by[seed, arm, HELPED]['accuracy']:.3f} on {HELPED}, "
                f"{by[seed, arm, SIMILAR]['accuracy']:.3f} on {SIMILAR}"
                for arm in ARMS
            )
        )
    for arm, checks in margin_checks(rows).items():
        out.append(f"margin {arm}: " + ", ".join(f"{k} {'yes' if v else 'no'}" for k, v in checks.items()))
    return out


def run(
    seeds: Sequence[int] = (0,),
    output_dir: str = "runs/margin",
    *,
    task: str | None = None,
    overrides: Sequence[str] = (),
    overwrite: bool = False,
    resume: bool = False,
) -> Path:
    """Run the experiment; returns the path of report.html. With `resume`, finished models and held-out scores
    are kept."""
    from rlhflab.lab.tasks import get_task
    from rlhflab.pipeline import _user_sections

    t0 = time.time()
    task_obj = get_task(task or TASK)
    user = _user_sections(None, list(overrides))
    check_overrides(NAME, user, eval_keys=("rm_pairs",), varied={"rm.algo.margin": "none, small and large"})
    configs = {s: stage_configs(task_obj.name, Path(output_dir) / f"seed-{s}", s, user) for s in seeds}
    n_pairs = user.get("eval", {}).get("rm_pairs", HELDOUT_PAIRS)
    out = prepare_run_dir(output_dir, "experiment", resume=resume, overwrite=overwrite)
    records = {}
    for i, seed in enumerate(seeds, 1):
        print(f"== {NAME}: seed {seed} ({i}/{len(seeds)})")
        records[seed] = run_seed(task_obj, out / f"seed-{seed}", seed, user, configs[seed], n_pairs, resume)
    rows = table(records)
    return publish_run(
        __name__,
        out,
        verdict=decide(rows),
        findings=findings(rows),
        table=rows,
        images={"accuracy_by_rating": plot_buckets(rows)},
        started=t0,
        seeds=seeds,
        output_dir=output_dir,
        overrides=overrides,
        flags=f"--task {task}" if task else "",
    )


def plot_buckets(rows: Sequence[Mapping]) -> bytes | None:
    """Pooled accuracy against the annotators' labels by rating, one bar group per margin setting, with 95%
    intervals."""
    import matplotlib.pyplot as plt

    from rlhflab.eval.report import figure_png

    by = {(r["margin"], r["rating"]): r for r in rows if r["seed"] == "all"}
    buckets = (*BUCKETS, "overall")
    width = 0.8 / len(buckets)
    lows = [r["accuracy_ci95_low"] for r in by.values() if is_finite_number(r["accuracy_ci95_low"])]
    fig, ax = plt.subplots(figsize=(7.5, 3.8))
    for k, bucket in enumerate(buckets):
        cells = [by[arm, bucket] for arm in ARMS]
        acc = np.array([c["accuracy"] for c in cells], dtype=np.float64)
        lo = np.array([c["accuracy_ci95_low"] for c in cells], dtype=np.float64)
        hi = np.array([c["accuracy_ci95_high"] for c in cells], dtype=np.float64)
        x = np.arange(len(ARMS)) + (k - (len(buckets) - 1) / 2) * width
        ax.bar(x, acc, width, color=f"C{k}", label=bucket.replace("_", " "))
        ax.errorbar(x, acc, yerr=[acc - lo, hi - acc], fmt="none", ecolor="black", lw=0.8, capsize=2)
    ax.set_xticks(np.arange(len(ARMS)), [f"margin: {a}" for a in ARMS])
    ax.set_ylabel("held-out accuracy (annotator labels)")
    ax.set_ylim(max(0.0, np.floor(min(lows, default=0.0) * 10) / 10 - 0.05), 1.0)
    ax.axhline(0.5, color="grey", lw=0.6, ls=":")
    ax.legend(fontsize=7, ncol=len(buckets), loc="lower center", bbox_to_anchor=(0.5, 1.0), frameon=False)
    return figure_png(fig)
