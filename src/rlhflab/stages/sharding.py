"""Fully sharded data parallelism (PyTorch's FSDP2, `torch.distributed.fsdp.fully_shard`) for the stages that
run across processes, set up from the accelerate config file the run was launched with:

    accelerate launch --config_file configs/accelerate/fsdp.yaml -m rlhflab sft --config configs/sft_tiny.yaml

accelerate's launcher turns the file's `fsdp_config` into FSDP_* environment variables; `fsdp_settings` reads
them (refusing what rlhflab does not do) and `shard_model` shards the model: each decoder layer is one unit,
the LM head another (with the input embeddings when the two share their weight), the body and the root the
rest. The units are finer than accelerate's own wrapping (which shards the root only besides the layers)
because the stages call the body and the LM head separately (the head only where log-probs are needed), and
each unit gathers its parameters when it is itself called.

The gradients come out of FSDP's reduce-scatter SUMMED over the processes (FSDP averages by default), as the
explicit all-reduce of plain data parallelism sums them: each process's loss is already normalized by the
whole batch, so the sum is the whole batch's gradient and N processes take the steps one process takes.
Saving gathers every parameter into the main process (`full_weights`), so models and checkpoints are written
in the same plain format as a single-process run's, and a run resumes in another number of processes.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import torch
from torch import nn

from rlhflab.errors import ConfigError


@dataclass(frozen=True)
class FSDPSettings:
    reshard_after_forward: bool = True
    """FULL_SHARD (True: parameters freed after each unit's forward, gathered again for backward; the ZeRO-3
    layout) or SHARD_GRAD_OP (False: kept gathered from forward to backward; ZeRO-2's memory for gradients and
    optimizer state, more for parameters)."""
    wrap_classes: tuple[str, ...] = ()
    """Class names of the modules sharded as units (fsdp_transformer_layer_cls_to_wrap); empty: the model's
    own `_no_split_modules` (its decoder layer)."""


# accelerate config key (as `accelerate launch` exports it) -> the values rlhflab accepts, and why others are refused.
_REFUSED = {
    "FSDP_OFFLOAD_PARAMS": ("fsdp_offload_params", ("false", ""), "CPU offload is not supported yet"),
    "FSDP_ACTIVATION_CHECKPOINTING": (
        "fsdp_activation_checkpointing",
        ("false", ""),
        "activation checkpointing is not supported yet",
    ),
    "FSDP_CPU_RAM_EFFICIENT_LOADING": (
        "fsdp_cpu_ram_efficient_loading",
        ("false", ""),
        "every process loads the whole model",
    ),
    "FSDP_STATE_DICT_TYPE": (
        "fsdp_state_dict_type",
        ("FULL_STATE_DICT", ""),
        "rlhflab writes full (gathered) checkpoints, which resume in any number of processes",
    ),
    "FSDP_AUTO_WRAP_POLICY": (
        "fsdp_auto_wrap_policy",
        ("TRANSFORMER_BASED_WRAP", ""),
        "rlhflab shards each decoder layer, the body and the LM head",
    ),
}


def fsdp_settings(env: Mapping[str, str]) -> FSDPSettings | None:
    """The FSDP settings of the accelerate config a run was launched with (its FSDP_* environment variables),
    or None when it was not launched with FSDP. Settings rlhflab does not act on are refused, naming the
    config file's key."""
    if env.get("ACCELERATE_USE_FSDP", "false").lower() != "true":
        return None
    version = env.get("FSDP_VERSION", "1")
    if version != "2":
        raise ConfigError(
            f"accelerate config: fsdp_version={version}; rlhflab shards with FSDP2: set fsdp_version: 2 "
            "(see configs/accelerate/fsdp.yaml)"
        )
    for var, (key, accepted, why) in _REFUSED.items():
        value = env.get(var, "")
        if value not in accepted and value.lower() not in accepted:
            raise ConfigError(
                f"accelerate config: {key}={value} is not supported ({why}); set {key}: {accepted[0].lower()} "
                "or leave it out"
            )
    reshard = env.get("FSDP_RESHARD_AFTER_FORWARD", "true")
    # FSDP1's strategy names, which accelerate also accepts for this key.
    named = {"true": True, "false": False, "full_shard": True, "shard_grad_op": False}
    if reshard.lower() not in named:
        raise ConfigError(
            f"accelerate config: fsdp_reshard_after_forward={reshard}; rlhflab takes true (FULL_SHARD) or false "
            "(SHARD_GRAD_OP)"
        )
    classes = tuple(c.strip() for c in env.get("FSDP_TRANSFORMER_CLS_TO_WRAP", "").split(",") if c.strip())
    return FSDPSettings(reshard_after_forward=named[reshard.lower()], wrap_classes=classes)


def _hf_model(model: nn.Module) -> nn.Module | None:
    """The outermost Hugging Face model inside `model` (under a PEFT wrapper or rlhflab's reward model)."""
    from transformers import PreTrainedModel

    return next((m for m in model.modules() if isinstance(m, PreTrainedModel)), None)


