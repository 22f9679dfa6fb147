import json
import logging
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from rlhflab.data import (
    PairwiseRecord,
    PromptRecord,
    RankedRecord,
    SFTRecord,
    UnpairedRecord,
    load_records,
    read_rows,
    write_jsonl,
)
from rlhflab.errors import ConfigError, DataError

FILES = Path(__file__).parent / "files"
KINDS = ["sft", "pairwise", "ranked", "unpaired", "prompt"]
FORMATS = ["jsonl", "json", "csv", "parquet", "datasets"]


def _jsonl_rows(name: str) -> list[dict]:
    return [json.loads(line) for line in (FILES / name).read_text().splitlines() if line.strip()]


def _source(kind: str, fmt: str, tmp_path: Path) -> Path:
    """The fixture for `kind` in format `fmt`; Parquet and datasets copies are made from the JSONL file."""
    if fmt in ("jsonl", "json", "csv"):
        return FILES / f"{kind}.{fmt}"
    rows = _jsonl_rows(f"{kind}.jsonl")
    # Arrow and datasets take the columns from row 0 only; give every row every column (None = absent).
    columns = list(dict.fromkeys(k for r in rows for k in r))
    rows = [{c: r.get(c) for c in columns} for r in rows]
    if fmt == "parquet":
        path = tmp_path / f"{kind}.parquet"
        pq.write_table(pa.Table.from_pylist(rows), path)
        return path
    import datasets

    path = tmp_path / f"{kind}_ds"
    datasets.Dataset.from_list(rows).save_to_disk(str(path))
    return path


EXPECTED = {
    "sft": [
        SFTRecord("what is 2 + 2 ?", "it is 4 ."),
        SFTRecord("say hello", "hello !"),
        SFTRecord("i love the film", "good"),
    ],
    "pairwise": [
        PairwiseRecord("how was the movie ?", "very good", "bad", margin=2.5),
        PairwiseRecord("say hi", "hi !", "no", rating="significantly_better"),
        PairwiseRecord("what is 1 + 1 ?", "2", "3"),
    ],
    "ranked": [
        RankedRecord("what is 3 + 4 ?", ["7", "it is 8", "no"]),
        RankedRecord("how was the day ?", ["great", "good", "happy", "bad"], ranks=(0, 1, 1, 2)),
    ],
    "unpaired": [
        UnpairedRecord("how was the film ?", "very good", True),
        UnpairedRecord("how was the film ?", "i hate it", False),
        UnpairedRecord("say yes", "yes", True),
    ],
    "prompt": [PromptRecord("how was the day ?"), PromptRecord("say hello"), PromptRecord("what is 5 + 2 ?")],
}


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("kind", KINDS)
def test_every_kind_loads_from_every_format(kind, fmt, tmp_path):
    result = load_records(_source(kind, fmt, tmp_path), kind)
    assert result.records == EXPECTED[kind]
    assert result.n_skipped == 0 and len(result) == len(EXPECTED[kind])


def test_ranked_ties_and_rating_margins():
    ranked = load_records(FILES / "ranked.jsonl", "ranked").records
    assert ranked[0].ranks == (0, 1, 2) and not ranked[0].has_ties
    assert ranked[1].tie_groups == [[0], [1, 2], [3]]
    plain = load_records(FILES / "pairwise.jsonl", "pairwise").records
    assert [r.margin for r in plain] == [2.5, None, None]  # a rating alone sets no margin
    assert plain[1].rating == "significantly_better"
    large = load_records(
        FILES / "pairwise.jsonl",
        "pairwise",
        margin_table={
            "significantly_better": 3.0,
            "better": 2.0,
            "slightly_better": 1.0,
            "negligibly_better": 0.0,
        },
    ).records
    assert [r.margin for r in large] == [2.5, 3.0, None]  # explicit margin wins over the table
    custom = load_records(
        FILES / "pairwise.jsonl", "pairwise", margin_table={"Significantly better": 7}
    ).records
    assert custom[1].margin == 7.0


