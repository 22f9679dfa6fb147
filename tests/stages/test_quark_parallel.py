"""Data parallelism of `rlhflab quark` (stages/parallel.py): two processes started by `torchrun` draw one process's
pool and take its steps, the main process alone writes, and a run two processes began resumes in one."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from rlhflab.core.metrics_log import read_metrics
from rlhflab.errors import ConfigError
from rlhflab.stages import quark as qk
from rlhflab.stages.parallel import DataParallel

from ..helpers import PPO_PROMPTS, QUIET, stage_config, write_jsonl
from .test_parallel import (
    LAUNCHERS,
    _assert_same_metrics,
    _launch,
)


def _drop_latest_checkpoint(run) -> None:
    """Leave the run as if stopped after its next-to-last checkpoint: no final model, no later checkpoint."""
    shutil.rmtree(run / "final")
    shutil.rmtree(sorted((run / "checkpoints").iterdir())[-1])


# ---- quark ----------------------------------------------------------------------------------------------------------

QUARK_MODES = {
    # Quark: 3 quantiles, 2 iterations (the second samples with the best token), KL and entropy in the loss
    "quark": ["algo.n_quantiles=3", "algo.iterations=2", "optim.steps_per_iteration=2"],
    # AlpacaFarm's binary reward conditioning (configs/reward_conditioning_tiny.yaml): K = 2, one iteration, 2 epochs
    # over the pool, no KL, no entropy
    "reward_conditioning": [
        "algo.n_quantiles=2", "algo.iterations=1", "algo.kl_coef=0", "algo.entropy_coef=0",
        "optim.steps_per_iteration=0", "optim.epochs=2",
    ],
}  # fmt: skip


def _assert_same_policy(one, two, start) -> None:
    """`_assert_same_weights` for a policy whose embeddings grew by the control tokens: the new rows are compared
    with the other run's, not with the start."""
    a, b, s = (load_file(d / "model.safetensors") for d in (one, two, start))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=1e-5)
    moved = [k for k in a if k in s and a[k].shape == s[k].shape and (a[k] - s[k]).abs().max() > 1e-3]
    assert moved, "it trained: equal weights are not the start"
    assert any(a[k].shape != s[k].shape for k in a if k in s)  # the control tokens' rows


def _pool(run, it: int) -> list[dict]:
    return [json.loads(x) for x in (run / f"iter-{it}" / "pool.jsonl").read_text().splitlines()]


def _not_clock(rows: list[dict]) -> list[dict]:
    """The rows without the clock's readings (times, rates), which no two runs share."""
    return [
        {k: v for k, v in r.items() if not k.startswith(("perf/time", "perf/wall")) and k != "time"}
        for r in rows
    ]


