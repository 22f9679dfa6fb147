"""Sampling responses from any HF causal LM, batched, with the KV cache, in tensors ready for training.

Prompts are left-padded so that every row's response starts at the same column; responses are right-
padded after their first EOS. `Rollout.input_ids` (prompt + response) with `attention_mask` and
`position_ids` feeds a policy/reference/value forward pass directly, and `response_start` says where
the response begins, so `logits[:, response_start - 1 : -1]` score `response_ids`.

Sampling settings are always passed in full to `generate`: a model's own `generation_config` (top_k=50
by default in transformers) would otherwise silently change the distribution PPO's ratios assume.

Each rollout also keeps the sampler's own log-probability of every token it sampled (`sampler_logps`), so a
trainer can measure how far its log-probs of the same tokens are from the sampler's: ~0 with this engine in
float32, not with a separate inference engine (bfloat16, other kernels), where the gap makes the "on-policy"
update off-policy (Yao et al. 2025, "Your Efficient RL Framework Secretly Brings You Off-Policy RL Training").

With `row_seeds`, every row is sampled from its own random stream (Gumbel-max: argmax of the warped log-probs
plus Gumbel noise drawn from the row's generator, Gumbel 1954; Maddison et al. 2014), so a row's sample depends
on its seed and prompt only, not on the batch it was generated in: processes that each sample their share of a
batch get the rows one process would have got.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from rlhflab.errors import ConfigError


@dataclass(frozen=True)
class SamplingSettings:
    """How responses are sampled.

    max_new_tokens: longest response, EOS included.
    temperature: softmax temperature (> 0); 1.0 samples from the model itself (what KL estimates assume).
    top_k: keep the k most likely tokens; 0 = off.
    top_p: nucleus sampling mass in (0, 1]; 1.0 = off.
    do_sample: False = greedy decoding (temperature, top_k, top_p are then unused).
    suppress_token_ids: ids never sampled (their logits set to -inf): e.g. a Quark model's control tokens, which
        belong in front of a prompt, never in a response.
    """

    max_new_tokens: int = 20
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    do_sample: bool = True
    suppress_token_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if not self.temperature > 0:
            raise ConfigError(
                f"temperature must be > 0 (use do_sample=False for greedy), got {self.temperature}"
            )
        if self.top_k < 0:
            raise ConfigError(f"top_k must be >= 0 (0 turns it off), got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"top_p must be in (0, 1] (1 turns it off), got {self.top_p}")
        if any(int(i) < 0 for i in self.suppress_token_ids):
            raise ConfigError(
                f"suppress_token_ids must be token ids >= 0, got {list(self.suppress_token_ids)}"
            )

    def generation_config(self, pad_token_id: int, eos_token_id: int | list[int]):
        """A complete `transformers.GenerationConfig` for these settings."""
        from transformers import GenerationConfig

        # Greedy decoding ignores these; leaving them unset keeps transformers from warning about them.
        sampling = (
            {"temperature": self.temperature, "top_k": self.top_k, "top_p": self.top_p}
            if self.do_sample
            else {}
        )
        return GenerationConfig(
            max_new_tokens=self.max_new_tokens,
            min_new_tokens=0,
            do_sample=self.do_sample,
            num_beams=1,
            repetition_penalty=1.0,
            no_repeat_ngram_size=0,
            typical_p=1.0,
            use_cache=True,
            pad_token_id=pad_token_id,
            eos_token_id=eos_token_id,
            suppress_tokens=[int(i) for i in self.suppress_token_ids] or None,
            **sampling,
        )


@dataclass
class Rollout:
    """A batch of sampled responses. B rows; P prompt columns (left-padded); R response columns.

    prompt_ids [B, P] (left-padded with pad), prompt_mask [B, P] bool (True = real prompt token),
    response_ids [B, R] (right-padded with pad after the first EOS), response_mask [B, R] bool (True = a
    real response token, the EOS included), ended_with_eos [B] bool (False = cut at max_new_tokens),
    texts: decoded responses without special tokens; prompts: the prompts as given.
    """

    prompt_ids: Tensor
    prompt_mask: Tensor
    response_ids: Tensor
    response_mask: Tensor
    ended_with_eos: Tensor
    texts: list[str]
    prompts: list
    entropy: Tensor | None = None  # [B, R] float32: the sampling distribution's entropy at each response
    # token (softmax(logits / temperature), before top-k / top-p), 0 where response_mask is False
    sampler_logps: Tensor | None = None  # [B, R] float32: log-prob of each sampled token under
    # softmax(logits / temperature) as the sampler computed it (before top-k / top-p), 0 where the mask is False

    def __len__(self) -> int:
        return self.response_ids.shape[0]

    @property
    def response_start(self) -> int:
        """Column of `input_ids` where every response starts (= P)."""
        return self.prompt_ids.shape[1]

    @property
    def input_ids(self) -> Tensor:
        """[B, P + R] prompt and response."""
        return torch.cat([self.prompt_ids, self.response_ids], dim=1)

    @property
    def attention_mask(self) -> Tensor:
        """[B, P + R] long, 1 = real token."""
        return torch.cat([self.prompt_mask, self.response_mask], dim=1).long()

    @property
    def position_ids(self) -> Tensor:
        """[B, P + R] positions counted from each row's first real token, as `generate` used them."""
        return (self.attention_mask.cumsum(-1) - 1).clamp(min=0)

    @property
    def response_lengths(self) -> Tensor:
        """[B] number of real response tokens (EOS included)."""
        return self.response_mask.sum(-1)

    def select(self, idx: Tensor) -> Rollout:
        """The rows `idx` (a 1-D index tensor) of this batch, as a Rollout of len(idx) rows."""
        rows = idx.tolist()
        return Rollout(
            prompt_ids=self.prompt_ids[idx],
            prompt_mask=self.prompt_mask[idx],
            response_ids=self.response_ids[idx],
            response_mask=self.response_mask[idx],
            ended_with_eos=self.ended_with_eos[idx],
            texts=[self.texts[i] for i in rows],
            prompts=[self.prompts[i] for i in rows],
            entropy=None if self.entropy is None else self.entropy[idx],
            sampler_logps=None if self.sampler_logps is None else self.sampler_logps[idx],
        )

    def with_prompts(self, rows: list[list[int]], pad_id: int) -> Rollout:
        """The same responses behind other prompt ids (one list per row, left-padded here): e.g. a reference
        model scoring a conditioned policy's samples without the policy's control token."""
        if len(rows) != len(self):
            raise ConfigError(f"with_prompts needs one prompt per row ({len(self)}), got {len(rows)}")
        ids, mask = _left_pad(rows, pad_id, max(len(r) for r in rows))
        device = self.prompt_ids.device
        return dataclasses.replace(self, prompt_ids=ids.to(device), prompt_mask=mask.to(device))

    def mean_entropy(self) -> float | None:
        """The sampling distribution's entropy per response token, averaged over real tokens (nats)."""
        if self.entropy is None or not self.response_mask.any():
            return None
        return float(self.entropy[self.response_mask].mean())


