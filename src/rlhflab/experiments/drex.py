"""D-REX: better than the demonstrator from automatically ranked demonstrations (`rlhflab experiment drex`).

Brown, Goo and Niekum (2019b, "Better-than-Demonstrator Imitation Learning via Automatically-Ranked
Demonstrations", CoRL; the MuJoCo and Atari results) need no ranking from anyone: they clone a suboptimal
demonstrator, roll the clone out with increasing epsilon-greedy noise, rank the rollouts by their noise (more
noise = worse), learn a reward from that ranking with T-REX, and run RL on it; the policy beats the
demonstrations (and behaviour cloning). Here, per seed, on Pendulum-v1 (see `rlhflab.control`): the demonstrator
is stable-baselines3 PPO stopped after `demos.steps` steps on the true reward, giving `demos.episodes`
demonstrations (its mean action); behaviour cloning regresses their actions; `noise.levels` noise levels from
0.02 to 1.0 give `noise.rollouts` rollouts each. The ranking puts the demonstrations above every noisy
rollout (our choice: the clone with noise is assumed no better than the demonstrator it imitates), then the
rollouts by decreasing noise. Held-out trajectories, `eval.heldout` fresh noisy rollouts per level from other
start states, measure the learned reward's ranking; the rule is T-REX's, with the demonstrator's
demonstrations in place of the checkpoints'.

Defaults, from three runs of seed 0 before this one: 10 demonstrations of PPO after 16384 steps, 3000 cloning
steps (with 5 demonstrations and 1000 steps the clone returned about -900 against the demonstrator's -470, and
the learned reward ranked held-out rollouts with a Spearman correlation near 0.45; with these, -580 and 0.97),
5 noise levels of 3 rollouts, and 49152 PPO steps on the learned reward (more than T-REX's 32768: with 32768 the
policy stayed well below the demonstrations' predicted return, under-optimized).
"""

from __future__ import annotations

import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from rlhflab.experiments import trex

NAME = "drex"
CLAIM = (
    "A reward learned by T-REX from rollouts of a behaviour-cloned policy ranked by injected noise lets RL exceed "
    "the demonstrations' true return, and its predicted returns rank held-out trajectories like the true returns."
)
SOURCE = (
    "Brown, Goo and Niekum 2019, Better-than-Demonstrator Imitation Learning via Automatically-Ranked "
    "Demonstrations (CoRL), the MuJoCo and Atari results (D-REX vs the best demonstration and BC)"
)
RULE = (
    "On each seed, the learned policy beats the best demonstration when the lower end of the 95% interval of its "
    "mean true return (over the evaluation episodes) is above the best of the demonstrator's demonstrations. "
    "reproduced: it beats it on every seed and the Spearman correlation of predicted vs true returns on held-out "
    f"noisy rollouts is at least {trex.MIN_SPEARMAN} on every seed; partly reproduced: it beats it on at least "
    "one seed, or the policy's mean true return is above the demonstrations' mean on every seed; otherwise not "
    "reproduced."
)
TASK = trex.TASK
RANK_AXIS = "clone's noise epsilon, then the demonstrations (rank)"
DEMO_SEED, NOISE_SEED, HELDOUT_SEED = 10_000, 40_000, 20_000
OWN = {
    "demos": {"steps": 16384, "episodes": 10},
    "bc": {"steps": 3000},
    "noise": {"levels": 5, "rollouts": 3},
    "reward": dict(trex.OWN["reward"]),
    "rl": {"steps": 49152},
    "eval": dict(trex.OWN["eval"]),
}


def decide(rows: Sequence[Mapping]) -> str:
    """T-REX's rule, the demonstrator's demonstrations being the ones to beat."""
    return trex.decide(rows)


def findings(rows: Sequence[Mapping]) -> list[str]:
    return [
        f"{line}; behaviour cloning (epsilon 0.02) {r['bc_return']:.1f}, fully random {r['random_return']:.1f}"
        for line, r in zip(trex.findings(rows), rows)
    ]


