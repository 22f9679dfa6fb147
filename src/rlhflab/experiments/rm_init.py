"""Where the reward model starts from: the SFT model, the base model or random weights (`rlhflab experiment
rm-init`).

Ouyang et al. (2022, "Training language models to follow instructions with human feedback", Sec. 3.5) start
the reward model from the SFT model with its unembedding layer removed; Touvron et al. (2023, "Llama 2: Open
Foundation and Fine-Tuned Chat Models", Sec. 3.2.2) from the pretrained chat model checkpoints, so that the
reward model knows what the policy it judges knows. The claim tested here is the ordering behind that choice:
a reward model initialized from the SFT model is the most accurate, then one from the pretrained base model
(before SFT), then one from random weights.

Here, per seed, on the default lab task: the pipeline's lab data and SFT model, then three reward models on the
same pairs with the pipeline's reward-model budget (its optimizer, epochs and Llama 2 margin), differing only in
their initial backbone: the SFT model; the base model the SFT run started from; the same architecture with
random weights (seeded). Each is scored on fresh held-out pairs judged by the same annotators (see
`rlhflab.experiments.margin`): accuracy against the annotators' labels and against the gold ordering, with 95%
Wilson intervals, and the paired differences between initializations with 95% intervals. As a use of the
reward model, each picks the best of 16 SFT samples on held-out prompts (the same samples for all three), and
the picks are judged by the hidden gold reward, beside a random sample and the gold-best of the 16.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from rlhflab.core.run_dir import prepare_run_dir
from rlhflab.experiments.margin import (
    accuracy_cell,
    check_overrides,
    correctness,
    heldout_for_seed,
    is_finite_number,
    paired_difference,
    pooled,
    prepare_seed,
    rm_variant,
    stage_configs,
    train_once,
)
from rlhflab.experiments.result import publish_run

NAME = "rm-init"
CLAIM = (
    "A reward model initialized from the SFT model is the most accurate, then one initialized from the base "
    "model, then one initialized at random."
)
SOURCE = (
    "Ouyang et al. 2022, Training language models to follow instructions with human feedback, Sec. 3.5 (the "
    "reward model starts from the SFT model); Touvron et al. 2023, Llama 2: Open Foundation and Fine-Tuned Chat "
    "Models, Sec. 3.2.2 (reward models start from the chat model checkpoints)"
)
INITS = ("sft", "base", "scratch")  # in the claimed order, most accurate first
COMPARISONS = (("sft", "base"), ("base", "scratch"), ("sft", "scratch"))
RULE = (
    "Accuracy is the share of fresh held-out pairs a reward model orders as the annotators did (equal scores "
    "count 1/2). An initialization A is clearly more accurate than B when A's accuracy is higher on every seed "
    "and the 95% interval of the paired per-pair difference A - B, pooled over the seeds' pairs, lies above 0. "
    "reproduced: SFT clearly above base and base clearly above scratch; partly reproduced: SFT clearly above "
    "base or above scratch, or the pooled accuracies in the order SFT > base > scratch; otherwise not "
    "reproduced. Accuracy against the gold order and the gold of best-of-n picks are reported, not ruled on."
)
TASK = "sentiment"
# Fresh held-out pairs per seed (eval.rm_pairs), as in the margin experiment: scoring takes seconds per model.
HELDOUT_PAIRS = 4096
# Held-out prompts for best-of-n (eval.prompts): twice the pipeline's 64, for a narrower interval over prompts;
# 128 x 16 samples of the tiny SFT model take seconds. n is the pipeline's eval.best_of_n (16).
BEST_OF_PROMPTS = 128
EVAL_KEYS = ("rm_pairs", "prompts", "best_of_n")
REFERENCES = ("random sample", "gold-best sample")  # best-of-n rows that no reward model picked


# --------------------------------------------------------------------------------------------------------
# Rows and the verdict (pure)
# --------------------------------------------------------------------------------------------------------


def picked_gold(record: Mapping) -> dict[str, np.ndarray]:
    """Per prompt, the gold of the sample each reward model picked, of a random sample (the mean over the n
    samples: its expectation) and of the gold-best sample. `record`: {"gold": [P][n], "best_index": {init: [P]}}."""
    gold = np.asarray(record["gold"], dtype=np.float64)
    rows = np.arange(gold.shape[0])
    out = {init: gold[rows, np.asarray(idx, dtype=int)] for init, idx in record["best_index"].items()}
    out["random sample"], out["gold-best sample"] = gold.mean(axis=1), gold.max(axis=1)
    return out


def _mean_cell(prefix: str, values: np.ndarray) -> dict[str, float]:
    from rlhflab.eval.metrics import mean_ci95

    mean, lo, hi = mean_ci95(values)
    return {prefix: mean, f"{prefix}_ci95_low": lo, f"{prefix}_ci95_high": hi}


def init_rows(seed: int | str, heldout: Mapping, best: Mapping) -> list[dict]:
    """One row per initialization (accuracy against labels and gold order with 95% Wilson intervals, the gold of
    its best-of-n picks with a t-interval over prompts), then the best-of-n reference rows."""
    label, gold = correctness(heldout["scores"], heldout["gold_chosen"], heldout["gold_rejected"])
    picks = picked_gold(best)
    rows = []
    for init in INITS:
        g = gold[init][~np.isnan(gold[init])]
        rows.append(
            {
                "seed": seed,
                "init": init,
                "n": int(label[init].size),
                **accuracy_cell("accuracy", label[init]),
                "gold_n": int(g.size),
                **accuracy_cell("gold_accuracy", g),
                **_mean_cell("best_of_n_gold", picks[init]),
            }
        )
    rows += [{"seed": seed, "init": ref, **_mean_cell("best_of_n_gold", picks[ref])} for ref in REFERENCES]
    return rows


def comparison_rows(heldout: Mapping, best: Mapping) -> list[dict]:
    """Paired differences A - B (same pairs, same prompts and samples) for each of COMPARISONS, pooled."""
    label, gold = correctness(heldout["scores"], heldout["gold_chosen"], heldout["gold_rejected"])
    picks = picked_gold(best)
    decided = ~np.isnan(gold[INITS[0]])  # the gold order does not depend on the scorer
    return [
        {
            "seed": "all",
            "comparison": f"{a} - {b}",
            **paired_difference("accuracy_difference", label[a], label[b]),
            **paired_difference("gold_accuracy_difference", gold[a][decided], gold[b][decided]),
            **paired_difference("best_of_n_gold_difference", picks[a], picks[b]),
        }
        for a, b in COMPARISONS
    ]


def clearly_above(rows: Sequence[Mapping], a: str, b: str) -> bool:
    """RULE's "A clearly more accurate than B": higher on every seed, paired pooled interval above 0."""
    acc = {
        (r["seed"], r["init"]): r["accuracy"] for r in rows if r.get("init") in INITS and r["seed"] != "all"
    }
    seeds = {s for s, _ in acc}
    diff = next((r for r in rows if r.get("comparison") == f"{a} - {b}"), {})
    low = diff.get("accuracy_difference_ci95_low")
    return bool(seeds) and all(acc[s, a] > acc[s, b] for s in seeds) and is_finite_number(low) and low > 0


