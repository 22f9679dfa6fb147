"""Programmatic rules: small, transparent reward terms that need no model.

    LengthPenalty(coef=0.01)                    -0.01 per word (or per word away from a target length)
    RegexRule(r"\\bsorry\\b", mode="must_not")    -1 when the response matches, else 0
    MissingEOSPenalty(penalty=1.0)              -1 when the response does not end with an EOS marker

A rule that is followed or broken (`RuleReward`) scores 0 or -penalty, and also reports the probability
that it is followed (1 or 0), which is what Sparrow's re-rank score multiplies (`CombinedReward.sparrow`).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import torch

from rlhflab.errors import ConfigError
from rlhflab.rewards.base import Prompt, Reward, check_batch

# End-of-sequence markers of common tokenizers, as they appear in text decoded with special tokens kept.
DEFAULT_EOS_TEXTS = ("<eos>", "</s>", "<|endoftext|>", "<|eot_id|>", "<|im_end|>", "<|end|>")


def _number(value: Any, what: str, *, low: float | None = None) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{what} must be a number, got {value!r}")
    if low is not None and value < low:
        raise ConfigError(f"{what} must be >= {low}, got {value}")
    return float(value)


class LengthPenalty(Reward):
    """score = -coef * |n - target|, n the response length in words (whitespace-separated) or characters.

    With target 0 (the default) this is -coef * n: a plain penalty on length, the usual guard against the
    length hacking that reward models invite.
    """

    def __init__(self, coef: float = 0.01, target: float = 0.0, unit: str = "words", *, name: str = "length"):
        if unit not in ("words", "chars"):
            raise ConfigError(f"length unit must be 'words' or 'chars', got {unit!r}")
        self.coef = _number(coef, "length coef")
        self.target = _number(target, "length target", low=0)
        self.unit, self.name = unit, name

    def lengths(self, responses: Sequence[str]) -> torch.Tensor:
        return torch.tensor(
            [len(r.split()) if self.unit == "words" else len(r) for r in responses], dtype=torch.float32
        )

    def score(self, prompts: Sequence[Prompt], responses: Sequence[str]) -> torch.Tensor:
        _, responses = check_batch(prompts, responses)
        return -self.coef * (self.lengths(responses) - self.target).abs()

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "coef": self.coef, "target": self.target, "unit": self.unit}


class RuleReward(Reward):
    """A rule each response follows or breaks: score 0 when followed, -penalty when broken."""

    penalty: float = 1.0

    def followed(self, prompts: Sequence[Prompt], responses: Sequence[str]) -> torch.Tensor:
        """[B] bool, True where the response follows the rule."""
        raise NotImplementedError

    def follow_probability(self, prompts: Sequence[Prompt], responses: Sequence[str]) -> torch.Tensor:
        """[B] float32 probability that the rule is followed (here 0 or 1; Sparrow's rule-model output)."""
        return self.followed(prompts, responses).float()

    def score(self, prompts: Sequence[Prompt], responses: Sequence[str]) -> torch.Tensor:
        ok = self.followed(*check_batch(prompts, responses))
        return torch.where(ok, 0.0, -self.penalty).float()


class RegexRule(RuleReward):
    """mode "must": the response must match `pattern` (re.search); "must_not": it must not."""

    def __init__(
        self, pattern: str, mode: str = "must", penalty: float = 1.0, *, flags: int = 0, name: str = "regex"
    ):
        if mode not in ("must", "must_not"):
            raise ConfigError(f"regex rule mode must be 'must' or 'must_not', got {mode!r}")
        try:
            self.regex = re.compile(pattern, flags)
        except re.error as e:
            raise ConfigError(f"regex rule: {pattern!r} is not a valid regular expression ({e})") from None
        self.mode, self.penalty, self.name = mode, _number(penalty, "regex penalty", low=0), name

    def followed(self, prompts: Sequence[Prompt], responses: Sequence[str]) -> torch.Tensor:
        _, responses = check_batch(prompts, responses)
        hits = torch.tensor([self.regex.search(r) is not None for r in responses], dtype=torch.bool)
        return hits if self.mode == "must" else ~hits

    def describe(self) -> dict[str, Any]:
        return {
            **super().describe(),
            "pattern": self.regex.pattern,
            "mode": self.mode,
            "penalty": self.penalty,
        }


class MissingEOSPenalty(RuleReward):
    """-penalty for a response that does not end with an end-of-sequence marker (it was cut off).

    Works on text decoded with special tokens kept (e.g. "... <eos>"). Text decoded without them (as PPO's
    rollouts are) carries no trace of the EOS: there, use PPO's algo.missing_eos_penalty, which reads the
    sampled tokens.
    """

    def __init__(
        self, penalty: float = 1.0, eos_texts: str | Sequence[str] = DEFAULT_EOS_TEXTS, *, name: str = "eos"
    ):
        texts = (eos_texts,) if isinstance(eos_texts, str) else tuple(eos_texts)
        if not texts or not all(isinstance(t, str) and t for t in texts):
            raise ConfigError(f"eos_texts must be non-empty strings, got {eos_texts!r}")
        self.penalty, self.eos_texts, self.name = _number(penalty, "eos penalty", low=0), texts, name

    def followed(self, prompts: Sequence[Prompt], responses: Sequence[str]) -> torch.Tensor:
        _, responses = check_batch(prompts, responses)
        return torch.tensor([r.rstrip().endswith(self.eos_texts) for r in responses], dtype=torch.bool)

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "penalty": self.penalty, "eos_texts": list(self.eos_texts)}


__all__ = ["DEFAULT_EOS_TEXTS", "LengthPenalty", "MissingEOSPenalty", "RegexRule", "RuleReward"]
