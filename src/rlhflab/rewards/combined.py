"""Several reward sources combined into the one score an optimizer sees; the maths is
`rlhflab.losses.combine`.

    CombinedReward.weighted_sum([helpful, harmless, LengthPenalty()], [1.0, 1.0, 1.0])
    CombinedReward.llama2_gate(helpfulness, safety, unsafe_prompt=is_risky)   # Llama 2 Sec. 3.2.3
    CombinedReward.sparrow(preference, [RegexRule(...), rule_model])           # Sparrow re-rank score
    CombinedReward.ensemble([rm_1, rm_2, rm_3], "uwo", uwo_coef=0.5)           # Coste et al. 2024: mean, min, uwo

`components(prompts, responses)` also returns every source's own scores, for logging.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch

from rlhflab.errors import ConfigError
from rlhflab.losses.combine import ENSEMBLE_AGGREGATIONS, llama2_safety_gate, sparrow_rerank, weighted_sum
from rlhflab.rewards.base import Prompt, Reward, RewardSource, check_batch

# ensemble_<aggregation>: the members of a reward-model ensemble, aggregated by `ENSEMBLE_AGGREGATIONS`.
ENSEMBLE_MODES = tuple(f"ensemble_{name}" for name in ENSEMBLE_AGGREGATIONS)
MODES = ("weighted_sum", "llama2_gate", "sparrow", *ENSEMBLE_MODES)


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
    """A combination of reward sources: a weighted sum, Llama 2's safety gate, Sparrow's re-rank score, or an
    aggregation of a reward-model ensemble.

    Args:
        sources: weighted_sum: any number; llama2_gate: (helpfulness, safety); sparrow: (preference, *rules);
            ensemble_*: the ensemble's members, two or more, on one scale (reward models whitened with their
            stored statistics, `:normalize=true`: a Bradley-Terry reward's offset is arbitrary).
        mode: "weighted_sum", "llama2_gate", "sparrow", or "ensemble_mean", "ensemble_min" (worst case, WCO),
            "ensemble_uwo" (mean - uwo_coef x variance over the members, UWO), Coste et al. 2024.
        weights: weighted_sum only, one per source (default all 1).
        unsafe_prompt: llama2_gate only: prompts -> [B] bools, True where the prompt is flagged as risky
            (Llama 2's IS_SAFETY); None flags nothing, so only the safety threshold gates.
        threshold: llama2_gate: use the safety score where sigmoid(safety) < threshold (0.15 in Llama 2).
        whiten: llama2_gate: whiten the combined scores over the batch (Llama 2); skipped for one response.
        uwo_coef: ensemble_uwo only: lambda, the weight of the variance over the members (>= 0).
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
        uwo_coef: float | None = None,
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
        self._check_ensemble(mode, len(sources), uwo_coef)
        self.uwo_coef = float(uwo_coef) if uwo_coef is not None else None
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

    @classmethod
    def ensemble(
        cls,
        members: Sequence[RewardSource],
        aggregation: str = "mean",
        *,
        uwo_coef: float | None = None,
        **kw: Any,
    ) -> CombinedReward:
        """An ensemble of reward models aggregated by `aggregation`: "mean", "min" (WCO) or "uwo" (mean - uwo_coef x
        variance over the members), Coste et al. 2024. The members should share one scale (`normalize=True`)."""
        return cls(members, f"ensemble_{aggregation}", uwo_coef=uwo_coef, **kw)

    @staticmethod
    def _check_ensemble(mode: str, n_sources: int, uwo_coef: float | None) -> None:
        """An ensemble mode needs two or more members; uwo_coef is ensemble_uwo's, and that mode needs it."""
        if mode in ENSEMBLE_MODES and n_sources < 2:
            raise ConfigError(
                f"mode {mode!r} aggregates an ensemble of reward models and needs at least two members, got "
                f"{n_sources}; give more reward sources, or use one source alone"
            )
        if mode == "ensemble_uwo":
            if uwo_coef is None or not (uwo_coef >= 0 and math.isfinite(uwo_coef)):
                raise ConfigError(
                    f"mode 'ensemble_uwo' needs uwo_coef, the weight of the members' variance: a finite number "
                    f">= 0, got {uwo_coef}"
                )
        elif uwo_coef is not None:
            raise ConfigError(f"uwo_coef applies to mode 'ensemble_uwo' only, not {mode!r}")

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
        if self.mode in ENSEMBLE_MODES:
            aggregation = self.mode[len("ensemble_") :]
            members = torch.stack(parts)  # [K, B]
            if aggregation == "uwo":
                return ENSEMBLE_AGGREGATIONS["uwo"](members, self.uwo_coef)
            return ENSEMBLE_AGGREGATIONS[aggregation](members)
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
        if self.mode == "ensemble_uwo":
            info["uwo_coef"] = self.uwo_coef
        return info


__all__ = ["ENSEMBLE_MODES", "MODES", "CombinedReward", "group_by_prompt", "rule_probability"]
