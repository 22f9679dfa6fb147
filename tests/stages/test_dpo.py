import math

import pytest
import torch
from transformers import AutoModelForCausalLM

from rlhflab import cli
from rlhflab.config import DPOAlgo, load_config
from rlhflab.core.metrics_log import read_metrics
from rlhflab.data import collate_pairs
from rlhflab.data.tokenize import mismatched_partners
from rlhflab.errors import ConfigError, DataError, TrainingHealthError
from rlhflab.losses.preference import PREFERENCE_LOSS_TABLE, PreferenceInputs, run_preference_loss
from rlhflab.models import logprobs as logprobs_module
from rlhflab.models.loading import load_tokenizer
from rlhflab.models.logprobs import token_logps
from rlhflab.stages import dpo, reference
from rlhflab.stages.reference import REF_CACHE

from ..helpers import (
    CAT_PAIRS,
    CAT_PROMPTS,
    SHORT_TEXT,
    assert_resume_matches,
    assert_stopped_with_checkpoint_intact,
    causal_lm_state,
    poison_from_call,
    stage_config,
    write_jsonl,
)


@pytest.fixture()
def pairs_file(tmp_path):
    # A learnable toy: the happy answer is always preferred, with a second pattern so pairs differ.
    rows = CAT_PAIRS + [
        {"prompt": p, "chosen": "i love the dog", "rejected": "i hate the dog !"} for p in CAT_PROMPTS
    ]
    return write_jsonl(tmp_path / "pairs.jsonl", rows * 2)


@pytest.fixture()
def unpaired_file(tmp_path):
    rows = [
        {"prompt": p, "completion": c, "label": good}
        for p in CAT_PROMPTS
        for c, good in (("the cat is very happy .", True), ("the cat is very sad .", False))
    ]
    return write_jsonl(tmp_path / "unpaired.jsonl", rows)


def _cfg(model_dir, data, out, *extra):
    return stage_config("dpo", model_dir, *SHORT_TEXT, *extra, data=data, out=out)


def _rows(run_dir, key):
    return [r for r in read_metrics(run_dir / "metrics.jsonl") if key in r]


def test_the_config_takes_exactly_the_table_and_its_hyperparameters():
    for name in PREFERENCE_LOSS_TABLE:
        assert DPOAlgo(loss=name, label_smoothing=0.1 if name in ("cdpo", "robust_dpo") else 0.0).loss == name
    with pytest.raises(ConfigError, match="got 'sigmoid'; did you mean 'dpo'"):
        DPOAlgo(loss="sigmoid")
    with pytest.raises(ConfigError, match=r"algo.beta is not used by algo.loss=simpo .*used by dpo, cdpo"):
        DPOAlgo(loss="simpo", beta=0.5)
    with pytest.raises(ConfigError, match="algo.average_logps is not used by algo.loss=kto"):
        DPOAlgo(loss="kto", average_logps=True)
    assert DPOAlgo(loss="orpo", orpo_lambda=0.3).orpo_lambda == 0.3


