"""Pairwise feedback from a general preference model: P(first preferred | prompt) read on the pair itself.

    argmax:         label = 1 if P > 1/2, 0 if P < 1/2, 0.5 (a tie) if |P - 1/2| <= tie_tolerance
    bradley_terry:  label ~ Bernoulli(P)

The modes mirror `RewardFeedback`'s: argmax is the noiseless judge, the draw is the annotator the model was
fitted to imitate. Under a reward model the draw is Bernoulli(sigmoid(r_first - r_second)) (Bradley and Terry
1952); here P comes from both responses at once, so the labels can be intransitive (Munos et al. 2023), which
is what methods built for general preferences (DNO, Rosset et al. 2024) optimize against. A NaN probability
makes the pair's label NaN (no answer).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from rlhflab.errors import ConfigError
from rlhflab.feedback.base import FIRST, SECOND, TIE, SyncFeedback

MODES = ("argmax", "bradley_terry")


class PreferenceModelFeedback(SyncFeedback):
    """Pairwise labels from anything with `prob(prompts, first, second) -> Tensor [B]` (a
    `rlhflab.models.preference_model.PreferenceModel`). `seed` seeds the draws (a private generator)."""

    def __init__(self, model: Any, mode: str = "argmax", seed: int = 0, tie_tolerance: float = 1e-6):
        super().__init__()
        if mode not in MODES:
            raise ConfigError(
                f"preference model feedback mode must be one of {', '.join(MODES)}, got {mode!r}"
            )
        if not 0 <= tie_tolerance < 0.5:
            raise ConfigError(f"tie_tolerance must be in [0, 0.5), got {tie_tolerance}")
        self.model, self.mode, self.tie_tolerance = model, mode, tie_tolerance
        self.name = f"preference_model:{getattr(model, 'name', type(model).__name__)}"
        self.generator = torch.Generator().manual_seed(seed)
        self.last_probs: Tensor | None = None

    @classmethod
    def from_pretrained(
        cls, path: str, *, mode: str = "argmax", seed: int = 0, device: Any = "cpu", dtype: str = "float32"
    ) -> PreferenceModelFeedback:
        """The preference model `rlhflab pm` saved at `path` (RUN/final or RUN), frozen, as a feedback source."""
        from rlhflab.models.preference_model import PreferenceModel

        model = PreferenceModel.from_pretrained(path, dtype=dtype, device=str(device))
        model.requires_grad_(False).eval()
        model.name = str(path)
        return cls(model, mode=mode, seed=seed)

    def judge(self, prompts: list, first: list[str], second: list[str]) -> Tensor:
        b = len(prompts)
        p = torch.as_tensor(self.model.prob(prompts, first, second)).float().cpu()
        if p.shape != (b,):
            raise ValueError(f"preference model {self.name} returned shape {tuple(p.shape)} for {b} pairs")
        self.last_probs = p
        if self.mode == "argmax":
            labels = torch.where(p > 0.5, FIRST, SECOND)
            labels = torch.where((p - 0.5).abs() <= self.tie_tolerance, TIE, labels)
        else:
            # One uniform per pair whatever the probabilities, so the draws stay aligned with the pairs.
            u = torch.rand(b, generator=self.generator)
            labels = (u < p).float()
        return labels.masked_fill(p.isnan(), float("nan"))

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.generator.set_state(state["generator"])
