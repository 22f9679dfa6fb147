"""The lab's simulated annotators as a feedback source (`rlhflab.feedback`): online methods ask them about
the current policy's samples, and they answer from the task's hidden gold reward through the annotator model
of `rlhflab.lab.annotators` (Bradley-Terry temperature, label noise, a pool of annotators with their own length
biases, ties). The training loop sees only the labels, never the gold.

A tie (perceived gap below `tie_margin`) is labelled 0.5, or, with `keep_ties`, put in random order as the lab's
preference data does (Llama 2's "negligibly better / unsure").
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from rlhflab.feedback.base import TIE, SyncFeedback
from rlhflab.lab.annotators import AnnotatorPool, AnnotatorSettings
from rlhflab.lab.tasks import LabTask


class AnnotatorFeedback(SyncFeedback):
    """Pairwise labels from a seeded `AnnotatorPool` over `task`'s gold reward."""

    def __init__(self, task: str | LabTask, settings: AnnotatorSettings | None = None, seed: int = 0):
        super().__init__()
        self.pool = AnnotatorPool(task, settings, seed=seed)
        self.name = f"lab-annotators:{self.pool.task.name}"

    @property
    def settings(self) -> AnnotatorSettings:
        return self.pool.settings

    def judge(self, prompts: Sequence, first: list[str], second: list[str]) -> Tensor:
        labels = []
        for judgment in self.pool.compare(prompts, first, second):
            if judgment.a_preferred is not None:
                labels.append(float(judgment.a_preferred))
            elif self.settings.keep_ties:
                labels.append(float(self.pool.rng.random() < 0.5))
            else:
                labels.append(TIE)
        return torch.tensor(labels, dtype=torch.float32)

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "rng": self.pool.rng.bit_generator.state}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.pool.rng.bit_generator.state = state["rng"]


__all__ = ["AnnotatorFeedback"]