def shard_model(model: nn.Module, settings: FSDPSettings) -> nn.Module:
    """Shard `model` in place across the process group with `fully_shard`, in units the stages call
    separately: the decoder layers, the LM head (one unit with the input embeddings when tied), the body, the
    root's other children (a score head), the root. Gradients are summed, not averaged, across processes (see
    the module docstring)."""
    from torch.distributed.fsdp import FSDPModule, fully_shard

    hf = _hf_model(model)
    if hf is None:  # a small module beside a sharded model (PPO's value head): one unit
        fully_shard(model, reshard_after_forward=settings.reshard_after_forward)
        return _sum_gradients(model)
    names = set(settings.wrap_classes or getattr(hf, "_no_split_modules", None) or ())
    layers = [m for m in model.modules() if type(m).__name__ in names]
    if not layers:
        raise ConfigError(
            f"accelerate config: no module of the model is a {', '.join(sorted(names)) or '(none named)'} to shard "
            "as a unit; set fsdp_transformer_layer_cls_to_wrap to the model's decoder layer class"
        )
    kw = {"reshard_after_forward": settings.reshard_after_forward}
    for layer in layers:
        fully_shard(layer, **kw)
    head = hf.get_output_embeddings() if hf is not None else None
    if head is not None:
        embed = hf.get_input_embeddings()
        # A tied LM head and embedding are one tensor, which must live in one unit.
        fully_shard([embed, head] if embed.weight is head.weight else head, **kw)
    body = getattr(hf, "base_model", None)
    if body is not None and body is not model:
        fully_shard(body, **kw)
    # The root's other children (a reward model's score head) are called apart from the root too.
    for child in model.children():
        if not isinstance(child, FSDPModule) and any(True for _ in child.parameters()):
            fully_shard(child, **kw)
    fully_shard(model, **kw)
    return _sum_gradients(model)


def _sum_gradients(model: nn.Module) -> nn.Module:
    """Every unit's gradients SUMMED across processes, in a plain SUM reduce-scatter (gloo has no pre-multiplied
    sum): the per-process losses are already normalized by the whole batch."""
    from torch.distributed.fsdp import FSDPModule

    for unit in model.modules():
        if isinstance(unit, FSDPModule):
            unit.set_gradient_divide_factor(1.0)
            unit.set_force_sum_reduction_for_comms(True)
    return model


def _dtensor_type():
    from torch.distributed.tensor import DTensor

    return DTensor


@contextlib.contextmanager
def full_weights(model: nn.Module, is_main: bool) -> Iterator[None]:
    """Within the block the main process's `model` holds its full, plain parameters (gathered from every
    process), so `state_dict()` and `save_pretrained` see the model a single process trains; the sharded
    parameters are put back after. Every process must enter (the gathers are collective)."""
    from torch.distributed.fsdp import FSDPModule

    # Every unit back to its sharded state first: a unit left gathered after a forward pass (the root is)
    # would otherwise put its sharded parameters back when `state_dict()` is called inside the block.
    for unit in model.modules():
        if isinstance(unit, FSDPModule):
            unit.reshard()
    dtensor = _dtensor_type()
    swapped: list[tuple[nn.Module, str, nn.Parameter]] = []
    full: dict[int, nn.Parameter] = {}  # by the sharded parameter's id: a tied weight stays one tensor
    for module in model.modules():
        for name, param in list(module._parameters.items()):
            if not isinstance(param, dtensor):
                continue
            if id(param) not in full:
                full[id(param)] = nn.Parameter(
                    param.full_tensor().detach(), requires_grad=param.requires_grad
                )
            if is_main:
                swapped.append((module, name, param))
                module._parameters[name] = full[id(param)]
    try:
        yield
    finally:
        for module, name, param in swapped:
            module._parameters[name] = param


def full_optimizer_state(optimizer: torch.optim.Optimizer) -> dict:
    """`optimizer.state_dict()` with every sharded state tensor gathered whole: the single-process format.
    Every process must call it."""
    dtensor = _dtensor_type()
    sd = optimizer.state_dict()
    sd["state"] = {
        i: {k: v.full_tensor() if isinstance(v, dtensor) else v for k, v in s.items()}
        for i, s in sd["state"].items()
    }
    return sd


def load_full_state(model: nn.Module, optimizer, model_state: dict, optimizer_state: dict) -> None:
    """Load a plain (single-process format) checkpoint into a sharded model and its optimizer: each process
    keeps its shard of every tensor."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
    from torch.distributed.tensor import distribute_tensor

    set_model_state_dict(model, model_state, options=StateDictOptions(full_state_dict=True))
    params = [p for group in optimizer.param_groups for p in group["params"]]
    state = {}
    for i, values in optimizer_state["state"].items():
        p = params[int(i)]
        state[i] = {
            k: distribute_tensor(v.to(p.device), p.device_mesh, p.placements)
            if torch.is_tensor(v) and v.shape == p.shape and v.dim() > 0
            else v
            for k, v in values.items()
        }
    optimizer.load_state_dict({**optimizer_state, "state": state})
