"""The PPO stage's wiring between a rollout and the pure functions of `rlhflab.losses`.

`rlhflab.losses` (kl.py, advantages.py, ppo.py) is tested on its own; these tests pin what the stage feeds
it, step by step, on a recorded rollout:

1. Steps 2-5 (`ppo._make_experience`): the missing-EOS penalty, the old and reference log-probs (this file
   computes them itself: a plain `model(...).logits` forward divided by the sampling temperature,
   log_softmax, gather), the values, `kl_shaped_rewards`, `gae` and `masked_whiten`, with every option of
   `algo` at a distinct non-default value (beta, the k3 estimator, gamma, lam), a reference that differs
   from the policy (KL != 0), a temperature != 1, and responses both with and without EOS.
2. Step 6 (`ppo._ppo_epochs`): one minibatch, one epoch; the parameter gradients the stage back-propagates
   versus those of pg + value_coef * vf + entropy_coef * entropy built by hand, after the policy has moved
   away from the rollout policy (ratios != 1, so the clip acts).
3. Around them: the adaptive KL coefficient of a real `ppo.train` run, gradient checkpointing of the policy
   the stage builds, the Llama 2 safety gate built from the config, and the critic's initialization from
   the reward model.
"""

from __future__ import annotations

import dataclasses
import json
import re

import pytest
import torch
from torch import nn
from torch.testing import assert_close

from rlhflab.losses.advantages import gae
from rlhflab.losses.kl import AdaptiveKLController, FixedKLController, kl_shaped_rewards
from rlhflab.losses.ppo import (
    entropy_bonus,
    ppo_policy_loss,
    ppo_value_loss,
    sampler_mismatch,
    truncated_importance_weights,
)
from rlhflab.losses.utils import masked_whiten
from rlhflab.models.heads import Critic, ValueHead
from rlhflab.models.reward_model import RewardModel
from rlhflab.rollout.generate import SamplingSettings, generate
from rlhflab.stages import ppo

from ..helpers import PPO_PROMPTS, perturb_, save_model_dir, stage_config, tiny_lm, write_jsonl

TOL = {"atol": 1e-5, "rtol": 1e-4}

PROMPTS = PPO_PROMPTS


# ---- fixtures and helpers ---------------------------------------------------------------------------------


class FixedScores:
    """A reward source whose scores depend only on the row: distinct, of both signs."""

    def score(self, prompts, responses):
        return torch.linspace(-1.0, 2.0, len(responses))


@pytest.fixture()
def ref_model_dir(tmp_path, tiny_tokenizer):
    """The fixtures' tiny model with every weight moved by seeded noise: a reference != the policy."""
    return save_model_dir(
        perturb_(tiny_lm(tiny_tokenizer), 0.05, seed=123), tiny_tokenizer, tmp_path / "ref-model"
    )


@pytest.fixture()
def rm_dir(tmp_path, tiny_tokenizer):
    """A reward model whose backbone is another tiny LM (seed 1): unlike the policy's in every weight."""
    rm = RewardModel.from_causal_lm(tiny_lm(tiny_tokenizer, seed=1))
    out = tmp_path / "rm"
    rm.save_pretrained(out, tiny_tokenizer)
    return out


@pytest.fixture()
def prompts_file(tmp_path):
    return write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": p} for p in PROMPTS])


def _cfg(model_dir, *extra, out=None, prompts=None):
    return stage_config("ppo", model_dir, *extra, data=prompts, out=out)


def _mixed_rollout(policy, tokenizer, cfg):
    """A rollout of PROMPTS sampled as the stage samples, with some rows ended by EOS and some cut off.

    The first sampling seed that gives both kinds is taken, so the test does not hang on one seed's luck.
    """
    settings = SamplingSettings(
        max_new_tokens=cfg.sampling.max_new_tokens, temperature=cfg.sampling.temperature
    )
    for seed in range(100):
        rollout = generate(policy, tokenizer, PROMPTS, settings, batch_size=len(PROMPTS), seed=seed)
        if 0 < int(rollout.ended_with_eos.sum()) < len(rollout):
            return rollout
    raise AssertionError("no sampling seed gave responses both with and without EOS")


