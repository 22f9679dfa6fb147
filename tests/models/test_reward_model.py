"""Reward model: last-real-token rewards, multi-head, whitening, save as *ForSequenceClassification."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForSequenceClassification

from rlhflab.errors import UserError
from rlhflab.models.loading import LoraSettings, count_parameters, save_model
from rlhflab.models.reward_model import RewardModel
from rlhflab.models.tiny import build_word_tokenizer, tiny_causal_lm

from ..helpers import tiny_lm

WORDS = ["the", "a", "cat", "dog", "sat", "on", "mat", "is", "good", "bad", "very", "not"]


@pytest.fixture(scope="module")
def eos_pad_tokenizer():
    """A tokenizer that pads with its EOS token, as many pretrained tokenizers do."""
    tok = build_word_tokenizer(WORDS)
    tok.pad_token = tok.eos_token
    return tok


@pytest.fixture(scope="module")
def sft_dir(tmp_path_factory, eos_pad_tokenizer):
    model = tiny_lm(eos_pad_tokenizer, seed=1)
    model.config.pad_token_id = eos_pad_tokenizer.eos_token_id
    return save_model(model, eos_pad_tokenizer, tmp_path_factory.mktemp("rm") / "sft")


def _batch(tok, texts, side="right"):
    tok.padding_side = side
    try:
        batch = tok([t + " <eos>" for t in texts], return_tensors="pt", padding=True)
    finally:
        tok.padding_side = "right"
    return batch["input_ids"], batch["attention_mask"]


TEXTS = ["the cat sat on the mat", "a dog", "the dog is very good"]


def test_from_causal_lm_takes_backbone_only(sft_dir):
    rm = RewardModel.from_causal_lm(sft_dir)
    assert type(rm.backbone).__name__ == "LlamaModel"
    assert not any("lm_head" in n for n, _ in rm.named_parameters())
    assert rm.head_names == ["reward"] and rm.score.weight.shape == (1, 32)
    with pytest.raises(UserError, match="from_causal_lm"):
        RewardModel.from_pretrained(sft_dir)
    with pytest.raises(UserError, match="distinct"):
        RewardModel.from_causal_lm(sft_dir, num_heads=2, head_names=["a", "a"])


def test_reward_reads_last_real_token_with_eos_pad(sft_dir, eos_pad_tokenizer):
    """Rows end with a real EOS whose id is also the pad id; padding must not move the read position."""
    rm = RewardModel.from_causal_lm(sft_dir).eval()
    ids, mask = _batch(eos_pad_tokenizer, TEXTS)
    with torch.no_grad():
        batched = rm(ids, mask)
        singles = torch.cat([rm(*_batch(eos_pad_tokenizer, [t])) for t in TEXTS])
        left = rm(*_batch(eos_pad_tokenizer, TEXTS, side="left"))
    assert batched.shape == (3, 1) and batched.dtype == torch.float32
    torch.testing.assert_close(batched, singles, atol=1e-5, rtol=0)
    torch.testing.assert_close(left, singles, atol=1e-5, rtol=0)
    # the read position is the EOS itself: changing the token before it still changes the reward
    hidden = rm.backbone(input_ids=ids, attention_mask=mask).last_hidden_state
    eos_pos = mask.sum(1) - 1
    assert (ids[torch.arange(3), eos_pos] == eos_pad_tokenizer.eos_token_id).all()
    torch.testing.assert_close(
        rm.score(hidden[torch.arange(3), eos_pos]).detach(), batched, atol=1e-5, rtol=0
    )


def test_left_and_right_padding_agree_for_gpt2(tmp_path, eos_pad_tokenizer):
    """GPT-2 has absolute positions, so left padding only agrees if positions come from the mask."""
    model = tiny_lm(eos_pad_tokenizer, arch="gpt2")
    rm = RewardModel.from_causal_lm(model, num_heads=2).eval()
    with torch.no_grad():
        right = rm(*_batch(eos_pad_tokenizer, TEXTS, side="right"))
        left = rm(*_batch(eos_pad_tokenizer, TEXTS, side="left"))
    torch.testing.assert_close(left, right, atol=1e-5, rtol=0)


def test_multi_head_round_trip_and_plain_transformers(tmp_path, sft_dir, eos_pad_tokenizer):
    rm = RewardModel.from_causal_lm(sft_dir, num_heads=2, head_names=["helpfulness", "safety"]).eval()
    ids, mask = _batch(eos_pad_tokenizer, TEXTS)
    with torch.no_grad():
        raw = rm(ids, mask)
    rm.fit_normalization(raw)
    with torch.no_grad():
        white = rm(ids, mask, normalize=True)
    torch.testing.assert_close(white.mean(0), torch.zeros(2), atol=1e-5, rtol=0)
    torch.testing.assert_close(white.std(0, unbiased=False), torch.ones(2), atol=1e-4, rtol=0)

    out = rm.save_pretrained(tmp_path / "rm", tokenizer=eos_pad_tokenizer)
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["LlamaForSequenceClassification"]
    assert config["id2label"] == {"0": "helpfulness", "1": "safety"}
    assert config["rlhflab_reward_std"] == pytest.approx(rm.reward_std.tolist())

    again = RewardModel.from_pretrained(out).eval()
    assert again.head_names == ["helpfulness", "safety"]
    with torch.no_grad():
        assert torch.equal(again(ids, mask), raw)
        assert torch.equal(again(ids, mask, normalize=True), white)
        assert torch.equal(again.reward(ids, mask, "safety"), raw[:, 1])

    hf = AutoModelForSequenceClassification.from_pretrained(str(out), local_files_only=True).eval()
    with torch.no_grad():
        per_token = hf.score(hf.model(input_ids=ids, attention_mask=mask).last_hidden_state)
        hf_pooled = hf(input_ids=ids, attention_mask=mask).logits
    last = mask.sum(1) - 1
    # same weights: HF's per-token scores at the last real token are our rewards
    torch.testing.assert_close(per_token[torch.arange(3), last], raw, atol=1e-5, rtol=0)
    # HF's own pooling skips every id equal to pad_token_id, so with pad == EOS it reads the token
    # before the final EOS; this is the trap our attention_mask indexing avoids.
    torch.testing.assert_close(hf_pooled, per_token[torch.arange(3), last - 1], atol=1e-5, rtol=0)
    assert not torch.allclose(hf_pooled, raw, atol=1e-4)
    # without a trailing EOS the two pooling rules agree, so plain HF gives our rewards exactly
    plain = eos_pad_tokenizer(TEXTS, return_tensors="pt", padding=True)
    with torch.no_grad():
        torch.testing.assert_close(
            hf(**plain).logits, again(plain["input_ids"], plain["attention_mask"]), atol=1e-5, rtol=0
        )


def test_single_head_gpt2_round_trip(tmp_path, eos_pad_tokenizer):
    model = tiny_causal_lm(eos_pad_tokenizer, arch="gpt2", hidden_size=32, num_layers=1, num_heads=2)
    rm = RewardModel.from_causal_lm(model).eval()
    ids, mask = _batch(eos_pad_tokenizer, TEXTS)
    out = rm.save_pretrained(tmp_path / "rm")
    again = RewardModel.from_pretrained(out).eval()
    with torch.no_grad():
        assert torch.equal(again.reward(ids, mask), rm(ids, mask)[:, 0])
    hf = AutoModelForSequenceClassification.from_pretrained(str(out), local_files_only=True)
    assert type(hf).__name__ == "GPT2ForSequenceClassification" and hf.config.num_labels == 1


def test_lora_reward_model_merges_on_save(tmp_path, sft_dir, eos_pad_tokenizer):
    rm = RewardModel.from_causal_lm(sft_dir, lora=LoraSettings(r=2)).eval()
    trainable = [n for n, p in rm.named_parameters() if p.requires_grad]
    assert "score.weight" in trainable and all("lora_" in n or n == "score.weight" for n in trainable)
    assert count_parameters(rm, trainable_only=True) == 32 + 2 * (512 + 640 + 320)
    with torch.no_grad():
        for n, p in rm.named_parameters():
            if "lora_B" in n:
                p.normal_(std=0.5)
    ids, mask = _batch(eos_pad_tokenizer, TEXTS)
    with torch.no_grad():
        ref = rm(ids, mask)
        again = RewardModel.from_pretrained(rm.save_pretrained(tmp_path / "rm")).eval()
        torch.testing.assert_close(again(ids, mask), ref, atol=1e-5, rtol=0)


def test_fallback_format_for_architectures_without_sequence_classification(
    tmp_path, sft_dir, eos_pad_tokenizer, monkeypatch
):
    import rlhflab.models.reward_model as rm_module

    monkeypatch.setattr(rm_module, "_sequence_classification_class", lambda config: None)
    rm = RewardModel.from_causal_lm(sft_dir, num_heads=2).eval()
    rm.set_normalization([1.0, -2.0], [2.0, 0.5])
    out = rm.save_pretrained(tmp_path / "rm")
    assert (out / rm_module.REWARD_HEAD_FILE).is_file()
    again = RewardModel.from_pretrained(out).eval()
    ids, mask = _batch(eos_pad_tokenizer, TEXTS)
    with torch.no_grad():
        assert torch.equal(again(ids, mask, normalize=True), rm(ids, mask, normalize=True))
    assert again.head_names == ["reward_0", "reward_1"]
