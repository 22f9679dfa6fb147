"""Lab names resolved above the stages: `lab:TASK` models and the lab's built-in data."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from rlhflab.cli import main
from rlhflab.config import load_config
from rlhflab.lab.launch import lab_model_dir, lab_task_of, resolve_lab
from rlhflab.lab.pretrain import LAB_TASK_KEY


def test_lab_task_of_names_and_directories(tmp_path):
    assert lab_task_of("lab:sentiment") == lab_task_of("lab:sentiment:tiny") == "sentiment"
    marked, plain, broken = tmp_path / "marked", tmp_path / "plain", tmp_path / "broken"
    for d in (marked, plain, broken):
        d.mkdir()
    (marked / "config.json").write_text(json.dumps({"model_type": "llama", LAB_TASK_KEY: "arith"}))
    (plain / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (broken / "config.json").write_text("{not json")
    assert lab_task_of(str(marked)) == "arith"
    assert lab_task_of(str(plain)) is None and lab_task_of(str(broken)) is None
    assert lab_task_of(str(tmp_path / "missing")) is None
    assert lab_model_dir(str(plain)) == str(plain)


def test_resolve_lab_fills_the_model_and_the_stage_data(lab_cache, monkeypatch, tmp_path):
    monkeypatch.setenv("RLHFLAB_CACHE", str(lab_cache))
    cfg = resolve_lab(
        load_config(
            "dpo",
            None,
            ["model.name_or_path=lab:sentiment:tiny", "algo.loss=kto", "ref_model=lab:sentiment:tiny"],
        ),
        "dpo",
        log=lambda _: None,
    )
    assert (lab_cache / "lab").resolve() in (tmp_path / cfg.model.name_or_path).resolve().parents
    assert cfg.ref_model == cfg.model.name_or_path
    assert cfg.data.train_path.endswith("unpaired.jsonl")  # KTO trains on unpaired records
    first = json.loads(Path(cfg.data.train_path).read_text().splitlines()[0])
    assert set(first) >= {"prompt", "completion", "label"}
    given = resolve_lab(
        load_config(
            "sft",
            None,
            ["model.name_or_path=lab:sentiment:tiny", f"data.train_path={tmp_path / 'mine.jsonl'}"],
        ),
        "sft",
    )
    assert given.data.train_path == str(tmp_path / "mine.jsonl")  # the user's data wins


def test_a_model_trained_from_a_lab_model_keeps_its_task(lab_cache, monkeypatch, tmp_path):
    monkeypatch.setenv("RLHFLAB_CACHE", str(lab_cache))
    common = [
        "logging.progress=false",
        "logging.tensorboard=false",
        "model.device=cpu",
        "optim.max_steps=2",
        "optim.batch_size=8",
    ]
    assert (
        main(
            [
                "sft",
                "model.name_or_path=lab:sentiment:tiny",
                f"logging.output_dir={tmp_path / 'sft'}",
                *common,
            ]
        )
        == 0
    )
    sft_final = tmp_path / "sft" / "final"
    assert json.loads((sft_final / "config.json").read_text())[LAB_TASK_KEY] == "sentiment"
    # The reward model starts from the SFT model and, with no data file, gets the lab's annotated pairs.
    assert (
        main(["rm", f"model.name_or_path={sft_final}", f"logging.output_dir={tmp_path / 'rm'}", *common]) == 0
    )
    used = yaml.safe_load((tmp_path / "rm" / "config.yaml").read_text())
    assert used["data"]["train_path"].endswith("pairs.jsonl") and str(lab_cache) in used["data"]["train_path"]
    assert json.loads((tmp_path / "rm" / "final" / "config.json").read_text())[LAB_TASK_KEY] == "sentiment"


def test_a_missing_model_is_a_one_line_error(capsys):
    assert main(["sft", "model.name_or_path=/no/such/model", "data.train_path=/no/such.jsonl"]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_the_reward_model_reads_the_lab_file_of_its_loss():
    """Each rm loss trains on its own lab file: pairs, rankings, or unpaired good/bad labels; the step loss has
    no lab file in its format and says so before any work."""
    from rlhflab.config import load_config
    from rlhflab.errors import ConfigError
    from rlhflab.lab.launch import record_kind

    def kind(loss):
        return record_kind("rm", load_config("rm", None, [f"algo.loss={loss}"]))

    assert [kind(x) for x in ("bradley_terry", "plackett_luce", "all_pairs", "binary", "distributional")] == [
        "pairwise", "ranked", "ranked", "unpaired", "pairwise"
    ]  # fmt: skip
    with pytest.raises(ConfigError, match="data.train_path"):
        kind("step")