def test_dpo_learns_the_preferences(tiny_model_dir, pairs_file, tmp_path):
    out = tmp_path / "run"
    dpo.train(
        _cfg(
            tiny_model_dir,
            pairs_file,
            out,
            "optim.max_steps=12",
            "data.eval_fraction=0.25",
            "optim.batch_size=4",
            "algo.beta=0.5",
        )
    )
    rows = _rows(out, "loss/dpo")
    # Policy == reference at the first step: h = 0, so -log sigma(0) = log 2 exactly, through the cache.
    assert rows[0]["loss/dpo"] == pytest.approx(math.log(2), abs=1e-5)
    assert rows[0]["reward/margin"] == pytest.approx(0.0, abs=1e-5)
    assert rows[-1]["loss/dpo"] < 0.5 * math.log(2)
    assert rows[-1]["reward/accuracy"] == 1.0 and rows[-1]["reward/margin"] > 0
    assert rows[-1]["reward/chosen"] > rows[-1]["reward/rejected"]
    from rlhflab.models.flops import causal_lm_forward_flops, causal_lm_train_flops, matmul_params

    params = matmul_params(AutoModelForCausalLM.from_pretrained(tiny_model_dir))
    # The reference pass covers all 16 pairs (12 train + 4 eval) once. By hand, words + EOS (no BOS): the
    # prompts have 6 + 4 + 4 + 5 = 19 tokens, the responses 7 and 7 ("the cat is very happy/sad .") or 5 and 6
    # ("i love the dog" / "i hate the dog !"): 2 x (4 x 19 + 4 x 19 + 4 x 25) = 352 tokens, 2 x 4 x 25 = 200
    # of them responses (where the LM head runs). The logged seconds cancel the clock.
    ref = _rows(out, "perf/ref_flops_per_s")[0]
    seconds = ref["perf/ref_seconds"]
    assert ref["perf/ref_examples_per_s"] * seconds == pytest.approx(16)
    assert ref["perf/ref_tokens_per_s"] * seconds == pytest.approx(352)
    assert ref["perf/ref_flops_per_s"] * seconds == pytest.approx(causal_lm_forward_flops(params, 352, 200))
    # Training: 4 pairs per logged step give its seconds; tokens and LM-head tokens are whole numbers, and each
    # epoch (3 steps over the same 12 training pairs) sees the same ones.
    counts = []
    for r in rows:
        seconds = 4 / r["perf/pairs_per_s"]
        tokens = r["perf/tokens_per_s"] * seconds
        head = (r["perf/flops_per_s"] * seconds - causal_lm_train_flops(params, tokens, 0)) / (
            causal_lm_train_flops(params, 0, 1)
        )
        assert (tokens, head) == pytest.approx((round(tokens), round(head)), abs=1e-6) and 0 < head < tokens
        counts.append((round(tokens), round(head)))
    assert len(counts) == 12
    assert len({tuple(map(sum, zip(*counts[i : i + 3]))) for i in (0, 3, 6, 9)}) == 1
    final_eval = _rows(out, "eval/accuracy")[-1]
    assert final_eval["eval/accuracy"] == 1.0 and final_eval["eval/margin"] > 0
    cache = torch.load(out / REF_CACHE, weights_only=True)["logps"]
    assert cache["train"].shape == (12, 2) and cache["eval"].shape == (4, 2)
    start, trained = causal_lm_state(tiny_model_dir), causal_lm_state(out / "final")
    assert trained.keys() == start.keys() and any(not torch.equal(trained[k], start[k]) for k in start)


def test_cached_reference_equals_a_fresh_forward(tiny_model_dir, pairs_file, tmp_path):
    out = tmp_path / "run"
    dpo.train(_cfg(tiny_model_dir, pairs_file, out, "optim.max_steps=1"))
    cached = torch.load(out / REF_CACHE, weights_only=True)["logps"]["train"]
    cfg = _cfg(tiny_model_dir, pairs_file, out)
    tok = load_tokenizer(tiny_model_dir)
    records, _ = dpo.load_stage_records(cfg.data, "pairwise", seed=0)
    examples, _ = dpo._tokenize_records(records, "pairwise", tok, cfg)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    assert cached.shape == (len(examples), 2)
    for i, ex in enumerate(examples):  # one pair at a time: no padding, no batching
        b = collate_pairs([ex], pad_token_id=tok.pad_token_id, stack=True)
        with torch.no_grad():
            sums = token_logps(model, b["input_ids"], b["attention_mask"], b["loss_mask"]).sum(-1)
        assert torch.allclose(cached[i], sums, atol=1e-5), i


@pytest.mark.parametrize(
    "loss, extra",
    [
        ("dpo", []),
        ("cdpo", ["algo.label_smoothing=0.1"]),
        ("robust_dpo", ["algo.label_smoothing=0.1"]),
        ("ipo", ["algo.average_logps=true"]),
        ("hinge", []),
        ("orpo", []),
        ("simpo", ["algo.simpo_beta=2.0"]),
        ("cpl", []),
    ],
)
def test_each_paired_loss_runs_and_decreases(loss, extra, tiny_model_dir, pairs_file, tmp_path, monkeypatch):
    if not PREFERENCE_LOSS_TABLE[loss].reference:

        def no_reference(*args, **kwargs):
            raise AssertionError("a reference-free loss loaded or ran a reference")

        monkeypatch.setattr(dpo, "load_causal_lm", no_reference)
        monkeypatch.setattr(reference, "reference_logps", no_reference)
    out = tmp_path / loss
    # One batch holding every pair, so each step sees the same data and the loss must go down.
    dpo.train(
        _cfg(
            tiny_model_dir,
            pairs_file,
            out,
            f"algo.loss={loss}",
            "optim.max_steps=4",
            "optim.batch_size=16",
            "optim.lr=3e-3",
            *extra,
        )
    )
    key = f"loss/{loss}"
    losses = [r[key] for r in _rows(out, key)]
    assert len(losses) == 4 and all(math.isfinite(v) for v in losses)
    assert losses[-1] < losses[0], losses
    assert (out / REF_CACHE).exists() == PREFERENCE_LOSS_TABLE[loss].reference