def encode_prompts(tokenizer, prompts: Sequence) -> list[list[int]]:
    """Token ids of each prompt, encoded exactly as the data layer encodes training prompts
    (`rlhflab.data.tokenize.encode_prompt`): a string is raw text (with the tokenizer's own BOS, if any);
    a list of {"role", "content"} messages is rendered with the chat template, ending in the assistant
    turn; a list (or tensor) of ints is used as token ids."""
    from rlhflab.data.tokenize import encode_prompt

    out = []
    for p in prompts:
        if isinstance(p, str) or (isinstance(p, (list, tuple)) and p and isinstance(p[0], dict)):
            out.append(list(encode_prompt(p, tokenizer)))
        else:
            out.append([int(t) for t in p])
    if any(len(ids) == 0 for ids in out):
        raise ConfigError("a prompt encodes to zero tokens; every prompt needs at least one token")
    return out


def _left_pad(rows: list[list[int]], pad_id: int, width: int) -> tuple[Tensor, Tensor]:
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.bool)
    for i, r in enumerate(rows):
        if r:
            ids[i, width - len(r) :] = torch.tensor(r, dtype=torch.long)
            mask[i, width - len(r) :] = True
    return ids, mask


def _cut_at_eos(new_tokens: Tensor, eos_ids: Tensor, pad_id: int) -> tuple[Tensor, Tensor, Tensor]:
    """Mask every token after the first EOS. new_tokens [B, R] -> (ids [B, R], mask [B, R], ended [B])."""
    is_eos = torch.isin(new_tokens, eos_ids)
    # Tokens strictly after the first EOS have at least one EOS before them (pad may equal EOS).
    after = (is_eos.long().cumsum(-1) - is_eos.long()) > 0
    mask = ~after
    return new_tokens.masked_fill(after, pad_id), mask, is_eos.any(-1)


