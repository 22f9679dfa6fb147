"""Annotator groups with different gold: preferences that are plural, not noisy.

One hidden gold reward assumes everyone wants the same thing. Here the annotators come from groups, and each
group has its own gold, a weighting of the task's gold terms (`rlhflab.lab.gold.gold_components`):

    gold_g(x, y) = sum_k w_gk * component_k(x, y)          # component "gold" is the task's gold itself
    a pair is judged by group g with probability share_g, then by g's annotators exactly as `AnnotatorPool`
    judges (Bradley-Terry with temperature, noise, ties, ratings), reading gold_g instead of the gold

`value_split` builds the default: a majority whose gold is the task's, and a minority who agree on every quality
term but want the opposite of one (on `sentiment`, gold - 2 x sentiment: the same fluency, repetition, topic and
clause penalties, the opposite sentiment). That is a disagreement of values over the same responses, the hidden
context of Siththaranjan et al. 2023 (who annotated a pair is not in the data): a reward model fitted to the
pooled labels aggregates the groups by a Borda count, and one reward cannot serve both (Chakraborty et al. 2024,
MaxMin-RLHF).

Every label records the group that gave it, so a method may condition on it (an annotator-conditioned reward
model, Sorensen et al. 2024's steerable pluralism) or not (the usual pooled data). Everything is seeded.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from rlhflab.errors import ConfigError
from rlhflab.lab.annotators import AnnotatorPool, AnnotatorSettings, PairLabel
from rlhflab.lab.gold import gold_components
from rlhflab.lab.tasks import LabTask, get_task, prompt_text

SHARE_TOLERANCE = 1e-6


@dataclass(frozen=True)
class AnnotatorGroup:
    """A group of annotators: its name, its share of the annotations and the weights of its gold on the task's
    gold terms ({"gold": 1.0} is the task's own gold)."""

    name: str
    share: float
    weights: Mapping[str, float] = field(default_factory=lambda: {"gold": 1.0})

    def __post_init__(self) -> None:
        if not self.name or any(c.isspace() for c in self.name):
            raise ConfigError(f"an annotator group needs a name without spaces, got {self.name!r}")
        if not 0 < self.share <= 1:
            raise ConfigError(f"group {self.name!r}: share must be in (0, 1], got {self.share}")
        if not self.weights or not all(math.isfinite(w) for w in self.weights.values()):
            raise ConfigError(
                f"group {self.name!r}: weights must be finite numbers, got {dict(self.weights)}"
            )
        object.__setattr__(self, "weights", dict(self.weights))


def value_split(
    term: str = "sentiment", minority_share: float = 0.3, *, names: tuple[str, str] = ("majority", "minority")
) -> tuple[AnnotatorGroup, AnnotatorGroup]:
    """A majority with the task's gold and a minority who flip the sign of one gold term: gold - 2 x term (the
    same quality terms, the opposite value on `term`)."""
    if not 0 < minority_share < 1:
        raise ConfigError(f"minority_share must be in (0, 1), got {minority_share}")
    return (
        AnnotatorGroup(names[0], 1.0 - minority_share, {"gold": 1.0}),
        AnnotatorGroup(names[1], minority_share, {"gold": 1.0, term: -2.0}),
    )


def gold_terms(task: str | LabTask) -> list[str]:
    """The names of the task's gold terms (the keys a group may weigh)."""
    t = get_task(task)
    probe = t.train_prompts(1)[0]
    return list(gold_components(t, probe, t.demonstrations([probe])[0]))


def check_groups(task: str | LabTask, groups: Sequence[AnnotatorGroup]) -> None:
    """Refuse groups whose shares do not sum to 1, whose names repeat, or that weigh a term the task's gold lacks."""
    if not groups:
        raise ConfigError("give at least one annotator group")
    names = [g.name for g in groups]
    if len(set(names)) != len(names):
        raise ConfigError(f"annotator group names must be distinct, got {names}")
    total = sum(g.share for g in groups)
    if abs(total - 1.0) > SHARE_TOLERANCE:
        raise ConfigError(f"annotator group shares must sum to 1, got {total:g} ({names})")
    known = gold_terms(task)
    for g in groups:
        unknown = [k for k in g.weights if k not in known]
        if unknown:
            raise ConfigError(
                f"group {g.name!r} weighs {unknown}, not terms of the {get_task(task).name!r} task's gold; "
                f"known: {', '.join(known)}"
            )


def group_gold(
    task: str | LabTask, group: AnnotatorGroup, prompts: Sequence[Any], responses: Sequence[str]
) -> np.ndarray:
    """Group g's gold [N] of responses[i] to prompts[i] (task prompts or chat prompts)."""
    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
    t = get_task(task)
    out = np.zeros(len(responses), dtype=np.float64)
    for i, (p, r) in enumerate(zip(prompts, responses)):
        terms = gold_components(t, prompt_text(p), r)
        out[i] = sum(w * terms[k] for k, w in group.weights.items())
    return out


class GroupPool(AnnotatorPool):
    """One group's annotators: an `AnnotatorPool` whose perceived score starts from the group's gold."""

    def __init__(
        self,
        task: str | LabTask,
        group: AnnotatorGroup,
        settings: AnnotatorSettings | None = None,
        seed: int = 0,
    ):
        super().__init__(task, settings, seed=seed)
        self.group = group

    def _gold(self, prompts: Sequence, responses: Sequence[str]) -> np.ndarray:
        return group_gold(self.task, self.group, prompts, responses)


@dataclass(frozen=True)
class GroupLabel:
    """A pairwise judgment and the group that gave it (`label.gold_a`/`gold_b` are that group's gold)."""

    group: str
    label: PairLabel


class PluralisticAnnotators:
    """Annotators from several groups: each item goes to a group drawn by share, then to that group's pool."""

    def __init__(
        self,
        task: str | LabTask,
        groups: Sequence[AnnotatorGroup],
        settings: AnnotatorSettings | None = None,
        seed: int = 0,
    ):
        self.task = get_task(task)
        check_groups(self.task, groups)
        self.groups = tuple(groups)
        self.rng = np.random.default_rng(seed)
        # Each group's own stream, so adding a group leaves the others' draws as they were.
        self.pools = {
            g.name: GroupPool(self.task, g, settings, seed=seed * 1000 + 1 + i) for i, g in enumerate(groups)
        }

    def draw_groups(self, n: int) -> list[str]:
        shares = np.array([g.share for g in self.groups])
        picks = self.rng.choice(len(self.groups), size=n, p=shares / shares.sum())
        return [self.groups[i].name for i in picks]

    def compare(
        self, prompts: Sequence, responses_a: Sequence[str], responses_b: Sequence[str]
    ) -> list[GroupLabel]:
        """Judge a-vs-b for each prompt, each pair by one group's annotators; one `GroupLabel` per pair."""
        who = self.draw_groups(len(prompts))
        out: list[GroupLabel | None] = [None] * len(prompts)
        for name, pool in self.pools.items():
            idx = [i for i, g in enumerate(who) if g == name]
            if not idx:
                continue
            labels = pool.compare(
                [prompts[i] for i in idx], [responses_a[i] for i in idx], [responses_b[i] for i in idx]
            )
            for i, lab in zip(idx, labels):
                out[i] = GroupLabel(name, lab)
        return [x for x in out if x is not None]

    def contested(
        self, prompts: Sequence, responses_a: Sequence[str], responses_b: Sequence[str]
    ) -> np.ndarray:
        """[N] bool: some group's gold strictly prefers a while another's strictly prefers b."""
        gaps = np.stack(
            [
                group_gold(self.task, g, prompts, responses_a)
                - group_gold(self.task, g, prompts, responses_b)
                for g in self.groups
            ]
        )
        return (gaps > 0).any(axis=0) & (gaps < 0).any(axis=0)


def tag_prompt(prompt: Any, tag: str) -> Any:
    """`prompt` with `tag` (e.g. a group's tag word) before its text: a string gets 'TAG PROMPT', a conversation
    its last user message. What an annotator-conditioned reward model reads to know whose preference to predict."""
    if isinstance(prompt, str):
        return f"{tag} {prompt}"
    messages = [dict(m) for m in prompt]
    last = max(i for i, m in enumerate(messages) if m.get("role") == "user")
    messages[last]["content"] = f"{tag} {messages[last]['content']}"
    return messages


def relabel_pairs(
    rows: Sequence[Mapping[str, Any]], annotators: PluralisticAnnotators
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Pairwise rows ({prompt, chosen, rejected, ...}) judged again by the groups: the two responses of each row,
    in their order, go to a group's annotators; ties are dropped. Returns (rows {prompt, chosen, rejected, rating,
    margin?, group}, stats: the rows per group, the share of contested pairs, and each group's agreement with its
    own gold)."""
    prompts = [r["prompt"] for r in rows]
    a, b = [r["chosen"] for r in rows], [r["rejected"] for r in rows]
    labels = annotators.compare(prompts, a, b)
    contested = annotators.contested(prompts, a, b)
    out, agree = [], {g.name: [] for g in annotators.groups}
    for i, gl in enumerate(labels):
        lab = gl.label
        if lab.a_preferred is None:
            continue
        chosen, rejected = (a[i], b[i]) if lab.a_preferred else (b[i], a[i])
        row = {"prompt": prompts[i], "chosen": chosen, "rejected": rejected, "rating": lab.rating}
        if lab.margin is not None:
            row["margin"] = lab.margin
        out.append({**row, "group": gl.group})
        if lab.gold_a != lab.gold_b:
            agree[gl.group].append(lab.a_preferred == (lab.gold_a > lab.gold_b))
    stats = {
        "n": len(out),
        "per_group": {g: sum(r["group"] == g for r in out) for g in agree},
        "contested_share": float(contested.mean()) if len(contested) else None,
        "agreement_with_own_gold": {g: float(np.mean(v)) if v else None for g, v in agree.items()},
    }
    return out, stats
