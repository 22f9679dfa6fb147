"""Where stage data comes from: data.train_path, with the held-out split; nothing else."""

from __future__ import annotations

import pytest

from rlhflab.config import load_config
from rlhflab.errors import ConfigError, UserError
from rlhflab.stages.common import resolve_model_path
from rlhflab.stages.data_source import load_stage_records

from .conftest import write_jsonl


def test_an_empty_train_path_is_refused_with_what_to_do(tmp_path):
    data = load_config("sft", None, []).data
    with pytest.raises(ConfigError, match="data.train_path is empty.*lab model"):
        load_stage_records(data, "sft", seed=0)


def test_eval_fraction_holds_out_a_seeded_share(tmp_path):
    path = write_jsonl(tmp_path / "sft.jsonl", [{"prompt": f"p{i}", "completion": "c"} for i in range(20)])
    data = load_config("sft", None, [f"data.train_path={path}", "data.eval_fraction=0.25"]).data
    train, held = load_stage_records(data, "sft", seed=3)
    assert len(train) == 15 and len(held) == 5
    assert {r.prompt for r in train}.isdisjoint({r.prompt for r in held})
    assert [r.prompt for r in load_stage_records(data, "sft", seed=3)[1]] == [r.prompt for r in held]
    assert [r.prompt for r in load_stage_records(data, "sft", seed=4)[1]] != [r.prompt for r in held]


def test_stages_do_not_resolve_lab_names():
    with pytest.raises(UserError, match="resolved by the rlhflab command line"):
        resolve_model_path("lab:sentiment")


def test_columns_map_our_fields_to_the_files_columns(tmp_path):
    """data.columns: our field -> the file's column; an SFT run may read a pairs file's chosen responses."""
    import json as _json

    from rlhflab.config import DataSection
    from rlhflab.errors import ConfigError as _ConfigError
    from rlhflab.stages.data_source import load_stage_records as _load

    path = tmp_path / "pairs.jsonl"
    path.write_text(_json.dumps({"question": "q ?", "chosen": "good .", "rejected": "bad ."}) + "\n")
    records, _ = _load(
        DataSection(train_path=str(path), columns={"prompt": "question", "completion": "chosen"}),
        "sft",
        seed=0,
    )
    assert (records[0].prompt, records[0].completion) == ("q ?", "good .")
    with pytest.raises(_ConfigError, match="column_map key 'answer' is not a field of 'sft' records"):
        _load(DataSection(train_path=str(path), columns={"answer": "chosen"}), "sft", seed=0)