def _sampled_token_logps(model, rollout, temperature):
    """(log-probs [B, R] of the sampled response tokens, scaled logits [B, R, V], final hidden [B, R, D]) at
    the positions that predict each response token: a plain forward, independent of the stage's code."""
    out = model(
        input_ids=rollout.input_ids,
        attention_mask=rollout.attention_mask,
        position_ids=rollout.position_ids,
        output_hidden_states=True,
    )
    s = rollout.response_start
    logits = out.logits[:, s - 1 : -1].float() / temperature
    logps = torch.log_softmax(logits, -1).gather(-1, rollout.response_ids[..., None]).squeeze(-1)
    return logps * rollout.response_mask, logits, out.hidden_states[-1][:, s - 1 : -1]


def _experience(cfg):
    """(policy, value model, reference, tokenizer, rollout, experience, metrics) through the stage."""
    policy, value_model, ref, tokenizer, _ = ppo._setup_models(cfg)
    rollout = _mixed_rollout(policy, tokenizer, cfg)
    exp, metrics = ppo._make_experience(
        policy, value_model, ref, FixedScores(), rollout, FixedKLController(cfg.algo.kl_coef), cfg, 1, None
    )
    return policy, value_model, ref, tokenizer, rollout, exp, metrics


# ---- steps 2-5: scores, log-probs, values, KL-shaped rewards, GAE, whitening ------------------------------

EXPERIENCE_OPTIONS = [
    "sampling.temperature=0.7",
    "sampling.max_new_tokens=4",
    "algo.kl_coef=0.3",
    "algo.kl_estimator=k3",
    "algo.gamma=0.9",
    "algo.lam=0.7",
    "algo.missing_eos_penalty=1.5",
    "algo.rollout_batch_size=16",
    "algo.minibatch_size=16",
]


@pytest.mark.parametrize("whiten", [True, False])
def test_experience_matches_the_pure_functions(tiny_model_dir, ref_model_dir, whiten):
    """Steps 2-5 equal the pure functions called by hand on independently computed log-probs and values:
    the EOS penalty is subtracted from cut-off responses only; policy and reference log-probs go to
    kl_shaped_rewards in that order with beta and the estimator; gae gets gamma and lam; the advantages
    are whitened exactly when whiten_advantages is set."""
    cfg = _cfg(
        tiny_model_dir,
        *EXPERIENCE_OPTIONS,
        f"ref_model={ref_model_dir}",
        f"algo.whiten_advantages={str(whiten).lower()}",
    )
    policy, value_model, ref, _, rollout, exp, metrics = _experience(cfg)
    assert isinstance(value_model, ValueHead)
    mask = rollout.response_mask

    with torch.no_grad():
        policy_logps, _, hidden = _sampled_token_logps(policy, rollout, 0.7)
        ref_logps, _, _ = _sampled_token_logps(ref, rollout, 0.7)
        values = value_model(hidden)
    raw = FixedScores().score(rollout.prompts, rollout.texts)
    scores = raw - 1.5 * (~rollout.ended_with_eos).float()
    shaped = kl_shaped_rewards(scores, policy_logps, ref_logps, mask, beta=0.3, estimator="k3")
    advantages, returns = gae(shaped.rewards, values, mask, gamma=0.9, lam=0.7)
    if whiten:
        advantages = masked_whiten(advantages, mask, shift_mean=True)

    # The set-up really exercises KL, the penalty and the discounting.
    assert (shaped.metrics["kl/sequence"] > 1e-3).all()
    assert 0 < int(rollout.ended_with_eos.sum()) < len(rollout)
    assert int(mask.sum(-1).min()) >= 2

    assert_close(exp["old_logps"][mask], policy_logps[mask], **TOL)
    assert_close(exp["ref_logps"][mask], ref_logps[mask], **TOL)
    assert_close(exp["old_values"][mask], values[mask], **TOL)
    assert_close(exp["scores"], raw)  # the logged score is the reward's own, before the EOS penalty
    assert_close(exp["seq_kl"], shaped.metrics["kl/sequence"], **TOL)
    assert_close(exp["returns"], returns, **TOL)
    assert_close(exp["advantages"], advantages, **TOL)
    assert metrics["kl/coef"] == pytest.approx(0.3)
    assert float(metrics["kl/sequence"]) == pytest.approx(
        float(shaped.metrics["kl/sequence"].mean()), rel=1e-4
    )
    assert float(metrics["reward/total"]) == pytest.approx(
        float(shaped.metrics["reward/total"].mean()), rel=1e-4, abs=1e-5
    )
    assert float(metrics["reward/score"]) == pytest.approx(float(raw.mean()), abs=1e-6)


