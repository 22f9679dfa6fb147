"""Shared fixtures. Tests never touch the network: everything is built locally."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

from rlhflab.models.tiny import build_word_tokenizer  # noqa: E402

pytest.register_assert_rewrite("tests.helpers")  # its asserts explain themselves, as a test's do

from .helpers import save_model_dir, tiny_lm  # noqa: E402

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

TINY_WORDS = (
    "the a cat dog sat on mat is good bad great happy sad very not and it was day film movie "
    "i you we love hate like this that what why how say hello hi yes no 0 1 2 3 4 5 6 7 8 9 + - = . , ? !"
).split()


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return build_word_tokenizer(TINY_WORDS)


@pytest.fixture()
def tiny_model(tiny_tokenizer):
    return tiny_lm(tiny_tokenizer)


@pytest.fixture()
def tiny_model_dir(tmp_path, tiny_model, tiny_tokenizer):
    """`tiny_model` and its tokenizer saved as a plain HF directory, as a stage's model.name_or_path."""
    return save_model_dir(tiny_model, tiny_tokenizer, tmp_path / "tiny-model")


@pytest.fixture(scope="session")
def lab_cache(tmp_path_factory):
    """The lab cache of the whole session (never ~/.cache): tests/lab, tests/eval and the stage tests share it,
    so the tiny base model is pretrained once."""
    return tmp_path_factory.getbasetemp() / "rlhflab-cache"


@pytest.fixture()
def tiny_lab_cache(lab_cache, monkeypatch):
    """RLHFLAB_CACHE at the session's lab cache, so the tiny base model is pretrained once per session."""
    monkeypatch.setenv("RLHFLAB_CACHE", str(lab_cache))
    return lab_cache


@pytest.fixture()
def quark_model_dir(tmp_path, tiny_model, tiny_tokenizer):
    """A model saved as `rlhflab quark` saves one (two control tokens, quark.json) whose control tokens each have
    the output row of the token the model writes most: a sampler that did not block them would write them often.
    Returns (directory, the model, its tokenizer, its ControlTokens)."""
    import copy

    from rlhflab.models.control_tokens import add_control_tokens
    from rlhflab.rollout.generate import SamplingSettings, generate
    from rlhflab.stages.quark import save_quark_model

    model, tokenizer = copy.deepcopy(tiny_model), copy.deepcopy(tiny_tokenizer)
    tokens = add_control_tokens(model, tokenizer, 2, seed=0)
    first = generate(model, tokenizer, ["the cat", "i say", "the dog"] * 4, SamplingSettings(6), seed=0)
    counts = torch.bincount(first.response_ids[first.response_mask])
    with torch.no_grad():
        head = model.get_output_embeddings().weight
        head[tokens.ids] = head[int(counts[: tokens.vocab_before].argmax())].clone()
    return save_quark_model(model, tokenizer, tokens, tmp_path / "quark"), model, tokenizer, tokens
