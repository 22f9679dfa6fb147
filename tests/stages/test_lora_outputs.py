"""LoRA runs write the adapter alone (PEFT format), and every stage starts from such an adapter directory.

The chain SFT -> reward model -> PPO / DPO, all with LoRA, is what `rlhflab run --model DIR` does on a real model;
`model.lora.merge=true` writes the full model instead.
"""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from rlhflab.config import load_config
from rlhflab.errors import ConfigError
from rlhflab.models.loading import (
    is_adapter_dir,
    is_peft_model,
    load_causal_lm,
    load_inference_lm,
    load_tokenizer,
)
from rlhflab.models.reward_model import RewardModel
from rlhflab.rewards.learned import LearnedReward
from rlhflab.stages import dpo, ppo, reward, sft

from ..helpers import CAT_PROMPTS, SHORT_TEXT, stage_config, write_jsonl

LORA = ("model.lora.enabled=true", "model.lora.r=4", "model.lora.alpha=8")


def _ids(tokenizer, text="the cat is very happy ."):
    enc = tokenizer([text], return_tensors="pt")
    return enc.input_ids, enc.attention_mask


def _dir_bytes(path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


@pytest.fixture()
def lora_sft(tiny_model_dir, sft_file, tmp_path):
    cfg = stage_config("sft", tiny_model_dir, *SHORT_TEXT, *LORA, "optim.max_steps=3", data=sft_file,
                       out=tmp_path / "sft")  # fmt: skip
    return sft.train(cfg)


def test_sft_with_lora_writes_the_adapter_that_peft_loads(lora_sft, tiny_model_dir, tmp_path):
    from peft import PeftModel

    assert is_adapter_dir(lora_sft) and (lora_sft / "adapter_model.safetensors").is_file()
    assert _dir_bytes(lora_sft) < 0.5 * _dir_bytes(tiny_model_dir)  # not a full copy of the model
    config = json.loads((lora_sft / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(tiny_model_dir.resolve())
    ours = load_causal_lm(lora_sft).eval()
    theirs = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), lora_sft).eval()
    plain = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    ids, mask = _ids(load_tokenizer(lora_sft))
    folded = load_inference_lm(lora_sft)  # for sampling and scoring: a plain model, the adapter folded in
    assert not is_peft_model(folded) and not any(p.requires_grad for p in folded.parameters())
    with torch.no_grad():
        trained = ours(input_ids=ids, attention_mask=mask).logits
        torch.testing.assert_close(theirs(input_ids=ids, attention_mask=mask).logits, trained)
        torch.testing.assert_close(
            folded(input_ids=ids, attention_mask=mask).logits, trained, atol=1e-5, rtol=0
        )
        assert (trained - plain(input_ids=ids, attention_mask=mask).logits).abs().max() > 1e-3  # it trained

    merged = sft.train(
        stage_config(
            "sft",
            tiny_model_dir,
            *SHORT_TEXT,
            *LORA,
            "optim.max_steps=3",
            "model.lora.merge=true",
            data=tmp_path / "sft.jsonl",
            out=tmp_path / "merged",
        )  # fmt: skip
    )
    assert (merged / "config.json").is_file() and not (merged / "adapter_config.json").exists()
    with torch.no_grad():  # the same seed and data: the merged model computes what the adapter does
        torch.testing.assert_close(
            AutoModelForCausalLM.from_pretrained(merged).eval()(input_ids=ids, attention_mask=mask).logits,
            trained,
            atol=1e-5,
            rtol=0,
        )


def test_eval_command_reads_an_adapter_directory(lora_sft, tiny_model_dir, capsys):
    from rlhflab.cli import build_parser

    # `rlhflab eval` on the adapter against its own base: a policy that moved from the base has a positive KL.
    argv = ["eval", "--policy", str(lora_sft), "--ref", str(tiny_model_dir), "--task", "sentiment"]
    args = build_parser().parse_args([*argv, "--n-prompts", "4", "--n-samples", "2", "--max-new-tokens", "6"])
    assert args.func(args) == 0
    printed = dict(
        line.split(":", 1)
        for line in capsys.readouterr().out.splitlines()
        if line.strip().startswith("kl/ref")
    )
    assert float(printed["kl/ref".rjust(24)]) > 0.0


def test_rm_ppo_dpo_start_from_an_adapter_and_write_adapters(lora_sft, tmp_path):
    pairs = write_jsonl(
        tmp_path / "pairs.jsonl",
        [{"prompt": p, "chosen": "the cat is very happy .", "rejected": "the dog ."} for p in CAT_PROMPTS]
        * 4,
    )
    rm_final = reward.train(
        stage_config("rm", lora_sft, *SHORT_TEXT, *LORA, "optim.max_steps=4", data=pairs, out=tmp_path / "rm")
    )
    assert is_adapter_dir(rm_final) and (rm_final / "reward_head.safetensors").is_file()
    assert json.loads((rm_final / "adapter_config.json").read_text())["base_model_name_or_path"] == str(
        lora_sft.resolve()
    )
    scorer = LearnedReward.from_pretrained(rm_final)
    scores = scorer.score(["how is the cat ?"] * 2, ["the cat is very happy .", "the dog ."])
    assert torch.isfinite(scores).all() and scores[0] > scores[1]  # it learned the pairs
    rm = RewardModel.from_pretrained(rm_final)
    assert not any("lora_" in n for n, _ in rm.named_parameters())  # loaded merged

    # DPO from the SFT adapter: the reference is the SFT model (adapters off), so the first loss is log 2.
    dpo_cfg = stage_config("dpo", lora_sft, *SHORT_TEXT, *LORA, "optim.max_steps=2", "optim.lr=1e-3",
                           data=pairs, out=tmp_path / "dpo")  # fmt: skip
    dpo_final = dpo.train(dpo_cfg)
    rows = [json.loads(line) for line in (tmp_path / "dpo" / "metrics.jsonl").read_text().splitlines()]
    first = next(r for r in rows if "loss/dpo" in r)
    assert first["loss/dpo"] == pytest.approx(0.693147, abs=1e-4)
    assert is_adapter_dir(dpo_final)
    assert json.loads((dpo_final / "adapter_config.json").read_text())["base_model_name_or_path"] == str(
        lora_sft.resolve()
    )

    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": p} for p in CAT_PROMPTS] * 4)
    ppo_cfg = stage_config(
        "ppo", lora_sft, *LORA, "algo.iterations=1", "algo.rollout_batch_size=8", "algo.minibatch_size=8",
        "sampling.max_new_tokens=6", f"algo.reward_model=[{rm_final}]", data=prompts, out=tmp_path / "ppo",
    )  # fmt: skip
    ppo_final = ppo.train(ppo_cfg)
    assert is_adapter_dir(ppo_final) and (ppo_final / "value_head.safetensors").is_file()
    # The chain base -> SFT adapter -> PPO adapter loads as one model, and it moved away from SFT.
    policy, start = load_causal_lm(ppo_final).eval(), load_causal_lm(lora_sft).eval()
    ids, mask = _ids(load_tokenizer(ppo_final))
    with torch.no_grad():
        delta = (
            policy(input_ids=ids, attention_mask=mask).logits
            - start(input_ids=ids, attention_mask=mask).logits
        )
    assert delta.abs().max() > 0


def test_merge_without_lora_is_refused(tiny_model_dir):
    with pytest.raises(ConfigError, match="model.lora.merge"):
        stage_config("sft", tiny_model_dir, "model.lora.merge=true")
    with pytest.raises(ConfigError, match="model.lora.merge.*preference model"):
        load_config("pm", None, [*LORA])
