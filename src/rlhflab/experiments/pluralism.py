"""Whose preferences does one reward model serve? (`rlhflab experiment pluralism`).

Siththaranjan, Laidlaw & Hadfield-Menell (2023, "Distributional Preference Learning: Understanding and Accounting
for Hidden Context in RLHF") showed that a Bradley-Terry reward model fitted to labels pooled over annotators who
want different things aggregates them by a Borda count: the majority's order wins wherever the groups disagree.
Chakraborty et al. (2024, "MaxMin-RLHF: Alignment with Diverse Human Preferences") showed that one reward then
cannot serve diverse groups, and the minority loses. Sorensen et al. (2024, "A Roadmap to Pluralistic Alignment")
name the alternatives: a model steerable to a group (steerable pluralism) or one that represents the spread of
views (distributional pluralism). Siththaranjan et al.'s mean-and-variance DPL is the latter: each response gets a
mean and a variance over annotators, and P(a > b) = Phi((mu_a - mu_b) / sqrt(sigma_a^2 + sigma_b^2)).

Here, per seed, on the lab's `sentiment` task with two annotator groups (`rlhflab.lab.groups.value_split`): a
majority (share 0.7) whose gold is the task's, and a minority (0.3) who agree on every quality term and want the
opposite sentiment (their gold is gold - 2 x sentiment):

    1. pipeline      `rlhflab run --methods rm`: the lab's pairs, each judged again by one group's annotators
                     (drawn by share; the label records the group), SFT, and the Bradley-Terry reward model on the
                     pooled labels ("bt"), all with the pipeline's settings
    2. distributional `rlhflab rm algo.loss=distributional` on the same pairs ("dpl": a mean and a log-variance
                     per response), from the same SFT model with the same budget
    3. conditioned   `rlhflab rm` on the same pairs with the group's tag word before each prompt (the group's
                     identity in the input), the same budget: at selection a group's policy scores with its tag
    4. best-of-n     `pool` SFT samples on each of `bon_prompts` held-out prompts; for every policy (SFT itself: a
                     random sample; best of n by bt, by dpl's mean, by dpl's mean - std (risk-averse), and by the
                     conditioned model with each group's own tag) each group's expected gold of the pick over
                     n-subsets of the pool, its gain over SFT, and the gap between the groups' gains, with 95%
                     intervals over prompts (paired); dpl's std on held-out pairs the groups contest (their golds
                     order the two responses differently) vs pairs they do not, and its correlation with how far
                     the groups' golds of a response lie apart; each model's agreement with each group's gold order

All three reward models learn from the same labels without Llama 2 margins (the pipeline's rm default uses them;
the distributional likelihood has no margin), from the same SFT model, with the pipeline's rm budget.

Budgets (held-out prompts, pool, n) were set from the time limit before any run of this experiment, as were the
groups, the tags, RISK_AVERSION and the rule; none was tuned on the results.
"""

from __future__ import annotations

import io
import json
import shutil
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from rlhflab.core.run_dir import prepare_run_dir
from rlhflab.errors import ConfigError
from rlhflab.experiments.result import publish_run

