"""The gain at matched length (eval/length_control.py), worked by hand."""

import numpy as np
import pytest

from rlhflab.eval.length_control import (
    length_adjusted,
    length_controlled_gain,
    length_controlled_win_rate,
)


def test_parallel_groups_split_the_gain_into_length_and_the_rest():
    # Both groups lie on score = length (+2 for the policy): slope 1; the policy is 3 words longer and 4
    # better, of which 3 is length and 1 is the policy.
    fit = length_controlled_gain([5, 6, 7], [4, 5, 6], [1, 2, 3], [1, 2, 3])
    assert fit.raw_gain == pytest.approx(4.0)
    assert fit.delta_length == pytest.approx(3.0)
    assert fit.slope == pytest.approx(1.0)
    assert fit.length_part == pytest.approx(3.0)
    assert fit.gain_at_matched_length == pytest.approx(1.0)


def test_the_slope_is_the_pooled_within_group_slope():
    # Reference: lengths 0, 2 with scores 0, 2 (centred: -1, 1 and -1, 1); policy: lengths 1, 3 with scores
    # 4, 4 (centred: -1, 1 and 0, 0). b = (1 + 1 + 0 + 0) / (1 + 1 + 1 + 1) = 0.5; raw gain 4 - 1 = 3,
    # delta length 2 - 1 = 1, so the gain at matched length is 3 - 0.5 * 1 = 2.5.
    fit = length_controlled_gain([4, 4], [1, 3], [0, 2], [0, 2])
    assert fit.slope == pytest.approx(0.5)
    assert fit.gain_at_matched_length == pytest.approx(2.5)


def test_it_is_the_least_squares_fit_with_an_indicator():
    rng = np.random.default_rng(0)
    lp, lr = rng.integers(3, 20, 40).astype(float), rng.integers(2, 12, 25).astype(float)
    yp, yr = 0.3 + 0.05 * lp + rng.normal(0, 0.2, 40), 0.05 * lr + rng.normal(0, 0.2, 25)
    x = np.column_stack([np.ones(65), np.concatenate([lp, lr]), np.r_[np.ones(40), np.zeros(25)]])
    (a, b, c), *_ = np.linalg.lstsq(x, np.concatenate([yp, yr]), rcond=None)
    fit = length_controlled_gain(yp, lp, yr, lr)
    assert fit.slope == pytest.approx(b) and fit.gain_at_matched_length == pytest.approx(c)
    assert fit.raw_gain == pytest.approx(fit.length_part + fit.gain_at_matched_length)


def test_no_length_variation_leaves_the_raw_gain():
    fit = length_controlled_gain([2.0, 3.0], [5, 5], [1.0, 1.0], [4, 4])
    assert fit.slope == 0.0 and fit.gain_at_matched_length == pytest.approx(1.5)


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="pairs"):
        length_controlled_gain([1, 2], [1], [1], [1])
    with pytest.raises(ValueError, match="both"):
        length_controlled_gain([], [], [1], [1])
    with pytest.raises(ValueError, match="finite"):
        length_controlled_gain([np.nan], [1], [1], [1])


def test_the_win_rate_at_matched_length():
    # slope 1, common length = the reference's mean 1.5: the reference's 1 (length 1) and 2 (length 2) both
    # move to 1.5, the policy's 3 (length 3) to 1.5 too: three ties, a win rate of 1/2 where the raw one is 1.
    np.testing.assert_allclose(length_adjusted([1, 2], [1, 2], 1.0, 1.5), [1.5, 1.5])
    wr = length_controlled_win_rate([[3.0]], [[3.0]], [[1.0, 2.0]], [[1.0, 2.0]], slope=1.0)
    np.testing.assert_allclose(wr, [0.5])
    np.testing.assert_allclose(
        length_controlled_win_rate([[3.0]], [[3.0]], [[1.0, 2.0]], [[1.0, 2.0]], slope=0.0), [1.0]
    )
