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
    # Each process computed its share of the reference log-probs; the cache is the one one process writes.
    assert out.stdout.count("reference: cached") == 1 and "reference: reusing" not in out.stdout
    caches = [torch.load(tmp_path / d / "ref_logps.pt", weights_only=True)["logps"] for d in ("one", "two")]
    assert caches[0].keys() == caches[1].keys()
    for name in caches[0]:
        torch.testing.assert_close(caches[1][name], caches[0][name], rtol=0, atol=1e-6)
    _assert_same_weights(one, tmp_path / "two" / "final", tiny_model_dir)
    key = f"loss/{loss}"
    one_rows = [r for r in read_metrics(tmp_path / "one" / "metrics.jsonl") if key in r]
    two_rows = [r for r in read_metrics(tmp_path / "two" / "metrics.jsonl") if key in r]
    assert [r["step"] for r in two_rows] == [r["step"] for r in one_rows] == [1, 2, 3, 4]
    for r1, r2 in zip(one_rows, two_rows):  # the step's loss and metric means, over both processes' shares
        assert r2 == pytest.approx(
            r1 | {"time": r2["time"]} | {k: r2[k] for k in r2 if k.startswith("perf/")}, abs=1e-5
        )


def _on_policy_one_and_two(stage: str, train, settings: list[str], tiny_model_dir, tmp_path, launcher=None):
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
    launcher = launcher or LAUNCHERS["torchrun"]
    out = _launch(launcher, [stage, *overrides, f"logging.output_dir={tmp_path / 'two'}"], tmp_path)
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


@pytest.mark.parametrize("command", [["experiment", "trex"], ["lab", "list"]])
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


# ---- FSDP (stages/sharding.py), launched with the accelerate config files the README shows ----------------------

FSDP = [sys.executable, "-m", "accelerate.commands.launch", "--config_file"]


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["fsdp", "fsdp_shard_grad_op"])
def test_sft_sharded_on_two_processes_takes_the_steps_of_one(layout, tiny_model_dir, sft_file, tmp_path):
    overrides = [
        f"model.name_or_path={tiny_model_dir}", f"data.train_path={sft_file}", *QUIET, *SHORT_TEXT,
        "optim.max_steps=6", "data.eval_fraction=0.25", "logging.eval_every=3", "optim.max_grad_norm=0.5",
    ]  # fmt: skip
    one = sft.train(stage_config("sft", tiny_model_dir, *overrides, out=tmp_path / "one"))
    config = os.path.join(os.path.dirname(__file__), "..", "..", "configs", "accelerate", f"{layout}.yaml")
    out = _launch([*FSDP, config], ["sft", *overrides, f"logging.output_dir={tmp_path / 'two'}"], tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "data parallel over 2 processes, sharded (FSDP)" in out.stdout
    _assert_same_weights(one, tmp_path / "two" / "final", tiny_model_dir)
    one_rows, two_rows = (read_metrics(tmp_path / d / "metrics.jsonl") for d in ("one", "two"))
    for key in ("loss/sft", "loss/grad_norm", "eval/nll"):  # the evaluations run sharded too
        _assert_same_metrics(one_rows, two_rows, key, [3, 6] if key == "eval/nll" else list(range(1, 7)))


@pytest.mark.slow
@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_ppo_sharded_on_two_processes_takes_the_steps_of_one(lora, tiny_model_dir, tmp_path):
    """PPO with the policy and its value head sharded (FSDP): the processes decode in step (each forward pass
    gathers the weights from all), a process holding none of a minibatch's rows joins its passes with weight 0,
    and the run is one process's."""
    from rlhflab.stages import ppo

    settings = [
        "algo.rollout_batch_size=8", "algo.minibatch_size=2", "algo.ppo_epochs=2", "algo.iterations=3",
        "optim.max_grad_norm=0.5", *(["model.lora.enabled=true", "model.lora.r=4", "model.lora.merge=true"] if lora else []),
    ]  # fmt: skip
    launcher = [*FSDP, _accelerate_config("fsdp")]
    one_rows, two_rows, m1, m2 = _on_policy_one_and_two(
        "ppo", ppo.train, settings, tiny_model_dir, tmp_path, launcher
    )
    assert [(r["prompt"], r["response"]) for r in two_rows] == [
        (r["prompt"], r["response"]) for r in one_rows
    ]
    _assert_same_metrics(m1, m2, "loss/policy", [1, 2, 3])


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["grpo", "rloo"])
def test_critic_free_sharded_on_two_processes_takes_the_steps_of_one(stage, tiny_model_dir, tmp_path):
    """GRPO (an old pass, token-mean loss, KL in the loss) and RLOO (the batch-mean baseline) with the policy
    sharded: decoding in step, each process's whole groups, minibatches a process holds no row of joined with
    weight 0."""
    from rlhflab.stages import critic_free

    settings = [
        "algo.prompts_per_iteration=4",
        "algo.num_generations=3",
        "algo.iterations=3",
        *CRITIC_FREE[stage],
    ]
    launcher = [*FSDP, _accelerate_config("fsdp")]
    one_rows, two_rows, m1, m2 = _on_policy_one_and_two(
        stage, critic_free.train, settings, tiny_model_dir, tmp_path, launcher
    )
    assert [(r["prompt"], r["response"]) for r in two_rows] == [
        (r["prompt"], r["response"]) for r in one_rows
    ]
    _assert_same_metrics(m1, m2, "loss/policy", [1, 2, 3])


