"""DeepSpeed ZeRO for the stages that run across processes, set up from the accelerate config file the run was
launched with:

    accelerate launch --config_file configs/accelerate/deepspeed_zero3.yaml -m rlhflab sft --config configs/sft_tiny.yaml

accelerate's launcher turns the file's `deepspeed_config` into ACCELERATE_DEEPSPEED_* environment variables;
`deepspeed_settings` reads them (refusing what rlhflab does not act on) and `build_engine` wraps the model and
the stage's own optimizer in DeepSpeed's engine: stage 1 partitions the optimizer state, stage 2 the gradients
too, stage 3 the parameters too (gathered by DeepSpeed's hooks when each submodule is called, so the stages may
call the body and the LM head separately).

The engine's steps are the ones one process takes with the same global batch:
- each process's loss is normalized by the WHOLE step's count (as in plain data parallelism), while DeepSpeed
  divides each micro-batch's loss by the gradient accumulation steps and averages the gradients over the
  processes: `backward` multiplies by both first, so the gradient is the whole batch's sum;
- the gradient accumulation steps are the micro-batches of one process's share of a step (the same on every
  process: the batch must divide evenly), and the engine steps after each one (it updates at the last);
- online DPO's steps take as many micro-batches as each process kept pairs (ties dropped), which changes between
  processes and steps: every process takes the step's largest count (one with fewer joins at weight 0), and the
  engine is built for one micro-batch per step (no division of the loss) with the step's last backward pass marked
  as the accumulation boundary (`engine.set_gradient_accumulation_boundary`), where ZeRO hands the accumulated
  gradient partitions to the update (`DataParallel.begin_step`, `parallel.VARYING`);
- the on-policy stages (PPO: the policy and its value head in one engine; RLOO, GRPO) take one backward pass per
  minibatch on every process: one holding none of a minibatch's rows joins on one row weighted 0, since ZeRO
  reduces the gradients in collectives during the backward pass (`DataParallel.lockstep`); under ZeRO-3 the
  processes decode in step (transformers' `synced_gpus`), DeepSpeed's hooks gathering the parameters;
- clipping is DeepSpeed's (`gradient_clipping` = optim.max_grad_norm, 0 = none: DeepSpeed's default is 1.0);
  the learning rate follows the stage's scheduler on the optimizer DeepSpeed wraps.

Checkpoints (logging.save_every) are written in the single-process format, the files one process writes:
`full_optimizer_state` gathers each parameter's AdamW moments from the partitions (DeepSpeed's
`safe_get_full_optimizer_state`, collective) into `optimizer.state_dict()`'s layout over the optimizer's own
parameter groups, with the step count of the wrapped optimizer's state; ZeRO-3's weights are gathered whole to be
saved. `load_full_state` loads such a checkpoint (from any number of processes, with or without DeepSpeed) into
the partitions: the weights, DeepSpeed's float32 copies of them (which its update starts from) and the moments,
through DeepSpeed's setters, after making the wrapped optimizer's state that its first step would otherwise make.

Facts measured on CPU (gloo, DeepSpeed 0.19.8, the tests' tiny model):
- ZeRO-2 and ZeRO-3 match plain torch to ~1e-5 with AdamW (weights and logged metrics), with LoRA too: the
  optimizer (and so ZeRO's partitions of its state) holds the adapters only, ZeRO-3 partitions the frozen weights
  as well and its hooks gather them for every call, including DPO's reference pass through the policy with its
  adapters off (algo.precompute_ref_logps=false); the adapter alone or folded into the weights is saved from
  ZeRO-3's gathered parameters;
- with ZeRO-3 and several micro-batches, a forward that does not go through the engine must clear the engine's
  "backward seen" flags itself (the engine's forward does), or the accumulated gradients are silently wrong;
- a checkpoint written by two ZeRO-2 / ZeRO-3 processes equals one process's to 1e-5 (weights, moments, step,
  learning rate, scheduler), and runs resumed across 2 DeepSpeed processes <-> 1 plain process end where the
  uninterrupted run does, to 1e-5;
- PPO, RLOO and GRPO under ZeRO-2 and ZeRO-3 match one plain process to 1e-5 (weights; rollouts identical;
  metrics to 1e-4); so does online DPO (ZeRO-2, ZeRO-3, ZeRO-3 with LoRA: weights to 1e-6, pairs identical, metrics
  to 1e-4) with kept pairs per process and step of (2, 1), (0, 2), (2, 1), (1, 1); without the boundary marked,
  a GAS-1 engine updates after every micro-batch (weights off), and without the padding ZeRO-2's collectives
  mismatch (a process aborts);
- DeepSpeed's float32 copies of the weights are separate from the model's parameters under ZeRO-1/2/3 (loading
  the model alone would be undone by the next update), and ZeRO-1/2 create the wrapped optimizer's state at the
  first step only (before it, `safe_set_full_optimizer_state` has nothing to write into).
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from rlhflab.errors import ConfigError


@dataclass(frozen=True)
class DeepSpeedSettings:
    zero_stage: int
    """1: optimizer state partitioned; 2: and gradients; 3: and parameters."""


# accelerate's environment variable -> (its config key, accepted values, why others are refused).
_REFUSED = {
    "ACCELERATE_DEEPSPEED_CONFIG_FILE": (
        "deepspeed_config_file",
        ("", "none"),
        "rlhflab builds DeepSpeed's config from the accelerate file's keys and its own config",
    ),
    "ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE": (
        "offload_optimizer_device",
        ("", "none"),
        "offload is not supported yet",
    ),
    "ACCELERATE_DEEPSPEED_OFFLOAD_PARAM_DEVICE": (
        "offload_param_device",
        ("", "none"),
        "offload is not supported yet",
    ),
    "ACCELERATE_DEEPSPEED_ZERO3_INIT": (
        "zero3_init_flag",
        ("", "false"),
        "every process builds the whole model (zero.Init would also skip the model's own weight init)",
    ),
    "ACCELERATE_GRADIENT_ACCUMULATION_STEPS": (
        "gradient_accumulation_steps",
        ("", "1"),
        "rlhflab accumulates optim.batch_size in micro-batches of optim.micro_batch_size",
    ),
    "ACCELERATE_GRADIENT_CLIPPING": ("gradient_clipping", ("",), "set optim.max_grad_norm instead"),
}


def deepspeed_settings(env: Mapping[str, str]) -> DeepSpeedSettings | None:
    """The ZeRO settings of the accelerate config a run was launched with, or None when it was not launched
    with DeepSpeed. Settings rlhflab does not act on are refused, naming the config file's key."""
    if env.get("ACCELERATE_USE_DEEPSPEED", "false").lower() != "true":
        return None
    for var, (key, accepted, why) in _REFUSED.items():
        value = env.get(var, "")
        if value.lower() not in accepted:
            raise ConfigError(
                f"accelerate config: {key}={value} is not supported ({why}); leave it out"
                + (f" or set {key}: {accepted[1]}" if len(accepted) > 1 else "")
            )
    stage = env.get("ACCELERATE_DEEPSPEED_ZERO_STAGE", "2")
    if stage not in ("1", "2", "3"):
        raise ConfigError(f"accelerate config: zero_stage={stage}; rlhflab runs ZeRO stages 1, 2 and 3")
    return DeepSpeedSettings(zero_stage=int(stage))


