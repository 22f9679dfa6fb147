"""Shared-prompt rows: one prompt, then each response, every response blind to the others."""

import torch

from rlhflab.data import collate_shared_prompt
from rlhflab.data.packing import responses_of


def _pair(prompt, chosen, rejected, margin=None):
    return {
        "prompt_input_ids": prompt,
        "chosen_input_ids": prompt + chosen,
        "rejected_input_ids": prompt + rejected,
        "margin": margin,
    }


def test_one_pair_by_hand():
    # Row: p p c c r  (prompt [1, 2], chosen [3, 4], rejected [5]); padded to the second row's length 6.
    batch = collate_shared_prompt(
        [_pair([1, 2], [3, 4], [5]), _pair([7], [8, 9, 10], [11, 12])], pad_token_id=0
    )
    assert batch["input_ids"].tolist() == [[1, 2, 3, 4, 5, 0], [7, 8, 9, 10, 11, 12]]
    # The rejected response continues from the prompt: position 2, like prompt + rejected alone.
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 2, 0], [0, 1, 2, 3, 1, 2]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 1, 0], [1] * 6]
    allowed = (batch["attention_mask_4d"][0, 0] == 0).int().tolist()
    assert allowed == [
        [1, 0, 0, 0, 0, 0],  # p
        [1, 1, 0, 0, 0, 0],  # p
        [1, 1, 1, 0, 0, 0],  # c sees the prompt and itself
        [1, 1, 1, 1, 0, 0],  # c
        [1, 1, 0, 0, 1, 0],  # r sees the prompt and itself, not the chosen response
        [0, 0, 0, 0, 0, 1],  # padding sees only itself (no all -inf softmax row)
    ]
    assert batch["attention_mask_4d"].shape == (2, 1, 6, 6)
    assert set(batch["attention_mask_4d"].unique().tolist()) == {0.0, float("-inf")}
    # Reads: example 0's chosen (row 0, pos 3) and rejected (row 0, pos 4), then example 1's (pos 3, pos 5).
    assert batch["read_rows"].tolist() == [0, 0, 1, 1]
    assert batch["read_positions"].tolist() == [3, 4, 3, 5]
    assert batch["key_mask"][1].int().tolist() == [1, 1, 0, 0, 1, 0]
    assert batch["key_mask"][3].int().tolist() == [1, 0, 0, 0, 1, 1]


def test_rankings_of_different_sizes_and_dtype():
    ranked = [
        {"prompt_input_ids": [1], "input_ids": [[1, 2], [1, 3, 4], [1, 5]]},
        {"prompt_input_ids": [6, 7], "input_ids": [[6, 7, 8], [6, 7, 9]]},
    ]
    batch = collate_shared_prompt(ranked, pad_token_id=0, dtype=torch.float64)
    assert batch["input_ids"].tolist() == [[1, 2, 3, 4, 5], [6, 7, 8, 9, 0]]
    assert batch["position_ids"].tolist() == [[0, 1, 1, 2, 1], [0, 1, 2, 2, 0]]
    assert batch["read_rows"].tolist() == [0, 0, 0, 1, 1]
    assert batch["read_positions"].tolist() == [1, 3, 4, 2, 3]
    assert batch["attention_mask_4d"].dtype == torch.float64
    # The third response (position 4) sees the prompt and itself only.
    assert batch["key_mask"][2].int().tolist() == [1, 0, 0, 0, 1]


def test_examples_that_cannot_share_their_prompt():
    assert responses_of(_pair([1, 2], [3], [4])) == [[3], [4]]
    empty = _pair([1, 2], [3], [])  # an empty response has no token of its own to read
    other_prefix = {
        "prompt_input_ids": [1, 2],
        "chosen_input_ids": [1, 9, 3],
        "rejected_input_ids": [1, 2, 4],
    }
    for bad in (empty, other_prefix):
        assert responses_of(bad) is None
        assert collate_shared_prompt([_pair([1], [2], [3]), bad], pad_token_id=0) is None
