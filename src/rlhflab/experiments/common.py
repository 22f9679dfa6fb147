"""What several experiments share: splitting the user's overrides between the pipeline and the experiment."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from rlhflab.errors import ConfigError


def split_overrides(
    experiment: str,
    overrides: Sequence[str],
    *,
    own: Mapping[str, Mapping[str, int]],
    pipeline: Sequence[str],
    fixed: Mapping[str, str] = {},
) -> tuple[list[str], dict[str, dict[str, int]]]:
    """(the overrides for the pipeline, the experiment's own sections) from `SECTION.KEY=VALUE` items.

    own: the experiment's sections of positive integers with their defaults (e.g. {"eval": {"prompts": 256}});
    pipeline: the sections passed on to `run_pipeline` (stages it runs, "data", "annotators"); fixed: keys the
    experiment sets itself ({"annotators.length_bias": why}), refused. Anything else is refused with the keys
    the experiment takes, before any work."""
    from rlhflab.config import parse_overrides

    to_pipeline: list[str] = []
    sections = {name: dict(defaults) for name, defaults in own.items()}
    for item in overrides:
        key = item.split("=", 1)[0]
        section, _, name = key.partition(".")
        if key in fixed:
            raise ConfigError(f"{experiment}: '{key}' is set by the experiment ({fixed[key]}); leave it out")
        if section in sections:
            if name not in sections[section]:
                raise ConfigError(
                    f"{experiment}: unknown key '{key}'; known: "
                    + ", ".join(f"{section}.{k}" for k in sections[section])
                )
            value = parse_overrides([item])[section][name]
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{experiment}: '{key}' must be a positive integer, got {value!r}")
            sections[section][name] = value
        elif section in pipeline:
            to_pipeline.append(item)
        else:
            takes = [*(f"{s}." for s in pipeline), *(f"{s}.{k}" for s, d in own.items() for k in d)]
            raise ConfigError(
                f"{experiment}: '{key}' is for something this experiment does not run; it takes "
                + ", ".join(takes)
            )
    return to_pipeline, sections


def control_settings(
    name: str, overrides: Sequence[str], own: Mapping, check, task: str | None, default_task: str
):
    """(environment id, the experiment's own sections) of a control-task experiment, every check done before any
    work: the overrides (`split_overrides`), the experiment's `check`, the task, the control extra installed."""
    from rlhflab.control import require_control
    from rlhflab.control.ppo import check_env_id

    _, sections = split_overrides(name, overrides, own=own, pipeline=())
    check(sections)
    env_id = task or default_task
    check_env_id(env_id)
    require_control()
    return env_id, sections


def seed_results(name: str, seeds: Sequence[int], out, resume: bool, run_seed, where: str = "") -> list[dict]:
    """`run_seed(seed)` for each seed, its JSON result kept in OUT/seed-S/seed.json (written atomically); with
    `resume`, a seed whose file exists is read back, not run again. Returns the results in the seeds' order."""
    import json

    from rlhflab.core.io import atomic_write_text

    results = []
    for i, seed in enumerate(seeds, 1):
        path = out / f"seed-{seed}" / "seed.json"
        if not (resume and path.is_file()):
            print(f"== {name}: seed {seed} ({i}/{len(seeds)}){where}", flush=True)
            result = run_seed(seed)
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(path, json.dumps(result))
        results.append(json.loads(path.read_text()))
    return results
