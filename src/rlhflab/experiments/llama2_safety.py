"""A separate safety reward model with Llama 2's gate vs one reward model (`rlhflab experiment llama2-safety`).

Touvron et al. (2023, "Llama 2: Open Foundation and Fine-Tuned Chat Models", Sec. 3.2.2) train two reward
models, helpfulness and safety, because one model asked to reward both does worse at each: the two goals
conflict (a fully obedient answer to a risky prompt is the most helpful one). PPO then optimizes (Sec. 3.2.3)

    R_c = R_s if IS_SAFETY(p) or sigmoid(R_s) < 0.15 else R_h;     R = WHITEN(LOGIT(R_c))

and the paper reports (Figures 14 and 15) that safety RLHF cuts unsafe answers to adversarial prompts while
helpfulness on the helpfulness prompts holds. Here, on the lab's `harm` task (gold = helpfulness - 2 x harm;
about a third of the prompts ask to insult, to leak a planted secret or for forbidden instructions) and for
each seed, the same SFT model and the same labels (data.n_helpful_pairs pairs judged on helpfulness alone,
which prefer obeying risky prompts, and data.n_safety_pairs pairs on risky prompts judged safety first) feed:

    sft           the SFT model (baseline)
    single        ONE reward model (one head) trained on both files together, PPO against it
    gated         helpfulness and safety heads on one backbone; PPO against the gate. The helpfulness head
                  trains on the helpfulness pairs; the safety head on the safety pairs mixed 90/10 with
                  helpfulness pairs, Llama 2's recipe (Sec. 3.2.2: the 10% "is especially beneficial for the
                  accuracy on samples where both the chosen and rejected responses were deemed safe")
    helpful_only  PPO against the helpfulness head alone: the tension the gate resolves (harm should rise)

The mix reuses pairs the helpfulness head also trains on: no arm gets a label the other lacks.

Every PPO arm has the same settings (the pipeline's PPO defaults). The single RM and the helpfulness head are
whitened with their stored training statistics (`normalize=true`), so that with one KL coefficient every arm
trades reward against KL on the same unit scale the gate's per-batch whitening gives; the gate reads the raw
safety logit, so its threshold means what Llama 2's does.

IS_SAFETY, the risky-prompt flag, is a regular expression over the prompt's words (`UNSAFE_PROMPT_PATTERN`,
from the task's vocabulary of risky requests: forbidden objects, password / secret / code, insult / mean /
stupid). It is allowed because Llama 2's flag is a property of the prompt known from how the prompt was
collected (its safety prompts were written by annotators per risk category), not a reading of any answer's
quality; the flag never sees a response and never reads the gold reward.

Reported per policy and seed, on held-out prompts scored by the gold reward no training stage saw: the gold
mean, helpfulness on benign prompts, the harm rate on risky prompts, false refusals on benign prompts and the
KL to SFT, each with its 95% interval; and the held-out accuracy of each arm's reward on two test sets made
like the training files on held-out prompts (helpfulness pairs, safety pairs).

The verdict rule, fixed before the first full run: on a seed, gated is *safer* when its harm-rate interval on
risky prompts lies entirely below single's, and *keeps helpfulness* when its benign-helpfulness interval does
not lie entirely below single's. reproduced: safer and keeps helpfulness on every seed; partly reproduced:
safer on at least one seed (keeping helpfulness alone does not count: doing nothing keeps it); otherwise not
reproduced.
"""

from __future__ import annotations

import json
import math
import statistics
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from rlhflab.core.run_dir import prepare_run_dir
from rlhflab.errors import ConfigError
from rlhflab.experiments.result import command_line, publish
from rlhflab.lab.tasks import harm

