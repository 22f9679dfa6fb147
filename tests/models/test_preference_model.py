"""The general preference model: antisymmetry by value, what it reads, save/load with its marker, refusals."""

from __future__ import annotations

import json

import pytest
import torch

from rlhflab.errors import ConfigError, UserError
from rlhflab.models.preference_model import (
    PreferenceModel,
    check_preference_model_dir,
    collate_comparisons,
    encode_comparison,
)
from rlhflab.models.reward_model import PREFERENCE_MODEL_KEY, RewardModel

from ..helpers import perturb_

PROMPTS = ["the cat sat on the mat", "what is the dog", "hello", [{"role": "user", "content": "hi"}]]
FIRST = ["the cat is very happy .", "a dog", "yes yes yes no", "hello"]
SECOND = ["the cat is sad", "the dog is very good .", "no", "hi there"]


@pytest.fixture()
def pm(tiny_model_dir, tiny_tokenizer):
    model = PreferenceModel.from_causal_lm(tiny_model_dir, tiny_tokenizer, max_length=24, max_prompt_length=8)
    return perturb_(model, 0.5, seed=3)  # a head far from zero, so P is nowhere near 1/2 by accident


def test_probabilities_are_antisymmetric_by_value(pm):
    p_ab = pm.prob(PROMPTS, FIRST, SECOND)
    p_ba = pm.prob(PROMPTS, SECOND, FIRST)
    assert p_ab.shape == (4,) and p_ab.dtype == torch.float32
    torch.testing.assert_close(p_ab + p_ba, torch.ones(4), atol=1e-6, rtol=0)
    assert (p_ab - 0.5).abs().max() > 0.05  # not trivially 1/2 everywhere
    same = pm.prob(PROMPTS, FIRST, FIRST)
    torch.testing.assert_close(same, torch.full((4,), 0.5))  # P(a > a) = 1/2 exactly
    # Batching and order do not change a pair's probability.
    alone = torch.cat([pm.prob([p], [a], [b]) for p, a, b in zip(PROMPTS, FIRST, SECOND)])
    torch.testing.assert_close(alone, p_ab, atol=1e-5, rtol=0)


def test_the_logit_is_g_forward_minus_g_backward(pm, tiny_tokenizer):
    """s(x, a, b) = g(x, a, b) - g(x, b, a), g read by the underlying one-head reward model on each text."""
    fwd = [pm.encode(p, a, b) for p, a, b in zip(PROMPTS, FIRST, SECOND)]
    bwd = [pm.encode(p, b, a) for p, a, b in zip(PROMPTS, FIRST, SECOND)]
    batch = collate_comparisons(fwd, bwd, tiny_tokenizer.pad_token_id)
    pm.eval()
    with torch.no_grad():
        s = pm(batch, torch.device("cpu"))
        g = [
            pm.scorer(torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.long))[0, 0]
            for ids in fwd + bwd
        ]
    torch.testing.assert_close(s, torch.stack(g[:4]) - torch.stack(g[4:]), atol=1e-5, rtol=0)
    torch.testing.assert_close(torch.sigmoid(s), pm.prob(PROMPTS, FIRST, SECOND), atol=1e-6, rtol=0)


def test_encode_comparison_layout_and_truncation(tiny_tokenizer):
    tok = tiny_tokenizer
    ids = encode_comparison("the cat", "yes", "no no", tok)
    assert tok.convert_ids_to_tokens(ids) == ["the", "cat", "yes", "<eos>", "no", "no", "<eos>"]
    # max_length 10, prompt cut to its last 3 tokens: each response gets (10 - 3) // 2 - 1 = 2 tokens, then EOS.
    long = encode_comparison("i like the cat", "a b c d", "1 2 3 4", tok, max_length=10, max_prompt_length=3)
    words = tok.convert_ids_to_tokens(long)
    assert words == ["like", "the", "cat", "a", "<unk>", "<eos>", "1", "2", "<eos>"]
    # Swapping the responses swaps their tokens and nothing else.
    swapped = encode_comparison(
        "i like the cat", "1 2 3 4", "a b c d", tok, max_length=10, max_prompt_length=3
    )
    assert tok.convert_ids_to_tokens(swapped)[3:] == ["1", "2", "<eos>", "a", "<unk>", "<eos>"]
    with pytest.raises(ConfigError, match="no room for two responses"):
        encode_comparison("i like the cat", "a", "b", tok, max_length=6, max_prompt_length=3)


def test_save_and_load_keep_the_model_and_its_marker(pm, tiny_tokenizer, tmp_path):
    out = pm.save_pretrained(tmp_path / "run" / "final")
    config = json.loads((out / "config.json").read_text())
    assert config[PREFERENCE_MODEL_KEY] == {"format": 1, "max_length": 24, "max_prompt_length": 8}
    assert config["architectures"] == ["LlamaForSequenceClassification"] and len(config["id2label"]) == 1
    loaded = PreferenceModel.from_pretrained(tmp_path / "run")  # a run directory stands for its final/
    torch.testing.assert_close(loaded.prob(PROMPTS, FIRST, SECOND), pm.prob(PROMPTS, FIRST, SECOND))
    assert (loaded.max_length, loaded.max_prompt_length) == (24, 8)
    # A preference model is not a reward: a reward source refuses it, with what to do instead.
    with pytest.raises(UserError, match="algo.feedback=preference_model"):
        RewardModel.from_pretrained(out)


def test_a_reward_model_or_nothing_is_not_a_preference_model(tiny_model_dir, tmp_path):
    rm = RewardModel.from_causal_lm(tiny_model_dir)
    rm_dir = rm.save_pretrained(tmp_path / "rm")
    with pytest.raises(UserError, match="is not a general preference model.*rlhflab pm"):
        check_preference_model_dir(rm_dir)
    with pytest.raises(UserError, match="does not exist"):
        check_preference_model_dir(tmp_path / "missing")
    with pytest.raises(ConfigError, match="algo.preference_model is empty"):
        check_preference_model_dir("")
