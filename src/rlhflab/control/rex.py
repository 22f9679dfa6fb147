"""What T-REX and D-REX share: ranked trajectories -> a per-state reward -> PPO on it -> the true return.

`reward_extrapolation` runs the method on trajectories someone (checkpoint order for T-REX, noise order for
D-REX) has ranked, then measures what the true reward, never seen by the learner, says of the result: the
learned policy's true return and how well the learned reward orders trajectories it was not trained on.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from rlhflab.control.reward_model import predicted_returns, ranked_pair_accuracy, train_trex_reward
from rlhflab.control.trajectories import Trajectory, rollout, sample_trex_pairs
from rlhflab.eval.metrics import mean_ci95, spearman

EVAL_SEED = 30_000  # evaluation episodes start from the same states on every seed and in every experiment


@dataclass(frozen=True)
class RexSettings:
    """pairs: snippet pairs drawn; length: snippet length (states); reward_steps: Adam steps on the T-REX loss;
    hidden: the reward MLP's width; rl_steps: PPO environment steps on the learned reward; eval_episodes:
    evaluation episodes of the learned policy."""

    pairs: int = 2000
    length: int = 50
    reward_steps: int = 300
    hidden: int = 64
    rl_steps: int = 32768
    eval_episodes: int = 10


def reward_extrapolation(
    env_id: str,
    ranked: Sequence[Trajectory],
    ranks: Sequence[int],
    heldout: Sequence[Trajectory],
    heldout_ranks: Sequence[int],
    settings: RexSettings,
    seed: int,
) -> dict:
    """Learn a reward from `ranked` (ranks: higher = better), run PPO on it, evaluate on the true reward.

    heldout: trajectories from the same sources, never trained on, with their ranks. Returns the numbers of
    the report: the policy's true returns (and 95% interval), the reward model's training log, its accuracy
    on held-out pairs of different rank, and the Spearman correlation of predicted vs true returns on the
    held-out trajectories (with and without the learned policy's own episodes), plus the per-trajectory
    predicted and true returns for the plots.
    """
    import gymnasium as gym

    from rlhflab.control.ppo import make_ppo, policy_of
    from rlhflab.control.wrappers import reward_stats

    # 1. snippet pairs from the ranked trajectories, and the T-REX reward on them
    rng = np.random.default_rng(seed)
    chosen, rejected = sample_trex_pairs(ranked, ranks, settings.pairs, settings.length, rng)
    net, log = train_trex_reward(
        chosen, rejected, hidden=settings.hidden, steps=settings.reward_steps, seed=seed
    )
    # 2. standardize over the states the reward was learned on, then PPO sees only the learned reward
    mean, std = reward_stats(net.score(np.concatenate([t.states for t in ranked])))
    model = make_ppo(
        env_id, seed, settings.rl_steps, reward_fn=lambda obs: float(net.score(obs)), reward_stats=(mean, std)
    )
    model.learn(settings.rl_steps)
    # 3. the true reward judges the policy, from fixed start states
    env = gym.make(env_id)
    episodes = rollout(env, policy_of(model), settings.eval_episodes, seed=EVAL_SEED)
    env.close()
    returns = [t.true_return for t in episodes]
    policy_mean, low, high = mean_ci95(returns)
    # 4. does the learned reward order unseen trajectories like the true reward?
    held_pred, held_true = predicted_returns(net, heldout), np.array([t.true_return for t in heldout])
    pol_pred = predicted_returns(net, episodes)
    return {
        "policy_returns": returns,
        "policy_return": policy_mean,
        "policy_ci_low": low,
        "policy_ci_high": high,
        "reward_log": log,
        "reward_train_accuracy": log[-1]["reward/accuracy"],
        "heldout_pair_accuracy": ranked_pair_accuracy(held_pred, heldout_ranks),
        "spearman_heldout": spearman(held_pred, held_true),
        "spearman_with_policy": spearman(
            np.concatenate([held_pred, pol_pred]), np.concatenate([held_true, returns])
        ),
        "ranked_predicted": predicted_returns(net, ranked).tolist(),
        "heldout_predicted": held_pred.tolist(),
        "heldout_true": held_true.tolist(),
        "policy_predicted": pol_pred.tolist(),
    }
