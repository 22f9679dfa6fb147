"""The vLLM rollout engine (`rlhflab.rollout.vllm_engine`) against a FAKE `vllm` module.

No GPU is here and vLLM does not sample on CPU, so a small stand-in for vLLM's API is put in `sys.modules`: it
has exactly the surface the engine uses (`LLM(...)` with `generate`, `sleep`, `wake_up`, `reset_prefix_cache`
and `llm_engine.model_executor.driver_worker.model_runner.model.load_weights`; `SamplingParams`;
`vllm.lora.request.LoRARequest`; outputs with `.outputs[0].token_ids` and `.logprobs`). The fake "samples" with
a real tiny HF model through `rlhflab.rollout.generate` with one seed per request, so the engine's Rollout can
be compared with the HF engine's for the same token sequences. These tests check our side of the API; whether
vLLM itself behaves as the fake does is checked on a GPU by benchmarks/gpu/bench_rollouts.py.
"""

from __future__ import annotations

import importlib.machinery
import sys
import types
from dataclasses import dataclass

import pytest
import torch

from rlhflab.config import load_config
from rlhflab.errors import ConfigError
from rlhflab.rollout import SamplingSettings, encode_prompts, generate
from rlhflab.stages import on_policy

from ..helpers import perturb_, stage_config

PROMPTS = ["the cat sat on", "hello", "what is the dog", "i love this film and it was a good day"]

_SAMPLING_KEYS = {"n", "temperature", "top_p", "top_k", "max_tokens", "logprobs", "seed", "stop_token_ids",
                  "detokenize"}  # fmt: skip


class FakeSamplingParams:
    """vLLM's SamplingParams for the keys the engine passes (another key is a TypeError, as a typo would be)."""

    def __init__(self, **kw):
        unknown = set(kw) - _SAMPLING_KEYS
        if unknown:
            raise TypeError(f"unexpected SamplingParams keys {unknown}")
        if kw.get("top_k", -1) == 0 or kw.get("top_k", -1) < -1:
            raise ValueError("top_k must be -1 (disable), or at least 1")  # vLLM < 0.8 refuses 0
        self.__dict__.update(kw)


@dataclass
class FakeLoRARequest:
    lora_name: str
    lora_int_id: int
    lora_path: str


@dataclass
class Logprob:
    logprob: float
    rank: int = 1


@dataclass
class CompletionOutput:
    token_ids: list
    logprobs: list


@dataclass
class RequestOutput:
    prompt_token_ids: list
    outputs: list


class FakeVLLMModel:
    """What `model_runner.model` is in vLLM: `load_weights` takes (HF name, tensor) pairs."""

    def __init__(self, llm):
        self.llm, self.loaded = llm, []

    def load_weights(self, weights):
        assert "weights" not in self.llm.asleep, "weights pushed while vLLM's weights are offloaded"
        params = dict(self.llm.hf.named_parameters())
        for name, tensor in weights:
            with torch.no_grad():
                params[name].copy_(tensor)
            self.loaded.append(name)
        self.llm.events.append("load_weights")


class FakeLLM:
    """vLLM's LLM: loads the HF model directory, samples each request from its own seed."""

    last: FakeLLM | None = None  # the last one built, for the tests to look into

    def __init__(self, model, **kwargs):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        FakeLLM.last = self
        self.model, self.kwargs = model, kwargs
        self.hf = AutoModelForCausalLM.from_pretrained(model).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(model)
        self.events, self.asleep, self.requests = [], set(), []
        runner = types.SimpleNamespace(model=FakeVLLMModel(self))
        self.llm_engine = types.SimpleNamespace(
            model_executor=types.SimpleNamespace(driver_worker=types.SimpleNamespace(model_runner=runner))
        )

    def sleep(self, level=1):
        assert self.kwargs["enable_sleep_mode"] and level == 1
        self.asleep = {"weights", "kv_cache"}
        self.events.append("sleep")

    def wake_up(self, tags=None):
        self.asleep -= set(tags or ("weights", "kv_cache"))
        self.events.append(f"wake_up:{','.join(tags or ['all'])}")

    def reset_prefix_cache(self):
        self.events.append("reset_prefix_cache")

    def generate(self, prompts, sampling_params, use_tqdm=True, lora_request=None):
        assert not self.asleep, "generate() on a sleeping engine"
        assert len(prompts) == len(sampling_params)
        self.events.append("generate")
        model = self.hf
        if lora_request is not None:
            from peft import PeftModel

            model = PeftModel.from_pretrained(self.hf, lora_request.lora_path).eval()
        out = []
        for prompt, p in zip(prompts, sampling_params):
            assert p.n == 1 and p.logprobs == 0 and p.detokenize is False
            self.requests.append((p, lora_request))
            settings = SamplingSettings(
                max_new_tokens=p.max_tokens,
                do_sample=p.temperature > 0,
                temperature=p.temperature or 1.0,
                top_k=max(p.top_k, 0) if p.temperature > 0 else 0,
                top_p=p.top_p if p.temperature > 0 else 1.0,
            )
            ids = prompt["prompt_token_ids"]
            r = generate(
                model, self.tokenizer, [ids], settings, row_seeds=[p.seed] if settings.do_sample else None
            )
            n = int(r.response_mask[0].sum())  # vLLM stops after the stop token, which it returns
            toks = r.response_ids[0, :n].tolist()
            assert r.ended_with_eos[0] == (toks[-1] in p.stop_token_ids)
            lps = [{t: Logprob(float(lp))} for t, lp in zip(toks, r.sampler_logps[0, :n])]
            out.append(RequestOutput(ids, [CompletionOutput(toks, lps)]))
        if lora_request is not None:
            model.unload()  # the base model without the adapter's layers, as it was
        return out


