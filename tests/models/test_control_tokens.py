"""Control tokens: how everything that samples a model finds a quark model's best token and blocks the rest."""

from __future__ import annotations

import torch

from rlhflab.models.control_tokens import Conditioning, condition_prompts, conditioning_of
from rlhflab.rollout.generate import SamplingSettings, generate


def test_conditioning_of_a_quark_model_and_of_any_other(quark_model_dir, tiny_model_dir):
    path, _, tokenizer, tokens = quark_model_dir
    cond = conditioning_of(path)
    assert cond == Conditioning(tokens.ids[-1], tuple(tokens.ids))
    assert tokenizer.decode([cond.token_id]) == "<|reward_1|>"
    assert conditioning_of(tiny_model_dir) is None


def test_condition_prompts_puts_the_token_first_and_blocks_every_control_token(quark_model_dir):
    _, _, tokenizer, tokens = quark_model_dir
    settings = SamplingSettings(max_new_tokens=5, temperature=0.7)
    prompts = ["the cat", "i say"]
    assert condition_prompts(None, tokenizer, prompts, settings) == (prompts, settings)
    ids, conditioned = condition_prompts(
        Conditioning(tokens.ids[1], tuple(tokens.ids)), tokenizer, prompts, settings
    )
    plain = [tokenizer(p, add_special_tokens=True)["input_ids"] for p in prompts]
    bos = tokenizer.bos_token_id
    # After the BOS when the tokenizer writes one, else first.
    assert ids == [([bos, tokens.ids[1], *p[1:]] if p[:1] == [bos] else [tokens.ids[1], *p]) for p in plain]
    assert conditioned.suppress_token_ids == tuple(tokens.ids)
    assert (conditioned.temperature, conditioned.max_new_tokens) == (0.7, 5)


def test_a_sampler_that_conditions_never_writes_a_control_token(quark_model_dir):
    _, model, tokenizer, tokens = quark_model_dir
    prompts = ["the cat", "the dog", "i say"] * 4
    ids, settings = condition_prompts(
        Conditioning(tokens.ids[-1], tuple(tokens.ids)), tokenizer, prompts, SamplingSettings(6)
    )
    blocked = generate(model, tokenizer, ids, settings, seed=0)
    unblocked = generate(model, tokenizer, ids, SamplingSettings(6), seed=0)
    ctl = torch.tensor(tokens.ids)
    assert not torch.isin(blocked.response_ids[blocked.response_mask], ctl).any()
    assert torch.isin(unblocked.response_ids[unblocked.response_mask], ctl).any()  # the fixture's boost works


def test_the_stage_module_reexports_the_same_objects():
    from rlhflab.models import control_tokens
    from rlhflab.stages import quark

    assert quark.read_control_tokens is control_tokens.read_control_tokens
    assert quark.best_token_prompts is control_tokens.best_token_prompts
