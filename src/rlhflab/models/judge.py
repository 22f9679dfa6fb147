"""An LM judge: a causal LM asked which of two responses is better, read from its answer-token probabilities.

    judge = LMJudge.from_pretrained("models/smollm2-135m-instruct")
    p = judge.prob(prompts, first, second)        # [B] P(first is better), asked in both orders
    verdict = judge.compare(prompts, first, second)  # p, and each order's P(answer "A"), for bias statistics
    score = judge.rate(prompts, responses)        # [B] expected rating on a 1..5 scale (pointwise mode)

The judge never parses generated text: it renders one question (the tokenizer's chat template when it has
one), runs one forward pass and reads the next-token distribution at the answer position, restricted to the
answer tokens ("A" / "B", or the scale's digits), as in the LLM-as-a-judge and RLAIF set-ups (Zheng et al.
2023; Lee et al. 2023, who also read the label from the answer tokens' probabilities rather than from
sampled text). A judge is biased toward a position (Zheng et al. 2023, Sec. 3.3; Wang et al. 2023): each
pair is asked in both orders and the two answers averaged, so a constant preference for "A" cancels.

The pure functions below hold the arithmetic; `LMJudge` batches the forward passes.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from rlhflab.errors import ConfigError

PAIR_TEMPLATE = (
    "Here is a request and two responses to it.\n\n"
    "Request: {prompt}\n\n"
    "Response A: {first}\n\n"
    "Response B: {second}\n\n"
    "Which response is more helpful, honest and harmless? Answer with one letter, A or B."
)
RATE_TEMPLATE = (
    "Here is a request and a response to it.\n\n"
    "Request: {prompt}\n\n"
    "Response: {response}\n\n"
    "Rate the response from 1 (very poor) to 5 (excellent). Answer with one digit."
)


# ---- the arithmetic ---------------------------------------------------------------------------------------


def answer_logprob(logits: Tensor, token_sets: Sequence[Sequence[int]]) -> Tensor:
    """log P(answer k | answers only) for each answer k, from next-token logits [B, V].

    An answer may be written by several tokens ("A" and " A"): its probability is the sum over them. The
    distribution is renormalized over the answers, so the mass the model puts elsewhere does not count.
    Returns [B, K] log-probabilities whose exp sums to 1 over K.
    """
    logps = torch.log_softmax(logits.float(), dim=-1)
    per_answer = torch.stack([torch.logsumexp(logps[:, list(ids)], dim=-1) for ids in token_sets], dim=-1)
    return torch.log_softmax(per_answer, dim=-1)


def debiased_preference(p_a_first_shown: Tensor, p_a_swapped: Tensor) -> Tensor:
    """P(first response is better) from both orders: the mean of P("A") when it was shown first (as A) and of
    P("B") = 1 - P("A") when it was shown second. A judge that adds a constant bias toward one position gets
    it on both sides and, for small biases, cancels it (exactly, at P = 1/2).

    p_a_first_shown [B]: P(answer A) with (first, second) shown as (A, B); p_a_swapped [B]: with (second, first)."""
    return 0.5 * (p_a_first_shown + (1.0 - p_a_swapped))


def position_consistency(p_a_first_shown: Tensor, p_a_swapped: Tensor) -> Tensor:
    """[B] bool: True where the judge picks the same RESPONSE in both orders (it answers A then B, or B then
    A); False where it picks the same POSITION both times, a verdict the order decided (Zheng et al. 2023's
    consistency). The position-bias rate is 1 - mean(consistency)."""
    return (p_a_first_shown > 0.5) != (p_a_swapped > 0.5)


def expected_rating(
    logits: Tensor, scale_token_ids: Sequence[Sequence[int]], scale: Sequence[float]
) -> Tensor:
    """[B] the expected rating sum_k scale[k] * P(k | scale answers only) from next-token logits [B, V]: a
    pointwise score that moves smoothly with the judge's confidence (Liu et al. 2023, G-Eval)."""
    probs = answer_logprob(logits, scale_token_ids).exp()
    return probs @ torch.as_tensor(scale, dtype=probs.dtype)


# ---- the judge ---------------------------------------------------------------------------------------------


@dataclass
class Comparison:
    """A judge's verdict on B pairs: p_first [B] (debiased P(first better)), p_a [B] (P("A") with the first
    response shown as A), p_a_swapped [B] (P("A") with the second response shown as A)."""

    p_first: Tensor
    p_a: Tensor
    p_a_swapped: Tensor

    @property
    def consistent(self) -> Tensor:
        return position_consistency(self.p_a, self.p_a_swapped)


def _answer_ids(tokenizer, answer: str) -> list[int]:
    """The token ids that write `answer` as one token, with and without a leading space."""
    ids = []
    for text in (answer, " " + answer):
        tokens = tokenizer.encode(text, add_special_tokens=False)
        if len(tokens) == 1 and tokens[0] not in ids and tokens[0] != tokenizer.unk_token_id:
            ids.append(tokens[0])
    if not ids:
        raise ConfigError(
            f"the judge's tokenizer has no single token for the answer {answer!r}; pick other answers"
        )
    return ids


