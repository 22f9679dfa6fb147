import pytest
import torch

from rlhflab.data import (
    PairwiseRecord,
    RankedRecord,
    block_causal_mask,
    collate_packed,
    collate_pairs,
    collate_prompts,
    collate_ranked,
    collate_sft,
    collate_unpaired,
    make_collator,
    pack_sequences,
    tokenize_pair,
    tokenize_ranked,
)
from rlhflab.errors import ConfigError

PAD = 0


def _ex(ids, n_prompt):
    return {
        "input_ids": ids,
        "attention_mask": [1] * len(ids),
        "loss_mask": [False] * n_prompt + [True] * (len(ids) - n_prompt),
    }


def test_collate_sft_right_pads():
    batch = collate_sft([_ex([5, 6, 7], 1), _ex([8, 9], 1)], pad_token_id=PAD)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 9, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    assert batch["loss_mask"].tolist() == [[False, True, True], [False, True, False]]
    assert batch["loss_mask"].dtype == torch.bool and batch["input_ids"].dtype == torch.long
    assert collate_sft([_ex([5, 6, 7], 1)], pad_token_id=PAD, pad_to_multiple_of=4)["input_ids"].shape == (
        1,
        4,
    )
    unpaired = collate_unpaired(
        [{**_ex([5], 0), "label": True}, {**_ex([6], 0), "label": False}], pad_token_id=PAD
    )
    assert unpaired["label"].tolist() == [True, False]


def test_collate_prompts_left_pads():
    batch = collate_prompts(
        [{"input_ids": [5, 6, 7], "attention_mask": [1, 1, 1]}, {"input_ids": [8], "attention_mask": [1]}],
        pad_token_id=PAD,
    )
    assert batch["input_ids"].tolist() == [[5, 6, 7], [0, 0, 8]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1]]


def test_collate_pairs_split_and_stacked(tiny_tokenizer):
    examples = [
        tokenize_pair(PairwiseRecord("hi", "very good", "no", margin=2.0), tiny_tokenizer),
        tokenize_pair(PairwiseRecord("how was the day ?", "good", "bad"), tiny_tokenizer),
    ]
    split = collate_pairs(examples, pad_token_id=tiny_tokenizer.pad_token_id)
    assert split["chosen_input_ids"].shape == split["rejected_input_ids"].shape == (2, 7)
    assert split["margin"].tolist() == [2.0, 0.0]
    assert split["rejected_loss_mask"][0].tolist() == [False, True, True, False, False, False, False]
    stacked = collate_pairs(examples, pad_token_id=tiny_tokenizer.pad_token_id, stack=True)
    for key in ("input_ids", "attention_mask", "loss_mask"):
        assert torch.equal(stacked[key], torch.cat([split[f"chosen_{key}"], split[f"rejected_{key}"]]))
    assert torch.equal(stacked["margin"], split["margin"])


def test_collate_ranked_flattens_rows(tiny_tokenizer):
    examples = [
        tokenize_ranked(RankedRecord("hi", ["yes", "no", "hello"], ranks=[0, 1, 1]), tiny_tokenizer),
        tokenize_ranked(RankedRecord("hi", ["good", "bad"]), tiny_tokenizer),
    ]
    batch = collate_ranked(examples, pad_token_id=tiny_tokenizer.pad_token_id)
    assert batch["input_ids"].shape == (5, 3)
    assert batch["num_responses"].tolist() == [3, 2]
    assert batch["ranks"].tolist() == [[0, 1, 1], [0, 1, -1]]
    assert batch["response_mask"].tolist() == [[True, True, True], [True, True, False]]
    scores = torch.arange(5.0)
    grid = scores.new_zeros(2, 3).masked_scatter(batch["response_mask"], scores)
    assert grid.tolist() == [[0.0, 1.0, 2.0], [3.0, 4.0, 0.0]]


