"""Fixtures for lab tests: the tiny base model, pretrained once in the session's lab cache (`lab_cache`, in
tests/conftest.py)."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def sentiment_base_dir(lab_cache):
    from rlhflab.lab.pretrain import ensure_base_model
    from rlhflab.lab.tasks import get_task

    return ensure_base_model(get_task("sentiment"), budget="tiny", seed=0, cache_dir=lab_cache)
