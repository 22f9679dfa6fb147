"""Stage launches through the CLI that fail on bad input: one message, exit 2, nothing half-written."""

from pathlib import Path

from rlhflab.cli import main

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def test_malformed_data_names_the_record_and_leaves_nothing_behind(tmp_path, tiny_model_dir, capsys):
    """A stage stopped by bad input removes the run directory it had just created."""
    data = tmp_path / "pairs.jsonl"
    data.write_text(
        '{"prompt": "hi", "chosen": "good", "rejected": "bad"}\n{"prompt": "hey", "chosen": "fine"}\n'
    )
    out = tmp_path / "run"
    code = main(
        [
            "dpo",
            f"model.name_or_path={tiny_model_dir}",
            f"data.train_path={data}",
            f"logging.output_dir={out}",
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert f"{data}, line 2, field 'rejected': is missing; columns found: 'prompt', 'chosen'" in err
    assert not out.exists()


def test_input_error_keeps_an_earlier_run(tmp_path, tiny_model_dir, capsys):
    """Only directories this launch created are removed; a run that was there stays untouched."""
    out = tmp_path / "run"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    code = main(
        [
            "dpo",
            f"model.name_or_path={tiny_model_dir}",
            f"data.train_path={tmp_path / 'none.jsonl'}",
            f"logging.output_dir={out}",
        ]
    )
    assert code == 2
    assert "already holds a run" in capsys.readouterr().err
    assert (out / "keep.txt").read_text() == "x"


UNUSABLE_KEYS = [
    # PPO samples its responses: no response lengths, no packing, no held-out records, and its optimizer
    # steps are set by algo.rollout_batch_size / minibatch_size / ppo_epochs / iterations.
    ("ppo", "data.packing=true"),
    ("ppo", "data.max_length=64"),
    ("ppo", "data.eval_fraction=0.1"),
    ("ppo", "data.eval_path=x.jsonl"),
    ("ppo", "optim.batch_size=8"),
    ("ppo", "optim.micro_batch_size=2"),
    ("ppo", "optim.epochs=2"),
    ("ppo", "optim.max_steps=3"),
    ("ppo", "logging.eval_every=5"),
    # Only SFT packs rows.
    ("rm", "data.packing=true"),
    ("dpo", "data.packing=true"),
    # A typo anywhere.
    ("sft", "optim.lrr=1e-3"),
]


def test_a_key_a_stage_cannot_use_is_refused_before_any_work(tmp_path, capsys):
    """A config key acts or is refused: each of these exits 2 with one line naming the key, and no run
    directory is created (the config fails before a model or a file is touched)."""
    for stage, override in UNUSABLE_KEYS:
        out = tmp_path / f"{stage}-{override.split('=')[0]}"
        config = ["--config", str(CONFIGS / "ppo_tiny.yaml")] if stage == "ppo" else []
        assert main([stage, *config, override, f"logging.output_dir={out}"]) == 2, override
        err = capsys.readouterr().err
        key = override.split("=")[0]
        assert err.count("\n") == 1 and err.startswith(f"error: config: unknown key '{key}'"), err
        assert not out.exists()


def test_ppo_without_a_reward_fails_before_loading_a_model(tmp_path, capsys):
    data = tmp_path / "prompts.jsonl"
    data.write_text('{"prompt": "hi"}\n')
    out = tmp_path / "run"
    # The model does not exist: the reward check comes first, so its message is the one shown.
    assert (
        main(["ppo", "model.name_or_path=/no/model", f"data.train_path={data}", f"logging.output_dir={out}"])
        == 2
    )
    assert "algo.reward_model is empty" in capsys.readouterr().err and not out.exists()


def test_ppo_without_a_reward_fails_before_any_lab_work(tmp_path, monkeypatch, capsys):
    """With the default lab model and no reward, nothing is pretrained or made: the lab cache stays empty."""
    monkeypatch.setenv("RLHFLAB_CACHE", str(tmp_path / "cache"))
    assert main(["ppo", f"logging.output_dir={tmp_path / 'run'}"]) == 2
    assert "algo.reward_model is empty" in capsys.readouterr().err
    assert not (tmp_path / "cache").exists() and not (tmp_path / "run").exists()
