"""Lab names in stage configs, resolved before a stage starts.

The stages only know local model directories and data files. The lab adds two conveniences on top, for
the command line and the pipeline:

- `lab:TASK` (or `lab:TASK:tiny`, the seconds-long budget for tests) as a model names the lab task's
  pretrained base model, built and cached on first use;
- a stage whose `data.train_path` is empty while its model belongs to a lab task (a `lab:` name, or a model
  trained from one: its config.json carries the task under `LAB_TASK_KEY`) gets the task's built-in data,
  made by the simulated annotators and cached per (task, seed).

`resolve_lab(cfg, stage)` returns the config with both applied, so the run directory's config.yaml names
the real directories and files the stage used.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from rlhflab.core.io import atomic_dir
from rlhflab.errors import ConfigError, UserError
from rlhflab.lab.pretrain import LAB_TASK_KEY, cache_root, ensure_base_model
from rlhflab.lab.tasks import get_task

# Which file of the lab's data each record kind reads, and how many extra records the kinds that are not
# made by default get.
LAB_FILES = {
    "sft": "sft",
    "pairwise": "pairs",
    "prompt": "prompts",
    "ranked": "rankings",
    "unpaired": "unpaired",
}
EXTRA_COUNTS = {"rankings": 500, "unpaired": 1000}


def lab_task_of(model_name: str) -> str | None:
    """The lab task a model belongs to: 'lab:TASK' or 'lab:TASK:BUDGET' -> TASK; a model directory trained
    from a lab base model -> that task; anything else -> None."""
    if model_name.startswith("lab:"):
        return model_name[len("lab:") :].partition(":")[0]
    from rlhflab.models.loading import model_dir_config

    try:  # a LoRA adapter directory: the config of the model at the end of its chain of bases
        config = model_dir_config(model_name)
        task = json.loads(config.read_text()).get(LAB_TASK_KEY)
    except (OSError, ValueError, UserError):
        return None
    return task if isinstance(task, str) and task else None


def lab_model_dir(name: str, *, seed: int = 0) -> str:
    """The directory of a model name: 'lab:TASK[:BUDGET]' -> the cached base model (pretrained if needed);
    anything else is returned unchanged."""
    if not name.startswith("lab:"):
        return name
    task, _, budget = name[len("lab:") :].partition(":")
    return str(ensure_base_model(get_task(task), budget=budget or "default", seed=seed))


def lab_data(task: str, *, seed: int, kinds: tuple[str, ...], log=print) -> dict[str, Path]:
    """The lab task's data files for record `kinds` (made once per task version, seed and extra kinds, in the
    lab cache; a directory appears whole or not at all); returns {file name: path}."""
    from rlhflab.lab.make_data import make_task_data

    task_obj = get_task(task)
    wanted = {LAB_FILES[k] for k in kinds}
    extras = sorted(wanted & set(EXTRA_COUNTS))
    out = (
        cache_root()
        / "lab"
        / f"data-{task_obj.name}-v{task_obj.version}-s{seed}{''.join('-' + e for e in extras)}"
    )
    if not (out / "lab_data.json").is_file():
        log(f"data: making the lab task '{task}' data in {out}")
        with atomic_dir(out) as tmp:
            make_task_data(
                task_obj,
                tmp,
                seed=seed,
                n_rankings=EXTRA_COUNTS["rankings"] if "rankings" in extras else 0,
                n_unpaired=EXTRA_COUNTS["unpaired"] if "unpaired" in extras else 0,
            )
    return {name: out / f"{name}.jsonl" for name in wanted}


def record_kind(stage: str, cfg: Any) -> str:
    """The record kind a stage config trains on (`rlhflab.data` kinds)."""
    if stage == "sft":
        return "sft"
    if stage == "rm":
        if cfg.algo.loss == "step":  # the lab's steps file holds one solution string with step labels
            raise ConfigError(
                "the lab writes no stepwise data ({prompt, completions, labels}) for algo.loss=step; give "
                "data.train_path (see `rlhflab experiment prm-vs-orm` for how to make it)"
            )
        pairwise = {"bradley_terry": "pairwise", "distributional": "pairwise", "binary": "unpaired"}
        return pairwise.get(cfg.algo.loss, "ranked")
    if stage == "pm":
        return "pairwise"
    if stage in ("ppo", "rloo", "grpo", "online-dpo", "rs", "quark"):
        return "prompt"
    if stage == "iterative-dpo":  # sDPO trains on a pairs file, the iterative and DNO rounds on prompts
        return "pairwise" if cfg.algo.mode == "sdpo" else "prompt"
    if stage == "dpo":
        from rlhflab.losses.preference import PREFERENCE_LOSS_TABLE

        return PREFERENCE_LOSS_TABLE[cfg.algo.loss].data
    raise ValueError(f"unknown stage {stage!r}")


def lab_feedback(cfg: Any, stage: str, *, task: str | None = None, log=print):
    """The feedback source a stage's algo.feedback=lab asks: the simulated annotators (algo.annotators) of `task`
    or else the lab task of model.name_or_path, seeded by the run's seed; None when the stage asks no lab
    feedback.

    Raises:
        ConfigError: the model belongs to no lab task.
    """
    algo = getattr(cfg, "algo", None)
    if getattr(algo, "feedback", None) != "lab":
        return None
    from rlhflab.lab.annotators import AnnotatorSettings
    from rlhflab.lab.feedback import AnnotatorFeedback

    task = task or lab_task_of(cfg.model.name_or_path)
    if task is None:
        raise ConfigError(
            f"config: algo.feedback=lab asks the simulated annotators of the model's lab task, but "
            f"model.name_or_path={cfg.model.name_or_path} belongs to no lab task; give a lab model (lab:TASK, or "
            "a model trained from one) or use algo.feedback=reward with algo.reward_model"
        )
    a = algo.annotators
    settings = AnnotatorSettings(
        temperature=a.temperature,
        noise=a.noise,
        n_annotators=a.n_annotators,
        length_bias=a.length_bias,
        bias_spread=a.bias_spread,
        tie_margin=a.tie_margin,
        keep_ties=a.keep_ties,
    )
    log(
        f"{stage}: feedback from the lab task '{task}' simulated annotators (temperature {a.temperature}, noise "
        f"{a.noise}, {a.n_annotators} annotator(s), length bias {a.length_bias}, bias spread {a.bias_spread}, tie margin {a.tie_margin})"
    )
    return AnnotatorFeedback(task, settings, seed=cfg.seed)


def resolve_lab(cfg: Any, stage: str, *, log=print) -> Any:
    """`cfg` with lab model names replaced by directories and, for a lab model without data, the lab's data."""
    model_name = cfg.model.name_or_path
    task = lab_task_of(model_name)
    cfg = dataclasses.replace(
        cfg, model=dataclasses.replace(cfg.model, name_or_path=lab_model_dir(model_name, seed=cfg.seed))
    )
    if getattr(cfg, "ref_model", ""):
        cfg = dataclasses.replace(cfg, ref_model=lab_model_dir(cfg.ref_model, seed=cfg.seed))
    # sDPO reads its pairs from data.pairs_path (its data.train_path is the prompts of the iterative mode).
    key = "pairs_path" if stage == "iterative-dpo" and cfg.algo.mode == "sdpo" else "train_path"
    if (
        getattr(cfg.data, key)
        or task is None
        or (stage == "rm" and all(h.data for h in cfg.algo.head_specs()))
    ):
        return cfg
    kind = record_kind(stage, cfg)
    path = lab_data(task, seed=cfg.seed, kinds=(kind,), log=log)[LAB_FILES[kind]]
    origin = (
        "" if model_name.startswith("lab:") else f" ({model_name} comes from the lab's '{task}' base model)"
    )
    log(f"data: the lab task '{task}' {kind} data, {path}{origin}")
    return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, **{key: str(path)}))
