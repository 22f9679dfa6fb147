import pytest

from rlhflab.config import (
    DPOConfig,
    SFTConfig,
    build_config,
    config_to_dict,
    config_to_yaml,
    load_config,
    parse_overrides,
)
from rlhflab.errors import ConfigError


def test_defaults_yaml_overrides_layering(tmp_path):
    f = tmp_path / "sft.yaml"
    f.write_text("optim:\n  lr: 1e-3\n  batch_size: 8\ndata:\n  max_length: 64\n")
    cfg = load_config("sft", f, ["optim.lr=1e-5", "data.max_prompt_length=16", "logging.tensorboard=false"])
    assert isinstance(cfg, SFTConfig)
    assert cfg.optim.lr == pytest.approx(1e-5)  # override beats file; "1e-5" (no dot) still a float
    assert cfg.optim.batch_size == 8  # from file
    assert cfg.data.max_length == 64 and cfg.data.max_prompt_length == 16
    assert cfg.logging.tensorboard is False
    assert cfg.optim.epochs == 2  # stage-specific default survives


def test_round_trip_through_dict_and_yaml():
    import yaml

    cfg = load_config("dpo", None, ["algo.beta=0.3", "optim.betas=[0.8, 0.95]"])
    again = build_config(DPOConfig, config_to_dict(cfg))
    assert again == cfg
    from_yaml = build_config(DPOConfig, yaml.safe_load(config_to_yaml(cfg)))
    assert from_yaml == cfg
    assert "strength of the implicit KL constraint" in config_to_yaml(cfg)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["optim.lrr=1"], r"unknown key 'optim.lrr'; did you mean 'optim.lr'\?"),
        (["optimizer.lr=1"], r"unknown key 'optimizer'; did you mean 'optim'\?"),
        (["optim.batch_size=abc"], r"'optim.batch_size' must be an integer, got 'abc'"),
        (["optim.lr=fast"], r"'optim.lr' must be a number"),
        (["logging.tensorboard=maybe"], r"must be true or false"),
        (["optim.scheduler=cosin"], r"must be one of .*did you mean 'cosine'\?"),
        (["optim.batch_size=10", "optim.micro_batch_size=4"], r"must divide optim.batch_size \(10\); try 5"),
        (["algo.beta=0"], r"algo.beta must be > 0"),
        (["data.max_length=32", "data.max_prompt_length=32"], r"must be smaller than data.max_length"),
        (["optim=3"], r"'optim' is a section"),
        (["nonsense"], r"must look like key=value"),
    ],
)
def test_actionable_errors(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config("dpo", None, overrides)


def test_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config("sft", tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim:\n  lr: [1, 2\n")
    with pytest.raises(ConfigError, match=r"not valid YAML at line \d+"):
        load_config("sft", bad)
    wrong_stage = tmp_path / "dpo.yaml"
    wrong_stage.write_text("stage: dpo\n")
    with pytest.raises(ConfigError, match="is for stage 'dpo', not 'sft'"):
        load_config("sft", wrong_stage)
    with pytest.raises(ConfigError, match="unknown stage 'sf'"):
        load_config("sf")


def test_parse_overrides_nests_and_parses_scalars():
    assert parse_overrides(["a.b=1", "a.c=x", "d=true", "e=[1, 2]"]) == {
        "a": {"b": 1, "c": "x"},
        "d": True,
        "e": [1, 2],
    }


def test_ppo_minibatch_must_divide_rollout_batch():
    with pytest.raises(
        ConfigError, match=r"algo.minibatch_size \(24\) must divide algo.rollout_batch_size \(64\)"
    ):
        load_config("ppo", None, ["algo.minibatch_size=24"])


@pytest.mark.parametrize(
    "stage", ["sft", "rm", "pm", "dpo", "ppo", "rloo", "grpo", "online-dpo", "iterative-dpo", "rs"]
)
def test_shipped_example_configs_load(stage):
    from pathlib import Path

    path = Path(__file__).parents[2] / "configs" / f"{stage.replace('-', '_')}_tiny.yaml"
    cfg = load_config(stage, path)
    assert cfg.model.name_or_path == "lab:sentiment"


def test_the_rollout_engine_setting(monkeypatch):
    """sampling.engine=hf is the default and loads; vllm is refused with the first thing missing (a CUDA GPU,
    then the vllm package), before any model loads, and loads with both; PPO's tis_cap must be >= 0."""
    import importlib.util

    import torch

    assert load_config("ppo", None, []).sampling.engine == "hf"
    assert load_config("grpo", None, ["sampling.engine=hf"]).sampling.engine == "hf"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match="sampling.engine=vllm needs a CUDA GPU"):
        load_config("ppo", None, ["sampling.engine=vllm"])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda n, *a: None if n == "vllm" else real_find_spec(n, *a)
    )
    with pytest.raises(ConfigError, match=r"needs the vllm package: pip install 'rlhflab\[vllm\]'"):
        load_config("ppo", None, ["sampling.engine=vllm"])
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda n, *a: object() if n == "vllm" else real_find_spec(n, *a)
    )
    assert load_config("ppo", None, ["sampling.engine=vllm"]).sampling.engine == "vllm"
    with pytest.raises(ConfigError, match="must be one of"):
        load_config("ppo", None, ["sampling.engine=sglang"])
    assert load_config("ppo", None, ["algo.tis_cap=2"]).algo.tis_cap == 2.0
    with pytest.raises(ConfigError, match="algo.tis_cap must be >= 0"):
        load_config("ppo", None, ["algo.tis_cap=-1"])
