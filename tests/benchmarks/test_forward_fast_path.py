"""The fast LM-head path of `rlhflab.models.logprobs` (the speed-up of DPO, SFT and PPO training):
same values and gradients as the plain full-logits computation, and the memory fallback taken when it must.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from rlhflab.losses.logprobs import gather_logprobs
from rlhflab.models import logprobs as forward
from rlhflab.models.logprobs import head_logps, token_logps


def _inputs(dtype=torch.float32, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(7, 5, generator=g, dtype=dtype).requires_grad_()
    w = torch.randn(11, 5, generator=g, dtype=dtype).requires_grad_()
    b = torch.randn(11, generator=g, dtype=dtype).requires_grad_() if bias else None
    y = torch.randint(0, 11, (7,), generator=g)
    return h, w, b, y


def _plain(h, w, b, y, temperature):
    return gather_logprobs((F.linear(h, w, b) / temperature)[None], y[None])[0]


def _grads(fn, h, w, b, y):
    out = fn(h, w, b, y)
    # Unequal weights per position, so a wrong row-to-label pairing in backward cannot cancel out.
    (out * torch.linspace(0.5, 2.0, len(out), dtype=out.dtype)).sum().backward()
    grads = [t.grad.clone() for t in (h, w, b) if t is not None]
    for t in (h, w, b):
        if t is not None:
            t.grad = None
    return out.detach(), grads


@pytest.mark.parametrize("temperature, bias, chunk", [(1.0, False, 1024), (0.7, True, 3), (1.3, True, 1)])
def test_head_logps_matches_full_logits(temperature, bias, chunk):
    h, w, b, y = _inputs(bias=bias)
    ours, ours_grads = _grads(
        lambda *a: head_logps(a[0], a[1], a[3], a[2], chunk_size=chunk, temperature=temperature), h, w, b, y
    )
    ref, ref_grads = _grads(lambda *a: _plain(*a, temperature), h, w, b, y)
    assert torch.allclose(ours, ref, atol=1e-5)
    for got, want in zip(ours_grads, ref_grads, strict=True):
        assert torch.allclose(got, want, atol=1e-5)


def test_head_logps_hand_worked():
    # One position, logits [0, ln 3] (two tokens): p = [1/4, 3/4]; label 1 -> log 3/4.
    h = torch.tensor([[1.0]], requires_grad=True)
    w = torch.tensor([[0.0], [torch.log(torch.tensor(3.0))]], requires_grad=True)
    out = head_logps(h, w, torch.tensor([1]))
    assert out.item() == pytest.approx(torch.log(torch.tensor(0.75)).item(), abs=1e-6)
    out.sum().backward()
    # d/dlogits = onehot - p = [-1/4, 1/4]; dW = that (x) h; dh = sum_v (onehot - p)_v W_v = ln3 / 4
    assert torch.allclose(w.grad, torch.tensor([[-0.25], [0.25]]))
    assert h.grad.item() == pytest.approx(torch.log(torch.tensor(3.0)).item() / 4, abs=1e-6)


def test_head_logps_gradcheck_float64():
    h, w, b, y = _inputs(dtype=torch.float64)
    assert torch.autograd.gradcheck(
        lambda h, w, b: head_logps(h, w, y, b, chunk_size=4, temperature=0.9), (h, w, b)
    )


def test_without_grad_and_over_budget_no_softmax_is_kept(monkeypatch):
    h, w, b, y = _inputs()
    calls = []
    monkeypatch.setattr(
        forward._HeadLogps, "apply", lambda *a: calls.append(a) or pytest.fail("kept softmax")
    )
    with torch.no_grad():
        out = head_logps(h, w, y, b, chunk_size=2, temperature=0.8)
        assert torch.allclose(out, _plain(h, w, b, y, 0.8), atol=1e-5) and not out.requires_grad
    monkeypatch.setattr(forward, "SAVED_PROBS_BYTES", 0)
    ours, ours_grads = _grads(lambda *a: head_logps(a[0], a[1], a[3], a[2]), h, w, b, y)
    ref, ref_grads = _grads(lambda *a: _plain(*a, 1.0), h, w, b, y)
    assert not calls and torch.allclose(ours, ref, atol=1e-5)
    assert all(torch.allclose(x, z, atol=1e-5) for x, z in zip(ours_grads, ref_grads, strict=True))


def test_token_logps_matches_the_model_forward(tiny_model):
    """Response positions only, padded rows: values and every parameter's gradient as from model(...).logits."""
    torch.manual_seed(0)
    ids = torch.randint(4, tiny_model.config.vocab_size, (3, 9))
    attn = torch.ones_like(ids)
    attn[1, 7:] = 0
    attn[2, 5:] = 0
    target = attn.bool() & (torch.arange(9) >= 4)
    weights = torch.linspace(0.5, 1.5, 8)

    ours = token_logps(tiny_model, ids, attn, target)
    (ours * weights).sum().backward()
    ours_grads = {n: p.grad.clone() for n, p in tiny_model.named_parameters()}
    tiny_model.zero_grad(set_to_none=True)

    logits = tiny_model(input_ids=ids, attention_mask=attn).logits[:, :-1]
    labels = ids[:, 1:].masked_fill(~target[:, 1:], -100)
    ref = gather_logprobs(logits, labels)
    (ref * weights).sum().backward()
    assert torch.allclose(ours, ref, atol=1e-5)
    assert (ours[~target[:, 1:]] == 0).all()
    for name, p in tiny_model.named_parameters():
        assert torch.allclose(ours_grads[name], p.grad, atol=1e-5), name


def test_head_logps_refuses_bad_settings():
    h, w, _, y = _inputs(bias=False)
    with pytest.raises(ValueError, match="chunk_size"):
        head_logps(h, w, y, chunk_size=0)
    with pytest.raises(ValueError, match="temperature"):
        head_logps(h, w, y, temperature=0.0)


# ---- The final layer computed only at the read positions (reward-model training) ---------------------------