def decide(rows: Sequence[Mapping]) -> str:
    """The verdict of RULE from the per-seed rows, the pooled rows and the pooled comparison rows."""
    acc = {r["init"]: r["accuracy"] for r in rows if r["seed"] == "all" and r.get("init") in INITS}
    if clearly_above(rows, "sft", "base") and clearly_above(rows, "base", "scratch"):
        return "reproduced"
    ordered = len(acc) == len(INITS) and acc["sft"] > acc["base"] > acc["scratch"]
    if clearly_above(rows, "sft", "base") or clearly_above(rows, "sft", "scratch") or ordered:
        return "partly reproduced"
    return "not reproduced"


def table(heldout: Mapping[int, Mapping], best: Mapping[int, Mapping]) -> list[dict]:
    """Rows per seed, pooled over seeds (seed "all"), then the pooled comparisons."""
    seeds = list(heldout)
    all_heldout = pooled([heldout[s] for s in seeds])
    all_best = {
        "gold": [row for s in seeds for row in best[s]["gold"]],
        "best_index": {i: [j for s in seeds for j in best[s]["best_index"][i]] for i in INITS},
    }
    rows = [row for s in seeds for row in init_rows(s, heldout[s], best[s])]
    return rows + init_rows("all", all_heldout, all_best) + comparison_rows(all_heldout, all_best)


# --------------------------------------------------------------------------------------------------------
# Models: the three initial backbones, best-of-n
# --------------------------------------------------------------------------------------------------------


