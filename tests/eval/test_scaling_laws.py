"""Gao et al. 2022's functional forms, fitted by least squares on points with known coefficients."""

from __future__ import annotations

import math

import numpy as np
import pytest

from rlhflab.eval.scaling_laws import fit_best_of_n, fit_rl


def test_best_of_n_fit_by_hand():
    # Two points determine the form: 1 = a - b (d = 1), 0 = 2a - 4b (d = 2) -> b = 1, a = 2; peak at a / 2b = 1.
    fit = fit_best_of_n([1.0, 2.0], [1.0, 0.0])
    assert (fit.alpha, fit.beta, fit.d_peak) == pytest.approx((2.0, 1.0, 1.0))
    assert fit.r2 == pytest.approx(1.0)


def test_fits_recover_known_coefficients_and_peaks():
    d = np.array([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0])
    bon = fit_best_of_n(d, d * (1.0 - 0.25 * d))
    assert (bon.alpha, bon.beta, bon.d_peak, bon.r2) == pytest.approx((1.0, 0.25, 2.0, 1.0))
    r_rl = d * (1.0 - 0.5 * np.log(np.where(d > 0, d, 1.0)))
    rl = fit_rl(d, r_rl)
    assert (rl.alpha, rl.beta, rl.r2) == pytest.approx((1.0, 0.5, 1.0))
    assert rl.d_peak == pytest.approx(math.e)  # exp(a / b - 1)
    # Noise lowers R^2 below 1; a gold that only rises has no peak (beta <= 0 -> inf).
    noisy = fit_best_of_n(d, d * (1.0 - 0.25 * d) + np.random.default_rng(0).normal(0, 0.05, d.shape))
    assert 0.8 < noisy.r2 < 1.0 and noisy.alpha == pytest.approx(1.0, abs=0.15)
    assert fit_best_of_n(d, 0.3 * d + 0.01 * d**2).d_peak == math.inf


def test_bad_points_are_refused():
    with pytest.raises(ValueError, match="two points"):
        fit_rl([0.0, 1.0], [0.0, 0.2])
    with pytest.raises(ValueError, match="same length"):
        fit_best_of_n([1.0, 2.0], [1.0])
