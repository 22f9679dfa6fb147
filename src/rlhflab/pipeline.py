"""`rlhflab run`: the InstructGPT pipeline and its alternatives on a lab task, judged by the hidden gold reward.

    0. data      the lab's simulated annotators label pairs; demonstrations and prompts are written to disk
    1. sft       supervised fine-tuning of the lab's pretrained base model on the demonstrations
    2. rm        a reward model initialized from the SFT model, trained on the preference pairs
    3. ppo       PPO against the reward model with a KL penalty to the SFT model
       ppo_kl0   the same with no KL penalty: the reward-hacking run (proxy up, gold down)
    4. dpo       DPO from the SFT model on the same preference pairs
    5. eval      SFT, best-of-16 (against the reward model), PPO and DPO sampled on held-out prompts and
                 scored by the gold reward that no training stage ever saw
    6. report    report.json, plots and report.html

Every stage is an ordinary stage run in OUTPUT_DIR/STAGE (config, metrics, final model), so any of them
can be re-run alone with `rlhflab STAGE --config OUTPUT_DIR/STAGE/config.yaml`.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

from rlhflab.config import STAGE_CONFIGS, build_config, deep_merge, parse_overrides, read_yaml
from rlhflab.core.run_dir import prepare_run_dir
from rlhflab.core.seeding import seed_everything
from rlhflab.errors import ConfigError

PIPELINE_STAGES = ("sft", "rm", "ppo", "ppo_kl0", "dpo")
# Non-stage sections of the pipeline config: how much lab data to make and how to evaluate.
PIPELINE_SECTIONS = {
    "data": {"n_sft": 2000, "n_pairs": 2000, "n_prompts": 1000, "n_heldout": 256},
    "eval": {"prompts": 64, "samples": 4, "best_of_n": 16},
}

# Defaults tuned so that the whole run takes about 1.5 minutes on 2 CPU cores (see BENCHMARKS.md).
DEFAULTS: dict[str, list[str]] = {
    "sft": [
        "optim.lr=1e-3",
        "optim.batch_size=32",
        "optim.epochs=1",
        "data.max_length=64",
        "data.max_prompt_length=24",
        "logging.log_every=5",
    ],
    "rm": [
        "optim.lr=1e-3",
        "optim.batch_size=32",
        "optim.epochs=3",
        "algo.margin=small",
        "data.max_length=64",
        "data.max_prompt_length=24",
        "data.eval_fraction=0.1",
        "logging.log_every=5",
    ],
    "ppo": [
        "optim.lr=2e-4",
        "algo.iterations=100",
        "algo.rollout_batch_size=64",
        "algo.minibatch_size=32",
        "algo.ppo_epochs=2",
        "algo.kl_coef=0.05",
        "sampling.max_new_tokens=24",
        "logging.log_every=1",
    ],
    "ppo_kl0": ["algo.kl_coef=0"],
    "dpo": [
        "optim.lr=2e-4",
        "optim.batch_size=32",
        "optim.epochs=1",
        "algo.beta=0.1",
        "data.max_length=64",
        "data.max_prompt_length=24",
        "logging.log_every=5",
    ],
}


def _stage_config(stage: str, out: Path, seed: int, base: list[str], user: dict[str, Any]):
    """Stage config = stage defaults <- pipeline defaults <- wiring (`base`) <- the user's section."""
    kind = "ppo" if stage == "ppo_kl0" else stage
    data: dict[str, Any] = {}
    for layer in (DEFAULTS[kind], DEFAULTS["ppo_kl0"] if stage == "ppo_kl0" else [], base):
        data = deep_merge(data, parse_overrides(layer))
    data = deep_merge(data, user.get(stage, {}))
    data = deep_merge(data, {"seed": seed, "logging": {"output_dir": str(out / stage)}})
    return build_config(STAGE_CONFIGS[kind], data)


