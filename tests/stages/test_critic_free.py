"""RLOO / REINFORCE / ReMax and GRPO (`rlhflab.stages.critic_free`): each step of an iteration against the
pure functions on a recorded batch, the groups left out of the loss, and whole runs (learning, resume)."""

import json

import pytest
import torch
from torch.testing import assert_close

from rlhflab.config import load_config
from rlhflab.core.checkpoint import latest_checkpoint
from rlhflab.core.metrics_log import read_metrics
from rlhflab.errors import ConfigError, TrainingHealthError
from rlhflab.losses import (
    group_normalized_advantages,
    kl_k1,
    kl_k3,
    masked_sum,
    ppo_policy_loss,
    reinforce_advantages,
    rloo_advantages,
)
from rlhflab.models.loading import load_causal_lm, load_tokenizer
from rlhflab.models.logprobs import token_logps
from rlhflab.rollout.generate import SamplingSettings, generate
from rlhflab.stages import critic_free

K = 4
PROMPTS = ["the cat", "the dog", "i say", "what is", "how was the film", "the day was", "we like", "you hate"]


class WordCount:
    """A programmatic reward: how often `word` appears in the response."""

    def __init__(self, word="good"):
        self.word = word
        self.calls = 0

    def score(self, prompts, responses):
        self.calls += len(responses)
        return torch.tensor([r.split().count(self.word) for r in responses], dtype=torch.float32)


class Table:
    """Scores given in advance, in call order (NaN allowed)."""

    def __init__(self, *batches):
        self.batches = [torch.tensor(b, dtype=torch.float32) for b in batches]

    def score(self, prompts, responses):
        out = self.batches.pop(0)
        assert len(out) == len(responses)
        return out


@pytest.fixture()
def prompts_file(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS * 4))
    return path


def _cfg(stage, model_dir, prompts, out, *extra):
    return load_config(
        stage,
        None,
        [
            f"model.name_or_path={model_dir}",
            f"data.train_path={prompts}",
            f"logging.output_dir={out}",
            "model.device=cpu",
            "logging.progress=false",
            "logging.tensorboard=false",
            "logging.log_every=1",
            "algo.prompts_per_iteration=4",
            f"algo.num_generations={K}",
            "sampling.max_new_tokens=6",
            "optim.lr=5e-3",
            *extra,
        ],
    )


def _rollout(model_dir, n_prompts=2, greedy=False, seed=0):
    model, tok = load_causal_lm(model_dir), load_tokenizer(model_dir)
    prompts = PROMPTS[:n_prompts] if greedy else [p for p in PROMPTS[:n_prompts] for _ in range(K)]
    settings = SamplingSettings(max_new_tokens=6, do_sample=not greedy)
    return model, generate(model, tok, prompts, settings, seed=seed)


def _independent_logps(model, rollout):
    """Log-probs of the sampled response tokens, by a plain full-logits forward (no rlhflab kernel)."""
    with torch.no_grad():
        logits = model(
            input_ids=rollout.input_ids,
            attention_mask=rollout.attention_mask,
            position_ids=rollout.position_ids,
        ).logits.float()
    logps = torch.log_softmax(logits[:, :-1], -1).gather(-1, rollout.input_ids[:, 1:, None])[..., 0]
    return logps[:, rollout.response_start - 1 :]


# --------------------------------------------------------------------------------------------------------
# Steps 2-5 on a recorded batch
# --------------------------------------------------------------------------------------------------------

SCORES = [1.0, 0.0, 3.0, 0.0, 2.0, 2.0, 5.0, 1.0]


@pytest.mark.parametrize(
    "stage, options, expected",
    [
        ("rloo", ["algo.baseline=leave_one_out"], lambda s: rloo_advantages(s, K)),
        ("rloo", ["algo.baseline=batch_mean"], lambda s: reinforce_advantages(s)),
        ("grpo", [], lambda s: group_normalized_advantages(s, K, scale_by_std=True)),
        (
            "grpo",
            ["algo.scale_rewards=false"],
            lambda s: group_normalized_advantages(s, K, scale_by_std=False),
        ),
    ],
)
def test_advantages_are_the_estimators_of_the_scores(
    tiny_model_dir, prompts_file, tmp_path, stage, options, expected
):
    cfg = _cfg(stage, tiny_model_dir, prompts_file, tmp_path / "r", "algo.kl_coef=0", *options)
    policy, rollout = _rollout(tiny_model_dir)
    exp, metrics = critic_free.make_experience(policy, None, Table(SCORES), rollout, None, cfg, 1, None)
    scores = torch.tensor(SCORES)
    assert_close(exp["advantages"], expected(scores))
    assert exp["keep"].all() and exp["old_logps"] is None and exp["ref_logps"] is None
    assert metrics["reward/score"] == pytest.approx(scores.mean().item())


