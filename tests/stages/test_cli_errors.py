"""Stage launches through the CLI that fail on bad input: one message, exit 2, nothing half-written."""

from rlhflab.cli import main


def test_malformed_data_names_the_record_and_leaves_nothing_behind(tmp_path, tiny_model_dir, capsys):
    """A stage stopped by bad input removes the run directory it had just created."""
    data = tmp_path / "pairs.jsonl"
    data.write_text('{"prompt": "hi", "chosen": "good", "rejected": "bad"}\n{"prompt": "hey", "chosen": "fine"}\n')
    out = tmp_path / "run"
    code = main(["dpo", f"model.name_or_path={tiny_model_dir}", f"data.train_path={data}",
                 f"logging.output_dir={out}"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert f"{data}, line 2, field 'rejected': is missing; columns found: 'prompt', 'chosen'" in err
    assert not out.exists()


def test_input_error_keeps_an_earlier_run(tmp_path, tiny_model_dir, capsys):
    """Only directories this launch created are removed; a run that was there stays untouched."""
    out = tmp_path / "run"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    code = main(["dpo", f"model.name_or_path={tiny_model_dir}", f"data.train_path={tmp_path / 'none.jsonl'}",
                 f"logging.output_dir={out}"])
    assert code == 2
    assert "already holds a run" in capsys.readouterr().err
    assert (out / "keep.txt").read_text() == "x"