def scratch_model(base_dir: str | Path, out_dir: Path, seed: int, resume: bool) -> Path:
    """The base model's architecture and tokenizer with random weights (the model class's own initialization,
    seeded), saved as a model directory."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from rlhflab.core.io import atomic_dir
    from rlhflab.models.loading import load_tokenizer

    if resume and (out_dir / "config.json").is_file():
        return out_dir
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(base_dir))
    with atomic_dir(out_dir) as tmp:
        model.save_pretrained(tmp)
        load_tokenizer(base_dir).save_pretrained(tmp)
    return out_dir


def best_of_n_record(
    task, sft_dir: Path, rm_dirs: Mapping[str, Path], seed: int, prompts: int, n: int
) -> dict:
    """n SFT samples on each held-out prompt (drawn once), their gold [P][n], and each reward model's pick."""
    from rlhflab.lab.gold import gold_scores
    from rlhflab.lab.tasks import chat_prompt
    from rlhflab.models.loading import load_inference_lm, load_tokenizer
    from rlhflab.rewards import LearnedReward
    from rlhflab.rollout.generate import SamplingSettings
    from rlhflab.stages.best_of_n import BestOfN, best_of_n, score_in_batches

    texts = task.heldout_prompts(prompts, seed=seed)
    chats = [chat_prompt(p) for p in texts]
    rewards = {init: LearnedReward.from_pretrained(d, batch_size=256) for init, d in rm_dirs.items()}
    settings = SamplingSettings(max_new_tokens=task.max_new_tokens)
    sft, tokenizer = load_inference_lm(sft_dir), load_tokenizer(sft_dir)
    first = best_of_n(sft, tokenizer, chats, rewards[INITS[0]], n=n, settings=settings, seed=seed + 10)
    flat = [r for row in first.all_texts for r in row]
    gold = gold_scores(task, [p for p in texts for _ in range(n)], flat).reshape(len(texts), n)
    picks = {INITS[0]: first.best_index.tolist()}
    for init in INITS[1:]:  # the same samples, re-ranked by the other reward models
        scores = score_in_batches(rewards[init], [c for c in chats for _ in range(n)], flat).reshape(-1, n)
        picks[init] = BestOfN.from_scores(first.all_texts, scores).best_index.tolist()
    return {"n": n, "gold": gold.tolist(), "best_index": picks, "examples": first.all_texts[:4]}


def best_of_n_for_seed(
    task, seed_dir: Path, sft_dir: Path, rm_dirs, seed: int, ev: Mapping, resume: bool
) -> dict:
    """`best_of_n_record`, kept in SEED/best_of_n.json; with `resume`, read back when there."""
    from rlhflab.core.io import atomic_write_text

    path = seed_dir / "best_of_n.json"
    if resume and path.is_file():
        return json.loads(path.read_text())
    record = best_of_n_record(task, sft_dir, rm_dirs, seed, ev["prompts"], ev["best_of_n"])
    atomic_write_text(path, json.dumps(record) + "\n")
    return record


# --------------------------------------------------------------------------------------------------------
# The experiment
# --------------------------------------------------------------------------------------------------------


def run_seed(task, seed_dir: Path, seed: int, user: Mapping, configs: Mapping, ev: Mapping, resume: bool):
    """Data, SFT, one reward model per initialization, their scores on fresh pairs and their best-of-n picks."""
    from rlhflab.lab.launch import lab_model_dir

    sft_dir = prepare_seed(task, seed_dir, seed, user, configs["sft"], resume)
    base_dir = Path(lab_model_dir(configs["sft"].model.name_or_path, seed=seed))
    starts = {
        "sft": sft_dir,
        "base": base_dir,
        "scratch": scratch_model(base_dir, seed_dir / "scratch-init", seed, resume),
    }
    rm_dirs = {}
    for init in INITS:
        print(f"== {NAME}: seed {seed}, reward model initialized from {init} ({starts[init]})")
        cfg = rm_variant(configs["rm"], seed_dir / f"rm-{init}", model=starts[init])
        rm_dirs[init] = train_once("rm", cfg, task.name, resume)
    heldout = heldout_for_seed(task, seed_dir, seed, ev["rm_pairs"], rm_dirs, resume)
    return heldout, best_of_n_for_seed(task, seed_dir, sft_dir, rm_dirs, seed, ev, resume)


def findings(rows: Sequence[Mapping], n: int) -> list[str]:
    def cell(r: Mapping, key: str) -> str:
        return f"{r[key]:.3f} [{r[key + '_ci95_low']:.3f}, {r[key + '_ci95_high']:.3f}]"

    pooled_rows = {r["init"]: r for r in rows if r["seed"] == "all" and "init" in r}
    out = [
        f"all seeds, RM from {i} ({pooled_rows[i]['n']} pairs): accuracy {cell(pooled_rows[i], 'accuracy')}, gold "
        f"order {cell(pooled_rows[i], 'gold_accuracy')}; gold of its best-of-{n} picks "
        f"{cell(pooled_rows[i], 'best_of_n_gold')}"
        for i in INITS
    ]
    out += [f"all seeds, {ref} of {n}: gold {cell(pooled_rows[ref], 'best_of_n_gold')}" for ref in REFERENCES]
    out += [
        f"{r['comparison']}: accuracy {cell(r, 'accuracy_difference')}, gold order "
        f"{cell(r, 'gold_accuracy_difference')}, best-of-{n} gold {cell(r, 'best_of_n_gold_difference')}"
        for r in rows
        if "comparison" in r
    ]
    for seed in dict.fromkeys(r["seed"] for r in rows if r["seed"] != "all"):
        acc = {r["init"]: r["accuracy"] for r in rows if r["seed"] == seed and r["init"] in INITS}
        out.append(f"seed {seed}: accuracy " + ", ".join(f"{i} {acc[i]:.3f}" for i in INITS))
    return out


