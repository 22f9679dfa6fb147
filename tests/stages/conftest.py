"""Fixtures for stage tests: a tiny model directory and tiny data files, all built locally."""

from __future__ import annotations

import json

import pytest

from rlhflab.models.tiny import tiny_causal_lm


@pytest.fixture()
def tiny_model_dir(tmp_path, tiny_tokenizer):
    model = tiny_causal_lm(tiny_tokenizer, hidden_size=32, num_layers=2, num_heads=2, seed=0)
    out = tmp_path / "tiny-model"
    model.save_pretrained(out)
    tiny_tokenizer.save_pretrained(out)
    return out


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture()
def sft_file(tmp_path):
    # A learnable toy: every prompt about a cat is answered the same way.
    prompts = ["the cat sat on the mat", "what is the cat", "i like the cat", "why is the cat sad"]
    rows = [{"prompt": p, "completion": "the cat is very happy ."} for p in prompts] * 8
    return write_jsonl(tmp_path / "sft.jsonl", rows)


@pytest.fixture()
def tiny_lab_cache(tmp_path_factory, monkeypatch):
    """RLHFLAB_CACHE at the session's lab cache (as tests/lab, tests/eval and the pipeline test use), so the
    tiny base model is pretrained once per session."""
    path = tmp_path_factory.getbasetemp() / "rlhflab-cache"
    monkeypatch.setenv("RLHFLAB_CACHE", str(path))
    return path
