import pytest
import torch

from rlhflab.errors import ConfigError
from rlhflab.rollout import Rollout, SamplingSettings, encode_prompts, generate

from ..helpers import tiny_lm

PROMPTS = ["the cat sat on", "hello", "what is the dog", "i love this film and it was a good day"]


def _greedy_reference(model, tokenizer, prompt_ids, max_new_tokens):
    """One prompt, no padding, no cache: the argmax continuation by full forward passes."""
    ids = list(prompt_ids)
    out = []
    for _ in range(max_new_tokens):
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ids])).logits[0, -1]
        tok = int(logits.argmax())
        out.append(tok)
        ids.append(tok)
        if tok == tokenizer.eos_token_id:
            break
    return out


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_batched_left_padded_greedy_matches_one_by_one(tiny_tokenizer, arch):
    model = tiny_lm(tiny_tokenizer, arch=arch, seed=1).eval()
    settings = SamplingSettings(max_new_tokens=8, do_sample=False)
    out = generate(model, tiny_tokenizer, PROMPTS, settings, batch_size=3)
    rows = encode_prompts(tiny_tokenizer, PROMPTS)
    for i, ids in enumerate(rows):
        expected = _greedy_reference(model, tiny_tokenizer, ids, 8)
        got = out.response_ids[i][out.response_mask[i]].tolist()
        assert got == expected, (arch, i)


def test_rollout_layout(tiny_tokenizer, tiny_model):
    pad, eos = tiny_tokenizer.pad_token_id, tiny_tokenizer.eos_token_id
    # Make EOS likely (its tied embedding row is the LM head row) so some rows stop early and others
    # run to the limit.
    with torch.no_grad():
        tiny_model.model.embed_tokens.weight[eos] *= 4.0
    out = generate(
        tiny_model, tiny_tokenizer, PROMPTS * 8, SamplingSettings(max_new_tokens=6), batch_size=5, seed=0
    )
    assert isinstance(out, Rollout) and len(out) == 32
    B, P = out.prompt_ids.shape
    R = out.response_ids.shape[1]
    assert out.response_start == P and out.input_ids.shape == (B, P + R) and R <= 6
    assert out.attention_mask.dtype == torch.long
    assert torch.equal(out.attention_mask.bool(), torch.cat([out.prompt_mask, out.response_mask], 1))
    for i, ids in enumerate(encode_prompts(tiny_tokenizer, PROMPTS * 8)):
        n = len(ids)
        assert out.prompt_ids[i, P - n :].tolist() == ids and not out.prompt_mask[i, : P - n].any()
        assert (out.prompt_ids[i, : P - n] == pad).all()
        real = out.response_mask[i]
        k = int(real.sum())
        assert real[:k].all() and not real[k:].any()  # a prefix
        resp = out.response_ids[i]
        eos_pos = (resp == eos).nonzero().flatten().tolist()
        assert bool(out.ended_with_eos[i]) == bool(eos_pos)
        if eos_pos:
            assert k == eos_pos[0] + 1  # the EOS counts as real
        else:
            assert k == R == 6
        assert (resp[k:] == pad).all()
        assert out.texts[i] == tiny_tokenizer.decode(resp[:k], skip_special_tokens=True).strip()
        # Positions restart at the first real token, as generate used them.
        assert out.position_ids[i, P - n : P].tolist() == list(range(n))
    assert out.ended_with_eos.any() and not out.ended_with_eos.all()
    assert torch.equal(out.response_lengths, out.response_mask.sum(-1))


def test_sampling_is_seeded_and_ignores_the_models_generation_config(tiny_tokenizer, tiny_model):
    settings = SamplingSettings(max_new_tokens=5)
    a = generate(tiny_model, tiny_tokenizer, PROMPTS * 4, settings, seed=1)
    b = generate(tiny_model, tiny_tokenizer, PROMPTS * 4, settings, seed=1)
    c = generate(tiny_model, tiny_tokenizer, PROMPTS * 4, settings, seed=2)
    assert torch.equal(a.response_ids, b.response_ids) and not torch.equal(a.response_ids, c.response_ids)
    # Without a seed, consecutive calls draw fresh samples from the global RNG, and a seeded call leaves
    # that RNG where it was.
    torch.manual_seed(0)
    first = generate(tiny_model, tiny_tokenizer, PROMPTS * 4, settings)
    state = torch.get_rng_state()
    generate(tiny_model, tiny_tokenizer, PROMPTS * 4, settings, seed=3)
    assert torch.equal(torch.get_rng_state(), state)
    second = generate(tiny_model, tiny_tokenizer, PROMPTS * 4, settings)
    assert not torch.equal(first.response_ids, second.response_ids)
    # A model shipped with near-greedy defaults must not change what these settings sample.
    tiny_model.generation_config.top_k = 1
    tiny_model.generation_config.temperature = 0.01
    d = generate(tiny_model, tiny_tokenizer, PROMPTS * 4, settings, seed=1)
    assert torch.equal(a.response_ids, d.response_ids)