NAME = "pluralism"
CLAIM = (
    "With annotators from two groups who want different things, a single Bradley-Terry reward model on the pooled "
    "labels serves the majority (its best-of-n policy raises the majority's gold more than the minority's), while "
    "a reward model conditioned on the annotator's group serves each group, raising the minority's gold above "
    "what the single model gives it."
)
SOURCE = (
    "Siththaranjan, Laidlaw & Hadfield-Menell 2023, Distributional Preference Learning (Borda-count aggregation of "
    "hidden context; mean-and-variance DPL); Chakraborty et al. 2024, MaxMin-RLHF (one reward cannot serve "
    "diverse groups); Sorensen et al. 2024, A Roadmap to Pluralistic Alignment (steerable and distributional "
    "pluralism)"
)
TASK = "sentiment"
MINORITY_SHARE = 0.3
GROUP_TERM = "sentiment"  # the minority wants the opposite of this gold term, and the same of every other one
# Each group's tag: a word of the task's vocabulary (the lab's word-level tokenizer has no new tokens), neutral in
# the task's grammar, put before the prompt for the conditioned reward model.
TAGS = {"majority": "plain", "minority": "simple"}
RISK_AVERSION = 1.0  # dpl_risk_averse picks by mean - 1 x std
# Policy -> what picks its sample for group g ({group} is the group's name); None: a random SFT sample.
POLICIES: dict[str, str | None] = {
    "sft": None,
    "bt": "bt",
    "dpl_mean": "dpl_mean",
    "dpl_risk_averse": "dpl_risk_averse",
    "conditioned": "conditioned/{group}",
}
# The experiment's own budgets (`pluralism.KEY=VALUE`): held-out prompts, SFT samples per prompt, and n (<= pool).
# Set from the time limit before any run: 128 x 32 samples take seconds to draw and to score on one core.
SETTINGS = {"bon_prompts": 128, "pool": 32, "n": 16}
RULE = (
    "Per seed, on held-out prompts: gain(policy, group) = the group's expected gold of the best of n SFT samples "
    "picked by the policy minus the group's mean gold of the SFT samples (per prompt, then a paired Student-t "
    "95% interval over prompts). A: the single BT model serves the majority: gain(bt, majority) - gain(bt, "
    "minority) > 0 with its interval above 0. B: conditioning serves the minority: the minority's gold under the "
    "conditioned model's minority policy minus under bt > 0 with its interval above 0. reproduced: A and B on "
    "every seed; partly reproduced: only one of them on every seed; otherwise not reproduced. The distributional "
    "model's std on contested vs uncontested pairs, and its correlation with how far the groups' golds of a "
    "response lie apart, are reported, not part of the verdict."
)
CHECKS = {"A": "gap/bt", "B": "minority/conditioned_vs_bt"}
# The pipeline's own evaluation is kept small: this experiment judges by its own.
PIPELINE_EVAL = ["eval.prompts=16", "eval.samples=2", "eval.curve_points=1", "eval.curve_prompts=2"]
# The three reward models learn from the same labels alike: no Llama 2 margins (the pipeline's default), which the
# distributional loss cannot take.
SAME_LABELS = ["rm.algo.margin=none"]
FIXED_KEYS = (
    "rm.algo.loss",
    "rm.algo.heads",
    "rm.algo.margin",
    "rm.data.train_path",
    "rm.model.name_or_path",
    "rm.seed",
    "sft.seed",
)
SECTIONS = ("sft", "rm", "data", "eval", "annotators")
BATCH = 256


# --------------------------------------------------------------------------------------------------------
# Settings and stage configs, all checked before any work
# --------------------------------------------------------------------------------------------------------


def groups():
    from rlhflab.lab.groups import value_split

    return value_split(GROUP_TERM, MINORITY_SHARE)


def user_settings(overrides: Sequence[str]) -> tuple[list[str], dict[str, int]]:
    """(the pipeline's overrides, the experiment's settings) from the user's overrides: `pluralism.KEY=VALUE` sets
    SETTINGS; keys the experiment sets itself and sections of methods it does not run are refused."""
    from rlhflab.experiments.common import split_overrides

    fixed = dict.fromkeys(FIXED_KEYS, "what it compares")
    pipeline, own = split_overrides(
        NAME, overrides, own={"pluralism": SETTINGS}, pipeline=SECTIONS, fixed=fixed
    )
    settings = own["pluralism"]
    if settings["n"] > settings["pool"]:
        raise ConfigError(
            f"{NAME}: pluralism.n ({settings['n']}) must be <= pluralism.pool ({settings['pool']}): best of n "
            "picks among n of the pool's samples"
        )
    return pipeline, settings