def _user_sections(config_file: str | None, overrides: list[str]) -> dict[str, Any]:
    """The user's pipeline config: one section per stage (a stage config's keys) plus `data` and `eval`."""
    user = read_yaml(config_file) if config_file else {}
    user = deep_merge(user, parse_overrides(overrides))
    where = config_file or "command line"
    sections = (*PIPELINE_STAGES, *PIPELINE_SECTIONS)
    for key, value in user.items():
        if key not in sections:
            raise ConfigError(
                f"{where}: unknown pipeline section '{key}'; sections are {', '.join(sections)} "
                "(e.g. sft.optim.lr=1e-4 or data.n_pairs=4000)"
            )
        if not isinstance(value, dict):
            raise ConfigError(
                f"{where}: '{key}' must be a section of keys (e.g. {key}.KEY=VALUE), got {value!r}"
            )
    for name, defaults in PIPELINE_SECTIONS.items():
        for key, value in user.get(name, {}).items():
            if key not in defaults:
                raise ConfigError(
                    f"{where}: unknown key '{name}.{key}'; known: "
                    + ", ".join(f"{name}.{k}" for k in defaults)
                )
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{where}: '{name}.{key}' must be a positive integer, got {value!r}")
    return user


def _section(user: dict[str, Any], name: str) -> dict[str, int]:
    return {**PIPELINE_SECTIONS[name], **user.get(name, {})}


def _gold_curve(task, run_dir: Path) -> list[dict[str, float]]:
    """Per-iteration proxy score, gold reward and KL of a PPO run's logged rollouts (gold scored here, after
    training, so the training loop never sees it)."""
    import json

    from rlhflab.lab.gold import gold_scores
    from rlhflab.lab.tasks import prompt_text

    by_iter: dict[int, list[dict]] = {}
    with open(run_dir / "rollouts.jsonl") as f:
        for line in f:
            row = json.loads(line)
            by_iter.setdefault(row["iteration"], []).append(row)
    curve = []
    for it, rows in sorted(by_iter.items()):
        gold = gold_scores(task, [prompt_text(r["prompt"]) for r in rows], [r["response"] for r in rows])
        curve.append(
            {
                "step": it,
                "reward/score": float(np.mean([r["score"] for r in rows])),
                "gold/mean": float(np.mean(gold)),
                "kl/ref": float(np.mean([r["kl"] for r in rows])),
            }
        )
    return curve


def _evaluate_all(
    task, dirs: dict[str, Path], rm_dir: Path, seed: int, ev: dict[str, int]
) -> tuple[dict, dict]:
    """Gold evaluation of every policy against SFT samples on the same held-out prompts."""
    from rlhflab.lab.evaluate import evaluate_policy, evaluate_reward_model, sample_policy
    from rlhflab.models.loading import load_causal_lm, load_tokenizer
    from rlhflab.rewards import LearnedReward

    prompts = task.heldout_prompts(ev["prompts"], seed=seed)
    tokenizer = load_tokenizer(dirs["sft"])
    sft = load_causal_lm(dirs["sft"])
    sft_samples = sample_policy(sft, tokenizer, task, prompts, n_samples=ev["samples"], seed=seed + 1)
    results = {}
    for name in ("sft", "ppo", "ppo_kl0", "dpo"):
        model = sft if name == "sft" else load_causal_lm(dirs[name])
        results[name] = evaluate_policy(
            model,
            tokenizer,
            task,
            prompts=prompts,
            n_samples=ev["samples"],
            ref_model=sft,
            ref_samples=sft_samples,
            seed=seed + 2,
        )
    reward = LearnedReward.from_pretrained(rm_dir)
    results[f"best_of_{ev['best_of_n']}"] = _evaluate_best_of_n(
        task, sft, tokenizer, reward, prompts, sft_samples, seed, ev["samples"], ev["best_of_n"]
    )
    rm_metrics = evaluate_reward_model(reward.score, task, seed=seed)
    return results, {"rm": rm_metrics}


