"""The pipeline's job clock: progress lines and an ETA scaled by how fast the finished parts went."""

from __future__ import annotations

import pytest

from rlhflab.core.progress import JobClock


def test_eta_scales_the_parts_left_by_the_observed_speed_with_a_prior():
    t, lines = [100.0], []  # the clock starts at 100: the job's times are differences from it
    clock = JobClock(["a", "b", "c"], {"a": 10, "b": 20, "c": 10}, out=lines.append, clock=lambda: t[0])
    assert clock.eta() == pytest.approx(40.0)  # nothing finished: the reference machine's 40 s
    clock.start("a")
    t[0] = 120.0  # a took 20 s, expected 10: speed (20 + 4) / (10 + 4) with the prior 0.1 x 40 = 4
    clock.start("b")
    assert clock.eta() == pytest.approx(30 * 24 / 14)
    t[0] = 130.0  # 10 s into b: b's share still to come is the estimate less what b has used
    assert clock.eta() == pytest.approx(30 * 24 / 14 - 10)
    t[0] = 150.0
    clock.start("c")  # a + b: 50 s for 30 expected -> (50 + 4) / (30 + 4)
    assert clock.eta() == pytest.approx(10 * 54 / 34)
    t[0] = 160.0
    clock.finish()
    assert lines[0] == "[1/3] a  (job 0% done, 0m00s elapsed, about 0m40s left)"
    assert lines[1] == "[2/3] b  (job 25% done, 0m20s elapsed, about 0m51s left)"
    assert lines[2].startswith("[3/3] c  (job 75% done, 0m50s elapsed, about 0m16s left)")
    assert lines[3] == "job done in 1m00s"


def test_parts_without_an_expectation_get_the_mean_one():
    clock = JobClock(["x", "y"], {"x": 30}, out=lambda _: None, clock=lambda: 0.0)
    assert clock.expected == {"x": 30.0, "y": 30.0}