@pytest.mark.parametrize("fmt", ["jsonl", "parquet", "datasets"])
def test_conversational_pairwise_with_explicit_and_implicit_prompt(fmt, tmp_path):
    src = _source("pairwise_chat", fmt, tmp_path)
    explicit, implicit = load_records(src, "pairwise").records
    assert explicit.prompt == [{"role": "user", "content": "how was the movie ?"}]
    assert explicit.chosen == [{"role": "assistant", "content": "very good"}]
    assert explicit.rating == "slightly_better" and explicit.margin is None  # a rating alone sets no margin
    assert implicit.prompt == [{"role": "user", "content": "say hi"}]
    assert implicit.chosen == [{"role": "assistant", "content": "hi !"}]
    assert implicit.rejected == [{"role": "assistant", "content": "no"}]


def test_csv_cells_hold_message_lists_as_json_but_bracketed_text_stays_text():
    chat, text = load_records(FILES / "pairwise_chat.csv", "pairwise").records
    assert chat.prompt == [{"role": "user", "content": "how was the movie ?"}]
    assert chat.rating == "slightly_better" and chat.margin is None
    assert text.prompt == "[INST] say hi [/INST]" and text.margin is None


@pytest.mark.parametrize("kind", KINDS)
def test_conversational_variants_load(kind, tmp_path):
    records = load_records(_source(f"{kind}_chat", "datasets", tmp_path), kind).records
    assert records == load_records(FILES / f"{kind}_chat.jsonl", kind).records
    first = records[0]
    if kind == "sft":
        assert [m["role"] for m in first.messages] == ["system", "user", "assistant", "user", "assistant"]
        # datasets fills absent keys with None; they must not leak into the messages
        assert all(set(m) == {"role", "content"} for m in first.messages)
    else:
        assert isinstance(first.prompt, list)


def test_dataset_dict_split_and_in_memory_sources(tmp_path):
    import datasets

    rows = _jsonl_rows("sft.jsonl")
    dd = datasets.DatasetDict(
        {"train": datasets.Dataset.from_list(rows), "test": datasets.Dataset.from_list(rows[:1])}
    )
    dd.save_to_disk(str(tmp_path / "dd"))
    assert len(load_records(tmp_path / "dd", "sft", split="test")) == 1
    with pytest.raises(ConfigError, match="several splits.*train, test"):
        load_records(tmp_path / "dd", "sft")
    with pytest.raises(ConfigError, match="no split 'dev'"):
        load_records(tmp_path / "dd", "sft", split="dev")
    assert load_records(dd, "sft", split="train").records == EXPECTED["sft"]
    assert load_records(rows, "sft").records == EXPECTED["sft"]
    with pytest.raises(ConfigError, match="split="):
        load_records(FILES / "sft.jsonl", "sft", split="train")


def test_read_rows_numbers_lines_and_indices():
    assert [n for n, _ in read_rows(FILES / "missing_field.jsonl")] == [1, 3]  # blank line 2 skipped
    assert [n for n, _ in read_rows(FILES / "sft.json")] == [0, 1, 2]
    assert [n for n, _ in read_rows(FILES / "sft.csv")] == [2, 3, 4]  # the header is line 1
    assert next(read_rows(FILES / "sft.csv"))[1] == {"prompt": "what is 2 + 2 ?", "completion": "it is 4 ."}


def test_column_map(tmp_path):
    path = tmp_path / "q.jsonl"
    path.write_text(json.dumps({"question": "say hi", "answer": "hi"}) + "\n")
    [record] = load_records(path, "sft", column_map={"prompt": "question", "completion": "answer"}).records
    assert record == SFTRecord("say hi", "hi")
    with pytest.raises(ConfigError, match="'chosen' is not a field of 'sft'"):
        load_records(path, "sft", column_map={"chosen": "answer"})
    with pytest.raises(ConfigError, match="unknown data kind 'dpo'"):
        load_records(path, "dpo")


# --- malformed input ---------------------------------------------------------------------------------


def test_bad_json_line_names_the_line():
    with pytest.raises(DataError, match=r"bad_json_line\.jsonl, line 3: invalid JSON") as info:
        load_records(FILES / "bad_json_line.jsonl", "sft")
    assert info.value.record == 3
    with pytest.raises(DataError, match="line 3"):
        list(read_rows(FILES / "bad_json_line.jsonl"))


def test_missing_field_names_file_record_field_columns_and_suggestion():
    with pytest.raises(DataError) as info:
        load_records(FILES / "missing_field.jsonl", "sft")
    msg = str(info.value)
    assert "missing_field.jsonl, line 3, field 'completion': is missing" in msg
    assert "columns found: 'prompt', 'response'" in msg
    assert "did you mean 'response'? Map it with column_map={'completion': 'response'}" in msg
    assert (info.value.field, info.value.record) == ("completion", 3)


