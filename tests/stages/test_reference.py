"""The reference-log-prob cache: values, reuse, invalidation, row order, and the numbers it logs."""

from __future__ import annotations

import pytest
import torch

from rlhflab.data import PairwiseRecord, UnpairedRecord, collate_pairs, tokenize_pair, tokenize_unpaired
from rlhflab.models.logprobs import token_logps
from rlhflab.stages.reference import REF_CACHE, cache_rows, cached_reference_logps, response_tokens

from ..helpers import tiny_lm

CPU = torch.device("cpu")
PAIRS = [
    ("the cat sat", "it is good .", "no"),
    ("what is it", "a dog", "it is very very bad ."),
    ("hello", "hi !", "hi"),
]


@pytest.fixture(scope="module")
def model(tiny_tokenizer):
    return tiny_lm(tiny_tokenizer, seed=3).eval()


@pytest.fixture(scope="module")
def pairs(tiny_tokenizer):
    return [tokenize_pair(PairwiseRecord(p, c, r), tiny_tokenizer, max_length=32) for p, c, r in PAIRS]


def _one_by_one(model, examples, pad_id):
    """[N, 2] summed response log-probs, one pair at a time (no padding, no batching)."""
    rows = []
    for ex in examples:
        b = collate_pairs([ex], pad_token_id=pad_id, stack=True)
        with torch.no_grad():
            rows.append(token_logps(model, b["input_ids"], b["attention_mask"], b["loss_mask"]).sum(-1))
    return torch.stack(rows)


def test_the_cache_holds_each_pairs_log_probs_and_is_reused(model, pairs, tiny_tokenizer, tmp_path):
    pad = tiny_tokenizer.pad_token_id
    loads, logs = [], []

    def load():
        loads.append(1)
        return model

    logps, perf = cached_reference_logps(
        tmp_path, "ref A", {"train": pairs}, "pairwise", load, CPU, pad, batch_size=2, log=logs.append
    )
    torch.testing.assert_close(logps["train"], _one_by_one(model, pairs, pad), atol=1e-5, rtol=1e-5)
    assert (tmp_path / REF_CACHE).is_file() and loads == [1]
    # The rates are what the pass processed over its time: every real token of every pair, both sides.
    real = sum(len(ex["chosen_input_ids"]) + len(ex["rejected_input_ids"]) for ex in pairs)
    assert perf["perf/ref_tokens_per_s"] * perf["perf/ref_seconds"] == pytest.approx(real)
    assert perf["perf/ref_examples_per_s"] * perf["perf/ref_seconds"] == pytest.approx(len(pairs))

    again, perf2 = cached_reference_logps(
        tmp_path, "ref A", {"train": pairs}, "pairwise", load, CPU, pad, batch_size=2, log=logs.append
    )
    assert loads == [1] and perf2 == {} and torch.equal(again["train"], logps["train"])
    assert "reusing" in logs[-1]
    # Another reference, or other tokens, invalidate the cache.
    cached_reference_logps(
        tmp_path, "ref B", {"train": pairs}, "pairwise", load, CPU, pad, batch_size=2, log=logs.append
    )
    assert loads == [1, 1] and "computing it again" in logs[-2]
    cached_reference_logps(
        tmp_path, "ref B", {"train": pairs[:2]}, "pairwise", load, CPU, pad, batch_size=2, log=logs.append
    )
    assert loads == [1, 1, 1]


def test_cache_rows_follow_the_collated_batch():
    """Pairs: the batch's chosen rows then its rejected rows, in the batch's example order; unpaired: rows."""
    values = torch.tensor([[0.0, 10.0], [1.0, 11.0], [2.0, 12.0]])
    assert cache_rows(values, [2, 0]).tolist() == [2.0, 0.0, 12.0, 10.0]
    assert cache_rows(torch.tensor([5.0, 6.0, 7.0]), [1, 2]).tolist() == [6.0, 7.0]


def test_response_tokens_count_both_sides_where_the_head_runs(pairs, tiny_tokenizer):
    """The LM head runs at the positions that predict response tokens: loss_mask[1:], chosen and rejected."""
    expected = [sum(ex["chosen_loss_mask"][1:]) + sum(ex["rejected_loss_mask"][1:]) for ex in pairs]
    assert (
        response_tokens(pairs, [0]) == expected[0]
        and response_tokens(pairs, [0, 2]) == expected[0] + expected[2]
    )
    unpaired = [
        tokenize_unpaired(UnpairedRecord("hello", "it is good .", True), tiny_tokenizer, max_length=32)
    ]
    assert response_tokens(unpaired, [0]) == sum(unpaired[0]["loss_mask"][1:]) > 0


class _Rank:
    """Rank `rank` of 2 whose sums return its own part: the two ranks' results then add up to the whole."""

    def __init__(self, rank: int):
        self.rank, self.world = rank, 2

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def shard(self, items):
        return list(items)[self.rank :: self.world]

    def sum_tensor(self, x):
        return x

    def sum(self, value):
        return value

    def wait(self):
        pass


def test_each_process_computes_its_share_of_the_rows_and_the_main_one_writes(
    model, pairs, tiny_tokenizer, tmp_path
):
    """Across processes each computes the rows of its shard (zeros elsewhere, summed into the whole tensor) and
    counts its own tokens; only the main process writes the cache."""
    pad = tiny_tokenizer.pad_token_id
    (tmp_path / "one").mkdir()
    (tmp_path / "two").mkdir()
    sets = {"train": pairs}
    whole, _ = cached_reference_logps(tmp_path / "one", "ref", sets, "pairwise", lambda: model, CPU, pad, 2)
    parts, tokens = [], []
    for rank in (1, 0):  # the other process first: it writes nothing
        logps, perf = cached_reference_logps(
            tmp_path / "two", "ref", sets, "pairwise", lambda: model, CPU, pad, 2, log=lambda *_: None,
            par=_Rank(rank),
        )  # fmt: skip
        assert (tmp_path / "two" / REF_CACHE).is_file() == (rank == 0)
        parts.append(logps["train"])
        tokens.append(perf["perf/ref_tokens_per_s"] * perf["perf/ref_seconds"])
    assert torch.equal(parts[0][[0, 2]], torch.zeros(2, 2)) and torch.equal(parts[1][1], torch.zeros(2))
    torch.testing.assert_close(parts[0] + parts[1], whole["train"], atol=1e-6, rtol=0)
    own = [
        sum(len(pairs[i]["chosen_input_ids"]) + len(pairs[i]["rejected_input_ids"]) for i in rows)
        for rows in ([1], [0, 2])
    ]
    assert tokens == pytest.approx(own)
