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
- clipping is DeepSpeed's (`gradient_clipping` = optim.max_grad_norm, 0 = none: DeepSpeed's default is 1.0);
  the learning rate follows the stage's scheduler on the optimizer DeepSpeed wraps.
Facts measured on CPU (gloo, DeepSpeed 0.19.8): ZeRO-2 and ZeRO-3 match plain torch to ~1e-5 with AdamW; with
ZeRO-3 and several micro-batches, a forward that does not go through the engine must clear the engine's
"backward seen" flags itself (the engine's forward does), or the accumulated gradients are silently wrong.
"""

from __future__ import annotations

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


def gathered_parameters(model: torch.nn.Module):
    """A context in which ZeRO-3's partitioned parameters are whole on every process (every process enters)."""
    import deepspeed

    return deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=None)
