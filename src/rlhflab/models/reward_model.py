"""Reward model: a HF backbone plus a linear head with one output per reward, read at the last real token.

Saved as the architecture's `*ForSequenceClassification` (num_labels = number of heads, `score.weight`
= our head), so plain `AutoModelForSequenceClassification.from_pretrained(dir)` loads it. Head names go
in `id2label`, whitening statistics in `rlhflab_reward_mean` / `rlhflab_reward_std`.

One difference remains on purpose. HF's sequence-classification forward pools at the last token whose
id is not `pad_token_id`; when the tokenizer pads with EOS (common) and a response ends with a real EOS,
HF reads the token before it. `RewardModel` reads the last position where `attention_mask` is 1, which is
the real EOS. Weights are identical; only that pooling rule differs.
"""

from __future__ import annotations

import copy
import json
import math
import os
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from rlhflab.errors import UserError
from rlhflab.models.backbone import (
    backbone_and_head,
    hidden_size_of,
    last_token_index,
    position_ids_from_mask,
)
from rlhflab.models.final_layer import final_layer_only_at
from rlhflab.models.loading import (
    REWARD_HEAD_FILE,
    LoraSettings,
    adapter_base,
    apply_lora,
    atomic_output_dir,
    check_model_dir,
    is_adapter_dir,
    is_peft_model,
    load_backbone,
    plain_state_dict,
    resolve_device,
    resolve_dtype,
    write_pretrained,
)

MEAN_KEY, STD_KEY = "rlhflab_reward_mean", "rlhflab_reward_std"
# In config.json of a general preference model (`rlhflab.models.preference_model`): its settings. The weights are
# a one-head reward model's, so the key is what tells the two apart.
PREFERENCE_MODEL_KEY = "rlhflab_preference_model"