def engine_config(
    settings: DeepSpeedSettings, *, micro_batches: int, world: int, max_grad_norm: float
) -> dict:
    """DeepSpeed's config for one optimizer step of `micro_batches` micro-batches on each of `world` processes.
    The batch sizes only satisfy DeepSpeed's consistency check (rlhflab feeds the batches itself); precision
    stays float32 (model.autocast=bf16 runs the forward passes in bfloat16)."""
    return {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": micro_batches,
        "train_batch_size": micro_batches * world,
        "gradient_clipping": max(max_grad_norm, 0.0),
        "zero_optimization": {
            "stage": settings.zero_stage,
            "stage3_gather_16bit_weights_on_model_save": True,
        },
        "zero_allow_untested_optimizer": True,  # the stage's own torch optimizer
        "steps_per_print": 2**62,
        "wall_clock_breakdown": False,
    }


def build_engine(
    model, optimizer, settings: DeepSpeedSettings, *, micro_batches: int, world: int, max_grad_norm: float
):
    """DeepSpeed's engine around `model` (trained in place: the stage keeps calling `model`) and `optimizer`."""
    import deepspeed

    config = engine_config(settings, micro_batches=micro_batches, world=world, max_grad_norm=max_grad_norm)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    return engine


def gathered_parameters(model: torch.nn.Module, modifier_rank: int | None = None):
    """A context in which ZeRO-3's partitioned parameters are whole on every process (every process enters); with
    `modifier_rank`, what that process writes into them is partitioned back on leaving (else it is dropped)."""
    import deepspeed

    return deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=modifier_rank)


