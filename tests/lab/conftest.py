"""Fixtures for lab tests: a lab cache in the session's temp dir (never ~/.cache) and the tiny base model."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def lab_cache(tmp_path_factory):
    # One cache for the whole session (the stage and pipeline tests use the same path), so the tiny base model is
    # pretrained once.
    return tmp_path_factory.getbasetemp() / "rlhflab-cache"


@pytest.fixture(scope="session")
def sentiment_base_dir(lab_cache):
    from rlhflab.lab.pretrain import ensure_base_model
    from rlhflab.lab.tasks import get_task

    return ensure_base_model(get_task("sentiment"), budget="tiny", seed=0, cache_dir=lab_cache)
