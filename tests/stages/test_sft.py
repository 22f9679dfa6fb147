import pytest
from transformers import AutoModelForCausalLM

from rlhflab.config import load_config
from rlhflab.core.metrics_log import read_metrics
from rlhflab.errors import TrainingHealthError
from rlhflab.stages import sft

from ..helpers import (
    SHORT_TEXT,
    assert_resume_matches,
    assert_stopped_with_checkpoint_intact,
    poison_from_call,
    stage_config,
)


def _cfg(model_dir, data, out, *extra):
    return stage_config("sft", model_dir, *SHORT_TEXT, *extra, data=data, out=out)


def test_sft_learns_the_demonstrations(tiny_model_dir, sft_file, tmp_path):
    cfg = _cfg(tiny_model_dir, sft_file, tmp_path / "run", "optim.max_steps=20", "data.eval_fraction=0.25")
    final = sft.train(cfg)
    rows = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "loss/sft" in r]
    assert rows[-1]["loss/sft"] < 0.5 * rows[0]["loss/sft"]
    assert load_config("sft", tmp_path / "run" / "config.yaml") == cfg  # the run's config, saved whole
    # The saved model is a plain HF directory that continues the demonstration.
    model = AutoModelForCausalLM.from_pretrained(final)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(final)
    ids = tok("the cat sat on the mat", return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=4, do_sample=False)
    assert tok.decode(out[0, ids.shape[1] :]).startswith("the cat is very")


def test_sft_resume_is_exact(tiny_model_dir, sft_file, tmp_path):
    def run(out, resume):
        cfg = _cfg(tiny_model_dir, sft_file, out, "optim.max_steps=6", "logging.save_every=3")
        return sft.train(cfg, resume=resume)

    # Ctrl-C at the 5th optimizer step: resumed from the step-3 checkpoint.
    assert_resume_matches(run, tmp_path, crash_in=(sft, "optimizer_step"), crash_on_call=5, checkpoint_step=3)


def test_sft_stops_on_nan_with_checkpoint_intact(tiny_model_dir, sft_file, tmp_path, monkeypatch):
    poison_from_call(monkeypatch, sft, "token_logps", 5)
    with pytest.raises(TrainingHealthError, match="step 5: loss/sft is not finite.*step-00000004"):
        sft.train(
            _cfg(tiny_model_dir, sft_file, tmp_path / "run", "optim.max_steps=6", "logging.save_every=2")
        )
    assert_stopped_with_checkpoint_intact(tmp_path / "run", 4)


def test_sft_packing_matches_padding_loss(tiny_model_dir, sft_file, tmp_path):
    losses = {}
    for packing in ("false", "true"):
        out = tmp_path / f"run-{packing}"
        sft.train(_cfg(tiny_model_dir, sft_file, out, "optim.max_steps=1", f"data.packing={packing}"))
        losses[packing] = read_metrics(out / "metrics.jsonl")[0]["loss/sft"]
    assert losses["true"] == pytest.approx(losses["false"], rel=1e-4)