def _flat_partitions(zero) -> list[torch.Tensor]:
    """The float32 partitions DeepSpeed's ZeRO optimizer hands the wrapped torch optimizer (the keys of its state):
    one per parameter group under ZeRO-1/2, one per sub-group under ZeRO-3."""
    flats = getattr(zero, "fp32_partitioned_groups_flat", None)  # ZeRO-3
    return list(flats if flats is not None else zero.single_partition_of_fp32_groups)


def _state_keys(sample: dict) -> tuple[list[str], dict]:
    """(the per-element state keys of an optimizer state entry, e.g. AdamW's exp_avg and exp_avg_sq; its other
    entries, e.g. AdamW's step count, the same for every parameter)."""
    keys = sorted(k for k, v in sample.items() if torch.is_tensor(v) and v.dim() > 0)
    return keys, {k: v for k, v in sample.items() if k not in keys}


def full_optimizer_state(engine, groups: list[list[torch.nn.Parameter]]) -> dict:
    """The wrapped torch optimizer's state as one process's `optimizer.state_dict()` over the parameter groups
    `groups` (the optimizer's, before DeepSpeed wrapped it): each parameter's state gathered from the partitions.
    Every process calls it (the gathers are collective)."""
    from deepspeed.utils import safe_get_full_optimizer_state

    zero = engine.optimizer
    base = zero.optimizer
    entries = [base.state[f] for f in _flat_partitions(zero) if f in base.state]
    keys, scalars = _state_keys(entries[0]) if entries else ([], {})
    state, param_groups, index = {}, [], 0
    for group, params in zip(base.param_groups, groups):
        ids = list(range(index, index + len(params)))
        for i, p in zip(ids, params):
            shape = getattr(p, "ds_shape", p.shape)  # ZeRO-3 keeps the whole shape beside the partition
            full = {k: safe_get_full_optimizer_state(p, k).detach().reshape(shape).cpu() for k in keys}
            if entries:
                state[i] = {**{k: v.clone() if torch.is_tensor(v) else v for k, v in scalars.items()}, **full}
        param_groups.append({**{k: v for k, v in group.items() if k != "params"}, "params": ids})
        index += len(params)
    return {"state": state, "param_groups": param_groups}


def load_full_state(
    engine, groups: list[list[torch.nn.Parameter]], model, model_state: dict, optimizer_state: dict
):
    """Load a single-process checkpoint (the model's state dict and its optimizer's, over the parameter groups
    `groups`) into the engine's partitions: the model's parameters, DeepSpeed's float32 copies of them and the
    wrapped optimizer's state. Every process calls it."""
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    from rlhflab.errors import UserError

    zero = engine.optimizer
    base = zero.optimizer
    saved = optimizer_state["param_groups"]
    if [len(g["params"]) for g in saved] != [len(g) for g in groups]:
        raise UserError(
            "the checkpoint's optimizer has other trainable parameters than this model (its parameter groups hold "
            f"{[len(g['params']) for g in saved]}, the model's {[len(g) for g in groups]}); resume with the "
            "model settings the run was started with"
        )
    for group, old in zip(base.param_groups, saved):
        group.update({k: v for k, v in old.items() if k != "params"})  # the learning rate where it stopped
    entries = optimizer_state["state"]
    keys, scalars = _state_keys(next(iter(entries.values()))) if entries else ([], {})
    # The state the wrapped optimizer would have made at its first step, filled in below through DeepSpeed's
    # own setters (which write each process's part of every parameter's state).
    for flat in _flat_partitions(zero):
        base.state[flat] = {
            **{k: v.clone() if torch.is_tensor(v) else v for k, v in scalars.items()},
            **{k: torch.zeros_like(flat) for k in keys},
        }
    if hasattr(zero, "_hp_optimizer_states_linked"):  # ZeRO-1/2 link each parameter to its part of the state
        zero._hp_optimizer_states_linked = False
        zero._lazy_init_hp_params_optimizer_state()
    # ZeRO-3's parameters are whole within the block, and what the main process loads is partitioned on leaving.
    sharded = hasattr(zero, "fp32_partitioned_groups_flat")
    with gathered_parameters(model, modifier_rank=0) if sharded else contextlib.nullcontext():
        model.load_state_dict(model_state)
        for params, old in zip(groups, saved):
            for p, i in zip(params, old["params"]):
                safe_set_full_fp32_param(p, p.data)
                for k in keys:
                    value = entries[i][k] if i in entries else torch.zeros(p.shape)
                    safe_set_full_optimizer_state(p, value.to(p.device), k)
