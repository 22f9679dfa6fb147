"""Data parallelism of `rlhflab pm` (stages/parallel.py): two processes started by `torchrun` (or sharded by FSDP)
take one process's steps, the main process alone writes, and a run two processes began resumes in one."""

from __future__ import annotations

import shutil

import pytest

from rlhflab.core.metrics_log import read_metrics
from rlhflab.errors import ConfigError
from rlhflab.stages import preference_model as pm
from rlhflab.stages.parallel import DataParallel

from ..helpers import QUIET, stage_config, write_jsonl
from .test_parallel import (
    FSDP,
    LAUNCHERS,
    _accelerate_config,
    _assert_same_metrics,
    _assert_same_weights,
    _launch,
)


def _drop_latest_checkpoint(run) -> None:
    """Leave the run as if stopped after its next-to-last checkpoint: no final model, no later checkpoint."""
    shutil.rmtree(run / "final")
    shutil.rmtree(sorted((run / "checkpoints").iterdir())[-1])


# ---- pm -----------------------------------------------------------------------------------------------------------


def _pm_overrides(tiny_model_dir, tmp_path, *extra: str) -> list[str]:
    subjects = ("the cat", "the dog", "the film", "the day", "this movie", "it")
    rows = [
        {"prompt": f"what is {s} ?", "chosen": f"{s} is very good .", "rejected": f"{s} is very bad ."}
        for s in subjects
    ] * 6
    data = write_jsonl(tmp_path / "pairs.jsonl", rows)
    return [
        f"model.name_or_path={tiny_model_dir}", f"data.train_path={data}", *QUIET, "data.max_length=40",
        "data.max_prompt_length=12", "optim.batch_size=8", "data.eval_fraction=0.25", "logging.eval_every=2",
        # Adam turns the last-bit differences of a summation order into steps of about lr x sign where a gradient
        # is near 0, which many are at first (a pair's two orders pull against each other); a small rate, warmed
        # up, keeps those inside the tolerance (see test_parallel's DPO test).
        "optim.lr=5e-4", "optim.warmup_steps=4", *extra,
    ]  # fmt: skip


@pytest.mark.slow
def test_pm_on_two_processes_takes_the_steps_of_one_and_resumes_in_one(tiny_model_dir, tmp_path):
    """Each process takes 4 of every step's 8 pairs (both orders of each), normalized by the 8: the same weights,
    logged loss, accuracy and evaluations as one process, written once. The checkpoints two processes wrote resume
    in one process to the same final weights."""
    overrides = _pm_overrides(tiny_model_dir, tmp_path, "optim.max_steps=6", "logging.save_every=2")
    one = pm.train(stage_config("pm", tiny_model_dir, *overrides, out=tmp_path / "one"))
    two = tmp_path / "two"
    out = _launch(LAUNCHERS["torchrun"], ["pm", *overrides, f"logging.output_dir={two}"], tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "data parallel over 2 processes" in out.stdout
    assert out.stdout.count("pm: saved the preference model") == 1 and out.stdout.count("pm: 27 pairs") == 1
    _assert_same_weights(one, two / "final", tiny_model_dir)
    m1, m2 = (read_metrics(tmp_path / d / "metrics.jsonl") for d in ("one", "two"))
    _assert_same_metrics(m1, m2, "loss/pm", [1, 2, 3, 4, 5, 6])  # loss/pm, reward/accuracy, grad norm, lr
    _assert_same_metrics(
        m1, m2, "eval/accuracy", [0, 2, 4, 6]
    )  # the baseline, during training, the final one
    assert all(0 <= r["reward/accuracy"] <= 1 for r in m2 if "reward/accuracy" in r)

    # Stopped after the step-2 checkpoint two processes wrote, resumed in one: where one process ends.
    _drop_latest_checkpoint(two)
    again = pm.train(stage_config("pm", tiny_model_dir, *overrides, out=two), resume=True)
    _assert_same_weights(one, again, tiny_model_dir)


@pytest.mark.slow
def test_pm_sharded_on_two_processes_takes_the_steps_of_one(tiny_model_dir, tmp_path):
    """The preference model's scorer sharded (FSDP) as a reward model is: the evaluations run on both processes,
    the weights are gathered to save; the same weights and metrics as one process."""
    overrides = _pm_overrides(tiny_model_dir, tmp_path, "optim.max_steps=6")
    one = pm.train(stage_config("pm", tiny_model_dir, *overrides, out=tmp_path / "one"))
    out = _launch(
        [*FSDP, _accelerate_config("fsdp")],
        ["pm", *overrides, f"logging.output_dir={tmp_path / 'two'}"],
        tmp_path,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "sharded (FSDP)" in out.stdout and out.stdout.count("pm: saved the preference model") == 1
    _assert_same_weights(one, tmp_path / "two" / "final", tiny_model_dir)
    m1, m2 = (read_metrics(tmp_path / d / "metrics.jsonl") for d in ("one", "two"))
    _assert_same_metrics(m1, m2, "loss/pm", [1, 2, 3, 4, 5, 6])
    _assert_same_metrics(m1, m2, "eval/accuracy", [0, 2, 4, 6])


def test_pm_sharded_refuses_a_batch_that_does_not_split_evenly():
    from rlhflab.stages.sharding import FSDPSettings

    par = DataParallel.__new__(DataParallel)
    par.rank, par.world, par.fsdp = 0, 2, FSDPSettings()
    pm._check_processes(par, 8)
    with pytest.raises(ConfigError, match="optim.batch_size=7 does not split evenly over the 2 processes"):
        pm._check_processes(par, 7)
    par.fsdp = None
    pm._check_processes(par, 7)  # unsharded: shares of 4 and 3 are fine
    with pytest.raises(ConfigError, match="optim.batch_size=1 is smaller than the 2 processes"):
        pm._check_processes(par, 1)
