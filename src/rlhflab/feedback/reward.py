"""Pairwise feedback from a reward: a learned reward model or a rule scores both responses, and the pair's
label follows from the two scores.

    argmax:         label = 1 if s_first > s_second, 0 if s_first < s_second, 0.5 (a tie) if equal
    bradley_terry:  label ~ Bernoulli(sigmoid(s_first - s_second))

The Bradley-Terry draw (Bradley and Terry 1952) is the choice model a reward model is trained under
(Ouyang et al. 2022, Eq. 1), so its labels are what annotators would give if the reward were their true
preference; argmax is the noiseless judge (Guo et al. 2024 use an LM judge's single answer). A NaN score makes
the pair's label NaN (no answer).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from rlhflab.errors import ConfigError
from rlhflab.feedback.base import SyncFeedback, labels_from_scores

MODES = ("argmax", "bradley_terry")


class RewardFeedback(SyncFeedback):
    """Pairwise labels from any reward source (`score(prompts, responses) -> Tensor [B]`, e.g. from
    `rlhflab.rewards.load_rewards`). `seed` seeds the Bradley-Terry draws (a private generator)."""

    def __init__(self, reward: Any, mode: str = "argmax", seed: int = 0):
        super().__init__()
        if mode not in MODES:
            raise ConfigError(f"reward feedback mode must be one of {', '.join(MODES)}, got {mode!r}")
        self.reward, self.mode = reward, mode
        self.name = f"reward:{getattr(reward, 'name', type(reward).__name__)}"
        self.generator = torch.Generator().manual_seed(seed)

    def judge(
        self, prompts: list, first: list[str], second: list[str]
    ) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        b = len(prompts)
        # One call for both sides, so a reward model batches all 2B responses together.
        scores = torch.as_tensor(self.reward.score(prompts + prompts, first + second)).float().cpu()
        if scores.shape != (2 * b,):
            raise ValueError(f"reward {self.name} returned shape {tuple(scores.shape)} for {2 * b} responses")
        s1, s2 = scores[:b], scores[b:]
        if self.mode == "argmax":
            return labels_from_scores(s1, s2), (s1, s2)
        # One uniform per pair whatever the scores, so the draws stay aligned with the pairs.
        u = torch.rand(b, generator=self.generator)
        labels = (u < torch.sigmoid(s1 - s2)).float()
        return labels.masked_fill(s1.isnan() | s2.isnan(), float("nan")), (s1, s2)

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.generator.set_state(state["generator"])
