"""The stable-baselines3 PPO driver: its settings and checkpoints."""

from __future__ import annotations

import numpy as np
import pytest

from rlhflab.control.ppo import checkpoints, make_ppo, ppo_kwargs
from rlhflab.errors import ConfigError


def test_ppo_kwargs_fit_short_runs():
    n_envs, kw = ppo_kwargs("Pendulum-v1", 40960)
    assert n_envs == 4 and kw["n_steps"] == 1024 and kw["batch_size"] == 64 and kw["gamma"] == 0.9
    assert ppo_kwargs("Pendulum-v1", 64)[1]["n_steps"] == 16  # 64 steps over 4 envs
    _, tiny = ppo_kwargs("Pendulum-v1", 8)
    assert tiny["n_steps"] == 8 and tiny["batch_size"] == 32  # floor of 8; minibatch within the rollout
    with pytest.raises(ConfigError, match="'CartPole-v1' is not supported; known: Pendulum-v1"):
        ppo_kwargs("CartPole-v1", 100)


def test_checkpoints_train_in_stages():
    seen = []
    for steps, model in checkpoints("Pendulum-v1", seed=0, stages=[0, 64, 128]):
        seen.append((steps, model.num_timesteps, model.policy.action_net.weight.detach().clone()))
    assert [s for s, _, _ in seen] == [0, 64, 128] and [n for _, n, _ in seen] == [0, 64, 128]
    assert not np.allclose(seen[0][2].numpy(), seen[1][2].numpy())  # the policy changed between stages
    with pytest.raises(ValueError, match="increasing"):
        list(checkpoints("Pendulum-v1", seed=0, stages=[64, 0]))


def test_ppo_on_a_learned_reward_sees_only_it():
    seen = []

    def reward_fn(obs):
        seen.append(obs)
        return 3.0

    model = make_ppo("Pendulum-v1", seed=0, total_steps=32, reward_fn=reward_fn, reward_stats=(1.0, 2.0))
    model.learn(32)
    assert len(seen) >= 32
    assert np.allclose(model.rollout_buffer.rewards, 1.0)  # (3 - 1) / 2 at every step