def test_first_token_frequencies_follow_the_model(tiny_tokenizer, tiny_model):
    prompt = "the cat"
    n = 3000
    out = generate(
        tiny_model, tiny_tokenizer, [prompt] * n, SamplingSettings(max_new_tokens=1), batch_size=1000, seed=0
    )
    ids = torch.tensor([encode_prompts(tiny_tokenizer, [prompt])[0]])
    with torch.no_grad():
        probs = torch.softmax(tiny_model(input_ids=ids).logits[0, -1], -1)
    freq = torch.bincount(out.response_ids[:, 0], minlength=probs.numel()).float() / n
    assert (freq - probs).abs().max() < 4 * (0.25 / n) ** 0.5
    # With top_k = 1 sampling becomes greedy.
    top1 = generate(
        tiny_model, tiny_tokenizer, [prompt] * 50, SamplingSettings(max_new_tokens=1, top_k=1), seed=0
    )
    assert (top1.response_ids[:, 0] == probs.argmax()).all()


def test_prompt_forms(tiny_tokenizer, tiny_model):
    chat = [{"role": "user", "content": "hello"}]
    ids = encode_prompts(tiny_tokenizer, ["hello", chat, [5, 6, 7], torch.tensor([8, 9])])
    assert ids[0] == tiny_tokenizer("hello")["input_ids"]
    user, assistant = tiny_tokenizer.convert_tokens_to_ids(["<|user|>", "<|assistant|>"])
    assert ids[1][0] == user and ids[1][-1] == assistant
    assert ids[2] == [5, 6, 7] and ids[3] == [8, 9]
    out = generate(tiny_model, tiny_tokenizer, [chat, "hello"], SamplingSettings(max_new_tokens=3), seed=0)
    assert out.prompts == [chat, "hello"]
    with pytest.raises(ConfigError):
        generate(tiny_model, tiny_tokenizer, [], SamplingSettings())


def test_model_mode_is_restored(tiny_tokenizer, tiny_model):
    tiny_model.train()
    generate(tiny_model, tiny_tokenizer, ["hello"], SamplingSettings(max_new_tokens=2))
    assert tiny_model.training


@pytest.mark.parametrize(
    "kwargs", [{"max_new_tokens": 0}, {"temperature": 0.0}, {"top_k": -1}, {"top_p": 0.0}, {"top_p": 1.5}]
)
def test_settings_validation(kwargs):
    with pytest.raises(ConfigError):
        SamplingSettings(**kwargs)


