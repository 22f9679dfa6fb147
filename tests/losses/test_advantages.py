"""GAE, returns, whitening, REINFORCE / RLOO / GRPO advantages."""

from __future__ import annotations

import math

import pytest
import torch

from rlhflab.errors import ConfigError
from rlhflab.losses.advantages import (
    discounted_returns,
    gae,
    group_normalized_advantages,
    reinforce_advantages,
    rloo_advantages,
    whiten,
)

F64 = torch.float64


def t(x):
    return torch.tensor(x, dtype=F64)


def test_gae_by_hand():
    """rewards [0, 0, 1], values [0.5, 0.6, 0.7], gamma 1, lam 0.9, then padding (values 100).
    t=2: delta = 1 + 0 - 0.7 = 0.3 (no bootstrap from padding); A = 0.3
    t=1: delta = 0 + 0.7 - 0.6 = 0.1;  A = 0.1 + 0.9 * 0.3 = 0.37
    t=0: delta = 0 + 0.6 - 0.5 = 0.1;  A = 0.1 + 0.9 * 0.37 = 0.433
    returns = A + V = [0.933, 0.97, 1.0].
    """
    rewards = t([[0.0, 0.0, 1.0, 5.0]])
    values = t([[0.5, 0.6, 0.7, 100.0]])
    mask = torch.tensor([[1, 1, 1, 0]], dtype=torch.bool)
    adv, ret = gae(rewards, values, mask, gamma=1.0, lam=0.9)
    torch.testing.assert_close(adv, t([[0.433, 0.37, 0.3, 0.0]]))
    torch.testing.assert_close(ret, t([[0.933, 0.97, 1.0, 0.0]]))


def test_gae_discounted_by_hand():
    """gamma 0.5, lam 1, rewards [1, 2], values [1, 1]:
    t=1: A = 2 - 1 = 1;  t=0: delta = 1 + 0.5 * 1 - 1 = 0.5, A = 0.5 + 0.5 * 1 = 1.0.
    """
    adv, _ = gae(t([[1.0, 2.0]]), t([[1.0, 1.0]]), torch.ones(1, 2, dtype=torch.bool), gamma=0.5, lam=1.0)
    torch.testing.assert_close(adv, t([[1.0, 1.0]]))


def test_gae_lambda1_gamma1_is_reward_to_go_minus_value():
    g = torch.Generator().manual_seed(0)
    rewards = torch.randn(4, 6, dtype=F64, generator=g)
    values = torch.randn(4, 6, dtype=F64, generator=g)
    lengths = torch.tensor([6, 3, 1, 4])
    mask = torch.arange(6)[None, :] < lengths[:, None]
    adv, ret = gae(rewards, values, mask, gamma=1.0, lam=1.0)
    rtg = torch.where(mask, rewards, 0).flip(-1).cumsum(-1).flip(-1)
    torch.testing.assert_close(adv, torch.where(mask, rtg - values, 0))
    torch.testing.assert_close(ret, torch.where(mask, rtg, 0))
    torch.testing.assert_close(discounted_returns(rewards, mask), torch.where(mask, rtg, 0))


def test_discounted_returns_by_hand():
    """gamma 0.5, rewards [1, 2, 4]: G2 = 4, G1 = 2 + 0.5 * 4 = 4, G0 = 1 + 0.5 * 4 = 3."""
    out = discounted_returns(t([[1.0, 2.0, 4.0]]), torch.ones(1, 3), gamma=0.5)
    torch.testing.assert_close(out, t([[3.0, 4.0, 4.0]]))


def test_whiten_with_and_without_mean_shift():
    """[2, 4, 6]: mean 4, std 2 -> [-1, 0, 1]; without the mean shift -> [3, 4, 5]."""
    x, m = t([[2.0, 4.0, 6.0]]), torch.ones(1, 3)
    torch.testing.assert_close(whiten(x, m, eps=0.0), t([[-1.0, 0.0, 1.0]]))
    torch.testing.assert_close(whiten(x, m, shift_mean=False, eps=0.0), t([[3.0, 4.0, 5.0]]))


def test_reinforce_advantages_by_hand():
    """scores [1, 2, 3]: batch-mean baseline 2 -> [-1, 0, 1]; baseline 1.5 -> [-0.5, 0.5, 1.5]."""
    torch.testing.assert_close(reinforce_advantages(t([1.0, 2.0, 3.0])), t([-1.0, 0.0, 1.0]))
    torch.testing.assert_close(reinforce_advantages(t([1.0, 2.0, 3.0]), 1.5), t([-0.5, 0.5, 1.5]))


def test_rloo_by_hand():
    """Group [1, 2, 6]: 1 - (2+6)/2 = -3; 2 - (1+6)/2 = -1.5; 6 - (1+2)/2 = 4.5.
    Flat prompt-major [1, 2, 6, 0, 0, 3] with k = 3: second group [0 - 1.5, 0 - 1.5, 3 - 0] = [-1.5, -1.5, 3].
    """
    torch.testing.assert_close(rloo_advantages(t([[1.0, 2.0, 6.0]])), t([[-3.0, -1.5, 4.5]]))
    flat = rloo_advantages(t([1.0, 2.0, 6.0, 0.0, 0.0, 3.0]), k=3)
    torch.testing.assert_close(flat, t([-3.0, -1.5, 4.5, -1.5, -1.5, 3.0]))
    with pytest.raises(ConfigError, match="groups of k=4"):
        rloo_advantages(t([1.0, 2.0, 6.0]), k=4)
    with pytest.raises(ConfigError, match="at least 2"):
        rloo_advantages(t([[1.0], [2.0]]))


def test_group_normalized_by_hand():
    """[1, 2, 6]: mean 3, unbiased std sqrt((4 + 1 + 9) / 2) = sqrt(7) = 2.645751.
    -> [-2, -1, 3] / 2.645751 = [-0.755929, -0.377964, 1.133893]; without std scaling [-2, -1, 3].
    A group whose samples all score the same gets 0 (not NaN).
    """
    out = group_normalized_advantages(t([1.0, 2.0, 6.0, 5.0, 5.0, 5.0]), k=3, eps=1e-12)
    torch.testing.assert_close(out[:3], t([-2.0, -1.0, 3.0]) / math.sqrt(7))
    assert out[3:].eq(0).all()
    torch.testing.assert_close(
        group_normalized_advantages(t([[1.0, 2.0, 6.0]]), scale_by_std=False), t([[-2.0, -1.0, 3.0]])
    )
