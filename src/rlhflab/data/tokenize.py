"""Tokenization with a loss mask that is exact at the prompt/response boundary.

The prompt and each response are tokenized separately and concatenated, so the boundary never falls
inside a token and `loss_mask` (True = the token counts in the loss) is exact. Conversational prompts are
rendered with the tokenizer's chat template and the generation prompt; a conversational response is the
text the template adds after that rendered prompt, so everything the template wraps around an assistant
turn (including its end-of-turn token) is trained on.

Truncation keeps what matters most: the END of the prompt (the part next to the response) and the
START of the response. Outputs are plain python lists; the collators make tensors.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from rlhflab.data.records import (
    PairwiseRecord,
    PromptRecord,
    RankedRecord,
    Record,
    SFTRecord,
    StepwiseRecord,
    Text,
    UnpairedRecord,
)
from rlhflab.errors import ConfigError


def check_lengths(max_length: int | None, max_prompt_length: int | None) -> None:
    """Raise ConfigError unless the two limits leave room for at least one response token."""
    for name, value, low in (("max_length", max_length, 2), ("max_prompt_length", max_prompt_length, 1)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < low):
            raise ConfigError(f"{name} must be an integer >= {low} (or None for no limit), got {value!r}")
    if max_length is not None and max_prompt_length is not None and max_prompt_length >= max_length:
        raise ConfigError(
            f"max_prompt_length ({max_prompt_length}) must be smaller than max_length "
            f"({max_length}); otherwise a long prompt leaves no room for the response"
        )


def render_chat(tokenizer: Any, messages: Sequence[dict], *, add_generation_prompt: bool) -> str:
    """The chat template's text for `messages` (not tokenized)."""
    if not getattr(tokenizer, "chat_template", None):
        raise ConfigError(
            f"{type(tokenizer).__name__} has no chat template, but the data is conversational "
            "(lists of messages); set tokenizer.chat_template or give the data as text"
        )
    return tokenizer.apply_chat_template(
        list(messages), tokenize=False, add_generation_prompt=add_generation_prompt
    )


def _encode(tokenizer: Any, text: str, *, add_special_tokens: bool = False) -> list[int]:
    if not text:
        return [] if not add_special_tokens else list(tokenizer("", add_special_tokens=True)["input_ids"])
    return list(tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])


def encode_prompt(prompt: Text, tokenizer: Any) -> list[int]:
    """Token ids of a prompt, ready for the response to follow.

    Text gets the tokenizer's own start-of-sequence tokens (BOS for Llama, none for GPT-2) but never a
    trailing EOS; messages are rendered with the generation prompt, whose text already holds any BOS.
    """
    if isinstance(prompt, list):
        return _encode(tokenizer, render_chat(tokenizer, prompt, add_generation_prompt=True))
    ids = _encode(tokenizer, prompt, add_special_tokens=True)
    eos = tokenizer.eos_token_id
    if ids and eos is not None and ids[-1] == eos and _encode(tokenizer, prompt)[-1:] != [eos]:
        ids = ids[:-1]
    return ids


def _response_text(prompt: Text, response: Text, tokenizer: Any) -> str:
    if isinstance(response, str):
        return response
    if not isinstance(prompt, list):
        raise ConfigError("a response given as messages needs its prompt as messages too")
    head = render_chat(tokenizer, prompt, add_generation_prompt=True)
    full = render_chat(tokenizer, [*prompt, *response], add_generation_prompt=False)
    if not full.startswith(head):
        raise ConfigError(_prefix_message(head, full))
    return full[len(head) :]


def _prefix_message(head: str, full: str) -> str:
    return (
        "the chat template renders the prompt differently once a response follows it, so the "
        "prompt/response boundary is not exact; rlhflab needs render(prompt, add_generation_prompt=True) "
        f"to be a prefix of render(prompt + response). Prompt renders as {head[-80:]!r}, prompt + "
        f"response as {full[: len(head) + 40][-120:]!r}"
    )


def _with_eos(ids: list[int], tokenizer: Any) -> list[int]:
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ConfigError(
            "add_eos needs tokenizer.eos_token_id, which is None; set the tokenizer's eos_token "
            "or pass add_eos=False"
        )
    return ids if ids[-1:] == [eos] else [*ids, eos]


