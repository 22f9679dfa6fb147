"""Programmatic rules: small, transparent reward terms that need no model.

    LengthPenalty(coef=0.01)                    -0.01 per word (or per word away from a target length)
    RegexRule(r"\\bsorry\\b", mode="must_not")    -1 when the response matches, else 0
    MissingEOSPenalty(penalty=1.0)              -1 when the response does not end with an EOS marker
    ArithmeticVerifier()                        1 when the response's final answer is the value of the prompt's
                                                sum, else 0 (a verifiable reward)

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


class ArithmeticVerifier(Reward):
    """A verifiable reward: 1 when the number after the response's last `answer` word is the value of the first
    sum the prompt's text asks for ("add 3 + 5 + 2 ." -> 10; integers with + and -), else 0 (also when the
    prompt holds no sum). Reinforcement learning with verifiable rewards (Lambert et al. 2024, "Tulu 3", Sec. 6)
    and DeepSeek-R1's rule-based accuracy reward (DeepSeek-AI 2025, Sec. 2.2.2) check the final answer this way
    instead of asking a learned reward model. Digits a word-level tokenizer decodes apart ("1 0") are read as one
    number; a chat prompt is read from its last user message.
    """

    _SUM = re.compile(r"-?\d+(?:\s*[+-]\s*\d+)+")

    def __init__(self, answer: str = "answer", *, name: str = "arithmetic"):
        if not isinstance(answer, str) or not answer.strip() or any(c.isspace() for c in answer.strip()):
            raise ConfigError(f"arithmetic verifier: answer must be one word, got {answer!r}")
        self.answer, self.name = answer.strip(), name
        self._answer = re.compile(rf"\b{re.escape(self.answer)}\s*:?\s*(-?\d+)")

    @staticmethod
    def _glued(text: str) -> str:
        return re.sub(r"(?<=\d) (?=\d)", "", " ".join(text.split()))

    def target(self, prompt: Prompt) -> int | None:
        """The value of the first sum in the prompt's text, or None when it has none."""
        if not isinstance(prompt, str):
            users = [m.get("content", "") for m in prompt if m.get("role") == "user"]
            prompt = users[-1] if users else ""
        found = self._SUM.search(self._glued(prompt))
        if found is None:
            return None
        terms = re.findall(r"([+-]?)\s*(\d+)", found.group(0))
        return sum(-int(n) if sign == "-" else int(n) for sign, n in terms)

    def final_answer(self, response: str) -> int | None:
        found = self._answer.findall(self._glued(response))
        return int(found[-1]) if found else None

    def score(self, prompts: Sequence[Prompt], responses: Sequence[str]) -> torch.Tensor:
        prompts, responses = check_batch(prompts, responses)
        right = []
        for p, r in zip(prompts, responses):
            want, got = self.target(p), self.final_answer(r)
            right.append(want is not None and got == want)
        return torch.tensor(right, dtype=torch.float32)

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "answer": self.answer}


__all__ = [
    "DEFAULT_EOS_TEXTS",
    "ArithmeticVerifier",
    "LengthPenalty",
    "MissingEOSPenalty",
    "RegexRule",
    "RuleReward",
]
