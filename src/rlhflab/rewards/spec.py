"""Reward sources named by a short string, for configs and the command line.

    runs/rm/final                         a reward model (head 0); a run directory RUN works too
    runs/rm/final:head=safety             one head, by name or index
    runs/rm/final:normalize=true          whitened with the training mean/std stored in the model
    runs/prm/final:aggregate=min          a process reward model's weakest step (default: product of steps)
    runs/dpl/final:risk_aversion=1        a distributional reward model's mean - 1 x std (default: the mean)
    rule:length                           -0.01 per word      (options: coef, target, unit=words|chars)
    rule:regex:pattern=\\bsorry\\b:mode=must_not              (options: pattern, mode=must|must_not, penalty)
    rule:eos:penalty=2                    response must end with an EOS marker (options: penalty, eos)
    rule:arithmetic                       1 when the final answer is the prompt's sum, else 0 (option: answer)

Options follow the source as `:key=value`. A ':' not followed by a known-looking `key=` stays part of the
path or of the previous value (so regular expressions may contain ':'). `load_rewards` takes several specs
separated by ',' and sums them with weights (a regex containing ',' needs the Python API).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any

import torch

from rlhflab.errors import ConfigError, UserError
from rlhflab.rewards.base import RewardSource
from rlhflab.rewards.combined import ENSEMBLE_MODES, CombinedReward
from rlhflab.rewards.learned import LearnedReward, check_reward_dir
from rlhflab.rewards.rules import ArithmeticVerifier, LengthPenalty, MissingEOSPenalty, RegexRule

_OPTION = re.compile(r"^([A-Za-z_]+)=(.*)$", re.DOTALL)


def _bool(value: str) -> bool:
    if value.lower() in ("true", "1", "yes"):
        return True
    if value.lower() in ("false", "0", "no"):
        return False
    raise ValueError(f"expected true or false, got {value!r}")


def _head(value: str) -> int | str:
    return int(value) if value.isdigit() else value


# Rule name -> (constructor, {option: parser}).
RULES: dict[str, tuple[Callable[..., RewardSource], dict[str, Callable[[str], Any]]]] = {
    "length": (LengthPenalty, {"coef": float, "target": float, "unit": str}),
    "regex": (RegexRule, {"pattern": str, "mode": str, "penalty": float}),
    "eos": (MissingEOSPenalty, {"penalty": float, "eos": str}),
    "arithmetic": (ArithmeticVerifier, {"answer": str}),
}
LEARNED_OPTIONS: dict[str, Callable[[str], Any]] = {
    "head": _head,
    "normalize": _bool,
    "batch_size": int,
    "max_length": int,
    "max_prompt_length": int,
    "aggregate": str,  # a process reward model's product / min of step probabilities
    "risk_aversion": float,  # a distributional reward model's mean - k * std
}


def parse_spec(spec: str) -> tuple[str, dict[str, str]]:
    """('rule:NAME' or a path, {option: raw value}) of one reward spec."""
    if not isinstance(spec, str) or not spec.strip():
        raise UserError(
            "empty reward spec; give a reward model directory (from `rlhflab rm`) or a rule such as "
            "'rule:length'"
        )
    parts = spec.strip().split(":")
    if parts[0] in ("rule", "lab") and len(parts) > 1:
        source, rest = f"{parts[0]}:{parts[1]}", parts[2:]
    else:
        source, rest = parts[0], parts[1:]
    options: dict[str, str] = {}
    last: str | None = None
    for part in rest:
        match = _OPTION.match(part)
        if match:
            last = match.group(1)
            if last in options:
                raise UserError(f"reward spec '{spec}': option '{last}' is given twice")
            options[last] = match.group(2)
        elif last is None:
            source += ":" + part
        else:
            options[last] += ":" + part
    return source, options


def _parse_options(
    spec: str, options: dict[str, str], known: dict[str, Callable[[str], Any]]
) -> dict[str, Any]:
    out = {}
    for key, raw in options.items():
        if key not in known:
            raise UserError(
                f"reward spec '{spec}': unknown option '{key}'; this source takes "
                f"{', '.join(known) or 'no options'}"
            )
        try:
            out[key] = known[key](raw)
        except ValueError as e:
            raise UserError(f"reward spec '{spec}': option {key}={raw!r} is not valid ({e})") from None
    return out


def load_reward(spec: str, *, device: str | torch.device = "cpu", dtype: str = "float32") -> RewardSource:
    """The reward source a spec names (see the module docstring); a UserError says what is wrong."""
    source, options = parse_spec(spec)
    if source.startswith("lab:"):
        raise UserError(
            f"reward spec '{spec}': the lab's gold reward is hidden from training on purpose (it is "
            "what training is judged by); train a reward model with `rlhflab rm` on the lab's "
            "preferences and give its directory"
        )
    if source.startswith("rule:"):
        name = source[len("rule:") :]
        if name not in RULES:
            raise UserError(f"reward spec '{spec}': unknown rule '{name}'; known rules: {', '.join(RULES)}")
        build, known = RULES[name]
        kwargs = _parse_options(spec, options, known)
        if name == "regex" and "pattern" not in kwargs:
            raise UserError(
                f"reward spec '{spec}': rule:regex needs a pattern, e.g. rule:regex:pattern=thanks"
            )
        if "eos" in kwargs:
            kwargs["eos_texts"] = kwargs.pop("eos")
        try:
            return build(**kwargs)
        except UserError as e:
            raise UserError(f"reward spec '{spec}': {e}") from None
    kwargs = _parse_options(spec, options, LEARNED_OPTIONS)
    path = check_reward_dir(source)
    return LearnedReward.from_pretrained(path, device=device, dtype=dtype, **kwargs)


def load_rewards(
    specs: str | Sequence[str],
    *,
    weights: str | Sequence[float] | None = None,
    device: str | torch.device = "cpu",
    dtype: str = "float32",
    combine: str = "weighted_sum",
    safety_threshold: float = 0.15,
    unsafe_prompt_pattern: str = "",
    uwo_coef: float | None = None,
) -> RewardSource:
    """One reward source from one or several specs (comma-separated, or a list).

    combine: "weighted_sum" sums them with `weights` (comma-separated or a list, one per spec; empty means
    all 1); "llama2_gate" takes exactly (helpfulness, safety) and gates them as Llama 2 does
    (`CombinedReward.llama2_gate`), prompts matching `unsafe_prompt_pattern` (a regular expression,
    case-insensitive, over the prompt's text) being flagged as risky; "ensemble_mean", "ensemble_min" (WCO)
    and "ensemble_uwo" (the mean minus `uwo_coef` x the variance, UWO) aggregate two or more reward models as
    an ensemble (`CombinedReward.ensemble`, Coste et al. 2024; give them on one scale, e.g. `:normalize=true`).
    """
    items = [s.strip() for s in (specs.split(",") if isinstance(specs, str) else specs) if s.strip()]
    if not items:
        raise UserError(
            "no reward source given; name a reward model directory or a rule such as 'rule:length'"
        )
    if uwo_coef is not None and combine != "ensemble_uwo":
        raise UserError(f"uwo_coef applies to combine='ensemble_uwo' only, not {combine!r}")
    if combine == "llama2_gate":
        if len(items) != 2 or weights:
            raise UserError(
                f"the Llama 2 safety gate takes exactly two reward sources (helpfulness, safety) and no "
                f"weights, got {len(items)} ({', '.join(items)})"
            )
        helpfulness, safety = (load_reward(s, device=device, dtype=dtype) for s in items)
        flag = _unsafe_flags(unsafe_prompt_pattern) if unsafe_prompt_pattern else None
        return CombinedReward.llama2_gate(helpfulness, safety, unsafe_prompt=flag, threshold=safety_threshold)
    if combine in ENSEMBLE_MODES:
        return _ensemble(items, combine, weights, uwo_coef, device=device, dtype=dtype)
    if combine != "weighted_sum":
        raise UserError(
            f"unknown reward combination {combine!r}; use weighted_sum, llama2_gate or one of "
            f"{', '.join(ENSEMBLE_MODES)}"
        )
    if isinstance(weights, str):
        try:
            weights = [float(w) for w in weights.split(",") if w.strip()]
        except ValueError:
            raise UserError(
                f"reward weights '{weights}' must be comma-separated numbers, e.g. '1.0,0.5'"
            ) from None
    weights = list(weights) if weights else None
    if weights is not None and len(weights) != len(items):
        raise UserError(
            f"{len(weights)} reward weights for {len(items)} reward sources ({', '.join(items)}); "
            "give one weight per source"
        )
    sources = [load_reward(s, device=device, dtype=dtype) for s in items]
    if len(sources) == 1 and weights in (None, [1.0]):
        return sources[0]
    return CombinedReward.weighted_sum(sources, weights)


def _ensemble(
    items: list[str], combine: str, weights, uwo_coef: float | None, *, device, dtype: str
) -> CombinedReward:
    """The reward models of `items` as one ensemble, aggregated as `combine` (an ensemble_* mode) says; the
    source count and the coefficient are checked before any model loads."""
    if weights:
        raise UserError(f"reward weights apply to weighted_sum, not to the ensemble combination {combine}")
    try:
        CombinedReward._check_ensemble(combine, len(items), uwo_coef)
    except ConfigError as e:
        raise UserError(f"reward sources {', '.join(items)}: {e}") from None
    return CombinedReward(
        [load_reward(s, device=device, dtype=dtype) for s in items], combine, uwo_coef=uwo_coef
    )


def _unsafe_flags(pattern: str) -> Callable[[list[Any]], list[bool]]:
    """prompts -> [True where the prompt's text (chat messages: their contents) matches `pattern`]."""
    regex = re.compile(pattern, re.IGNORECASE)

    def text(prompt: Any) -> str:
        return prompt if isinstance(prompt, str) else "\n".join(str(m.get("content", "")) for m in prompt)

    return lambda prompts: [bool(regex.search(text(p))) for p in prompts]


__all__ = ["LEARNED_OPTIONS", "RULES", "load_reward", "load_rewards", "parse_spec"]