def test_sampler_mismatch_is_logged_and_tis_weights_the_advantages(tiny_model_dir, ref_model_dir):
    """The HF engine's own log-probs of its tokens equal the trainer's (mismatch ~0 in float32); a sampler that
    disagrees (here: its log-probs shifted on purpose) shows in kl/sampler_mismatch_*, and with algo.tis_cap the
    whitened advantages are multiplied by min(exp(old - sampler), cap), token by token."""
    cfg = _cfg(tiny_model_dir, *EXPERIENCE_OPTIONS, f"ref_model={ref_model_dir}")
    policy, value_model, ref, tokenizer, rollout, exp, metrics = _experience(cfg)
    mask = rollout.response_mask
    assert float(metrics["kl/sampler_mismatch_max"]) < 1e-4
    assert float(metrics["kl/sampler_mismatch_mean"]) < 1e-5

    shift = torch.linspace(-0.6, 0.6, mask.shape[1]).expand_as(rollout.sampler_logps)
    off = dataclasses.replace(rollout, sampler_logps=rollout.sampler_logps + shift * mask)
    tis = _cfg(tiny_model_dir, *EXPERIENCE_OPTIONS, f"ref_model={ref_model_dir}", "algo.tis_cap=1.3")
    for c, weighted in ((cfg, False), (tis, True)):
        got, m = ppo._make_experience(
            policy, value_model, ref, FixedScores(), off, FixedKLController(c.algo.kl_coef), c, 1, None
        )
        expected = sampler_mismatch(exp["old_logps"], off.sampler_logps, mask)
        for k, v in expected.items():
            assert float(m[k]) == pytest.approx(float(v), rel=1e-4, abs=1e-5), k
        assert float(m["kl/sampler_mismatch_max"]) > 0.3
        w = truncated_importance_weights(exp["old_logps"], off.sampler_logps, mask, 1.3)
        assert float(w[mask].min()) < 0.7 and float(w[mask].max()) == pytest.approx(
            1.3
        )  # both sides exercised
        assert_close(got["advantages"], exp["advantages"] * w if weighted else exp["advantages"], **TOL)
        assert_close(got["returns"], exp["returns"], **TOL)  # the critic's targets are not weighted


# ---- step 6: the PPO update -----------------------------------------------------------------------------

UPDATE_OPTIONS = [
    "algo.ppo_epochs=1",
    "algo.clip_eps=0.05",
    "algo.value_clip_eps=0.01",
    "algo.value_coef=0.37",
    "algo.entropy_coef=0.05",
    "optim.max_grad_norm=0",
]