def test_remax_baseline_is_the_greedy_responses_score(tiny_model_dir, prompts_file, tmp_path):
    cfg = _cfg("rloo", tiny_model_dir, prompts_file, tmp_path / "r", "algo.kl_coef=0", "algo.baseline=greedy")
    policy, rollout = _rollout(tiny_model_dir)
    _, greedy = _rollout(tiny_model_dir, greedy=True)
    exp, metrics = critic_free.make_experience(
        policy, None, Table(SCORES, [0.5, 4.0]), rollout, greedy, cfg, 1, None
    )
    assert_close(exp["advantages"], torch.tensor(SCORES) - torch.tensor([0.5] * K + [4.0] * K))
    assert metrics["reward/greedy_score"] == pytest.approx(2.25)


def test_kl_in_the_reward_is_subtracted_before_the_baseline(tiny_model_dir, prompts_file, tmp_path):
    """RLOO's reward is score - beta * sum_t k1_t under the rollout policy, then leave-one-out; the missing-EOS
    penalty comes off the score first."""
    cfg = _cfg(
        "rloo",
        tiny_model_dir,
        prompts_file,
        tmp_path / "r",
        "algo.kl_coef=0.3",
        "algo.kl_estimator=k1",
        "algo.missing_eos_penalty=1.5",
    )
    policy, rollout = _rollout(tiny_model_dir, seed=3)
    ref = load_causal_lm(tiny_model_dir)
    torch.manual_seed(0)
    with torch.no_grad():  # a reference that differs from the policy
        for p in ref.parameters():
            p.add_(0.05 * torch.randn_like(p))
    exp, metrics = critic_free.make_experience(policy, ref, Table(SCORES), rollout, None, cfg, 1, None)
    mask = rollout.response_mask
    pol, rf = _independent_logps(policy, rollout), _independent_logps(ref, rollout)
    assert_close(exp["old_logps"][mask], pol[mask], atol=1e-5, rtol=1e-5)
    assert_close(exp["ref_logps"][mask], rf[mask], atol=1e-5, rtol=1e-5)
    seq_kl = masked_sum(kl_k1(pol, rf), mask, dim=-1)
    assert_close(exp["seq_kl"], seq_kl, atol=1e-5, rtol=1e-5)
    scores = torch.tensor(SCORES) - 1.5 * (~rollout.ended_with_eos).float()
    assert_close(exp["advantages"], rloo_advantages(scores - 0.3 * seq_kl, K), atol=1e-5, rtol=1e-5)
    assert metrics["kl/coef"] == 0.3
    assert_close(exp["scores"], torch.tensor(SCORES))  # the logged score is the reward source's


def test_groups_with_a_nan_or_constant_score_are_left_out(tiny_model_dir, prompts_file, tmp_path):
    """A NaN score drops its whole group; with dynamic sampling so does a group whose scores are all equal.
    Their advantages are 0 and the others' are computed without them."""
    scores = [1.0, float("nan"), 0.0, 2.0, 3.0, 3.0, 3.0, 3.0, 0.0, 1.0, 0.0, 4.0]
    cfg = _cfg(
        "grpo", tiny_model_dir, prompts_file, tmp_path / "r", "algo.kl_coef=0", "algo.dynamic_sampling=true"
    )
    policy, rollout = _rollout(tiny_model_dir, n_prompts=3)
    exp, metrics = critic_free.make_experience(policy, None, Table(scores), rollout, None, cfg, 1, None)
    assert exp["keep"].tolist() == [False] * 4 + [False] * 4 + [True] * 4
    kept = torch.tensor(scores[8:])
    assert_close(exp["advantages"], torch.cat([torch.zeros(8), group_normalized_advantages(kept, K)]))
    assert metrics["reward/nan_scores"] == 1 and metrics["perf/groups_kept"] == pytest.approx(1 / 3)
    # Without dynamic sampling the constant group stays (advantage 0 by construction), the NaN one does not.
    cfg = _cfg("grpo", tiny_model_dir, prompts_file, tmp_path / "r", "algo.kl_coef=0")
    exp, _ = critic_free.make_experience(policy, None, Table(scores), rollout, None, cfg, 1, None)
    assert exp["keep"].tolist() == [False] * 4 + [True] * 8


