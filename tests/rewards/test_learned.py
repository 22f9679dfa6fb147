import json

import pytest
import torch

from rlhflab.data import PairwiseRecord, collate_pairs, tokenize_pair
from rlhflab.errors import UserError
from rlhflab.models.reward_model import RewardModel
from rlhflab.rewards import SETTINGS_FILE, LearnedReward, RewardSource

from ..helpers import tiny_lm


@pytest.fixture()
def rm_dir(tmp_path, tiny_tokenizer):
    lm = tiny_lm(tiny_tokenizer)
    torch.manual_seed(0)
    rm = RewardModel.from_causal_lm(lm, num_heads=2, head_names=["helpful", "safe"])
    rm.set_normalization([1.0, -2.0], [2.0, 4.0])
    out = tmp_path / "rm"
    rm.save_pretrained(out, tiny_tokenizer)
    (out / SETTINGS_FILE).write_text(json.dumps({"max_length": 12, "max_prompt_length": 6}))
    return out


TEXT_PROMPTS = ["the cat sat on the mat and it was a good day , i say", "hello"]
CHAT_PROMPTS = [
    [{"role": "user", "content": "what is the film ?"}],
    [
        {"role": "system", "content": "be nice"},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"},
        {"role": "user", "content": "how was the day ?"},
    ],
]
CHOSEN = ["the film was very very good and i love it , yes", "good"]
REJECTED = ["bad", "the day was bad , not good ."]


@pytest.mark.parametrize("prompts", [TEXT_PROMPTS, CHAT_PROMPTS], ids=["text", "chat"])
def test_learned_reward_matches_the_training_forward(rm_dir, tiny_tokenizer, prompts):
    source = LearnedReward.from_pretrained(rm_dir, head="safe", batch_size=3)
    assert (source.max_length, source.max_prompt_length) == (12, 6)  # read from the stage's settings file
    # What the reward stage feeds the model: tokenize_pair + one stacked batch of 2B rows.
    examples = [
        tokenize_pair(PairwiseRecord(p, c, r), tiny_tokenizer, max_length=12, max_prompt_length=6)
        for p, c, r in zip(prompts, CHOSEN, REJECTED)
    ]
    batch = collate_pairs(examples, pad_token_id=tiny_tokenizer.pad_token_id, stack=True)
    with torch.no_grad():
        expected = source.model(batch["input_ids"], batch["attention_mask"])
    got = source.score(list(prompts) * 2, CHOSEN + REJECTED)
    torch.testing.assert_close(got, expected[:, 1], atol=1e-5, rtol=0)
    torch.testing.assert_close(
        source.score_all_heads(list(prompts) * 2, CHOSEN + REJECTED), expected, atol=1e-5, rtol=0
    )


def test_learned_reward_heads_and_whitening(rm_dir):
    prompts, responses = ["hello", "hi", "what is the cat ?"], ["good", "bad bad", "the cat is happy"]
    raw = LearnedReward.from_pretrained(rm_dir, head=0).score_all_heads(prompts, responses)
    # Stored statistics: mean [1, -2], std [2, 4].
    white_safe = LearnedReward.from_pretrained(rm_dir, head="safe", normalize=True).score(prompts, responses)
    torch.testing.assert_close(white_safe, (raw[:, 1] + 2.0) / 4.0)
    white_helpful = LearnedReward.from_pretrained(rm_dir, normalize=True).score(prompts, responses)
    torch.testing.assert_close(white_helpful, (raw[:, 0] - 1.0) / 2.0)
    source = LearnedReward.from_pretrained(rm_dir, head="safe")
    assert isinstance(source, RewardSource) and source.name == "safe"
    assert source.describe()["head"] == "safe"
    # Order and batch size do not change a response's score.
    one_by_one = torch.cat([source.score([p], [r]) for p, r in zip(prompts, responses)])
    torch.testing.assert_close(source.score(prompts, responses), one_by_one, atol=1e-5, rtol=0)
    with pytest.raises(UserError, match="unknown reward head 'harmless'"):
        LearnedReward.from_pretrained(rm_dir, head="harmless")


def test_learned_reward_refuses_a_causal_lm(tmp_path, tiny_tokenizer):
    lm = tiny_lm(tiny_tokenizer)
    lm.save_pretrained(tmp_path / "lm")
    with pytest.raises(UserError, match="not a reward model directory"):
        LearnedReward.from_pretrained(tmp_path / "lm")
