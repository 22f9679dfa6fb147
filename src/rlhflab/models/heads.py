"""Value heads on HF backbones: a policy with a per-token value head, and a separate critic.

The reward model (backbone + scalar head read at the last real token) lives in `reward_model.py` and is
re-exported here. All of them find "real" tokens through `attention_mask` (1 = a real token), never
through `pad_token_id`: many tokenizers pad with their EOS token, and comparing ids would then drop
the real EOS that ends a response.
"""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from rlhflab.errors import UserError
from rlhflab.models.backbone import (
    backbone_and_head,
    device_of,
    hidden_size_of,
    hidden_to_logits,
    last_token_index,
    position_ids_from_mask,
)
from rlhflab.models.loading import (
    REWARD_HEAD_FILE,
    atomic_output_dir,
    check_model_dir,
    is_adapter_dir,
    load_backbone,
    load_causal_lm,
    write_pretrained,
)
from rlhflab.models.reward_model import RewardModel

logger = logging.getLogger(__name__)

VALUE_HEAD_FILE = "value_head.safetensors"


class ValueHead(nn.Module):
    """Per-token scalar head: hidden [B, T, D] -> values [B, T], computed in float32.

    The head keeps float32 weights whatever the backbone's dtype: value targets are sums of small
    rewards, and bf16's 8-bit mantissa would quantize them coarsely.
    """

    def __init__(self, hidden_size: int):
        super().__init__()
        self.linear = nn.Linear(hidden_size, 1)
        # Small init (std 1/sqrt(D+1), as Ziegler et al. 2019 init their reward head): final hidden
        # states are RMS-normalized to ~unit scale, so initial values are O(1) and the first value-loss
        # gradients do not swamp the policy gradients flowing through a shared trunk.
        nn.init.normal_(self.linear.weight, std=1.0 / math.sqrt(hidden_size + 1))
        nn.init.zeros_(self.linear.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.linear(hidden.to(self.linear.weight.dtype)).squeeze(-1)

    def save(self, path: Path) -> None:
        tensors = {k: v.detach().float().contiguous().cpu() for k, v in self.linear.state_dict().items()}
        save_file(tensors, str(path), metadata={"format": "pt", "hidden_size": str(self.linear.in_features)})

    @classmethod
    def load(cls, path: Path, *, device: torch.device | str = "cpu") -> ValueHead:
        tensors = load_file(str(path))
        if set(tensors) != {"weight", "bias"} or tensors["weight"].ndim != 2:
            raise UserError(
                f"'{path}' is not a value head file (expected tensors 'weight' [1, D] and 'bias' [1])"
            )
        head = cls(tensors["weight"].shape[1])
        head.linear.load_state_dict(tensors)
        return head.to(device)


def _load_value_head(directory: Path, hidden_size: int, device: torch.device, what: str) -> ValueHead:
    file = directory / VALUE_HEAD_FILE
    if not file.is_file():
        logger.info(
            "%s: no %s in %s; starting from a freshly initialized value head",
            what,
            VALUE_HEAD_FILE,
            directory,
        )
        return ValueHead(hidden_size).to(device)
    head = ValueHead.load(file, device=device)
    if head.linear.in_features != hidden_size:
        raise UserError(
            f"{file}: value head expects hidden size {head.linear.in_features}, but the model in "
            f"'{directory}' has hidden size {hidden_size}"
        )
    return head


class PolicyWithValueHead(nn.Module):
    """A causal LM plus a per-token value head on its final hidden states (PPO with a shared trunk).

    Saved as a plain HF causal-LM directory (LoRA merged) with `value_head.safetensors` beside it, so
    the policy reloads with plain `AutoModelForCausalLM.from_pretrained` and the pair with
    `PolicyWithValueHead.from_pretrained`.
    """

    def __init__(self, policy: nn.Module, value_head: ValueHead | None = None):
        super().__init__()
        self.policy = policy
        self.value_head = value_head if value_head is not None else ValueHead(hidden_size_of(policy))
        if device_of(self.value_head) != device_of(policy):
            # Moved only when elsewhere: a sharded head (FSDP), gathered whole to be saved, must not be re-applied.
            self.value_head.to(device_of(policy))

    def hidden_states(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Final (post-norm) hidden states [B, T, D]; the LM head is not applied."""
        base, _ = backbone_and_head(self.policy)
        if position_ids is None:
            position_ids = position_ids_from_mask(attention_mask)
        out = base(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
        )
        return out.last_hidden_state

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """input_ids, attention_mask [B, T] -> (logits [B, T, V], values [B, T] float32)."""
        hidden = self.hidden_states(input_ids, attention_mask, position_ids)
        _, head = backbone_and_head(self.policy)
        return hidden_to_logits(self.policy, head, hidden), self.value_head(hidden)

    def save_pretrained(self, out_dir: str | os.PathLike, tokenizer=None, *, merge_lora: bool = True) -> Path:
        with atomic_output_dir(out_dir) as tmp:
            write_pretrained(self.policy, tmp, merge_lora=merge_lora)
            self.value_head.save(tmp / VALUE_HEAD_FILE)
            if tokenizer is not None:
                tokenizer.save_pretrained(str(tmp))
        return Path(out_dir)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, **load_kwargs) -> PolicyWithValueHead:
        """Load the policy with `load_causal_lm(path, **load_kwargs)` and the value head beside it.

        A plain causal-LM directory (e.g. the SFT model) gets a fresh value head.
        """
        policy = load_causal_lm(path, **load_kwargs)
        head = _load_value_head(Path(path), hidden_size_of(policy), device_of(policy), "policy")
        return cls(policy, head)


class Critic(nn.Module):
    """A separate value model: its own backbone (no LM head) + a per-token value head.

    Saved as a backbone directory (`AutoModel`-loadable) with `value_head.safetensors` beside it.
    """

    def __init__(self, backbone: nn.Module, value_head: ValueHead | None = None):
        super().__init__()
        self.backbone = backbone
        self.value_head = value_head if value_head is not None else ValueHead(hidden_size_of(backbone))
        self.value_head.to(device_of(backbone))

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor | None = None
    ) -> torch.Tensor:
        """input_ids, attention_mask [B, T] -> values [B, T] float32 (garbage at padded positions)."""
        if position_ids is None:
            position_ids = position_ids_from_mask(attention_mask)
        out = self.backbone(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
        )
        return self.value_head(out.last_hidden_state)

    def save_pretrained(self, out_dir: str | os.PathLike, tokenizer=None) -> Path:
        with atomic_output_dir(out_dir) as tmp:
            write_pretrained(self.backbone, tmp, merge_lora=True)
            self.value_head.save(tmp / VALUE_HEAD_FILE)
            if tokenizer is not None:
                tokenizer.save_pretrained(str(tmp))
        return Path(out_dir)

    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike,
        *,
        head_index: int = 0,
        dtype="float32",
        device="cpu",
        trust_remote_code: bool = False,
    ) -> Critic:
        """Load a critic from a critic, reward-model or causal-LM directory.

        A critic directory reloads exactly. A reward-model directory (`*ForSequenceClassification`)
        gives its backbone and reward head number `head_index` as the value head (InstructGPT initializes
        the value function from the reward model). A causal-LM directory gives its backbone and a
        fresh head.
        """
        p = Path(path).expanduser() if is_adapter_dir(path) else check_model_dir(path, what="critic")
        backbone = load_backbone(p, dtype=dtype, device=device, trust_remote_code=trust_remote_code)
        hidden, dev = hidden_size_of(backbone), device_of(backbone)
        if (p / VALUE_HEAD_FILE).is_file():
            return cls(backbone, _load_value_head(p, hidden, dev, "critic"))
        score = _reward_head_weight(p)
        if score is None:
            return cls(backbone, _load_value_head(p, hidden, dev, "critic"))
        if not 0 <= head_index < score.shape[0]:
            raise UserError(
                f"reward model '{p}' has {score.shape[0]} heads; head_index={head_index} is out of range"
            )
        head = ValueHead(hidden).to(dev)
        with torch.no_grad():
            head.linear.weight.copy_(score[head_index : head_index + 1])
            head.linear.bias.zero_()
        logger.info("critic: value head initialized from reward head %d of %s", head_index, p)
        return cls(backbone, head)


def _reward_head_weight(directory: Path) -> torch.Tensor | None:
    """The `score.weight` [H, D] of a saved reward model (a `*ForSequenceClassification` directory, or heads in
    reward_head.safetensors beside a backbone or its LoRA adapter), else None."""
    if (directory / REWARD_HEAD_FILE).is_file():
        with safe_open(str(directory / REWARD_HEAD_FILE), framework="pt") as f:
            return f.get_tensor("weight").float()
    config = json.loads((directory / "config.json").read_text())
    if not any(a.endswith("ForSequenceClassification") for a in config.get("architectures") or []):
        return None
    for file in sorted(directory.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:  # reads only the one tensor, not the whole model
            if "score.weight" in f.keys():  # noqa: SIM118  (safe_open has keys(), not __contains__)
                return f.get_tensor("score.weight").float()
    return None


__all__ = [
    "VALUE_HEAD_FILE",
    "Critic",
    "PolicyWithValueHead",
    "RewardModel",
    "ValueHead",
    "backbone_and_head",
    "hidden_to_logits",
    "last_token_index",
    "position_ids_from_mask",
]