def test_make_collator_and_missing_pad_token():
    collate = make_collator("sft", PAD)
    assert collate([_ex([5], 0)])["input_ids"].tolist() == [[5]]
    with pytest.raises(ConfigError, match="no pad token"):
        make_collator("sft", None)
    with pytest.raises(ConfigError, match="unknown data kind"):
        make_collator("rlhf", PAD)


def test_pack_sequences_best_fit_decreasing_and_sequential():
    lengths = [5, 3, 4, 2, 6]
    examples = [_ex(list(range(10 * i + 1, 10 * i + 1 + n)), 0) for i, n in enumerate(lengths)]
    # By hand, longest first into rows of 8: 6 (ex 4) opens row A, 2 left; 5 (ex 0) opens B, 3 left;
    # 4 (ex 2) opens C; 3 (ex 1) best fits B (0 left); 2 (ex 3) fits A. Inside a row, data order.
    rows = pack_sequences(examples, 8)
    assert [r["seq_lens"] for r in rows] == [[2, 6], [5, 3], [4]]
    assert rows[0]["input_ids"] == [31, 32, 41, 42, 43, 44, 45, 46]
    assert rows[0]["position_ids"] == [0, 1, 0, 1, 2, 3, 4, 5]
    assert rows[0]["cu_seqlens"] == [0, 2, 8]
    # each sequence's first token cannot be predicted from inside its own sequence, so it never counts
    assert rows[0]["loss_mask"] == [False, True, False, True, True, True, True, True]
    sequential = pack_sequences(examples, 8, strategy="sequential")
    assert [r["seq_lens"] for r in sequential] == [[5, 3], [4, 2], [6]]
    with pytest.raises(ConfigError, match="example 4 has 6 tokens; packing needs 1..5"):
        pack_sequences(examples, 5)
    with pytest.raises(ConfigError, match="unknown packing strategy"):
        pack_sequences(examples, 8, strategy="ffd")


def test_block_causal_mask_by_hand():
    mask = block_causal_mask([[2, 1]], 4)
    assert mask.shape == (1, 1, 4, 4) and mask.dtype == torch.float32
    allowed = (mask[0, 0] == 0).int().tolist()
    assert allowed == [[1, 0, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]]
    assert torch.isinf(mask[0, 0, 2, 0]) and mask[0, 0, 2, 0] < 0
    assert block_causal_mask([[1]], 1, dtype=torch.bfloat16).dtype == torch.bfloat16


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_logits_equal_unpacked(tiny_model, tiny_tokenizer, attn):
    model = tiny_model.eval()
    model.set_attn_implementation(attn)
    gen = torch.Generator().manual_seed(0)
    seqs = [torch.randint(4, len(tiny_tokenizer), (n,), generator=gen).tolist() for n in (5, 7, 4, 9, 3)]
    rows = pack_sequences([_ex(s, 1) for s in seqs], 16, strategy="sequential")
    assert [r["seq_lens"] for r in rows] == [[5, 7, 4], [9, 3]]  # the second row gets 4 padding tokens
    batch = collate_packed(rows, pad_token_id=tiny_tokenizer.pad_token_id)
    assert batch["cu_seqlens"].tolist() == [0, 5, 12, 16, 25, 28, 32] and batch["max_seqlen"] == 9
    with torch.no_grad():
        packed = model(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            position_ids=batch["position_ids"],
        ).logits
        naive = model(input_ids=batch["input_ids"]).logits
        assert torch.isfinite(packed).all()
        worst_gap = 0.0
        for b, lens in enumerate(batch["seq_lens"]):
            start = 0
            for n in lens:
                alone = model(input_ids=torch.tensor([seqs.pop(0)])).logits[0]
                torch.testing.assert_close(packed[b, start : start + n], alone, atol=1e-5, rtol=0)
                worst_gap = max(worst_gap, (naive[b, start : start + n] - alone).abs().max().item())
                start += n
    assert worst_gap > 1e-3  # without the mask the sequences see each other: the test can fail