def test_missing_field_suggests_close_spelling(tmp_path):
    path = tmp_path / "p.csv"
    path.write_text("prompt,chosen,rejectd\nhi,a,b\n")
    with pytest.raises(DataError, match=r"line 2, field 'rejected'.*did you mean 'rejectd'"):
        load_records(path, "pairwise")


@pytest.mark.parametrize(
    "row, kind, pattern",
    [
        (
            {"prompt": "hi", "completion": 5},
            "sft",
            r"field 'completion': expected a string or a list of .*got int 5",
        ),
        (
            {"prompt": "hi", "chosen": "a", "rejected": "b", "margin": "big"},
            "pairwise",
            r"field 'margin': expected a finite number, got str 'big'",
        ),
        (
            {"prompt": "hi", "completion": "a", "label": "yes"},
            "unpaired",
            r"field 'label': expected true or false",
        ),
        ({"prompt": "hi", "responses": "a"}, "ranked", r"field 'responses': expected a list of responses"),
        (
            {"prompt": "hi", "responses": ["a", "b"], "ranks": [1, 0]},
            "ranked",
            r"field 'ranks': \[1, 0\] is not non-decreasing",
        ),
        (
            {"prompt": "hi", "responses": ["a", "b"], "ranks": [1, 1]},
            "ranked",
            r"field 'ranks': ties every response",
        ),
        ({"prompt": "hi", "chosen": "a", "rejected": "a"}, "pairwise", r"field 'chosen': is identical"),
        (
            {"prompt": [{"role": "user"}], "completion": "a"},
            "sft",
            r"field 'prompt': message 0 needs a string 'content'",
        ),
        (
            {"chosen": "a", "rejected": "b"},
            "pairwise",
            r"field 'prompt': is missing \(a prompt can be left out only",
        ),
        (
            {"prompt": "hi", "chosen": [{"role": "assistant", "content": "a"}], "rejected": "b"},
            "pairwise",
            r"field 'chosen': is a list of messages but the prompt is text",
        ),
        (
            {"prompt": "hi", "chosen": "a", "rejected": "b", "rating": "way better"},
            "pairwise",
            r"field 'rating': unknown rating 'way better'; expected one of significantly_better, better",
        ),
        (
            {"messages": [{"role": "user", "content": "hi"}]},
            "sft",
            r"field 'messages': has no assistant message",
        ),
        ({"prompt": ""}, "prompt", r"field 'prompt': is empty"),
    ],
)
def test_wrong_values_name_line_field_and_expectation(tmp_path, row, kind, pattern):
    path = tmp_path / "d.jsonl"
    good = {
        "sft": {"prompt": "a", "completion": "b"},
        "pairwise": {"prompt": "a", "chosen": "b", "rejected": "c"},
        "unpaired": {"prompt": "a", "completion": "b", "label": True},
        "prompt": {"prompt": "a"},
        "ranked": {"prompt": "a", "responses": ["b", "c"]},
    }[kind]
    path.write_text(json.dumps(good) + "\n" + json.dumps(row) + "\n")
    with pytest.raises(DataError, match=r"d\.jsonl, line 2, " + pattern):
        load_records(path, kind)


def test_csv_specific_errors(tmp_path):
    path = tmp_path / "u.csv"
    path.write_text("prompt,completion,label\nhi,yes,true\nhi,no,maybe\n")
    with pytest.raises(DataError, match=r"line 3, field 'label': expected true or false, got 'maybe'"):
        load_records(path, "unpaired")
    path.write_text("prompt,completion\nhi,a,b\n")
    with pytest.raises(DataError, match=r"line 2: has 3 fields but the header has 2"):
        load_records(path, "sft")
    path.write_text('prompt,responses\nhi,"[""a"", ""b"""\n')
    with pytest.raises(DataError, match=r"line 2, field 'responses': expected a JSON list in this CSV cell"):
        load_records(path, "ranked")


