"""Several reward sources combined into the one score an optimizer sees; the maths is
`rlhflab.losses.combine`.

    CombinedReward.weighted_sum([helpful, harmless, LengthPenalty()], [1.0, 1.0, 1.0])
    CombinedReward.llama2_gate(helpfulness, safety, unsafe_prompt=is_risky)   # Llama 2 Sec. 3.2.3
    CombinedReward.sparrow(preference, [RegexRule(...), rule_model])           # Sparrow re-rank score

`components(prompts, responses)` also returns every source's own scores, for logging.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from typing import Any

import torch

from rlhflab.errors import ConfigError
from rlhflab.losses.combine import llama2_safety_gate, sparrow_rerank, weighted_sum
from rlhflab.rewards.base import Prompt, Reward, RewardSource, check_batch

MODES = ("weighted_sum", "llama2_gate", "sparrow")


def _unique_names(sources: Sequence[RewardSource]) -> list[str]:
    names: list[str] = []
    for i, s in enumerate(sources):
        name = str(getattr(s, "name", f"source_{i}"))
        names.append(name if name not in names else f"{name}_{i}")
    return names


def rule_probability(source: RewardSource, prompts: list[Prompt], responses: list[str]) -> torch.Tensor:
    """P(the rule is followed) [B]: a `RuleReward`'s own 0/1, else sigmoid of the source's score (a rule
    model whose score is the logit of "followed", as Sparrow's rule reward models are)."""
    follow = getattr(source, "follow_probability", None)
    if follow is not None:
        return follow(prompts, responses).float()
    return torch.sigmoid(source.score(prompts, responses).float())


def group_by_prompt(prompts: Sequence[Prompt]) -> tuple[torch.Tensor, torch.Tensor]:
    """Candidates of the same prompt side by side: (index [P, N] into the batch, -1 where absent; mask [P, N]).

    Prompts are equal when their text (or messages) are equal; groups keep first-appearance order.
    """
    groups: dict[str, list[int]] = {}
    for i, p in enumerate(prompts):
        groups.setdefault(p if isinstance(p, str) else json.dumps(p, sort_keys=True), []).append(i)
    width = max(len(g) for g in groups.values())
    index = torch.tensor([g + [-1] * (width - len(g)) for g in groups.values()], dtype=torch.long)
    return index, index >= 0


class CombinedReward(Reward):
    """A combination of reward sources: a weighted sum, Llama 2's safety gate, or Sparrow's re-rank score.

    Args:
        sources: weighted_sum: any number; llama2_gate: (helpfulness, safety); sparrow: (preference, *rules).
        mode: "weighted_sum", "llama2_gate" or "sparrow".
        weights: weighted_sum only, one per source (default all 1).
        unsafe_prompt: llama2_gate only: prompts -> [B] bools, True where the prompt is flagged as risky
            (Llama 2's IS_SAFETY); None flags nothing, so only the safety threshold gates.
        threshold: llama2_gate: use the safety score where sigmoid(safety) < threshold (0.15 in Llama 2).
        whiten: llama2_gate: whiten the combined scores over the batch (Llama 2); skipped for one response.
    """

    def __init__(
        self,
        sources: Sequence[RewardSource],
        mode: str = "weighted_sum",
        *,
        weights: Sequence[float] | None = None,
        unsafe_prompt: Callable[[list[Prompt]], Any] | None = None,
        threshold: float = 0.15,
        whiten: bool = True,
        name: str | None = None,
    ):
        sources = list(sources)
        if mode not in MODES:
            raise ConfigError(f"unknown reward combination {mode!r}; choose one of {', '.join(MODES)}")
        if not sources:
            raise ConfigError("a combined reward needs at least one reward source")
        if mode == "weighted_sum":
            weights = [1.0] * len(sources) if weights is None else [float(w) for w in weights]
            if len(weights) != len(sources):
                raise ConfigError(
                    f"got {len(weights)} reward weights for {len(sources)} reward sources; "
                    "give exactly one weight per source"
                )
        elif weights is not None:
            raise ConfigError(f"weights apply to mode 'weighted_sum' only, not {mode!r}")
        if mode == "llama2_gate" and len(sources) != 2:
            raise ConfigError(
                f"the Llama 2 safety gate combines exactly (helpfulness, safety), got {len(sources)} sources"
            )
        if mode != "llama2_gate" and unsafe_prompt is not None:
            raise ConfigError("unsafe_prompt applies to mode 'llama2_gate' only")
        self.sources, self.mode, self.weights = sources, mode, weights
        self.unsafe_prompt, self.threshold, self.whiten = unsafe_prompt, threshold, whiten
        self.name = name or mode
        # Source names key `components()` beside the combined score, so none may take the combination's name.
        self.source_names = [n if n != self.name else f"{n}_source" for n in _unique_names(sources)]

    @classmethod
    def weighted_sum(
        cls, sources: Sequence[RewardSource], weights: Sequence[float] | None = None, **kw: Any
    ) -> CombinedReward:
        """R = sum_i w_i R_i."""
        return cls(sources, "weighted_sum", weights=weights, **kw)

    @classmethod
    def llama2_gate(cls, helpfulness: RewardSource, safety: RewardSource, **kw: Any) -> CombinedReward:
        """R = WHITEN(R_s if unsafe(prompt) or sigmoid(R_s) < threshold else R_h)  (Llama 2 Sec. 3.2.3)."""
        return cls([helpfulness, safety], "llama2_gate", **kw)

    @classmethod
    def sparrow(cls, preference: RewardSource, rules: Sequence[RewardSource], **kw: Any) -> CombinedReward:
        """R = sigmoid(R_pr - AVG R_pr) * geometric mean of P(rule followed); AVG over the candidates of the
        same prompt in the batch (Sparrow's re-rank score, for best-of-n)."""
        return cls([preference, *rules], "sparrow", **kw)

    def components(self, prompts: Sequence[Prompt], responses: Sequence[str]) -> dict[str, torch.Tensor]:
        """{source name: its scores [B], ..., self.name: the combined scores [B]}; Sparrow's rule sources
        report P(followed)."""
        prompts, responses = check_batch(prompts, responses)
        if self.mode == "sparrow":
            parts = [self.sources[0].score(prompts, responses).float()]
            parts += [rule_probability(s, prompts, responses) for s in self.sources[1:]]
        else:
            parts = [s.score(prompts, responses).float() for s in self.sources]
        out = dict(zip(self.source_names, parts))
        out[self.name] = self._combine(parts, prompts)
        return out

    def _combine(self, parts: list[torch.Tensor], prompts: list[Prompt]) -> torch.Tensor:
        if self.mode == "weighted_sum":
            return weighted_sum(parts, self.weights)
        if self.mode == "llama2_gate":
            flags = [False] * len(prompts) if self.unsafe_prompt is None else self.unsafe_prompt(prompts)
            unsafe = torch.as_tensor(flags, dtype=torch.bool).reshape(-1)
            if unsafe.numel() != len(prompts):
                raise ConfigError(f"unsafe_prompt returned {unsafe.numel()} flags for {len(prompts)} prompts")
            return llama2_safety_gate(
                parts[0], parts[1], unsafe, threshold=self.threshold, whiten=self.whiten and len(prompts) > 1
            ).rewards
        index, mask = group_by_prompt(prompts)
        safe = index.clamp(min=0)
        rules = torch.stack(parts[1:], dim=-1) if len(parts) > 1 else parts[0].new_ones(len(prompts), 0)
        reranked = sparrow_rerank(parts[0][safe], rules[safe], mask).rewards  # [P, N]
        return torch.zeros(len(prompts)).index_put((index[mask],), reranked[mask])

    def score(self, prompts: Sequence[Prompt], responses: Sequence[str]) -> torch.Tensor:
        return self.components(prompts, responses)[self.name]

    def describe(self) -> dict[str, Any]:
        info: dict[str, Any] = {
            **super().describe(),
            "mode": self.mode,
            "sources": [getattr(s, "describe", lambda s=s: {"name": s.name})() for s in self.sources],
        }
        if self.mode == "weighted_sum":
            info["weights"] = self.weights
        if self.mode == "llama2_gate":
            info.update(threshold=self.threshold, whiten=self.whiten)
        return info


__all__ = ["MODES", "CombinedReward", "group_by_prompt", "rule_probability"]