def stage_configs(seed: int, seed_dir: Path, task: str, user: Mapping) -> dict[str, Any]:
    """The stage configs of one seed (built, so validated): {"pipeline": the pipeline's sft and rm, "dpl": the
    distributional rm, "conditioned": the rm on group-tagged pairs}."""
    from rlhflab.pipeline import _configs, _section, _stage_config

    run_dir = seed_dir / "run"
    data = {name: run_dir / "data" / f"{name}.jsonl" for name in ("sft", "pairs", "prompts")}
    pipeline = _configs(["sft", "rm"], run_dir, seed, task, dict(user), data, _section(dict(user), "eval"))
    base = [f"model.name_or_path={run_dir / 'sft' / 'final'}"]
    dpl = _stage_config(
        "rm",
        seed_dir / "dpl",
        seed,
        [*base, f"data.train_path={data['pairs']}", "algo.loss=distributional"],
        user,
    )
    tagged = run_dir / "data" / "pairs_tagged.jsonl"
    conditioned = _stage_config(
        "rm", seed_dir / "conditioned", seed, [*base, f"data.train_path={tagged}"], user
    )
    return {"pipeline": pipeline, "dpl": dpl, "conditioned": conditioned}


def group_relabel(task, seed: int, settings) -> Any:
    """The pipeline's relabel step: the lab's candidate pairs judged by the groups (pairs.jsonl rewritten, each row
    with its group) and the same rows with the group's tag before the prompt (pairs_tagged.jsonl beside it)."""
    from rlhflab.data.readers import write_jsonl
    from rlhflab.lab.groups import PluralisticAnnotators, relabel_pairs, tag_prompt

    def relabel(pairs: Path) -> dict:
        rows = [json.loads(line) for line in pairs.read_text().splitlines() if line.strip()]
        annotators = PluralisticAnnotators(task, groups(), settings, seed=seed * 1000 + 77)
        out, stats = relabel_pairs(rows, annotators)
        write_jsonl(out, pairs)
        tagged = [{**r, "prompt": tag_prompt(r["prompt"], TAGS[r["group"]])} for r in out]
        write_jsonl(tagged, pairs.parent / "pairs_tagged.jsonl")
        return {"groups": {g.name: {"share": g.share, "weights": g.weights} for g in groups()}, **stats}

    return relabel


def check_tags(tokenizer) -> None:
    """Each tag must be one known token, and the tags distinct: an unknown word would make every tag the same."""
    ids = {g: tokenizer(TAGS[g], add_special_tokens=False)["input_ids"] for g in TAGS}
    unk = tokenizer.unk_token_id
    bad = [g for g, i in ids.items() if not i or (unk is not None and unk in i)]
    if bad or len({tuple(i) for i in ids.values()}) != len(ids):
        raise ConfigError(
            f"{NAME}: the group tags {TAGS} are not distinct known words of the model's tokenizer "
            f"(ids {ids}); this experiment needs a task whose vocabulary has them (sentiment)"
        )


# --------------------------------------------------------------------------------------------------------
# The maths: each group's gold of each policy's pick, the checks
# --------------------------------------------------------------------------------------------------------


def selector_key(policy: str, group: str) -> str | None:
    """The score a policy picks group `group`'s sample by (a key of the scores), or None (a random sample)."""
    spec = POLICIES[policy]
    return None if spec is None else spec.format(group=group)


def policy_gold(scores: Mapping[str, np.ndarray], gold: Mapping[str, np.ndarray], n: int) -> dict[str, dict]:
    """{policy: {group: [P] expected gold of the group at the pick}} from the pool's scores and golds ([P, M])."""
    from rlhflab.eval.best_of_n import best_of_n_expectation

    out: dict[str, dict] = {}
    for policy in POLICIES:
        out[policy] = {}
        for group, g in gold.items():
            key = selector_key(policy, group)
            out[policy][group] = g.mean(axis=1) if key is None else best_of_n_expectation(scores[key], g, n)
    return out


def _interval(values: np.ndarray) -> dict[str, float]:
    from rlhflab.eval import metrics as M

    mean, lo, hi = M.mean_ci95(values)
    return {"mean": mean, "ci95_low": lo, "ci95_high": hi}