def test_ppo_update_backpropagates_the_hand_built_loss(tiny_model_dir, ref_model_dir, monkeypatch):
    """One minibatch of step 6 back-propagates exactly pg + value_coef * vf + entropy_coef * entropy_bonus,
    with clip_eps and value_clip_eps passed: the gradient of every parameter and the logged losses equal
    those of the loss built by hand from the same models in the same state."""
    cfg = _cfg(tiny_model_dir, *EXPERIENCE_OPTIONS, *UPDATE_OPTIONS, f"ref_model={ref_model_dir}")
    policy, value_model, _, _, rollout, exp, _ = _experience(cfg)
    # As after earlier minibatches: the policy and value head moved away from the rollout policy.
    perturb_(policy, 0.02, seed=7)
    perturb_(value_model, 0.05, seed=8)
    params = nn.ModuleDict({"policy": policy, "value": value_model})

    grads: list[dict[str, torch.Tensor]] = []

    def record_gradients(optimizer, scheduler):  # instead of stepping: the weights stay as they are
        grads.append({n: p.grad.clone() for n, p in params.named_parameters() if p.grad is not None})
        params.zero_grad(set_to_none=True)

    monkeypatch.setattr(ppo, "optimizer_step", record_gradients)
    logged = ppo._ppo_epochs(policy, value_model, params, None, None, rollout, exp, cfg, 1, None)
    assert len(grads) == 1

    mask = rollout.response_mask
    logps, logits, hidden = _sampled_token_logps(policy, rollout, 0.7)
    entropy = -(torch.softmax(logits, -1) * torch.log_softmax(logits, -1)).sum(-1)
    pg = ppo_policy_loss(logps, exp["old_logps"], exp["advantages"], mask, clip_eps=0.05)
    vf = ppo_value_loss(value_model(hidden), exp["old_values"], exp["returns"], mask, clip_eps_value=0.01)
    ent = entropy_bonus(entropy, mask)
    loss = pg.loss.mean() + 0.37 * vf.loss.mean() + 0.05 * ent.loss.mean()
    # Both clips act on some tokens and not on others, so a dropped or changed clip shows.
    assert 0.05 < float(pg.metrics["loss/clipfrac"].mean()) < 0.95
    assert 0.05 < float(vf.metrics["loss/value_clipfrac"].mean()) < 0.95
    loss.backward()
    expected = {n: p.grad for n, p in params.named_parameters() if p.grad is not None}

    assert grads[0].keys() == expected.keys()
    for name, grad in expected.items():
        assert_close(grads[0][name], grad, atol=1e-6, rtol=1e-4, msg=lambda m, name=name: f"{name}: {m}")
    assert logged["loss/policy"] == pytest.approx(pg.loss.mean().item(), rel=1e-5, abs=1e-7)
    assert logged["loss/value"] == pytest.approx(vf.loss.mean().item(), rel=1e-5, abs=1e-7)
    assert logged["loss/total"] == pytest.approx(loss.item(), rel=1e-5, abs=1e-7)


# ---- step 7: the adaptive KL coefficient in a real run ---------------------------------------------------


@pytest.mark.parametrize("target_kl, direction", [(1e-4, "up"), (1e3, "down")])
def test_adaptive_kl_coefficient_follows_the_controller(
    tiny_model_dir, ref_model_dir, prompts_file, tmp_path, target_kl, direction
):
    """In `ppo.train`, beta rises while the sequence KL is above target_kl and falls while below, each
    iteration by AdaptiveKLController's rule on the logged KL with n_steps = rollout_batch_size; the logged
    kl/coef is the beta that shaped that iteration's rewards."""
    out = tmp_path / "run"
    cfg = _cfg(
        tiny_model_dir,
        f"ref_model={ref_model_dir}",
        "algo.adaptive_kl=true",
        "algo.kl_coef=0.2",
        f"algo.target_kl={target_kl}",
        "algo.kl_horizon=40",
        "algo.kl_estimator=k3",
        "algo.iterations=3",
        "algo.rollout_batch_size=8",
        "algo.minibatch_size=8",
        "algo.ppo_epochs=1",
        "sampling.max_new_tokens=4",
        "optim.lr=1e-3",
        out=out,
        prompts=prompts_file,
    )
    ppo.train(cfg, reward=FixedScores())
    rows = [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "kl/coef" in r]
    assert len(rows) == 3

    controller = AdaptiveKLController(0.2, target_kl, 40)
    for row in rows:
        assert row["kl/sequence"] > 0  # k3 against a reference != the policy
        assert row["kl/coef"] == pytest.approx(controller.value, rel=1e-6)
        controller.update(row["kl/sequence"], 8)
    coefs = [row["kl/coef"] for row in rows]
    if direction == "up":
        assert coefs == sorted(coefs) and coefs[-1] == pytest.approx(0.2 * 1.04**2, rel=1e-6)
    else:
        assert coefs == sorted(coefs, reverse=True) and coefs[-1] == pytest.approx(0.2 * 0.96**2, rel=1e-6)