def encode_response(
    prompt: Text, response: Text, tokenizer: Any, *, add_eos: bool | None = None
) -> list[int]:
    """Token ids of a response to `prompt`, without the prompt.

    add_eos: True makes the response end with EOS (appended unless already there); False never adds it;
    None (default) adds it to text responses only, since a chat template already closes assistant turns
    with its own end-of-turn token.
    """
    is_chat = isinstance(response, list)
    ids = _encode(tokenizer, _response_text(prompt, response, tokenizer))
    if add_eos or (add_eos is None and not is_chat):
        ids = _with_eos(ids, tokenizer)
    return ids


def _truncate_left(ids: list[int], budget: int, bos_id: int | None) -> list[int]:
    if len(ids) <= budget:
        return ids
    # Dropping the BOS would put the model off-distribution for free; keep it and drop what follows.
    if bos_id is not None and ids[0] == bos_id and budget >= 2:
        return [bos_id, *ids[len(ids) - budget + 1 :]]
    return ids[len(ids) - budget :]


def fit_lengths(
    prompt_ids: list[int],
    responses: list[list[int]],
    tokenizer: Any,
    max_length: int | None,
    max_prompt_length: int | None,
) -> tuple[list[int], list[list[int]]]:
    """Truncate one prompt and its responses: the prompt from the left to `max_prompt_length` (or to
    `max_length - 1` when that is unset, so one response token always fits), then every response from the
    right so that prompt + response fits in `max_length`."""
    check_lengths(max_length, max_prompt_length)
    budget = (
        max_prompt_length
        if max_prompt_length is not None
        else (max_length - 1 if max_length is not None else None)
    )
    if budget is not None:
        prompt_ids = _truncate_left(prompt_ids, budget, getattr(tokenizer, "bos_token_id", None))
    if max_length is not None:
        responses = [r[: max_length - len(prompt_ids)] for r in responses]
    return prompt_ids, responses


def _example(prompt_ids: list[int], response_ids: list[int]) -> dict[str, list]:
    ids = prompt_ids + response_ids
    return {
        "input_ids": ids,
        "attention_mask": [1] * len(ids),
        "loss_mask": [False] * len(prompt_ids) + [True] * len(response_ids),
    }


def tokenize_sft(
    record: SFTRecord,
    tokenizer: Any,
    *,
    max_length: int | None = None,
    max_prompt_length: int | None = None,
    add_eos: bool | None = None,
) -> dict[str, list]:
    """`input_ids`, `attention_mask`, `loss_mask` (each length T) for a demonstration.

    prompt + completion: the completion counts. `messages`: every assistant turn counts, everything else
    (system, user, tool turns, role headers) does not; such a conversation is truncated from the right to
    `max_length` (max_prompt_length does not apply).
    """
    if record.messages is not None:
        return _tokenize_conversation(record.messages, tokenizer, max_length=max_length, add_eos=add_eos)
    prompt_ids = encode_prompt(record.prompt, tokenizer)
    response = encode_response(record.prompt, record.completion, tokenizer, add_eos=add_eos)
    prompt_ids, (response,) = fit_lengths(prompt_ids, [response], tokenizer, max_length, max_prompt_length)
    return _example(prompt_ids, response)


def conversation_segments(messages: Sequence[dict], tokenizer: Any) -> list[tuple[str, bool]]:
    """Split the rendered conversation into (text, is_assistant_turn) pieces, in order.

    Rendering grows one turn at a time and each piece is the text the template added, so the pieces join
    to exactly the full rendering and each boundary is where the template puts it, whatever the template.
    """
    pieces: list[tuple[str, bool]] = []
    done = ""
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        head = render_chat(tokenizer, messages[:i], add_generation_prompt=True)
        full = render_chat(tokenizer, messages[: i + 1], add_generation_prompt=False)
        for a, b in ((done, head), (head, full)):
            if not b.startswith(a):
                raise ConfigError(_prefix_message(a, b))
        pieces += [(head[len(done) :], False), (full[len(head) :], True)]
        done = full
    final = render_chat(tokenizer, messages, add_generation_prompt=False)
    if not final.startswith(done):
        raise ConfigError(_prefix_message(done, final))
    pieces.append((final[len(done) :], False))
    return [(text, counts) for text, counts in pieces if text]


