"""What `rlhflab label push` queues: K responses per prompt, sampled from a policy or read from a file.

Responses that come out identical carry no preference between them, and an empty response (the model ended at
once) makes no training record, so the prompts whose K samples repeat one another or include an empty one are
sampled again, up to `retries` times, and left out if they still do.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rlhflab.data.readers import read_rows
from rlhflab.errors import DataError
from rlhflab.rollout.generate import SamplingSettings


def sample_items(
    policy: str | Path,
    prompts: Sequence,
    k: int,
    settings: SamplingSettings,
    *,
    seed: int = 0,
    retries: int = 3,
    batch_size: int = 64,
) -> tuple[list[dict[str, Any]], int]:
    """(items {"prompt", "responses" [k], "meta"}, prompts left out) sampled from the policy in `policy` (a model
    or LoRA adapter directory; a quark model samples behind its best reward token, as evaluation does)."""
    from rlhflab.models.control_tokens import condition_prompts, conditioning_of
    from rlhflab.models.loading import load_inference_lm, load_tokenizer
    from rlhflab.rollout.generate import generate

    model = load_inference_lm(policy)
    tokenizer = load_tokenizer(policy)
    conditioning = conditioning_of(policy)
    responses: dict[int, list[str]] = {}
    todo = list(range(len(prompts)))
    for attempt in range(retries + 1):
        if not todo:
            break
        repeated, sampling = condition_prompts(
            conditioning, tokenizer, [prompts[i] for i in todo for _ in range(k)], settings
        )
        rollout = generate(model, tokenizer, repeated, sampling, batch_size=batch_size, seed=seed + attempt)
        for j, i in enumerate(todo):
            responses[i] = rollout.texts[j * k : (j + 1) * k]
        todo = [i for i in todo if not _usable(responses[i])]
    meta = {"policy": str(policy), "seed": seed, "temperature": settings.temperature}
    if conditioning is not None:
        meta["control_token"] = tokenizer.decode([conditioning.token_id])
    items = [
        {"prompt": prompts[i], "responses": responses[i], "meta": meta}
        for i in range(len(prompts))
        if i not in todo
    ]
    return items, len(todo)


def _usable(responses: list[str]) -> bool:
    return all(r.strip() for r in responses) and len(set(responses)) == len(responses)


def read_items(path: str | Path, k: int | None = None) -> list[dict[str, Any]]:
    """Items from a file of {"prompt", "responses": [...]} records (optional "gold", "meta"), each with `k`
    responses when k is given."""
    items = []
    for number, row in read_rows(str(path)):
        where = {"path": str(path), "record": number}
        prompt, responses = row.get("prompt"), row.get("responses")
        if not isinstance(prompt, (str, list)) or (isinstance(prompt, str) and not prompt.strip()):
            raise DataError("expected a non-empty prompt (text or chat messages)", field="prompt", **where)
        if not isinstance(responses, list) or not all(isinstance(r, str) for r in responses):
            raise DataError("expected a list of response texts", field="responses", **where)
        if k is not None and len(responses) != k:
            raise DataError(f"has {len(responses)} responses; --k is {k}", field="responses", **where)
        item = {"prompt": prompt, "responses": responses, "meta": {"source": str(path), "record": number}}
        if row.get("gold") is not None:
            item["gold"] = row["gold"]
        items.append(item)
    return items