class _StepRecorder:
    """A logits processor that changes nothing and records, at every generated position, the entropy of
    softmax(logits / temperature) of each row and the log-prob of the token then sampled: what a second forward
    pass would cost otherwise. transformers runs user processors before its temperature / top-k / top-p warpers,
    so `scores` here are the model's logits. The token sampled at step t is only known at step t + 1 (the last
    column of `input_ids`), so each step's log-probs wait one call (`finish` takes the last step's)."""

    def __init__(self, temperature: float):
        self.temperature = temperature
        self.entropy: list[Tensor] = []
        self.token_logps: list[Tensor] = []
        self._last: Tensor | None = None

    def __call__(self, input_ids: Tensor, scores: Tensor) -> Tensor:
        self.finish(input_ids[:, -1])
        logp = torch.log_softmax(scores.float() / self.temperature, dim=-1)
        self.entropy.append(-(logp.exp() * logp).nansum(-1).cpu())
        self._last = logp
        return scores

    def finish(self, sampled: Tensor) -> None:
        """Record the log-probs of the tokens `sampled` [b] at the last step seen."""
        if self._last is not None:
            self.token_logps.append(self._last.gather(-1, sampled[:, None].to(self._last.device))[:, 0].cpu())
            self._last = None


class _RowSampler:
    """A logits processor that makes greedy decoding sample each row from its own generator: the scores are
    warped as transformers' sampling would (temperature, then top-k, then top-p), normalized, and perturbed by
    Gumbel(0, 1) noise; their argmax is then a draw from softmax(warped scores) (the Gumbel-max trick)."""

    def __init__(self, settings: SamplingSettings, row_seeds: Sequence[int]):
        from transformers.generation.logits_process import (
            TemperatureLogitsWarper,
            TopKLogitsWarper,
            TopPLogitsWarper,
        )

        self.warpers = [TemperatureLogitsWarper(settings.temperature)]
        if settings.top_k > 0:
            self.warpers.append(TopKLogitsWarper(settings.top_k))
        if settings.top_p < 1.0:
            self.warpers.append(TopPLogitsWarper(settings.top_p))
        self.generators = [torch.Generator().manual_seed(int(s) % 2**63) for s in row_seeds]

    def __call__(self, input_ids: Tensor, scores: Tensor) -> Tensor:
        for warp in self.warpers:
            scores = warp(input_ids, scores)
        logp = torch.log_softmax(scores.float(), dim=-1)
        u = torch.stack(
            [torch.rand(scores.shape[-1], generator=g, dtype=torch.float64) for g in self.generators]
        )
        gumbel = -torch.log(-torch.log(u.clamp(1e-300, 1.0 - 1e-16)))
        return logp + gumbel.to(logp.device, logp.dtype)


def _generate_batch(
    model,
    batch: list[list[int]],
    pad_id: int,
    gen_config,
    settings: SamplingSettings,
    row_seeds=None,
    synced=False,
):
    """One `model.generate` call on left-padded prompt rows: (new token ids [b, n] on CPU, the sampling
    distribution's entropy at each of them [b, n], the log-prob of each of them [b, n]); with `row_seeds` (one
    per row), each row sampled from its own generator."""
    from transformers import LogitsProcessorList

    device = next(model.parameters()).device
    ids, mask = _left_pad(batch, pad_id, max(len(r) for r in batch))
    recorder = _StepRecorder(settings.temperature if settings.do_sample else 1.0)
    processors = [recorder]
    if row_seeds is not None and settings.do_sample:
        processors.append(_RowSampler(settings, row_seeds))
        gen_config = dataclasses.replace(settings, do_sample=False).generation_config(
            gen_config.pad_token_id, gen_config.eos_token_id
        )
    out = model.generate(
        input_ids=ids.to(device),
        attention_mask=mask.long().to(device),
        generation_config=gen_config,
        logits_processor=LogitsProcessorList(processors),
        synced_gpus=synced,
    )
    new_ids = out[:, ids.shape[1] :].cpu()
    recorder.finish(out[:, -1])
    n = new_ids.shape[1]
    return (
        new_ids,
        torch.stack(recorder.entropy, dim=1)[:, :n],
        torch.stack(recorder.token_logps, dim=1)[:, :n],
    )


@contextlib.contextmanager
def _seeded(seed: int | None, device: torch.device):
    """With a seed, sample from a private copy of the RNG; without one, advance the global RNG so that
    consecutive calls draw fresh samples."""
    if seed is None:
        yield
        return
    with torch.random.fork_rng(devices=[] if device.type == "cpu" else [device]):
        torch.manual_seed(seed)
        yield


def _cat_columns(parts: list[Tensor], width: int, value: float = 0) -> Tensor:
    """Row blocks [b_i, n_i] padded on the right with `value` to `width` columns, stacked: [sum b_i, width]."""
    return torch.cat([torch.nn.functional.pad(x, (0, width - x.shape[1]), value=value) for x in parts])


