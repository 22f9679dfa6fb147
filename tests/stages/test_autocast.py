"""model.autocast=bf16: forward passes in bfloat16, float32 master weights, and every pass that is compared
with another (policy vs reference, old vs new log-probs) run in the same precision."""

import math

import pytest
import torch
from torch import nn

from rlhflab.config import load_config
from rlhflab.core.metrics_log import read_metrics
from rlhflab.errors import ConfigError
from rlhflab.stages import common, dpo, ppo, reward, sft

from ..helpers import CAT_PAIRS, CAT_PROMPTS, SHORT_TEXT, stage_config, write_jsonl


def _spy_linear_dtypes(monkeypatch, module, name="load_policy"):
    """Wrap module.<name> so every nn.Linear of the model it returns records its output dtypes."""
    seen: set[torch.dtype] = set()
    real = getattr(module, name)

    def wrapped(*args, **kwargs):
        out = real(*args, **kwargs)
        model = out[0] if isinstance(out, tuple) else out
        for m in model.modules():
            if isinstance(m, nn.Linear):
                m.register_forward_hook(lambda _m, _a, y: seen.add(y.dtype))
        return out

    monkeypatch.setattr(module, name, wrapped)
    return seen


def test_autocast_needs_float32_weights_and_builds_the_context():
    with pytest.raises(
        ConfigError, match="model.autocast 'bf16' keeps float32 master weights.*model.dtype=float32"
    ):
        load_config("sft", None, ["model.autocast=bf16", "model.dtype=bfloat16"])
    cfg = load_config("sft", None, ["model.autocast=bf16"])
    layer = nn.Linear(4, 3)
    with common.mixed_precision(cfg.model, torch.device("cpu"))():
        assert layer(torch.ones(2, 4)).dtype == torch.bfloat16
    plain = load_config("sft", None, [])
    with common.mixed_precision(plain.model, torch.device("cpu"))():
        assert layer(torch.ones(2, 4)).dtype == torch.float32
    assert layer.weight.dtype == torch.float32


def test_sft_trains_in_bf16_with_float32_weights(tiny_model_dir, sft_file, tmp_path, monkeypatch):
    seen = _spy_linear_dtypes(monkeypatch, sft)
    out = tmp_path / "run"
    final = sft.train(
        stage_config(
            "sft",
            tiny_model_dir,
            *SHORT_TEXT,
            "optim.max_steps=20",
            "model.autocast=bf16",
            data=sft_file,
            out=out,
        )
    )
    assert torch.bfloat16 in seen  # the forward ran under autocast
    rows = [r for r in read_metrics(out / "metrics.jsonl") if "loss/sft" in r]
    assert rows[-1]["loss/sft"] < 0.5 * rows[0]["loss/sft"]
    from safetensors.torch import load_file

    weights = load_file(next(final.glob("*.safetensors")))
    assert {t.dtype for t in weights.values()} == {torch.float32}  # master weights stay float32


def test_every_head_path_computes_the_same_numbers_under_autocast():
    # Kept softmax, chunk-by-chunk recomputation and the no-grad pass must agree under autocast too, or a
    # policy scored on one path and its reference on another would not start at log-ratio 0.
    from rlhflab.models import logprobs as forward

    torch.manual_seed(0)
    hidden = torch.randn(12, 16)
    weight = torch.randn(40, 16, requires_grad=True)
    labels = torch.randint(0, 40, (12,))
    results = []
    for saved_bytes in (2**30, 0):
        with pytest.MonkeyPatch.context() as mp, torch.autocast("cpu", dtype=torch.bfloat16):
            mp.setattr(forward, "SAVED_PROBS_BYTES", saved_bytes)
            h = (hidden @ torch.eye(16)).requires_grad_()  # bf16 under autocast, as a decoder's output is
            out = forward.head_logps(h, weight, labels, chunk_size=5)
        weight.grad = None
        out.sum().backward()
        results.append((out.detach(), weight.grad.clone()))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        no_grad = forward.head_logps(hidden @ torch.eye(16), weight, labels, chunk_size=5)
    assert results[0][0].dtype == torch.float32
    torch.testing.assert_close(results[0][0], results[1][0])
    torch.testing.assert_close(results[0][0], no_grad)
    torch.testing.assert_close(results[0][1], results[1][1])


