"""The KL of best-of-n to its base policy, measured (`rlhflab experiment best-of-n-kl`).

Stiennon et al. (2020, App. G.3) give KL(best-of-n || pi) = log n - (n - 1) / n, and every report since quotes it
(Gao et al. 2022 plot best-of-n against it; `rlhflab run` prints it as best-of-n's KL). Beirami et al. (2024,
"Theoretical guarantees on the best-of-n alignment policy", Thm. 1) prove it is an upper bound, met only when
responses are rare: a response y with probability p whose reward beats or ties a mass F of the policy is picked
with probability F^n - (F - p)^n, not n F^(n-1) p.

Here, per seed, on the default lab task:

    1. pipeline  lab data, SFT and the reward model (`rlhflab run --methods rm`, its budgets and annotators)
    2. pool      POOL["samples"] SFT samples on each of POOL["prompts"] held-out prompts, twice: at the task's
                 response length, and cut at SHORT_TOKENS tokens (where the same responses come up again and
                 again); each scored by the reward model, and its log-probability under the SFT model
    3. measure   for n in NS, KL = E_{y ~ best-of-n}[log pi_bon(y) / pi(y)], the log-ratio from F (the pool's
                 empirical CDF of the reward) and p (the exact sequence probability), the expectation taken over
                 every n-subset of the pool (`rlhflab.eval.best_of_n`); a 95% interval over prompts

The full-length arm decides the verdict; the short arm shows where the formula stops being exact. What the
measurement can find is the effect of responses that come up more than once (ties, and a probability p that is
not negligible): for a pool in which every response is new and rare, the estimator returns the formula by
construction (that is the theorem, and its test), so agreement on long responses says that repeats are too rare
there to matter, not that the formula was checked by an independent route.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from rlhflab.core.run_dir import prepare_run_dir
from rlhflab.errors import ConfigError
from rlhflab.experiments.result import publish_run

NAME = "best-of-n-kl"
CLAIM = "The KL divergence of best-of-n from its base policy is log n - (n - 1) / n."
SOURCE = (
    "Stiennon et al. 2020, Learning to summarize from human feedback, App. G.3 (the formula); Beirami et al. "
    "2024, Theoretical guarantees on the best-of-n alignment policy, Thm. 1 (an upper bound, loose when "
    "responses repeat)"
)
NS = (2, 4, 8, 16, 32, 64)
TOLERANCE = 0.05
RULE = (
    f"At each n in {', '.join(map(str, NS))} and seed, the formula agrees with the measurement (full-length "
    f"responses) when it lies inside the measured 95% interval over prompts or within {TOLERANCE:.0%} of the "
    "measured mean. reproduced: it agrees at every n on every seed; partly reproduced: it agrees at half of "
    "the (seed, n) cells or more, or it is an upper bound at every cell (the measured interval's lower end at "
    "or below it); otherwise not reproduced."
)
TASK = "sentiment"
# Set from the time limit (15 minutes for one seed on 2 cores) before any run: 32 x 512 samples per arm.
POOL = {"prompts": 32, "samples": 512}
SHORT_TOKENS = 3
ARMS = ("full", "short")
PIPELINE_EVAL = ["eval.prompts=32", "eval.samples=2", "eval.curve_points=1", "eval.curve_prompts=8"]
BATCH = 512


def kl_rows(scores: np.ndarray, logp: np.ndarray, ns: Sequence[int] = NS) -> list[dict[str, float]]:
    """Per n: the measured KL (mean over prompts), its 95% interval and the formula, from a pool's reward
    scores [P, M] and sequence log-probs [P, M]."""
    from rlhflab.eval import metrics as M
    from rlhflab.eval.best_of_n import (
        best_of_n_expectation,
        best_of_n_kl_formula,
        best_of_n_log_ratio,
        pool_cdf,
    )

    cdf = pool_cdf(scores)
    rows = []
    for n in ns:
        per_prompt = best_of_n_expectation(scores, best_of_n_log_ratio(cdf, logp, n), n)
        kl, lo, hi = M.mean_ci95(per_prompt)
        rows.append({"n": n, "kl": kl, "kl_ci95": [lo, hi], "formula": best_of_n_kl_formula(n)})
    return rows


def agrees(row: Mapping) -> bool:
    """The formula lies inside the measured interval or within TOLERANCE of the measured mean."""
    lo, hi = row["kl_ci95"]
    return lo <= row["formula"] <= hi or abs(row["formula"] - row["kl"]) <= TOLERANCE * abs(row["kl"])


def decide(rows: Sequence[Mapping]) -> str:
    """The verdict of RULE from the full-length rows (one per seed and n)."""
    full = [r for r in rows if r["arm"] == "full"]
    agree = [agrees(r) for r in full]
    if full and all(agree):
        return "reproduced"
    if full and (sum(agree) >= len(agree) / 2 or all(r["kl_ci95"][0] <= r["formula"] for r in full)):
        return "partly reproduced"
    return "not reproduced"


def sample_pool(model, tokenizer, reward, prompts: Sequence[str], m: int, max_new_tokens: int, seed: int):
    """`m` samples of the policy on each prompt: (reward scores [P, M], sequence log-probs [P, M], the share of
    samples that repeat an earlier sample of the same prompt)."""
    import torch

    from rlhflab.lab.evaluate import response_logps
    from rlhflab.lab.tasks import chat_prompt
    from rlhflab.rollout.generate import SamplingSettings, generate
    from rlhflab.stages.best_of_n import score_in_batches

    chats = [chat_prompt(p) for p in prompts for _ in range(m)]
    settings = SamplingSettings(max_new_tokens=max_new_tokens)  # temperature 1: the policy itself
    rollout = generate(model, tokenizer, chats, settings, batch_size=BATCH, seed=seed)
    with torch.no_grad():
        logp = response_logps(model, rollout, batch_size=BATCH)[0].sum(dim=1).double().numpy()
    scores = score_in_batches(reward, chats, rollout.texts, batch_size=BATCH).double().numpy()
    texts = [rollout.texts[i * m : (i + 1) * m] for i in range(len(prompts))]
    repeats = float(np.mean([1 - len(set(t)) / m for t in texts]))
    return scores.reshape(len(prompts), m), logp.reshape(len(prompts), m), repeats


def run_seed(
    task, seed: int, seed_dir: Path, overrides: Sequence[str], pool: Mapping[str, int]
) -> list[dict]:
    """One seed: the pipeline (step 1), both pools (step 2), the KL rows (step 3); writes SEED_DIR/seed.json."""
    from rlhflab.core.io import atomic_write_text
    from rlhflab.models.loading import load_inference_lm, load_tokenizer
    from rlhflab.pipeline import run_pipeline
    from rlhflab.rewards import LearnedReward

    run_dir = seed_dir / "run"
    run_pipeline(
        task=task.name, seed=seed, output_dir=str(run_dir), overrides=[*PIPELINE_EVAL, *overrides],
        overwrite=True, methods=["rm"],
    )  # fmt: skip
    model = load_inference_lm(run_dir / "sft" / "final")
    tokenizer = load_tokenizer(run_dir / "sft" / "final")
    reward = LearnedReward.from_pretrained(run_dir / "rm" / "final", batch_size=BATCH)
    prompts = task.heldout_prompts(pool["prompts"], seed=seed)
    rows = []
    for arm, tokens in zip(ARMS, (task.max_new_tokens, SHORT_TOKENS)):
        print(
            f"== {NAME}: {pool['samples']} samples on {len(prompts)} prompts, {arm} responses ({tokens} tokens)"
        )
        scores, logp, repeats = sample_pool(
            model, tokenizer, reward, prompts, pool["samples"], tokens, seed + 7
        )
        for row in kl_rows(scores, logp):
            rows.append(
                {"seed": seed, "arm": arm, "max_new_tokens": tokens, "repeated_samples": repeats, **row}
            )
    atomic_write_text(seed_dir / "seed.json", json.dumps(rows, indent=2) + "\n")
    return rows


def user_sections(overrides: Sequence[str]) -> tuple[list[str], dict[str, int]]:
    """(pipeline overrides, the pool) from the user's overrides: `pool.prompts` and `pool.samples` set the pool
    (samples at least max(NS)); every other key goes to the pipeline, whose stages are sft and rm."""
    from rlhflab.experiments.common import split_overrides

    pipeline, own = split_overrides(
        NAME, overrides, own={"pool": POOL}, pipeline=("sft", "rm", "data", "annotators", "eval")
    )
    pool = own["pool"]
    if pool["samples"] < max(NS):
        raise ConfigError(
            f"{NAME}: pool.samples must be at least {max(NS)} (the largest n), got {pool['samples']}"
        )
    return pipeline, pool


def run(
    seeds: Sequence[int] = (0,),
    output_dir: str = "runs/best-of-n-kl",
    *,
    task: str | None = None,
    overrides: Sequence[str] = (),
    overwrite: bool = False,
    resume: bool = False,
) -> Path:
    """Run the experiment; returns the path of report.html. With `resume`, seeds whose seed.json exists are
    read back, not run again."""
    from rlhflab.lab.tasks import get_task

    t0 = time.time()
    task_obj = get_task(task or TASK)
    pipeline, pool = user_sections(overrides)
    out = prepare_run_dir(output_dir, "experiment", resume=resume, overwrite=overwrite)
    rows: list[dict] = []
    for i, seed in enumerate(seeds, 1):
        seed_dir = out / f"seed-{seed}"
        if resume and (seed_dir / "seed.json").is_file():
            rows += json.loads((seed_dir / "seed.json").read_text())
            continue
        print(f"== {NAME}: seed {seed} ({i}/{len(seeds)})")
        rows += run_seed(task_obj, seed, seed_dir, pipeline, pool)
    return publish_run(
        __name__,
        out,
        verdict=decide(rows),
        findings=findings(rows),
        table=rows,
        images={"kl_vs_n": plot_kl(rows)},
        started=t0,
        seeds=seeds,
        output_dir=output_dir,
        overrides=overrides,
    )


def findings(rows: Sequence[Mapping]) -> list[str]:
    lines = []
    for seed in sorted({r["seed"] for r in rows}):
        for arm in ARMS:
            cells = [r for r in rows if r["seed"] == seed and r["arm"] == arm]
            if not cells:
                continue
            shown = ", ".join(
                f"n={r['n']} {r['kl']:.3f} [{r['kl_ci95'][0]:.3f}, {r['kl_ci95'][1]:.3f}] vs {r['formula']:.3f}"
                + ("" if agrees(r) else " (disagrees)")
                for r in cells
            )
            lines.append(
                f"seed {seed}, {arm} responses ({cells[0]['max_new_tokens']} tokens, "
                f"{cells[0]['repeated_samples']:.1%} of samples repeat one before them): measured KL vs the "
                f"formula: {shown}"
            )
    return lines


def plot_kl(rows: Sequence[Mapping]) -> bytes | None:
    """Measured KL against n (log scale), each arm and seed with its interval, beside the formula."""
    import matplotlib.pyplot as plt

    from rlhflab.eval.report import figure_png

    fig, ax = plt.subplots(figsize=(6.0, 4.0))
    ns = sorted({r["n"] for r in rows})
    ax.plot(ns, [next(r["formula"] for r in rows if r["n"] == n) for n in ns], "k--", label="log n - (n-1)/n")
    for k, arm in enumerate(ARMS):
        for j, seed in enumerate(sorted({r["seed"] for r in rows})):
            cells = sorted((r for r in rows if r["arm"] == arm and r["seed"] == seed), key=lambda r: r["n"])
            if not cells:
                continue
            x = [r["n"] for r in cells]
            ax.plot(
                x, [r["kl"] for r in cells], color=f"C{k}", marker="o", ms=3, label=arm if j == 0 else None
            )
            lo, hi = zip(*(r["kl_ci95"] for r in cells))
            ax.fill_between(x, lo, hi, color=f"C{k}", alpha=0.15)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("n")
    ax.set_ylabel("KL(best-of-n || SFT), nats")
    ax.legend(fontsize=8)
    return figure_png(fig)