def test_a_long_prompt_keeps_its_last_tokens(tiny_tokenizer, tiny_model):
    """max_prompt_tokens cuts each prompt to its end (where the request is); short prompts are untouched,
    and the rollout still carries the prompts as given (reward sources score them)."""
    long_prompt, short_prompt = "the cat sat on the mat and the dog is very happy", "hi"
    ids = encode_prompts(tiny_tokenizer, [long_prompt, short_prompt])
    out = generate(
        tiny_model,
        tiny_tokenizer,
        [long_prompt, short_prompt],
        SamplingSettings(max_new_tokens=3),
        seed=0,
        max_prompt_tokens=4,
    )
    kept = [row[mask].tolist() for row, mask in zip(out.prompt_ids, out.prompt_mask)]
    assert len(ids[0]) > 4 and kept[0] == ids[0][-4:]
    assert kept[1] == ids[1][-4:] and len(ids[1]) <= 4
    assert out.prompts == [long_prompt, short_prompt]


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_rollout_entropy_is_the_sampling_distributions_at_each_response_token(tiny_tokenizer, arch):
    """Recorded while sampling (no second pass): the entropy of softmax(logits / T) of the model's full
    distribution at each response token, T = 0.7 and top-k 5 (the truncation is not part of it), 0 past the
    response; checked against a plain forward pass over the sampled rows."""
    model = tiny_lm(tiny_tokenizer, arch=arch, seed=2).eval()
    settings = SamplingSettings(max_new_tokens=6, temperature=0.7, top_k=5)
    out = generate(model, tiny_tokenizer, PROMPTS * 2, settings, batch_size=3, seed=0)
    with torch.no_grad():
        logits = model(
            input_ids=out.input_ids, attention_mask=out.attention_mask, position_ids=out.position_ids
        ).logits[:, out.response_start - 1 : -1]
    logp = torch.log_softmax(logits.float() / 0.7, dim=-1)
    expected = -(logp.exp() * logp).sum(-1)
    mask = out.response_mask
    assert out.entropy.shape == mask.shape and bool((out.entropy[~mask] == 0).all())
    torch.testing.assert_close(out.entropy[mask], expected[mask], rtol=1e-4, atol=1e-4)
    assert out.mean_entropy() == pytest.approx(float(expected[mask].mean()), rel=1e-4)
    # The recorder changes no score: the same seed samples the same tokens as before it existed would, i.e.
    # as a second identical call does, and selecting rows keeps their entropies.
    again = generate(model, tiny_tokenizer, PROMPTS * 2, settings, batch_size=3, seed=0)
    assert torch.equal(again.response_ids, out.response_ids)
    idx = torch.tensor([3, 0])
    assert torch.equal(out.select(idx).entropy, out.entropy[idx])


def test_suppressed_tokens_are_never_sampled(tiny_tokenizer, tiny_model):
    settings = SamplingSettings(max_new_tokens=6, do_sample=False)
    greedy = generate(tiny_model, tiny_tokenizer, PROMPTS, settings)
    first = sorted({int(t) for t in greedy.response_ids[:, 0]})  # every row's greedy first token
    blocked = generate(
        tiny_model,
        tiny_tokenizer,
        PROMPTS,
        SamplingSettings(6, do_sample=False, suppress_token_ids=tuple(first)),
    )
    assert not torch.isin(blocked.response_ids[blocked.response_mask], torch.tensor(first)).any()
    sampled = generate(
        tiny_model, tiny_tokenizer, PROMPTS * 8, SamplingSettings(6, suppress_token_ids=tuple(first)), seed=0
    )
    assert not torch.isin(sampled.response_ids[sampled.response_mask], torch.tensor(first)).any()
    with pytest.raises(ConfigError, match="suppress_token_ids"):
        SamplingSettings(suppress_token_ids=(-1,))


def test_with_prompts_keeps_the_responses_behind_other_prompts(tiny_tokenizer, tiny_model):
    out = generate(tiny_model, tiny_tokenizer, PROMPTS, SamplingSettings(max_new_tokens=4), seed=0)
    rows = [[5, 6, 7], [8], [9, 10], [11, 12, 13, 14, 15, 16, 17, 18, 19, 20]]
    moved = out.with_prompts(rows, tiny_tokenizer.pad_token_id)
    assert moved.response_start == 10 and torch.equal(moved.response_ids, out.response_ids)
    assert torch.equal(moved.response_mask, out.response_mask) and moved.texts == out.texts
    for i, r in enumerate(rows):
        assert moved.prompt_ids[i][moved.prompt_mask[i]].tolist() == r
        assert not moved.prompt_mask[i, : 10 - len(r)].any()  # left-padded
    # The model reads the same response tokens at the new positions: each row's positions start at its prompt.
    assert moved.position_ids[1, 9].item() == 0 and moved.position_ids[1, 10].item() == 1
    with pytest.raises(ConfigError, match="one prompt per row"):
        out.with_prompts(rows[:2], tiny_tokenizer.pad_token_id)


