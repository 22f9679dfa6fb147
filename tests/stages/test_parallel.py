"""Data parallelism (stages/parallel.py): W processes started by `accelerate launch` or `torchrun` take the same
steps as one process with the same global batch, and only the main process writes."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from rlhflab.core.metrics_log import read_metrics
from rlhflab.errors import ConfigError
from rlhflab.stages import dpo, reward, sft
from rlhflab.stages.parallel import DataParallel

from ..helpers import CAT_PAIRS, CAT_PROMPTS, QUIET, SHORT_TEXT, stage_config, write_jsonl


def test_one_process_is_rank_0_of_1_and_changes_nothing(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    par = DataParallel()
    assert (par.rank, par.world, par.is_main, par.device) == (0, 1, True, None)
    assert par.shard([5, 6, 7]) == [5, 6, 7] and par.sum(2.5) == 2.5
    model = torch.nn.Linear(2, 1)
    model(torch.ones(1, 2)).sum().backward()
    before = [p.grad.clone() for p in model.parameters()]
    par.sum_gradients(model)
    assert all(torch.equal(a, p.grad) for a, p in zip(before, model.parameters()))


def test_shards_cover_the_batch_once():
    par = DataParallel.__new__(DataParallel)
    shards = []
    for rank in range(3):
        par.rank, par.world = rank, 3
        shards.append(par.shard(list(range(8))))
    assert shards == [[0, 3, 6], [1, 4, 7], [2, 5]]
    with pytest.raises(ConfigError, match="optim.batch_size=2 is smaller than the 3 processes"):
        par.check_batch(2)


def _launch(launcher: list[str], args: list[str], cwd) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    env.pop("WORLD_SIZE", None)
    return subprocess.run(
        [*launcher, "-m", "rlhflab", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600
    )


LAUNCHERS = {
    # accelerate's --cpu flag starts ONE process; its multi-process launcher (torchrun underneath) with a
    # CPU-only machine gets gloo from stages.parallel, which asks accelerate for the CPU backend.
    "accelerate": [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"],
    "torchrun": [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"],
}


@pytest.mark.slow
@pytest.mark.parametrize("launcher", list(LAUNCHERS))
def test_sft_on_two_processes_takes_the_steps_of_one(launcher, tiny_model_dir, sft_file, tmp_path):
    overrides = [
        f"model.name_or_path={tiny_model_dir}", f"data.train_path={sft_file}", *QUIET, *SHORT_TEXT,
        "optim.max_steps=6", "data.eval_fraction=0.25",
    ]  # fmt: skip
    one = sft.train(stage_config("sft", tiny_model_dir, *overrides, out=tmp_path / "one"))
    out = _launch(
        LAUNCHERS[launcher], ["sft", *overrides, f"logging.output_dir={tmp_path / 'two'}"], tmp_path
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "data parallel over 2 processes" in out.stdout
    assert out.stdout.count("sft: saved the model") == 1  # the main process saves, once
    _assert_same_weights(one, tmp_path / "two" / "final", tiny_model_dir)
    one_rows = [r for r in read_metrics(tmp_path / "one" / "metrics.jsonl") if "loss/sft" in r]
    two_rows = [r for r in read_metrics(tmp_path / "two" / "metrics.jsonl") if "loss/sft" in r]
    assert [r["step"] for r in two_rows] == [r["step"] for r in one_rows] == list(range(1, 7))  # written once
    for r1, r2 in zip(one_rows, two_rows):  # the logged loss is the whole batch's, summed over the processes
        assert r2["loss/sft"] == pytest.approx(r1["loss/sft"], abs=1e-5)


def _assert_same_weights(one, two, start) -> None:
    a, b, s = (load_file(d / "model.safetensors") for d in (one, two, start))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=1e-5)
    moved = [k for k in a if k in s and (a[k] - s[k]).abs().max() > 1e-3]
    assert moved, "it trained: equal weights are not the start"


@pytest.mark.slow
def test_rm_on_two_processes_takes_the_steps_of_one(tiny_model_dir, tmp_path):
    rows = [
        {"prompt": f"what is {s} ?", "chosen": f"{s} is very good .", "rejected": f"{s} is very bad ."}
        for s in ("the cat", "the dog", "the film", "the day", "this movie", "it")
    ] * 6
    data = write_jsonl(tmp_path / "pairs.jsonl", rows)
    overrides = [
        f"model.name_or_path={tiny_model_dir}", f"data.train_path={data}", *QUIET, *SHORT_TEXT,
        "optim.max_steps=4", "data.eval_fraction=0.25", "algo.normalization_samples=8",
    ]  # fmt: skip
    one = reward.train(stage_config("rm", tiny_model_dir, *overrides, out=tmp_path / "one"))
    out = _launch(
        LAUNCHERS["torchrun"], ["rm", *overrides, f"logging.output_dir={tmp_path / 'two'}"], tmp_path
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert (
        "data parallel over 2 processes" in out.stdout and out.stdout.count("rm: saved the reward model") == 1
    )
    _assert_same_weights(one, tmp_path / "two" / "final", tiny_model_dir)
    one_rows = [r for r in read_metrics(tmp_path / "one" / "metrics.jsonl") if "loss/rm" in r]
    two_rows = [r for r in read_metrics(tmp_path / "two" / "metrics.jsonl") if "loss/rm" in r]
    assert [r["step"] for r in two_rows] == [r["step"] for r in one_rows] == [1, 2, 3, 4]
    for r1, r2 in zip(one_rows, two_rows):  # the step's loss and accuracy, summed over the processes
        assert r2["loss/rm"] == pytest.approx(r1["loss/rm"], abs=1e-5)
        assert r2["reward/accuracy"] == pytest.approx(r1["reward/accuracy"], abs=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("loss", ["dpo", "kto"])
def test_dpo_on_two_processes_takes_the_steps_of_one(loss, tiny_model_dir, tmp_path):
    if loss == "kto":  # unpaired: KTO's reference point is one estimate over each step's whole batch
        rows = [{"prompt": p, "completion": c, "label": good} for p in CAT_PROMPTS
                for c, good in (("the cat is very happy .", True), ("the cat is very sad .", False))] * 2  # fmt: skip
    else:
        rows = CAT_PAIRS * 4
    data = write_jsonl(tmp_path / "data.jsonl", rows)
    overrides = [
        f"model.name_or_path={tiny_model_dir}", f"data.train_path={data}", *QUIET, *SHORT_TEXT,
        f"algo.loss={loss}", "optim.max_steps=4", "data.eval_fraction=0.25",
        # Adam turns the last-bit differences of a summation order into whole steps where a gradient is near 0
        # (its update is about lr x sign); a smaller rate keeps those inside the tolerance.
        "optim.lr=1e-3",
    ]  # fmt: skip
    one = dpo.train(stage_config("dpo", tiny_model_dir, *overrides, out=tmp_path / "one"))
    out = _launch(
        LAUNCHERS["torchrun"], ["dpo", *overrides, f"logging.output_dir={tmp_path / 'two'}"], tmp_path
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "data parallel over 2 processes" in out.stdout and out.stdout.count("dpo: saved the model") == 1
    assert out.stdout.count("reference: reusing") == 1  # the main process filled the cache, the other read it
    _assert_same_weights(one, tmp_path / "two" / "final", tiny_model_dir)
    key = f"loss/{loss}"
    one_rows = [r for r in read_metrics(tmp_path / "one" / "metrics.jsonl") if key in r]
    two_rows = [r for r in read_metrics(tmp_path / "two" / "metrics.jsonl") if key in r]
    assert [r["step"] for r in two_rows] == [r["step"] for r in one_rows] == [1, 2, 3, 4]
    for r1, r2 in zip(one_rows, two_rows):  # the step's loss and metric means, over both processes' shares
        assert r2 == pytest.approx(
            r1 | {"time": r2["time"]} | {k: r2[k] for k in r2 if k.startswith("perf/")}, abs=1e-5
        )


def _on_policy_one_and_two(stage: str, train, settings: list[str], tiny_model_dir, tmp_path):
    """An on-policy stage on PPO_PROMPTS with a rule reward, in one process (in this one) and in two (torchrun):
    both must succeed, the main process alone saves, and the final weights agree to 1e-5. Returns the two runs'
    rollouts and their metric rows (those with `key`), one then two."""
    from ..helpers import PPO_PROMPTS

    data = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": p} for p in PPO_PROMPTS])
    overrides = [
        f"model.name_or_path={tiny_model_dir}", f"data.train_path={data}", *QUIET,
        "algo.reward_model=rule:length:coef=1:target=6", "sampling.max_new_tokens=8", "optim.lr=1e-3", *settings,
    ]  # fmt: skip
    one = train(stage_config(stage, tiny_model_dir, *overrides, out=tmp_path / "one"))
    out = _launch(
        LAUNCHERS["torchrun"], [stage, *overrides, f"logging.output_dir={tmp_path / 'two'}"], tmp_path
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "data parallel over 2 processes" in out.stdout and out.stdout.count("saved the policy") == 1
    _assert_same_weights(one, tmp_path / "two" / "final", tiny_model_dir)

    def rollouts(run):
        return [json.loads(x) for x in (tmp_path / run / "rollouts.jsonl").read_text().splitlines()]

    return (
        rollouts("one"),
        rollouts("two"),
        *(read_metrics(tmp_path / r / "metrics.jsonl") for r in ("one", "two")),
    )


def _assert_same_metrics(m1: list[dict], m2: list[dict], key: str, steps: list[int]) -> None:
    """The logged rows with `key` at the same steps, every metric but the clock's (times, rates) equal to 1e-4:
    the whole batch's means and counts, whichever process held which rows."""
    m1, m2 = [r for r in m1 if key in r], [r for r in m2 if key in r]
    assert [r["step"] for r in m2] == [r["step"] for r in m1] == steps
    for r1, r2 in zip(m1, m2):
        assert r1.keys() == r2.keys()
        same = {k for k in r1 if k != "time" and not k.startswith("perf/time") and not k.endswith("_per_s")}
        assert {k: r2[k] for k in same} == pytest.approx({k: r1[k] for k in same}, abs=1e-4)


