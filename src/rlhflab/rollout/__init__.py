"""Generation: sampling responses from a causal LM in batches, as tensors ready for training."""

from rlhflab.rollout.generate import Rollout, SamplingSettings, encode_prompts, generate

__all__ = ["Rollout", "SamplingSettings", "encode_prompts", "generate"]