@pytest.mark.parametrize("head_path", ["kept softmax", "chunked"])
def test_dpo_reference_shares_the_policy_precision(tiny_model_dir, tmp_path, monkeypatch, head_path):
    # The cached reference log-probs come from the same bf16 forward as the policy's, so at the first step
    # (policy == reference) the log-ratios are exactly 0 and the loss exactly log 2. A float32 reference
    # against a bf16 policy would be off by bf16 rounding (~1e-2 nats per response).
    from rlhflab.models import logprobs as forward

    if head_path == "chunked":  # the path long batches take: the head recomputed chunk by chunk in backward
        monkeypatch.setattr(forward, "SAVED_PROBS_BYTES", 0)
    seen = _spy_linear_dtypes(monkeypatch, dpo)
    data = write_jsonl(tmp_path / "pairs.jsonl", CAT_PAIRS * 4)
    out = tmp_path / "run"
    dpo.train(
        stage_config(
            "dpo",
            tiny_model_dir,
            *SHORT_TEXT,
            "optim.batch_size=4",
            "optim.max_steps=6",
            "algo.beta=0.5",
            "model.autocast=bf16",
            data=data,
            out=out,
        )
    )
    assert torch.bfloat16 in seen
    losses = [r["loss/dpo"] for r in read_metrics(out / "metrics.jsonl") if "loss/dpo" in r]
    assert losses[0] == pytest.approx(math.log(2), abs=1e-6)
    assert losses[-1] < losses[0]


def test_ppo_reference_and_rollout_passes_share_the_precision(tiny_model_dir, tmp_path, monkeypatch):
    # Policy and reference start equal and both score the rollout under bf16 autocast, so the first
    # iteration's KL is exactly 0.
    class Length:
        def score(self, prompts, responses):
            return torch.tensor([float(len(r.split())) for r in responses])

    seen = _spy_linear_dtypes(monkeypatch, ppo)
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": p} for p in CAT_PROMPTS] * 8)
    out = tmp_path / "run"
    ppo.train(
        stage_config(
            "ppo",
            tiny_model_dir,
            "algo.rollout_batch_size=16",
            "algo.minibatch_size=8",
            "algo.ppo_epochs=1",
            "sampling.max_new_tokens=6",
            "optim.lr=5e-3",
            "algo.kl_coef=0.05",
            "algo.iterations=3",
            "model.autocast=bf16",
            data=prompts,
            out=out,
        ),
        reward=Length(),
    )
    assert torch.bfloat16 in seen
    rows = [r for r in read_metrics(out / "metrics.jsonl") if "kl/sequence" in r]
    assert rows[0]["kl/sequence"] == 0.0
    for r in rows:  # the logged total is the loss that was minimized: policy + value_coef (0.1) x value
        assert r["loss/total"] == pytest.approx(r["loss/policy"] + 0.1 * r["loss/value"], rel=1e-5, abs=1e-6)
    assert any(r["kl/sequence"] != 0.0 for r in rows[1:])  # the policy moved, in bf16 too


def test_reward_model_trains_under_autocast(tiny_model_dir, tmp_path, monkeypatch):
    seen = _spy_linear_dtypes(monkeypatch, reward, "_build_model")
    data = write_jsonl(tmp_path / "pairs.jsonl", CAT_PAIRS * 8)
    out = tmp_path / "run"
    reward.train(
        stage_config(
            "rm",
            tiny_model_dir,
            *SHORT_TEXT,
            "optim.max_steps=12",
            "model.autocast=bf16",
            data=data,
            out=out,
        )
    )
    assert torch.bfloat16 in seen
    metrics = [r for r in read_metrics(out / "metrics.jsonl") if "loss/rm" in r]
    assert metrics[-1]["loss/rm"] < metrics[0]["loss/rm"] and metrics[-1]["reward/accuracy"] == 1.0