@pytest.mark.slow
def test_ppo_on_two_processes_takes_the_steps_of_one(tiny_model_dir, tmp_path):
    """Each process samples its share of every batch (each row from its own seed: the rows one process gets),
    scores it and computes its old / reference log-probs and values; the advantages are whitened over the whole
    batch, each minibatch's loss is split between the processes by the rows they hold, and the rollouts file is
    the whole batch's, written once."""
    from rlhflab.stages import ppo

    settings = [
        "algo.rollout_batch_size=8",
        "algo.minibatch_size=4",
        "algo.ppo_epochs=2",
        "algo.iterations=3",
    ]
    one_rows, two_rows, m1, m2 = _on_policy_one_and_two("ppo", ppo.train, settings, tiny_model_dir, tmp_path)
    assert len(one_rows) == 24 and [(r["prompt"], r["response"]) for r in two_rows] == [
        (r["prompt"], r["response"]) for r in one_rows
    ]
    for r1, r2 in zip(one_rows, two_rows):
        assert r2["score"] == pytest.approx(r1["score"], abs=1e-6) and r2["kl"] == pytest.approx(
            r1["kl"], abs=1e-5
        )
    _assert_same_metrics(m1, m2, "loss/policy", [1, 2, 3])


CRITIC_FREE = {
    # GRPO: several updates per batch (an old pass), token-mean loss (divided by the minibatch's tokens, which
    # no process alone knows), the KL in the loss
    "grpo": [
        "algo.loss_aggregation=token_mean",
        "algo.kl_coef=0.1",
        "algo.ppo_epochs=2",
        "algo.minibatch_size=6",
    ],
    # RLOO with REINFORCE's batch-mean baseline (over both processes' groups) and the KL in the reward
    "rloo": ["algo.baseline=batch_mean", "algo.kl_coef=0.1", "algo.minibatch_size=0"],
}