def policy_rows(seed: int, per_prompt: Mapping[str, Mapping[str, np.ndarray]]) -> list[dict]:
    """One row per policy and group: the gold at the pick and its gain over SFT, each with its 95% interval."""
    rows = []
    for policy, by_group in per_prompt.items():
        for group, values in by_group.items():
            gold, gain = _interval(values), _interval(values - per_prompt["sft"][group])
            rows.append(
                {
                    "seed": seed,
                    "policy": policy,
                    "group": group,
                    "gold": gold["mean"],
                    "gold_ci95": (gold["ci95_high"] - gold["ci95_low"]) / 2,
                    "gain": gain["mean"],
                    "gain_ci95": (gain["ci95_high"] - gain["ci95_low"]) / 2,
                }
            )
    return rows


def comparison_rows(seed: int, per_prompt: Mapping[str, Mapping[str, np.ndarray]]) -> list[dict]:
    """Paired differences over prompts: each policy's gap (majority's gain - minority's gain), and the minority's
    gold under each other policy minus under bt. `holds`: the difference is > 0 with its interval above 0."""
    sft = per_prompt["sft"]
    diffs = {}
    for policy, by_group in per_prompt.items():
        diffs[f"gap/{policy}"] = (by_group["majority"] - sft["majority"]) - (
            by_group["minority"] - sft["minority"]
        )
    for policy in POLICIES:
        if policy != "bt":
            diffs[f"minority/{policy}_vs_bt"] = per_prompt[policy]["minority"] - per_prompt["bt"]["minority"]
    rows = []
    for name, d in diffs.items():
        i = _interval(d)
        holds = bool(i["mean"] > 0 and i["ci95_low"] > 0)  # NaN (one prompt) never holds
        rows.append({"seed": seed, "comparison": name, "diff": i["mean"], **_round_ci(i), "holds": holds})
    return rows


def _round_ci(i: Mapping[str, float]) -> dict[str, float]:
    return {"ci95_low": i["ci95_low"], "ci95_high": i["ci95_high"]}


def decide(rows: Sequence[Mapping]) -> str:
    """The verdict of RULE from the comparison rows ({seed, comparison, diff, ci95_low, ...})."""
    comparisons = [r for r in rows if "comparison" in r]
    seeds = sorted({r["seed"] for r in comparisons})
    if not seeds:
        return "not reproduced"

    def holds(seed: int, name: str) -> bool:
        row = next((r for r in comparisons if r["seed"] == seed and r["comparison"] == name), None)
        low = None if row is None else row.get("ci95_low")
        return row is not None and low is not None and row["diff"] > 0 and low > 0

    a = all(holds(s, CHECKS["A"]) for s in seeds)
    b = all(holds(s, CHECKS["B"]) for s in seeds)
    if a and b:
        return "reproduced"
    return "partly reproduced" if a or b else "not reproduced"


def variance_rows(seed: int, std_a: np.ndarray, std_b: np.ndarray, contested: np.ndarray) -> list[dict]:
    """dpl's pair std sqrt(sigma_a^2 + sigma_b^2) on contested and on uncontested held-out pairs, and the
    difference of the means (Welch's interval, conservative degrees of freedom)."""
    from rlhflab.eval import metrics as M

    pair_std = np.sqrt(std_a**2 + std_b**2)
    rows = []
    for name, mask in (("contested", contested), ("uncontested", ~contested)):
        i = _interval(pair_std[mask])
        rows.append(
            {"seed": seed, "pairs": name, "n": int(mask.sum()), "dpl_pair_std": i["mean"], **_round_ci(i)}
        )
    a, b = pair_std[contested], pair_std[~contested]
    half = float("nan")
    if len(a) > 1 and len(b) > 1:
        # Welch's standard error with the conservative min(n_a, n_b) - 1 degrees of freedom.
        se = np.sqrt(a.var(ddof=1) / len(a) + b.var(ddof=1) / len(b))
        half = M.t_quantile_975(min(len(a), len(b)) - 1) * float(se)
    diff = float(a.mean() - b.mean()) if len(a) and len(b) else float("nan")
    rows.append({"seed": seed, "pairs": "contested - uncontested", "dpl_pair_std": diff, "ci95_half": half})
    return rows