def check(own: Mapping[str, Mapping[str, int]]) -> None:
    from rlhflab.errors import ConfigError

    if own["noise"]["levels"] < 2:
        raise ConfigError(f"{NAME}: noise.levels must be at least 2 (a ranking needs two noise levels)")


def noisy_rollouts(env, policy, epsilons, episodes: int, seed: int, top_rank: int):
    """(trajectories, ranks): `episodes` rollouts of `policy` with each noise level; the first (smallest)
    epsilon gets rank top_rank - 1, each next one a rank lower."""
    from rlhflab.control.drex import noisy_policy
    from rlhflab.control.trajectories import rollout

    rng = np.random.default_rng(seed)
    low, high = env.action_space.low, env.action_space.high
    trajectories, ranks = [], []
    for k, eps in enumerate(epsilons):
        trajectories += rollout(env, noisy_policy(policy, eps, rng, low, high), episodes, seed=seed + 100 * k)
        ranks += [top_rank - 1 - k] * episodes
    return trajectories, ranks


def run_seed(env_id: str, seed: int, own: Mapping[str, Mapping[str, int]]) -> dict:
    """One seed: the demonstrator, behaviour cloning, noise rankings, T-REX and PPO on the learned reward."""
    import gymnasium as gym

    from rlhflab.control.drex import behaviour_clone, noise_schedule
    from rlhflab.control.ppo import checkpoints, policy_of
    from rlhflab.control.rex import reward_extrapolation
    from rlhflab.control.trajectories import rollout
    from rlhflab.core.seeding import seed_everything

    seed_everything(seed)
    env = gym.make(env_id)
    # 1. the suboptimal demonstrator and its demonstrations (nothing else of it is used)
    _, model = next(iter(checkpoints(env_id, seed, [own["demos"]["steps"]])))
    demos = rollout(env, policy_of(model), own["demos"]["episodes"], seed=DEMO_SEED)
    # 2. behaviour cloning, then rollouts of the clone at increasing noise: the automatic ranking
    low, high = env.action_space.low, env.action_space.high
    bc, _ = behaviour_clone(demos, low, high, steps=own["bc"]["steps"], seed=seed)
    epsilons = noise_schedule(own["noise"]["levels"])
    top = len(epsilons)
    noisy, noisy_ranks = noisy_rollouts(env, bc.act, epsilons, own["noise"]["rollouts"], NOISE_SEED, top)
    held, held_ranks = noisy_rollouts(env, bc.act, epsilons, own["eval"]["heldout"], HELDOUT_SEED, top)
    env.close()
    ranked, ranks = [*noisy, *demos], [*noisy_ranks, *[top] * len(demos)]
    # 3. T-REX on the automatic ranking, PPO on the learned reward, the true reward's verdict
    rex = reward_extrapolation(env_id, ranked, ranks, held, held_ranks, trex.rex_settings(own), seed)
    demo_returns = [t.true_return for t in demos]
    by_eps = {eps: [t.true_return for t, r in zip(noisy, noisy_ranks) if r == top - 1 - k] for k, eps in
              enumerate(epsilons)}  # fmt: skip
    row = trex.seed_row(seed, demo_returns, [top] * len(demos), rex)
    del row["worst_demonstrator_mean"]  # one demonstrator: nothing to tell apart
    row["bc_return"] = float(np.mean(by_eps[epsilons[0]]))
    row["random_return"] = float(np.mean(by_eps[epsilons[-1]]))
    labels = [f"eps {e:.2f}" for e in reversed(epsilons)] + ["demos"]
    return {
        "row": row,
        "plot": {"ranks": ranks, "labels": labels, "demo_true": [t.true_return for t in ranked], **rex},
    }


def run(
    seeds: Sequence[int] = (0,),
    output_dir: str = "runs/drex",
    *,
    task: str | None = None,
    overrides: Sequence[str] = (),
    overwrite: bool = False,
    resume: bool = False,
) -> Path:
    """Run the experiment; returns the path of report.html. With `resume`, seeds whose seed.json exists are
    read back, not run again."""
    return trex.run_experiment(sys.modules[__name__], seeds, output_dir, task, overrides, overwrite, resume)