# ---- gradient checkpointing ------------------------------------------------------------------------------


@pytest.mark.parametrize("checkpointing", [True, False])
def test_gradient_checkpointing_recomputes_the_policy_in_the_update(
    tiny_model_dir, ref_model_dir, monkeypatch, checkpointing
):
    """With model.gradient_checkpointing=true the policy `_setup_models` builds recomputes its decoder
    layers in the backward of the PPO update (each layer runs twice per minibatch, once without it)."""
    cfg = _cfg(
        tiny_model_dir,
        *EXPERIENCE_OPTIONS,
        "algo.ppo_epochs=1",
        f"ref_model={ref_model_dir}",
        f"model.gradient_checkpointing={str(checkpointing).lower()}",
    )
    policy, value_model, _, _, rollout, exp, _ = _experience(cfg)
    layers = policy.model.layers
    assert [bool(getattr(layer, "gradient_checkpointing", False)) for layer in layers] == [
        checkpointing
    ] * len(layers)
    calls = [0] * len(layers)
    for i, layer in enumerate(layers):
        # A pre-hook: non-reentrant checkpointing stops the recomputation once the saved tensors are rebuilt,
        # before the MLP's forward hooks would run.
        layer.mlp.register_forward_pre_hook(lambda *_, i=i: calls.__setitem__(i, calls[i] + 1))
    params = nn.ModuleDict({"policy": policy, "value": value_model})
    grad_norms = []

    def record(optimizer, scheduler):
        grad_norms.append(float(sum(p.grad.norm() for p in params.parameters() if p.grad is not None)))
        params.zero_grad(set_to_none=True)

    monkeypatch.setattr(ppo, "optimizer_step", record)
    ppo._ppo_epochs(policy, value_model, params, None, None, rollout, exp, cfg, 1, None)
    assert calls == [2 if checkpointing else 1] * len(layers)
    assert len(grad_norms) == 1 and grad_norms[0] > 0  # the recomputed graph still reaches the weights


# ---- the Llama 2 safety gate from the config -------------------------------------------------------------

GATE_OPTIONS = [
    "algo.reward_model=rule:length:coef=0.5,rule:regex:pattern=hate:mode=must_not:penalty=2",
    "algo.reward_combine=llama2_gate",
    "algo.unsafe_prompt_pattern=you hate|kill",
    "algo.safety_threshold=0.1",
]


def _gated(prompts, responses):
    """Llama 2's gate by hand: helpfulness = -0.5 * words, safety = -2 if 'hate' in the response else 0;
    sigmoid(-2) = 0.12 is above the 0.1 threshold, so only the prompt pattern routes to safety; then
    whitened over the batch (unbiased std)."""
    out = []
    for p, r in zip(prompts, responses):
        flagged = re.search("you hate|kill", p, re.IGNORECASE) is not None
        out.append((-2.0 if "hate" in r else 0.0) if flagged else -0.5 * len(r.split()))
    x = torch.tensor(out, dtype=torch.float64)
    return ((x - x.mean()) / x.std()).float()


