"""Stepwise (process-supervision) data: TRL's {"prompt", "completions", "labels"} records, their loading, errors,
tokenization (where each step's verdict is read) and batching."""

from __future__ import annotations

import json

import pytest
import torch

from rlhflab.data import StepwiseRecord, encode_steps, load_records, record_to_dict, tokenize_stepwise
from rlhflab.data.reward_batch import collate_reward_batch
from rlhflab.errors import ConfigError, DataError

ROWS = [
    {
        "prompt": "what is 1 + 2 + 3 ?",
        "completions": ["1 + 2 = 3", "3 + 3 = 6", "6 ."],
        "labels": [True, True, True],
    },
    {"prompt": "what is 2 + 2 ?", "completions": ["2 + 2 = 5", "5 ."], "labels": [False, False]},
]


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_loads_jsonl_and_csv_and_round_trips(tmp_path):
    got = load_records(_jsonl(tmp_path / "s.jsonl", ROWS), "stepwise").records
    assert got == [StepwiseRecord(**r) for r in ROWS]
    assert [record_to_dict(r) for r in got] == ROWS
    csv = tmp_path / "s.csv"
    csv.write_text('prompt,completions,labels\nhi,"[""a"", ""b""]","[true, false]"\n')
    (record,) = load_records(csv, "stepwise").records
    assert record.completions == ["a", "b"] and record.labels == [True, False]


@pytest.mark.parametrize(
    "row,field,pattern",
    [
        (
            {"prompt": "p", "completions": ["a", "b"], "labels": [True]},
            "labels",
            "has 1 labels but there are 2 steps",
        ),
        ({"prompt": "p", "completions": ["a"], "labels": ["yes"]}, "labels", "expected a list of true/false"),
        ({"prompt": "p", "completions": ["a"], "labels": True}, "labels", "expected a list of true/false"),
        (
            {"prompt": "p", "completions": "a b", "labels": [True]},
            "completions",
            "non-empty list of step texts",
        ),
        ({"prompt": "p", "completions": [], "labels": []}, "completions", "non-empty list of step texts"),
        (
            {"prompt": "p", "completions": ["a", " "], "labels": [True, True]},
            "completions",
            "step 1 is empty",
        ),
        ({"prompt": "p", "completions": ["a", 3], "labels": [True, True]}, "completions", "step texts"),
    ],
)
def test_malformed_records_name_file_line_and_field(tmp_path, row, field, pattern):
    path = _jsonl(tmp_path / "bad.jsonl", [ROWS[0], row])
    with pytest.raises(DataError, match=pattern) as info:
        load_records(path, "stepwise")
    assert (info.value.field, info.value.record) == (field, 2)
    assert str(info.value).startswith(f"{path}, line 2, field '{field}'")


def test_the_lab_style_columns_get_a_suggestion(tmp_path):
    path = _jsonl(tmp_path / "lab.jsonl", [{"prompt": "p", "steps": ["a"], "step_labels": [True]}])
    with pytest.raises(DataError, match=r"field 'completions'.*did you mean 'steps'"):
        load_records(path, "stepwise")
    got = load_records(path, "stepwise", column_map={"completions": "steps", "labels": "step_labels"}).records
    assert got == [StepwiseRecord("p", ["a"], [True])]


def test_each_step_is_read_at_its_separator(tiny_tokenizer):
    ids = lambda text: tiny_tokenizer.convert_tokens_to_ids(text.split())  # noqa: E731
    record = StepwiseRecord("what is 1 + 2 ?", ["1 + 2 = 3", "3 ."], [True, False])
    out = tokenize_stepwise(record, tiny_tokenizer, separator=" , ")
    # prompt (6 tokens) | 1 + 2 = 3 , | 3 . ,  -> the verdicts sit on the two commas, positions 11 and 14.
    assert out["input_ids"] == ids("what is 1 + 2 ? 1 + 2 = 3 , 3 . ,")
    assert out["step_positions"] == [11, 14] and out["step_labels"] == [True, False]
    assert out["attention_mask"] == [1] * 15
    # A step cut by max_length is dropped with every later one, and so is its label.
    cut = tokenize_stepwise(record, tiny_tokenizer, separator=" , ", max_length=14, max_prompt_length=8)
    assert cut["step_positions"] == [11] and cut["step_labels"] == [True] and len(cut["input_ids"]) == 14
    with pytest.raises(ConfigError, match="step 0 .* tokenizes to no tokens"):
        encode_steps("hi", ["   \t"], tiny_tokenizer, separator="")


def test_stepwise_batches(tiny_tokenizer):
    records = [StepwiseRecord(**r) for r in ROWS]
    examples = [
        {**tokenize_stepwise(r, tiny_tokenizer, separator=" , "), "head": h} for h, r in enumerate(records)
    ]
    batch = collate_reward_batch(examples, "stepwise", pad_id=0)
    assert batch["input_ids"].shape == batch["step_mask"].shape == batch["step_labels"].shape
    for i, e in enumerate(examples):
        assert batch["step_mask"][i].nonzero().squeeze(1).tolist() == e["step_positions"]
        assert batch["step_labels"][i, e["step_positions"]].tolist() == e["step_labels"]
        assert int(batch["attention_mask"][i].sum()) == len(e["input_ids"])
    assert not batch["step_labels"][~batch["step_mask"]].any()
    assert batch["row_head"].tolist() == [0, 1] and batch["step_mask"].dtype == torch.bool
