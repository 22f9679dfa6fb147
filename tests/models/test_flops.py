"""FLOP accounting (`rlhflab.models.flops`) by value, on tiny models built here.

Every model: hidden H = 32, L = 2 layers, 2 heads, intermediate FF = 4 x 32 = 128, vocabulary V =
len(tiny_tokenizer). Per layer, Llama multiplies a token by q, k, v, o (4 x H x H = 4,096) and gate, up,
down (3 x H x FF = 12,288): 16,384 weights; GPT-2 by c_attn (H x 3H = 3,072), attn.c_proj (H x H = 1,024),
c_fc (H x FF = 4,096) and mlp.c_proj (FF x H = 4,096): 12,288.
"""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from rlhflab.core.metrics_log import read_metrics
from rlhflab.models.final_layer import final_layer_only_at
from rlhflab.models.flops import (
    MatmulParams,
    causal_lm_forward_flops,
    causal_lm_train_flops,
    causal_pairs,
    decoder_matmul_params,
    matmul_params,
    ppo_iteration_flops,
    reward_model_forward_flops,
    reward_model_train_flops,
)
from rlhflab.models.heads import Critic, ValueHead
from rlhflab.models.loading import LoraSettings, apply_lora, count_parameters
from rlhflab.models.reward_model import RewardModel
from rlhflab.models.tiny import tiny_causal_lm

from ..helpers import TINY_LM, stage_config, write_jsonl

H, L, FF = 32, 2, 128
LLAMA_LAYER = 4 * H * H + 3 * H * FF  # 16,384
GPT2_LAYER = H * 3 * H + H * H + H * FF + FF * H  # 12,288
LLAMA_BODY = L * LLAMA_LAYER  # 32,768
GPT2_BODY = L * GPT2_LAYER  # 24,576


@pytest.fixture()
def llama(tiny_tokenizer):
    return tiny_causal_lm(tiny_tokenizer, hidden_size=H, num_layers=L, num_heads=2)


@pytest.fixture()
def gpt2(tiny_tokenizer):
    return tiny_causal_lm(tiny_tokenizer, arch="gpt2", hidden_size=H, num_layers=L, num_heads=2)


def test_llama_counts_its_layers_and_lm_head_not_its_embedding(tiny_tokenizer, llama):
    V = len(tiny_tokenizer)
    p = matmul_params(llama)
    assert LLAMA_BODY == 32_768 and p.body == LLAMA_BODY
    assert p.head == V * H
    assert (p.layers, p.attn_dim, p.final_at_reads, p.frozen_body, p.frozen_head) == (L, H, 0, 0, 0)
    # All parameters: the embedding (tied to the LM head, so once), the layers, 2 x L + 1 RMSNorm weights.
    assert count_parameters(llama) == V * H + LLAMA_BODY + (2 * L + 1) * H
    # The same numbers from the config alone (what the benchmark counts with).
    assert (
        decoder_matmul_params(hidden=H, layers=L, heads=2, kv_heads=2, intermediate=FF, head_outputs=V) == p
    )


def test_config_numbers_match_a_grouped_query_llama(tiny_tokenizer):
    V = len(tiny_tokenizer)
    config = LlamaConfig(
        vocab_size=V,
        hidden_size=H,
        num_hidden_layers=L,
        num_attention_heads=2,
        num_key_value_heads=1,
        intermediate_size=FF,
    )
    p = matmul_params(LlamaForCausalLM(config))
    # k and v project to one head of 16: q, o 2 x H x H + k, v 2 x H x 16, then the MLP: 15,360 per layer.
    assert p.body == L * (2 * H * H + 2 * H * 16 + 3 * H * FF) == 30_720
    assert (
        decoder_matmul_params(hidden=H, layers=L, heads=2, kv_heads=1, intermediate=FF, head_outputs=V) == p
    )


def test_gpt2_counts_conv1d_weights_not_biases_or_position_embeddings(tiny_tokenizer, gpt2):
    V = len(tiny_tokenizer)
    p = matmul_params(gpt2)
    assert GPT2_BODY == 24_576 and p.body == GPT2_BODY
    assert p.head == V * H and (p.layers, p.attn_dim) == (L, H)
    # The rest of the parameters: wte (tied to the head), wpe (256 positions), the four biases per layer,
    # and 2 x L + 1 LayerNorms (weight and bias).
    biases = L * (3 * H + H + FF + H)
    assert count_parameters(gpt2) == V * H + 256 * H + GPT2_BODY + biases + (2 * L + 1) * 2 * H


