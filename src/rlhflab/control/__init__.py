"""Preference learning on gymnasium control tasks: T-REX, D-REX (Brown et al. 2019a, 2019b), deep RL from human
preferences (Christiano et al. 2017) and CPL (Hejna et al. 2023).

Reward learning from rankings and comparisons of behaviour, on environments whose true reward is known, so the
learned reward (or policy) can be judged by it. The environments are gymnasium's; the policy optimizer is
stable-baselines3's PPO (their code, driven by our reward wrapper); this package owns the preference parts:

- trajectories: rollouts of a policy with their true returns; sub-trajectory pairs from ranked trajectories
- segments: the short segments a labeller compares, and the Labeller protocol (a batch of queries -> answers)
- reward_model: a per-state reward MLP trained with `rlhflab.losses.trex`; predicted returns; pair accuracy
- ensemble: a bootstrapped ensemble of them fitted to segment comparisons; queries chosen by its disagreement
- christiano: the synthetic labeller, the label schedule, the reward refitted while PPO trains
- human: people as the Labeller, through the labelling app's segment items; clips: the segments drawn as GIFs
- cpl: regret labels from an expert's advantages, a Gaussian policy trained by the CPL loss (no RL)
- wrappers: a gymnasium wrapper that replaces the true reward by the learned one, standardized
- ppo: a thin driver of stable-baselines3 PPO (checkpoints of a run on the true reward; runs on a learned one)
- drex: behaviour cloning and epsilon-noise injection, the automatic rankings of D-REX
- rex: the part T-REX and D-REX share: ranked trajectories -> reward model -> PPO on it -> true-return report

Default task: Pendulum-v1. It is classic control (no MuJoCo build, a step costs microseconds), PPO solves it in
about 25k steps, so a run of the demonstrator and a run on the learned reward fit in a few CPU minutes, and its
episodes have a fixed length of 200 steps with no termination: the learned reward's offset cannot turn into a
bonus (or a penalty) for staying alive, a bias that tasks which end episodes on failure add to any learned
reward (Kostrikov et al. 2019, "Discriminator-Actor-Critic", Sec. 4.1). The MuJoCo tasks Reacher-v5 and
HalfCheetah-v5 (fixed-length episodes too) run with the rl-baselines3-zoo's PPO settings (`ppo.PPO_SETTINGS`).

gymnasium and stable-baselines3 are the optional extra `rlhflab[control]`; `require_control` says so when they
are missing.
"""

from __future__ import annotations

from rlhflab.errors import ConfigError


def require_control() -> None:
    """Raise a ConfigError that says what to install when gymnasium or stable-baselines3 is missing."""
    try:
        import gymnasium  # noqa: F401
        import stable_baselines3  # noqa: F401
    except ImportError as e:
        raise ConfigError(
            f"preference learning on control tasks needs gymnasium and stable-baselines3 ({e}); "
            "install them with: pip install 'rlhflab[control]'"
        ) from None