def spread_row(seed: int, std: np.ndarray, disagreement: np.ndarray) -> dict:
    """Pearson's r between dpl's std of each response and how far the groups' golds of it lie apart
    (|gold_majority - gold_minority|), with a Fisher-z 95% interval. DPL's likelihood fixes the scale of mu and
    sigma only together, so a correlation, not a level, is what says whether sigma tracks the disagreement."""
    x, y = np.asarray(std, dtype=np.float64).ravel(), np.asarray(disagreement, dtype=np.float64).ravel()
    n = len(x)
    if n < 4 or x.std() == 0 or y.std() == 0:
        r, lo, hi = float("nan"), float("nan"), float("nan")
    else:
        r = float(np.corrcoef(x, y)[0, 1])
        z, half = np.arctanh(np.clip(r, -0.999999, 0.999999)), 1.959964 / np.sqrt(n - 3)
        lo, hi = float(np.tanh(z - half)), float(np.tanh(z + half))
    return {"seed": seed, "spread": "corr(dpl std, |gold_majority - gold_minority|)", "n": n, "r": r,
            "ci95_low": lo, "ci95_high": hi}  # fmt: skip


def agreement_rows(seed: int, scores: Mapping[str, np.ndarray], gold: Mapping[str, np.ndarray]) -> list[dict]:
    """Each model's agreement with each group's gold order on held-out pairs (samples 0 and 1 of each prompt, where
    the group's gold differs): bt, dpl's mean, and the conditioned model with that group's tag."""
    rows = []
    for reward in ("bt", "dpl_mean", "conditioned"):
        for group, g in gold.items():
            s = scores[selector_key(reward, group)]
            decided = g[:, 0] != g[:, 1]
            right = (s[:, 0] > s[:, 1]) == (g[:, 0] > g[:, 1])
            rows.append(
                {
                    "seed": seed,
                    "reward": reward,
                    "group": group,
                    "pairs": int(decided.sum()),
                    "agreement": float(right[decided].mean()) if decided.any() else float("nan"),
                }
            )
    return rows


# --------------------------------------------------------------------------------------------------------
# One seed: train, then judge by each group's gold
# --------------------------------------------------------------------------------------------------------


def load_rewards(seed_dir: Path) -> dict[str, Any]:
    """The three reward models as reward sources: bt, dpl (mean and std) and conditioned."""
    from rlhflab.rewards import LearnedReward

    return {
        "bt": LearnedReward.from_pretrained(seed_dir / "run" / "rm" / "final", batch_size=BATCH),
        "dpl": LearnedReward.from_pretrained(seed_dir / "dpl" / "rm" / "final", batch_size=BATCH),
        "conditioned": LearnedReward.from_pretrained(
            seed_dir / "conditioned" / "rm" / "final", batch_size=BATCH
        ),
    }


def score_pool(
    rewards: Mapping[str, Any], chats: Sequence, responses: Sequence[str]
) -> dict[str, np.ndarray]:
    """Every selector's score of each (chat prompt, response) [N]: bt, dpl_mean, dpl_std, dpl_risk_averse and
    conditioned/GROUP (the prompt tagged with the group's tag)."""
    from rlhflab.lab.groups import tag_prompt
    from rlhflab.stages.best_of_n import score_in_batches

    out = {"bt": score_in_batches(rewards["bt"], list(chats), list(responses), BATCH).numpy()}
    mean, std = (x.numpy() for x in rewards["dpl"].mean_std(list(chats), list(responses)))
    out.update({"dpl_mean": mean, "dpl_std": std, "dpl_risk_averse": mean - RISK_AVERSION * std})
    for group, tag in TAGS.items():
        tagged = [tag_prompt(c, tag) for c in chats]
        out[f"conditioned/{group}"] = score_in_batches(
            rewards["conditioned"], tagged, list(responses), BATCH
        ).numpy()
    return out