def _evaluate_best_of_n(
    task, sft, tokenizer, reward, prompts, sft_samples, seed, n_samples: int, n: int
) -> dict:
    """Best-of-n is a sampling procedure, not a model: evaluate its picks directly by gold."""
    from rlhflab.eval import metrics as M
    from rlhflab.lab.evaluate import sample_metrics, score_responses
    from rlhflab.lab.tasks import chat_prompt
    from rlhflab.stages.best_of_n import best_of_n

    picks = []
    for j in range(n_samples):
        out = best_of_n(sft, tokenizer, [chat_prompt(p) for p in prompts], reward, n=n, seed=seed + 10 + j)
        picks.append(out.texts)
    samples = score_responses(
        task, list(prompts), [[picks[j][i] for j in range(n_samples)] for i in range(len(prompts))]
    )
    mean, lo, hi = M.mean_ci95(samples.gold.mean(axis=1))
    win = M.win_rate_all_pairs(samples.gold, sft_samples.gold)
    wmean, wlo, whi = M.mean_ci95(win)
    return {
        "gold/mean": mean,
        "gold/ci95": [lo, hi],
        "gold/win_rate": wmean,
        "gold/win_rate_ci95": [wlo, whi],
        # The KL of best-of-n to its base policy is at most log n - (n - 1) / n (Stiennon et al. 2020).
        "kl/ref": float(np.log(n) - (n - 1) / n),
        **sample_metrics(samples),
        "examples": [
            {"prompt": p, "response": rs[0], "gold": float(g[0])}
            for p, rs, g in list(zip(samples.prompts, samples.responses, samples.gold))[:6]
        ],
    }


def _summary(policies: dict) -> dict:
    """The report.json summary block: one row per policy."""
    out = {}
    for name, m in policies.items():
        ci = m.get("gold/ci95") or [np.nan, np.nan]
        out[name] = {
            "gold_reward_mean": m["gold/mean"],
            "gold_reward_ci95": float((ci[1] - ci[0]) / 2),
            "win_rate_vs_sft": m.get("gold/win_rate", 0.5),
            "kl_to_sft": m.get("kl/ref", 0.0),
            "mean_length": m["sample/len_mean"],
        }
    return out


def _wiring(task: str, data: dict[str, Path], final: dict[str, Path]) -> dict[str, list[str]]:
    """Each stage's model and data: the lab's base model and files, then each stage from the SFT model."""
    wiring = {
        "sft": [f"model.name_or_path=lab:{task}", f"data.train_path={data['sft']}"],
        "rm": [f"model.name_or_path={final['sft']}", f"data.train_path={data['pairs']}"],
        "ppo": [
            f"model.name_or_path={final['sft']}",
            f"data.train_path={data['prompts']}",
            f"algo.reward_model={final['rm']}",
        ],
        "dpo": [f"model.name_or_path={final['sft']}", f"data.train_path={data['pairs']}"],
    }
    wiring["ppo_kl0"] = wiring["ppo"]
    return wiring


