"""Sampling rollouts with vLLM colocated with training: the same GPU, the same process (`sampling.engine: vllm`).

`VLLMEngine.sample` returns the `Rollout` that `rlhflab.rollout.generate.generate` returns (left-padded prompts,
right-padded responses with the EOS counted, the sampler's log-probs of its tokens), so a stage cannot tell the
engines apart but for speed and for the sampler / trainer log-prob gap (Yao et al. 2025: vLLM's kernels and
bfloat16 are not the trainer's; `sampler_logps` is what truncated importance sampling corrects with). Before
sampling, `sync_weights` pushes the policy's current weights into vLLM: every parameter, or with a peft LoRA
policy only the adapter (saved to a fresh directory, served under a new `LoRARequest` id).

The vLLM API used here, as read in vLLM's and TRL's sources (vLLM 0.10.2+, V1 engine):
- `vllm.LLM(model=DIR, dtype=, seed=, gpu_memory_utilization=, max_model_len=, enable_sleep_mode=,
  logprobs_mode=, enable_lora=, max_lora_rank=, max_loras=)`; TRL builds its colocated engine the same way
  (trl/generation/vllm_generation.py, `VLLMGeneration._init_vllm`) with `distributed_executor_backend=
  "external_launcher"` for its torchrun processes; one process needs none (we refuse WORLD_SIZE > 1).
- `VLLM_ENABLE_V1_MULTIPROCESSING=0` keeps the engine core in this process, which is what exposes
  `llm.llm_engine.model_executor` (vllm/v1/engine/llm_engine.py: "if not multiprocess_mode: self.model_executor
  = self.engine_core.engine_core.model_executor"); weights are then pushed as TRL's colocate mode does:
  `llm.llm_engine.model_executor.driver_worker.model_runner.model.load_weights([(name, tensor), ...])` (HF
  parameter names; vLLM's loader fuses q/k/v and gate/up itself), then `llm.reset_prefix_cache()` so that no
  KV computed with the old weights is reused.
- `SamplingParams(n=1, temperature=, top_p=, top_k=, max_tokens=, logprobs=0, seed=, stop_token_ids=,
  detokenize=False)`: `top_k=-1` turns top-k off in every version (0 was invalid before vLLM 0.8 and means off
  since); `temperature=0` is greedy; `logprobs=0` returns the log-prob of the sampled token only; a per-request
  `seed` samples that request from its own generator (vllm/v1/sample/sampler.py, `generators`).
  `stop_token_ids` = the tokenizer's EOS, where `generate` stops; vLLM also stops at the EOS ids of the model's
  generation_config.json (vllm/sampling_params.py, `update_from_generation_config`): a row cut there has its
  tokens up to that one and ended_with_eos False.
  `llm.generate([{"prompt_token_ids": ids}, ...], sampling_params=[one per prompt], use_tqdm=False,
  lora_request=)` returns one `RequestOutput` per prompt, in order; `.outputs[0].token_ids` holds the new tokens
  (a stop token included) and `.outputs[0].logprobs` one {token_id: Logprob(.logprob, .rank)} per new token.
- `logprobs_mode` (vllm/v1/sample/sampler.py, `Sampler.forward` / `sample`): "raw_logprobs" (the default) is
  log_softmax(logits) before temperature, penalties, top-k and top-p; "processed_logprobs" is log_softmax after
  temperature AND top-k / top-p (greedy: log_softmax(logits)). We need log softmax(logits / T) before any
  truncation: processed when nothing truncates, raw when T = 1; the config refuses both together.
- Sleep mode (docs.vllm.ai/en/latest/features/sleep_mode): `llm.sleep(level=1)` offloads the weights to CPU
  memory and frees the KV cache; `llm.wake_up(tags=["weights"])`, then `tags=["kv_cache"]`, brings them back
  (TRL wakes the weights alone before pushing new ones, so the KV cache is not allocated beside a second copy).
  Level 2 discards the weights and needs `collective_rpc("reload_weights")` after waking (vLLM issue #29341);
  level 1 keeps a LoRA run's base weights, so level 1 is used.
- LoRA: `vllm.lora.request.LoRARequest(lora_name, lora_int_id, lora_path)`; vLLM caches adapters by id, so each
  sync saves the adapter (`PeftModel.save_pretrained`: adapter_config.json + adapter weights only) to a new
  directory under a new id. TRL merges the adapter and pushes every weight instead; pushing the adapter keeps
  the sync to the adapter's size. vLLM reads the new adapter at the first request that names it.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
import weakref
from collections.abc import Sequence
from pathlib import Path

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook

from rlhflab.errors import ConfigError
from rlhflab.rollout.generate import Rollout, SamplingSettings, _cut_at_eos, assemble_rollout

# The LoRA ranks vLLM accepts for max_lora_rank (vllm/config/lora.py); the adapter's rank is rounded up to one.
_VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


def logprobs_mode(settings: SamplingSettings) -> str:
    """vLLM's `logprobs_mode` that reports log softmax(logits / temperature) before top-k / top-p for these
    settings (see the module docstring); refuses the settings for which neither mode does."""
    if settings.top_k == 0 and settings.top_p == 1.0:
        return "processed_logprobs"
    if settings.temperature == 1.0:
        return "raw_logprobs"
    raise ConfigError(
        "the vLLM engine cannot report log softmax(logits / temperature) before top-k / top-p with both a "
        "temperature other than 1 and top_k / top_p set; drop one of them, or sample with the HF engine"
    )


def _weights_version(model) -> int:
    """A number that changes whenever a parameter is changed in place by an autograd-tracked op (a load, an
    edit under no_grad): the sum of the parameters' version counters. Fused optimizer kernels (AdamW(fused=True))
    do not bump them, so optimizer steps are watched with a hook (`VLLMEngine.__init__`)."""
    return sum(p._version for p in model.parameters())


class VLLMEngine:
    """A vLLM engine colocated with the policy being trained: built once per run, synced before each sampling.

    model_dir: the policy's HF model directory (for a LoRA policy: its base model's).
    dtype: the weights' dtype in vLLM ("bfloat16", "float16", "float32"; "auto": the checkpoint's).
    gpu_memory_utilization: vLLM's share of the GPU (its weights and KV cache).
    sleep: sleep (level 1) between samplings, so that training has the GPU memory back.
    lora_rank: the rank of the policy's LoRA adapter, or None for a full-weight policy.
    max_model_len: longest prompt + response (None: the model's).
    """

    def __init__(
        self,
        model_dir: str | Path,
        tokenizer,
        settings: SamplingSettings,
        *,
        dtype: str = "auto",
        gpu_memory_utilization: float = 0.3,
        sleep: bool = True,
        seed: int = 0,
        lora_rank: int | None = None,
        max_model_len: int | None = None,
    ):
        # The engine core in this process: the weights are then reachable to push (module docstring).
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        import vllm

        self._vllm = vllm
        self.tokenizer = tokenizer
        self.sleep_mode = sleep
        self.lora = lora_rank is not None
        lora_kwargs = {}
        if self.lora:
            rank = next((r for r in _VLLM_LORA_RANKS if r >= lora_rank), _VLLM_LORA_RANKS[-1])
            lora_kwargs = {"enable_lora": True, "max_lora_rank": rank, "max_loras": 1}
        self.llm = vllm.LLM(
            model=str(model_dir),
            dtype=dtype,
            seed=seed,
            gpu_memory_utilization=gpu_memory_utilization,
            max_model_len=max_model_len,
            enable_sleep_mode=sleep,
            logprobs_mode=logprobs_mode(settings),
            **lora_kwargs,
        )
        self.weight_sync_s = 0.0  # seconds the last sync_weights took (0 when nothing changed)
        self._synced_version: int | None = None
        # Any optimizer step since the last push makes the next sampling push the weights again.
        self._stepped = False
        this = weakref.ref(self)

        def stepped(*_):
            if (engine := this()) is not None:
                engine._stepped = True

        weakref.finalize(self, register_optimizer_step_post_hook(stepped).remove)
        self._lora_request = None
        self._lora_dir = Path(tempfile.mkdtemp(prefix="rlhflab-vllm-lora-")) if self.lora else None
        if self._lora_dir is not None:  # the adapters pushed are removed with the engine
            weakref.finalize(self, shutil.rmtree, self._lora_dir, True)
        self._lora_id = 0
        self._asleep: set[str] = set()  # the memory tags vLLM has released ("weights", "kv_cache")
        self._sleep()  # training runs first; vLLM wakes when it samples

    def _model(self):
        """vLLM's model in this process (TRL's colocate path)."""
        return self.llm.llm_engine.model_executor.driver_worker.model_runner.model

    def sync_weights(self, model, *, force: bool = False) -> float:
        """Push `model`'s weights into vLLM if they may have changed since the last push (an optimizer step, an
        in-place edit; or `force`): every parameter, or with a peft model only its LoRA adapter. Returns (and
        keeps in `weight_sync_s`) the seconds taken."""
        version = _weights_version(model)
        if not (force or self._stepped or version != self._synced_version):
            self.weight_sync_s = 0.0
            return 0.0
        t0 = time.perf_counter()
        self._wake(["weights"])  # the KV cache stays released while the new weights arrive
        if self.lora:
            self._push_adapter(model)
        else:
            self._model().load_weights((name, param.detach()) for name, param in model.named_parameters())
        self.llm.reset_prefix_cache()  # cached KV was computed with the old weights
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self._synced_version, self._stepped = version, False
        self.weight_sync_s = time.perf_counter() - t0
        return self.weight_sync_s

    def _push_adapter(self, model) -> None:
        from vllm.lora.request import LoRARequest

        if not hasattr(model, "peft_config"):
            raise ConfigError(
                "the vLLM engine was built for a LoRA policy but was given a model without adapters"
            )
        self._lora_id += 1
        path = self._lora_dir / f"v{self._lora_id}"
        model.save_pretrained(str(path))  # peft: the adapter's config and weights, nothing else
        # Adapters older than the one in use are never read again (vLLM has loaded the last one).
        for old in self._lora_dir.glob("v*"):
            if old.name not in (path.name, f"v{self._lora_id - 1}"):
                shutil.rmtree(old, ignore_errors=True)
        self._lora_request = LoRARequest(f"policy-v{self._lora_id}", self._lora_id, str(path))

    def _sampling_params(self, settings: SamplingSettings, seeds: Sequence[int | None], eos: list[int]):
        if settings.suppress_token_ids:
            raise ConfigError(
                "the vLLM engine does not suppress token ids (a Quark model's control tokens); sample with the "
                "HF engine"
            )
        if settings.do_sample:
            common = {"temperature": settings.temperature, "top_p": settings.top_p,
                      "top_k": settings.top_k if settings.top_k > 0 else -1}  # fmt: skip
        else:
            common = {"temperature": 0.0}
        return [
            self._vllm.SamplingParams(
                n=1,
                max_tokens=settings.max_new_tokens,
                logprobs=0,
                seed=s,
                stop_token_ids=eos,
                detokenize=False,
                **common,
            )
            for s in seeds
        ]

    @torch.no_grad()
    def sample(
        self,
        prompt_token_rows: list[list[int]],
        settings: SamplingSettings,
        row_seeds: Sequence[int] | None = None,
        *,
        prompts: Sequence | None = None,
        device: torch.device | str = "cpu",
        seed: int | None = None,
    ) -> Rollout:
        """One response per prompt row (token ids, already cut to the prompt length): the `Rollout` that
        `generate` returns for the same tokens, `sampler_logps` from vLLM (entropy None: vLLM does not report
        it). `row_seeds`: one per row (each row from its own generator); without them, row i gets seed + i (or
        vLLM's own stream when `seed` is None). `prompts`: the prompts as given (`Rollout.prompts`)."""
        if not prompt_token_rows:
            raise ConfigError("the vLLM engine needs at least one prompt")
        if row_seeds is not None and len(row_seeds) != len(prompt_token_rows):
            raise ConfigError(
                f"{len(row_seeds)} row seeds for {len(prompt_token_rows)} prompts; give one per prompt"
            )
        tok = self.tokenizer
        pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        eos = [tok.eos_token_id] if isinstance(tok.eos_token_id, int) else list(tok.eos_token_id)
        if row_seeds is not None:
            seeds = [int(s) % 2**63 for s in row_seeds]
        else:
            seeds = [None if seed is None else (int(seed) + i) % 2**63 for i in range(len(prompt_token_rows))]
        params = self._sampling_params(settings, seeds, eos)
        self._wake(["weights", "kv_cache"])
        try:
            outputs = self.llm.generate(
                [{"prompt_token_ids": list(r)} for r in prompt_token_rows],
                sampling_params=params,
                use_tqdm=False,
                lora_request=self._lora_request,
            )
        finally:
            self._sleep()
        return self._rollout(prompt_token_rows, outputs, prompts, pad_id, eos, device)

    def _sleep(self) -> None:
        """Level 1: the weights offloaded to CPU memory, the KV cache freed (module docstring)."""
        if self.sleep_mode:
            self.llm.sleep(level=1)
            self._asleep = {"weights", "kv_cache"}

    def _wake(self, tags: list[str]) -> None:
        """Bring back the released memory among `tags` (weights alone before a sync, so that the KV cache is
        not allocated beside the tensors being pushed)."""
        todo = [t for t in tags if t in self._asleep]
        if todo:
            self.llm.wake_up(tags=todo)
            self._asleep -= set(todo)

    def _rollout(self, rows, outputs, prompts, pad_id: int, eos: list[int], device) -> Rollout:
        """The Rollout of vLLM's outputs, laid out as `generate` lays out its own (the same helpers)."""
        new = [list(o.outputs[0].token_ids) for o in outputs]
        logps = [
            [float(lp[t].logprob) for t, lp in zip(ids, o.outputs[0].logprobs or [])]
            for ids, o in zip(new, outputs)
        ]
        if any(len(lp) != len(ids) for lp, ids in zip(logps, new)):
            raise RuntimeError(
                "vLLM returned no log-prob for some sampled tokens (SamplingParams.logprobs=0)"
            )
        width = max(len(ids) for ids in new)
        new_ids = torch.full((len(new), width), pad_id, dtype=torch.long)
        real = torch.zeros((len(new), width), dtype=torch.bool)
        sampler = torch.zeros((len(new), width), dtype=torch.float32)
        for i, (ids, lp) in enumerate(zip(new, logps)):
            new_ids[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
            real[i, : len(ids)] = True
            sampler[i, : len(lp)] = torch.tensor(lp, dtype=torch.float32)
        response_ids, response_mask, ended = _cut_at_eos(new_ids, torch.tensor(eos), pad_id)
        response_mask &= real  # columns past a row's last token are padding even when pad != EOS
        rows = [list(r) for r in rows]
        return assemble_rollout(
            self.tokenizer, rows, rows if prompts is None else prompts, (response_ids, response_mask, ended), pad_id,
            device, None, sampler,
        )  # fmt: skip