def _fsdp_env(**changes: str) -> dict[str, str]:
    """The environment `accelerate launch --config_file configs/accelerate/fsdp.yaml` gives (accelerate 1.15)."""
    env = {
        "ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2", "FSDP_RESHARD_AFTER_FORWARD": "true",
        "FSDP_OFFLOAD_PARAMS": "false", "FSDP_AUTO_WRAP_POLICY": "TRANSFORMER_BASED_WRAP",
        "FSDP_STATE_DICT_TYPE": "FULL_STATE_DICT", "FSDP_CPU_RAM_EFFICIENT_LOADING": "false",
        "FSDP_ACTIVATION_CHECKPOINTING": "false", "FSDP_SHARDING_STRATEGY": "FULL_SHARD",
    }  # fmt: skip
    return {**env, **changes}


def test_fsdp_settings_come_from_the_accelerate_config_and_refuse_what_rlhflab_does_not_do():
    from rlhflab.stages.sharding import FSDPSettings, fsdp_settings

    assert fsdp_settings({}) is None and fsdp_settings({"ACCELERATE_USE_FSDP": "false"}) is None
    assert fsdp_settings(_fsdp_env()) == FSDPSettings(reshard_after_forward=True)
    assert fsdp_settings(_fsdp_env(FSDP_RESHARD_AFTER_FORWARD="false")).reshard_after_forward is False
    assert fsdp_settings(_fsdp_env(FSDP_RESHARD_AFTER_FORWARD="SHARD_GRAD_OP")).reshard_after_forward is False
    wrap = fsdp_settings(_fsdp_env(FSDP_TRANSFORMER_CLS_TO_WRAP="LlamaDecoderLayer, Qwen2DecoderLayer"))
    assert wrap.wrap_classes == ("LlamaDecoderLayer", "Qwen2DecoderLayer")
    refused = {
        "FSDP_VERSION": ("1", "fsdp_version=1"),
        "FSDP_OFFLOAD_PARAMS": ("true", "fsdp_offload_params=true"),
        "FSDP_ACTIVATION_CHECKPOINTING": ("true", "fsdp_activation_checkpointing=true"),
        "FSDP_CPU_RAM_EFFICIENT_LOADING": ("true", "fsdp_cpu_ram_efficient_loading=true"),
        "FSDP_STATE_DICT_TYPE": ("SHARDED_STATE_DICT", "fsdp_state_dict_type=SHARDED_STATE_DICT"),
        "FSDP_AUTO_WRAP_POLICY": ("SIZE_BASED_WRAP", "fsdp_auto_wrap_policy=SIZE_BASED_WRAP"),
        "FSDP_RESHARD_AFTER_FORWARD": ("HYBRID_SHARD", "fsdp_reshard_after_forward=HYBRID_SHARD"),
    }
    for var, (value, message) in refused.items():
        with pytest.raises(ConfigError, match=f"accelerate config: {message}"):
            fsdp_settings(_fsdp_env(**{var: value}))


