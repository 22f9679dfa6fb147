"""DeepSpeed ZeRO (stages/deepspeed_zero.py) beyond test_parallel.py's plain runs: LoRA adapters trained under
ZeRO-2 and ZeRO-3; resumable checkpoints written in the single-process format, so a run moves between DeepSpeed and
one plain process at any checkpoint; PPO, RLOO, GRPO and online DPO inside the engine. Two processes == one to
1e-5."""

from __future__ import annotations

import pytest
from safetensors.torch import load_file

from rlhflab.core.metrics_log import read_metrics
from rlhflab.stages import dpo, sft

from ..helpers import CAT_PAIRS, QUIET, SHORT_TEXT, stage_config, write_jsonl
from .test_parallel import (
    FSDP,
    _accelerate_config,
    _assert_same_metrics,
    _assert_same_weights,
    _launch,
    _same_pairs_kept_per_process,
)

LORA = ["model.lora.enabled=true", "model.lora.r=4"]


def _assert_same_adapter(one, two) -> None:
    """The adapters alone (PEFT format, model.lora.merge=false) equal to 1e-5, and trained."""
    import torch

    a, b = (load_file(d / "adapter_model.safetensors") for d in (one, two))
    assert a.keys() == b.keys() and a
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=1e-5)
    assert any(v.abs().max() > 1e-4 for k, v in a.items() if "lora_B" in k), "it trained: B starts at 0"


@pytest.mark.slow
@pytest.mark.parametrize(
    ("stage", "zero", "merge", "live"),
    [("sft", 2, True, False), ("sft", 3, False, False), ("dpo", 2, False, False), ("dpo", 3, True, False),
     ("dpo", 3, False, True)],
    ids=["sft-zero2-merged", "sft-zero3-adapter", "dpo-zero2-adapter", "dpo-zero3-merged", "dpo-zero3-live-ref"],
)  # fmt: skip
def test_lora_under_deepspeed_zero_takes_the_steps_of_one(
    stage, zero, merge, live, tiny_model_dir, sft_file, tmp_path
):
    """LoRA adapters among frozen weights, in ZeRO-2's and ZeRO-3's partitions (ZeRO-3's gathered whole to save the
    adapter alone or to fold it in). DPO's reference is the policy with its adapters off: its log-probs cached
    before DeepSpeed wraps the policy, or (live) computed at every step through the engine's partitioned
    parameters. Two processes' weights and logged metrics are one plain process's, micro-batches included."""
    data = sft_file if stage == "sft" else write_jsonl(tmp_path / "pairs.jsonl", CAT_PAIRS * 4)
    overrides = [
        f"model.name_or_path={tiny_model_dir}", f"data.train_path={data}", *QUIET, *SHORT_TEXT, *LORA,
        f"model.lora.merge={str(merge).lower()}", "optim.max_steps=4", "data.eval_fraction=0.25",
        "logging.eval_every=2", "optim.lr=1e-2", "optim.micro_batch_size=2", "optim.max_grad_norm=0.5",
        *(["algo.precompute_ref_logps=false"] if live else []),
    ]  # fmt: skip
    train = {"sft": sft.train, "dpo": dpo.train}[stage]
    one = train(stage_config(stage, tiny_model_dir, *overrides, out=tmp_path / "one"))
    config = _accelerate_config(f"deepspeed_zero{zero}")
    out = _launch([*FSDP, config], [stage, *overrides, f"logging.output_dir={tmp_path / 'two'}"], tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert f"DeepSpeed ZeRO-{zero}" in out.stdout and out.stdout.count("saved the") == 1
    if merge:
        _assert_same_weights(one, tmp_path / "two" / "final", tiny_model_dir)
    else:
        _assert_same_adapter(one, tmp_path / "two" / "final")
    key = f"loss/{stage}"
    one_rows, two_rows = (read_metrics(tmp_path / d / "metrics.jsonl") for d in ("one", "two"))
    for row in one_rows + two_rows:
        if stage == "dpo" and row.get("step") == 1:
            row.pop("reward/accuracy", None)  # margins of 0 up to rounding (see test_parallel's FSDP test)
    _assert_same_metrics(one_rows, two_rows, key, [1, 2, 3, 4])
    _assert_same_metrics(one_rows, two_rows, "eval/nll" if stage == "sft" else "eval/accuracy", [2, 4])


def _assert_same_checkpoint(one, two) -> None:
    """Two checkpoints alike to 1e-5: the weights, the step, the scheduler and AdamW's state (step count, moments,
    parameter groups) in the single-process format, parameter for parameter."""
    import torch

    a, b = (torch.load(d / "model.pt", weights_only=True) for d in (one, two))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=1e-5)
    a, b = (torch.load(d / "trainer_state.pt", weights_only=False) for d in (one, two))
    assert (b["step"], b["scheduler"], b["state"]) == (a["step"], a["scheduler"], a["state"])
    oa, ob = a["optimizer"], b["optimizer"]
    assert len(ob["param_groups"]) == len(oa["param_groups"])
    for ga, gb in zip(oa["param_groups"], ob["param_groups"]):  # the learning rate to the last bit or so
        assert {**gb, "lr": pytest.approx(ga["lr"], rel=1e-9)} == ga
    assert ob["state"].keys() == oa["state"].keys() and oa["state"]
    for i, s in oa["state"].items():
        assert ob["state"][i].keys() == s.keys()
        for k, v in s.items():
            torch.testing.assert_close(ob["state"][i][k], v, rtol=1e-3, atol=1e-6, msg=f"state {i} {k}")


