"""Turn a GGUF file (llama.cpp's format) into a normal Hugging Face model directory.

transformers reads GGUF itself (`from_pretrained(dir, gguf_file=name)`, dequantizing to dense weights),
but the model it returns is marked as quantized and refuses `save_pretrained`. So we rebuild a plain
model from the same config and copy the weights over, then save it with the tokenizer rebuilt from the
file's metadata. The result loads with plain `AutoModelForCausalLM.from_pretrained(out_dir)` and never
needs the `gguf` package again.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

from rlhflab.errors import UserError
from rlhflab.models.loading import atomic_output_dir, resolve_dtype

logger = logging.getLogger(__name__)

GGUF_MAGIC = b"GGUF"


def import_gguf(
    gguf_path: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    dtype: str = "float32",
    overwrite: bool = False,
) -> Path:
    """Convert `gguf_path` into an HF causal-LM directory `out_dir` (config, safetensors, tokenizer).

    Args:
        gguf_path: a .gguf file of an architecture transformers can read (llama, mistral, qwen2, gpt2, ...).
        out_dir: the directory to create; written atomically (temp dir + rename).
        dtype: dtype of the saved weights ("float32" | "bfloat16" | "float16"); quantized tensors are
            dequantized, so this is also the working precision of the imported model.
        overwrite: replace an existing `out_dir` that holds a model.

    Returns:
        `out_dir` as a Path.
    """
    path = _check_gguf_file(gguf_path)
    _require_gguf_package()
    torch_dtype = resolve_dtype(dtype)
    if torch_dtype == "auto":
        torch_dtype = torch.float32
    model = _load_dense_model(path, torch_dtype)
    tokenizer = _load_tokenizer(path)
    with atomic_output_dir(out_dir, overwrite=overwrite) as tmp:
        model.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
    logger.info(
        "imported %s (%s, %d parameters) into %s",
        path.name,
        model.config.model_type,
        sum(p.numel() for p in model.parameters()),
        out_dir,
    )
    return Path(out_dir)


def _check_gguf_file(gguf_path: str | os.PathLike) -> Path:
    path = Path(gguf_path).expanduser()
    if not path.exists():
        raise UserError(f"GGUF file '{path}' does not exist")
    if not path.is_file():
        raise UserError(f"'{path}' is a directory; expected a single .gguf file")
    with path.open("rb") as f:
        magic = f.read(4)
    if magic != GGUF_MAGIC:
        raise UserError(
            f"'{path}' is not a GGUF file: it starts with {magic!r}, expected {GGUF_MAGIC!r} "
            "(llama.cpp's model format)"
        )
    return path


def _require_gguf_package() -> None:
    try:
        import gguf  # noqa: F401
    except ImportError as err:
        raise UserError(
            "reading GGUF files needs the `gguf` package: pip install gguf (or pip install 'rlhflab[gguf]')"
        ) from err


def _load_dense_model(path: Path, dtype: torch.dtype):
    """Load through transformers' GGUF reader, then rebuild as an ordinary (saveable) model."""
    from transformers import AutoModelForCausalLM

    try:
        loaded = AutoModelForCausalLM.from_pretrained(
            str(path.parent), gguf_file=path.name, dtype=dtype, local_files_only=True
        )
    except (ValueError, NotImplementedError, KeyError) as err:
        raise UserError(f"transformers could not read '{path}' as a causal LM: {err}") from err
    config = loaded.config
    # The GGUF marker on the config is what makes transformers refuse to save; the weights are dense.
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    state = loaded.state_dict()
    packed = [k for k, v in state.items() if not v.is_floating_point()]
    if packed:
        # Newer transformers can keep quantized blocks packed (uint8) for fast inference; we need dense.
        raise UserError(
            f"'{path}': transformers kept {len(packed)} tensors packed (e.g. {packed[0]}); "
            "cannot convert them to dense weights with this transformers version"
        )
    model.load_state_dict(state, strict=True)
    model.generation_config = loaded.generation_config
    return model.eval()


def _load_tokenizer(path: Path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name, local_files_only=True)
    except (ValueError, KeyError) as err:
        raise UserError(f"transformers could not build a tokenizer from '{path}': {err}") from err