def test_accelerates_own_mixed_precision_is_refused(monkeypatch):
    """rlhflab never hands accelerate the model, so accelerate's mixed_precision would do nothing."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    with pytest.raises(ConfigError, match="mixed_precision=bf16 is not read by rlhflab.*model.autocast=bf16"):
        DataParallel()


def test_sharding_makes_units_of_the_layers_the_head_and_the_body(tiny_model, monkeypatch):
    """The units the stages call separately each gather their own parameters (one process group of one)."""
    import socket

    import torch.distributed as dist
    from torch.distributed.fsdp import FSDPModule

    from rlhflab.stages.sharding import FSDPSettings, shard_model

    with socket.socket() as sock:  # a free port: other jobs on the machine may hold any fixed one
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(port))
    dist.init_process_group("gloo", rank=0, world_size=1)
    try:
        tied = tiny_model.lm_head.weight is tiny_model.model.embed_tokens.weight
        before = {k: v.clone() for k, v in tiny_model.state_dict().items()}
        shard_model(tiny_model, FSDPSettings())
        units = [name for name, m in tiny_model.named_modules() if isinstance(m, FSDPModule)]
        # A tied head and embedding are one unit (both modules carry its hooks).
        embed = ["model.embed_tokens"] if tied else []
        assert units == ["", "model", *embed, "model.layers.0", "model.layers.1", "lm_head"]
        ids = torch.tensor([[1, 2, 3, 4]])
        h = tiny_model.model(input_ids=ids).last_hidden_state  # the body and the head called apart
        assert tiny_model.lm_head(h).shape[-1] == tiny_model.config.vocab_size
        from rlhflab.stages.sharding import full_weights

        with full_weights(tiny_model, is_main=True):
            after = tiny_model.state_dict()
            assert all(torch.equal(after[k], before[k]) for k in before)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
@pytest.mark.parametrize("stage", ["rm", "dpo"])
def test_rm_and_dpo_sharded_on_two_processes_take_the_steps_of_one(stage, lora, tiny_model_dir, tmp_path):
    """The reward model (a body and a score head) and DPO (its reference log-probs cached before the model is
    sharded; with LoRA, trainable adapters among frozen weights in each unit)."""
    data = write_jsonl(tmp_path / "pairs.jsonl", CAT_PAIRS * 4)
    overrides = [
        f"model.name_or_path={tiny_model_dir}", f"data.train_path={data}", *QUIET, *SHORT_TEXT,
        "optim.max_steps=4", "data.eval_fraction=0.25", "logging.eval_every=2", "optim.lr=1e-3",
        *(["model.lora.enabled=true", "model.lora.r=4", "model.lora.merge=true"] if lora else []),
        *(["algo.normalization_samples=8"] if stage == "rm" else []),
    ]  # fmt: skip
    train = {"rm": reward.train, "dpo": dpo.train}[stage]
    one = train(stage_config(stage, tiny_model_dir, *overrides, out=tmp_path / "one"))
    out = _launch(
        [*FSDP, _FSDP_CONFIG], [stage, *overrides, f"logging.output_dir={tmp_path / 'two'}"], tmp_path
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "sharded (FSDP)" in out.stdout and out.stdout.count("saved the") == 1
    _assert_same_weights(one, tmp_path / "two" / "final", tiny_model_dir)
    key = "loss/rm" if stage == "rm" else "loss/dpo"
    one_rows, two_rows = (read_metrics(tmp_path / d / "metrics.jsonl") for d in ("one", "two"))
    if stage == "dpo":
        # At step 1 the policy is its reference: every margin is 0 up to rounding, and the accuracy (the share of
        # margins > 0) is decided by the last bits, which the sharded head (called as a module) and the cached
        # reference's fused kernel round differently.
        for row in one_rows + two_rows:
            if row.get("step") == 1:
                row.pop("reward/accuracy", None)
    _assert_same_metrics(one_rows, two_rows, key, [1, 2, 3, 4])
    # The evaluations ran sharded too (the reward model's also before its first step).
    _assert_same_metrics(one_rows, two_rows, "eval/accuracy", [0, 2, 4] if stage == "rm" else [2, 4])


_FSDP_CONFIG = os.path.join(os.path.dirname(__file__), "..", "..", "configs", "accelerate", "fsdp.yaml")


@pytest.mark.slow
def test_a_run_resumes_sharded_from_one_process_and_back(tiny_model_dir, sft_file, tmp_path):
    """Checkpoints are written whole (gathered from the shards), so a run stopped in one process resumes sharded
    in two, and one checkpointed sharded resumes in one process: both end where the uninterrupted run does."""
    overrides = [
        f"model.name_or_path={tiny_model_dir}", f"data.train_path={sft_file}", *QUIET, *SHORT_TEXT,
        "optim.max_steps=6", "logging.save_every=2", "optim.lr=1e-3",
    ]  # fmt: skip
    whole = sft.train(stage_config("sft", tiny_model_dir, *overrides, out=tmp_path / "whole"))
    real, calls = sft.clip_gradients, []

    def crash(*args, **kwargs):  # Ctrl-C in the 3rd step: step 2 is checkpointed
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(sft, "clip_gradients", crash)
        with pytest.raises(KeyboardInterrupt):
            sft.train(stage_config("sft", tiny_model_dir, *overrides, out=tmp_path / "one_then_two"))
    args = ["sft", *overrides, f"logging.output_dir={tmp_path / 'one_then_two'}", "--resume"]
    out = _launch([*FSDP, _FSDP_CONFIG], args, tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "resumed from" in out.stdout and "sharded (FSDP)" in out.stdout
    _assert_same_weights(whole, tmp_path / "one_then_two" / "final", tiny_model_dir)

    # Sharded with checkpoints at steps 2 and 4; then resumed in one process from step 2.
    two = tmp_path / "two_then_one"
    out = _launch([*FSDP, _FSDP_CONFIG], ["sft", *overrides, f"logging.output_dir={two}"], tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    _assert_same_weights(whole, two / "final", tiny_model_dir)
    import shutil

    shutil.rmtree(two / "final")
    shutil.rmtree(two / "checkpoints" / "step-00000004")
    again = sft.train(stage_config("sft", tiny_model_dir, *overrides, out=two), resume=True)
    _assert_same_weights(whole, again, tiny_model_dir)


# ---- best-of-n: each process samples and scores its share of the prompts ------------------------------------------


def _best_of_n_args(tiny_model_dir, prompts, out) -> list[str]:
    return [
        "best-of-n", "--policy", str(tiny_model_dir), "--reward", "rule:length:coef=1:target=6",
        "--prompts", str(prompts), "--out", str(out), "--samples", "4", "--max-new-tokens", "8", "--seed", "3",
        "--all-samples",
    ]  # fmt: skip


@pytest.mark.slow
def test_best_of_n_on_two_processes_writes_the_file_of_one(tiny_model_dir, tmp_path, monkeypatch, capsys):
    """5 prompts over 2 processes (3 and 2: uneven shards), every sample from its own row's seed: the main
    process writes the rows one process writes, in prompt order, and prints the whole run's summary once."""
    from rlhflab.cli import main

    from ..helpers import PPO_PROMPTS

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": p} for p in PPO_PROMPTS[:5]])
    assert main(_best_of_n_args(tiny_model_dir, prompts, tmp_path / "one.jsonl")) == 0
    one_out = capsys.readouterr().out
    # The command line as a user types it (--samples: `--n` is ambiguous to the launchers' own parsers).
    out = _launch(
        LAUNCHERS["torchrun"], _best_of_n_args(tiny_model_dir, prompts, tmp_path / "two.jsonl"), tmp_path
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "data parallel over 2 processes" in out.stdout
    assert out.stdout.count("best-of-n: 5 prompts x 4 samples") == 1
    assert out.stdout.count("best-of-n: mean score") == 1
    # The summary is the whole run's: the same numbers as one process's.
    summary = [
        line.split("; wrote")[0] for line in (one_out + out.stdout).splitlines() if "mean score" in line
    ]
    assert len(summary) == 2 and summary[0] == summary[1]
    one, two = (
        [json.loads(x) for x in (tmp_path / f).read_text().splitlines()] for f in ("one.jsonl", "two.jsonl")
    )
    assert [r["prompt"] for r in two] == [r["prompt"] for r in one] == PPO_PROMPTS[:5]
    for r1, r2 in zip(one, two):
        assert (r2["completion"], r2["samples"]) == (r1["completion"], r1["samples"])
        assert r2["score"] == pytest.approx(r1["score"], abs=1e-6)
        assert r2["mean_score"] == pytest.approx(r1["mean_score"], abs=1e-6)
        assert r2["sample_scores"] == pytest.approx(r1["sample_scores"], abs=1e-6)
    assert len({t for r in one for t in r["samples"]}) > 5  # not one response everywhere
    assert sorted(p.name for p in tmp_path.iterdir() if p.suffix == ".jsonl") == [
        "one.jsonl", "prompts.jsonl", "two.jsonl",
    ]  # fmt: skip


def test_best_of_n_with_vllm_refuses_several_processes(tiny_model_dir, monkeypatch, tmp_path, capsys):
    """best-of-n is accepted across processes (`_check_processes`), but not with the vLLM engine: one line, exit 2,
    before anything loads."""
    from rlhflab.cli import main

    monkeypatch.setenv("WORLD_SIZE", "2")
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "the cat"}])
    args = _best_of_n_args(tiny_model_dir, prompts, tmp_path / "out.jsonl")
    assert main([*args, "--engine", "vllm"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--engine vllm runs in one process (WORLD_SIZE=2)" in err
    assert "does not run across processes" not in err and not (tmp_path / "out.jsonl").exists()


# ---- DeepSpeed ZeRO (stages/deepspeed_zero.py) ------------------------------------------------------------------


def _accelerate_config(name: str) -> str:
    return os.path.join(os.path.dirname(__file__), "..", "..", "configs", "accelerate", f"{name}.yaml")


@pytest.mark.slow
@pytest.mark.parametrize(
    ("stage", "zero", "micro"), [("sft", 2, 2), ("sft", 3, 2), ("rm", 3, 0), ("dpo", 2, 0), ("dpo", 3, 2)]
)
def test_deepspeed_zero_on_two_processes_takes_the_steps_of_one(
    stage, zero, micro, tiny_model_dir, sft_file, tmp_path
):
    """accelerate's DeepSpeed config files: the engine's steps are one process's, with micro-batches (micro=2:
    2 per process and step, which ZeRO-3 gets wrong unless its backward flags are cleared) or without."""
    data = sft_file if stage == "sft" else write_jsonl(tmp_path / "pairs.jsonl", CAT_PAIRS * 4)
    overrides = [
        f"model.name_or_path={tiny_model_dir}", f"data.train_path={data}", *QUIET, *SHORT_TEXT,
        "optim.max_steps=4", "data.eval_fraction=0.25", "logging.eval_every=2", "optim.lr=1e-3",
        f"optim.micro_batch_size={micro}", "optim.max_grad_norm=0.5",
    ]  # fmt: skip
    train = {"sft": sft.train, "rm": reward.train, "dpo": dpo.train}[stage]
    one = train(stage_config(stage, tiny_model_dir, *overrides, out=tmp_path / "one"))
    config = _accelerate_config(f"deepspeed_zero{zero}")
    out = _launch([*FSDP, config], [stage, *overrides, f"logging.output_dir={tmp_path / 'two'}"], tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert f"DeepSpeed ZeRO-{zero}" in out.stdout and out.stdout.count("saved the") == 1
    _assert_same_weights(one, tmp_path / "two" / "final", tiny_model_dir)
    key = {"sft": "loss/sft", "rm": "loss/rm", "dpo": "loss/dpo"}[stage]
    one_rows, two_rows = (read_metrics(tmp_path / d / "metrics.jsonl") for d in ("one", "two"))
    for row in one_rows + two_rows:
        if stage == "dpo" and row.get("step") == 1:
            row.pop("reward/accuracy", None)  # margins of 0 up to rounding (see the FSDP test)
    _assert_same_metrics(one_rows, two_rows, key, [1, 2, 3, 4])


def test_deepspeed_settings_come_from_the_accelerate_config_and_refuse_what_rlhflab_does_not_do():
    from rlhflab.stages.deepspeed_zero import DeepSpeedSettings, deepspeed_settings, engine_config

    env = {"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "3",
           "ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE": "none", "ACCELERATE_DEEPSPEED_ZERO3_INIT": "false"}  # fmt: skip
    assert deepspeed_settings({}) is None
    assert deepspeed_settings(env) == DeepSpeedSettings(zero_stage=3)
    refused = {
        "ACCELERATE_DEEPSPEED_CONFIG_FILE": ("ds.json", "deepspeed_config_file=ds.json"),
        "ACCELERATE_DEEPSPEED_OFFLOAD_PARAM_DEVICE": ("cpu", "offload_param_device=cpu"),
        "ACCELERATE_DEEPSPEED_ZERO3_INIT": ("true", "zero3_init_flag=true"),
        "ACCELERATE_GRADIENT_ACCUMULATION_STEPS": ("4", "gradient_accumulation_steps=4"),
        "ACCELERATE_GRADIENT_CLIPPING": ("1.0", "gradient_clipping=1.0.*optim.max_grad_norm"),
        "ACCELERATE_DEEPSPEED_ZERO_STAGE": ("0", "zero_stage=0"),
    }
    for var, (value, message) in refused.items():
        with pytest.raises(ConfigError, match=f"accelerate config: {message}"):
            deepspeed_settings({**env, var: value})
    # DeepSpeed clips at 1.0 unless told: optim.max_grad_norm=0 must mean no clipping.
    config = engine_config(DeepSpeedSettings(2), micro_batches=3, world=2, max_grad_norm=0.0)
    assert config["gradient_clipping"] == 0.0 and config["zero_optimization"]["stage"] == 2
    assert config["gradient_accumulation_steps"] == 3 and config["train_batch_size"] == 6


# ---- rs: each process samples its share of every round's prompts; every fine-tuning is a data-parallel SFT run ---

RS_MODES = {
    # Llama 2's rounds, pooled: round 2 samples round 1's model and keeps the best of both rounds
    "rejection_sampling": ["algo.rounds=2", "algo.pool=true"],
    # ReST: one Grow step, two Improve steps at rising quantiles
    "rest": [
        "algo.mode=rest",
        "algo.grow_steps=1",
        "algo.thresholds=0.0,0.5",
        "algo.threshold_kind=quantile",
    ],
}


@pytest.mark.slow
@pytest.mark.parametrize("mode", list(RS_MODES))
def test_rs_on_two_processes_samples_and_trains_as_one(mode, tiny_model_dir, tmp_path):
    """5 prompts over 2 processes (3 and 2), K=4 samples each from the seeds of their rows in the round: the
    candidates and fine-tuning data are the rows one process writes, written once; the SFT runs take one
    process's steps, so the final models agree to 1e-5; the summary is printed once."""
    from rlhflab.stages import rejection_sampling

    from ..helpers import PPO_PROMPTS

    data = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": p} for p in PPO_PROMPTS[:5]])
    overrides = [
        f"model.name_or_path={tiny_model_dir}", f"data.train_path={data}", *QUIET,
        "algo.reward_model=rule:length:coef=1:target=6", "algo.samples_per_prompt=4", "algo.eval_prompts=3",
        "sampling.max_new_tokens=8", "data.max_length=24", "data.max_prompt_length=12", "optim.batch_size=4",
        # Adam turns the last-bit differences of a summation order into larger ones where a gradient is near 0;
        # a small rate keeps those of four chained SFT steps inside the tolerance (see the DPO test).
        "optim.max_steps=2", "optim.lr=5e-4", *RS_MODES[mode],
    ]  # fmt: skip
    one = rejection_sampling.train(stage_config("rs", tiny_model_dir, *overrides, out=tmp_path / "one"))
    out = _launch(
        LAUNCHERS["torchrun"], ["rs", *overrides, f"logging.output_dir={tmp_path / 'two'}"], tmp_path
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "data parallel over 2 processes" in out.stdout and out.stdout.count("rs: mode") == 1
    assert out.stdout.count("reward queries; saved the policy") == 1 and out.stdout.count("rs: step 1 ") == 1
    _assert_same_weights(one, tmp_path / "two" / "final", tiny_model_dir)

    def rows(run, name):
        return [json.loads(x) for x in (tmp_path / run / name).read_text().splitlines()]

    samples = ["round-1", "round-2"] if mode == "rejection_sampling" else ["grow-1"]
    for step in samples:
        cands = rows("one", f"{step}/candidates.jsonl")
        assert rows("two", f"{step}/candidates.jsonl") == cands and len(cands) == 5
        assert len({t for r in cands for t in r["samples"]}) > 5  # sampled, not one response everywhere
    trained = samples if mode == "rejection_sampling" else ["grow-1/improve-1", "grow-1/improve-2"]
    for step in trained:
        assert rows("two", f"{step}/sft.jsonl") == rows("one", f"{step}/sft.jsonl")
        sft_rows = [
            r for r in read_metrics(tmp_path / "two" / step / "sft" / "metrics.jsonl") if "loss/sft" in r
        ]
        assert [r["step"] for r in sft_rows] == [1, 2]  # each fine-tuning trained, logged once
    m1, m2 = (read_metrics(tmp_path / r / "metrics.jsonl") for r in ("one", "two"))
    m1, m2 = ([{k: v for k, v in r.items() if k == "step" or k.startswith(("reward/", "rs/", "sft/loss"))}
               for r in m if "reward/eval_mean" in r] for m in (m1, m2))  # fmt: skip
    assert [r["step"] for r in m2] == [r["step"] for r in m1] == [0, 1, 2]
    for r1, r2 in zip(m1, m2):  # the whole round's candidates, kept data and evaluation; the SFT's last loss
        assert r2 == pytest.approx(r1, abs=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_online_dpo_sharded_on_two_processes_takes_the_steps_of_one(lora, tiny_model_dir, tmp_path):
    """Online DPO with the policy sharded (FSDP; with LoRA the reference is the policy, adapters off, sharded
    too): decoding in step, and a process that kept fewer pairs (ties dropped) joins the other's micro-batch
    passes on a pair weighted 0: the same weights, pairs and metrics as one process."""
    from rlhflab.stages import online_dpo

    settings = [
        "algo.prompts_per_step=4", "algo.iterations=4", "algo.micro_batch_size=1",
        *(["model.lora.enabled=true", "model.lora.r=4", "model.lora.merge=true"] if lora else []),
    ]  # fmt: skip
    launcher = [*FSDP, _accelerate_config("fsdp")]
    one_rows, two_rows, m1, m2 = _on_policy_one_and_two(
        "online-dpo", online_dpo.train, settings, tiny_model_dir, tmp_path, launcher
    )
    # Some step left the two processes different numbers of pairs to train on (one micro-batch each), so one
    # joined a pass at weight 0.
    kept = _same_pairs_kept_per_process(one_rows, two_rows)
    assert any(a != b for a, b in kept), kept
    _assert_same_metrics(m1, m2, "feedback/queries", [1, 2, 3, 4])


@pytest.mark.slow
def test_iterative_dpo_on_two_processes_samples_asks_and_trains_as_one(tiny_model_dir, tmp_path):
    """Iterative DPO, 2 rounds of 5 prompts over 2 processes (3 and 2), each pair from the seeds of its rows in
    the round and labelled by a rule reward (argmax): the pairs files are the rows one process writes, written
    once; each round's DPO run takes one process's steps, so the final models agree to 1e-5; the summary is
    printed once."""
    from rlhflab.stages import iterative_dpo

    from ..helpers import PPO_PROMPTS

    data = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": p} for p in PPO_PROMPTS[:10]])
    overrides = [
        f"model.name_or_path={tiny_model_dir}", f"data.train_path={data}", *QUIET,
        "algo.feedback=reward", "algo.reward_model=rule:length:coef=1:target=6", "algo.prompts_per_round=5",
        "algo.rounds=2", "sampling.max_new_tokens=8", "data.max_length=24", "data.max_prompt_length=12",
        # Adam turns the last-bit differences of a summation order into larger ones where a gradient is near 0;
        # a small rate keeps those of the chained DPO runs inside the tolerance (see the DPO test).
        "optim.batch_size=2", "optim.lr=5e-4",
    ]  # fmt: skip
    one = iterative_dpo.train(stage_config("iterative-dpo", tiny_model_dir, *overrides, out=tmp_path / "one"))
    out = _launch(
        LAUNCHERS["torchrun"],
        ["iterative-dpo", *overrides, f"logging.output_dir={tmp_path / 'two'}"],
        tmp_path,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "data parallel over 2 processes" in out.stdout and out.stdout.count("iterative-dpo: mode") == 1
    assert out.stdout.count("saved the policy to") == 1 and out.stdout.count("iterative-dpo: round 1/2") == 1
    _assert_same_weights(one, tmp_path / "two" / "final", tiny_model_dir)

    def rows(run, name):
        return [json.loads(x) for x in (tmp_path / run / name).read_text().splitlines()]

    for rnd in (1, 2):
        pairs = rows("one", f"round-{rnd}/pairs.jsonl")
        assert rows("two", f"round-{rnd}/pairs.jsonl") == pairs and len(pairs) >= 2
        dpo_rows = [r for r in read_metrics(tmp_path / "two" / f"round-{rnd}" / "dpo" / "metrics.jsonl")
                    if "loss/dpo" in r]  # fmt: skip
        assert dpo_rows and len({r["step"] for r in dpo_rows}) == len(dpo_rows)  # trained, logged once
    m1, m2 = (read_metrics(tmp_path / r / "metrics.jsonl") for r in ("one", "two"))
    m1, m2 = ([{k: v for k, v in r.items() if k == "step" or k.startswith(("feedback/", "reward/", "kl/", "loss/entropy", "dpo/loss"))}
               for r in m if "feedback/queries" in r] for m in (m1, m2))  # fmt: skip
    assert [r["step"] for r in m2] == [r["step"] for r in m1] == [1, 2]
    for r1, r2 in zip(m1, m2):  # the whole round's labels, scores, KL and entropy; the DPO run's last loss
        assert r2 == pytest.approx(r1, abs=1e-4)


def test_a_model_is_sharded_under_fsdp_and_zero_3_only():
    """Every forward pass of a sharded model needs every process (evaluations run on all of them): FSDP and
    ZeRO-3 shard the parameters; ZeRO-1 / ZeRO-2 keep them whole on every process."""
    from rlhflab.stages.deepspeed_zero import DeepSpeedSettings
    from rlhflab.stages.sharding import FSDPSettings

    par = DataParallel.__new__(DataParallel)
    par.rank, par.world = 1, 2
    assert not par.sharded and par.on_main(lambda: "ran") is None
    par.zero = DeepSpeedSettings(zero_stage=2)
    assert not par.sharded and par.describe().endswith("DeepSpeed ZeRO-2")
    par.zero = DeepSpeedSettings(zero_stage=3)
    assert par.sharded and par.on_main(lambda: "ran") == "ran"
    par.zero, par.fsdp = None, FSDPSettings()
    assert par.sharded and par.describe() == ", data parallel over 2 processes, sharded (FSDP)"


def test_only_the_main_process_shows_a_progress_bar(tmp_path):
    """A process other than the main one takes the same steps silently: no bar (rich would draw an empty one)."""
    from rlhflab.config import LoggingSection
    from rlhflab.core.metrics_log import SilentLogger
    from rlhflab.stages.common import Loop, Run

    model = torch.nn.Linear(2, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for rank, shown in ((0, True), (1, False)):
        par = DataParallel.__new__(DataParallel)
        par.rank, par.world = rank, 2
        run = Run(dir=tmp_path, logger=SilentLogger(), name="x")
        loop = Loop(
            run, "x", LoggingSection(progress=True), 3, model, optimizer, None, resume=False, parallel=par
        )
        assert (loop.progress._bar is not None) == shown and loop.writes == shown
        loop.progress.close()


def _same_pairs_kept_per_process(one_rows: list[dict], two_rows: list[dict]) -> list[list[int]]:
    """Online DPO's 16 pairs (4 steps of 4) written by 1 and 2 processes are the same (their KLs to 1e-4); returns
    the pairs each of the 2 processes kept to train on in each step (pair i of a step is process i % 2's)."""
    assert len(one_rows) == 16 and [{k: r[k] for k in r if k[:2] != "kl"} for r in two_rows] == [
        {k: r[k] for k in r if k[:2] != "kl"} for r in one_rows
    ]
    for r1, r2 in zip(one_rows, two_rows):
        assert (r2["kl_first"], r2["kl_second"]) == pytest.approx((r1["kl_first"], r1["kl_second"]), abs=1e-4)
    return [[sum(r["label"] in (0.0, 1.0) for r in one_rows[s + p : s + 4 : 2]) for p in (0, 1)]
            for s in range(0, 16, 4)]  # fmt: skip
