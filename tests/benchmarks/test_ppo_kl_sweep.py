"""benchmarks/ppo_kl_sweep.py: the 10-iteration windows its rule (end within 0.05 of the best) is read from."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import ppo_kl_sweep as sweep  # noqa: E402


def test_windows_average_consecutive_iterations_and_keep_a_short_tail():
    curve = [{"gold/mean": v} for v in (1.0, 3.0, 5.0, 7.0, 10.0)]
    # (1 + 3) / 2, (5 + 7) / 2, then the last point alone.
    assert sweep.windows(curve, "gold/mean", width=2) == pytest.approx([2.0, 6.0, 10.0])
    assert sweep.windows(curve, "gold/mean", width=10) == pytest.approx([5.2])
