"""One-call tiny model + tokenizer for tests and the built-in lab (no network, random init)."""

from __future__ import annotations

from collections.abc import Iterable

from rlhflab.models.tiny import build_word_tokenizer, tiny_causal_lm


def tiny_model_and_tokenizer(words: Iterable[str], *, arch: str = "llama", hidden_size: int = 64,
                             num_layers: int = 2, num_heads: int = 4, intermediate_size: int | None = None,
                             max_positions: int = 256, seed: int = 0):
    """(model, tokenizer): a word-level tokenizer over `words` and a random `arch` causal LM sized for it."""
    tokenizer = build_word_tokenizer(words, model_max_length=max_positions)
    model = tiny_causal_lm(tokenizer, arch=arch, hidden_size=hidden_size, num_layers=num_layers,
                           num_heads=num_heads, intermediate_size=intermediate_size,
                           max_positions=max_positions, seed=seed)
    return model, tokenizer