def test_the_lm_head_counts_only_at_head_tokens_tied_or_not(tiny_tokenizer, llama):
    V = len(tiny_tokenizer)
    p = matmul_params(llama)
    assert llama.get_output_embeddings().weight is llama.get_input_embeddings().weight
    # 40 real tokens, log-probs at 12 response tokens.
    assert causal_lm_train_flops(p, 40, 12) == 6 * 32_768 * 40 + 6 * V * 32 * 12
    assert causal_lm_forward_flops(p, 40, 12) == 2 * 32_768 * 40 + 2 * V * 32 * 12
    # The rough 6 x all parameters x tokens counts the embedding and the head at every token: too much.
    assert 6 * count_parameters(llama) * 40 == 6 * (V * 32 + 32_768 + 5 * 32) * 40
    assert causal_lm_train_flops(p, 40, 12) < 6 * count_parameters(llama) * 40
    # An untied head is one more parameter matrix but the same work.
    untied = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=V,
            hidden_size=H,
            num_hidden_layers=L,
            num_attention_heads=2,
            num_key_value_heads=2,
            intermediate_size=FF,
            tie_word_embeddings=False,
        )
    )
    assert count_parameters(untied) == count_parameters(llama) + V * H
    assert matmul_params(untied) == p


def test_attention_scores_only_when_asked(llama):
    p = matmul_params(llama)
    assert causal_pairs([2, 3]) == 3 + 6
    # Q K^T and A V: 2 x 32 FLOPs each per query-key pair, in each of 2 layers.
    assert (
        causal_lm_forward_flops(p, 5, 2, attention_pairs=9) - causal_lm_forward_flops(p, 5, 2)
        == 4 * 2 * 32 * 9
    )
    assert causal_lm_train_flops(p, 5, 2, attention_pairs=9) == 3 * causal_lm_forward_flops(p, 5, 2, 9)


def test_reward_model_has_no_lm_head_and_runs_its_last_layer_at_the_reads(llama):
    rm = RewardModel.from_causal_lm(llama)
    p = matmul_params(rm)
    q_o_mlp = H * H + H * H + 3 * H * FF  # the final layer's weights apart from k and v: 14,336
    assert p == MatmulParams(body=32_768, head=1 * 32, final_at_reads=14_336, layers=L, attn_dim=H)
    assert q_o_mlp == 14_336
    # 40 real tokens, 4 responses read: the score head and the final layer's q, o, MLP at the 4 reads.
    assert reward_model_train_flops(p, 40, 4) == 6 * (32_768 - 14_336) * 40 + 6 * (14_336 + 32) * 4
    assert reward_model_forward_flops(p, 40, 4) == 2 * (32_768 - 14_336) * 40 + 2 * (14_336 + 32) * 4
    # The count follows the fast path: final_layer_only_at does take this backbone's last layer.
    mask = torch.ones(2, 5, dtype=torch.long)
    with final_layer_only_at(rm.backbone, mask, torch.tensor([4, 4])) as fast:
        assert fast


def test_reward_model_without_the_fast_path_runs_every_layer_everywhere(gpt2):
    p = matmul_params(RewardModel.from_causal_lm(gpt2, num_heads=2))
    assert p == MatmulParams(body=24_576, head=2 * 32, final_at_reads=0, layers=L, attn_dim=H)
    assert reward_model_train_flops(p, 40, 4) == 6 * 24_576 * 40 + 6 * 64 * 4


def test_frozen_weights_cost_4_per_trained_token(tiny_tokenizer, llama):
    V = len(tiny_tokenizer)
    lora = apply_lora(llama, LoraSettings(r=2, alpha=4, dropout=0.0, target_modules=["q_proj", "v_proj"]))
    p = matmul_params(lora)
    adapters = L * 2 * 2 * (H + H)  # layers x (q, v) x r x (in + out): 512
    assert (p.body, p.frozen_body, p.head, p.frozen_head) == (32_768 + 512, 32_768, V * H, V * H)
    # No weight gradient for a frozen weight: forward 2 + input gradient 2.
    assert causal_lm_train_flops(p, 40, 12) == (6 * adapters + 4 * 32_768) * 40 + 4 * V * 32 * 12
    assert causal_lm_forward_flops(p, 40, 12) == 2 * (32_768 + 512) * 40 + 2 * V * 32 * 12


