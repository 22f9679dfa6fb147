"""Fixtures for stage tests: tiny data files, built locally (the tiny model directory,
`tiny_model_dir`, is in tests/conftest.py; the builders in tests/helpers.py)."""

from __future__ import annotations

import pytest

from ..helpers import CAT_PROMPTS, write_jsonl


@pytest.fixture()
def sft_file(tmp_path):
    # A learnable toy: every prompt about a cat is answered the same way.
    rows = [{"prompt": p, "completion": "the cat is very happy ."} for p in CAT_PROMPTS] * 8
    return write_jsonl(tmp_path / "sft.jsonl", rows)