class RewardModel(nn.Module):
    """Backbone (no LM head) + linear head [D -> num_heads]: one scalar per reward per sequence.

    Several heads share one backbone (e.g. helpfulness and safety, as Llama 2 trains two reward models;
    here they can also share a trunk). Optional per-head whitening statistics let a stage feed
    zero-mean, unit-variance rewards to RL (Llama 2 whitens its rewards).
    """

    def __init__(
        self,
        backbone: nn.Module,
        num_heads: int = 1,
        head_names: Sequence[str] | None = None,
        *,
        score: nn.Linear | None = None,
    ):
        super().__init__()
        if num_heads < 1:
            raise UserError(f"a reward model needs at least one head, got num_heads={num_heads}")
        names = (
            list(head_names)
            if head_names is not None
            else (["reward"] if num_heads == 1 else [f"reward_{i}" for i in range(num_heads)])
        )
        if len(names) != num_heads or len(set(names)) != num_heads:
            raise UserError(f"head_names must be {num_heads} distinct names, got {names}")
        self.backbone = backbone
        self.head_names = names
        hidden = hidden_size_of(backbone)
        param = next(backbone.parameters())
        if score is None:
            score = nn.Linear(hidden, num_heads, bias=False, dtype=param.dtype)
            # std 1/sqrt(D+1) as in Ziegler et al. 2019: initial rewards are O(1) on unit-RMS hidden states,
            # so the first Bradley-Terry losses sit near log 2 instead of saturating.
            nn.init.normal_(score.weight, std=1.0 / math.sqrt(hidden + 1))
        if tuple(score.weight.shape) != (num_heads, hidden):
            raise UserError(
                f"reward head has shape {tuple(score.weight.shape)}, expected ({num_heads}, {hidden})"
            )
        self.score = score.to(param.device)
        self.register_buffer("reward_mean", torch.zeros(num_heads, device=param.device), persistent=False)
        self.register_buffer("reward_std", torch.ones(num_heads, device=param.device), persistent=False)

    @property
    def num_heads(self) -> int:
        return len(self.head_names)

    @property
    def config(self):
        return self.backbone.config

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        *,
        normalize: bool = False,
    ) -> torch.Tensor:
        """input_ids, attention_mask [B, T] (any padding side) -> rewards [B, num_heads] float32.

        With `normalize`, rewards are whitened per head with the stored mean/std.
        """
        if position_ids is None:
            position_ids = position_ids_from_mask(attention_mask)
        hidden = self.backbone(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
        ).last_hidden_state
        last = last_token_index(attention_mask)
        # Pool before the head: the head then runs on B rows instead of B * T.
        pooled = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
        rewards = self.score(pooled).float()
        if normalize:
            rewards = (rewards - self.reward_mean) / self.reward_std
        return rewards

    def token_rewards(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Every head's score at every position: [B, T, num_heads] float32 (any padding side; padded positions
        hold scores that mean nothing). A process reward model reads its verdict on each step there."""
        hidden = self.backbone(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids_from_mask(attention_mask),
            use_cache=False,
        ).last_hidden_state
        return self.score(hidden).float()

    def rewards_at(
        self,
        input_ids: torch.Tensor,
        attention_mask_4d: torch.Tensor,
        position_ids: torch.Tensor,
        rows: torch.Tensor,
        positions: torch.Tensor,
    ) -> torch.Tensor:
        """Rewards read at chosen positions of rows that hold several sequences, e.g. one prompt and its K
        responses (`rlhflab.data.packing.collate_shared_prompt`).

        input_ids, position_ids [B, T]; attention_mask_4d [B, 1, T, T] additive (0 = may attend) in the
        model's dtype; rows, positions [N]: where each of N sequences ends. Returns [N, num_heads] float32.
        """
        hidden = self.backbone(
            input_ids=input_ids, attention_mask=attention_mask_4d, position_ids=position_ids, use_cache=False
        ).last_hidden_state
        return self.score(hidden[rows, positions]).float()

    def reward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        head: int | str = 0,
        *,
        normalize: bool = False,
    ) -> torch.Tensor:
        """One head's rewards [B] float32; `head` is an index or a name from `head_names`."""
        return self(input_ids, attention_mask, normalize=normalize)[:, self.head_index(head)]

    def head_index(self, head: int | str) -> int:
        if isinstance(head, str):
            if head not in self.head_names:
                raise UserError(f"unknown reward head {head!r}; this model has {self.head_names}")
            return self.head_names.index(head)
        if not 0 <= head < self.num_heads:
            raise UserError(f"reward head index {head} out of range for {self.num_heads} heads")
        return head

    def set_normalization(
        self, mean: Sequence[float] | torch.Tensor, std: Sequence[float] | torch.Tensor
    ) -> None:
        """Store per-head whitening statistics (each of length num_heads; std > 0)."""
        mean_t = torch.as_tensor(mean, dtype=torch.float32).reshape(-1)
        std_t = torch.as_tensor(std, dtype=torch.float32).reshape(-1)
        if mean_t.numel() != self.num_heads or std_t.numel() != self.num_heads:
            raise UserError(
                f"normalization needs {self.num_heads} means and stds, got {mean_t.numel()} "
                f"and {std_t.numel()}"
            )
        if not bool((std_t > 0).all()):
            raise UserError(f"reward std must be positive, got {std_t.tolist()}")
        self.reward_mean.copy_(mean_t)
        self.reward_std.copy_(std_t)

    def fit_normalization(
        self, rewards: torch.Tensor, eps: float = 1e-6
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Set the whitening statistics from raw rewards [N, num_heads] (or [N] for one head)."""
        r = rewards.detach().float().reshape(rewards.shape[0], -1)
        mean, std = r.mean(dim=0), r.std(dim=0, unbiased=False).clamp_min(eps)
        self.set_normalization(mean, std)
        return mean, std

    @classmethod
    def from_causal_lm(
        cls,
        path_or_model: str | os.PathLike | nn.Module,
        num_heads: int = 1,
        head_names: Sequence[str] | None = None,
        *,
        dtype="float32",
        device="cpu",
        lora: LoraSettings | None = None,
        trust_remote_code: bool = False,
    ) -> RewardModel:
        """A reward model initialized from a causal LM (typically the SFT model), with fresh heads.

        From a path, only the backbone is loaded (the LM head's weights are never materialized). From a
        model object, its backbone is taken as is: it shares parameters with that model, so train a
        copy if the original is still needed. `lora` puts LoRA adapters on the backbone; the heads
        stay fully trainable.
        """
        if isinstance(path_or_model, nn.Module):
            if is_peft_model(path_or_model):
                raise UserError(
                    "from_causal_lm needs a plain model; merge its LoRA adapters first "
                    "(model.merge_and_unload()) or pass the saved model's path"
                )
            backbone, _ = backbone_and_head(path_or_model)
            backbone.to(device=resolve_device(device))
        else:
            backbone = load_backbone(
                path_or_model, dtype=dtype, device=device, trust_remote_code=trust_remote_code
            )
        if lora is not None:
            backbone = apply_lora(backbone, lora)
            if not isinstance(path_or_model, nn.Module):  # saved as a delta from this directory's backbone
                base = str(Path(path_or_model).expanduser().resolve())
                backbone.peft_config["default"].base_model_name_or_path = base
        return cls(backbone, num_heads, head_names)

    def save_pretrained(
        self,
        out_dir: str | os.PathLike,
        tokenizer=None,
        *,
        extra_config: dict | None = None,
        merge_lora: bool = True,
    ) -> Path:
        """Write a `*ForSequenceClassification` directory (LoRA merged) that plain transformers loads.
        `extra_config`: keys added to its config.json (written in the same atomic step). With LoRA and not
        `merge_lora`: the backbone's adapter alone (PEFT format; its base is the causal LM the reward model
        started from) and the heads in reward_head.safetensors."""
        base = self.backbone.get_base_model() if is_peft_model(self.backbone) else self.backbone
        seq_cls = _sequence_classification_class(base.config)
        adapter = is_peft_model(self.backbone) and not merge_lora
        if adapter and extra_config:
            raise ValueError("extra_config needs a config.json: save with merge_lora=True")
        with atomic_output_dir(out_dir) as tmp:
            if adapter:
                self.backbone.save_pretrained(str(tmp))
                self._save_head(tmp)
            elif seq_cls is None:
                write_pretrained(self.backbone, tmp, merge_lora=True)
                self._save_head(tmp)
            else:
                config = copy.deepcopy(base.config)
                config.architectures = [seq_cls.__name__]
                config.num_labels = self.num_heads
                config.id2label = dict(enumerate(self.head_names))
                config.label2id = {n: i for i, n in enumerate(self.head_names)}
                config.problem_type = "regression"  # so HF's own loss, if used, is not cross-entropy
                for key, value in self._head_meta().items():
                    setattr(config, key, value)
                if config.pad_token_id is None and tokenizer is not None:
                    config.pad_token_id = tokenizer.pad_token_id  # HF's seq-cls refuses batches without one
                config.save_pretrained(str(tmp))
                tensors = {
                    f"{seq_cls.base_model_prefix}.{k}": v for k, v in plain_state_dict(self.backbone).items()
                }
                tensors["score.weight"] = self.score.weight
                save_file(_unshared_cpu(tensors), str(tmp / "model.safetensors"), metadata={"format": "pt"})
            if tokenizer is not None:
                tokenizer.save_pretrained(str(tmp))
            if extra_config:
                config_file = tmp / "config.json"
                config_file.write_text(
                    json.dumps({**json.loads(config_file.read_text()), **extra_config}, indent=2) + "\n"
                )
        return Path(out_dir)

    def _save_head(self, directory: Path) -> None:
        save_file(
            {"weight": self.score.weight.detach().contiguous().cpu()},
            str(directory / REWARD_HEAD_FILE),
            metadata={"format": "pt", "rlhflab": json.dumps(self._head_meta())},
        )

    def _head_meta(self) -> dict:
        return {
            "head_names": self.head_names,
            MEAN_KEY: self.reward_mean.tolist(),
            STD_KEY: self.reward_std.tolist(),
        }

    @classmethod
    def from_pretrained(
        cls, path: str | os.PathLike, *, dtype="float32", device="cpu", trust_remote_code: bool = False
    ) -> RewardModel:
        """Reload a reward model written by `save_pretrained` (or any HF `*ForSequenceClassification`)."""
        if is_adapter_dir(path):  # a LoRA reward model saved as its adapter
            return cls.load_weights(path, dtype=dtype, device=device, trust_remote_code=trust_remote_code)
        p = check_model_dir(path, what="reward model")
        if PREFERENCE_MODEL_KEY in json.loads((p / "config.json").read_text()):
            raise UserError(
                f"'{p}' is a general preference model (from `rlhflab pm`): it compares two responses and gives "
                "no score to one; ask it as a feedback source (algo.feedback=preference_model "
                f"algo.preference_model={p}) or give a reward model from `rlhflab rm`"
            )
        return cls.load_weights(p, dtype=dtype, device=device, trust_remote_code=trust_remote_code)

    @classmethod
    def load_weights(
        cls, path: str | os.PathLike, *, dtype="float32", device="cpu", trust_remote_code: bool = False
    ) -> RewardModel:
        """The backbone and heads of a directory `save_pretrained` wrote, whatever the model is used as (a
        general preference model is one such directory); `from_pretrained` is the checked entry point."""
        if is_adapter_dir(path):
            p = Path(path).expanduser()
            if not (p / REWARD_HEAD_FILE).is_file():
                raise UserError(
                    f"'{p}' is a LoRA adapter of a causal LM, not a reward model: it has no {REWARD_HEAD_FILE}; "
                    "give the directory `rlhflab rm` wrote"
                )
            adapter_base(p)  # a clear error when the base is gone
            return cls._with_head(
                p, load_backbone(p, dtype=dtype, device=device, trust_remote_code=trust_remote_code)
            )
        p = check_model_dir(path, what="reward model")
        config = json.loads((p / "config.json").read_text())
        if any(a.endswith("ForSequenceClassification") for a in config.get("architectures") or []):
            return cls._from_sequence_classification(
                p, dtype=dtype, device=device, trust_remote_code=trust_remote_code
            )
        if (p / REWARD_HEAD_FILE).is_file():
            return cls._with_head(
                p, load_backbone(p, dtype=dtype, device=device, trust_remote_code=trust_remote_code)
            )
        raise UserError(
            f"'{p}' is not a reward model directory (architectures={config.get('architectures')}); "
            "to start a reward model from a causal LM use RewardModel.from_causal_lm"
        )

    @classmethod
    def _with_head(cls, p: Path, backbone: nn.Module) -> RewardModel:
        """`backbone` with the heads of `p`'s reward_head.safetensors."""
        with safe_open(str(p / REWARD_HEAD_FILE), framework="pt") as f:
            meta, weight = json.loads(f.metadata()["rlhflab"]), f.get_tensor("weight")
        score = nn.Linear(weight.shape[1], weight.shape[0], bias=False, dtype=weight.dtype)
        with torch.no_grad():
            score.weight.copy_(weight)
        score.to(next(backbone.parameters()).device)
        model = cls(backbone, weight.shape[0], meta["head_names"], score=score)
        model.set_normalization(meta[MEAN_KEY], meta[STD_KEY])
        return model

    @classmethod
    def _from_sequence_classification(cls, p: Path, *, dtype, device, trust_remote_code: bool) -> RewardModel:
        from transformers import AutoModelForSequenceClassification

        seq = AutoModelForSequenceClassification.from_pretrained(
            str(p), dtype=resolve_dtype(dtype), local_files_only=True, trust_remote_code=trust_remote_code
        )
        seq.to(resolve_device(device))
        score = getattr(seq, "score", None)
        if not isinstance(score, nn.Linear) or score.bias is not None:
            raise UserError(
                f"'{p}': {type(seq).__name__} has no bias-free linear `score` head; "
                "it cannot be read as a reward model"
            )
        config = seq.config
        names = [str(config.id2label[i]) for i in range(config.num_labels)]
        model = cls(seq.base_model, config.num_labels, names, score=score)
        mean, std = getattr(config, MEAN_KEY, None), getattr(config, STD_KEY, None)
        if mean is not None and std is not None:
            model.set_normalization(mean, std)
        return model


def _sequence_classification_class(config):
    """The `*ForSequenceClassification` class registered for this config's model type, or None."""
    import transformers
    from transformers.models.auto.modeling_auto import MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES

    name = MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES.get(config.model_type)
    return getattr(transformers, name, None) if name else None


def _unshared_cpu(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Detached contiguous CPU tensors, none sharing storage (safetensors refuses shared tensors)."""
    out, seen = {}, set()
    for key, value in tensors.items():
        v = value.detach().contiguous().cpu()
        ptr = v.untyped_storage().data_ptr()
        out[key] = v.clone() if ptr in seen else v
        seen.add(ptr)
    return out


__all__ = ["PREFERENCE_MODEL_KEY", "REWARD_HEAD_FILE", "RewardModel"]


def batch_rewards(model: RewardModel, batch: dict, device: torch.device) -> torch.Tensor:
    """Every head's reward for each response of a `collate_reward_batch` batch, in its flat order: [N, H]
    float32. Shared-prompt batches (`read_rows`) read several responses per row."""
    ids = batch["input_ids"].to(device)
    # The head reads one position per response, so the final layer runs only there (forward and backward).
    if "read_rows" in batch:
        rows, positions = batch["read_rows"].to(device), batch["read_positions"].to(device)
        with final_layer_only_at(
            model.backbone, None, positions, rows=rows, key_mask=batch["key_mask"].to(device)
        ):
            return model.rewards_at(
                ids, batch["attention_mask_4d"].to(device), batch["position_ids"].to(device), rows, positions
            )
    mask = batch["attention_mask"].to(device)
    with final_layer_only_at(model.backbone, mask, last_token_index(mask)):
        return model(ids, mask)
