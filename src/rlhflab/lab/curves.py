"""Gold reward and KL over training, from a run's snapshots (`logging.snapshot_every`).

A training loop never sees the gold reward: it only saves its model every N steps (RUN/snapshots/step-N).
Here, afterwards, each snapshot is sampled on the same held-out prompts and judged by the gold reward, and
its KL to the reference (the SFT model) is estimated on its own samples. Curves of every method then share
one x-axis that means the same thing for all of them, the KL spent (Gao et al. 2023 plot gold against
sqrt(KL); so does the report), and methods can be compared at matched KL rather than only at their final
checkpoints.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from rlhflab.lab.evaluate import PolicySamples, conditioning_of, evaluate_policy
from rlhflab.lab.tasks import LabTask

CURVE_KEYS = ("gold/mean", "gold/win_rate", "kl/ref", "sample/len_mean")


def snapshot_steps(run_dir: str | Path) -> list[tuple[int, Path]]:
    """The (step, directory) of each snapshot of a run, in step order."""
    root = Path(run_dir) / "snapshots"
    if not root.is_dir():
        return []
    saved = ("config.json", "adapter_config.json")  # a full model, or a LoRA run's adapter
    found = [
        (int(p.name.removeprefix("step-")), p)
        for p in root.glob("step-*")
        if any((p / name).is_file() for name in saved)
    ]
    return sorted(found)


def gold_curve(
    task: LabTask,
    run_dir: str | Path,
    *,
    ref_model,
    tokenizer,
    prompts: Sequence[str],
    ref_samples: PolicySamples,
    start: dict | None = None,
    n_samples: int = 2,
    seed: int = 0,
) -> list[dict[str, float]]:
    """[{step, gold/mean, gold/win_rate, kl/ref, sample/len_mean}, ...] over the run's snapshots.

    ref_model: the model the KL is measured to (the SFT model); ref_samples: its samples on `prompts`, for
    the win rate. start: the step-0 point (the reference's own metrics), prepended when given.
    """
    from rlhflab.models.loading import load_inference_lm, load_tokenizer

    curve = [{"step": 0, **{k: float(start[k]) for k in CURVE_KEYS if k in start}}] if start else []
    for step, directory in snapshot_steps(run_dir):
        model = load_inference_lm(directory)
        conditioning = conditioning_of(directory)  # a Quark snapshot: its best token, its own tokenizer
        metrics = evaluate_policy(
            model,
            load_tokenizer(directory) if conditioning else tokenizer,
            task,
            conditioning=conditioning,
            prompts=prompts,
            n_samples=n_samples,
            ref_model=ref_model,
            ref_samples=ref_samples,
            seed=seed,
        )
        curve.append({"step": step, **{k: float(metrics[k]) for k in CURVE_KEYS if k in metrics}})
    return curve