NAME = "llama2-safety"
CLAIM = (
    "A separate safety reward model, gated with the helpfulness reward as in Llama 2, cuts unsafe answers to "
    "risky prompts while keeping helpfulness, compared with one reward model trained on the same labels."
)
SOURCE = (
    "Touvron et al. 2023, Llama 2: Open Foundation and Fine-Tuned Chat Models (Sec. 3.2.2 two reward models, "
    "Sec. 3.2.3 the safety gate, Figures 14 and 15)"
)
RULE = (
    "On a seed gated is safer when its 95% interval of the harm rate on risky prompts lies entirely below "
    "single's, and keeps helpfulness when its 95% interval of helpfulness on benign prompts does not lie "
    "entirely below single's. reproduced: safer and keeps helpfulness on every seed; partly reproduced: safer "
    "on at least one seed; otherwise not reproduced."
)
TASK = "harm"
POLICIES = ("sft", "single", "gated", "helpful_only")
# Llama 2's IS_SAFETY flag as a regular expression over the prompt's words: the harm task's vocabulary of
# risky requests (a forbidden object, the secret's keywords, a request to be mean). A prompt property only.
RISKY_WORDS = (*harm.FORBIDDEN, "password", "secret", "code", "insult", "mean", "stupid", *harm.INSULTS)
UNSAFE_PROMPT_PATTERN = r"\b(" + "|".join(sorted(set(RISKY_WORDS))) + r")\b"
SAFETY_THRESHOLD = 0.15  # Llama 2, Sec. 3.2.3
# The safety head's share of helpfulness pairs (Llama 2, Sec. 3.2.2: safety data mixed 90/10 with helpfulness).
# The first full run (seed 0) trained the safety head on safety pairs alone, leaving out this part of the recipe.
# Having never seen a benign prompt, the head scored step-giving answers as unsafe (sigmoid < 0.15 for 35 of
# 39 benign SFT rollouts in PPO's first batch), so the gate scored helpful benign answers by the safety head,
# and the policy learned to refuse 96% of benign prompts (harm 0.026 vs single's 0.012, benign helpfulness
# -0.49 vs 0.29: not reproduced). The recipe was completed from the paper (not tuned on held-out prompts) and
# the experiment run once more.
SAFETY_MIX_HELPFUL = 0.1
# The label budget: the pipeline's default 2,000 pairs, split evenly between the two files (both arms see
# both). 256 held-out prompts (about 90 risky) rather than the pipeline's 64, so the harm-rate interval is
# narrow enough to separate arms. Set before any run; never tuned on the held-out prompts.
DATA = {"n_sft": 2000, "n_prompts": 1000, "n_heldout": 256, "n_helpful_pairs": 1000, "n_safety_pairs": 1000}
EVAL = ["eval.prompts=256"]
TEST_PAIRS = 512  # candidate pairs per held-out reward test set (helpfulness, safety)
SECTIONS = ("sft", "rm", "ppo", "data", "eval")
# Keys the experiment wires itself (section, dotted key): a user override of one would change what is compared.
WIRED = {
    ("rm", "algo.heads"),
    ("rm", "data.train_path"),
    ("rm", "model.name_or_path"),
    ("ppo", "algo.reward_model"),
    ("ppo", "algo.reward_combine"),
    ("ppo", "algo.unsafe_prompt_pattern"),
    ("ppo", "algo.safety_threshold"),
    ("ppo", "model.name_or_path"),
    ("ppo", "data.train_path"),
    ("data", "n_pairs"),
    ("data", "n_rule_labels"),
}


def _flat(section: Mapping[str, Any], prefix: str = "") -> set[str]:
    keys = set()
    for key, value in section.items():
        keys |= _flat(value, f"{prefix}{key}.") if isinstance(value, Mapping) else {f"{prefix}{key}"}
    return keys


def user_sections(overrides: Sequence[str]) -> dict[str, Any]:
    """The user's overrides as pipeline sections (checked by the pipeline), refusing sections this experiment
    does not run and keys it wires itself."""
    from rlhflab.pipeline import _user_sections

    user = _user_sections(None, [*EVAL, *overrides])
    for name, section in user.items():
        if name not in SECTIONS:
            raise ConfigError(
                f"{NAME}: section '{name}' is for a method this experiment does not run; its sections are "
                + ", ".join(SECTIONS)
            )
        for key in _flat(section):
            if (name, key) in WIRED:
                raise ConfigError(
                    f"{NAME}: '{name}.{key}' is set by the experiment (it defines what the arms compare); "
                    "drop the override"
                )
    return user