@pytest.mark.slow
@pytest.mark.parametrize("stage", list(CRITIC_FREE))
def test_critic_free_on_two_processes_takes_the_steps_of_one(stage, tiny_model_dir, tmp_path):
    """Each process samples whole groups (k samples of its prompts); minibatches are drawn from the whole
    batch's kept rows and each process computes its rows' share: the same weights, rollouts and metrics."""
    from rlhflab.stages import critic_free

    settings = [
        "algo.prompts_per_iteration=3",
        "algo.num_generations=4",
        "algo.iterations=3",
        *CRITIC_FREE[stage],
    ]
    one_rows, two_rows, m1, m2 = _on_policy_one_and_two(
        stage, critic_free.train, settings, tiny_model_dir, tmp_path
    )
    assert len(one_rows) == 36 and [(r["prompt"], r["response"], r["score"]) for r in two_rows] == [
        (r["prompt"], r["response"], r["score"]) for r in one_rows
    ]
    _assert_same_metrics(m1, m2, "loss/policy", [1, 2, 3])


@pytest.mark.slow
def test_online_dpo_on_two_processes_takes_the_steps_of_one(tiny_model_dir, tmp_path):
    """Each process samples and asks about its share of the step's pairs, the loss is normalized by the pairs
    of both (ties dropped on either), the gradients summed: the same weights, pairs and metrics as one."""
    from rlhflab.stages import online_dpo

    settings = ["algo.prompts_per_step=5", "algo.iterations=4", "algo.micro_batch_size=2"]
    one_rows, two_rows, m1, m2 = _on_policy_one_and_two(
        "online-dpo", online_dpo.train, settings, tiny_model_dir, tmp_path
    )
    assert len(one_rows) == 20 and [{k: r[k] for k in r if k[:2] != "kl"} for r in two_rows] == [
        {k: r[k] for k in r if k[:2] != "kl"} for r in one_rows
    ]
    for r1, r2 in zip(one_rows, two_rows):
        assert (r2["kl_first"], r2["kl_second"]) == pytest.approx((r1["kl_first"], r1["kl_second"]), abs=1e-4)
    _assert_same_metrics(m1, m2, "feedback/queries", [1, 2, 3, 4])


