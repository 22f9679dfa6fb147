"""Christiano et al. (2017) on control: the synthetic labeller's statistics, the label schedule, the reward
ensemble on synthetic labels, disagreement queries, the recorder's alignment, and one refit wired into PPO."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from rlhflab.control.christiano import (
    ChristianoSettings,
    PreferenceData,
    SyntheticLabeller,
    ask,
    episode_recorder,
    label_schedule,
    labelling_round,
    learn_from_preferences,
)
from rlhflab.control.ensemble import RewardEnsemble, disagreement, select_queries, stack_pairs
from rlhflab.control.segments import EQUAL, FIRST, SECOND, Segment
from rlhflab.errors import ConfigError, DataError


def _seg(rewards, obs=None) -> Segment:
    r = np.asarray(rewards, dtype=np.float64)
    obs = np.zeros((len(r), 2)) if obs is None else np.asarray(obs, dtype=np.float64)
    return Segment(obs, np.zeros((len(r), 1)), r)


def test_labeller_is_bradley_terry_with_ten_percent_random_answers():
    # R_1 - R_2 = T ln 3, so sigmoid((R_1 - R_2) / T) = 3/4; with 10% coin flips P[first] = 0.9 * 0.75 + 0.05.
    t = 5.0
    pair = (_seg([t * math.log(3.0)]), _seg([0.0]))
    labeller = SyntheticLabeller(temperature=t, random_prob=0.1, seed=0)
    assert labeller.prob_first(*pair) == pytest.approx(0.75)
    answers = np.array(labeller([pair] * 8000))
    assert set(answers.tolist()) <= {FIRST, SECOND}
    assert abs(answers.mean() - 0.725) < 0.02  # 4 standard errors
    # A perfect labeller (temperature 0) errs only through its random answers: half of 10% of the time.
    perfect = SyntheticLabeller(temperature=0.0, random_prob=0.1, seed=1)
    wrong = 1.0 - np.mean(perfect([(_seg([-1.0]), _seg([-50.0]))] * 8000))
    assert abs(wrong - 0.05) < 0.012
    exact = SyntheticLabeller(temperature=0.0, random_prob=0.0, tie=0.5)
    assert exact(
        [(_seg([-1.0]), _seg([-2.0])), (_seg([-2.0]), _seg([-1.0])), (_seg([-1.0]), _seg([-1.3]))]
    ) == [
        FIRST,
        SECOND,
        EQUAL,
    ]
    # Seeded: the same seed answers the same way.
    assert SyntheticLabeller(seed=3)([pair] * 50) == SyntheticLabeller(seed=3)([pair] * 50)
    with pytest.raises(ConfigError):
        SyntheticLabeller(random_prob=1.5)


def test_label_schedule_front_loads_and_sums_to_the_budget():
    s = label_schedule(100, 10, initial_fraction=0.25)
    assert sum(s) == 100 and s[0] == 25 and len(s) == 10
    assert all(a >= b for a, b in zip(s[1:], s[2:]))  # the rate falls
    assert s[1] > s[-1]
    assert label_schedule(7, 1) == [7]
    assert sum(label_schedule(3, 10)) == 3


class _Linear(nn.Module):
    def __init__(self, w):
        super().__init__()
        self.w = torch.tensor(w, dtype=torch.float32)

    def forward(self, x):
        return x @ self.w


def test_disagreement_queries_have_higher_ensemble_variance_than_random_ones():
    # Members r_k(s) = a_k * s[0] + s[1] with a = (1, 0, -1): they agree on segments whose s[0] is 0 (half of
    # them) and disagree on the others, so a pair of two agreed segments has zero variance.
    ens = RewardEnsemble(obs_dim=2, members=3)
    ens.members = [_Linear([a, 1.0]) for a in (1.0, 0.0, -1.0)]
    rng = np.random.default_rng(0)
    segments = []
    for k in range(40):
        obs = rng.normal(size=(5, 2))
        obs[:, 0] *= k % 2  # odd k: members disagree
        segments.append(_seg(np.zeros(5), obs))
    chosen = select_queries(ens, segments, 10, "disagreement", np.random.default_rng(1), candidates=10)
    uniform = select_queries(ens, segments, 200, "random", np.random.default_rng(2))
    var_chosen, var_uniform = disagreement(ens, chosen), disagreement(ens, uniform)
    assert len(chosen) == 10 and all(a is not b for a, b in chosen)
    assert var_chosen.mean() > 2 * var_uniform.mean()
    assert var_chosen.min() >= np.quantile(var_uniform, 0.5)
    assert min(np.abs(a.observations[:, 0]).sum() + np.abs(b.observations[:, 0]).sum() for a, b in chosen) > 0
    with pytest.raises(ConfigError, match="unknown query method"):
        select_queries(ens, segments, 1, "entropy", rng)


def _toy_segments(rng, n, length=10):
    """Segments of 2-D states with true reward -|s|^2, each with its own spread (the farther, the worse)."""
    out = []
    for _ in range(n):
        obs = rng.normal(0.0, rng.uniform(0.2, 2.0), size=(length, 2))
        out.append(_seg(-(obs**2).sum(axis=1), obs))
    return out


def test_ensemble_ranks_held_out_segments_above_chance_after_synthetic_labels():
    rng = np.random.default_rng(0)
    train = _toy_segments(rng, 200)
    queries = [(train[i], train[i + 1]) for i in range(0, 200, 2)] * 2
    labels = np.array(SyntheticLabeller(temperature=2.0, seed=0)(queries))
    first, second = stack_pairs(queries)
    ens = RewardEnsemble(obs_dim=2, members=3, hidden=32, seed=0)
    held = _toy_segments(np.random.default_rng(1), 200)
    pairs = [(held[i], held[i + 1]) for i in range(0, 200, 2)]
    truth = np.array([a.true_return > b.true_return for a, b in pairs])

    def accuracy():
        return float(np.mean((ens.preference_probs(*stack_pairs(pairs)).mean(0) > 0.5) == truth))

    before = accuracy()
    log = ens.fit(first, second, labels, steps=150, rng=np.random.default_rng(0))
    assert len(log) == 3 and all(m["accuracy"] > 0.7 for m in log)
    assert accuracy() > 0.85 and accuracy() > before + 0.1
    # Normalized: the ensemble reward has zero mean and unit spread per member over the states it was set on.
    states = np.concatenate([s.observations for s in held])
    ens.normalize(states)
    z = (ens.member_rewards(states) - np.array([m for m, _ in ens.stats])[:, None]) / np.array(
        [s for _, s in ens.stats]
    )[:, None]
    np.testing.assert_allclose(z.mean(1), 0.0, atol=1e-6)
    np.testing.assert_allclose(z.std(1), 1.0, atol=1e-6)
    assert ens.score(np.zeros((1, 2)))[0] > ens.score(np.full((1, 2), 3.0))[0]  # the origin is better


def test_ask_drops_cannot_tell_and_refuses_bad_answers():
    q = [(_seg([0.0]), _seg([1.0]))] * 3
    kept, y = ask(lambda qs: [1.0, float("nan"), 0.5], q)
    assert len(kept) == 2 and y.tolist() == [1.0, 0.5]
    with pytest.raises(DataError, match="answered 2 of 3"):
        ask(lambda qs: [1.0, 0.0], q)
    with pytest.raises(DataError, match="labels must be"):
        ask(lambda qs: [2.0, 0.0, 1.0], q)


def _pendulum_cost(obs):
    """Pendulum-v1's reward of a state without its action term: -(theta^2 + 0.1 theta_dot^2)."""
    theta = np.arctan2(obs[:, 1], obs[:, 0])
    return -(theta**2 + 0.1 * obs[:, 2] ** 2)


