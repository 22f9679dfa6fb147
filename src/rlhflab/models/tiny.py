"""Tiny models and tokenizers built locally, with no network.

Tests and the built-in lab need real Hugging Face objects (so every stage treats them like any HF model)
that are small enough to train in seconds on 2 CPU cores. The tokenizer is word-level over a vocabulary
the caller supplies: with a few hundred words, the LM head stays cheap, and the LM head dominates the
cost of a tiny model when the vocabulary is large.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

PAD, BOS, EOS, UNK = "<pad>", "<bos>", "<eos>", "<unk>"
USER, ASSISTANT, SYSTEM = "<|user|>", "<|assistant|>", "<|system|>"
SPECIAL_TOKENS = [PAD, BOS, EOS, UNK, USER, ASSISTANT, SYSTEM]

# Renders a conversation as "<|user|> hi <|assistant|> hello <eos>"; with add_generation_prompt it ends
# on "<|assistant|>" so the model continues with the reply.
CHAT_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m['role'] == 'user' %}<|user|> {{ m['content'] }} "
    "{% elif m['role'] == 'system' %}<|system|> {{ m['content'] }} "
    "{% else %}<|assistant|> {{ m['content'] }} <eos> {% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def split_words(text: str) -> list[str]:
    """Split text the way the word-level tokenizer does (words, single punctuation marks, single digits)."""
    return [w for w, _ in _pre_tokenizer().pre_tokenize_str(text)]


def _pre_tokenizer() -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.WhitespaceSplit(),
            pre_tokenizers.Punctuation(behavior="isolated"),
            pre_tokenizers.Digits(individual_digits=True),
        ]
    )


def build_word_tokenizer(words: Iterable[str], *, model_max_length: int = 512) -> PreTrainedTokenizerFast:
    """A word-level `PreTrainedTokenizerFast` over `words` plus the special tokens.

    Args:
        words: the vocabulary (duplicates and special tokens are ignored; order is kept, so ids are stable).
        model_max_length: recorded on the tokenizer, as HF tokenizers do.

    Returns:
        A tokenizer with pad/bos/eos/unk set, a chat template, and `save_pretrained` support.
    """
    vocab: dict[str, int] = {}
    for tok in [*SPECIAL_TOKENS, *words]:
        if tok not in vocab:
            vocab[tok] = len(vocab)
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    backend.pre_tokenizer = _pre_tokenizer()
    # WordLevel has no decoder of its own; joining pieces with spaces is the inverse of WhitespaceSplit.
    backend.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token=PAD,
        bos_token=BOS,
        eos_token=EOS,
        unk_token=UNK,
        additional_special_tokens=[USER, ASSISTANT, SYSTEM],
        model_max_length=model_max_length,
        padding_side="right",
    )
    tok.chat_template = CHAT_TEMPLATE
    return tok


def tiny_causal_lm(
    tokenizer: PreTrainedTokenizerFast,
    *,
    arch: str = "llama",
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    intermediate_size: int | None = None,
    max_positions: int = 256,
    seed: int = 0,
):
    """A randomly initialized HF causal LM sized for `tokenizer` ("llama" or "gpt2").

    The special token ids are copied from the tokenizer into the config and generation config, so
    `generate` stops at EOS and pads with PAD like any pretrained HF model would.
    """
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    ids = {
        "pad_token_id": tokenizer.pad_token_id,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
    }
    if arch == "llama":
        config = LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=hidden_size,
            num_hidden_layers=num_layers,
            num_attention_heads=num_heads,
            num_key_value_heads=num_heads,
            intermediate_size=intermediate_size or 4 * hidden_size,
            max_position_embeddings=max_positions,
            tie_word_embeddings=True,
            **ids,
        )
        cls = LlamaForCausalLM
    elif arch == "gpt2":
        config = GPT2Config(
            vocab_size=len(tokenizer),
            n_embd=hidden_size,
            n_layer=num_layers,
            n_head=num_heads,
            n_inner=intermediate_size,
            n_positions=max_positions,
            **ids,
        )
        cls = GPT2LMHeadModel
    else:
        raise ValueError(f"unknown tiny arch {arch!r}; expected 'llama' or 'gpt2'")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = cls(config)
    for k, v in ids.items():
        setattr(model.generation_config, k, v)
    return model
