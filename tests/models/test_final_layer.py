"""The final decoder layer computed only where a reward head reads it: same rewards and gradients as the
full forward, on Llama with and without grouped-query attention; other models run unchanged."""

from __future__ import annotations

import contextlib

import pytest
import torch

from rlhflab.models.final_layer import final_layer_only_at

from ..helpers import tiny_reward_model


def _reward_model(kv_heads: int):
    return tiny_reward_model("llama", kv_heads, vocab=40)


@pytest.mark.parametrize("kv_heads", [4, 2])
def test_final_layer_only_at_gives_the_same_rewards_and_gradients(kv_heads):
    from rlhflab.models.backbone import last_token_index

    model = _reward_model(kv_heads)
    ids = torch.randint(0, 40, (4, 10), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0  # right padding
    mask[2, :3] = 0  # left padding
    mask[3, 8:] = 0
    weights = torch.tensor([[1.0, -0.5], [0.3, 2.0], [-1.2, 0.7], [0.9, 0.1]])

    mlp_rows = []
    model.backbone.layers[-1].mlp.register_forward_hook(
        lambda m, args, out: mlp_rows.append(args[0].shape[:-1])
    )

    def run(fast: bool):
        model.zero_grad(set_to_none=True)
        mlp_rows.clear()
        block = (
            final_layer_only_at(model.backbone, mask, last_token_index(mask))
            if fast
            else contextlib.nullcontext(False)
        )
        with block as used:
            rewards = model(ids, mask)
        (rewards * weights).sum().backward()
        return used, rewards.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    used, fast_rewards, fast_grads = run(True)
    assert used and mlp_rows == [torch.Size([4])]  # the final MLP ran on one position per row
    _, rewards, grads = run(False)
    assert mlp_rows == [torch.Size([4, 10])]
    assert torch.allclose(fast_rewards, rewards, atol=1e-5)
    for name, grad in grads.items():
        assert torch.allclose(fast_grads[name], grad, atol=1e-5), name
    assert type(model.backbone.layers[-1]).__name__ == "LlamaDecoderLayer"  # put back after the block


def test_final_layer_only_at_leaves_other_models_and_errors_alone(tiny_tokenizer):
    from rlhflab.models.tiny import tiny_causal_lm

    gpt2 = tiny_causal_lm(tiny_tokenizer, arch="gpt2", hidden_size=16, num_layers=1, num_heads=2).transformer
    mask = torch.ones(2, 3, dtype=torch.long)
    with final_layer_only_at(gpt2, mask, torch.tensor([2, 2])) as used:
        assert not used
    model = _reward_model(4)
    last = model.backbone.layers[-1]
    with (
        pytest.raises(RuntimeError, match="boom"),
        final_layer_only_at(model.backbone, mask, torch.tensor([2, 2])),
    ):
        assert model.backbone.layers[-1] is not last
        raise RuntimeError("boom")
    assert model.backbone.layers[-1] is last