def test_a_batch_of_nan_scores_stops_the_run(tiny_model_dir, prompts_file, tmp_path):
    cfg = _cfg("grpo", tiny_model_dir, prompts_file, tmp_path / "r", "algo.kl_coef=0")
    policy, rollout = _rollout(tiny_model_dir)
    with pytest.raises(TrainingHealthError, match="every score"):
        critic_free.make_experience(policy, None, Table([float("nan")] * 8), rollout, None, cfg, 1, None)


# --------------------------------------------------------------------------------------------------------
# Step 6: the loss that is back-propagated
# --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("aggregation", ["sequence_mean", "token_mean", "sequence_sum", "constant"])
def test_minibatch_loss_is_the_clipped_surrogate_plus_beta_k3(aggregation):
    torch.manual_seed(0)
    logps = (-torch.rand(3, 5) * 2).requires_grad_()
    old, ref = logps.detach() + 0.3 * torch.randn(3, 5), logps.detach() + 0.5 * torch.randn(3, 5)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]]).bool()
    adv = torch.tensor([1.0, -0.5, 2.0])
    cfg = load_config(
        "grpo",
        None,
        [
            f"algo.loss_aggregation={aggregation}",
            "algo.kl_coef=0.2",
            "algo.clip_eps=0.1",
            "algo.clip_eps_high=0.3",
            "sampling.max_new_tokens=7",
        ],
    )
    loss, metrics = critic_free.minibatch_loss(logps, old, ref, adv, mask, cfg)
    extra = {"max_tokens": 7} if aggregation == "constant" else {}
    pg = ppo_policy_loss(
        logps, old, adv, mask, clip_eps=0.1, clip_eps_high=0.3, reduction=aggregation, **extra
    )
    pg = pg.loss
    # Hand-built: k3 per token, reduced the same way, weighted by beta.
    k3 = kl_k3(logps, ref).masked_fill(~mask, 0.0)
    if aggregation == "sequence_mean":
        kl = (k3.sum(-1) / mask.sum(-1)).mean()
    elif aggregation == "sequence_sum":
        kl = k3.sum(-1).mean()
    elif aggregation == "constant":  # Dr. GRPO: each sum over sampling.max_new_tokens
        kl = (k3.sum(-1) / 7).mean()
    else:
        kl = k3.sum() / mask.sum()
    assert_close(loss, pg.mean() + 0.2 * kl)
    assert metrics["loss/kl"] == pytest.approx(kl.item(), rel=1e-5)
    (g_stage,) = torch.autograd.grad(loss, logps)
    (g_hand,) = torch.autograd.grad(pg.mean() + 0.2 * kl, logps)
    assert_close(g_stage, g_hand)


def test_one_update_is_reinforce_with_the_group_baseline():
    """With no rollout log-probs (one update per batch) the ratio is 1: the gradient is -A grad log pi."""
    logps = (-torch.rand(2, 4)).requires_grad_()
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]]).bool()
    adv = torch.tensor([2.0, -1.0])
    cfg = load_config("rloo", None, ["algo.kl_coef=0", "algo.loss_aggregation=sequence_sum"])
    loss, metrics = critic_free.minibatch_loss(logps, None, None, adv, mask, cfg)
    (grad,) = torch.autograd.grad(loss, logps)
    assert_close(grad, -(adv[:, None] * mask) / 2)  # mean over the 2 sequences of -A sum_t log pi
    assert metrics["loss/clipfrac"] == 0 and "loss/kl" not in metrics


