"""Policy + per-token value head, and the separate critic: forward shapes and exact save/reload."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import AutoModel, AutoModelForCausalLM

from rlhflab.errors import UserError
from rlhflab.models.heads import VALUE_HEAD_FILE, Critic, PolicyWithValueHead, ValueHead
from rlhflab.models.loading import LoraSettings, load_causal_lm, save_model
from rlhflab.models.reward_model import RewardModel


@pytest.fixture()
def batch(tiny_tokenizer):
    b = tiny_tokenizer(["the cat sat on the mat", "hi there", "yes"], return_tensors="pt", padding=True)
    return b["input_ids"], b["attention_mask"]


@pytest.fixture()
def sft_dir(tmp_path, tiny_tokenizer, tiny_model):
    return save_model(tiny_model, tiny_tokenizer, tmp_path / "sft")


def test_value_head_init_is_small_and_float32():
    torch.manual_seed(0)
    head = ValueHead(1023)
    assert head.linear.weight.dtype == torch.float32
    assert torch.count_nonzero(head.linear.bias) == 0
    assert head.linear.weight.std().item() == pytest.approx(1 / math.sqrt(1024), rel=0.1)
    values = head(torch.randn(2, 5, 1023, dtype=torch.bfloat16))
    assert values.shape == (2, 5) and values.dtype == torch.float32


def test_policy_with_value_head_round_trip(tmp_path, tiny_tokenizer, sft_dir, batch):
    ids, mask = batch
    pv = PolicyWithValueHead.from_pretrained(sft_dir).eval()  # plain SFT dir: fresh value head
    with torch.no_grad():
        logits, values = pv(ids, mask)
        plain_logits = pv.policy(input_ids=ids, attention_mask=mask).logits
    assert logits.shape == (3, ids.shape[1], len(tiny_tokenizer)) and values.shape == ids.shape
    # real positions only: at padded ones our positions (counted over real tokens) differ from HF's arange
    real = mask.bool()
    torch.testing.assert_close(logits[real], plain_logits[real], atol=1e-5, rtol=0)

    out = pv.save_pretrained(tmp_path / "ppo", tokenizer=tiny_tokenizer)
    assert (out / VALUE_HEAD_FILE).is_file()
    again = PolicyWithValueHead.from_pretrained(out).eval()
    plain = AutoModelForCausalLM.from_pretrained(str(out), local_files_only=True).eval()
    with torch.no_grad():
        logits2, values2 = again(ids, mask)
        assert torch.equal(values2, values) and torch.equal(logits2, logits)
        assert torch.equal(plain(input_ids=ids, attention_mask=mask).logits, plain_logits)


def test_policy_with_lora_saves_merged_policy_and_head(tmp_path, sft_dir, batch):
    ids, mask = batch
    pv = PolicyWithValueHead(load_causal_lm(sft_dir, lora=LoraSettings(r=2))).eval()
    with torch.no_grad():
        for n, p in pv.named_parameters():
            if "lora_B" in n:
                p.normal_(std=0.5)
        logits, values = pv(ids, mask)
    again = PolicyWithValueHead.from_pretrained(pv.save_pretrained(tmp_path / "ppo")).eval()
    with torch.no_grad():
        logits2, values2 = again(ids, mask)
    torch.testing.assert_close(logits2, logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(values2, values, atol=1e-5, rtol=0)


def test_critic_round_trip_and_init_from_reward_model(tmp_path, sft_dir, batch):
    ids, mask = batch
    critic = Critic.from_pretrained(sft_dir).eval()  # causal-LM dir: backbone + fresh head
    with torch.no_grad():
        values = critic(ids, mask)
    assert values.shape == ids.shape
    out = critic.save_pretrained(tmp_path / "critic")
    assert type(AutoModel.from_pretrained(str(out), local_files_only=True)).__name__ == "LlamaModel"
    with torch.no_grad():
        assert torch.equal(Critic.from_pretrained(out).eval()(ids, mask), values)

    rm = RewardModel.from_causal_lm(sft_dir, num_heads=2).eval()
    rm_dir = rm.save_pretrained(tmp_path / "rm")
    from_rm = Critic.from_pretrained(rm_dir, head_index=1).eval()
    with torch.no_grad():
        last = mask.sum(1) - 1
        # the critic's value at the last real token is the reward model's second reward
        torch.testing.assert_close(
            from_rm(ids, mask)[torch.arange(3), last], rm(ids, mask)[:, 1], atol=1e-5, rtol=0
        )
    with pytest.raises(UserError, match="out of range"):
        Critic.from_pretrained(rm_dir, head_index=2)


def test_value_head_size_mismatch_is_a_user_error(tmp_path, sft_dir):
    critic = Critic.from_pretrained(sft_dir)
    critic.value_head = ValueHead(7)
    out = critic.save_pretrained(tmp_path / "bad")
    with pytest.raises(UserError, match="hidden size"):
        Critic.from_pretrained(out)
