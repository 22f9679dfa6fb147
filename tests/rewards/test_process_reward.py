"""`ProcessReward`: a process reward model as a reward source (steps split at the separator, read where training
read them, aggregated by product or minimum), loaded by path or by spec; what other reward models refuse."""

from __future__ import annotations

import json

import pytest
import torch

from rlhflab.data import StepwiseRecord, tokenize_stepwise
from rlhflab.errors import ConfigError
from rlhflab.losses import prm_min, prm_product
from rlhflab.models.reward_model import RewardModel
from rlhflab.rewards import SETTINGS_FILE, LearnedReward, ProcessReward, load_reward

from ..helpers import tiny_lm

STATS = {"product": {"mean": [0.2, 0.5], "std": [0.1, 2.0]}, "min": {"mean": [0.3, 0.0], "std": [0.5, 1.0]}}


def _save(tmp_path, tokenizer, settings, name):
    torch.manual_seed(0)
    rm = RewardModel.from_causal_lm(tiny_lm(tokenizer), num_heads=2, head_names=["a", "b"])
    out = tmp_path / name
    rm.save_pretrained(out, tokenizer)
    (out / SETTINGS_FILE).write_text(json.dumps(settings))
    return out


@pytest.fixture()
def prm_dir(tmp_path, tiny_tokenizer):
    settings = {"max_length": 24, "max_prompt_length": 8, "loss": "step", "step_separator": " , "}
    return _save(tmp_path, tiny_tokenizer, {**settings, "score_stats": STATS}, "prm")


PROMPTS = ["what is 1 + 2 + 3 ?", [{"role": "user", "content": "what is 2 + 2 ?"}], "hi", "hi"]
RESPONSES = ["1 + 2 = 3 , 3 + 3 = 6 , 6 .", "2 + 2 = 5 , 5 .", "", "good ,  , bad"]  # a blank step is dropped


def test_steps_are_read_where_training_reads_them(prm_dir, tiny_tokenizer):
    prm = LearnedReward.from_pretrained(prm_dir, head="b", batch_size=3)
    assert isinstance(prm, ProcessReward) and (prm.max_length, prm.max_prompt_length) == (24, 8)
    assert prm.split_steps(RESPONSES[0]) == ["1 + 2 = 3", "3 + 3 = 6", "6 ."]
    assert prm.split_steps(RESPONSES[3]) == ["good", "bad"] and prm.split_steps("") == []
    logits = prm.step_logits(PROMPTS, RESPONSES)
    for prompt, response, got in zip(PROMPTS, RESPONSES, logits):
        steps = prm.split_steps(response)
        if not steps:
            assert got.shape == (0, 2)
            continue
        # The reward stage's own tokenization of a stepwise record, run alone (no padding, no batch).
        ex = tokenize_stepwise(
            StepwiseRecord(prompt, steps, [True] * len(steps)),
            tiny_tokenizer,
            separator=" , ",
            max_length=24,
            max_prompt_length=8,
        )
        ids = torch.tensor([ex["input_ids"]])
        with torch.no_grad():
            expected = prm.model.token_rewards(ids, torch.ones_like(ids))[0, ex["step_positions"]]
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    # One response at a time gives the same logits as the batch (padding changes nothing).
    alone = LearnedReward.from_pretrained(prm_dir, batch_size=1).step_logits(PROMPTS, RESPONSES)
    for a, b in zip(alone, logits):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def test_scores_are_the_aggregates_and_whitening_uses_the_stored_stats(prm_dir):
    prm = LearnedReward.from_pretrained(prm_dir, head="b")
    logits = [x[:, 1] for x in prm.step_logits(PROMPTS, RESPONSES)]
    padded = torch.nn.utils.rnn.pad_sequence(logits, batch_first=True)
    present = torch.nn.utils.rnn.pad_sequence([torch.ones(len(x), dtype=torch.bool) for x in logits], True)
    torch.testing.assert_close(prm.score(PROMPTS, RESPONSES), prm_product(padded, present))
    worst = LearnedReward.from_pretrained(prm_dir, head="b", aggregate="min")
    torch.testing.assert_close(worst.score(PROMPTS, RESPONSES), prm_min(padded, present))
    assert prm.score(PROMPTS, RESPONSES)[2] == 0.0  # the empty response has no step
    probs = prm.step_probabilities(PROMPTS, RESPONSES)
    torch.testing.assert_close(probs[0], torch.sigmoid(logits[0]))
    white = LearnedReward.from_pretrained(prm_dir, head="b", aggregate="min", normalize=True)
    torch.testing.assert_close(white.score(PROMPTS, RESPONSES), (prm_min(padded, present) - 0.0) / 1.0)
    white_a = LearnedReward.from_pretrained(prm_dir, head="a", normalize=True)
    raw_a = LearnedReward.from_pretrained(prm_dir, head="a").score(PROMPTS, RESPONSES)
    torch.testing.assert_close(white_a.score(PROMPTS, RESPONSES), (raw_a - 0.2) / 0.1)
    assert white.describe()["aggregate"] == "min" and white.describe()["step_separator"] == " , "


def test_spec_and_refusals(prm_dir, tmp_path, tiny_tokenizer):
    source = load_reward(f"{prm_dir}:aggregate=min:head=a")
    assert isinstance(source, ProcessReward) and source.aggregate == "min" and source.name == "a_min"
    with pytest.raises(ConfigError, match="aggregate must be one of product, min"):
        LearnedReward.from_pretrained(prm_dir, aggregate="mean")
    plain = _save(tmp_path, tiny_tokenizer, {"max_length": 24, "loss": "binary"}, "orm")
    assert type(LearnedReward.from_pretrained(plain)) is LearnedReward
    with pytest.raises(ConfigError, match="trained with algo.loss=binary and gives one score per response"):
        load_reward(f"{plain}:aggregate=min")
    bare = _save(
        tmp_path, tiny_tokenizer, {"loss": "step", "step_separator": "\n", "score_stats": {}}, "bare"
    )
    with pytest.raises(ConfigError, match="normalization_samples=0"):
        LearnedReward.from_pretrained(bare, normalize=True)
