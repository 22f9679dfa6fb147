"""`rlhflab rm algo.loss=distributional`: the stage's wiring to `losses.reward.distributional_preference`, what it
saves, how `rewards.DistributionalReward` scores it, and that its variance learns where labels disagree.

The wiring check records the model and the batch of the first real optimizer step inside `reward.train`, then
recomputes that step's loss from the pure function on rewards scored independently (one row per response through
`LearnedReward.encode`, not the stage's collated, shared-prompt rows): a swap of chosen and rejected, of the mean
and log-variance columns, or a dropped centering term changes the value.
"""

from __future__ import annotations

import copy
import random

import pytest
import torch

from rlhflab.core.metrics_log import read_metrics
from rlhflab.errors import ConfigError
from rlhflab.losses.reward import distributional_preference, reward_centering
from rlhflab.models.loading import load_tokenizer
from rlhflab.rewards import DistributionalReward, LearnedReward, load_reward
from rlhflab.stages import reward

from ..helpers import SHORT_TEXT, stage_config, write_jsonl

SUBJECTS = ["the cat", "the dog", "the film", "the day", "this movie", "it"]


def _pairs(n=48, seed=0):
    """Uncontested pairs about the dog (good over bad, always) and contested ones about the cat (good over bad or
    bad over good, alternately: two groups of annotators who disagree)."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        s = rng.choice(SUBJECTS)
        topic = "cat" if i % 2 else "dog"
        good, bad = f"{s} is very good .", f"{s} is very bad ."
        flip = topic == "cat" and (i // 2) % 2 == 1
        chosen, rejected = (bad, good) if flip else (good, bad)
        rows.append({"prompt": f"what is the {topic} ?", "chosen": chosen, "rejected": rejected})
    return rows


def _cfg(model_dir, out, data, *extra):
    return stage_config("rm", model_dir, *SHORT_TEXT, "algo.loss=distributional", *extra, data=data, out=out)


def test_one_step_is_the_pure_function_on_independently_scored_rows(tiny_model_dir, tmp_path, monkeypatch):
    data = write_jsonl(tmp_path / "pairs.jsonl", _pairs(16))
    cfg = _cfg(tiny_model_dir, tmp_path / "run", data, "optim.max_steps=1", "algo.center_rewards_coef=0.3")
    recorded = {}
    original = reward._reward_gradients

    def record(model, examples, *args, **kwargs):
        recorded.setdefault("model", copy.deepcopy(model))
        recorded.setdefault("examples", list(examples))
        return original(model, examples, *args, **kwargs)

    monkeypatch.setattr(reward, "_reward_gradients", record)
    final = reward.train(cfg)
    model, examples = recorded["model"], recorded["examples"]
    assert model.head_names == ["mean", "log_var"] and len(examples) == 8

    # The same records, scored one response per row through the scoring path.
    records = {(r["prompt"], r["chosen"], r["rejected"]) for r in _pairs(16)}
    by_ids = {}
    scorer = LearnedReward(model, load_tokenizer(final), max_length=32, max_prompt_length=16)
    for p, c, r in records:
        by_ids[tuple(scorer.encode(p, c))] = (p, c)
        by_ids[tuple(scorer.encode(p, r))] = (p, r)
    chosen = [by_ids[tuple(e["chosen_input_ids"])] for e in examples]
    rejected = [by_ids[tuple(e["rejected_input_ids"])] for e in examples]
    model.eval()  # no dropout in the tiny model; eval only so scoring and training read the same numbers
    c = scorer.score_all_heads([p for p, _ in chosen], [x for _, x in chosen]).double()
    r = scorer.score_all_heads([p for p, _ in rejected], [x for _, x in rejected]).double()
    expected = distributional_preference(c[:, 0], c[:, 1], r[:, 0], r[:, 1]).loss
    expected = expected + 0.3 * reward_centering(torch.stack([c[:, 0], r[:, 0]], 1))
    logged = [row for row in read_metrics(tmp_path / "run" / "metrics.jsonl") if "loss/rm" in row][0]
    assert logged["loss/rm"] == pytest.approx(float(expected.mean()), rel=1e-4, abs=1e-5)
    # A swap of the columns (log-variance read as the mean) would give another value.
    swapped = distributional_preference(c[:, 1], c[:, 0], r[:, 1], r[:, 0]).loss.mean()
    assert abs(float(swapped) - logged["loss/rm"]) > 1e-3


def test_saved_model_scores_its_mean_and_std(tiny_model_dir, tmp_path):
    data = write_jsonl(tmp_path / "pairs.jsonl", _pairs(16))
    final = reward.train(_cfg(tiny_model_dir, tmp_path / "run", data, "optim.max_steps=2"))
    mean_rm = LearnedReward.from_pretrained(final)
    assert isinstance(mean_rm, DistributionalReward) and mean_rm.risk_aversion == 0
    prompts, responses = ["what is the cat ?"] * 2, ["the cat is very good .", "the dog is very bad ."]
    heads = mean_rm.score_all_heads(prompts, responses)
    mu, sigma = mean_rm.mean_std(prompts, responses)
    torch.testing.assert_close(mu, heads[:, 0])
    torch.testing.assert_close(sigma, torch.exp(0.5 * heads[:, 1]))
    torch.testing.assert_close(mean_rm.score(prompts, responses), mu)
    averse = load_reward(f"{final}:risk_aversion=2")
    torch.testing.assert_close(averse.score(prompts, responses), mu - 2 * sigma)
    whitened = LearnedReward.from_pretrained(final, normalize=True)
    m, s = float(whitened.model.reward_mean[0]), float(whitened.model.reward_std[0])
    w_mu, w_sigma = whitened.mean_std(prompts, responses)
    torch.testing.assert_close(w_mu, (mu - m) / s)
    torch.testing.assert_close(w_sigma, sigma / s)
    with pytest.raises(ConfigError, match="scores by its mean"):
        LearnedReward.from_pretrained(final, head="log_var")
    with pytest.raises(ConfigError, match="risk_aversion must be >= 0"):
        LearnedReward.from_pretrained(final, risk_aversion=-1.0)


def test_a_bradley_terry_model_refuses_risk_aversion(tiny_model_dir, tmp_path):
    data = write_jsonl(tmp_path / "pairs.jsonl", _pairs(16))
    final = reward.train(
        stage_config("rm", tiny_model_dir, *SHORT_TEXT, "optim.max_steps=1", data=data, out=tmp_path / "bt")
    )
    with pytest.raises(ConfigError, match="has none"):
        LearnedReward.from_pretrained(final, risk_aversion=1.0)


def test_config_refuses_what_distributional_ignores(tiny_model_dir, tmp_path):
    with pytest.raises(ConfigError, match="label_smoothing"):
        _cfg(tiny_model_dir, tmp_path, "x.jsonl", "algo.label_smoothing=0.1")
    with pytest.raises(ConfigError, match="own two heads"):
        _cfg(tiny_model_dir, tmp_path, "", "algo.heads=a=x.jsonl")
    with pytest.raises(ConfigError, match="margin"):
        _cfg(tiny_model_dir, tmp_path, "x.jsonl", "algo.margin=small")


def test_variance_is_larger_where_the_labels_disagree(tiny_model_dir, tmp_path):
    """Dog pairs always prefer 'good'; cat pairs are split 50/50. The means must order the dog's answers, and the
    std of the cat's answers must exceed the dog's (the disagreement goes to the variance, not the mean)."""
    data = write_jsonl(tmp_path / "pairs.jsonl", _pairs(96))
    final = reward.train(_cfg(tiny_model_dir, tmp_path / "run", data, "optim.max_steps=40"))
    rm = LearnedReward.from_pretrained(final)
    answers = ["the film is very good .", "the film is very bad ."]
    mu_dog, sd_dog = rm.mean_std(["what is the dog ?"] * 2, answers)
    _, sd_cat = rm.mean_std(["what is the cat ?"] * 2, answers)
    assert mu_dog[0] > mu_dog[1]
    assert float(sd_cat.mean()) > float(sd_dog.mean())
