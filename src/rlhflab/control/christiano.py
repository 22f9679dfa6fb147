"""Deep RL from preferences (Christiano et al. 2017) with stable-baselines3 PPO as the policy optimizer.

Christiano, Leike, Brown, Martic, Legg and Amodei ("Deep Reinforcement Learning from Human Preferences", NeurIPS
2017, Sec. 2.2) run three processes at once: the policy learns on the current learned reward; pairs of short
segments of its recent behaviour go to a labeller; the reward model is refit on every label so far. Here they
alternate: PPO for `chunk` environment steps, then a batch of labels on segments of that chunk's episodes, a
refit of the ensemble (`rlhflab.control.ensemble`), a new normalization, and PPO continues on the new reward in
place. `learn_from_preferences` takes any Labeller: the synthetic one below, or a person behind the label app.

Label schedule: like Christiano et al. (App. A) a share of the budget (25%) is spent on the untrained policy's
behaviour before any RL, and the rest at a rate that falls as training goes on, proportional to
1 / (1 + t / T) after t steps (their T is 2e6 frames; ours is a quarter of the run): early labels shape the
reward the whole run relies on; late ones correct what the policy has learned to exploit.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from rlhflab.control.ensemble import QUERY_METHODS, RewardEnsemble, select_queries, stack_pairs
from rlhflab.control.segments import EQUAL, FIRST, SECOND, Labeller, Segment, segment_of
from rlhflab.errors import ConfigError, DataError

EVAL_SEED = 30_000  # the evaluation start states, as in rlhflab.control.rex
INITIAL_SEED = 50_000  # start states of the untrained policy's episodes, the first labels' material


@dataclass(frozen=True)
class ChristianoSettings:
    """labels: the label budget; rl_steps: PPO environment steps; chunk: steps between refits (4096 = one PPO
    rollout of Pendulum's 4 x 1024); segment_length: steps per segment (25 = 1.25 s at Pendulum's dt = 0.05 s;
    Christiano et al. show 1-2 s clips); members: ensemble size; hidden: each net's width; fit_steps: Adam steps
    per member per refit (warm-started, so a few each time); batch_size: labelled pairs per Adam step;
    weight_decay: the L2 penalty; initial_fraction: the budget's share spent before RL; initial_episodes:
    episodes of the untrained policy those first labels come from; candidates: candidate pairs per query for
    disagreement selection; query: "disagreement" or "random"; eval_episodes: evaluation episodes
    (deterministic policy, fixed start states) after each chunk."""

    labels: int = 100
    rl_steps: int = 40960
    chunk: int = 4096
    segment_length: int = 25
    members: int = 3
    hidden: int = 64
    fit_steps: int = 100
    batch_size: int = 32
    weight_decay: float = 1e-4
    initial_fraction: float = 0.25
    initial_episodes: int = 8
    candidates: int = 10
    query: str = "disagreement"
    eval_episodes: int = 10

    def __post_init__(self):
        for name in (
            "labels",
            "rl_steps",
            "chunk",
            "segment_length",
            "members",
            "hidden",
            "fit_steps",
            "batch_size",
        ):
            if getattr(self, name) < 1:
                raise ConfigError(f"christiano: {name} must be a positive integer, got {getattr(self, name)}")
        if not 0.0 <= self.initial_fraction <= 1.0:
            raise ConfigError(f"christiano: initial_fraction must be in [0, 1], got {self.initial_fraction}")
        if self.query not in QUERY_METHODS:
            raise ConfigError(
                f"christiano: query must be one of {', '.join(QUERY_METHODS)}, got '{self.query}'"
            )
        if self.initial_episodes < 1 or self.eval_episodes < 1:
            raise ConfigError("christiano: initial_episodes and eval_episodes must be at least 1")


class SyntheticLabeller:
    """A simulated labeller who reads the true reward: P[first preferred] = sigmoid((R_1 - R_2) / temperature)
    (Bradley-Terry on the true segment returns), except that with probability `random_prob` the answer is
    uniformly random (Christiano et al. Sec. 2.2.3 assume 10% such answers of people). temperature 0: the
    better return is always chosen, and returns within `tie` of each other are answered EQUAL."""

    name = "synthetic"

    def __init__(self, temperature: float = 5.0, random_prob: float = 0.1, seed: int = 0, tie: float = 0.0):
        if temperature < 0 or tie < 0 or not 0.0 <= random_prob <= 1.0:
            raise ConfigError(
                f"labeller: temperature and tie must be >= 0 and random_prob in [0, 1], got {temperature}, "
                f"{tie}, {random_prob}"
            )
        self.temperature, self.random_prob, self.tie = temperature, random_prob, tie
        self.rng = np.random.default_rng(seed)

    def prob_first(self, first: Segment, second: Segment) -> float:
        """P[first preferred] before the random answers are mixed in."""
        diff = first.true_return - second.true_return
        if self.temperature == 0:
            return 0.5 if abs(diff) <= self.tie else float(diff > 0)
        return 1.0 / (1.0 + math.exp(-max(min(diff / self.temperature, 50.0), -50.0)))

    def __call__(self, queries: Sequence[tuple[Segment, Segment]]) -> list[float]:
        answers = []
        for first, second in queries:
            if self.rng.random() < self.random_prob:
                answers.append(FIRST if self.rng.random() < 0.5 else SECOND)
                continue
            p = self.prob_first(first, second)
            if self.temperature == 0:
                answers.append(FIRST if p == 1.0 else SECOND if p == 0.0 else EQUAL)
            else:
                answers.append(FIRST if self.rng.random() < p else SECOND)
        return answers


def label_schedule(
    budget: int, rounds: int, initial_fraction: float = 0.25, half_life: float = 0.25
) -> list[int]:
    """Labels to ask for in each of `rounds` rounds (round 0 before any RL, round k after chunk k), summing to
    `budget`: round 0 gets `initial_fraction` of it, round k >= 1 a share proportional to 1 / (1 + k / (half_life
    * rounds)) (Christiano et al. App. A). Whole numbers by largest remainder."""
    if rounds < 1:
        raise ConfigError(f"a label schedule needs at least one round, got {rounds}")
    if rounds == 1:
        return [budget]
    rest = [1.0 / (1.0 + k / (half_life * rounds)) for k in range(1, rounds)]
    share = np.array([initial_fraction] + [(1 - initial_fraction) * w / sum(rest) for w in rest]) * budget
    counts = np.floor(share).astype(int)
    for k in np.argsort(-(share - counts), kind="stable")[: budget - counts.sum()]:
        counts[k] += 1
    return counts.tolist()


def cut_segments(episodes: Sequence[Segment], n: int, length: int, rng: np.random.Generator) -> list[Segment]:
    """`n` segments of `length` steps, each from an episode drawn uniformly, starting uniformly within it."""
    usable = [e for e in episodes if len(e) >= length]
    if not usable:
        raise ValueError(f"no episode has the {length} steps a segment needs")
    out = []
    for _ in range(n):
        e = usable[int(rng.integers(len(usable)))]
        a = int(rng.integers(0, len(e) - length + 1))
        out.append(Segment(e.observations[a : a + length], e.actions[a : a + length], e.rewards[a : a + length],
                           e.env_id))  # fmt: skip
    return out


def episode_recorder(keep: int, env_id: str):
    """An SB3 callback keeping the last `keep` finished training episodes as Segments (reached states, actions,
    true rewards from the wrapper's info["true_reward"])."""
    from stable_baselines3.common.callbacks import BaseCallback

    class EpisodeRecorder(BaseCallback):
        def __init__(self):
            super().__init__()
            self.episodes: deque[Segment] = deque(maxlen=keep)
            self.open: list[tuple[list, list, list]] | None = None

        def _on_step(self) -> bool:
            obs, infos, dones = self.locals["new_obs"], self.locals["infos"], self.locals["dones"]
            actions = self.locals["clipped_actions"]
            if self.open is None:
                self.open = [([], [], []) for _ in infos]
            for i, info in enumerate(infos):
                reached = (
                    info["terminal_observation"] if dones[i] else obs[i]
                )  # obs[i] is already the next reset
                o, a, r = self.open[i]
                o.append(np.asarray(reached))
                a.append(np.asarray(actions[i]))
                r.append(float(info["true_reward"]))
                if dones[i]:
                    self.episodes.append(Segment(np.stack(o), np.stack(a), np.asarray(r), env_id))
                    self.open[i] = ([], [], [])
            return True

    return EpisodeRecorder()


def batch_rollout(env_id: str, model, episodes: int, seed: int, deterministic: bool = True) -> list:
    """`episodes` Trajectories of the PPO model, episode i reset with seed + i as in `rollout`, run side by side:
    one policy call per step for all of them (a call costs far more than a Pendulum step)."""
    import gymnasium as gym

    from rlhflab.control.trajectories import Trajectory

    envs = [gym.make(env_id) for _ in range(episodes)]
    obs = [env.reset(seed=seed + i)[0] for i, env in enumerate(envs)]
    record = [([o], [], []) for o in obs]
    live = list(range(episodes))
    while live:
        actions = model.predict(np.stack([obs[i] for i in live]), deterministic=deterministic)[0]
        still = []
        for i, action in zip(live, actions):
            obs[i], reward, terminated, truncated, _ = envs[i].step(action)
            for seq, x in zip(record[i], (obs[i], action, float(reward))):
                seq.append(x)
            if not (terminated or truncated):
                still.append(i)
        live = still
    for env in envs:
        env.close()
    return [Trajectory(np.asarray(o), np.asarray(a), np.asarray(r)) for o, a, r in record]


def evaluate(env_id: str, model, episodes: int) -> list[float]:
    """True returns of the model's mean action from the fixed evaluation start states."""
    return [t.true_return for t in batch_rollout(env_id, model, episodes, EVAL_SEED)]


def ask(labeller: Labeller, queries: list[tuple[Segment, Segment]]) -> tuple[list, np.ndarray]:
    """(the queries answered, their labels): the labeller's answers, checked; "cannot tell" (NaN) dropped."""
    answers = list(labeller(queries)) if queries else []
    if len(answers) != len(queries):
        raise DataError(f"the labeller answered {len(answers)} of {len(queries)} queries")
    y = np.asarray(answers, dtype=np.float64)
    if np.any((y < 0) | (y > 1)):
        raise DataError(f"labels must be 1.0 (first), 0.0 (second), 0.5 (equal) or NaN, got {answers}")
    keep = ~np.isnan(y)
    return [q for q, k in zip(queries, keep) if k], y[keep]


def set_reward(model, ensemble: RewardEnsemble, states: np.ndarray) -> tuple[float, float]:
    """Renormalize the ensemble over `states` and give every environment's LearnedRewardWrapper the ensemble's
    (mean, std) over them, in place: PPO continues with the refit reward from its next step."""
    from rlhflab.control.wrappers import LearnedRewardWrapper, reward_stats

    ensemble.normalize(states)
    mean, std = reward_stats(ensemble.score(states))
    for env in model.get_env().envs:
        while not isinstance(env, LearnedRewardWrapper):
            env = env.env
        env.reward_fn, env.mean, env.std = ensemble, mean, std
    return mean, std


def _spearman_true(ensemble: RewardEnsemble, episodes: Sequence[Segment]) -> float:
    from rlhflab.eval.metrics import spearman

    states = np.concatenate([e.observations for e in episodes])
    return float(spearman(ensemble.score(states), np.concatenate([e.rewards for e in episodes])))


class PreferenceData:
    """Every labelled pair so far: first, second [N, L, obs_dim] and labels [N] (the reward model refits on all)."""

    def __init__(self):
        self.first = self.second = self.labels = None

    def __len__(self) -> int:
        return 0 if self.labels is None else len(self.labels)

    def add(self, first: np.ndarray, second: np.ndarray, labels: np.ndarray) -> None:
        if self.labels is None:
            self.first, self.second, self.labels = first, second, labels
        else:
            self.first = np.concatenate([self.first, first])
            self.second = np.concatenate([self.second, second])
            self.labels = np.concatenate([self.labels, labels])


def labelling_round(
    model,
    ensemble: RewardEnsemble,
    data: PreferenceData,
    episodes: Sequence[Segment],
    labeller: Labeller,
    n: int,
    settings: ChristianoSettings,
    rng: np.random.Generator,
) -> dict | None:
    """Ask `n` queries on segments of `episodes`, add the answers to `data`, refit the ensemble on all of it,
    renormalize over the episodes' states and swap the reward into PPO's wrappers. Returns the round's log
    (None when every answer was "cannot tell"): asked, answered, labels (total), agreement (the ensemble's
    predicted preference vs the new answers, before refitting on them), reward_spearman (learned vs true
    per-step reward over the episodes' states), loss."""
    pool = cut_segments(episodes, max(2, 2 * n * settings.candidates), settings.segment_length, rng)
    asked = select_queries(ensemble, pool, n, settings.query, rng, settings.candidates)
    queries, y = ask(labeller, asked)
    if not len(y):
        return None
    f, s = stack_pairs(queries)
    decided = y != EQUAL
    predicted = ensemble.preference_probs(f, s).mean(0) > 0.5
    agreement = float(np.mean(predicted[decided] == (y[decided] > 0.5))) if decided.any() else float("nan")
    data.add(f, s, y)
    fit = ensemble.fit(
        data.first,
        data.second,
        data.labels,
        steps=settings.fit_steps,
        rng=rng,
        weight_decay=settings.weight_decay,
    )
    set_reward(model, ensemble, np.concatenate([e.observations for e in episodes]))
    return {
        "asked": len(asked),
        "answered": len(y),
        "labels": len(data),
        "agreement": agreement,
        "reward_spearman": _spearman_true(ensemble, episodes),
        "loss": float(np.mean([m["loss"] for m in fit])),
    }


def learn_from_preferences(
    env_id: str,
    labeller: Labeller,
    settings: ChristianoSettings,
    seed: int,
    on_round: Callable[[dict], None] | None = None,
    save_dir: Path | None = None,
) -> dict:
    """PPO on a reward learned from `labeller`'s answers while the policy trains; the true reward judges it.

    Returns {"curve": [{env_steps, labels, true_return}] after each chunk, "refits": [`labelling_round`'s log
    with round and env_steps], "policy_returns" (the final policy's evaluation episodes), "labels_used"}.
    on_round(log entry) is called after each refit (progress for a person labelling). With `save_dir`, the
    policy is saved there as policy.zip (stable-baselines3's format) and the reward ensemble as reward.pt (each
    member's state_dict and its normalization).
    """
    import gymnasium as gym

    from rlhflab.control.ppo import make_ppo

    rng = np.random.default_rng(seed)
    rounds = math.ceil(settings.rl_steps / settings.chunk)
    schedule = label_schedule(settings.labels, rounds, settings.initial_fraction)
    probe = gym.make(env_id)
    obs_dim = probe.observation_space.shape[0]
    probe.close()
    ensemble = RewardEnsemble(obs_dim, settings.members, settings.hidden, seed)
    model = make_ppo(env_id, seed, settings.rl_steps, reward_fn=ensemble)
    recorder = episode_recorder(keep=max(8, settings.chunk // 200 + 1), env_id=env_id)
    # 0. the untrained policy's own behaviour (sampled actions, as PPO acts) gives the first segments
    first = batch_rollout(
        env_id, model, settings.initial_episodes, INITIAL_SEED + 100 * seed, deterministic=False
    )
    episodes = [segment_of(t, 0, len(t), env_id) for t in first]
    data, curve, refits, done, returns = PreferenceData(), [], [], 0, []
    for k in range(rounds):
        # 1. labels on recent behaviour, refit, the new reward swapped into PPO's environments in place
        if schedule[k] > 0:
            log = labelling_round(model, ensemble, data, episodes, labeller, schedule[k], settings, rng)
            if log is not None:
                refits.append({"round": k, "env_steps": done, **log})
                if on_round is not None:
                    on_round(refits[-1])
        # 2. PPO on the current learned reward; its episodes are the next round's material
        steps = min(settings.chunk, settings.rl_steps - done)
        model.learn(steps, callback=recorder, reset_num_timesteps=done == 0)
        done += steps
        episodes = list(recorder.episodes) or episodes
        # 3. the true reward, never seen by the learner, judges the policy
        returns = evaluate(env_id, model, settings.eval_episodes)
        curve.append({"env_steps": done, "labels": len(data), "true_return": float(np.mean(returns))})
    if save_dir is not None:
        import torch

        model.save(Path(save_dir) / "policy.zip")
        members = [m.state_dict() for m in ensemble.members]
        torch.save({"members": members, "stats": ensemble.stats}, Path(save_dir) / "reward.pt")
    return {"curve": curve, "refits": refits, "policy_returns": returns, "labels_used": len(data)}


def true_reward_curve(env_id: str, settings: ChristianoSettings, seed: int) -> dict:
    """The reference: the same PPO on the true reward, same steps and chunks; {"curve", "policy_returns"}."""
    from rlhflab.control.ppo import make_ppo

    model = make_ppo(env_id, seed, settings.rl_steps)
    curve, done, returns = [], 0, []
    while done < settings.rl_steps:
        steps = min(settings.chunk, settings.rl_steps - done)
        model.learn(steps, reset_num_timesteps=done == 0)
        done += steps
        returns = evaluate(env_id, model, settings.eval_episodes)
        curve.append({"env_steps": done, "labels": 0, "true_return": float(np.mean(returns))})
    return {"curve": curve, "policy_returns": returns}