@pytest.mark.parametrize(
    "name, content",
    [
        ("e.jsonl", ""),
        ("e.jsonl", "\n\n"),
        ("e.json", "[]"),
        ("e.csv", ""),
        ("e.csv", "prompt,completion\n"),
        ("e.json", " "),
    ],
)
def test_empty_sources_are_errors(tmp_path, name, content):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(DataError, match="no records found; the source is empty"):
        load_records(path, "sft")
    with pytest.raises(DataError, match="empty"):
        list(read_rows(path))


def test_empty_list_and_unknown_paths(tmp_path):
    with pytest.raises(DataError, match="empty"):
        load_records([], "prompt")
    with pytest.raises(DataError, match="no such file"):
        load_records(FILES / "nope.jsonl", "sft")
    with pytest.raises(DataError, match="unknown file type '.txt'"):
        (tmp_path / "d.txt").write_text("prompt\n")
        load_records(tmp_path / "d.txt", "sft")


def test_json_object_forms(tmp_path):
    path = tmp_path / "d.json"
    path.write_text(json.dumps({"data": [{"prompt": "hi"}]}))
    assert load_records(path, "prompt").records == [PromptRecord("hi")]
    path.write_text('{"prompt": "hi"}\n{"prompt": "yes"}\n')  # JSON Lines in a .json file
    assert len(load_records(path, "prompt")) == 2
    path.write_text(json.dumps({"rows": []}))
    with pytest.raises(DataError, match=r"expected a JSON array .* with keys \['rows'\]"):
        load_records(path, "prompt")
    path.write_text('[{"prompt": "hi"},\n {"prompt": }]')
    with pytest.raises(DataError, match="line 2: invalid JSON"):
        load_records(path, "prompt")


def test_skip_bad_counts_and_reports(tmp_path, caplog):
    path = tmp_path / "d.jsonl"
    lines = [
        json.dumps({"prompt": "a", "completion": "b"}),
        "{broken",
        json.dumps({"prompt": "a"}),
        json.dumps({"prompt": "c", "completion": "d"}),
        "[1, 2]",
    ]
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match="line 2"):
        load_records(path, "sft")
    with caplog.at_level(logging.WARNING, logger="rlhflab.data.loaders"):
        result = load_records(path, "sft", skip_bad=True)
    assert result.records == [SFTRecord("a", "b"), SFTRecord("c", "d")]
    assert result.n_skipped == 3
    assert "line 2" in result.skipped_errors[0] and "line 3, field 'completion'" in result.skipped_errors[1]
    assert "line 5: expected a JSON object" in result.skipped_errors[2]
    assert "skipped 3 malformed of 5 records" in caplog.text


def test_skip_bad_still_errors_when_nothing_is_usable(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(json.dumps({"prompt": "a", "answer": str(i)}) for i in range(4)) + "\n")
    with pytest.raises(DataError, match=r"no usable sft records: all 4 were malformed; the first: .*line 1"):
        load_records(path, "sft", skip_bad=True)


# --- writing -----------------------------------------------------------------------------------------


def test_write_jsonl_round_trips_records_and_dicts(tmp_path):
    records = EXPECTED["pairwise"] + load_records(FILES / "pairwise_chat.jsonl", "pairwise").records
    path = tmp_path / "sub" / "out.jsonl"
    assert write_jsonl(records, path) == 5
    assert load_records(path, "pairwise").records == records
    assert json.loads(path.read_text().splitlines()[2]) == {
        "prompt": "what is 1 + 1 ?",
        "chosen": "2",
        "rejected": "3",
    }
    ranked = EXPECTED["ranked"]
    write_jsonl(ranked, path)
    assert load_records(path, "ranked").records == ranked
    write_jsonl([{"prompt": "hé"}], path)
    assert path.read_text(encoding="utf-8") == '{"prompt": "hé"}\n'


def test_write_jsonl_is_atomic(tmp_path):
    path = tmp_path / "out.jsonl"
    write_jsonl([{"prompt": "old"}], path)
    before = path.read_bytes()

    def items():
        yield {"prompt": "new"}
        yield {"prompt": object()}

    with pytest.raises(DataError, match=r"out\.jsonl, item 1: cannot be written as JSON"):
        write_jsonl(items(), path)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.jsonl"]  # no temp file left

    def crashing():
        yield {"prompt": "new"}
        raise KeyboardInterrupt

    fresh = tmp_path / "fresh.jsonl"
    with pytest.raises(KeyboardInterrupt):
        write_jsonl(crashing(), fresh)
    assert not fresh.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.jsonl"]