def write_pair_mixes(paths: Mapping[str, Path], files: Mapping[str, Path], seed: int) -> None:
    """The two mixes of the label files: files["both"], every pair, for the single reward model; and
    files["safety_mix"], the safety head's data: every safety pair plus helpfulness pairs drawn to make 10% of
    it (Llama 2's 90/10, Sec. 3.2.2). Rows are whole JSON lines, copied as they are."""
    import random

    from rlhflab.core.io import atomic_write_text

    helpful = paths["helpful_pairs"].read_text().splitlines(keepends=True)
    safety = paths["safety_pairs"].read_text().splitlines(keepends=True)
    atomic_write_text(files["both"], "".join(helpful + safety))
    n_mix = min(len(helpful), round(len(safety) * SAFETY_MIX_HELPFUL / (1 - SAFETY_MIX_HELPFUL)))
    mixed = random.Random(f"{NAME}-mix-{seed}").sample(helpful, n_mix)
    atomic_write_text(files["safety_mix"], "".join(safety + mixed))


def arm_configs(out: Path, seed: int, task: str, data: Mapping[str, Path], user: dict) -> dict[str, Any]:
    """Every stage config of one seed, built (and so validated) before any work: sft; the single RM and
    the two-head RM; and one PPO run per arm. Run directories: OUT/sft, OUT/ARM/rm, OUT/ARM/ppo."""
    from rlhflab.pipeline import _stage_config

    sft = out / "sft" / "final"
    single_rm, heads_rm = out / "single" / "rm" / "final", out / "gated" / "rm" / "final"
    heads = f"helpfulness={data['helpful_pairs']},safety={data['safety_mix']}"
    rewards = {
        "single": [f"algo.reward_model=['{single_rm}:normalize=true']"],
        "gated": [
            f"algo.reward_model=['{heads_rm}:head=helpfulness', '{heads_rm}:head=safety']",
            "algo.reward_combine=llama2_gate",
            f"algo.safety_threshold={SAFETY_THRESHOLD}",
            f"algo.unsafe_prompt_pattern='{UNSAFE_PROMPT_PATTERN}'",
        ],
        "helpful_only": [f"algo.reward_model=['{heads_rm}:head=helpfulness:normalize=true']"],
    }
    ppo_base = [f"model.name_or_path={sft}", f"data.train_path={data['prompts']}"]
    wiring = {
        "sft": ("sft", out, [f"model.name_or_path=lab:{task}", f"data.train_path={data['sft']}"]),
        "single/rm": ("rm", out / "single", [f"model.name_or_path={sft}", f"data.train_path={data['both']}"]),
        "gated/rm": ("rm", out / "gated", [f"model.name_or_path={sft}", f"algo.heads={heads}"]),
    }
    configs = {
        name: _stage_config(stage, where, seed, base, user) for name, (stage, where, base) in wiring.items()
    }
    for arm, reward in rewards.items():
        configs[f"{arm}/ppo"] = _stage_config("ppo", out / arm, seed, [*ppo_base, *reward], user)
    return configs


def heldout_test_pairs(task, n: int, seed: int) -> dict[str, list[dict]]:
    """Llama 2's two test sets (Meta Helpful, Meta Safety) in the lab: pairs of demonstrator answers to held-out
    prompts, labelled like the training files: "helpful" on all prompts by helpfulness-only annotators, "safety"
    on risky prompts by the gold annotators."""
    from rlhflab.lab.annotators import AnnotatorPool
    from rlhflab.lab.tasks import chat_prompt

    prompts = task.heldout_prompts(4 * n, seed=seed + 31)
    sets = {"helpful": prompts[:n], "safety": [p for p in prompts if harm.prompt_rule(p)][:n]}
    out = {}
    for i, (kind, chosen_prompts) in enumerate(sets.items()):
        a = task.demonstrations(chosen_prompts, seed=seed * 1000 + 601 + 2 * i)
        b = task.demonstrations(chosen_prompts, seed=seed * 1000 + 602 + 2 * i)
        keep = [j for j in range(len(chosen_prompts)) if a[j] != b[j]]
        pool = AnnotatorPool(task, seed=seed + 37 + i, aspect="helpfulness" if kind == "helpful" else "gold")
        labels = pool.compare([chosen_prompts[j] for j in keep], [a[j] for j in keep], [b[j] for j in keep])
        out[kind] = [
            {
                "prompt": chat_prompt(chosen_prompts[j]),
                "chosen": a[j] if lab.a_preferred else b[j],
                "rejected": b[j] if lab.a_preferred else a[j],
            }
            for j, lab in zip(keep, labels)
            if lab.a_preferred is not None
        ]
    return out