def test_ppo_iteration(tiny_tokenizer, llama):
    V = len(tiny_tokenizer)
    policy = ref = matmul_params(llama)
    head = matmul_params(ValueHead(H))
    assert head == MatmulParams(body=0, head=32)
    body, lm = 2 * 32_768, 2 * V * 32  # forward FLOPs per real token and per LM-head position
    tokens, resp = 50, 20
    generation = body * tokens + lm * resp
    rollout = (
        body * tokens + 2 * lm * resp + 2 * 32 * resp
    )  # log-probs and entropy; values at response tokens
    reference = body * tokens + lm * resp
    update = 3 * (body * tokens + lm * resp) + 6 * 32 * resp
    assert (
        ppo_iteration_flops(policy, ref, head, tokens, resp, 2)
        == generation + rollout + reference + 2 * update
    )
    # The entropy bonus in the loss runs the LM head once more at response tokens, in each of 2 epochs.
    assert (
        ppo_iteration_flops(policy, ref, head, tokens, resp, 2, entropy_in_loss=True)
        - ppo_iteration_flops(policy, ref, head, tokens, resp, 2)
    ) == 2 * 3 * lm * resp
    # A separate critic: its own body and a value head at every token.
    critic = matmul_params(Critic(copy.deepcopy(llama.model)))
    assert critic == MatmulParams(body=32_768, head=32, layers=L, attn_dim=H)
    with_critic = (
        generation
        + (body * tokens + 2 * lm * resp)
        + (body * tokens + 2 * 32 * tokens)
        + reference
        + 2 * (3 * (body * tokens + lm * resp) + 3 * (body * tokens + 2 * 32 * tokens))
    )
    assert ppo_iteration_flops(policy, ref, critic, tokens, resp, 2) == with_critic


def test_reward_stage_logs_these_flops(tmp_path, tiny_model_dir):
    """A 2-step `rlhflab rm` run on a tiny Llama logs perf/flops_per_s = reward_model_train_flops / elapsed."""
    from rlhflab.stages import reward

    model_dir = tiny_model_dir
    # The fixture's tiny Llama is the one of the numbers below: hidden H, L layers, 2 heads.
    assert TINY_LM == {"hidden_size": H, "num_layers": L, "num_heads": 2}
    rows = [
        {"prompt": f"what is the {w} ?", "chosen": f"the {w} is very good .", "rejected": f"the {w} is bad ."}
        for w in ("cat", "dog", "film", "day")
    ] * 4
    data = write_jsonl(tmp_path / "pairs.jsonl", rows)
    cfg = stage_config(
        "rm",
        model_dir,
        "data.max_length=32",
        "data.max_prompt_length=16",
        "optim.batch_size=8",
        "optim.max_steps=2",
        data=data,
        out=tmp_path / "run",
    )
    reward.train(cfg)
    model = reward._build_model(cfg, str(model_dir), ["reward"])[0].train()
    p = matmul_params(model)
    assert p.body == 32_768 and p.final_at_reads == 14_336 and p.head == 32
    logged = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "perf/flops_per_s" in r]
    assert [r["step"] for r in logged] == [1, 2]
    for row in logged:
        elapsed = 8 / row["perf/pairs_per_s"]  # 8 pairs per step, one step per row
        tokens = round(row["perf/tokens_per_s"] * elapsed)
        # Shared-prompt rows, words + EOS: prompt "what is the W ?" (5) once, "the W is very good ." (7) and
        # "the W is bad ." (6): 18 real tokens per pair, 144 per step.
        assert tokens == 8 * 18
        # Every pair is read twice (chosen and rejected): 16 reads per step.
        assert row["perf/flops_per_s"] == pytest.approx(
            reward_model_train_flops(p, tokens, 16) / elapsed, rel=1e-9
        )
        assert (
            row["perf/flops_per_s"] < 6 * count_parameters(model) * row["perf/tokens_per_s"]
        )  # the rough 6 N T
