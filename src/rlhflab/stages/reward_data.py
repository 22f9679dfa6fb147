"""The reward stage's examples: one tokenized example per record, tagged with the head it trains, with its
Llama 2 margin (pairs), its strictly ordered pairs (rankings) or where each labelled step ends (stepwise)."""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from rlhflab.config import RewardConfig
from rlhflab.data import LLAMA2_RATINGS, tokenize_pair, tokenize_ranked, tokenize_stepwise, tokenize_unpaired
from rlhflab.errors import ConfigError, DataError
from rlhflab.losses import llama2_margins
from rlhflab.losses import tie_orders as losses_tie_orders
from rlhflab.stages.data_source import load_stage_records

# Plackett-Luce sums over every order of tied responses; past this many orders, all_pairs is the sane choice.
MAX_TIE_ORDERS = 120


def margin_of(record, mode: str, where: str) -> float | None:
    """The margin m of a pairwise record under algo.margin (None: no margin)."""
    if mode == "none":
        return None
    if mode == "data":
        return record.margin
    if record.rating not in LLAMA2_RATINGS:
        raise DataError(
            f"algo.margin={mode} needs a Llama 2 rating ({', '.join(LLAMA2_RATINGS)}), got "
            f"{record.rating!r}; add ratings, or use algo.margin=data / none",
            path=where,
            record=_record_name(record),
            field="rating",
        )
    strength = torch.tensor([LLAMA2_RATINGS.index(record.rating)])
    return float(llama2_margins(strength, mode)[0])


def tie_orders(ranks: Sequence[int]) -> list[list[int]]:
    """Every order of the responses consistent with `ranks` (`rlhflab.losses.tie_orders`), refusing more
    than MAX_TIE_ORDERS with what to do instead."""
    try:
        return losses_tie_orders(ranks, MAX_TIE_ORDERS)
    except ValueError:
        raise ConfigError(
            f"a ranking with ranks {list(ranks)} has more than {MAX_TIE_ORDERS} orders of its ties; "
            "use algo.loss=all_pairs, which skips tied pairs"
        ) from None


def _record_name(record) -> str:
    prompt = record.prompt if isinstance(record.prompt, str) else record.prompt[-1]["content"]
    return f"with prompt {prompt[:40]!r}"


def stepwise_example(record, tokenizer, cfg: RewardConfig, where: str) -> dict[str, Any]:
    """A stepwise record tokenized with data.step_separator after each step. Refused: a step that contains the
    separator (scoring splits responses there, so it would be read as several steps) and a record whose every
    step is cut by data.max_length (nothing left to learn)."""
    sep = cfg.data.step_separator
    inside = [i for i, step in enumerate(record.completions) if sep in step]
    if inside:
        raise DataError(
            f"step {inside[0]} contains data.step_separator {sep!r}, so a scored response would be split there "
            "into more steps than were labelled; split it into two steps or choose another separator",
            path=where,
            record=_record_name(record),
            field="completions",
        )
    ex = tokenize_stepwise(
        record,
        tokenizer,
        separator=sep,
        max_length=cfg.data.max_length,
        max_prompt_length=cfg.data.max_prompt_length,
    )
    if not ex["step_positions"]:
        raise DataError(
            f"no step fits in data.max_length={cfg.data.max_length} after the prompt; raise data.max_length",
            path=where,
            record=_record_name(record),
            field="completions",
        )
    return ex


def tokenize_for_head(
    record, kind: str, head: int, tokenizer, cfg: RewardConfig, where: str
) -> dict[str, Any]:
    kw = {"max_length": cfg.data.max_length, "max_prompt_length": cfg.data.max_prompt_length}
    if kind == "pairwise":
        ex = tokenize_pair(record, tokenizer, **kw)
        ex["margin"] = margin_of(record, cfg.algo.margin, where)
        ex["rating"] = record.rating
    elif kind == "unpaired":
        ex = tokenize_unpaired(record, tokenizer, **kw)
    elif kind == "stepwise":
        ex = stepwise_example(record, tokenizer, cfg, where)
    else:
        ex = tokenize_ranked(record, tokenizer, **kw)
        ranks = ex["ranks"]
        ex["pairs"] = [(i, j) for i, j in itertools.combinations(range(len(ranks)), 2) if ranks[i] < ranks[j]]
        if cfg.algo.loss == "plackett_luce":
            tie_orders(ranks)  # refuse a ranking with too many tie orders before training starts
    ex["head"] = head
    return ex


def load_examples(cfg: RewardConfig, kind: str, tokenizer, run_dir: Path) -> tuple[list[dict], list[dict]]:
    """(train, eval) examples of every head; a head with its own file reads it instead of data.train_path."""
    train, held = [], []
    for head, spec in enumerate(cfg.algo.head_specs()):
        data = dataclasses.replace(cfg.data, train_path=spec.data, eval_path="") if spec.data else cfg.data
        records, eval_records = load_stage_records(data, kind, seed=cfg.seed)
        where = spec.data or cfg.data.train_path
        train += [tokenize_for_head(r, kind, head, tokenizer, cfg, where) for r in records]
        held += [tokenize_for_head(r, kind, head, tokenizer, cfg, where) for r in eval_records]
    return train, held
