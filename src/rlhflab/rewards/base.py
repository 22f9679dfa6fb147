"""The one protocol every reward source follows.

PPO, best-of-n and rejection sampling call `source.score(prompts, responses)` and get one float32 score
per response, on the CPU. A prompt is text or a list of chat messages (as in the data layer); a response
is the decoded text of what the policy wrote after the prompt.

Gold rewards of the built-in lab are deliberately not reward sources: training code must never see them
(they are for `rlhflab.eval`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

import torch

from rlhflab.errors import UserError

Prompt = str | list[dict[str, Any]]


@runtime_checkable
class RewardSource(Protocol):
    """Anything with a `name` and `score(prompts, responses) -> Tensor [B]` is a reward source."""

    name: str

    def score(self, prompts: Sequence[Prompt], responses: Sequence[str]) -> torch.Tensor:
        """prompts, responses: B each -> scores [B] float32 on the CPU (higher is better)."""
        ...


class Reward:
    """Convenience base class: input checks, `__call__`, and `describe()` metadata."""

    name: str = "reward"

    def score(self, prompts: Sequence[Prompt], responses: Sequence[str]) -> torch.Tensor:
        raise NotImplementedError

    def __call__(self, prompts: Sequence[Prompt], responses: Sequence[str]) -> torch.Tensor:
        return self.score(prompts, responses)

    def describe(self) -> dict[str, Any]:
        """Metadata for logs and reports: the name, the kind, and the settings that define the scores."""
        return {"name": self.name, "kind": type(self).__name__}

    def __repr__(self) -> str:
        settings = ", ".join(f"{k}={v!r}" for k, v in self.describe().items() if k not in ("kind",))
        return f"{type(self).__name__}({settings})"


def check_batch(prompts: Sequence[Prompt], responses: Sequence[str]) -> tuple[list[Prompt], list[str]]:
    """The batch as lists, refusing mismatched lengths and non-text responses with a clear message."""
    prompts, responses = list(prompts), list(responses)
    if len(prompts) != len(responses):
        raise UserError(
            f"a reward source got {len(prompts)} prompts but {len(responses)} responses; "
            "give one prompt per response (repeat a prompt for several samples)"
        )
    for i, r in enumerate(responses):
        if not isinstance(r, str):
            raise UserError(
                f"response {i} is {type(r).__name__}, not text; reward sources score decoded text"
            )
    return prompts, responses


__all__ = ["Prompt", "Reward", "RewardSource", "check_batch"]
