"""What every built-in lab task provides, and what it must not.

A task gives training code prompts, a base language model (pretrained here, cached as a normal Hugging
Face model directory) and a demonstrator for SFT data. It never gives a reward: the gold reward of each
task lives in `rlhflab.lab.gold` and is reached only through the simulated annotators
(`rlhflab.lab.annotators`) and the evaluator (`rlhflab.eval`). Training code that imports
`rlhflab.lab.gold` is cheating the measurement.
"""

from __future__ import annotations

import random
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any


def chat_prompt(prompt: str) -> list[dict[str, str]]:
    """A task prompt as the one-message conversation the lab writes and the base model was trained on.

    The data layer renders message lists with the tokenizer's chat template ("<|user|> ... <|assistant|>")
    and treats plain strings as raw text, so lab datasets and evaluation use this form.
    """
    return [{"role": "user", "content": prompt}]


def prompt_text(prompt: Any) -> str:
    """The task prompt inside `prompt`: the string itself, or the last user message of a conversation."""
    if isinstance(prompt, str):
        return prompt
    users = [m["content"] for m in prompt if m.get("role") == "user"]
    if not users:
        raise ValueError(f"prompt {prompt!r} has no user message")
    return users[-1]


@dataclass(frozen=True)
class PretrainSpec:
    """The base model's architecture and pretraining budget (steps of `batch_size` sequences).

    `default_steps` fits in about a minute on 2 CPU cores; `tiny_steps` is for tests (a few seconds) and
    still gives task-shaped text, if a sloppier one.
    """

    arch: str = "llama"
    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 4
    default_steps: int = 800
    tiny_steps: int = 150
    batch_size: int = 64
    lr: float = 3e-3
    warmup_steps: int = 30

    def steps(self, budget: str) -> int:
        from rlhflab.errors import ConfigError

        if budget == "default":
            return self.default_steps
        if budget == "tiny":
            return self.tiny_steps
        raise ConfigError(f"unknown pretraining budget {budget!r}; expected 'default' or 'tiny'")


class LabTask(ABC):
    """A built-in task. Subclasses set the class attributes and implement the abstract methods."""

    name: str
    description: str
    version: str  # bump when the grammar, corpus or base model changes: it is part of the cache key
    max_new_tokens: int  # enough for any good response; the evaluator samples with this limit
    pretrain: PretrainSpec

    @abstractmethod
    def vocabulary(self) -> list[str]:
        """Every word of prompts and responses (the word-level tokenizer's vocabulary, in a fixed order)."""

    @abstractmethod
    def train_prompts(self, n: int, seed: int = 0) -> list[str]:
        """`n` prompts (user messages) for SFT, preference data and RL, drawn with `seed`."""

    @abstractmethod
    def heldout_prompts(self, n: int, seed: int = 0) -> list[str]:
        """`n` evaluation prompts from a set disjoint from the training prompts."""

    @abstractmethod
    def demonstrations(self, prompts: list[str], seed: int = 0) -> list[str]:
        """One response per prompt from the task's suboptimal demonstrator (the SFT data source)."""

    @abstractmethod
    def pretraining_pairs(self, n: int, seed: int = 0) -> list[tuple[str, str]]:
        """`n` (prompt, response) pairs of the base model's pretraining corpus."""

    @abstractmethod
    def oracle_responses(self, prompt: str, n: int, seed: int = 0) -> list[str]:
        """Strong candidate responses; the evaluator takes the gold-best to estimate the best achievable."""

    def evidence_corpus(self) -> list[str]:
        """Passages a retrieval tool may search for evidence (Sparrow); none unless the task ships a corpus."""
        return []

    def build_tokenizer(self):
        """The task's word-level tokenizer (a `PreTrainedTokenizerFast` with a chat template)."""
        from rlhflab.models.tiny import build_word_tokenizer

        return build_word_tokenizer(self.vocabulary())

    def __repr__(self) -> str:
        return f"<lab task {self.name!r} v{self.version}>"


class SubjectReviewTask(LabTask):
    """A task of reviews of named subjects (sentiment, review): prompts from (template, subject) combos, one
    response per prompt drawn from the task's writer in a style. Subclasses set the tables below and
    `prompt_subject` / `sample_review` (as staticmethods); the draws are seeded by the task's name."""

    prompt_templates: tuple[str, ...]
    subject_names: tuple[str, ...]
    train_combos: tuple[tuple[int, int], ...]
    heldout_combos: tuple[tuple[int, int], ...]
    base_style: Any
    demo_style: Any
    oracle_style: Any
    prompt_subject: Any  # staticmethod: prompt -> subject or None
    sample_review: Any  # staticmethod: (subject, style, rng) -> one review

    def _prompts(self, combos: tuple[tuple[int, int], ...], n: int, rng) -> list[str]:
        chosen = [combos[rng.randrange(len(combos))] for _ in range(n)]
        return [self.prompt_templates[t].format(s=self.subject_names[s]) for t, s in chosen]

    def train_prompts(self, n: int, seed: int = 0) -> list[str]:
        return self._prompts(self.train_combos, n, random.Random(f"{self.name}-train-{seed}"))

    def heldout_prompts(self, n: int, seed: int = 0) -> list[str]:
        return self._prompts(self.heldout_combos, n, random.Random(f"{self.name}-heldout-{seed}"))

    def _respond(self, prompts: list[str], style, rng) -> list[str]:
        out = []
        for p in prompts:
            subject = self.prompt_subject(p) or rng.choice(self.subject_names)
            out.append(self.sample_review(subject, style, rng))
        return out

    def demonstrations(self, prompts: list[str], seed: int = 0) -> list[str]:
        return self._respond(prompts, self.demo_style, random.Random(f"{self.name}-demo-{seed}"))

    def pretraining_pairs(self, n: int, seed: int = 0) -> list[tuple[str, str]]:
        rng = random.Random(f"{self.name}-pretrain-{seed}")
        prompts = self._prompts(self.train_combos, n, rng)
        return list(zip(prompts, self._respond(prompts, self.base_style, rng)))

    def oracle_responses(self, prompt: str, n: int, seed: int = 0) -> list[str]:
        """Candidate best responses (for the evaluator's best-achievable estimate only)."""
        rng = random.Random(f"{self.name}-oracle-{seed}-{prompt}")
        return self._respond([prompt] * n, self.oracle_style, rng)
