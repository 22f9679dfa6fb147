"""Last-real-token indexing, positions from the mask, and base-model + LM-head splitting."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from rlhflab.models.backbone import (
    backbone_and_head,
    hidden_to_logits,
    last_token_index,
    position_ids_from_mask,
)

from ..helpers import tiny_lm


def test_last_token_index_hand_worked():
    mask = torch.tensor(
        [
            [1, 1, 1, 0, 0],  # right padded -> 2
            [0, 0, 1, 1, 1],  # left padded -> 4
            [1, 1, 1, 1, 1],  # full -> 4
            [1, 0, 0, 0, 0],  # one token -> 0
            [0, 1, 1, 0, 0],  # both sides -> 2
        ]
    )
    assert last_token_index(mask).tolist() == [2, 4, 4, 0, 2]
    assert last_token_index(mask.bool()).tolist() == [2, 4, 4, 0, 2]


def test_position_ids_from_mask_hand_worked():
    mask = torch.tensor([[1, 1, 1, 0], [0, 0, 1, 1]])
    assert position_ids_from_mask(mask).tolist() == [[0, 1, 2, 2], [0, 0, 0, 1]]


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_backbone_and_head_reproduce_model_logits(tiny_tokenizer, arch):
    model = tiny_lm(tiny_tokenizer, arch=arch).eval()
    batch = tiny_tokenizer(["the cat sat on the mat", "hi"], return_tensors="pt", padding=True)
    base, head = backbone_and_head(model)
    assert head is model.get_output_embeddings()
    with torch.no_grad():
        full = model(**batch).logits
        hidden = base(**batch).last_hidden_state
        # the head applied only where needed (here: the last 3 positions) matches the full forward
        part = hidden_to_logits(model, head, hidden[:, -3:])
    torch.testing.assert_close(part, full[:, -3:], atol=1e-6, rtol=0)


def test_hidden_to_logits_applies_softcap_and_scale():
    head = torch.nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        head.weight.copy_(torch.eye(2))
    hidden = torch.tensor([[10.0, -1.0]])
    capped = SimpleNamespace(config=SimpleNamespace(final_logit_softcapping=5.0))
    torch.testing.assert_close(hidden_to_logits(capped, head, hidden), 5.0 * torch.tanh(hidden / 5.0))
    scaled = SimpleNamespace(config=SimpleNamespace(logit_scale=0.5))
    torch.testing.assert_close(hidden_to_logits(scaled, head, hidden), torch.tensor([[5.0, -0.5]]))