def test_kto_learns_from_unpaired_data(tiny_model_dir, unpaired_file, tmp_path):
    out = tmp_path / "kto"
    dpo.train(_cfg(tiny_model_dir, unpaired_file, out, "algo.loss=kto", "optim.max_steps=6", "algo.beta=0.5"))
    rows = _rows(out, "loss/kto")
    # r = 0 and z0 = 0 at the start: every example's loss is 1 - sigma(0) = 0.5.
    assert rows[0]["loss/kto"] == pytest.approx(0.5, abs=1e-5)
    assert rows[0]["kl/reference_point"] == pytest.approx(0.0, abs=1e-6)
    assert rows[-1]["loss/kto"] < rows[0]["loss/kto"]
    assert rows[-1]["reward/chosen"] > rows[-1]["reward/rejected"]
    from rlhflab.models.flops import causal_lm_forward_flops, causal_lm_train_flops, matmul_params

    # Every step trains on all 8 examples: prompts of 6 + 4 + 4 + 5 tokens, twice, and 8 completions of
    # 6 words + EOS, so 2 x 19 + 8 x 7 = 94 tokens, 56 at the LM head; the forward-only KL rows pair each
    # prompt with another prompt's completion, the same counts again. 8 examples per step give its seconds.
    params = matmul_params(AutoModelForCausalLM.from_pretrained(tiny_model_dir))
    for r in rows:
        seconds = 8 / r["perf/examples_per_s"]
        assert r["perf/tokens_per_s"] * seconds == pytest.approx(94)
        assert r["perf/flops_per_s"] * seconds == pytest.approx(
            causal_lm_train_flops(params, 94, 56) + causal_lm_forward_flops(params, 94, 56)
        )
    cache = torch.load(out / REF_CACHE, weights_only=True)["logps"]
    assert cache["train"].shape == cache["train_kl"].shape == (8,)


def test_kto_metrics_by_hand():
    x = PreferenceInputs(
        torch.tensor([-1.0, -2.0]),
        torch.tensor([2, 2]),
        torch.zeros(2, 3),
        torch.ones(2, 3),
        ref_logps=torch.tensor([-1.5, -1.5]),
        desirable=torch.tensor([True, False]),
        kl_estimate=torch.tensor(0.1),
    )
    out = run_preference_loss(
        PREFERENCE_LOSS_TABLE["kto"], x, vars(DPOAlgo(loss="kto", beta=1.0, kto_undesirable_weight=2.0))
    )
    # r = [0.5, -0.5]; desirable: 1 - sigma(0.5 - 0.1); undesirable: 2 * (1 - sigma(0.1 + 0.5)).
    sigma = torch.sigmoid(torch.tensor([0.4, 0.6]))
    expected = torch.stack([1 - sigma[0], 2 * (1 - sigma[1])])
    assert torch.allclose(out.loss, expected)
    assert out.metrics["reward/chosen"][0] == 0.5 and torch.isnan(out.metrics["reward/chosen"][1])
    assert out.metrics["reward/rejected"][1] == -0.5
    assert out.metrics["reward/accuracy"].tolist() == [1.0, 1.0]


def test_mismatched_partners_pick_another_prompt():
    assert mismatched_partners(["a", "a", "b", "b"]) == [2, 2, 0, 0]
    assert mismatched_partners(["a", "a", "a"]) == [1, 2, 0]


def test_live_reference_matches_the_cache(tiny_model_dir, pairs_file, tmp_path):
    losses = {}
    for mode, extra in (
        ("cached", []),
        ("live", ["algo.precompute_ref_logps=false"]),
        ("explicit", [f"ref_model={tiny_model_dir}"]),
    ):
        out = tmp_path / mode
        dpo.train(_cfg(tiny_model_dir, pairs_file, out, "optim.max_steps=2", *extra))
        losses[mode] = [r["loss/dpo"] for r in _rows(out, "loss/dpo")]
        assert (out / REF_CACHE).exists() == (mode != "live")
    assert losses["cached"][0] == pytest.approx(math.log(2), abs=1e-5)
    for mode in ("live", "explicit"):
        assert losses[mode] == pytest.approx(losses["cached"], abs=1e-5)