@pytest.mark.slow
@pytest.mark.parametrize("mode", list(QUARK_MODES))
def test_quark_on_two_processes_draws_the_pool_and_takes_the_steps_of_one(mode, tiny_model_dir, tmp_path):
    """5 prompts over 2 processes (3 and 2), 2 samples each, every sample from its row's seed: the pools (samples,
    scores, quantiles) are the ones one process writes, written once; each step's 4 rows are split 2 and 2, the loss
    divided by the whole step's response tokens: the same weights and metrics. (quark) The run resumes in one
    process from the checkpoint two processes wrote after iteration 1, reading its pool back."""
    data = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": p} for p in PPO_PROMPTS[:5]])
    overrides = [
        f"model.name_or_path={tiny_model_dir}", f"data.train_path={data}", *QUIET,
        "algo.reward_model=rule:length:coef=1:target=6", "algo.samples_per_prompt=2", "algo.eval_prompts=3",
        "sampling.max_new_tokens=8", "data.max_length=24", "data.max_prompt_length=12", "optim.batch_size=4",
        "optim.lr=5e-4", *QUARK_MODES[mode],
    ]  # fmt: skip
    one = qk.train(stage_config("quark", tiny_model_dir, *overrides, out=tmp_path / "one"))
    two = tmp_path / "two"
    out = _launch(LAUNCHERS["torchrun"], ["quark", *overrides, f"logging.output_dir={two}"], tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "data parallel over 2 processes" in out.stdout and out.stdout.count("quark: K = ") == 1
    assert out.stdout.count("saved the policy") == 1 and out.stdout.count("quark: iteration 1 ") == 1
    _assert_same_policy(one, two / "final", tiny_model_dir)
    iterations = 2 if mode == "quark" else 1
    for it in range(1, iterations + 1):
        pool = _pool(tmp_path / "one", it)
        assert _pool(two, it) == pool and len(pool) == 10 * it
        assert len({r["response"] for r in pool}) > 3  # sampled, not one response everywhere
        assert len({r["quantile"] for r in pool}) > 1
    m1, m2 = (read_metrics(tmp_path / r / "metrics.jsonl") for r in ("one", "two"))
    _assert_same_metrics(m1, m2, "loss/quark", [1, 2, 3, 4])  # loss/quark, loss/nll, kl/ref, loss/entropy
    m1, m2 = ([r for r in _not_clock(m) if "reward/eval_mean" in r] for m in (m1, m2))
    assert [r["step"] for r in m2] == [r["step"] for r in m1] == ([0, 2, 4] if mode == "quark" else [0, 4])
    for r1, r2 in zip(m1, m2):  # the pools' rewards, the evaluation, control-token rate, queries
        assert r2 == pytest.approx(r1, abs=1e-5)
    if mode != "quark":
        return
    # Stopped after iteration 1 (step 2) by two processes; resumed in one, which samples iteration 2 itself.
    _drop_latest_checkpoint(two)
    shutil.rmtree(two / "iter-2")
    again = qk.train(stage_config("quark", tiny_model_dir, *overrides, out=two), resume=True)
    _assert_same_policy(one, again, tiny_model_dir)
    assert _pool(two, 2) == _pool(tmp_path / "one", 2)


def test_quark_refuses_a_reward_that_whitens_over_the_batch_across_processes(tmp_path):
    """The Llama 2 gate whitens each scoring call's batch: each process would whiten its share only."""
    cfg = stage_config(
        "quark", tmp_path / "model", "algo.reward_model=rule:length,rule:length", "algo.reward_combine=llama2_gate",
        data=tmp_path / "prompts.jsonl", out=tmp_path / "run",
    )  # fmt: skip
    qk.preflight(cfg, world=1)
    with pytest.raises(ConfigError, match="algo.reward_combine=llama2_gate .* run quark in one process"):
        qk.preflight(cfg, world=2)


class _GatherPar(DataParallel):
    """Rank `rank` of 2 in a thread, whose `gather` puts the two threads' shares together as the collective does."""

    def __init__(self, rank, slots, barrier):
        self.accelerator, self.rank, self.world = None, rank, 2
        self.slots, self.barrier = slots, barrier

    def gather(self, items):
        self.slots[self.rank] = list(items)
        self.barrier.wait()
        out = [self.slots[i % 2][i // 2] for i in range(len(self.slots[0]) + len(self.slots[1]))]
        self.barrier.wait()
        return out


def test_demonstrations_scored_in_shares_are_the_pool_of_one_process(monkeypatch):
    """algo.pool_init=data across processes: each scores every other demonstration (3 and 2 of 5), and both get
    the 5 scored rows in file order."""
    import threading
    from types import SimpleNamespace

    from rlhflab.stages.quark_pool import score_rows

    class Length:
        def score(self, prompts, responses):
            return torch.tensor([float(len(r)) for r in responses])

    rows = [{"prompt": f"p{i}", "response": "x" * i} for i in range(5)]
    expected = [{**r, "score": float(i)} for i, r in enumerate(rows)]
    monkeypatch.delenv("WORLD_SIZE", raising=False)  # one process
    assert score_rows(SimpleNamespace(par=DataParallel(), reward=Length()), rows) == expected
    slots, barrier, out = [None, None], threading.Barrier(2), [None, None]

    def work(rank):
        par = _GatherPar(rank, slots, barrier)
        out[rank] = score_rows(SimpleNamespace(par=par, reward=Length()), rows)

    threads = [threading.Thread(target=work, args=(r,)) for r in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert out[0] == out[1] == expected