def _tokenize_conversation(
    messages: Sequence[dict], tokenizer: Any, *, max_length: int | None, add_eos: bool | None
) -> dict[str, list]:
    check_lengths(max_length, None)
    ids: list[int] = []
    loss_mask: list[bool] = []
    for text, counts in conversation_segments(messages, tokenizer):
        piece = _encode(tokenizer, text)
        if counts and add_eos:
            piece = _with_eos(piece, tokenizer)
        ids += piece
        loss_mask += [counts] * len(piece)
    if max_length is not None:
        ids, loss_mask = ids[:max_length], loss_mask[:max_length]
    return {"input_ids": ids, "attention_mask": [1] * len(ids), "loss_mask": loss_mask}


def tokenize_pair(
    record: PairwiseRecord,
    tokenizer: Any,
    *,
    max_length: int | None = None,
    max_prompt_length: int | None = None,
    add_eos: bool | None = None,
) -> dict[str, Any]:
    """`prompt_input_ids` and `chosen_`/`rejected_` `input_ids`, `attention_mask`, `loss_mask` (each
    prompt + response, sharing one truncated prompt), and `margin` (float or None)."""
    prompt_ids = encode_prompt(record.prompt, tokenizer)
    responses = [
        encode_response(record.prompt, r, tokenizer, add_eos=add_eos)
        for r in (record.chosen, record.rejected)
    ]
    prompt_ids, (chosen, rejected) = fit_lengths(
        prompt_ids, responses, tokenizer, max_length, max_prompt_length
    )
    out: dict[str, Any] = {"prompt_input_ids": prompt_ids}
    for name, response in (("chosen", chosen), ("rejected", rejected)):
        out.update({f"{name}_{k}": v for k, v in _example(prompt_ids, response).items()})
    out["margin"] = record.margin
    return out


def tokenize_ranked(
    record: RankedRecord,
    tokenizer: Any,
    *,
    max_length: int | None = None,
    max_prompt_length: int | None = None,
    add_eos: bool | None = None,
) -> dict[str, Any]:
    """`prompt_input_ids`; `input_ids`, `attention_mask`, `loss_mask` as K lists (best first); `ranks` (K)."""
    prompt_ids = encode_prompt(record.prompt, tokenizer)
    responses = [encode_response(record.prompt, r, tokenizer, add_eos=add_eos) for r in record.responses]
    prompt_ids, responses = fit_lengths(prompt_ids, responses, tokenizer, max_length, max_prompt_length)
    examples = [_example(prompt_ids, r) for r in responses]
    out: dict[str, Any] = {"prompt_input_ids": prompt_ids}
    out.update({k: [e[k] for e in examples] for k in ("input_ids", "attention_mask", "loss_mask")})
    out["ranks"] = list(record.ranks)
    return out


def tokenize_unpaired(
    record: UnpairedRecord,
    tokenizer: Any,
    *,
    max_length: int | None = None,
    max_prompt_length: int | None = None,
    add_eos: bool | None = None,
) -> dict[str, Any]:
    """`input_ids`, `attention_mask`, `loss_mask` for prompt + completion, and the bool `label`."""
    prompt_ids = encode_prompt(record.prompt, tokenizer)
    response = encode_response(record.prompt, record.completion, tokenizer, add_eos=add_eos)
    prompt_ids, (response,) = fit_lengths(prompt_ids, [response], tokenizer, max_length, max_prompt_length)
    return {**_example(prompt_ids, response), "label": record.label}


