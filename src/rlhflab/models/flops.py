"""FLOPs that a step executes, counted from a model's matmul weights: what the stages log as
perf/flops_per_s (and DPO's perf/ref_flops_per_s), and what the benchmark counts as needed work.

The convention is model FLOPs in the 6N sense of Kaplan et al. 2020 (section 2.1), with N the non-embedding
matmul weights, each counted where it runs:

- A forward pass costs 2 FLOPs (one multiply-add) per matmul weight per token that it multiplies. A training
  step costs 6: the forward, then the backward's input gradient and weight gradient, 2 each. A frozen weight
  (requires_grad False, e.g. a LoRA model's base weights) gets no weight gradient, so it costs 4.
- Matmul weights are the weights of `nn.Linear` modules and of GPT-2's `Conv1D`. Biases are not counted.
  The input embedding (and GPT-2's position embedding) is a lookup and costs nothing.
- The LM head (vocab x hidden, tied to the embedding or not) runs only where log-probs are needed
  (`rlhflab.models.logprobs.token_logps`), so it is counted at `head_tokens` (the response tokens), not at
  every token. A reward model has no LM head. Its score head (num_heads x hidden) runs once per read
  position. Under the final-layer fast path (`rlhflab.models.final_layer`), the last layer's query,
  attention output and MLP also run only at the read positions.
- Attention scores (Q K^T and A V: 4 x attn_dim FLOPs per query-key pair per layer, forward) are added only
  when a caller passes `attention_pairs` (the benchmark does, with `causal_pairs`). The stages log without
  them, so their perf/flops_per_s is the 6N figure. It falls short of the executed work by about
  T / (12 x hidden) for causal rows of T tokens (the term Kaplan et al. drop when d_model >> n_ctx / 12).
- Elementwise work (norms, activations, softmax, rotary, losses), padding, and the forward that gradient
  checkpointing recomputes are not counted. These are model FLOPs, not hardware FLOPs: the MFU convention
  of Chowdhery et al. 2022, appendix B.

Token counts are real tokens (attention mask 1), as the stages count them.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import NamedTuple

from torch import nn
from transformers.pytorch_utils import Conv1D

from rlhflab.models.backbone import backbone_and_head
from rlhflab.models.final_layer import fast_final_layer
from rlhflab.models.heads import Critic, ValueHead
from rlhflab.models.reward_model import RewardModel


class MatmulParams(NamedTuple):
    """A model's matmul weights, grouped by where they run.

    body: weights that multiply every real token (the decoder layers; no embeddings, no output head).
    head: the output head's weights (an LM head, or a reward or value head).
    final_at_reads: the part of `body` that a reward model runs only at its read positions (the last
        layer's query, attention output and MLP under the final-layer fast path), else 0.
    frozen_*: the part of each group that gets no weight gradient (requires_grad False).
    layers, attn_dim: decoder layers and query width (heads x head_dim), for the attention term.
    """

    body: int
    head: int
    final_at_reads: int = 0
    frozen_body: int = 0
    frozen_head: int = 0
    frozen_final_at_reads: int = 0
    layers: int = 0
    attn_dim: int = 0


def _linear_weights(modules: Iterable[nn.Module]) -> tuple[int, int]:
    """(all, frozen) weight counts of the nn.Linear / Conv1D modules in `modules` and below."""
    total = frozen = 0
    seen: set[int] = set()
    for root in modules:
        for m in root.modules():
            if id(m) in seen or not isinstance(m, (nn.Linear, Conv1D)):
                continue
            seen.add(id(m))
            n = getattr(m.weight, "ds_numel", m.weight.numel())  # ZeRO-3 partitions: the whole size
            total += n
            frozen += 0 if m.weight.requires_grad else n
    return total, frozen


def _shape(model: nn.Module) -> tuple[int, int]:
    """(decoder layers, attention query width) from the model's config; (0, 0) without one."""
    config = getattr(model, "config", None)
    if config is None:
        return 0, 0
    if hasattr(config, "get_text_config"):
        config = config.get_text_config()
    heads = int(getattr(config, "num_attention_heads", 0) or 0)
    head_dim = getattr(config, "head_dim", None) or (config.hidden_size // heads if heads else 0)
    return int(getattr(config, "num_hidden_layers", 0) or 0), heads * int(head_dim)


def matmul_params(model: nn.Module) -> MatmulParams:
    """The matmul weights of a causal LM (a PEFT one too), a `RewardModel`, a `Critic` or a `ValueHead`.

    Causal LM: body = its base transformer, head = its LM head (tied or not). Reward model: body = its
    backbone, head = its score head, and `final_at_reads` set when the final-layer fast path applies to the
    backbone. Critic: body = its backbone, head = its value head. A ValueHead alone has no body.
    """
    final_at_reads = frozen_final = 0
    if isinstance(model, RewardModel):
        body, head = model.backbone, model.score
        layer = fast_final_layer(model.backbone)
        if layer is not None:
            everywhere = (layer.self_attn.k_proj, layer.self_attn.v_proj)  # keys and values: every position
            final_at_reads, frozen_final = (
                a - b for a, b in zip(_linear_weights([layer]), _linear_weights(everywhere), strict=True)
            )
    elif isinstance(model, Critic):
        body, head = model.backbone, model.value_head
    elif isinstance(model, ValueHead):
        body, head = None, model
    else:
        body, head = backbone_and_head(model)
    n_body, frozen_body = _linear_weights([body] if body is not None else [])
    n_head, frozen_head = _linear_weights([head])
    layers, attn_dim = _shape(body if body is not None else model)
    return MatmulParams(
        n_body, n_head, final_at_reads, frozen_body, frozen_head, frozen_final, layers, attn_dim
    )


def decoder_matmul_params(
    *, hidden: int, layers: int, heads: int, kv_heads: int, intermediate: int, head_outputs: int
) -> MatmulParams:
    """A Llama-style decoder's matmul weights from its config numbers: q, k, v, o and a gated MLP (gate,
    up, down) per layer, and a head of `head_outputs` outputs (the vocabulary for an LM head)."""
    kv = hidden * kv_heads // heads
    per_layer = hidden * (2 * hidden + 2 * kv) + 3 * hidden * intermediate
    return MatmulParams(body=layers * per_layer, head=hidden * head_outputs, layers=layers, attn_dim=hidden)


def causal_pairs(seq_lens: Iterable[int]) -> int:
    """Query-key pairs that causal attention scores in rows of these real lengths: T (T + 1) / 2 each."""
    return sum(t * (t + 1) // 2 for t in seq_lens)


def _attention(p: MatmulParams, pairs: int) -> float:
    """Forward FLOPs of attention scores: Q K^T and A V, 2 x attn_dim each per query-key pair per layer."""
    return 4.0 * p.layers * p.attn_dim * pairs


def causal_lm_forward_flops(
    p: MatmulParams, tokens: int, head_tokens: int, attention_pairs: int = 0
) -> float:
    """One forward pass (a reference or rollout pass, generation): 2 x body x tokens + 2 x head x
    head_tokens (+ attention scores over `attention_pairs`)."""
    return 2.0 * (p.body * tokens + p.head * head_tokens) + _attention(p, attention_pairs)


def causal_lm_train_flops(p: MatmulParams, tokens: int, head_tokens: int, attention_pairs: int = 0) -> float:
    """Forward and backward (SFT, DPO, a PPO update): 6 per trained weight and 4 per frozen weight, per
    token it runs at: the body at `tokens`, the head at `head_tokens` (+ 3 x the attention scores)."""
    return (
        (6 * p.body - 2 * p.frozen_body) * tokens
        + (6 * p.head - 2 * p.frozen_head) * head_tokens
        + 3.0 * _attention(p, attention_pairs)
    )


def reward_model_forward_flops(p: MatmulParams, tokens: int, reads: int, attention_pairs: int = 0) -> float:
    """A reward model's forward: the body at every token except its `final_at_reads` part, which runs with
    the score head at the `reads` read positions (one per response). Attention pairs are counted at every
    layer (the fast path's smaller final-layer attention is not modelled)."""
    return 2.0 * ((p.body - p.final_at_reads) * tokens + (p.final_at_reads + p.head) * reads) + _attention(
        p, attention_pairs
    )


def reward_model_train_flops(p: MatmulParams, tokens: int, reads: int, attention_pairs: int = 0) -> float:
    """Forward and backward of a reward model: as `reward_model_forward_flops`, 6 per trained and 4 per
    frozen weight."""
    every = 6 * (p.body - p.final_at_reads) - 2 * (p.frozen_body - p.frozen_final_at_reads)
    at_reads = 6 * (p.final_at_reads + p.head) - 2 * (p.frozen_final_at_reads + p.frozen_head)
    return every * tokens + at_reads * reads + 3.0 * _attention(p, attention_pairs)


def ppo_iteration_flops(
    policy: MatmulParams,
    ref: MatmulParams,
    value: MatmulParams,
    tokens: int,
    response_tokens: int,
    ppo_epochs: int,
    entropy_in_loss: bool = False,
) -> float:
    """One PPO iteration over a rollout batch of `tokens` real tokens, `response_tokens` of them sampled.

    Generation: the policy over every token (prompt prefill, then one token per step with the KV cache;
    the last sampled token is never fed back, one token per row that is not subtracted), its LM head once
    per sampled token. Rollout pass: the policy with its head at response tokens twice (log-probs and
    entropy), and the value model. Reference pass: the reference, head at response tokens. Then
    `ppo_epochs` updates over the batch: the policy (head once more at response tokens when the entropy
    bonus is in the loss) and the value model. A value model with a body of its own (a `Critic`) runs its
    head at every token; a `ValueHead` on the policy's hidden states only at response tokens.
    """
    value_tokens = tokens if value.body else response_tokens
    forward = (
        causal_lm_forward_flops(policy, tokens, response_tokens)  # generation
        + causal_lm_forward_flops(policy, tokens, 2 * response_tokens)  # rollout pass
        + causal_lm_forward_flops(value, tokens, value_tokens)
        + causal_lm_forward_flops(ref, tokens, response_tokens)
    )  # reference pass
    update = causal_lm_train_flops(
        policy, tokens, (2 if entropy_in_loss else 1) * response_tokens
    ) + causal_lm_train_flops(value, tokens, value_tokens)
    return forward + ppo_epochs * update


def critic_free_iteration_flops(
    policy: MatmulParams,
    ref: MatmulParams | None,
    tokens: int,
    response_tokens: int,
    *,
    train_tokens: int,
    train_response_tokens: int,
    old_pass: bool,
    greedy: tuple[int, int] = (0, 0),
    entropy_tokens: int = 0,
) -> float:
    """One RLOO / GRPO iteration over a batch of `tokens` real tokens, `response_tokens` of them sampled.

    Generation as in `ppo_iteration_flops`, plus the greedy responses of ReMax (`greedy` = their (tokens,
    response tokens)); the rollout policy's pass only when it runs (`old_pass`); the reference pass when
    there is a reference; the updates over `train_tokens` (all epochs, the kept groups only), the LM head at
    `train_response_tokens`; the logged entropy's extra LM head (forward only) at `entropy_tokens`.
    """
    flops = causal_lm_forward_flops(policy, tokens, response_tokens)  # generation
    flops += causal_lm_forward_flops(policy, *greedy)
    if old_pass:
        flops += causal_lm_forward_flops(policy, tokens, response_tokens)
    if ref is not None:
        flops += causal_lm_forward_flops(ref, tokens, response_tokens)
    flops += causal_lm_train_flops(policy, train_tokens, train_response_tokens)
    return flops + 2.0 * policy.head * entropy_tokens


__all__ = [
    "MatmulParams",
    "causal_lm_forward_flops",
    "causal_lm_train_flops",
    "causal_pairs",
    "critic_free_iteration_flops",
    "decoder_matmul_params",
    "matmul_params",
    "ppo_iteration_flops",
    "reward_model_forward_flops",
    "reward_model_train_flops",
]