def test_update_trains_only_on_kept_groups(tiny_model_dir, prompts_file, tmp_path):
    """The gradient of an update equals the hand-built loss's over the kept samples only."""
    cfg = _cfg(
        "grpo", tiny_model_dir, prompts_file, tmp_path / "r", "algo.kl_coef=0", "optim.max_grad_norm=0"
    )
    policy, rollout = _rollout(tiny_model_dir)
    adv = torch.tensor([0.0] * K + [1.0, -1.0, 0.5, -0.5])
    keep = torch.tensor([False] * K + [True] * K)
    exp = {"old_logps": None, "ref_logps": None, "advantages": adv, "keep": keep, "seq_kl": torch.zeros(8)}
    before = {n: p.detach().clone() for n, p in policy.named_parameters()}
    # A plain SGD step of lr 1 makes the update read back the gradient it applied.
    opt = torch.optim.SGD(policy.parameters(), lr=1.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)
    out = critic_free._update(policy, opt, sched, rollout, exp, cfg, 1, None)
    assert out["perf/updates"] == 1
    applied = {n: before[n] - p.detach() for n, p in policy.named_parameters()}
    ref_model = load_causal_lm(tiny_model_dir)
    mb = rollout.select(keep.nonzero().squeeze(-1))
    target = torch.cat([torch.zeros_like(mb.prompt_mask), mb.response_mask], dim=1)
    lp = token_logps(ref_model, mb.input_ids, mb.attention_mask, target, position_ids=mb.position_ids)
    lp = lp[:, mb.response_start - 1 :]
    loss = ppo_policy_loss(lp, lp.detach(), adv[keep], mb.response_mask).loss.mean()
    loss.backward()
    for n, p in ref_model.named_parameters():
        if p.grad is not None:
            assert_close(applied[n], p.grad, atol=1e-6, rtol=1e-4)


def test_every_group_left_out_means_no_update(tiny_model_dir, prompts_file, tmp_path):
    cfg = _cfg("grpo", tiny_model_dir, prompts_file, tmp_path / "r", "algo.kl_coef=0")
    policy, rollout = _rollout(tiny_model_dir)
    exp = {
        "old_logps": None,
        "ref_logps": None,
        "advantages": torch.zeros(8),
        "keep": torch.zeros(8, dtype=torch.bool),
        "seq_kl": torch.zeros(8),
    }
    before = [p.detach().clone() for p in policy.parameters()]
    opt = torch.optim.SGD(policy.parameters(), lr=1.0)
    out = critic_free._update(policy, opt, None, rollout, exp, cfg, 1, None)
    assert out["perf/updates"] == 0
    assert all(torch.equal(a, b) for a, b in zip(before, policy.parameters()))


# --------------------------------------------------------------------------------------------------------
# Whole runs
# --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "stage, options",
    [
        ("rloo", []),
        ("grpo", ["algo.ppo_epochs=2", "algo.minibatch_size=8", "algo.clip_eps_high=0.28"]),
    ],
)
def test_runs_increase_a_programmatic_reward(tiny_model_dir, prompts_file, tmp_path, stage, options):
    reward = WordCount()
    cfg = _cfg(
        stage,
        tiny_model_dir,
        prompts_file,
        tmp_path / "run",
        "algo.iterations=14",
        "optim.lr=2e-2",
        "logging.snapshot_every=7",
        *options,
    )
    final = critic_free.train(cfg, reward=reward)
    logged = read_metrics(tmp_path / "run" / "metrics.jsonl")
    rows = [r for r in logged if "reward/score" in r]
    first = sum(r["reward/score"] for r in rows[:3]) / 3
    last = sum(r["reward/score"] for r in rows[-3:]) / 3
    assert last > first + 1.0, (first, last)
    last_iteration = [r for r in rows if "kl/sequence" in r][-1]
    assert (
        last_iteration["kl/sequence"] > 0 and last_iteration["feedback/queries"] == 14 * 4 * K == reward.calls
    )
    # End to end (from the run's start to the saved model) vs in the loop: the same rollouts, more seconds.
    e2e = logged[-1]
    assert e2e["perf/end_to_end_rollouts_per_s"] * e2e["perf/wall_s"] == pytest.approx(14 * 4 * K)
    assert e2e["perf/loop_rollouts_per_s"] * e2e["perf/loop_s"] == pytest.approx(14 * 4 * K)
    assert e2e["perf/wall_s"] > e2e["perf/loop_s"] > 0
    parts = [f"perf/time_{k}" for k in ("generate", "score", "forward", "optimize")]
    assert all(r[k] >= 0 for r in rows for k in parts)
    assert sum(r["perf/time_iteration"] for r in rows) < e2e["perf/loop_s"]
    lines = (tmp_path / "run" / "rollouts.jsonl").read_text().splitlines()
    assert len(lines) == 14 * 4 * K
    # Snapshots every 7 iterations; the last one is the final policy.
    snaps = sorted(p.name for p in (tmp_path / "run" / "snapshots").iterdir())
    assert snaps == ["step-000007", "step-000014"]
    snap = {
        s: load_causal_lm(tmp_path / "run" / "snapshots" / f"step-0000{s}").state_dict() for s in ("07", "14")
    }
    last = load_causal_lm(final).state_dict()
    assert all(torch.equal(snap["14"][k], last[k]) for k in last)
    assert not all(torch.equal(snap["07"][k], last[k]) for k in last)