def run_pipeline(
    *,
    task: str = "sentiment",
    seed: int = 0,
    output_dir: str = "runs/demo",
    config_file: str | None = None,
    overrides: list[str] | None = None,
    overwrite: bool = False,
) -> Path:
    """Run the whole pipeline; returns the path of report.html."""
    from rlhflab.lab.launch import resolve_lab
    from rlhflab.lab.make_data import make_task_data
    from rlhflab.lab.tasks import get_task
    from rlhflab.stages import dpo, ppo, reward, sft

    t_start = time.time()
    task_obj = get_task(task)
    user = _user_sections(config_file, overrides or [])
    out = Path(output_dir)
    # Every stage's config is built (and validated) before any work starts, so a typo in the last stage's
    # section fails in a second, not after ten minutes. Stages save their model to STAGE/final.
    data = {name: out / "data" / f"{name}.jsonl" for name in ("sft", "pairs", "prompts")}
    final = {stage: out / stage / "final" for stage in PIPELINE_STAGES}
    wiring = _wiring(task, data, final)
    configs = {stage: _stage_config(stage, out, seed, wiring[stage], user) for stage in PIPELINE_STAGES}
    out = prepare_run_dir(output_dir, "run", resume=False, overwrite=overwrite)
    seed_everything(seed)

    print(f"[0/6] data: simulated annotators label the '{task}' task")
    paths = make_task_data(task_obj, out / "data", seed=seed, **_section(user, "data"))
    assert all(paths[name] == path for name, path in data.items()), paths
    trainers = {
        "sft": sft.train,
        "rm": reward.train,
        "ppo": ppo.train,
        "ppo_kl0": ppo.train,
        "dpo": dpo.train,
    }
    titles = {
        "sft": "[1/6] sft",
        "rm": "[2/6] reward model",
        "ppo": "[3/6] ppo",
        "ppo_kl0": "[3/6] ppo_kl0 (no KL penalty: the reward-hacking run)",
        "dpo": "[4/6] dpo",
    }
    for stage in PIPELINE_STAGES:
        print(titles[stage])
        saved = trainers[stage](resolve_lab(configs[stage], "ppo" if stage == "ppo_kl0" else stage))
        if Path(saved) != final[stage]:
            raise RuntimeError(f"{stage} saved its model to {saved}, expected {final[stage]}")
    dirs, rm_dir = {s: final[s] for s in ("sft", "ppo", "ppo_kl0", "dpo")}, final["rm"]
    print("[5/6] gold evaluation")
    policies, reward_models = _evaluate_all(task_obj, dirs, rm_dir, seed, _section(user, "eval"))
    # Only the PPO runs have a proxy/gold/KL curve; the other stages' losses stay in their metrics.jsonl.
    curves = {name: _gold_curve(task_obj, out / name) for name in ("ppo", "ppo_kl0")}
    print("[6/6] report")
    from rlhflab.eval.report import write_report

    runtime = time.time() - t_start
    summary = _summary(policies)
    paths_out = write_report(
        out,
        task=task,
        policies=policies,
        reward_models=reward_models,
        curves=curves,
        meta={"seed": seed, "runtime_s": runtime, "summary": summary},
    )
    _patch_report_json(paths_out["json"], task, seed, runtime, reward_models, summary)
    _print_table(summary, paths_out["html"])
    return paths_out["html"]


def _patch_report_json(
    path: Path, task: str, seed: int, runtime: float, reward_models: dict, summary: dict
) -> None:
    """Add the top-level fields promised by `rlhflab run` (task, seed, runtime_s, reward_model, policies)."""
    import json

    from rlhflab.core.io import atomic_write_text

    report = json.loads(path.read_text())
    report.update(
        {
            "task": task,
            "seed": seed,
            "runtime_s": runtime,
            "reward_model": {"heldout_accuracy": reward_models["rm"].get("rm/accuracy")},
        }
    )
    report["policy_metrics"] = report.pop("policies")
    report["policies"] = json.loads(json.dumps(summary, default=float).replace("NaN", "null"))
    atomic_write_text(path, json.dumps(report, indent=2) + "\n")


def _print_table(summary: dict, html: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="gold-reward evaluation (held-out prompts)")
    for col in ("policy", "gold reward", "win rate vs SFT", "KL to SFT", "mean length"):
        table.add_column(col, justify="right" if col != "policy" else "left")
    for name, row in summary.items():
        table.add_row(
            name,
            f"{row['gold_reward_mean']:.3f} ± {row['gold_reward_ci95']:.3f}",
            f"{row['win_rate_vs_sft']:.2f}",
            f"{row['kl_to_sft']:.2f}",
            f"{row['mean_length']:.1f}",
        )
    Console().print(table)
    print(f"report: {html}")


__all__ = ["run_pipeline"]
