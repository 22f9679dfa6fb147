"""What `rlhflab label push` samples: K distinct responses per prompt from a policy directory."""

from __future__ import annotations

import torch

from rlhflab.label.push import sample_items
from rlhflab.models.control_tokens import Conditioning, condition_prompts
from rlhflab.rollout.generate import SamplingSettings


def test_a_quark_policy_is_sampled_behind_its_best_token(quark_model_dir, tiny_model_dir, monkeypatch):
    """The sampler is asked for the prompts behind the best reward token with every control token blocked, the
    items hold its responses with the plain prompts, and the meta names the token; a plain model: plain prompts."""
    import sys

    G = sys.modules["rlhflab.rollout.generate"]  # the package exports a function of the same name
    calls = []

    def recording(model, tokenizer, prompts, settings, **kw):
        calls.append((list(prompts), settings))
        return real(model, tokenizer, prompts, settings, **kw)

    real = G.generate
    monkeypatch.setattr(G, "generate", recording)
    path, model, tokenizer, tokens = quark_model_dir
    prompts = ["the cat", "the dog", "i say"]
    settings = SamplingSettings(max_new_tokens=6)
    items, left_out = sample_items(path, prompts, 2, settings, seed=3, retries=0)
    ids, blocked = condition_prompts(
        Conditioning(tokens.ids[-1], tuple(tokens.ids)),
        tokenizer,
        [p for p in prompts for _ in range(2)],
        settings,
    )
    assert calls == [(ids, blocked)] and blocked.suppress_token_ids == tuple(tokens.ids)
    by_hand = real(model, tokenizer, ids, blocked, seed=3)
    assert not torch.isin(by_hand.response_ids[by_hand.response_mask], torch.tensor(tokens.ids)).any()
    texts = by_hand.texts
    kept = [i for i in range(3) if len(set(texts[2 * i : 2 * i + 2])) == 2 and all(texts[2 * i : 2 * i + 2])]
    assert left_out == 3 - len(kept) and kept
    assert [it["prompt"] for it in items] == [prompts[i] for i in kept]
    assert [it["responses"] for it in items] == [texts[2 * i : 2 * i + 2] for i in kept]
    assert all(it["meta"]["control_token"] == "<|reward_1|>" for it in items)
    calls.clear()
    plain_items, _ = sample_items(tiny_model_dir, prompts, 2, settings, seed=3, retries=0)
    assert calls == [([p for p in prompts for _ in range(2)], settings)]
    assert all("control_token" not in it["meta"] for it in plain_items)
