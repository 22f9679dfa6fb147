"""Loading/saving causal LMs and tokenizers, LoRA, parameter counts, and the user errors."""

from __future__ import annotations

import json
import os

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from rlhflab.errors import ConfigError, UserError
from rlhflab.models.loading import (
    LoraSettings,
    atomic_output_dir,
    count_parameters,
    load_causal_lm,
    load_tokenizer,
    resolve_dtype,
    save_model,
)
from rlhflab.models.tiny import build_word_tokenizer

from ..helpers import tiny_lm


def _ids(tok, *texts):
    batch = tok(list(texts), return_tensors="pt", padding=True)
    return batch["input_ids"], batch["attention_mask"]


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_causal_lm_round_trip_identical_logits(tmp_path, tiny_tokenizer, arch):
    model = tiny_lm(tiny_tokenizer, arch=arch).eval()
    ids, mask = _ids(tiny_tokenizer, "the cat sat on the mat", "hello")
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask).logits
    out = save_model(model, tiny_tokenizer, tmp_path / "m")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]  # no temp dirs left behind

    ours = load_causal_lm(out).eval()
    plain = AutoModelForCausalLM.from_pretrained(str(out), local_files_only=True).eval()
    with torch.no_grad():
        assert torch.equal(ours(input_ids=ids, attention_mask=mask).logits, ref)
        assert torch.equal(plain(input_ids=ids, attention_mask=mask).logits, ref)
    tok = load_tokenizer(out)
    assert tok("the cat")["input_ids"] == tiny_tokenizer("the cat")["input_ids"]
    assert tok.padding_side == "right" and tok.pad_token == "<pad>"


def test_load_dtype_and_count_parameters(tmp_path, tiny_tokenizer, tiny_model):
    save_model(tiny_model, tiny_tokenizer, tmp_path / "m")
    model = load_causal_lm(tmp_path / "m", dtype="bfloat16")
    assert next(model.parameters()).dtype == torch.bfloat16
    # Llama, V=52 words+specials, D=32, 2 layers, FFN 128, tied head: embeddings V*D,
    # per layer 4*D*D (attn) + 3*D*128 (MLP) + 2*D (norms), final norm D.
    V, D = len(tiny_tokenizer), 32
    expected = V * D + 2 * (4 * D * D + 3 * D * 128 + 2 * D) + D
    assert count_parameters(model) == expected
    model.requires_grad_(False)
    assert count_parameters(model, trainable_only=True) == 0


def test_load_tokenizer_pads_with_eos_when_missing(tmp_path, caplog):
    tok = build_word_tokenizer(["a", "b"])
    tok.pad_token = None
    tok.save_pretrained(str(tmp_path))
    assert AutoTokenizer.from_pretrained(str(tmp_path)).pad_token is None
    with caplog.at_level("INFO", logger="rlhflab.models.loading"):
        loaded = load_tokenizer(tmp_path, padding_side="left")
    assert loaded.pad_token == "<eos>" and loaded.pad_token_id == loaded.eos_token_id
    assert loaded.padding_side == "left"
    assert "no pad token" in caplog.text


def test_missing_paths_give_user_errors(tmp_path):
    with pytest.raises(UserError, match="does not exist.*never downloaded"):
        load_causal_lm(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no config.json"):
        load_causal_lm(tmp_path / "empty")
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    with pytest.raises(UserError, match="import-gguf"):
        load_causal_lm(tmp_path / "m.gguf")
    with pytest.raises(UserError, match="not a directory"):
        load_tokenizer(tmp_path / "nope")
    with pytest.raises(ConfigError, match="unknown dtype"):
        resolve_dtype("float8")
    with pytest.raises(ConfigError, match="lora.r"):
        LoraSettings(r=0)
    with pytest.raises(ConfigError, match="dropout"):
        LoraSettings(dropout=1.0)


def test_atomic_output_dir_never_half_writes(tmp_path):
    target = tmp_path / "ckpt"
    with atomic_output_dir(target) as tmp:
        (tmp / "config.json").write_text("{}")
    with pytest.raises(RuntimeError), atomic_output_dir(target) as tmp:
        (tmp / "config.json").write_text('{"new": 1}')
        raise RuntimeError("crash mid-save")
    assert (target / "config.json").read_text() == "{}"  # the old checkpoint survives
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]
    other = tmp_path / "notes"
    other.mkdir()
    (other / "todo.txt").write_text("mine")
    with pytest.raises(UserError, match="does not hold a saved model"), atomic_output_dir(other):
        pass
    with pytest.raises(UserError, match="not empty"), atomic_output_dir(target, overwrite=False):
        pass


def test_lora_trains_only_adapters_and_merges_on_save(tmp_path, tiny_tokenizer, tiny_model):
    save_model(tiny_model, tiny_tokenizer, tmp_path / "base")
    model = load_causal_lm(tmp_path / "base", lora=LoraSettings(r=2, alpha=4), gradient_checkpointing=True)
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    # all-linear on D=32, FFN 128, r=2: q,k,v,o 4*2*(32+32) + gate,up 2*2*(32+128) + down 2*(128+32) per layer
    assert count_parameters(model, trainable_only=True) == 2 * (512 + 640 + 320)

    ids, mask = _ids(tiny_tokenizer, "the dog is good", "hi")
    model.train()
    loss = model(input_ids=ids, attention_mask=mask, labels=ids).logits.float().square().mean()
    loss.backward()
    # LoRA starts at B = 0: the gradient reaches every B, and none of A yet (dL/dA carries a factor B).
    assert all(p.grad.abs().sum() > 0 for n, p in trainable.items() if "lora_B" in n)
    assert all(p.grad.eq(0).all() for n, p in trainable.items() if "lora_A" in n)

    with torch.no_grad():
        for n, p in trainable.items():
            if "lora_B" in n:
                p.normal_(std=0.5)  # make the adapters matter
    model.eval()
    with torch.no_grad():
        adapted = model(input_ids=ids, attention_mask=mask).logits
        base = tiny_model.eval()(input_ids=ids, attention_mask=mask).logits
    assert (adapted - base).abs().max() > 1e-2

    save_model(model, tiny_tokenizer, tmp_path / "merged")
    assert not (tmp_path / "merged" / "adapter_config.json").exists()
    plain = AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged"), local_files_only=True).eval()
    with torch.no_grad():
        torch.testing.assert_close(
            plain(input_ids=ids, attention_mask=mask).logits, adapted, atol=1e-5, rtol=0
        )
        # saving did not merge the live model: its adapters still exist and still give the same outputs
        assert torch.equal(model(input_ids=ids, attention_mask=mask).logits, adapted)
    assert any("lora_B" in n for n, _ in model.named_parameters())

    save_model(model, tiny_tokenizer, tmp_path / "adapter", merge_lora=False)
    adapter = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert (adapter["peft_type"], adapter["r"], adapter["lora_alpha"]) == ("LORA", 2, 4)
    reloaded = load_causal_lm(tmp_path / "adapter").eval()
    with torch.no_grad():
        torch.testing.assert_close(
            reloaded(input_ids=ids, attention_mask=mask).logits, adapted, atol=1e-6, rtol=0
        )
