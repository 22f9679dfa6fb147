"""Where stage data comes from: a lab model, or any model trained from one, gets the lab's built-in data."""

from __future__ import annotations

import json

import pytest

from rlhflab.config import load_config
from rlhflab.errors import ConfigError
from rlhflab.lab.pretrain import LAB_TASK_KEY
from rlhflab.stages import reward, sft
from rlhflab.stages.data_source import lab_task_of, load_stage_records


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
    data = load_config("sft", None, []).data
    with pytest.raises(ConfigError, match="data.train_path is empty.*or a model trained from one"):
        load_stage_records(data, "sft", model_name=str(plain), run_dir=tmp_path / "run", seed=0)


def test_a_model_trained_from_a_lab_model_keeps_its_task(tmp_path, tiny_lab_cache):
    common = ["logging.progress=false", "logging.tensorboard=false", "model.device=cpu", "optim.max_steps=2",
              "optim.batch_size=8"]
    sft_final = sft.train(load_config("sft", None, ["model.name_or_path=lab:sentiment:tiny",
                                                    f"logging.output_dir={tmp_path / 'sft'}", *common]))
    assert json.loads((sft_final / "config.json").read_text())[LAB_TASK_KEY] == "sentiment"
    # The reward model starts from the SFT model and, with no data file, gets the lab's annotated pairs.
    rm_final = reward.train(load_config("rm", None, [f"model.name_or_path={sft_final}",
                                                     f"logging.output_dir={tmp_path / 'rm'}", *common]))
    assert (tmp_path / "rm" / "data" / "pairs.jsonl").is_file()
    assert json.loads((rm_final / "config.json").read_text())[LAB_TASK_KEY] == "sentiment"