@pytest.fixture()
def fake_vllm(monkeypatch):
    """A fake `vllm` package in sys.modules (found by importlib.util.find_spec, imported by the engine)."""
    vllm = types.ModuleType("vllm")
    vllm.__spec__ = importlib.machinery.ModuleSpec("vllm", None)
    vllm.LLM, vllm.SamplingParams = FakeLLM, FakeSamplingParams
    lora, request = types.ModuleType("vllm.lora"), types.ModuleType("vllm.lora.request")
    request.LoRARequest = FakeLoRARequest
    vllm.lora, lora.request = lora, request
    for name, mod in (("vllm", vllm), ("vllm.lora", lora), ("vllm.lora.request", request)):
        monkeypatch.setitem(sys.modules, name, mod)
    return vllm


def _engine(model_dir, tokenizer, settings, **kw):
    from rlhflab.rollout.vllm_engine import VLLMEngine

    return VLLMEngine(model_dir, tokenizer, settings, dtype="float32", **kw)


def test_rollout_equals_the_hf_engine_for_the_same_tokens(fake_vllm, tiny_model_dir, tiny_tokenizer):
    """Same prompts and row seeds: the same rows (layout, masks, EOS, texts) and the sampler's log-probs on the
    same columns; vLLM sleeps after sampling and wakes before; each request carries its row's seed."""
    from transformers import AutoModelForCausalLM

    policy = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with torch.no_grad():  # make EOS likely so that some rows stop early and others run to the limit
        policy.model.embed_tokens.weight[tiny_tokenizer.eos_token_id] *= 4.0
    settings = SamplingSettings(max_new_tokens=6, temperature=0.9)
    prompts, seeds = PROMPTS * 3, [1000 + i for i in range(12)]
    engine = _engine(tiny_model_dir, tiny_tokenizer, settings)
    llm = FakeLLM.last
    assert llm.events == ["sleep"] and llm.kwargs["logprobs_mode"] == "processed_logprobs"
    engine.sync_weights(policy)  # the EOS change reaches vLLM
    assert llm.events[1:] == ["wake_up:weights", "load_weights", "reset_prefix_cache"]
    rows = encode_prompts(tiny_tokenizer, prompts)
    got = engine.sample(rows, settings, seeds, prompts=prompts)
    assert llm.events[-3:] == ["wake_up:kv_cache", "generate", "sleep"]
    assert [p.seed for p, _ in llm.requests] == seeds
    assert {p.temperature for p, _ in llm.requests} == {0.9} and {p.top_k for p, _ in llm.requests} == {-1}
    ref = generate(policy, tiny_tokenizer, prompts, settings, row_seeds=seeds)
    assert ref.ended_with_eos.any() and not ref.ended_with_eos.all()  # both kinds of row are compared
    for name in ("prompt_ids", "prompt_mask", "response_ids", "response_mask", "ended_with_eos"):
        assert torch.equal(getattr(got, name), getattr(ref, name)), name
    assert got.texts == ref.texts and got.prompts == prompts and got.entropy is None
    torch.testing.assert_close(got.sampler_logps, ref.sampler_logps, atol=1e-5, rtol=0)
    assert (got.sampler_logps[got.response_mask] < 0).all() and (
        got.sampler_logps[~got.response_mask] == 0
    ).all()