def test_resume_is_exact(tiny_model_dir, prompts_file, tmp_path, monkeypatch):
    common = ["algo.iterations=4", "logging.save_every=2", "algo.ppo_epochs=2", "algo.minibatch_size=8"]
    ref_final = critic_free.train(
        _cfg("grpo", tiny_model_dir, prompts_file, tmp_path / "a", *common), reward=WordCount()
    )
    real = critic_free.append_rollouts
    calls = {"n": 0}

    def crash_on_third(*args):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        real(*args)

    monkeypatch.setattr(critic_free, "append_rollouts", crash_on_third)
    cfg = _cfg("grpo", tiny_model_dir, prompts_file, tmp_path / "b", *common)
    with pytest.raises(KeyboardInterrupt):
        critic_free.train(cfg, reward=WordCount())
    assert latest_checkpoint(tmp_path / "b") is not None
    monkeypatch.setattr(critic_free, "append_rollouts", real)
    final = critic_free.train(cfg, reward=WordCount(), resume=True)
    a, b = load_causal_lm(ref_final).state_dict(), load_causal_lm(final).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


# --------------------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------------------


def test_config_defaults_and_refusals():
    rloo, grpo = load_config("rloo"), load_config("grpo")
    assert (rloo.algo.kl_placement, rloo.algo.kl_estimator, rloo.algo.loss_aggregation) == (
        "reward",
        "k1",
        "sequence_sum",
    )
    assert (grpo.algo.kl_placement, grpo.algo.kl_estimator, grpo.algo.kl_coef) == ("loss", "k3", 0.04)
    with pytest.raises(ConfigError, match="num_generations"):
        load_config("grpo", None, ["algo.num_generations=1"])
    with pytest.raises(ConfigError, match="minibatch_size"):
        load_config("grpo", None, ["algo.minibatch_size=5"])  # 16 x 4 = 64 samples
    with pytest.raises(ConfigError, match="unknown key"):
        load_config("grpo", None, ["algo.baseline=greedy"])  # RLOO's key
    with pytest.raises(ConfigError, match="unknown key"):
        load_config("rloo", None, ["algo.scale_rewards=false"])  # GRPO's key
    with pytest.raises(ConfigError, match="unknown key"):
        load_config("rloo", None, ["data.packing=true"])


def test_the_schedule_spans_every_optimizer_step_of_the_run(
    tiny_model_dir, prompts_file, tmp_path, monkeypatch
):
    """A decaying learning rate reaches its end at the run's last update: iterations x ppo_epochs x
    minibatches per iteration (16 rollouts in minibatches of 8: 2), not fewer, not more."""
    horizons, build = [], critic_free.build_optimizer
    monkeypatch.setattr(
        critic_free,
        "build_optimizer",
        lambda model, optim, total: horizons.append(total) or build(model, optim, total),
    )
    cfg = _cfg(
        "grpo",
        tiny_model_dir,
        prompts_file,
        tmp_path / "run",
        "algo.iterations=2",
        "algo.ppo_epochs=2",
        "algo.minibatch_size=8",
        "optim.scheduler=linear",
    )
    critic_free.train(cfg, reward=WordCount())
    assert horizons == [2 * 2 * 2]