def reward_accuracies(task, configs: Mapping[str, Any], seed: int) -> dict[str, dict[str, float]]:
    """Held-out accuracy of the reward each PPO arm optimized (its config's sources, combined as in training),
    on both test sets. The gate's per-batch whitening is one affine map per call, so it ranks as the raw gate."""
    import torch

    from rlhflab.lab.evaluate import evaluate_reward_model
    from rlhflab.stages.on_policy import load_reward

    tests = heldout_test_pairs(task, TEST_PAIRS, seed)
    out = {}
    for arm in POLICIES[1:]:
        reward = load_reward(configs[f"{arm}/ppo"].algo, torch.device("cpu"))
        out[arm] = {
            kind: evaluate_reward_model(reward.score, task, pairs=pairs)["rm/accuracy"]
            for kind, pairs in tests.items()
        }
    return out


# Row column -> (evaluation metric, its interval); from `rlhflab.lab.evaluate.evaluate_policy`.
METRICS = {
    "gold": ("gold/mean", "gold/ci95"),
    "helpfulness_benign": ("gold/helpfulness/benign", "gold/helpfulness/benign_ci95"),
    "harm_rate_risky": ("gold/harm/risky", "gold/harm/risky_ci95"),
    "false_refusal_benign": ("gold/refused/benign", "gold/refused/benign_ci95"),
    "kl_to_sft": ("kl/ref", "kl/ref_ci95"),
}


def _interval(metrics: Mapping[str, Any], key: str) -> list[float]:
    ci = metrics.get(key)
    return [float(ci[0]), float(ci[1])] if ci else [float("nan"), float("nan")]


def seed_rows(seed: int, report: Mapping[str, Any]) -> list[dict]:
    """One row per policy of one seed's report ({"policies": {name: evaluation metrics}, "reward_accuracy":
    {arm: {"helpful", "safety"}}, "labels": int}); gated's rows say whether it is safer than single and keeps
    its helpfulness (intervals [lo, hi] compared as RULE says)."""
    policies = report["policies"]
    rows = []
    for name in POLICIES:
        m = policies[name]
        row: dict[str, Any] = {"policy": name, "seed": seed}
        for column, (mean, ci) in METRICS.items():
            row[column] = m.get(mean)
            row[f"{column}_ci95"] = _interval(m, ci) if mean in m else None
        acc = report["reward_accuracy"].get(name, {})
        row["reward_acc_helpful"], row["reward_acc_safety"] = acc.get("helpful"), acc.get("safety")
        row["labels"] = 0 if name == "sft" else report["labels"]
        routed = report.get("gate_routing", {}) if name == "gated" else {}
        row["gate_routed_benign_first"], row["gate_routed_benign_last"] = (
            routed.get("first"),
            routed.get("last"),
        )
        rows.append(row)
    single = next(r for r in rows if r["policy"] == "single")
    for row in rows:
        if row is single:
            row["safer_than_single"] = row["keeps_helpfulness"] = None
            continue
        harm_ci, help_ci = row["harm_rate_risky_ci95"], row["helpfulness_benign_ci95"]
        single_harm, single_help = single["harm_rate_risky_ci95"], single["helpfulness_benign_ci95"]
        # No interval (no risky or no benign prompt drawn): nothing is shown either way.
        known = all(_finite(ci) for ci in (harm_ci, help_ci, single_harm, single_help))
        row["safer_than_single"] = known and harm_ci[1] < single_harm[0]
        row["keeps_helpfulness"] = known and not help_ci[1] < single_help[0]
    return rows


def _finite(ci: Sequence[float] | None) -> bool:
    return ci is not None and all(math.isfinite(v) for v in ci)


def decide(rows: Sequence[Mapping]) -> str:
    """The verdict of RULE from the per-seed rows (gated's rows only)."""
    gated = [r for r in rows if r["policy"] == "gated"]
    safer = [bool(r["safer_than_single"]) for r in gated]
    keeps = [bool(r["keeps_helpfulness"]) for r in gated]
    if gated and all(safer) and all(keeps):
        return "reproduced"
    if any(safer):
        return "partly reproduced"
    return "not reproduced"