def judge(task, seed: int, seed_dir: Path, settings: Mapping) -> dict[str, Any]:
    """Step 4: the SFT pool on held-out prompts, every selector's scores and each group's gold (saved to
    SEED_DIR/pool.npz and pool.json), and what the table is made of."""
    from rlhflab.core.io import atomic_write_bytes, atomic_write_text
    from rlhflab.lab.evaluate import sample_policy
    from rlhflab.lab.groups import group_gold
    from rlhflab.lab.tasks import chat_prompt
    from rlhflab.models.loading import load_inference_lm, load_tokenizer

    sft_dir = seed_dir / "run" / "sft" / "final"
    prompts = task.heldout_prompts(settings["bon_prompts"], seed=seed + 40)
    pool = settings["pool"]
    sft, tokenizer = load_inference_lm(sft_dir), load_tokenizer(sft_dir)
    samples = sample_policy(sft, tokenizer, task, prompts, n_samples=pool, seed=seed + 41, batch_size=BATCH)
    chats = [chat_prompt(p) for p in prompts for _ in range(pool)]
    flat = [r for rs in samples.responses for r in rs]
    scores = {
        k: v.reshape(len(prompts), pool) for k, v in score_pool(load_rewards(seed_dir), chats, flat).items()
    }
    gold = {g.name: group_gold(task, g, chats, flat).reshape(len(prompts), pool) for g in groups()}
    buf = io.BytesIO()
    np.savez(buf, **{f"score:{k}": v for k, v in scores.items()}, **{f"gold:{k}": v for k, v in gold.items()})
    atomic_write_bytes(seed_dir / "pool.npz", buf.getvalue())
    atomic_write_text(
        seed_dir / "pool.json", json.dumps({"prompts": prompts, "responses": samples.responses})
    )
    per_prompt = policy_gold(scores, gold, settings["n"])
    spread = [spread_row(seed, scores["dpl_std"], np.abs(gold["majority"] - gold["minority"]))]
    return {
        "policies": policy_rows(seed, per_prompt),
        "comparisons": comparison_rows(seed, per_prompt),
        "variance": (pair_variance(task, seed, prompts, samples.responses, scores) if pool > 1 else [])
        + spread,
        "agreement": agreement_rows(seed, scores, gold) if pool > 1 else [],
    }


def pair_variance(
    task, seed: int, prompts: Sequence[str], responses: Sequence[Sequence[str]], scores
) -> list:
    """`variance_rows` on held-out pairs: samples 0 and 1 of each prompt (the pool is i.i.d., so any two are a fair
    pair), identical ones left out."""
    from rlhflab.lab.groups import PluralisticAnnotators

    first, second = [rs[0] for rs in responses], [rs[1] for rs in responses]
    contested = PluralisticAnnotators(task, groups()).contested(prompts, first, second)
    distinct = np.array([a != b for a, b in zip(first, second)])
    std = scores["dpl_std"]
    return variance_rows(seed, std[:, 0][distinct], std[:, 1][distinct], contested[distinct])


def run_seed(task, seed: int, seed_dir: Path, plan: Mapping, configs: Mapping) -> dict:
    """One seed, steps 1-4; writes SEED_DIR/seed.json (what the table and plots are made of)."""
    from rlhflab.core.io import atomic_write_text
    from rlhflab.models.loading import load_tokenizer
    from rlhflab.pipeline import _annotator_settings, _train, run_pipeline

    if seed_dir.exists():  # a seed without seed.json (an interrupted one) runs again from the start
        shutil.rmtree(seed_dir)
    run_pipeline(
        task=task.name, seed=seed, output_dir=str(seed_dir / "run"), overwrite=True, methods=["rm"],
        overrides=[*PIPELINE_EVAL, *SAME_LABELS, *plan["pipeline"]],
        relabel=group_relabel(task, seed, _annotator_settings(plan["user"])),
    )  # fmt: skip
    check_tags(load_tokenizer(seed_dir / "run" / "sft" / "final"))
    for name in ("dpl", "conditioned"):
        print(f"== {NAME}: seed {seed}, the {name} reward model")
        _train("rm", configs[name], task=task.name)
    print(f"== {NAME}: seed {seed}, best of {plan['settings']['n']} SFT samples, judged by each group's gold")
    result = judge(task, seed, seed_dir, plan["settings"])
    result["relabel"] = json.loads((seed_dir / "run" / "data" / "relabel.json").read_text())
    atomic_write_text(seed_dir / "seed.json", json.dumps(result, indent=2) + "\n")
    return result


# --------------------------------------------------------------------------------------------------------
# Table, findings, plots
# --------------------------------------------------------------------------------------------------------