def test_recorder_and_one_refit_wired_into_ppo():
    from rlhflab.control.ppo import make_ppo

    ens = RewardEnsemble(obs_dim=3, members=2, hidden=16, seed=0)
    model = make_ppo("Pendulum-v1", seed=0, total_steps=832, reward_fn=ens)
    recorder = episode_recorder(keep=8, env_id="Pendulum-v1")
    model.learn(832, callback=recorder)
    episodes = list(recorder.episodes)
    assert len(episodes) == 4 and all(len(e) == 200 for e in episodes)  # one finished episode per environment
    for e in episodes:
        # The reward of step t+1 is the cost of the state step t reached (plus at most 0.001 * 2^2 for the
        # action): the recorded states, actions and true rewards line up.
        np.testing.assert_allclose(e.rewards[1:], _pendulum_cost(e.observations[:-1]), atol=0.0041)
    # One refit: labels from a perfect labeller, new weights, the wrappers' reward and normalization swapped.
    before = [p.detach().clone() for p in ens.members[0].parameters()]
    data = PreferenceData()
    settings = ChristianoSettings(labels=12, fit_steps=20, segment_length=25, members=2, hidden=16)
    log = labelling_round(
        model, ens, data, episodes, SyntheticLabeller(0.0, 0.0), 12, settings, np.random.default_rng(0)
    )
    assert len(data) == log["labels"] == 12 and data.first.shape == (12, 25, 3)
    assert any(not torch.equal(a, b) for a, b in zip(before, ens.members[0].parameters()))
    wrapper = model.get_env().envs[0]
    assert wrapper.reward_fn is ens and wrapper.std != 1.0
    states = np.concatenate([e.observations for e in episodes])
    z = (ens.score(states) - wrapper.mean) / wrapper.std
    assert abs(z.mean()) < 1e-6 and abs(z.std() - 1.0) < 1e-6  # standardized over the recent states
    obs, reward, *_ = model.get_env().step(np.zeros((4, 1), dtype=np.float32))
    assert reward[0] == pytest.approx((ens(obs[0]) - wrapper.mean) / wrapper.std, rel=1e-5)
    assert ens(obs[0]) == pytest.approx(float(ens.score(obs[0])), abs=1e-5)  # the batched per-step path


def test_learn_from_preferences_runs_the_loop_with_any_labeller():
    seen = []

    def labeller(queries):  # a "person" who cannot tell on every third query
        seen.append(len(queries))
        return [float("nan") if i % 3 == 2 else FIRST for i in range(len(queries))]

    settings = ChristianoSettings(
        labels=12, rl_steps=96, chunk=32, fit_steps=5, initial_episodes=2, eval_episodes=1
    )
    rounds = []
    out = learn_from_preferences("Pendulum-v1", labeller, settings, seed=0, on_round=rounds.append)
    assert [c["env_steps"] for c in out["curve"]] == [32, 64, 96]
    assert sum(seen) == 12 and out["labels_used"] == 12 - sum(n // 3 for n in seen)
    assert [c["labels"] for c in out["curve"]] == np.cumsum([r["answered"] for r in rounds]).tolist()
    assert len(out["policy_returns"]) == 1 and out["policy_returns"][0] < 0  # Pendulum's rewards are costs
    with pytest.raises(ConfigError, match="query must be one of"):
        ChristianoSettings(query="entropy")
