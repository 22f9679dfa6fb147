"""Masked reductions and whitening, with numbers worked out by hand."""

from __future__ import annotations

import pytest
import torch

from rlhflab.errors import ConfigError
from rlhflab.losses.utils import (
    fill_masked,
    masked_mean,
    masked_sum,
    masked_var,
    masked_whiten,
    reduce_token_losses,
)

F64 = torch.float64


def t(x):
    return torch.tensor(x, dtype=F64)


def test_masked_sum_mean_var_by_hand():
    """x = [1, 2, 3, 100], the 100 is padding.

    sum = 1 + 2 + 3 = 6; mean = 6 / 3 = 2; deviations -1, 0, 1 -> squares sum to 2;
    unbiased var = 2 / (3 - 1) = 1; biased var = 2 / 3 = 0.6667.
    """
    x, m = t([1.0, 2.0, 3.0, 100.0]), torch.tensor([True, True, True, False])
    assert masked_sum(x, m).item() == pytest.approx(6.0)
    assert masked_mean(x, m).item() == pytest.approx(2.0)
    assert masked_var(x, m).item() == pytest.approx(1.0)
    assert masked_var(x, m, unbiased=False).item() == pytest.approx(2 / 3)


def test_masked_reductions_along_dim_and_empty_rows():
    """Row 0 = [1, 2 | 9]: sum 3, mean 1.5; row 1 has no real token: sum 0, mean 0 (not NaN)."""
    x = t([[1.0, 2.0, 9.0], [5.0, 6.0, 7.0]])
    m = torch.tensor([[1, 1, 0], [0, 0, 0]])
    torch.testing.assert_close(masked_sum(x, m, dim=-1), t([3.0, 0.0]))
    torch.testing.assert_close(masked_mean(x, m, dim=-1), t([1.5, 0.0]))
    assert masked_mean(x, torch.zeros_like(m)).item() == 0.0
    assert masked_var(t([4.0, 8.0]), torch.tensor([True, False])).item() == 0.0


def test_masked_whiten_by_hand():
    """x = [2, 4, 6 | pad]: mean 4, unbiased var (4 + 0 + 4) / 2 = 4, std 2.

    shift_mean=True -> (x - 4) / 2 = [-1, 0, 1]; shift_mean=False -> that + 4 = [3, 4, 5]; pad -> 0.
    """
    x, m = t([2.0, 4.0, 6.0, 1e6]), torch.tensor([True, True, True, False])
    torch.testing.assert_close(masked_whiten(x, m, eps=0.0), t([-1.0, 0.0, 1.0, 0.0]))
    torch.testing.assert_close(masked_whiten(x, m, shift_mean=False, eps=0.0), t([3.0, 4.0, 5.0, 0.0]))


def test_reduce_token_losses_by_hand():
    """Losses [[1, 2 | 9], [3, 4, 5]]: 5 real tokens summing to 15.

    sequence_mean = [3/2, 12/3] = [1.5, 4]; sequence_sum = [3, 12];
    token_mean = sums * B / N = [3, 12] * 2 / 5 = [1.2, 4.8], whose mean 3.0 = 15 / 5.
    """
    x = t([[1.0, 2.0, 9.0], [3.0, 4.0, 5.0]])
    m = torch.tensor([[1, 1, 0], [1, 1, 1]], dtype=torch.bool)
    torch.testing.assert_close(reduce_token_losses(x, m, "sequence_mean"), t([1.5, 4.0]))
    torch.testing.assert_close(reduce_token_losses(x, m, "sequence_sum"), t([3.0, 12.0]))
    token_mean = reduce_token_losses(x, m, "token_mean")
    torch.testing.assert_close(token_mean, t([1.2, 4.8]))
    assert token_mean.mean().item() == pytest.approx(3.0)
    with pytest.raises(ConfigError, match="unknown reduction"):
        reduce_token_losses(x, m, "mean")


def test_fill_masked_blocks_inf_and_nan_in_gradients():
    """Padding holding inf/NaN must give a finite result and an exactly-zero gradient there."""
    x = t([1.0, float("inf"), float("nan")]).requires_grad_()
    m = torch.tensor([True, False, False])
    y = masked_whiten(x, m) + masked_var(x, m) + masked_mean(fill_masked(x, m).exp(), m)
    y.sum().backward()
    assert torch.isfinite(y).all()
    assert x.grad[1:].eq(0).all() and torch.isfinite(x.grad).all()
