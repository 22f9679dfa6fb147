"""The control tests train tiny networks: one torch thread, since a second only adds synchronization (on a busy
2-core machine, several times the run time)."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def one_torch_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
