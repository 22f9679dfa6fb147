"""A thin driver of stable-baselines3's PPO: their optimizer, our environments and reward wrapper.

Two uses: the demonstrator, a PPO run on the true reward whose checkpoints at increasing stages give ranked,
suboptimal demonstrations (Brown et al. 2019a, Sec. 5.1); and the learner, a PPO run on the learned reward
behind `LearnedRewardWrapper`. Both use the same hyperparameters, so any gap between them is the reward's.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np

from rlhflab.control.trajectories import Policy
from rlhflab.errors import ConfigError

# Tasks the experiments know, with PPO settings that solve them on the true reward. Pendulum-v1's are the
# rl-baselines3-zoo's tuned ones (measured here: a return near -250 after about 25k steps). The short
# discount (0.9) suits the task: a swing-up is decided within a few dozen steps.
PPO_SETTINGS: dict[str, dict[str, Any]] = {
    "Pendulum-v1": {
        "n_envs": 4,
        "n_steps": 1024,
        "batch_size": 64,
        "gae_lambda": 0.95,
        "gamma": 0.9,
        "n_epochs": 10,
        "ent_coef": 0.0,
        "learning_rate": 1e-3,
        "clip_range": 0.2,
        "use_sde": True,
        "sde_sample_freq": 4,
    },
    # MuJoCo tasks (gymnasium[mujoco]) with the zoo's tuned settings for their v2/v3 versions, less its
    # observation normalization (VecNormalize would show the reward nets and the recorded segments normalized
    # observations the wrappers inside it do not see). Both have fixed-length episodes (50 and 1000 steps) and
    # no termination, like Pendulum. The zoo trains them for 1M steps: the experiments' Pendulum budgets are far
    # too short for them, and no result on them is reported yet.
    "Reacher-v5": {
        "n_envs": 1,
        "n_steps": 512,
        "batch_size": 32,
        "gamma": 0.9,
        "learning_rate": 1.04019e-4,
        "ent_coef": 7.52585e-08,
        "clip_range": 0.3,
        "n_epochs": 5,
        "gae_lambda": 1.0,
        "max_grad_norm": 0.9,
        "vf_coef": 0.950368,
    },
    "HalfCheetah-v5": {
        "n_envs": 1,
        "n_steps": 512,
        "batch_size": 64,
        "gamma": 0.98,
        "learning_rate": 2.0633e-05,
        "ent_coef": 0.000401762,
        "clip_range": 0.1,
        "n_epochs": 20,
        "gae_lambda": 0.92,
        "max_grad_norm": 0.8,
        "vf_coef": 0.58096,
        "policy_kwargs": {
            "log_std_init": -2.0,
            "ortho_init": False,
            "activation_fn": "relu",
            "net_arch": {"pi": [256, 256], "vf": [256, 256]},
        },
    },
}


def check_env_id(env_id: str) -> None:
    if env_id not in PPO_SETTINGS:
        raise ConfigError(f"control task '{env_id}' is not supported; known: {', '.join(PPO_SETTINGS)}")
    if env_id != "Pendulum-v1":
        try:
            import mujoco  # noqa: F401
        except ImportError:
            raise ConfigError(
                f"control task '{env_id}' is a MuJoCo environment and needs the mujoco package: "
                "pip install 'rlhflab[control]'"
            ) from None


def ppo_kwargs(env_id: str, total_steps: int) -> tuple[int, dict[str, Any]]:
    """(number of environments, PPO keyword arguments) for a run of `total_steps` steps.

    A run shorter than one rollout (n_envs x n_steps) gets shorter rollouts, so tiny test runs still update
    the policy; the minibatch never exceeds the rollout."""
    check_env_id(env_id)
    settings = copy.deepcopy(PPO_SETTINGS[env_id])
    if settings.get("policy_kwargs", {}).get("activation_fn") == "relu":
        from torch import nn

        settings["policy_kwargs"]["activation_fn"] = nn.ReLU
    n_envs = settings.pop("n_envs")
    settings["n_steps"] = max(8, min(settings["n_steps"], total_steps // n_envs))
    settings["batch_size"] = min(settings["batch_size"], settings["n_steps"] * n_envs)
    return n_envs, settings


def make_ppo(
    env_id: str,
    seed: int,
    total_steps: int,
    reward_fn: Callable[[np.ndarray], float] | None = None,
    reward_stats: tuple[float, float] = (0.0, 1.0),
):
    """A stable-baselines3 PPO on `n_envs` copies of `env_id`, each behind LearnedRewardWrapper(reward_fn,
    *reward_stats) when reward_fn is given, else on the true reward."""
    from stable_baselines3 import PPO
    from stable_baselines3.common.env_util import make_vec_env

    from rlhflab.control.wrappers import LearnedRewardWrapper

    n_envs, kwargs = ppo_kwargs(env_id, total_steps)
    wrapper = None
    if reward_fn is not None:
        mean, std = reward_stats

        def wrapper(env):
            return LearnedRewardWrapper(env, reward_fn, mean, std)

    venv = make_vec_env(env_id, n_envs=n_envs, seed=seed, wrapper_class=wrapper)
    return PPO("MlpPolicy", venv, seed=seed, verbose=0, device="cpu", **kwargs)


def policy_of(model, deterministic: bool = True) -> Policy:
    """The PPO model as an observation -> action function (its mean action when deterministic)."""

    def act(obs: np.ndarray) -> np.ndarray:
        return model.predict(obs, deterministic=deterministic)[0]

    return act


def checkpoints(env_id: str, seed: int, stages: Sequence[int]) -> Iterator[tuple[int, Any]]:
    """PPO on the true reward, yielding (steps trained, model) at each of the increasing step counts `stages`
    (0 = the initial, untrained policy). Use the model before advancing: training resumes in place."""
    if list(stages) != sorted(stages) or (stages and stages[0] < 0):
        raise ValueError(f"checkpoint stages must be non-negative and increasing, got {list(stages)}")
    model = make_ppo(env_id, seed, total_steps=max(stages[-1] - (stages[-2] if len(stages) > 1 else 0), 1))
    done = 0
    for stage in stages:
        if stage > done:
            model.learn(stage - done, reset_num_timesteps=False)
            done = stage
        yield done, model