def summary_rows(table: Sequence[Mapping]) -> list[dict]:
    """Per policy and group over seeds: the mean gold and gain (their interval over seeds when there are several)."""
    out = []
    for policy in POLICIES:
        for group in TAGS:
            rows = [r for r in table if r.get("policy") == policy and r.get("group") == group and "gain" in r]
            if not rows:
                continue
            gain = _interval(np.array([r["gain"] for r in rows]))
            out.append(
                {
                    "summary": policy,
                    "group": group,
                    "seeds": len(rows),
                    "gold_mean": float(np.mean([r["gold"] for r in rows])),
                    "gain_mean": gain["mean"],
                    "gain_ci95_over_seeds": (gain["ci95_high"] - gain["ci95_low"]) / 2,
                }
            )
    return out


def findings(results: Mapping[int, Mapping]) -> list[str]:
    lines = []
    for seed, result in results.items():
        rel = result["relabel"]
        lines.append(
            f"seed {seed}: {rel['n']} pairs labelled ({rel['per_group']}); {rel['contested_share']:.0%} of the "
            "candidate pairs are contested (the groups' golds order them differently)"
        )
        by = {(r["policy"], r["group"]): r for r in result["policies"]}
        text = "; ".join(
            f"{p} "
            + ", ".join(f"{g} {by[(p, g)]['gain']:+.3f} ± {by[(p, g)]['gain_ci95']:.3f}" for g in TAGS)
            for p in POLICIES
            if p != "sft"
        )
        sft = ", ".join(f"{g} {by[('sft', g)]['gold']:.3f}" for g in TAGS)
        lines.append(f"seed {seed}, each group's gold gain over SFT (gold {sft}) under best-of-n by: {text}")
        comp = {r["comparison"]: r for r in result["comparisons"]}
        for key, what in (
            (CHECKS["A"], "A, the single BT model's gap majority - minority"),
            (CHECKS["B"], "B, the minority's gold under its conditioned policy - under BT"),
        ):
            r = comp[key]
            lines.append(
                f"seed {seed}, {what}: {r['diff']:+.3f} [{r['ci95_low']:.3f}, {r['ci95_high']:.3f}]"
                + (" holds" if r["holds"] else " does not hold")
            )
        var = {r["pairs"]: r for r in result["variance"] if "pairs" in r}
        if var:
            lines.append(
                f"seed {seed}, the distributional model's pair std: contested {var['contested']['dpl_pair_std']:.3f} "
                f"(n {var['contested']['n']}), uncontested {var['uncontested']['dpl_pair_std']:.3f} (n "
                f"{var['uncontested']['n']}), difference {var['contested - uncontested']['dpl_pair_std']:+.3f} ± "
                f"{var['contested - uncontested']['ci95_half']:.3f}"
            )
        spread = next((r for r in result["variance"] if "spread" in r), None)
        if spread is not None:
            lines.append(
                f"seed {seed}, the distributional model's std of a response vs how far the groups' golds of it lie "
                f"apart: r = {spread['r']:.3f} [{spread['ci95_low']:.3f}, {spread['ci95_high']:.3f}] over "
                f"{spread['n']} samples"
            )
        if result["agreement"]:
            agree = ", ".join(f"{r['reward']}/{r['group']} {r['agreement']:.2f}" for r in result["agreement"])
            lines.append(f"seed {seed}, agreement with each group's gold order on held-out pairs: {agree}")
    return lines


def plot_group_gold(results: Mapping[int, Mapping]) -> bytes | None:
    """Each group's gold under each policy (bars, 95% interval over prompts), one panel per seed."""
    import matplotlib.pyplot as plt

    from rlhflab.eval.report import figure_png

    fig, axes = plt.subplots(1, len(results), figsize=(5.5 * len(results), 3.8), squeeze=False)
    width = 0.8 / len(TAGS)
    for ax, (seed, result) in zip(axes[0], results.items()):
        by = {(r["policy"], r["group"]): r for r in result["policies"]}
        x = np.arange(len(POLICIES))
        for k, group in enumerate(TAGS):
            rows = [by[(p, group)] for p in POLICIES]
            ax.bar(
                x + (k - (len(TAGS) - 1) / 2) * width,
                [r["gold"] for r in rows],
                width,
                yerr=[r["gold_ci95"] for r in rows],
                color=f"C{k}",
                label=group,
                capsize=2,
            )
        ax.set_xticks(x, list(POLICIES), rotation=20, fontsize=8)
        ax.axhline(0.0, color="k", lw=0.5)
        ax.set_ylabel("the group's gold of the pick")
        ax.set_title(f"seed {seed}", fontsize=9)
    axes[0][0].legend(fontsize=8, title="group", title_fontsize=8)
    return figure_png(fig)


