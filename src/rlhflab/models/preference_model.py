"""A general preference model: P(first preferred | prompt) from the prompt and BOTH responses.

A reward model scores one response at a time, so the preferences it implies are transitive (Bradley-Terry). A
general preference model (Jiang et al. 2023, PairRM; Munos et al. 2023, "Nash Learning from Human Feedback")
reads the pair together and can represent any preference, intransitive ones included. Here the backbone and
its one-output head are a `RewardModel`'s, read on the text

    prompt, response A, EOS, response B, EOS

giving a logit g(x, a, b) at the last EOS; the model's logit is the antisymmetric part
s(x, a, b) = g(x, a, b) - g(x, b, a) (`rlhflab.losses.general_preference`), so P(a > b) + P(b > a) = 1 and
P(a > a) = 1/2 exactly, whatever the weights.

Saved like a reward model (a `*ForSequenceClassification` directory with one label, "preference") plus the key
`rlhflab_preference_model` in config.json holding how pairs were tokenized: that key is what makes the
directory a preference model (a reward source refuses it; `PreferenceModel.from_pretrained` requires it).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from rlhflab.data.collate import pad
from rlhflab.data.tokenize import encode_prompt, encode_response, fit_lengths
from rlhflab.errors import ConfigError, UserError
from rlhflab.losses.general_preference import antisymmetric_logits
from rlhflab.models.loading import LoraSettings, check_model_dir, load_tokenizer
from rlhflab.models.reward_model import PREFERENCE_MODEL_KEY, RewardModel, batch_rewards

HEAD_NAME = "preference"
FORMAT_VERSION = 1


def encode_comparison(
    prompt: Any,
    first: Any,
    second: Any,
    tokenizer: Any,
    *,
    max_length: int | None = None,
    max_prompt_length: int | None = None,
) -> list[int]:
    """Token ids of prompt + first + EOS + second + EOS, the text a preference model reads.

    The prompt is encoded as for any response (BOS, or the chat template's generation prompt) and keeps its
    end when cut to `max_prompt_length`. Each response gets the same budget, half of what the prompt leaves
    of `max_length` (EOS included), so swapping the two responses swaps their tokens and nothing else: the
    two orders the model compares hold the same information. A text response to a chat prompt is one
    assistant turn, as in training data.
    """
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ConfigError("a preference model separates the two responses with EOS; the tokenizer has none")
    responses = []
    for response in (first, second):
        if isinstance(prompt, list) and isinstance(response, str):
            response = [{"role": "assistant", "content": response}]
        responses.append(encode_response(prompt, response, tokenizer, add_eos=False))
    prompt_ids, _ = fit_lengths(encode_prompt(prompt, tokenizer), [], tokenizer, None, max_prompt_length)
    if max_length is not None:
        budget = (max_length - len(prompt_ids)) // 2 - 1
        if budget < 1:
            raise ConfigError(
                f"max_length ({max_length}) leaves no room for two responses after a {len(prompt_ids)}-token "
                "prompt; raise max_length or lower max_prompt_length"
            )
        responses = [r[:budget] for r in responses]
    return prompt_ids + responses[0] + [eos] + responses[1] + [eos]


def collate_comparisons(forward: Sequence[list[int]], backward: Sequence[list[int]], pad_id: int) -> dict:
    """One batch of 2B right-padded rows: rows 0..B-1 read (x, a, b), rows B..2B-1 read (x, b, a)."""
    rows = [*forward, *backward]
    mask = [[1] * len(r) for r in rows]
    return {"input_ids": pad(rows, pad_id), "attention_mask": pad(mask, 0)}


class PreferenceModel(nn.Module):
    """P(first > second | prompt) from a one-head `RewardModel` read on both orders of the pair."""

    def __init__(
        self,
        scorer: RewardModel,
        tokenizer: Any = None,
        *,
        max_length: int | None = None,
        max_prompt_length: int | None = None,
        batch_size: int = 32,
    ):
        super().__init__()
        if scorer.num_heads != 1:
            raise UserError(f"a preference model reads one logit, got a scorer with {scorer.num_heads} heads")
        if batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
        self.scorer, self.tokenizer, self.batch_size = scorer, tokenizer, batch_size
        self.max_length, self.max_prompt_length = max_length, max_prompt_length

    @property
    def config(self):
        return self.scorer.config

    def pair_logits(self, batch: dict, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(g(x, a, b) [B], g(x, b, a) [B]) float32 of a `collate_comparisons` batch, in one forward."""
        g = batch_rewards(self.scorer, batch, device)[:, 0]
        half = g.shape[0] // 2
        return g[:half], g[half:]

    def forward(self, batch: dict, device: torch.device) -> torch.Tensor:
        """The preference logits s(x, a, b) [B] of a `collate_comparisons` batch: P(a > b) = sigmoid(s)."""
        return antisymmetric_logits(*self.pair_logits(batch, device))

    def encode(self, prompt: Any, first: Any, second: Any) -> list[int]:
        if self.tokenizer is None:
            raise UserError(
                "this preference model has no tokenizer; load it with PreferenceModel.from_pretrained"
            )
        return encode_comparison(
            prompt,
            first,
            second,
            self.tokenizer,
            max_length=self.max_length,
            max_prompt_length=self.max_prompt_length,
        )

    @torch.no_grad()
    def prob(self, prompts: Sequence[Any], first: Sequence[str], second: Sequence[str]) -> torch.Tensor:
        """P(first[i] preferred over second[i] | prompts[i]): [B] float32 on the CPU."""
        if not len(prompts) == len(first) == len(second):
            raise UserError(
                f"a preference model got {len(prompts)} prompts, {len(first)} first and {len(second)} second "
                "responses; give one prompt per pair"
            )
        forward = [self.encode(p, a, b) for p, a, b in zip(prompts, first, second)]
        backward = [self.encode(p, b, a) for p, a, b in zip(prompts, first, second)]
        device = next(self.parameters()).device
        # Similar lengths share a batch, so little compute goes to padding.
        order = sorted(range(len(forward)), key=lambda i: len(forward[i]))
        out = torch.zeros(len(forward))
        was_training = self.training
        self.eval()
        try:
            for s in range(0, len(order), self.batch_size):
                idx = order[s : s + self.batch_size]
                batch = collate_comparisons(
                    [forward[i] for i in idx], [backward[i] for i in idx], self.tokenizer.pad_token_id
                )
                out[torch.tensor(idx, dtype=torch.long)] = torch.sigmoid(self(batch, device)).float().cpu()
        finally:
            self.train(was_training)
        return out

    def settings(self) -> dict[str, Any]:
        return {
            "format": FORMAT_VERSION,
            "max_length": self.max_length,
            "max_prompt_length": self.max_prompt_length,
        }

    @classmethod
    def from_causal_lm(
        cls,
        path_or_model: str | os.PathLike | nn.Module,
        tokenizer: Any = None,
        *,
        max_length: int | None = None,
        max_prompt_length: int | None = None,
        dtype="float32",
        device="cpu",
        lora: LoraSettings | None = None,
    ) -> PreferenceModel:
        """A preference model initialized from a causal LM (the SFT model, as a reward model is), fresh head."""
        scorer = RewardModel.from_causal_lm(
            path_or_model, 1, [HEAD_NAME], dtype=dtype, device=device, lora=lora
        )
        return cls(scorer, tokenizer, max_length=max_length, max_prompt_length=max_prompt_length)

    def save_pretrained(self, out_dir: str | os.PathLike, tokenizer: Any = None) -> Path:
        """A reward-model directory (LoRA merged) marked as a preference model, with the tokenizer."""
        return self.scorer.save_pretrained(
            out_dir, tokenizer or self.tokenizer, extra_config={PREFERENCE_MODEL_KEY: self.settings()}
        )

    @classmethod
    def from_pretrained(
        cls, path: str | os.PathLike, *, dtype="float32", device="cpu", batch_size: int = 32
    ) -> PreferenceModel:
        """Load a preference model written by `save_pretrained` (`rlhflab pm`'s RUN/final, or RUN itself)."""
        p = check_preference_model_dir(path)
        settings = json.loads((p / "config.json").read_text())[PREFERENCE_MODEL_KEY]
        scorer = RewardModel.load_weights(p, dtype=dtype, device=device)
        return cls(
            scorer,
            load_tokenizer(p),
            max_length=settings.get("max_length"),
            max_prompt_length=settings.get("max_prompt_length"),
            batch_size=batch_size,
        )


def check_preference_model_dir(path: str | os.PathLike) -> Path:
    """The preference-model directory of `path` (a run directory stands for its final/), or a UserError that
    says what was expected. Reads config.json only: cheap enough to run before anything loads."""
    if not str(path):
        raise ConfigError(
            "config: algo.preference_model is empty but algo.feedback=preference_model asks a general "
            "preference model; give the directory `rlhflab pm` wrote (RUN/final)"
        )
    p = Path(path).expanduser()
    if not (p / "config.json").is_file() and (p / "final" / "config.json").is_file():
        p = p / "final"
    p = check_model_dir(p, what="preference model")
    try:
        config = json.loads((p / "config.json").read_text())
    except ValueError as err:
        raise UserError(f"'{p / 'config.json'}' is not valid JSON: {err}") from None
    if not isinstance(config.get(PREFERENCE_MODEL_KEY), dict):
        raise UserError(
            f"'{p}' is not a general preference model (config.json has no '{PREFERENCE_MODEL_KEY}'); train one "
            "with `rlhflab pm`, or ask a reward model with algo.feedback=reward algo.reward_model=PATH"
        )
    return p


__all__ = [
    "PreferenceModel",
    "check_preference_model_dir",
    "collate_comparisons",
    "encode_comparison",
]