@pytest.mark.parametrize("command", [["iterative-dpo"], ["rs"], ["run"], ["experiment", "trex"]])
def test_commands_that_are_not_data_parallel_refuse_several_processes(command, monkeypatch, tmp_path, capsys):
    """Launched in 2 processes, a command without data parallelism would run twice, each process alone, both
    writing one run directory: it exits 2 with one line before doing anything."""
    from rlhflab.cli import main

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.chdir(tmp_path)
    assert main(command) == 2
    err = capsys.readouterr().err
    assert (
        err.count("\n") == 1 and f"rlhflab {command[0]} does not run across processes (WORLD_SIZE=2)" in err
    )
    assert "sft, rm, dpo, ppo, rloo, grpo, online-dpo" in err and not list(tmp_path.iterdir())


@pytest.mark.slow
def test_ppo_resumes_in_two_processes_a_run_one_process_began(tiny_model_dir, tmp_path):
    """--resume across process counts: a one-process PPO run stopped after its step-2 checkpoint, continued by
    two processes, ends where the uninterrupted one-process run does (to 1e-5: only summation orders differ)."""
    from rlhflab.stages import ppo

    from ..helpers import PPO_PROMPTS

    data = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": p} for p in PPO_PROMPTS])
    overrides = [
        f"model.name_or_path={tiny_model_dir}", f"data.train_path={data}", *QUIET,
        "algo.reward_model=rule:length:coef=1:target=6", "sampling.max_new_tokens=8", "algo.rollout_batch_size=8",
        "algo.minibatch_size=4", "algo.iterations=4", "logging.save_every=2", "optim.lr=1e-3",
    ]  # fmt: skip
    whole = ppo.train(stage_config("ppo", tiny_model_dir, *overrides, out=tmp_path / "a"))
    real, calls = ppo.append_rollouts, []

    def crash(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:  # Ctrl-C while the 3rd iteration's rollouts are written: step 2 is checkpointed
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ppo, "append_rollouts", crash)
        with pytest.raises(KeyboardInterrupt):
            ppo.train(stage_config("ppo", tiny_model_dir, *overrides, out=tmp_path / "b"))
    out = _launch(
        LAUNCHERS["torchrun"],
        ["ppo", *overrides, f"logging.output_dir={tmp_path / 'b'}", "--resume"],
        tmp_path,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "data parallel over 2 processes" in out.stdout
    _assert_same_weights(whole, tmp_path / "b" / "final", tiny_model_dir)
    steps = [r["step"] for r in read_metrics(tmp_path / "b" / "metrics.jsonl") if "loss/policy" in r]
    assert steps == [1, 2, 3, 4]


class _ThreadPar(DataParallel):
    """Rank `rank` of 2 whose collectives add the two threads' values (a barrier stands for the all-reduce)."""

    def __init__(self, rank, slots, barrier):
        self.accelerator, self.rank, self.world = None, rank, 2
        self.slots, self.barrier = slots, barrier

    def sum_all(self, values):
        self.slots[self.rank] = dict(values)
        self.barrier.wait()
        out = {k: self.slots[0][k] + self.slots[1][k] for k in values}
        self.barrier.wait()
        return out

    def sum(self, value):
        return self.sum_all({"v": value})["v"]


@pytest.mark.parametrize("shift_mean", [True, False])
def test_whitening_across_processes_is_the_whole_batchs(shift_mean):
    """Two processes holding rows 0, 2, ... and 1, 3, ... of a batch whiten them with the whole batch's mean and
    unbiased variance: the result is `masked_whiten` of the whole batch, row for row."""
    import threading

    from rlhflab.losses.utils import masked_whiten

    torch.manual_seed(0)
    x = torch.randn(7, 5, dtype=torch.float64) * 3 + 1
    mask = torch.rand(7, 5) > 0.3
    slots, barrier, out = [None, None], threading.Barrier(2), [None, None]

    def work(rank):
        par = _ThreadPar(rank, slots, barrier)
        out[rank] = par.masked_whiten(x[rank::2], mask[rank::2], shift_mean=shift_mean)

    threads = [threading.Thread(target=work, args=(r,)) for r in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    expected = masked_whiten(x, mask, shift_mean=shift_mean)
    torch.testing.assert_close(out[0], expected[0::2])
    torch.testing.assert_close(out[1], expected[1::2])