@pytest.mark.slow
@pytest.mark.parametrize(
    ("stage", "zero", "lora"), [("sft", 3, False), ("dpo", 2, True)], ids=["sft-zero3", "dpo-zero2-lora"]
)
def test_a_run_resumes_between_deepspeed_and_one_process(
    stage, zero, lora, tiny_model_dir, sft_file, tmp_path
):
    """Checkpoints under DeepSpeed are gathered from the partitions into the files one process writes (AdamW's
    moments and step count included), so a run checkpointed by two DeepSpeed processes resumes in one plain
    process, and one stopped in one plain process resumes under DeepSpeed: both end where the uninterrupted
    run does."""
    import shutil

    module = {"sft": sft, "dpo": dpo}[stage]
    data = sft_file if stage == "sft" else write_jsonl(tmp_path / "pairs.jsonl", CAT_PAIRS * 4)
    overrides = [
        f"model.name_or_path={tiny_model_dir}", f"data.train_path={data}", *QUIET, *SHORT_TEXT,
        "optim.max_steps=6", "logging.save_every=2", "optim.lr=1e-3", "optim.micro_batch_size=2",
        "optim.max_grad_norm=0.5", "optim.warmup_steps=2",
        *([*LORA, "model.lora.merge=true", "optim.lr=1e-2"] if lora else []),
    ]  # fmt: skip
    whole = module.train(stage_config(stage, tiny_model_dir, *overrides, out=tmp_path / "whole"))
    launcher = [*FSDP, _accelerate_config(f"deepspeed_zero{zero}")]

    # Two DeepSpeed processes, checkpoints at steps 2 and 4; then resumed in one plain process from step 2.
    two = tmp_path / "two_then_one"
    out = _launch(launcher, [stage, *overrides, f"logging.output_dir={two}"], tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert f"DeepSpeed ZeRO-{zero}" in out.stdout
    _assert_same_weights(whole, two / "final", tiny_model_dir)
    for step in ("step-00000002", "step-00000004"):
        _assert_same_checkpoint(tmp_path / "whole" / "checkpoints" / step, two / "checkpoints" / step)
    shutil.rmtree(two / "final")
    shutil.rmtree(two / "checkpoints" / "step-00000004")
    _assert_same_weights(whole, module.train(stage_config(stage, tiny_model_dir, *overrides, out=two), resume=True),
                         tiny_model_dir)  # fmt: skip

    # One plain process stopped in its 3rd step (Ctrl-C: step 2 is checkpointed); resumed by two DeepSpeed processes.
    real, calls = module.clip_gradients, []

    def crash(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    one = tmp_path / "one_then_two"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(module, "clip_gradients", crash)
        with pytest.raises(KeyboardInterrupt):
            module.train(stage_config(stage, tiny_model_dir, *overrides, out=one))
    out = _launch(launcher, [stage, *overrides, f"logging.output_dir={one}", "--resume"], tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "resumed from" in out.stdout and f"DeepSpeed ZeRO-{zero}" in out.stdout
    _assert_same_weights(whole, one / "final", tiny_model_dir)
    _assert_same_checkpoint(
        tmp_path / "whole" / "checkpoints" / "step-00000004", one / "checkpoints" / "step-00000004"
    )
    key = f"loss/{stage}"
    _assert_same_metrics(
        *(read_metrics(d / "metrics.jsonl") for d in (tmp_path / "whole", one)), key, [1, 2, 3, 4, 5, 6]
    )


@pytest.mark.slow
@pytest.mark.parametrize(("stage", "zero"), [("grpo", 2), ("rloo", 2), ("grpo", 3)])
def test_critic_free_under_deepspeed_zero_takes_the_steps_of_one(stage, zero, tiny_model_dir, tmp_path):
    """GRPO and RLOO inside DeepSpeed's engine: each process samples its whole groups (ZeRO-3: decoding in step,
    the parameters gathered by DeepSpeed's hooks), one backward pass per minibatch on every process (a process
    holding none of a minibatch's rows joins on one row weighted 0: ZeRO reduces the gradients in collectives),
    the engine's update: the same weights, rollouts and metrics as one plain process."""
    from rlhflab.stages import critic_free

    from .test_parallel import CRITIC_FREE, _on_policy_one_and_two

    settings = [
        "algo.prompts_per_iteration=4", "algo.num_generations=3", "algo.iterations=3", "optim.max_grad_norm=0.5",
        *CRITIC_FREE[stage],
    ]  # fmt: skip
    launcher = [*FSDP, _accelerate_config(f"deepspeed_zero{zero}")]
    one_rows, two_rows, m1, m2 = _on_policy_one_and_two(
        stage, critic_free.train, settings, tiny_model_dir, tmp_path, launcher
    )
    assert [(r["prompt"], r["response"], r["score"]) for r in two_rows] == [
        (r["prompt"], r["response"], r["score"]) for r in one_rows
    ]
    _assert_same_metrics(m1, m2, "loss/policy", [1, 2, 3])


@pytest.mark.slow
@pytest.mark.parametrize("zero", [2, 3])
def test_ppo_under_deepspeed_zero_takes_the_steps_of_one(zero, tiny_model_dir, tmp_path):
    """PPO's policy and value head in one DeepSpeed engine: each process samples its share (ZeRO-3: in step), a
    process holding none of a minibatch's rows joins its passes with weight 0 (minibatches of 2 rows of 8): the
    same weights, rollouts and metrics as one plain process."""
    from rlhflab.stages import ppo

    from .test_parallel import _on_policy_one_and_two

    settings = [
        "algo.rollout_batch_size=8", "algo.minibatch_size=2", "algo.ppo_epochs=2", "algo.iterations=3",
        "optim.max_grad_norm=0.5",
    ]  # fmt: skip
    launcher = [*FSDP, _accelerate_config(f"deepspeed_zero{zero}")]
    one_rows, two_rows, m1, m2 = _on_policy_one_and_two(
        "ppo", ppo.train, settings, tiny_model_dir, tmp_path, launcher
    )
    assert [(r["prompt"], r["response"]) for r in two_rows] == [
        (r["prompt"], r["response"]) for r in one_rows
    ]
    _assert_same_metrics(m1, m2, "loss/policy", [1, 2, 3])


@pytest.mark.slow
@pytest.mark.parametrize(
    ("zero", "lora"), [(2, False), (3, False), (3, True)], ids=["zero2", "zero3", "zero3-lora"]
)
def test_online_dpo_under_deepspeed_zero_takes_the_steps_of_one(zero, lora, tiny_model_dir, tmp_path):
    """Online DPO inside DeepSpeed's engine, built for one micro-batch per step with the step's last pass marked as
    the accumulation boundary: each process trains on the pairs it kept (ties dropped), one micro-batch per pair,
    so the count differs between the processes and from step to step; the one with fewer joins the other's passes
    on a pair weighted 0 (ZeRO reduces the gradients in collectives). With LoRA the reference is the policy with
    its adapters off (ZeRO-3: gathered by DeepSpeed's hooks). The same weights, pairs and metrics as one plain
    process."""
    from rlhflab.stages import online_dpo

    from .test_parallel import _on_policy_one_and_two

    settings = [
        "algo.prompts_per_step=4", "algo.iterations=4", "algo.micro_batch_size=1", "optim.max_grad_norm=0.5",
        *([*LORA, "model.lora.merge=true"] if lora else []),
    ]  # fmt: skip
    launcher = [*FSDP, _accelerate_config(f"deepspeed_zero{zero}")]
    one_rows, two_rows, m1, m2 = _on_policy_one_and_two(
        "online-dpo", online_dpo.train, settings, tiny_model_dir, tmp_path, launcher
    )
    # In some step the processes kept different numbers of pairs (so one joined a pass at weight 0), and the
    # step's micro-batch count changed from step to step.
    kept = _same_pairs_kept_per_process(one_rows, two_rows)
    assert any(a != b for a, b in kept) and len({max(k) for k in kept}) > 1, kept
    _assert_same_metrics(m1, m2, "feedback/queries", [1, 2, 3, 4])


@pytest.mark.parametrize(
    ("command", "engine", "allowed"),
    [("rs", "DeepSpeed", "ppo, rloo, grpo, online-dpo"), ("rs", "FSDP", "ppo, rloo, grpo, online-dpo")],
)
def test_stages_that_do_not_run_under_fsdp_or_deepspeed_refuse_them(
    command, engine, allowed, monkeypatch, tmp_path, capsys
):
    """(Replaces test_parallel.py's test_stages_that_sample_refuse_a_sharded_model, now that PPO, RLOO, GRPO and
    online DPO run under DeepSpeed.) rs samples with each process alone. Refused, exit 2, one line naming the
    stages that run, nothing written."""
    from rlhflab.cli import main

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv(f"ACCELERATE_USE_{engine.upper()}", "true")
    monkeypatch.chdir(tmp_path)
    assert main([command]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"rlhflab {command} does not run under {engine}" in err
    assert allowed in err and not list(tmp_path.iterdir())
