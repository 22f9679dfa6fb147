import pytest
import torch
from transformers import AutoModelForCausalLM

from rlhflab.config import load_config
from rlhflab.core.checkpoint import latest_checkpoint
from rlhflab.core.metrics_log import read_metrics
from rlhflab.errors import TrainingHealthError
from rlhflab.stages import sft


def _cfg(model_dir, data, out, *extra):
    return load_config(
        "sft",
        None,
        [
            f"model.name_or_path={model_dir}",
            f"data.train_path={data}",
            f"logging.output_dir={out}",
            "data.max_length=32",
            "data.max_prompt_length=16",
            "optim.batch_size=8",
            "optim.lr=1e-2",
            "logging.log_every=1",
            "logging.progress=false",
            "logging.tensorboard=false",
            "model.device=cpu",
            *extra,
        ],
    )


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


def test_sft_resume_is_exact(tiny_model_dir, sft_file, tmp_path, monkeypatch):
    common = ["optim.max_steps=6", "logging.save_every=3"]
    ref_final = sft.train(_cfg(tiny_model_dir, sft_file, tmp_path / "a", *common))

    calls = {"n": 0}
    real_step = sft.optimizer_step

    def crash_on_fifth(optimizer, scheduler):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        real_step(optimizer, scheduler)

    monkeypatch.setattr(sft, "optimizer_step", crash_on_fifth)
    with pytest.raises(KeyboardInterrupt):
        sft.train(_cfg(tiny_model_dir, sft_file, tmp_path / "b", *common))
    monkeypatch.setattr(sft, "optimizer_step", real_step)
    assert latest_checkpoint(tmp_path / "b").name == "step-00000003"
    resumed_final = sft.train(_cfg(tiny_model_dir, sft_file, tmp_path / "b", *common), resume=True)

    a = AutoModelForCausalLM.from_pretrained(ref_final).state_dict()
    b = AutoModelForCausalLM.from_pretrained(resumed_final).state_dict()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_sft_stops_on_nan_with_checkpoint_intact(tiny_model_dir, sft_file, tmp_path, monkeypatch):
    real = sft.token_logps

    def poisoned(model, *args, **kwargs):
        out = real(model, *args, **kwargs)
        if poisoned.calls >= 4:
            out = out * float("nan")
        poisoned.calls += 1
        return out

    poisoned.calls = 0
    monkeypatch.setattr(sft, "token_logps", poisoned)
    with pytest.raises(TrainingHealthError, match="step 5: loss/sft is not finite.*step-00000004"):
        sft.train(
            _cfg(tiny_model_dir, sft_file, tmp_path / "run", "optim.max_steps=6", "logging.save_every=2")
        )
    ckpt = latest_checkpoint(tmp_path / "run")
    assert ckpt.name == "step-00000004"
    state = torch.load(ckpt / "model.pt", weights_only=True)
    assert all(torch.isfinite(v).all() for v in state.values())
    assert not (tmp_path / "run" / "final").exists()


def test_sft_packing_matches_padding_loss(tiny_model_dir, sft_file, tmp_path):
    losses = {}
    for packing in ("false", "true"):
        out = tmp_path / f"run-{packing}"
        sft.train(_cfg(tiny_model_dir, sft_file, out, "optim.max_steps=1", f"data.packing={packing}"))
        losses[packing] = read_metrics(out / "metrics.jsonl")[0]["loss/sft"]
    assert losses["true"] == pytest.approx(losses["false"], rel=1e-4)
