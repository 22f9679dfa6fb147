"""Models: loading HF causal LMs, value and reward heads, LoRA, and the tiny-model factory."""