def encode_steps(
    prompt: Text,
    steps: Sequence[str],
    tokenizer: Any,
    *,
    separator: str,
    max_length: int | None = None,
    max_prompt_length: int | None = None,
) -> tuple[list[int], list[int]]:
    """Token ids of a prompt and a solution in steps, each step followed by `separator` (TRL's PRM layout), and
    the position of each step's last token (its separator's last one, where a process reward model reads its
    verdict on the step). Every step is tokenized alone, so a step never shares a token with the next one.
    Truncation as `fit_lengths`; a step cut by max_length is dropped with every later one (fewer positions
    than steps). A step that tokenizes to nothing (with an empty separator) gets no position of its own, so it
    is refused."""
    prompt_ids = encode_prompt(prompt, tokenizer)
    sep = _encode(tokenizer, separator)
    pieces = [_encode(tokenizer, step) + sep for step in steps]
    empty = [i for i, piece in enumerate(pieces) if not piece]
    if empty:
        raise ConfigError(f"step {empty[0]} ({steps[empty[0]]!r}) tokenizes to no tokens")
    response = [t for piece in pieces for t in piece]
    prompt_ids, (response,) = fit_lengths(prompt_ids, [response], tokenizer, max_length, max_prompt_length)
    ends, end, total = [], len(prompt_ids) - 1, len(prompt_ids) + len(response)
    for piece in pieces:
        end += len(piece)
        if end >= total:
            break
        ends.append(end)
    return prompt_ids + response, ends


def tokenize_stepwise(
    record: StepwiseRecord,
    tokenizer: Any,
    *,
    separator: str = "\n",
    max_length: int | None = None,
    max_prompt_length: int | None = None,
) -> dict[str, Any]:
    """`input_ids`, `attention_mask`, `step_positions` (each step's last token, `encode_steps`) and `step_labels`
    (the labels of the steps that survived truncation, in order)."""
    ids, ends = encode_steps(
        record.prompt,
        record.completions,
        tokenizer,
        separator=separator,
        max_length=max_length,
        max_prompt_length=max_prompt_length,
    )
    return {
        "input_ids": ids,
        "attention_mask": [1] * len(ids),
        "step_positions": ends,
        "step_labels": list(record.labels[: len(ends)]),
    }


def tokenize_prompt(
    prompt: Text | Record, tokenizer: Any, *, max_prompt_length: int | None = None
) -> dict[str, list]:
    """`input_ids` and `attention_mask` of a prompt for generation (messages end with the generation
    prompt); longer prompts keep their end. Accepts a prompt or any record with a `prompt`."""
    if not isinstance(prompt, (str, list)):
        prompt = prompt.prompt
    check_lengths(None, max_prompt_length)
    ids = encode_prompt(prompt, tokenizer)
    if max_prompt_length is not None:
        ids = _truncate_left(ids, max_prompt_length, getattr(tokenizer, "bos_token_id", None))
    return {"input_ids": ids, "attention_mask": [1] * len(ids)}


_TOKENIZERS = {
    SFTRecord: tokenize_sft,
    PairwiseRecord: tokenize_pair,
    RankedRecord: tokenize_ranked,
    UnpairedRecord: tokenize_unpaired,
}


def tokenize_record(
    record: Record,
    tokenizer: Any,
    *,
    max_length: int | None = None,
    max_prompt_length: int | None = None,
    add_eos: bool | None = None,
) -> dict[str, Any]:
    """Tokenize any record with the function for its type (a PromptRecord uses max_prompt_length, or
    max_length when that is unset)."""
    if isinstance(record, PromptRecord):
        budget = max_prompt_length if max_prompt_length is not None else max_length
        return tokenize_prompt(record, tokenizer, max_prompt_length=budget)
    fn = _TOKENIZERS.get(type(record))
    if fn is None:
        raise TypeError(f"not an rlhflab record: {type(record).__name__}")
    return fn(record, tokenizer, max_length=max_length, max_prompt_length=max_prompt_length, add_eos=add_eos)


def mismatched_partners(prompts: list[Any], search: int = 64) -> list[int]:
    """For each example i, the index of a later example (cyclically) with another prompt, or i+1 when none
    is near. KTO's reference point z0 is the policy/reference KL on such mismatched pairs (x_i, y_j)."""
    n = len(prompts)
    partners = []
    for i in range(n):
        steps = (s for s in range(1, min(n, search + 1)) if prompts[(i + s) % n] != prompts[i])
        partners.append((i + next(steps, 1)) % n)
    return partners