def run(
    seeds: Sequence[int] = (0,),
    output_dir: str = "runs/rm-init",
    *,
    task: str | None = None,
    overrides: Sequence[str] = (),
    overwrite: bool = False,
    resume: bool = False,
) -> Path:
    """Run the experiment; returns the path of report.html. With `resume`, finished models, held-out scores and
    best-of-n picks are kept."""
    from rlhflab.lab.tasks import get_task
    from rlhflab.pipeline import _section, _user_sections

    t0 = time.time()
    task_obj = get_task(task or TASK)
    user = _user_sections(None, list(overrides))
    varied = {"rm.model.name_or_path": "the SFT model, the base model and random weights"}
    check_overrides(NAME, user, eval_keys=EVAL_KEYS, varied=varied)
    configs = {s: stage_configs(task_obj.name, Path(output_dir) / f"seed-{s}", s, user) for s in seeds}
    mine = {"rm_pairs": HELDOUT_PAIRS, "prompts": BEST_OF_PROMPTS}
    ev = {k: user.get("eval", {}).get(k, mine.get(k, _section(user, "eval")[k])) for k in EVAL_KEYS}
    out = prepare_run_dir(output_dir, "experiment", resume=resume, overwrite=overwrite)
    heldout, best = {}, {}
    for i, seed in enumerate(seeds, 1):
        print(f"== {NAME}: seed {seed} ({i}/{len(seeds)})")
        heldout[seed], best[seed] = run_seed(
            task_obj, out / f"seed-{seed}", seed, user, configs[seed], ev, resume
        )
    rows = table(heldout, best)
    return publish_run(
        __name__,
        out,
        verdict=decide(rows),
        findings=findings(rows, ev["best_of_n"]),
        table=rows,
        images={"rm_init": plot_inits(rows, ev["best_of_n"])},
        started=t0,
        seeds=seeds,
        output_dir=output_dir,
        overrides=overrides,
        flags=f"--task {task}" if task else "",
    )


def plot_inits(rows: Sequence[Mapping], n: int) -> bytes | None:
    """Pooled held-out accuracy (annotator labels, gold order) and best-of-n gold per initialization, with 95%
    intervals; per-seed accuracies as dots."""
    import matplotlib.pyplot as plt

    from rlhflab.eval.report import figure_png

    by = {r["init"]: r for r in rows if r["seed"] == "all" and "init" in r}
    x = np.arange(len(INITS))
    fig, (left, right) = plt.subplots(1, 2, figsize=(9.0, 3.6))
    for k, (key, what) in enumerate((("accuracy", "annotator labels"), ("gold_accuracy", "gold order"))):
        mean = np.array([by[i][key] for i in INITS], dtype=np.float64)
        err = [
            mean - [by[i][f"{key}_ci95_low"] for i in INITS],
            [by[i][f"{key}_ci95_high"] for i in INITS] - mean,
        ]
        left.bar(x + (k - 0.5) * 0.4, mean, 0.4, yerr=err, capsize=3, color=f"C{k}", label=what)
    for r in rows:
        if r["seed"] != "all" and r.get("init") in INITS:
            left.plot(INITS.index(r["init"]) - 0.2, r["accuracy"], "k.", ms=4)
    left.set_xticks(x, INITS)
    left.set_ylabel("held-out accuracy")
    lows = [by[i][f"{key}_ci95_low"] for i in INITS for key in ("accuracy", "gold_accuracy")]
    lows = [v for v in lows if is_finite_number(v)]
    left.set_ylim(max(0.0, math.floor(min(lows, default=0.5) * 10) / 10 - 0.1), 1.0)
    left.legend(fontsize=7)
    mean = np.array([by[i]["best_of_n_gold"] for i in INITS], dtype=np.float64)
    low = np.array([by[i]["best_of_n_gold_ci95_low"] for i in INITS], dtype=np.float64)
    high = np.array([by[i]["best_of_n_gold_ci95_high"] for i in INITS], dtype=np.float64)
    right.bar(x, mean, 0.6, yerr=[mean - low, high - mean], capsize=3, color="C2")
    for ref, style in zip(REFERENCES, (":", "--")):
        right.axhline(by[ref]["best_of_n_gold"], color="grey", ls=style, lw=1, label=ref)
    right.set_xticks(x, INITS)
    right.set_ylabel(f"gold of the best-of-{n} pick")
    right.legend(fontsize=7)
    return figure_png(fig)
