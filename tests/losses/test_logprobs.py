"""Label log-probs (plain and chunked), sequence log-probs and entropy."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from rlhflab.losses.logprobs import (
    entropy_from_logits,
    gather_logprobs,
    sequence_logps,
    token_mask_from_labels,
)
from rlhflab.models.logprobs import chunked_gather_logprobs

F64 = torch.float64


def test_gather_logprobs_by_hand():
    """logits [0, 0, ln 2] -> softmax = [1, 1, 2] / 4 = [0.25, 0.25, 0.5].

    label 2 -> ln 0.5 = -0.6931; label 0 -> ln 0.25 = -1.3863; label -100 (ignored) -> 0.
    """
    logits = torch.tensor([[[0.0, 0.0, math.log(2)]] * 3], dtype=F64)  # [1, 3, 3]
    labels = torch.tensor([[2, 0, -100]])
    out = gather_logprobs(logits, labels)
    torch.testing.assert_close(out, torch.tensor([[-0.693147, -1.386294, 0.0]], dtype=F64), atol=1e-6, rtol=0)
    assert token_mask_from_labels(labels).tolist() == [[True, True, False]]


def test_gather_logprobs_is_stable_for_huge_logits():
    """logits [1000, 0]: log softmax at index 1 is 0 - logsumexp(1000, 0) = -1000 (not -inf, not NaN)."""
    logits = torch.tensor([[[1000.0, 0.0]]])
    out = gather_logprobs(logits, torch.tensor([[1]]))
    assert out.item() == pytest.approx(-1000.0)


def test_gather_logprobs_half_precision_upcasts():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 50, generator=g) * 4
    labels = torch.randint(0, 50, (2, 5), generator=g)
    ref = torch.log_softmax(logits, -1).gather(-1, labels[..., None]).squeeze(-1)
    out = gather_logprobs(logits.to(torch.bfloat16), labels)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, ref, atol=0.1, rtol=0.02)


def _lm_head(seed=0, b=2, t=7, h=8, v=11):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(b, t, h, dtype=F64, generator=g)
    weight = torch.randn(v, h, dtype=F64, generator=g)
    bias = torch.randn(v, dtype=F64, generator=g)
    labels = torch.randint(0, v, (b, t), generator=g)
    labels[0, -2:] = -100
    return hidden, weight, bias, labels


@pytest.mark.parametrize("chunk_size", [1, 3, 100])
def test_chunked_equals_full_values_and_gradients(chunk_size):
    """Chunked log-probs must match log_softmax(h W^T + b)[label] / T, values and all three gradients."""
    hidden, weight, bias, labels = _lm_head()
    args = [x.clone().requires_grad_() for x in (hidden, weight, bias)]
    full = gather_logprobs(F.linear(*args) / 0.7, labels)
    (full * torch.linspace(-1, 2, full.numel(), dtype=F64).view_as(full)).sum().backward()
    grads_full = [a.grad for a in args]
    args2 = [x.clone().requires_grad_() for x in (hidden, weight, bias)]
    chunked = chunked_gather_logprobs(
        args2[0], args2[1], labels, args2[2], chunk_size=chunk_size, temperature=0.7
    )
    (chunked * torch.linspace(-1, 2, full.numel(), dtype=F64).view_as(full)).sum().backward()
    torch.testing.assert_close(chunked, full)
    for a, gf in zip(args2, grads_full):
        torch.testing.assert_close(a.grad, gf)
    assert chunked[0, -2:].eq(0).all()


def test_chunked_never_saves_a_vocab_sized_tensor():
    """With B*T = 64 tokens and V = 1000, the full log-softmax has 64,000 entries.

    The chunked version saves only hidden (64*8), W (1000*8), labels, one logsumexp per token and the
    ignore-index mask twice (input and output): 512 + 8000 + 64 + 64 + 2 * 64 = 8768 numbers, far below
    64,000; the naive path saves >= 64,000.
    """
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(4, 16, 8, generator=g, requires_grad=True)
    weight = torch.randn(1000, 8, generator=g, requires_grad=True)
    labels = torch.randint(0, 1000, (4, 16), generator=g)
    saved = []

    def pack(x):
        saved.append(x.numel())
        return x

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        out = chunked_gather_logprobs(hidden, weight, labels, chunk_size=16)
    assert sum(saved) <= 8768 < 64 * 1000
    out.sum().backward()
    # The gradients equal those of the full log-softmax.
    h2, w2 = hidden.detach().clone().requires_grad_(), weight.detach().clone().requires_grad_()
    gather_logprobs(F.linear(h2, w2), labels).sum().backward()
    torch.testing.assert_close(hidden.grad, h2.grad)
    torch.testing.assert_close(weight.grad, w2.grad)
    saved.clear()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        gather_logprobs(F.linear(hidden, weight), labels)
    assert sum(saved) >= 64 * 1000


def test_chunked_half_precision_and_frozen_head():
    hidden, weight, bias, labels = _lm_head(seed=1)
    h = hidden.to(torch.bfloat16).requires_grad_()
    out = chunked_gather_logprobs(h, weight.to(torch.bfloat16), labels, chunk_size=4)
    assert out.dtype == torch.float32
    ref = gather_logprobs(F.linear(hidden, weight), labels).float()
    torch.testing.assert_close(out, ref, atol=0.15, rtol=0.05)
    out.sum().backward()
    assert h.grad is not None and h.grad.dtype == torch.bfloat16


def test_sequence_logps_by_hand():
    """[-1, -2 | -3 pad]: sum = -3, mean = -1.5."""
    lp = torch.tensor([[-1.0, -2.0, -3.0]], dtype=F64)
    m = torch.tensor([[True, True, False]])
    assert sequence_logps(lp, m).item() == pytest.approx(-3.0)
    assert sequence_logps(lp, m, average=True).item() == pytest.approx(-1.5)


def test_entropy_by_hand():
    """Uniform over 4 -> ln 4 = 1.3863. logits [0, ln 3] -> p = [1/4, 3/4],
    H = 0.25 ln 4 + 0.75 ln(4/3) = 0.34657 + 0.21576 = 0.56233. A banned (-inf) token adds 0, not NaN.
    """
    inf = float("inf")
    logits = torch.tensor([[[0.0, 0.0, 0.0, 0.0], [0.0, math.log(3), -inf, -inf]]], dtype=F64)
    torch.testing.assert_close(
        entropy_from_logits(logits), torch.tensor([[1.386294, 0.562335]], dtype=F64), atol=1e-6, rtol=0
    )


def test_gradcheck_chunked_kernel():
    """The chunked LM-head log-probs are a custom autograd Function: their backward is ours to check."""
    hidden, weight, bias, labels = _lm_head(b=2, t=3, h=4, v=5)
    leaves = [x.requires_grad_() for x in (hidden, weight, bias)]
    assert torch.autograd.gradcheck(
        lambda h, w, b: chunked_gather_logprobs(h, w, labels, b, chunk_size=2, temperature=0.9), leaves
    )


def test_chunked_matches_a_real_causal_lm(tiny_model, tiny_tokenizer):
    """On the tiny Llama: label log-probs from the last hidden state + lm_head equal those from logits."""
    ids = tiny_tokenizer(["the cat sat on the mat", "a dog is good"], return_tensors="pt", padding=True)
    out = tiny_model(**ids, output_hidden_states=True)
    labels = torch.where(ids["attention_mask"].bool(), ids["input_ids"], -100)[:, 1:]
    from_logits = gather_logprobs(out.logits[:, :-1], labels)
    head = tiny_model.get_output_embeddings()
    from_hidden = chunked_gather_logprobs(
        out.hidden_states[-1][:, :-1], head.weight, labels, head.bias, chunk_size=4
    )
    torch.testing.assert_close(from_hidden, from_logits, atol=1e-5, rtol=1e-5)
    from_hidden.sum().backward()
    assert head.weight.grad is not None and head.weight.grad.abs().sum() > 0