@pytest.mark.parametrize("row_seeded", [False, True])
def test_sampler_logps_are_the_sampled_tokens_log_probs(tiny_tokenizer, row_seeded):
    """Recorded while sampling: log softmax(logits / T) of each sampled token, 0 past the response; the same as a
    plain forward pass over the sampled rows to float32 rounding (the mismatch a trainer measures, ~0 here)."""
    model = tiny_lm(tiny_tokenizer, arch="llama", seed=3).eval()
    settings = SamplingSettings(max_new_tokens=6, temperature=0.7, top_k=5)
    seeds = list(range(8)) if row_seeded else None
    out = generate(model, tiny_tokenizer, PROMPTS * 2, settings, batch_size=3, seed=0, row_seeds=seeds)
    with torch.no_grad():
        logits = model(
            input_ids=out.input_ids, attention_mask=out.attention_mask, position_ids=out.position_ids
        ).logits[:, out.response_start - 1 : -1]
    expected = torch.log_softmax(logits.float() / 0.7, -1).gather(-1, out.response_ids[..., None])[..., 0]
    mask = out.response_mask
    assert out.sampler_logps.shape == mask.shape and bool((out.sampler_logps[~mask] == 0).all())
    torch.testing.assert_close(out.sampler_logps[mask], expected[mask], rtol=1e-4, atol=1e-4)
    assert float(out.sampler_logps[mask].min()) < -0.05  # real log-probs, not zeros
    idx = torch.tensor([5, 1])
    assert torch.equal(out.select(idx).sampler_logps, out.sampler_logps[idx])


def test_row_seeded_samples_do_not_depend_on_the_batch(tiny_tokenizer, tiny_model):
    """A row's response depends on its seed and prompt only: the same rows in another batch split, another
    order and beside other rows come out the same; another seed gives another sample."""
    settings = SamplingSettings(max_new_tokens=8, temperature=1.3)
    prompts = PROMPTS * 2
    seeds = [100 + i for i in range(len(prompts))]
    whole = generate(tiny_model, tiny_tokenizer, prompts, settings, batch_size=8, row_seeds=seeds)
    odd = [1, 3, 5, 7]
    part = generate(
        tiny_model, tiny_tokenizer, [prompts[i] for i in odd[::-1]], settings, batch_size=3,
        row_seeds=[seeds[i] for i in odd[::-1]],
    )  # fmt: skip
    assert part.texts == [whole.texts[i] for i in odd[::-1]]
    # rows 0 and 4 share a prompt but not a seed: different streams
    assert whole.texts[0] != whole.texts[4]
    other = generate(tiny_model, tiny_tokenizer, prompts, settings, row_seeds=[s + 1000 for s in seeds])
    assert other.texts != whole.texts
    with pytest.raises(ConfigError, match="row seeds"):
        generate(tiny_model, tiny_tokenizer, prompts, settings, row_seeds=seeds[:3])


def test_row_seeded_first_token_frequencies_follow_the_warped_model(tiny_tokenizer, tiny_model):
    """Gumbel-max with the warpers: frequencies match softmax(logits / T) restricted to the top k."""
    prompt, n, k = "the cat", 3000, 4
    settings = SamplingSettings(max_new_tokens=1, temperature=1.5, top_k=k)
    out = generate(tiny_model, tiny_tokenizer, [prompt] * n, settings, batch_size=1000, row_seeds=range(n))
    ids = torch.tensor([encode_prompts(tiny_tokenizer, [prompt])[0]])
    with torch.no_grad():
        logits = tiny_model(input_ids=ids).logits[0, -1] / 1.5
    top = logits.topk(k).indices
    probs = torch.zeros_like(logits)
    probs[top] = torch.softmax(logits[top], -1)
    freq = torch.bincount(out.response_ids[:, 0], minlength=probs.numel()).float() / n
    assert set(out.response_ids[:, 0].tolist()) <= set(top.tolist())
    assert (freq - probs).abs().max() < 4 * (0.25 / n) ** 0.5


def test_the_row_sampler_draws_from_the_warped_softmax():
    """The Gumbel-max processor on hand-made logits: argmax of its output over many rows (one generator each)
    lands on each token with probability softmax(logits / T) restricted to the top k; top-k's excluded tokens
    never win. (With the noise subtracted instead of added, the most likely token wins about 0.54 of the time
    here, not 0.47.)"""
    from rlhflab.rollout.generate import _RowSampler

    n = 20_000
    logits = torch.tensor([3.0, 1.5, 0.75, 0.0, -5.0])
    sampler = _RowSampler(SamplingSettings(temperature=1.5, top_k=4), row_seeds=range(n))
    out = sampler(torch.zeros(n, 1, dtype=torch.long), logits.expand(n, -1).clone())
    freq = torch.bincount(out.argmax(-1), minlength=5).float() / n
    expected = torch.softmax(logits[:4] / 1.5, -1)
    assert freq[4] == 0 and (freq[:4] - expected).abs().max() < 4 * (0.25 / n) ** 0.5
