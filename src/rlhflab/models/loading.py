"""Loading and saving Hugging Face causal LMs and tokenizers from local directories.

Everything here reads local files only (`local_files_only=True`): a typo in a path must say so at once,
not turn into a hub download or a network timeout. Everything that writes a model writes it to a
temporary directory beside the target and renames it into place, so an interrupted save never leaves a
half-written checkpoint that a later run would load.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from rlhflab.errors import ConfigError, UserError

logger = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# A reward model's head beside its backbone: for architectures without a *ForSequenceClassification class, and
# in a reward model saved as a LoRA adapter (whose adapter then sits on the backbone, not on a causal LM).
REWARD_HEAD_FILE = "reward_head.safetensors"


@dataclass
class LoraSettings:
    """LoRA adapters (Hu et al. 2021) on a frozen base model, through PEFT.

    Attributes:
        r: rank of each adapter pair (A: r x in, B: out x r).
        alpha: scaling numerator; the update is (alpha / r) * B @ A.
        dropout: dropout on the adapter input during training.
        target_modules: "all-linear" (every linear layer except the output head) or a list of module
            names such as ["q_proj", "v_proj"].
    """

    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: str | list[str] = "all-linear"

    def __post_init__(self) -> None:
        if self.r < 1:
            raise ConfigError(f"lora.r must be a positive integer, got {self.r}")
        if self.alpha <= 0:
            raise ConfigError(f"lora.alpha must be positive, got {self.alpha}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"lora.dropout must be in [0, 1), got {self.dropout}")
        if isinstance(self.target_modules, str) and self.target_modules != "all-linear":
            self.target_modules = [self.target_modules]


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype | str:
    """A torch dtype from "float32" | "bfloat16" | "float16" | "auto" ("auto" is passed to HF as is)."""
    if isinstance(dtype, torch.dtype) or dtype == "auto":
        return dtype
    if dtype not in DTYPES:
        raise ConfigError(f"unknown dtype {dtype!r}; expected one of {[*DTYPES, 'auto']}")
    return DTYPES[dtype]


def resolve_device(device: str | torch.device, *, field: str = "device") -> torch.device:
    """A torch device from "cpu" | "cuda" | "cuda:N" | "mps" | "auto" (CUDA when available, else CPU).

    `field` names the setting in error messages (e.g. "config: model.device").
    """
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ConfigError(
            f"{field} {device!r} is not a device; use 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps'"
        ) from err
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"{field} is {device!r} but no CUDA device is available; use 'cpu' or 'auto'")
    return dev


def check_model_dir(path: str | os.PathLike, *, what: str = "model") -> Path:
    """The path as a `Path` if it is a local HF model directory (has config.json), else a `UserError`."""
    p = Path(path).expanduser()
    if not p.exists():
        raise UserError(
            f"{what} path '{p}' does not exist. Expected a local Hugging Face model directory "
            "(config.json + weights); models are never downloaded, so a hub name will not work "
            "(use `rlhflab import-gguf` or a directory saved with save_pretrained)."
        )
    if not p.is_dir():
        hint = (
            " For a .gguf file, convert it first with `rlhflab import-gguf FILE OUT_DIR`."
            if p.suffix == ".gguf"
            else ""
        )
        raise UserError(f"{what} path '{p}' is a file; expected a Hugging Face model directory.{hint}")
    if not (p / "config.json").is_file():
        extra = (
            " It has adapter_config.json: this is a LoRA adapter directory; give the merged model (a stage run "
            "with model.lora.merge=true) or load it with load_causal_lm."
            if (p / "adapter_config.json").is_file()
            else ""
        )
        raise UserError(
            f"{what} directory '{p}' has no config.json, so it is not a Hugging Face model directory. "
            f"Expected the output of save_pretrained (config.json + *.safetensors).{extra}"
        )
    return p


def is_adapter_dir(path: str | os.PathLike) -> bool:
    """True for a saved PEFT adapter directory (adapter_config.json and no config.json of its own)."""
    p = Path(path).expanduser()
    return (p / "adapter_config.json").is_file() and not (p / "config.json").is_file()


def adapter_base(path: str | os.PathLike) -> Path:
    """The base model directory a saved adapter names (`base_model_name_or_path`), checked to exist."""
    import json

    p = Path(path).expanduser()
    try:
        base = json.loads((p / "adapter_config.json").read_text()).get("base_model_name_or_path")
    except (OSError, ValueError) as err:
        raise UserError(f"could not read '{p / 'adapter_config.json'}': {err}") from None
    if not base or not Path(base).expanduser().is_dir():
        raise UserError(
            f"LoRA adapter directory '{p}' names base model {base!r}, which is not a local directory; "
            "set base_model_name_or_path in its adapter_config.json to the base model's directory, or use a "
            "merged model (model.lora.merge=true)."
        )
    return Path(base).expanduser()


def model_dir_config(path: str | os.PathLike, *, what: str = "model") -> Path:
    """The config.json that describes a model directory: its own, or for a LoRA adapter directory that of
    the plain model at the end of its chain of bases (an adapter may be trained on top of another)."""
    p, seen = Path(path).expanduser(), set()
    while is_adapter_dir(p):
        if p.resolve() in seen:
            raise UserError(f"LoRA adapter directory '{path}' names itself as its base (through '{p}')")
        seen.add(p.resolve())
        p = adapter_base(p)
    return check_model_dir(p, what=what) / "config.json"


def load_tokenizer(path: str | os.PathLike, *, padding_side: str = "right", trust_remote_code: bool = False):
    """Load a tokenizer from a local directory and make sure it can pad.

    A tokenizer without a pad token gets its EOS token as pad. That is safe here because every
    rlhflab computation marks real tokens with the attention mask, never by comparing ids with
    `pad_token_id` (which would drop a real final EOS).
    """
    from transformers import AutoTokenizer

    p = Path(path).expanduser()
    if not p.is_dir():
        raise UserError(
            f"tokenizer path '{p}' is not a directory; expected a local model/tokenizer directory "
            "(tokenizer.json or tokenizer_config.json)."
        )
    try:
        tok = AutoTokenizer.from_pretrained(
            str(p), local_files_only=True, trust_remote_code=trust_remote_code
        )
    except (OSError, ValueError) as err:
        raise UserError(
            f"could not load a tokenizer from '{p}': {err}. Expected tokenizer.json / "
            "tokenizer_config.json as written by tokenizer.save_pretrained."
        ) from err
    if tok.pad_token is None:
        if tok.eos_token is not None:
            tok.pad_token = tok.eos_token
            logger.info(
                "tokenizer in %s has no pad token; using its EOS token %r (id %d) for padding",
                p,
                tok.eos_token,
                tok.eos_token_id,
            )
        elif tok.unk_token is not None:
            tok.pad_token = tok.unk_token
            logger.info(
                "tokenizer in %s has neither pad nor EOS token; padding with UNK %r", p, tok.unk_token
            )
        else:
            raise UserError(
                f"tokenizer in '{p}' has no pad, EOS or UNK token to pad with; "
                "add one (tokenizer.add_special_tokens({'pad_token': ...})) and save it again."
            )
    tok.padding_side = padding_side
    return tok


def load_causal_lm(
    path: str | os.PathLike,
    *,
    dtype: str | torch.dtype = "float32",
    device: str | torch.device = "cpu",
    lora: LoraSettings | None = None,
    gradient_checkpointing: bool = False,
    trust_remote_code: bool = False,
):
    """Load a HF causal LM from a local directory (or a LoRA adapter directory saved beside its base).

    Args:
        path: directory with config.json + weights, or with adapter_config.json (a saved PEFT adapter;
            its base is read from `base_model_name_or_path`, itself possibly an adapter directory, which is
            folded in; without `lora` the adapter stays trainable).
        dtype: "float32" | "bfloat16" | "float16" | "auto" (the dtype recorded in config.json).
        device: "cpu" | "cuda" | "cuda:N" | "mps" | "auto".
        lora: wrap the model in fresh LoRA adapters (on top of a saved adapter folded in); only the adapters
            are trainable, and their saved `base_model_name_or_path` is the absolute `path`.
        gradient_checkpointing: recompute activations in backward to save memory.
        trust_remote_code: allow custom modelling code shipped in the directory.

    Returns:
        A `PreTrainedModel` (or a `peft.PeftModel` with LoRA) on `device`.
    """
    from transformers import AutoModelForCausalLM

    p = Path(path).expanduser()
    kwargs = {"dtype": dtype, "device": device, "trust_remote_code": trust_remote_code}
    if is_adapter_dir(p):
        if lora is None:
            return _load_adapter_dir(p, gradient_checkpointing=gradient_checkpointing, **kwargs)
        # Fresh adapters go on top of the saved one folded in: the new adapter is a delta from this directory's
        # model, which is also what a reference model loaded from it computes.
        model = _load_adapter_dir(p, trainable=False, **kwargs).merge_and_unload()
    else:
        p = check_model_dir(p)
        try:
            model = AutoModelForCausalLM.from_pretrained(
                str(p),
                dtype=resolve_dtype(dtype),
                local_files_only=True,
                trust_remote_code=trust_remote_code,
            )
        except (OSError, ValueError) as err:
            raise UserError(f"could not load a causal LM from '{p}': {err}") from err
        model.to(resolve_device(device))
    if gradient_checkpointing:
        enable_gradient_checkpointing(model)
    if lora is not None:
        model = apply_lora(model, lora)
        # The adapter is saved as a delta from this directory: record it absolutely, so the adapter loads from
        # any working directory (PEFT would record the config's _name_or_path, the base of a chain).
        model.peft_config["default"].base_model_name_or_path = str(p.resolve())
    return model


def load_inference_lm(path: str | os.PathLike, **kwargs):
    """`load_causal_lm(path, **kwargs)` for sampling and scoring only: a LoRA adapter directory comes back with its
    adapter folded in (a plain model: no adapter overhead in each forward), in eval mode, without gradients."""
    model = load_causal_lm(path, **kwargs)
    if is_peft_model(model):
        model = model.merge_and_unload()
    return model.eval().requires_grad_(False)


def load_backbone(
    path: str | os.PathLike,
    *,
    dtype: str | torch.dtype = "float32",
    device: str | torch.device = "cpu",
    trust_remote_code: bool = False,
):
    """The base transformer of a local HF model directory (`AutoModel`: no LM or classification head).

    Works on a causal-LM, a sequence-classification or a bare-backbone directory: HF drops the
    head weights and strips the base-model prefix ("model.", "transformer.") from the keys. From a LoRA
    adapter directory: the transformer of the model with the adapter folded in.
    """
    from transformers import AutoModel

    if is_adapter_dir(path):
        return _adapter_backbone(
            Path(path).expanduser(), dtype=dtype, device=device, trust_remote_code=trust_remote_code
        )
    p = check_model_dir(path)
    try:
        model = AutoModel.from_pretrained(
            str(p), dtype=resolve_dtype(dtype), local_files_only=True, trust_remote_code=trust_remote_code
        )
    except (OSError, ValueError) as err:
        raise UserError(f"could not load a model backbone from '{p}': {err}") from err
    return model.to(resolve_device(device))


def _load_adapter_dir(
    p: Path,
    *,
    dtype,
    device,
    trust_remote_code: bool,
    gradient_checkpointing: bool = False,
    trainable: bool = True,
):
    """A saved adapter on its base; a base that is itself an adapter directory is loaded and folded in first."""
    from peft import PeftModel

    model_dir_config(p)  # a missing base or a cycle in the chain: a clear error before anything loads
    base = load_causal_lm(
        adapter_base(p),
        dtype=dtype,
        device=device,
        gradient_checkpointing=gradient_checkpointing,
        trust_remote_code=trust_remote_code,
    )
    if is_peft_model(base):
        base = base.merge_and_unload()
    return PeftModel.from_pretrained(base, str(p), is_trainable=trainable)


def _adapter_backbone(p: Path, *, dtype, device, trust_remote_code: bool):
    """The transformer of an adapter directory, the adapter folded in: a reward model's adapter (saved from its
    backbone, the head file beside it) goes on the base's backbone, a policy's on the base causal LM."""
    from peft import PeftModel

    kwargs = {"dtype": dtype, "device": device, "trust_remote_code": trust_remote_code}
    if (p / REWARD_HEAD_FILE).is_file():
        return PeftModel.from_pretrained(load_backbone(adapter_base(p), **kwargs), str(p)).merge_and_unload()
    causal = load_causal_lm(p, **kwargs).merge_and_unload()
    return getattr(causal, causal.base_model_prefix)


def enable_gradient_checkpointing(model: nn.Module) -> None:
    """Turn on activation recomputation; the KV cache is useless in training and conflicts with it."""
    kwargs = {"use_reentrant": False}  # the reentrant variant needs inputs with requires_grad
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x name
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    if getattr(model, "config", None) is not None:
        model.config.use_cache = False


def apply_lora(model: nn.Module, settings: LoraSettings):
    """Wrap `model` in fresh LoRA adapters: the base weights are frozen, only adapters train.

    B starts at zero (PEFT's default), so the wrapped model computes exactly what the base did.
    """
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=settings.r,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=settings.target_modules,
        bias="none",
    )
    checkpointing = getattr(model, "is_activation_checkpointing", None)
    if checkpointing is None:  # transformers < 5.x spells it is_gradient_checkpointing
        checkpointing = getattr(model, "is_gradient_checkpointing", False)
    if checkpointing:
        # Frozen embeddings output tensors without grad, which would cut the checkpointed graph.
        model.enable_input_require_grads()
    return get_peft_model(model, config)


def is_peft_model(model: nn.Module) -> bool:
    try:
        from peft import PeftModel
    except ImportError:
        return False
    return isinstance(model, PeftModel)


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters (tied weights counted once; a ZeRO-3 partitioned parameter by its whole size)."""
    return sum(
        getattr(p, "ds_numel", p.numel()) for p in model.parameters() if p.requires_grad or not trainable_only
    )


@torch.no_grad()
def merged_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict of the base model with LoRA adapters folded in (W + alpha/r * B @ A).

    Unlike PEFT's `merge_and_unload`, this leaves `model` untouched, so a checkpoint can be saved in
    the middle of training and training can go on with the adapters.
    """
    base = model.get_base_model()
    lora_layers = {
        name: mod
        for name, mod in base.named_modules()
        if hasattr(mod, "get_delta_weight") and hasattr(mod, "base_layer")
    }
    for name, mod in lora_layers.items():
        if any(mod.use_dora.get(a, False) for a in mod.active_adapters):
            raise NotImplementedError(
                f"merging DoRA adapters ({name}) is not supported; use merge_and_unload"
            )
    out: dict[str, torch.Tensor] = {}
    for key, value in base.state_dict().items():
        if ".lora_" in key or ".original_module." in key:
            continue
        key = key.replace(".base_layer.", ".")
        for adapter in getattr(model, "active_adapters", ["default"]):
            key = key.replace(f".modules_to_save.{adapter}.", ".")
        out[key] = value
    for name, mod in lora_layers.items():
        weight = mod.base_layer.weight.detach().clone()
        if not mod.merged:  # a merged layer already holds the sum in its base weight
            for adapter in mod.active_adapters:
                if adapter in mod.lora_A:
                    weight += mod.get_delta_weight(adapter).to(weight.dtype)
        out[f"{name}.weight"] = weight
    return out


@contextlib.contextmanager
def atomic_output_dir(out_dir: str | os.PathLike, *, overwrite: bool = True) -> Iterator[Path]:
    """Yield a fresh temporary directory that replaces `out_dir` when the block succeeds.

    The temp directory sits beside `out_dir` (same filesystem), so the final step is a rename. An
    existing `out_dir` is replaced only if `overwrite` and it is empty or holds a model (config.json),
    so a mistyped path never wipes an unrelated directory. On error the temp directory is removed
    and `out_dir` is left as it was.
    """
    out = Path(out_dir).expanduser()
    if out.exists():
        if not out.is_dir():
            raise UserError(f"output path '{out}' exists and is a file; expected a directory path")
        occupied = any(out.iterdir())
        if occupied and not overwrite:
            raise UserError(
                f"output directory '{out}' already exists and is not empty; "
                "choose a new directory or remove it first"
            )
        if occupied and not ((out / "config.json").exists() or (out / "adapter_config.json").exists()):
            raise UserError(
                f"output directory '{out}' is not empty and does not hold a saved model; "
                "refusing to replace it. Choose a new or empty directory."
            )
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
        old = None
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.replace(out, old / out.name)
        os.replace(tmp, out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def save_model(model: nn.Module, tokenizer, out_dir: str | os.PathLike, *, merge_lora: bool = True) -> Path:
    """Save a causal LM (and its tokenizer) as a plain HF directory, atomically.

    Args:
        model: a `PreTrainedModel` or a `peft.PeftModel`.
        tokenizer: saved beside the model when not None.
        out_dir: target directory; replaced if it already holds a model.
        merge_lora: for a PEFT model, fold the adapters into the weights so that plain
            `AutoModelForCausalLM.from_pretrained(out_dir)` loads it (the live model keeps its adapters);
            with False only the adapter is written (load it back with `load_causal_lm`).

    Returns:
        The output directory.
    """
    with atomic_output_dir(out_dir) as tmp:
        write_pretrained(model, tmp, merge_lora=merge_lora)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
    return Path(out_dir)


def write_pretrained(model: nn.Module, directory: Path, *, merge_lora: bool = True) -> None:
    """`save_pretrained` into an existing directory, folding LoRA adapters in when asked."""
    if is_peft_model(model) and merge_lora:
        model.get_base_model().save_pretrained(str(directory), state_dict=merged_state_dict(model))
    else:
        model.save_pretrained(str(directory))


def plain_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's state dict in its plain (non-PEFT) key names, with any LoRA adapters folded in."""
    return merged_state_dict(model) if is_peft_model(model) else model.state_dict()