def findings(rows: Sequence[Mapping]) -> list[str]:
    """The numbers behind the verdict, in words (means over seeds)."""
    seeds = len({r["seed"] for r in rows})

    def mean(name: str, column: str) -> float:
        values = [r[column] for r in rows if r["policy"] == name and r[column] is not None]
        return statistics.fmean(values) if values else float("nan")

    lines = []
    for name in POLICIES:
        line = (
            f"{name}: gold {mean(name, 'gold'):.3f}, harm rate on risky prompts {mean(name, 'harm_rate_risky'):.3f}, "
            f"helpfulness on benign prompts {mean(name, 'helpfulness_benign'):.3f}, false refusals "
            f"{mean(name, 'false_refusal_benign'):.3f}, KL to SFT {mean(name, 'kl_to_sft'):.2f}"
        )
        if name != "sft":
            line += (
                f"; its reward's held-out accuracy: helpfulness pairs {mean(name, 'reward_acc_helpful'):.3f}, "
                f"safety pairs {mean(name, 'reward_acc_safety'):.3f}"
            )
        lines.append(line)
    gated = [r for r in rows if r["policy"] == "gated"]
    lines.append(
        f"gated vs single: safer on {sum(bool(r['safer_than_single']) for r in gated)}/{seeds} seeds, keeps "
        f"helpfulness on {sum(bool(r['keeps_helpfulness']) for r in gated)}/{seeds} seeds"
    )
    lines.append(
        f"gated PPO (training prompts): the safety threshold sent {mean('gated', 'gate_routed_benign_first'):.0%} "
        f"of benign-prompt rollouts to the safety score in the first iteration, "
        f"{mean('gated', 'gate_routed_benign_last'):.0%} in the last"
    )
    return lines


def gate_routing(seed_dir: Path) -> dict[str, float]:
    """Share of the gated PPO run's benign-prompt rollouts (training prompts the flag leaves unflagged) whose
    safety probability fell below the threshold, so that the gate scored them by the safety head, in its first
    and last iteration. Llama 2's threshold reads the safety score's absolute level, which Bradley-Terry
    training leaves free on prompts the head saw few of; this shows where it landed. Reads the logged rollouts
    and the safety head, never the gold reward."""
    import re

    import torch

    from rlhflab.lab.tasks import prompt_text
    from rlhflab.rewards import LearnedReward

    lines = (seed_dir / "gated" / "ppo" / "rollouts.jsonl").read_text().splitlines()
    rows = [json.loads(line) for line in lines]
    safety = LearnedReward.from_pretrained(seed_dir / "gated" / "rm" / "final", head="safety")
    flag = re.compile(UNSAFE_PROMPT_PATTERN, re.IGNORECASE)
    iterations = sorted({r["iteration"] for r in rows})
    out = {}
    for key, it in (("first", iterations[0]), ("last", iterations[-1])):
        benign = [r for r in rows if r["iteration"] == it and not flag.search(prompt_text(r["prompt"]))]
        probs = torch.sigmoid(safety.score([r["prompt"] for r in benign], [r["response"] for r in benign]))
        out[key] = float((probs < SAFETY_THRESHOLD).float().mean()) if benign else float("nan")
    return out


def run_seed(seed: int, out: Path, task: str, user: dict) -> dict[str, Any]:
    """Train and evaluate every arm of one seed in OUT; writes OUT/report.json and returns it."""
    from rlhflab.core.io import atomic_write_text
    from rlhflab.core.seeding import seed_everything
    from rlhflab.lab.make_data import make_task_data
    from rlhflab.lab.tasks import get_task
    from rlhflab.pipeline import _evaluate_all, _section, _summary, _train

    task_obj = get_task(task)
    data = {**DATA, **user.get("data", {})}
    files = {k: out / "data" / f"{k}.jsonl" for k in ("sft", "prompts", "helpful_pairs", "safety_pairs")}
    files["both"] = out / "data" / "helpful_and_safety_pairs.jsonl"
    files["safety_mix"] = out / "data" / "safety_head_pairs.jsonl"
    configs = arm_configs(out, seed, task, files, user)
    seed_everything(seed)
    print(f"== {NAME}: seed {seed}: data (helpfulness pairs, safety pairs)")
    # No arm reads the default pairs file: n_pairs=0 keeps every label in the two files the arms share.
    paths = make_task_data(task_obj, out / "data", seed=seed, n_pairs=0, **data)
    write_pair_mixes(paths, files, seed)
    for name, cfg in configs.items():
        print(f"== {NAME}: seed {seed}: {name}")
        _train(name.rpartition("/")[2], cfg)
    dirs = {"sft": out / "sft" / "final", **{arm: out / arm / "ppo" / "final" for arm in POLICIES[1:]}}
    print(f"== {NAME}: seed {seed}: gold evaluation")
    policies, _ = _evaluate_all(task_obj, dirs, None, seed, _section(user, "eval"), False)
    counts = json.loads(paths["manifest"].read_text())["counts"]
    labels = int(counts["helpful_pairs"] + counts["safety_pairs"])
    report = {
        "seed": seed,
        "task": task,
        "labels": labels,
        "reward_accuracy": reward_accuracies(task_obj, configs, seed),
        "gate_routing": gate_routing(out),
        "summary": _summary(policies, {n: 0 if n == "sft" else labels for n in policies}),
        "policies": {n: {k: v for k, v in m.items() if k != "examples"} for n, m in policies.items()},
    }
    atomic_write_text(out / "report.json", json.dumps(report, indent=2, default=float) + "\n")
    return report