def _text(prompt: Any) -> str:
    """A prompt as the question quotes it: text as is, a chat as 'role: content' lines."""
    if isinstance(prompt, str):
        return prompt
    return "\n".join(f"{m.get('role', 'user')}: {m.get('content', '')}" for m in prompt)


def response_text(response: Any) -> str:
    """A response as text: a string as is, a list of (assistant) messages as their contents."""
    if isinstance(response, str):
        return response
    return "\n".join(str(m.get("content", "")) for m in response)


class LMJudge:
    """A causal LM as a pairwise and pointwise judge (see the module docstring). Frozen, eval mode.

    template: the pairwise question with {prompt}, {first}, {second}; rate_template: the pointwise one with
    {prompt}, {response}; answers: the two answer words; scale: the ratings a pointwise answer may take (each
    a single token); max_length: questions keep their last that many tokens (the answer position).
    """

    def __init__(
        self,
        model,
        tokenizer,
        *,
        template: str = PAIR_TEMPLATE,
        rate_template: str = RATE_TEMPLATE,
        answers: tuple[str, str] = ("A", "B"),
        scale: Sequence[int] = (1, 2, 3, 4, 5),
        batch_size: int = 16,
        max_length: int = 1024,
        name: str = "judge",
    ):
        for key in ("{prompt}", "{first}", "{second}"):
            if key not in template:
                raise ConfigError(f"the judge's pairwise template needs {key}")
        self.model = model.requires_grad_(False).eval()
        self.tokenizer, self.template, self.rate_template = tokenizer, template, rate_template
        self.answer_ids = [_answer_ids(tokenizer, a) for a in answers]
        self.scale = list(scale)
        self.scale_ids = [_answer_ids(tokenizer, str(s)) for s in self.scale]
        self.batch_size, self.max_length, self.name = batch_size, max_length, name
        self.forwards = 0  # questions asked (one forward row each): the judge's cost
        # Only the last position's logits are read: HF models that can skip the LM head elsewhere are asked to
        # (about a fifth of a 135M model's forward is its 49k-word head).
        accepts = inspect.signature(model.forward).parameters
        self._last_only = {"logits_to_keep": 1} if "logits_to_keep" in accepts else {}

    @classmethod
    def from_pretrained(cls, path: str, *, device: Any = "cpu", dtype: str = "float32", **kw) -> LMJudge:
        from rlhflab.models.loading import load_causal_lm, load_tokenizer

        model = load_causal_lm(path, dtype=dtype, device=device)
        return cls(model, load_tokenizer(path, padding_side="left"), name=str(path), **kw)

    def _render(self, question: str) -> list[int]:
        tok = self.tokenizer
        if getattr(tok, "chat_template", None):
            ids = tok.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True)
            ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
        else:
            ids = tok.encode(question + "\nAnswer:", add_special_tokens=True)
        return list(ids)[-self.max_length :]

    @torch.no_grad()
    def next_token_logits(self, questions: Sequence[str]) -> Tensor:
        """[N, V] float32 logits of the token after each question (batched, left-padded)."""
        device = next(self.model.parameters()).device
        pad = (
            self.tokenizer.pad_token_id
            if self.tokenizer.pad_token_id is not None
            else self.tokenizer.eos_token_id
        )
        out = []
        for start in range(0, len(questions), self.batch_size):
            rows = [self._render(q) for q in questions[start : start + self.batch_size]]
            width = max(map(len, rows))
            ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows], device=device)
            mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=device)
            positions = (mask.cumsum(-1) - 1).clamp(min=0)
            logits = self.model(
                input_ids=ids, attention_mask=mask, position_ids=positions, **self._last_only
            ).logits
            out.append(logits[:, -1].float().cpu())
            self.forwards += len(rows)
        return torch.cat(out) if out else torch.empty(0, 0)

    def compare(self, prompts: Sequence, first: Sequence[str], second: Sequence[str]) -> Comparison:
        """Both orders of every pair: the debiased P(first better) and each order's P("A")."""
        b = len(prompts)
        first, second = [response_text(r) for r in first], [response_text(r) for r in second]
        shown = [
            self.template.format(prompt=_text(p), first=x, second=y)
            for p, x, y in [*zip(prompts, first, second), *zip(prompts, second, first)]
        ]
        p_a = answer_logprob(self.next_token_logits(shown), self.answer_ids)[:, 0].exp()
        return Comparison(debiased_preference(p_a[:b], p_a[b:]), p_a[:b], p_a[b:])

    def prob(self, prompts: Sequence, first: Sequence[str], second: Sequence[str]) -> Tensor:
        """[B] P(first is better), asked in both orders (what `PreferenceModelFeedback` reads)."""
        return self.compare(prompts, first, second).p_first

    def rate(self, prompts: Sequence, responses: Sequence[str]) -> Tensor:
        """[B] the expected rating of each response on the judge's scale (pointwise mode)."""
        questions = [
            self.rate_template.format(prompt=_text(p), response=response_text(r))
            for p, r in zip(prompts, responses)
        ]
        return expected_rating(self.next_token_logits(questions), self.scale_ids, self.scale)


__all__ = [
    "PAIR_TEMPLATE",
    "RATE_TEMPLATE",
    "Comparison",
    "LMJudge",
    "answer_logprob",
    "debiased_preference",
    "expected_rating",
    "position_consistency",
    "response_text",
]
