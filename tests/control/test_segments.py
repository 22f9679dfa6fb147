"""Segments of trajectories, by hand: what a labeller compares (Christiano et al. 2017)."""

from __future__ import annotations

import numpy as np
import pytest

from rlhflab.control.segments import Segment, random_segments, segment_of
from rlhflab.control.trajectories import Trajectory


def _trajectory(n: int = 10) -> Trajectory:
    # observation t is [t, t, t]; action t is [10 t]; reward t is t
    obs = np.repeat(np.arange(n + 1, dtype=np.float32)[:, None], 3, axis=1)
    return Trajectory(obs, 10 * np.arange(n, dtype=np.float32)[:, None], np.arange(n, dtype=np.float64))


def test_segment_of_takes_the_steps_and_the_states_they_reach():
    seg = segment_of(_trajectory(), 3, 4)
    # steps 3..6: the states they reach are observations 4..7, their actions 30..60, their rewards 3..6
    assert seg.observations[:, 0].tolist() == [4, 5, 6, 7]
    assert seg.actions[:, 0].tolist() == [30, 40, 50, 60]
    assert seg.rewards.tolist() == [3, 4, 5, 6] and seg.true_return == 18.0 and len(seg) == 4
    whole = segment_of(_trajectory(), 0, 10)
    assert len(whole) == 10 and whole.true_return == 45.0
    for start, length in ((-1, 3), (8, 3), (0, 0)):
        with pytest.raises(ValueError, match="not inside"):
            segment_of(_trajectory(), start, length)


def test_a_segment_needs_matching_lengths():
    with pytest.raises(ValueError, match="alike"):
        Segment(np.zeros((3, 2)), np.zeros((2, 1)), np.zeros(3))
    with pytest.raises(ValueError, match="L >= 1"):
        Segment(np.zeros((0, 2)), np.zeros((0, 1)), np.zeros(0))


def test_random_segments_lie_inside_their_trajectories_and_repeat_with_the_seed():
    trajectories = [_trajectory(10), _trajectory(6)]
    segs = random_segments(trajectories, 50, 5, np.random.default_rng(0))
    assert len(segs) == 50 and all(len(s) == 5 for s in segs)
    for s in segs:  # consecutive steps of one trajectory: rewards t, t+1, ..., states one step ahead
        start = int(s.rewards[0])
        assert s.rewards.tolist() == list(range(start, start + 5))
        assert s.observations[:, 0].tolist() == list(range(start + 1, start + 6))
    assert {int(s.rewards[0]) for s in segs} == set(range(6))  # every start of the longer one shows up
    again = random_segments(trajectories, 50, 5, np.random.default_rng(0))
    assert [s.rewards.tolist() for s in again] == [s.rewards.tolist() for s in segs]
    with pytest.raises(ValueError, match="shorter than the segment length"):
        random_segments([_trajectory(3)], 1, 5, np.random.default_rng(0))