def test_greedy_and_seedless_requests(fake_vllm, tiny_model_dir, tiny_tokenizer):
    """Greedy decoding is temperature 0; without row seeds, row i gets seed + i."""
    engine = _engine(tiny_model_dir, tiny_tokenizer, SamplingSettings(), sleep=False)
    rows = encode_prompts(tiny_tokenizer, PROMPTS)
    greedy = engine.sample(rows, SamplingSettings(max_new_tokens=5, do_sample=False))
    assert {p.temperature for p, _ in FakeLLM.last.requests} == {0.0} and "sleep" not in FakeLLM.last.events
    ref = generate(
        FakeLLM.last.hf, tiny_tokenizer, PROMPTS, SamplingSettings(max_new_tokens=5, do_sample=False)
    )
    assert torch.equal(greedy.response_ids, ref.response_ids)
    engine.sample(rows, SamplingSettings(max_new_tokens=5, top_k=3), seed=7)
    assert [p.seed for p, _ in FakeLLM.last.requests[4:]] == [7, 8, 9, 10]
    assert {p.top_k for p, _ in FakeLLM.last.requests[4:]} == {3}


def test_weights_are_pushed_when_they_changed(fake_vllm, tiny_model_dir, tiny_tokenizer):
    """on_policy.sample pushes the policy's weights before sampling, only when a parameter changed in place."""
    from transformers import AutoModelForCausalLM

    policy = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    cfg = stage_config("grpo", tiny_model_dir, "sampling.max_new_tokens=4")
    engine = _engine(tiny_model_dir, tiny_tokenizer, SamplingSettings())
    llm = FakeLLM.last
    kw = {"model_cfg": cfg.model, "data": cfg.data, "device": torch.device("cpu"), "batch_size": 4, "seed": 0}
    settings = on_policy.sampling_settings(cfg.sampling)
    on_policy.sample(policy, tiny_tokenizer, PROMPTS, settings, engine=engine, **kw)
    assert llm.events.count("load_weights") == 1 and engine.weight_sync_s > 0
    on_policy.sample(policy, tiny_tokenizer, PROMPTS, settings, engine=engine, **kw)
    assert llm.events.count("load_weights") == 1 and engine.weight_sync_s == 0.0  # nothing changed
    with torch.no_grad():
        perturb_(policy, 0.1, seed=3)  # in place, as an optimizer step
    name = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(dict(llm.hf.named_parameters())[name], dict(policy.named_parameters())[name])
    on_policy.sample(policy, tiny_tokenizer, PROMPTS, settings, engine=engine, **kw)
    assert llm.events.count("load_weights") == 2
    for n, p in policy.named_parameters():
        assert torch.equal(dict(llm.hf.named_parameters())[n], p), n


def test_a_lora_policy_pushes_its_adapter_only(fake_vllm, tiny_model_dir, tiny_tokenizer):
    """With a peft policy, each sync saves the adapter alone and serves it under a new LoRARequest id."""
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    policy = get_peft_model(
        AutoModelForCausalLM.from_pretrained(tiny_model_dir),
        LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False),
    )
    cfg = stage_config("grpo", tiny_model_dir, "sampling.max_new_tokens=4", "model.lora.enabled=true")
    cfg.sampling.engine = "vllm"  # set after loading: the config refuses vllm without a GPU
    engine = on_policy.rollout_engine(cfg, policy, tiny_tokenizer)
    llm = FakeLLM.last
    assert llm.kwargs["enable_lora"] and llm.kwargs["max_lora_rank"] == 8 and llm.kwargs["max_loras"] == 1
    assert llm.kwargs["max_model_len"] == cfg.data.max_prompt_length + 4 and llm.kwargs["seed"] == cfg.seed
    settings = on_policy.sampling_settings(cfg.sampling)
    kw = {"model_cfg": cfg.model, "data": cfg.data, "device": torch.device("cpu"), "batch_size": 4, "seed": 0}
    got = on_policy.sample(
        policy, tiny_tokenizer, PROMPTS, settings, engine=engine, row_seeds=[1, 2, 3, 4], **kw
    )
    assert "load_weights" not in llm.events  # the base weights are vLLM's own, never pushed
    request = llm.requests[-1][1]
    assert request.lora_int_id == 1
    tensors = load_file(f"{request.lora_path}/adapter_model.safetensors")
    assert tensors and all("lora_" in k for k in tensors)
    ref = generate(policy, tiny_tokenizer, PROMPTS, settings, row_seeds=[1, 2, 3, 4])
    assert torch.equal(got.response_ids, ref.response_ids)  # vLLM sampled with the adapter
    with torch.no_grad():
        policy.base_model.model.model.layers[0].self_attn.q_proj.lora_B["default"].weight.add_(0.5)
    on_policy.sample(policy, tiny_tokenizer, PROMPTS, settings, engine=engine, **kw)
    assert llm.requests[-1][1].lora_int_id == 2 and llm.requests[-1][1].lora_path != request.lora_path