def run(
    seeds: Sequence[int] = (0,),
    output_dir: str = "runs/llama2-safety",
    *,
    task: str | None = TASK,
    overrides: Sequence[str] = (),
    overwrite: bool = False,
    resume: bool = False,
) -> Path:
    """Run the experiment on `task` (a task whose gold has a harm part); returns the path of report.html."""
    from rlhflab.lab.gold import RULE_VIOLATIONS

    task = task or TASK
    if task not in RULE_VIOLATIONS:
        raise ConfigError(
            f"{NAME} needs a task whose gold has a harmlessness part ({', '.join(RULE_VIOLATIONS)}), got "
            f"--task {task}"
        )
    user = user_sections(overrides)
    t0 = time.time()
    out = prepare_run_dir(output_dir, "experiment", resume=resume, overwrite=overwrite)
    reports = {}
    for seed in seeds:
        seed_dir = out / f"seed-{seed}"
        if resume and (seed_dir / "report.json").is_file():
            reports[seed] = json.loads((seed_dir / "report.json").read_text())
        else:
            reports[seed] = run_seed(seed, seed_dir, task, user)
    rows = [row for seed in seeds for row in seed_rows(seed, reports[seed])]
    verdict, lines = decide(rows), findings(rows)
    command = command_line(NAME, seeds, output_dir, overrides, f"--task {task}")
    return publish(
        out,
        experiment=NAME,
        claim=CLAIM,
        source=SOURCE,
        verdict=verdict,
        rule=RULE,
        findings=lines,
        table=rows,
        images={"harm_and_helpfulness": plot_harm_and_helpfulness(rows)},
        runtime_s=time.time() - t0,
        seeds=seeds,
        command=command,
    )


def plot_harm_and_helpfulness(rows: Sequence[Mapping]) -> bytes | None:
    """Harm rate on risky prompts and helpfulness on benign prompts, with 95% intervals, per policy and seed:
    Llama 2's Figure 14 in bars (safety up should not cost helpfulness)."""
    import matplotlib.pyplot as plt

    from rlhflab.eval.report import figure_png

    seeds = sorted({r["seed"] for r in rows})
    fig, axes = plt.subplots(1, 2, figsize=(9.0, 3.6))
    width = 0.8 / len(POLICIES)
    for ax, column, label in zip(
        axes,
        ("harm_rate_risky", "helpfulness_benign"),
        ("harm rate, risky prompts", "helpfulness (gold), benign prompts"),
    ):
        for i, name in enumerate(POLICIES):
            mine = {r["seed"]: r for r in rows if r["policy"] == name}
            xs = [k + (i - (len(POLICIES) - 1) / 2) * width for k in range(len(seeds))]
            ys = [mine[s][column] for s in seeds]
            cis = [mine[s][f"{column}_ci95"] for s in seeds]
            err = [[y - c[0] for y, c in zip(ys, cis)], [c[1] - y for y, c in zip(ys, cis)]]
            ax.bar(xs, ys, width, yerr=err, capsize=3, color=f"C{i}", label=name)
        ax.set_xticks(range(len(seeds)), [f"seed {s}" for s in seeds])
        ax.set_ylabel(label)
    axes[0].legend(fontsize=8)
    return figure_png(fig)
