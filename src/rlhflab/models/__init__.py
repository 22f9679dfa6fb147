"""Models: loading HF causal LMs, value and reward heads, general preference models, LoRA, and the tiny-model
factory."""

from rlhflab.models.backbone import (
    backbone_and_head,
    hidden_to_logits,
    last_token_index,
    position_ids_from_mask,
)
from rlhflab.models.gguf_import import import_gguf
from rlhflab.models.heads import Critic, PolicyWithValueHead, ValueHead
from rlhflab.models.loading import (
    LoraSettings,
    apply_lora,
    count_parameters,
    load_backbone,
    load_causal_lm,
    load_tokenizer,
    save_model,
)
from rlhflab.models.preference_model import PreferenceModel
from rlhflab.models.reward_model import RewardModel

__all__ = [
    "Critic",
    "LoraSettings",
    "PolicyWithValueHead",
    "PreferenceModel",
    "RewardModel",
    "ValueHead",
    "apply_lora",
    "backbone_and_head",
    "count_parameters",
    "hidden_to_logits",
    "import_gguf",
    "last_token_index",
    "load_backbone",
    "load_causal_lm",
    "load_tokenizer",
    "position_ids_from_mask",
    "save_model",
]
