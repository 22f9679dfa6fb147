"""Control tokens: one new special token per reward level in front of a prompt (Quark, Lu et al. 2022; binary
reward conditioning, Dubois et al. 2023; control codes, Keskar et al. 2019). `rlhflab quark` adds and trains them;
everything that samples a model (evaluation, best-of-n, `label push`, red teaming) asks `conditioning_of(dir)` and
samples a quark model behind its best token (`condition_prompts`), with every control token blocked in responses."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from rlhflab.data.tokenize import encode_prompt, fit_lengths
from rlhflab.errors import UserError
from rlhflab.models.loading import load_tokenizer

METHOD = "quark"
TOKENS_FILE = "quark.json"
TOKEN_FORMAT = "<|reward_{}|>"


# ---- control tokens: one new special token per reward quantile -----------------------------------------------


@dataclass(frozen=True)
class ControlTokens:
    """The reward tokens of a quark model: tokens[k] (id ids[k]) marks quantile k, 0 the worst, the last the
    best; vocab_before: the tokenizer's size before they were added, the reference's vocabulary."""

    tokens: list[str]
    ids: list[int]
    vocab_before: int

    @property
    def best_id(self) -> int:
        return self.ids[-1]

    def to_json(self) -> dict:
        how = "best_token_id first in a prompt's ids, after a BOS: rlhflab.stages.quark.best_token_prompts"
        best = {"best_token": self.tokens[-1], "best_token_id": self.best_id}
        return {"method": METHOD, **dataclasses.asdict(self), **best, "usage": how}


def add_control_tokens(model, tokenizer, n_quantiles: int, seed: int = 0) -> ControlTokens:
    """Add one special token per quantile to `tokenizer` (tokens already there are reused) and grow `model`'s
    embeddings to hold them. Works with any HF causal LM and with the lab's word-level tokenizer (added tokens are
    matched before its pre-tokenizer would split them at punctuation).

    `add_tokens(special_tokens=True)`, not `add_special_tokens`: that would replace the tokenizer's own additional
    special tokens (a chat template's role markers). A new input embedding is drawn, as Quark's code draws it,
    from a normal with each dimension's mean and standard deviation over the old rows, seeded by `seed`: distinct
    tokens from the first step, where transformers' mean resizing (kept for an untied LM head's rows) gives
    near-identical ones. The old tokens keep their relative probabilities; on the lab's SFT model a new token
    starts near 1e-6, so the policy seldom writes one in a response (quark/control_token_rate counts them)."""
    before = len(tokenizer)
    tokens = [TOKEN_FORMAT.format(k) for k in range(n_quantiles)]
    tokenizer.add_tokens(tokens, special_tokens=True)
    ids = [int(i) for i in tokenizer.convert_tokens_to_ids(tokens)]
    for tok, i in zip(tokens, ids):  # a user who writes the token in text must get the same single id
        if list(tokenizer(tok, add_special_tokens=False)["input_ids"]) != [i]:
            raise UserError(f"the tokenizer does not encode the new token {tok!r} as one id, as quark needs")
    if max(ids) >= model.get_input_embeddings().num_embeddings:
        model.resize_token_embeddings(len(tokenizer))
    new = [i for i in ids if i >= before]
    if new:
        weight = model.get_input_embeddings().weight
        old = weight[:before].detach().float().cpu()
        draw = torch.randn(len(new), old.shape[1], generator=torch.Generator().manual_seed(seed))
        with torch.no_grad():
            weight[new] = (old.mean(0) + old.std(0) * draw).to(weight.dtype).to(weight.device)
    return ControlTokens(tokens, ids, min(before, min(ids)))


def read_control_tokens(model_dir: str | Path) -> ControlTokens:
    """The control tokens of a model saved by `rlhflab quark` (its quark.json)."""
    path = Path(model_dir) / TOKENS_FILE
    if not path.is_file():
        raise UserError(f"'{model_dir}' has no {TOKENS_FILE}: it is not a model saved by `rlhflab quark`")
    saved = json.loads(path.read_text())
    return ControlTokens(list(saved["tokens"]), [int(i) for i in saved["ids"]], int(saved["vocab_before"]))


def with_token(ids: list[int], token_id: int | None, bos_id: int | None) -> list[int]:
    """`ids` with the control token first, after a leading BOS (the model never saw anything before its BOS);
    `ids` as they are when token_id is None."""
    if token_id is None:
        return ids
    at = 1 if ids and bos_id is not None and ids[0] == bos_id else 0
    return [*ids[:at], token_id, *ids[at:]]


def conditioned_prompt_ids(tokenizer, prompt, token_id: int | None, max_prompt_length: int | None = None):
    """A prompt's ids as quark samples and trains on them: encoded as the data layer encodes prompts, cut to its
    last max_prompt_length - 1 tokens (a leading BOS kept), then `token_id` put first (None: no token)."""
    ids = encode_prompt(prompt, tokenizer)
    if max_prompt_length:
        ids, _ = fit_lengths(ids, [], tokenizer, None, max_prompt_length - 1)
    return with_token(ids, token_id, tokenizer.bos_token_id)


def best_token_prompts(model_dir: str | Path, prompts: list, *, tokenizer=None, max_prompt_length=None):
    """The prompts (text or chat messages) as token-id lists with the best reward token of the quark model in
    `model_dir` in front: pass them to `rlhflab.rollout.generate(model, tokenizer, ids, ...)` in place of the
    prompts (a quark model sampled without its token mixes every reward level) and score the responses against
    the original prompts (a reward never sees the token). Best-of-n: n samples of each, scored the same way."""
    tokens = read_control_tokens(model_dir)
    tokenizer = tokenizer if tokenizer is not None else load_tokenizer(model_dir)
    return [conditioned_prompt_ids(tokenizer, p, tokens.best_id, max_prompt_length) for p in prompts]


# ---- sampling a quark model ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Conditioning:
    """How a policy trained behind control tokens is sampled: `token_id` first in every prompt (after a BOS),
    `blocked_ids` (every control token) never sampled in a response. A reference model, which has no such tokens,
    scores the responses behind the plain prompt, so a KL is KL(policy(. | token, x) || ref(. | x)): what the
    policy moved from the reference."""

    token_id: int
    blocked_ids: tuple[int, ...]


def conditioning_of(model_dir: str | Path) -> Conditioning | None:
    """The `Conditioning` of a model saved by `rlhflab quark` (its best reward token), None for any other (a LoRA
    adapter directory, a Hub name: no quark.json)."""
    if not (Path(model_dir) / TOKENS_FILE).is_file():
        return None
    tokens = read_control_tokens(model_dir)
    return Conditioning(tokens.best_id, tuple(tokens.ids))


def condition_prompts(conditioning: Conditioning | None, tokenizer, prompts: list, settings):
    """(prompts, sampling settings) to pass to `rlhflab.rollout.generate`: with a conditioning, each prompt (text
    or chat messages) as token ids behind the token and the settings with every control token suppressed (a
    control token belongs in front of a prompt, never in a response); without one, both as they are. Score the
    responses against the original prompts: a reward never sees the token."""
    if conditioning is None:
        return list(prompts), settings
    ids = [conditioned_prompt_ids(tokenizer, p, conditioning.token_id) for p in prompts]
    return ids, replace(settings, suppress_token_ids=conditioning.blocked_ids)
