"""The general preference model stage (`rlhflab pm`): it learns a learnable toy (held-out loss and accuracy
improve), saves a marked preference model, resumes exactly, and refuses what it cannot use (exit 2)."""

import random
from pathlib import Path

import pytest

from rlhflab.cli import main
from rlhflab.config import load_config
from rlhflab.core.metrics_log import read_metrics
from rlhflab.errors import ConfigError
from rlhflab.lab.launch import record_kind
from rlhflab.models.preference_model import PreferenceModel
from rlhflab.stages import preference_model as pm

from ..helpers import assert_resume_matches, stage_config, write_jsonl

SUBJECTS = ["the cat", "the dog", "the film", "the day", "this movie", "it"]
CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def _pairs(n=96, seed=0):
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        s = rng.choice(SUBJECTS)
        rows.append(
            {
                "prompt": f"what is {rng.choice(SUBJECTS)} ?",
                "chosen": f"{s} is very good .",
                "rejected": f"{s} is very bad .",
            }
        )
    return rows


def _cfg(model_dir, data, out, *extra):
    lengths = ("data.max_length=40", "data.max_prompt_length=12")
    return stage_config(
        "pm", model_dir, *lengths, "optim.batch_size=8", "optim.lr=1e-2", *extra, data=data, out=out
    )


def test_pm_learns_a_separable_set_and_saves_a_preference_model(tiny_model_dir, tmp_path):
    data = write_jsonl(tmp_path / "pairs.jsonl", _pairs())
    out = tmp_path / "run"
    extra = ("optim.max_steps=16", "data.eval_fraction=0.25", "logging.eval_every=100")
    final = pm.train(_cfg(tiny_model_dir, data, out, *extra))
    rows = read_metrics(out / "metrics.jsonl")
    evals = [r for r in rows if "eval/accuracy" in r]
    assert [r["step"] for r in evals] == [0, 16]  # the untrained baseline, then the final evaluation
    assert evals[-1]["eval/accuracy"] > 0.9 and evals[0]["eval/accuracy"] < 0.9
    assert evals[-1]["eval/loss"] < 0.5 * evals[0]["eval/loss"]
    train_rows = [r for r in rows if "loss/pm" in r]
    assert len(train_rows) == 16 and all(0 <= r["reward/accuracy"] <= 1 for r in train_rows)
    # RUN/final is a preference model that prefers the held-out pattern, in both orders.
    assert final == out / "final"
    model = PreferenceModel.from_pretrained(final)
    p = model.prob(
        ["what is it ?"] * 2,
        ["it is very good .", "it is very bad ."],
        ["it is very bad .", "it is very good ."],
    )
    assert p[0] > 0.9 and p[1] < 0.1 and abs(float(p.sum()) - 1) < 1e-5


def test_pm_resume_is_exact(tiny_model_dir, tmp_path):
    data = write_jsonl(tmp_path / "pairs.jsonl", _pairs(48))

    def run(out: Path, resume: bool) -> Path:
        extra = (
            "optim.max_steps=4",
            "logging.save_every=2",
            "data.eval_fraction=0.25",
            "logging.eval_every=3",
        )
        return pm.train(_cfg(tiny_model_dir, data, out, *extra), resume=resume)

    assert_resume_matches(
        run,
        tmp_path,
        crash_in=(pm, "_gradients"),
        crash_on_call=4,
        checkpoint_step=2,
        final_state=lambda d: PreferenceModel.from_pretrained(d).state_dict(),
    )


def test_pm_config_refusals_and_registration(tiny_model_dir, tmp_path, capsys):
    with pytest.raises(ConfigError, match="data.max_length \\(20\\) must leave at least 4 tokens"):
        load_config("pm", None, ["data.max_length=20", "data.max_prompt_length=18"])
    with pytest.raises(ConfigError, match="algo.label_smoothing must be in"):
        load_config("pm", None, ["algo.label_smoothing=0.5"])
    for override in ("algo.margin=small", "data.packing=true", "algo.heads=helpful", "algo.loss=dpo"):
        out = tmp_path / override.split("=")[0]
        assert (
            main(["pm", override, f"model.name_or_path={tiny_model_dir}", f"logging.output_dir={out}"]) == 2
        )
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith(
            f"error: config: unknown key '{override.split('=')[0]}'"
        )
        assert not out.exists()
    # No pairs file: refused before a run directory exists.
    out = tmp_path / "no-data"
    assert main(["pm", f"model.name_or_path={tiny_model_dir}", f"logging.output_dir={out}"]) == 2
    assert "data.train_path is empty" in capsys.readouterr().err and not out.exists()
    assert record_kind("pm", load_config("pm")) == "pairwise"
    shipped = load_config("pm", CONFIGS / "pm_tiny.yaml")
    assert shipped.data.eval_fraction > 0 and shipped.model.name_or_path == "lab:sentiment"