def test_dpo_resume_is_exact(tiny_model_dir, pairs_file, tmp_path, capsys):
    common = ["optim.max_steps=6", "logging.save_every=3", "optim.batch_size=4", "optim.micro_batch_size=2"]

    def run(out, resume):
        capsys.readouterr()
        final = dpo.train(_cfg(tiny_model_dir, pairs_file, out, *common), resume=resume)
        if resume:  # the reference log-probs cached before the interruption are read back, not recomputed
            assert "reusing the reference log-probs" in capsys.readouterr().out
        return final

    # Ctrl-C at the 5th optimizer step: resumed from the step-3 checkpoint.
    assert_resume_matches(run, tmp_path, crash_in=(dpo, "optimizer_step"), crash_on_call=5, checkpoint_step=3)


def test_dpo_stops_on_nan_with_checkpoint_intact(tiny_model_dir, pairs_file, tmp_path, monkeypatch):
    # Training forwards only (grad enabled), not the reference pass.
    poison_from_call(monkeypatch, logprobs_module, "token_logps", 5, when=torch.is_grad_enabled)
    with pytest.raises(TrainingHealthError, match="step 5: loss/dpo is not finite.*step-00000004"):
        dpo.train(
            _cfg(tiny_model_dir, pairs_file, tmp_path / "run", "optim.max_steps=6", "logging.save_every=2")
        )
    assert_stopped_with_checkpoint_intact(tmp_path / "run", 4)


def test_cli_runs_the_stage(tiny_model_dir, pairs_file, tmp_path):
    config = tmp_path / "dpo.yaml"
    config.write_text("stage: dpo\nalgo:\n  loss: ipo\n  beta: 0.5\noptim:\n  max_steps: 2\n")
    out = tmp_path / "run"
    code = cli.main(
        [
            "dpo",
            "--config",
            str(config),
            f"model.name_or_path={tiny_model_dir}",
            f"data.train_path={pairs_file}",
            f"logging.output_dir={out}",
            "optim.batch_size=8",
            "logging.progress=false",
            "logging.tensorboard=false",
            "model.device=cpu",
            "logging.log_every=1",
        ]
    )
    assert code == 0
    assert len(_rows(out, "loss/ipo")) == 2
    # The run's saved config is the YAML file with the command-line overrides on top.
    saved = load_config("dpo", out / "config.yaml")
    assert (saved.algo.loss, saved.algo.beta, saved.optim.max_steps, saved.optim.batch_size) == (
        "ipo",
        0.5,
        2,
        8,
    )
    assert saved.model.name_or_path == str(tiny_model_dir) and saved.data.train_path == str(pairs_file)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["algo.loss=cdpo"], r"makes algo.loss=cdpo plain DPO"),
        (["algo.loss=ipo", "algo.label_smoothing=0.1"], r"not used by algo.loss=ipo"),
        (["algo.loss=kto", "algo.average_logps=true"], r"algo.average_logps is not used by algo.loss=kto"),
        (["algo.loss=simpoo"], r"did you mean 'simpo'"),
        (["algo.loss=cpl", "algo.cpl_lambda=0"], r"algo.cpl_lambda must be in \(0, 1\]"),
        (["algo.loss=kto", "algo.kto_desirable_weight=-1"], r"algo.kto_desirable_weight must be > 0"),
        (["algo.cpl_lambda=0.5"], r"algo.cpl_lambda is not used by algo.loss=dpo \(it is used by cpl\)"),
        (
            ["algo.loss=orpo", "ref_model=some/dir"],
            r"ref_model is set but algo.loss=orpo uses no reference model",
        ),
        (
            ["algo.loss=simpo", "algo.precompute_ref_logps=false"],
            r"precompute_ref_logps is false but algo.loss=simpo",
        ),
    ],
)
def test_config_errors_say_what_to_do(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config("dpo", None, overrides)


def test_the_wrong_kind_of_data_says_which_loss_to_use(tiny_model_dir, pairs_file, unpaired_file, tmp_path):
    with pytest.raises(DataError, match="field 'label'.*algo.loss=kto trains on records with prompt, comp"):
        dpo.train(_cfg(tiny_model_dir, pairs_file, tmp_path / "a", "algo.loss=kto"))
    with pytest.raises(DataError, match="for good/bad completions use algo.loss=kto"):
        dpo.train(_cfg(tiny_model_dir, unpaired_file, tmp_path / "b"))


def test_packing_is_refused():
    with pytest.raises(ConfigError, match="unknown key 'data.packing'"):
        load_config("dpo", None, ["data.packing=true"])