@torch.no_grad()
def generate(
    model,
    tokenizer,
    prompts: Sequence,
    settings: SamplingSettings | None = None,
    *,
    batch_size: int = 64,
    seed: int | None = None,
    max_prompt_tokens: int | None = None,
    row_seeds: Sequence[int] | None = None,
    synced: bool = False,
) -> Rollout:
    """Sample one response per prompt (repeat prompts for several), `batch_size` prompts per call.

    prompts: strings (raw text), chat message lists, or token-id lists (see `encode_prompts`); with
    `max_prompt_tokens`, each keeps at most its last that many tokens.

    `seed` makes sampling reproducible without touching the global RNG (seed=None draws from, and
    advances, the global torch RNG). `row_seeds` (one per prompt) samples each row from its own generator
    instead, so a row's response does not depend on the other rows of its batch (see the module docstring). The model is put in eval mode for the call (dropout off) and
    restored after. `synced`: the model is sharded across processes (FSDP), each sampling its own rows: every
    process then runs decoding steps until all are done (transformers' `synced_gpus`), so their forward
    passes, each of which gathers the weights from all, stay in step.
    """
    settings = settings or SamplingSettings()
    if len(prompts) == 0:
        raise ConfigError("generate() needs at least one prompt")
    if row_seeds is not None and len(row_seeds) != len(prompts):
        raise ConfigError(
            f"generate() got {len(row_seeds)} row seeds for {len(prompts)} prompts; give one per prompt"
        )
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    eos = model.generation_config.eos_token_id if tokenizer.eos_token_id is None else tokenizer.eos_token_id
    eos_list = [eos] if isinstance(eos, int) else list(eos)
    gen_config = settings.generation_config(pad_id, eos_list)
    device = next(model.parameters()).device
    rows = encode_prompts(tokenizer, prompts)
    if max_prompt_tokens is not None:
        # Keep the end of a long prompt (where the request is), as the data layer truncates training prompts.
        rows = [r[-max_prompt_tokens:] for r in rows]
    was_training = model.training
    model.eval()
    chunks, entropies, token_logps = [], [], []
    try:
        with _seeded(seed, device):
            for s in range(0, len(rows), batch_size):
                new_ids, entropy, logps = _generate_batch(
                    model,
                    rows[s : s + batch_size],
                    pad_id,
                    gen_config,
                    settings,
                    None if row_seeds is None else row_seeds[s : s + batch_size],
                    synced=synced,
                )
                chunks.append(new_ids)
                entropies.append(entropy)
                token_logps.append(logps)
    finally:
        model.train(was_training)
    width = max(c.shape[1] for c in chunks)
    new = _cat_columns(chunks, width, pad_id)
    response_ids, response_mask, ended = _cut_at_eos(new, torch.tensor(eos_list), pad_id)
    # Padding columns appended above hold pad; mark them as not real even when pad != EOS.
    for i, c in enumerate(chunks):
        lo = i * batch_size
        response_mask[lo : lo + c.shape[0], c.shape[1] :] = False
    entropy, sampler_logps = _cat_columns(entropies, width), _cat_columns(token_logps, width)
    return assemble_rollout(
        tokenizer, rows, prompts, (response_ids, response_mask, ended), pad_id, device, entropy, sampler_logps
    )


def assemble_rollout(
    tokenizer, rows: list[list[int]], prompts, response: tuple, pad_id: int, device, entropy, sampler_logps
) -> Rollout:
    """The `Rollout` of sampled responses, laid out alike whichever engine sampled them: `rows` the prompts'
    token ids (left-padded here), `response` = (response_ids [B, R], response_mask [B, R], ended_with_eos [B])
    as `_cut_at_eos` gives them, `entropy` and `sampler_logps` [B, R] (entropy None: not reported)."""
    response_ids, response_mask, ended = response
    prompt_ids, prompt_mask = _left_pad(rows, pad_id, max(len(r) for r in rows))
    texts = tokenizer.batch_decode(response_ids.masked_fill(~response_mask, pad_id), skip_special_tokens=True)
    return Rollout(
        prompt_ids=prompt_ids.to(device),
        prompt_mask=prompt_mask.to(device),
        response_ids=response_ids.to(device),
        response_mask=response_mask.to(device),
        ended_with_eos=ended.to(device),
        texts=[t.strip() for t in texts],
        prompts=list(prompts),
        entropy=None if entropy is None else entropy.masked_fill(~response_mask, 0.0).to(device),
        sampler_logps=sampler_logps.masked_fill(~response_mask, 0.0).to(device),
    )