def test_rollout_engine_is_none_for_hf(tiny_model_dir):
    cfg = stage_config("ppo", tiny_model_dir)
    assert on_policy.rollout_engine(cfg, None, None) is None


def test_the_config_acts_or_refuses(monkeypatch, fake_vllm):
    """vllm needs a CUDA GPU, the vllm package and one process; its settings are refused with engine=hf, and a
    temperature with top-k / top-p (vLLM reports neither mode's log-probs then); stages that sample with HF only
    refuse it."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match="sampling.engine=vllm needs a CUDA GPU"):
        load_config("grpo", None, ["sampling.engine=vllm"])
    with pytest.raises(ConfigError, match="vllm_gpu_memory_utilization is set but sampling.engine=hf"):
        load_config("grpo", None, ["sampling.vllm_gpu_memory_utilization=0.5"])
    with pytest.raises(ConfigError, match="vllm_sleep is set but sampling.engine=hf"):
        load_config("ppo", None, ["sampling.vllm_sleep=false"])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # and the fake vllm is importable
    cfg = load_config("grpo", None, ["sampling.engine=vllm", "sampling.vllm_gpu_memory_utilization=0.5"])
    assert cfg.sampling.engine == "vllm" and cfg.sampling.vllm_gpu_memory_utilization == 0.5
    assert load_config("online-dpo", None, ["sampling.engine=vllm", "sampling.top_k=5"]).sampling.top_k == 5
    with pytest.raises(ConfigError, match=r"must be in \(0, 1\]"):
        load_config("grpo", None, ["sampling.engine=vllm", "sampling.vllm_gpu_memory_utilization=1.5"])
    with pytest.raises(ConfigError, match="cannot report the log-probs"):
        load_config("ppo", None, ["sampling.engine=vllm", "sampling.temperature=0.7", "sampling.top_p=0.9"])
    with pytest.raises(ConfigError, match="samples with the HF engine only"):
        load_config("rs", None, ["sampling.engine=vllm"])
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match="one vLLM engine beside one training process"):
        load_config("ppo", None, ["sampling.engine=vllm"])


class _Chars:
    """A reward that rarely ties (online DPO drops tied pairs, and then takes no step)."""

    name = "chars"

    def score(self, prompts, responses):
        return torch.tensor([len(r) + sum(map(ord, r)) % 7 / 10 for r in responses], dtype=torch.float32)


@pytest.mark.parametrize("stage", ["ppo", "grpo", "online-dpo"])
def test_the_stages_sample_through_the_engine(stage, fake_vllm, tiny_model_dir, tmp_path):
    """Two iterations of each stage with sampling.engine=vllm: every rollout comes from vLLM, the weights are
    pushed before each (the policy changed), and perf/weight_sync_s is logged."""
    from rlhflab.core.metrics_log import read_metrics
    from rlhflab.feedback import RewardFeedback
    from rlhflab.stages import critic_free, online_dpo, ppo

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(f'{{"prompt": "{p}"}}\n' for p in PROMPTS * 2))
    batch = {"ppo": ["algo.rollout_batch_size=4", "algo.minibatch_size=4"],
             "grpo": ["algo.prompts_per_iteration=2", "algo.num_generations=2"],
             "online-dpo": ["algo.prompts_per_step=2"]}[stage]  # fmt: skip
    cfg = stage_config(stage, tiny_model_dir, "algo.iterations=2", "sampling.max_new_tokens=4", "model.device=cpu",
                       "logging.log_every=1", *batch, data=prompts, out=tmp_path / "run")  # fmt: skip
    cfg.sampling.engine = "vllm"  # set after loading: the config refuses vllm without a GPU
    if stage == "online-dpo":
        online_dpo.train(cfg, feedback=RewardFeedback(_Chars()))
    else:
        (ppo if stage == "ppo" else critic_free).train(cfg, reward=_Chars())
    llm = FakeLLM.last
    assert llm.events.count("generate") == 2 and llm.events.count("load_weights") == 2
    rows = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "perf/weight_sync_s" in r]
    assert len(rows) == 2 and all(r["perf/weight_sync_s"] > 0 for r in rows)