def test_llama2_gate_routes_flagged_prompts_to_the_safety_score(tiny_model_dir):
    """The reward the stage builds from the config sends prompts matching unsafe_prompt_pattern (any case)
    to the safety score (the second source), the others to helpfulness (the first), with the config's
    safety_threshold, then whitens: exact values."""
    cfg = _cfg(tiny_model_dir, *GATE_OPTIONS)
    reward = ppo._load_reward(cfg, torch.device("cpu"))
    prompts = ["you hate the film", "the cat sat", "YOU HATE dogs", "the day was", "i kill time"]
    responses = ["the cat is good", "i hate it", "hate hate", "very good day .", "no"]
    scores = reward.score(prompts, responses)
    # flagged -> safety: 0, -2, 0; unflagged -> helpfulness: -1.5 (its 'hate' is not gated at 0.1), -2.
    expected = torch.tensor([0.0, -1.5, -2.0, -2.0, 0.0])
    assert_close(scores, ((expected - expected.mean()) / expected.std()), atol=1e-5, rtol=1e-5)
    assert_close(scores, _gated(prompts, responses), atol=1e-5, rtol=1e-5)


def test_ppo_train_scores_rollouts_with_the_configured_gate(tiny_model_dir, prompts_file, tmp_path):
    """`ppo.train` without a reward object scores every rollout with the configured gate: the scores in
    RUN/rollouts.jsonl equal the gate computed by hand on the logged prompts and responses."""
    out = tmp_path / "run"
    cfg = _cfg(
        tiny_model_dir,
        *GATE_OPTIONS,
        "algo.iterations=1",
        "algo.rollout_batch_size=16",
        "algo.minibatch_size=16",
        "algo.ppo_epochs=1",
        "sampling.max_new_tokens=4",
        out=out,
        prompts=prompts_file,
    )
    ppo.train(cfg)
    lines = [json.loads(line) for line in (out / "rollouts.jsonl").read_text().splitlines()]
    assert len(lines) == 16 and sum(re.search("you hate", r["prompt"]) is not None for r in lines) == 1
    logged = torch.tensor([r["score"] for r in lines])
    assert_close(
        logged, _gated([r["prompt"] for r in lines], [r["response"] for r in lines]), atol=1e-5, rtol=1e-5
    )


# ---- the separate critic -------------------------------------------------------------------------------


def _assert_critic_from_rm(value_model, rm_path, policy):
    assert isinstance(value_model, Critic)
    rm = RewardModel.from_pretrained(rm_path)
    critic_state, rm_state = value_model.backbone.state_dict(), rm.backbone.state_dict()
    assert critic_state.keys() == rm_state.keys()
    for key, value in rm_state.items():
        assert torch.equal(critic_state[key], value), key
    assert_close(value_model.value_head.linear.weight, rm.score.weight[:1])
    # The RM's backbone is not the policy's, so equality above cannot come from the policy.
    embed = policy.model.embed_tokens.weight
    assert not torch.equal(critic_state["embed_tokens.weight"], embed)


@pytest.mark.parametrize("spec", ["{rm}", "{rm},rule:length"])
def test_separate_critic_starts_from_the_reward_model(tiny_model_dir, rm_dir, spec):
    """algo.separate_critic=true: the critic's backbone is the reward model's, weight for weight, and its
    value head is the reward head (InstructGPT), also when the RM is the first of several sources."""
    cfg = _cfg(tiny_model_dir, f"algo.reward_model={spec.format(rm=rm_dir)}", "algo.separate_critic=true")
    policy, value_model, _, _, _ = ppo._setup_models(cfg)
    _assert_critic_from_rm(value_model, rm_dir, policy)


@pytest.mark.parametrize("options", [":head=0", ":normalize=true"])
def test_separate_critic_starts_from_a_reward_spec_with_options(tiny_model_dir, rm_dir, options):
    """A reward spec with options ('DIR:head=0') still names the reward model directory DIR: the critic
    must start from it, not silently from the policy (taking the whole spec string as the directory finds
    no model there, and the critic would fall back to the policy)."""
    cfg = _cfg(
        tiny_model_dir, f"algo.reward_model={rm_dir}{options},rule:length", "algo.separate_critic=true"
    )
    policy, value_model, _, _, _ = ppo._setup_models(cfg)
    _assert_critic_from_rm(value_model, rm_dir, policy)