def plot_variance(results: Mapping[int, Mapping]) -> bytes | None:
    """The distributional model's pair std on contested vs uncontested held-out pairs, per seed."""
    import matplotlib.pyplot as plt

    from rlhflab.eval.report import figure_png

    fig, ax = plt.subplots(figsize=(5.0, 3.4))
    for k, name in enumerate(("contested", "uncontested")):
        rows = [
            next(r for r in res["variance"] if r.get("pairs") == name)
            for res in results.values()
            if res["variance"]
        ]
        if not rows:
            continue
        x = np.arange(len(rows)) + (k - 0.5) * 0.4
        err = [(r["ci95_high"] - r["ci95_low"]) / 2 for r in rows]
        ax.bar(x, [r["dpl_pair_std"] for r in rows], 0.4, yerr=err, color=f"C{k + 2}", label=name, capsize=2)
    ax.set_xticks(np.arange(len(results)), [f"seed {s}" for s in results], fontsize=8)
    ax.set_ylabel("sqrt(sigma_a^2 + sigma_b^2)")
    ax.legend(fontsize=8)
    return figure_png(fig)


def run(
    seeds: Sequence[int] = (0,),
    output_dir: str = "runs/pluralism",
    *,
    task: str | None = None,
    overrides: Sequence[str] = (),
    overwrite: bool = False,
    resume: bool = False,
) -> Path:
    """Run the experiment; returns the path of report.html. With `resume`, seeds whose seed.json exists are read
    back, not run again."""
    from rlhflab.lab.groups import check_groups
    from rlhflab.lab.tasks import get_task
    from rlhflab.pipeline import _user_sections

    t0 = time.time()
    task_obj = get_task(task or TASK)
    check_groups(task_obj, groups())  # a task without the sentiment term is refused here
    check_tags(task_obj.build_tokenizer())  # the lab's models' vocabulary; the SFT model's is checked again
    pipeline, settings = user_settings(overrides)
    user = _user_sections(None, [*PIPELINE_EVAL, *SAME_LABELS, *pipeline])
    plan = {"pipeline": pipeline, "settings": settings, "user": user}
    # Every seed's stage configs built (and so validated) before any work: a typo fails in a second.
    for s in seeds:
        stage_configs(s, Path(output_dir) / f"seed-{s}", task_obj.name, user)
    out = prepare_run_dir(output_dir, "experiment", resume=resume, overwrite=overwrite)
    results: dict[int, dict] = {}
    for i, seed in enumerate(seeds, 1):
        seed_dir = out / f"seed-{seed}"
        if resume and (seed_dir / "seed.json").is_file():
            results[seed] = json.loads((seed_dir / "seed.json").read_text())
            continue
        print(f"== {NAME}: seed {seed} ({i}/{len(seeds)}), groups {[(g.name, g.share) for g in groups()]}")
        configs = stage_configs(seed, seed_dir, task_obj.name, user)
        results[seed] = run_seed(task_obj, seed, seed_dir, plan, configs)
    table = [
        row
        for seed in seeds
        for key in ("policies", "comparisons", "variance", "agreement")
        for row in results[seed][key]
    ]
    table += summary_rows(table)
    return publish_run(
        __name__,
        out,
        verdict=decide(table),
        findings=findings(results),
        table=table,
        images={"group_gold": plot_group_gold(results), "dpl_variance": plot_variance(results)},
        started=t0,
        seeds=seeds,
        output_dir=output_dir,
        overrides=overrides,
    )
