"""Online DPO (`rlhflab.stages.online_dpo`): the pairs built from the samples by the labels, one step against
the pure loss on independently computed log-probs, the feedback budget, and whole runs (learning, resume)."""

import contextlib
import json
import math
from pathlib import Path

import pytest
import torch
from torch.testing import assert_close

from rlhflab.config import config_to_yaml, load_config
from rlhflab.core.metrics_log import read_metrics
from rlhflab.errors import ConfigError, UserError
from rlhflab.feedback import RewardFeedback, SyncFeedback, Ticket
from rlhflab.losses.preference import PREFERENCE_LOSS_TABLE, dpo, ipo, simpo
from rlhflab.models.loading import load_causal_lm, load_tokenizer
from rlhflab.rollout.generate import SamplingSettings, generate
from rlhflab.stages import online_dpo

from ..helpers import PPO_PROMPTS, assert_resume_matches, perturb_, stage_config

PROMPTS = PPO_PROMPTS[:8]
NAN = float("nan")


class WordCount:
    """A programmatic reward: how often `word` appears in the response."""

    name = "word-count"

    def __init__(self, word="good"):
        self.word = word

    def score(self, prompts, responses):
        return torch.tensor([r.split().count(self.word) for r in responses], dtype=torch.float32)


class Fixed(SyncFeedback):
    """Answers with the given labels, in call order."""

    name = "fixed"

    def __init__(self, *batches):
        super().__init__()
        self.batches = [torch.tensor(b) for b in batches]

    def judge(self, prompts, first, second):
        return self.batches.pop(0)[: len(prompts)]


class LateAnswers:
    """A source that answers later, like people: only the protocol (no base class, no state), every third pair
    left unanswered at collection time; shorter responses preferred, equal lengths a tie."""

    name = "late"

    def __init__(self):
        self.queries, self.timeouts, self.pending = 0, [], {}

    def ask(self, prompts, first, second):
        self.queries += len(prompts)
        ticket = Ticket(len(self.pending), len(prompts))
        self.pending[ticket.id] = (list(first), list(second))
        return ticket

    def collect(self, ticket, timeout=None):
        self.timeouts.append(timeout)
        first, second = self.pending.pop(ticket.id)
        labels = [0.5 if len(a) == len(b) else float(len(a) < len(b)) for a, b in zip(first, second)]
        return torch.tensor([NAN if i % 3 == 2 else x for i, x in enumerate(labels)])


@pytest.fixture()
def prompts_file(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS * 4))
    return path


def _cfg(model_dir, prompts, out, *extra):
    return stage_config(
        "online-dpo",
        model_dir,
        "algo.reward_model=rule:length",  # replaced by the feedback the tests pass in
        "algo.prompts_per_step=4",
        "sampling.max_new_tokens=6",
        "optim.lr=3e-2",
        *extra,
        data=prompts,
        out=out,
    )


def _rollout(model_dir, n_prompts=4, seed=0):
    model, tok = load_causal_lm(model_dir), load_tokenizer(model_dir)
    prompts = [p for p in PROMPTS[:n_prompts] for _ in range(2)]
    return model, tok, generate(model, tok, prompts, SamplingSettings(max_new_tokens=6), seed=seed)


def _sequence_logp(model, prompt_ids: list[int], response_ids: list[int]) -> torch.Tensor:
    """log pi(response | prompt) by a plain full-logits forward of the one unpadded sequence (no rlhflab kernel)."""
    ids = torch.tensor([prompt_ids + response_ids])
    logps = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), -1)
    targets = ids[0, 1:]
    return logps[torch.arange(len(targets)), targets][len(prompt_ids) - 1 :].sum()


def _sampled(rollout, row):
    """(prompt ids, response ids) of a rollout row, read from the padded tensors by hand."""
    prompt = [t for t, m in zip(rollout.prompt_ids[row].tolist(), rollout.prompt_mask[row].tolist()) if m]
    response = [
        t for t, m in zip(rollout.response_ids[row].tolist(), rollout.response_mask[row].tolist()) if m
    ]
    return prompt, response


# --------------------------------------------------------------------------------------------------------
# Steps 2-4 on a recorded batch
# --------------------------------------------------------------------------------------------------------


def test_pairs_are_the_sampled_tokens_ordered_by_the_label(tiny_model_dir):
    _, _, rollout = _rollout(tiny_model_dir, seed=1)
    labels, identical, scores = online_dpo.ask_feedback(Fixed([1.0, 0.0, 0.5, NAN]), rollout, None)
    assert not identical.any() and scores is None
    examples, kept = online_dpo.pair_examples(rollout, labels)
    assert kept == [0, 1]  # the tie and the unanswered pair are dropped
    for example, (chosen_row, rejected_row) in zip(examples, [(0, 1), (3, 2)]):
        prompt, chosen = _sampled(rollout, chosen_row)
        _, rejected = _sampled(rollout, rejected_row)
        assert example["prompt_input_ids"] == prompt
        assert example["chosen_input_ids"] == prompt + chosen
        assert example["rejected_input_ids"] == prompt + rejected
        assert example["chosen_loss_mask"] == [False] * len(prompt) + [True] * len(chosen)
        assert example["rejected_attention_mask"] == [1] * (len(prompt) + len(rejected))


def test_identical_pairs_are_not_asked(tiny_model_dir):
    _, _, rollout = _rollout(tiny_model_dir, n_prompts=2)
    rollout.response_ids[1], rollout.response_mask[1] = rollout.response_ids[0], rollout.response_mask[0]
    source = Fixed([0.0])
    labels, identical, _ = online_dpo.ask_feedback(source, rollout, None)
    assert identical.tolist() == [True, False] and source.queries == 1
    assert labels[0].isnan() and labels[1] == 0.0


@pytest.mark.parametrize("loss", ["dpo", "ipo", "simpo"])
def test_one_step_is_the_loss_on_independent_logps(tiny_model_dir, tmp_path, loss):
    """The gradient a step applies and its logged loss, implicit rewards and KL equal the pure loss on log-probs
    computed here sequence by sequence, for the pairs the labels keep (the second response chosen where the
    label is 0), against a reference that differs from the policy."""
    cfg = _cfg(
        tiny_model_dir, tmp_path / "p.jsonl", tmp_path / "r", f"algo.loss={loss}", "algo.micro_batch_size=1"
    )
    policy, tok, rollout = _rollout(tiny_model_dir, seed=2)
    ref = perturb_(load_causal_lm(tiny_model_dir), 0.05, seed=0)
    row = PREFERENCE_LOSS_TABLE[loss]
    live = (lambda: contextlib.nullcontext(ref)) if row.reference else None
    ctx = online_dpo.StepContext(policy, row, cfg.algo, torch.device("cpu"), tok.pad_token_id, live)
    labels, _, _ = online_dpo.ask_feedback(Fixed([0.0, 0.5, 1.0, 0.0]), rollout, None)
    examples, kept = online_dpo.pair_examples(rollout, labels)
    assert kept == [0, 2, 3]

    before = {n: p.detach().clone() for n, p in policy.named_parameters()}
    opt = torch.optim.SGD(policy.parameters(), lr=1.0)  # lr 1: the step reads back the applied gradient
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)
    metrics, seq_kl = online_dpo.update(ctx, examples, opt, sched, 0.0, 1, None)
    applied = {n: before[n] - p.detach() for n, p in policy.named_parameters()}

    hand = load_causal_lm(tiny_model_dir)
    sides = [(2 * i + 1, 2 * i) if labels[i] == 0 else (2 * i, 2 * i + 1) for i in kept]
    seqs = [[_sampled(rollout, r) for r in pair] for pair in sides]
    pc = torch.stack([_sequence_logp(hand, *c) for c, _ in seqs])
    pr = torch.stack([_sequence_logp(hand, *r) for _, r in seqs])
    if loss == "simpo":
        lengths = [torch.tensor([float(len(s[k][1])) for s in seqs]) for k in (0, 1)]
        out = simpo(pc, pr, *lengths, beta=2.0, gamma=0.5)
    else:
        with torch.no_grad():
            rc = torch.stack([_sequence_logp(ref, *c) for c, _ in seqs])
            rr = torch.stack([_sequence_logp(ref, *r) for _, r in seqs])
        out = (dpo if loss == "dpo" else ipo)(pc, pr, rc, rr, beta=0.1)
        assert seq_kl is not None
        assert_close(seq_kl, torch.cat([pc - rc, pr - rr]).detach(), atol=1e-4, rtol=1e-4)
        assert metrics["kl/sequence"] == pytest.approx(torch.cat([pc - rc, pr - rr]).mean().item(), abs=1e-4)
    out.loss.mean().backward()
    assert metrics[f"loss/{loss}"] == pytest.approx(out.loss.mean().item(), rel=1e-4)
    for key in ("reward/chosen", "reward/margin", "reward/accuracy"):
        assert metrics[key] == pytest.approx(out.metrics[key].mean().item(), rel=1e-4, abs=1e-5)
    for n, p in hand.named_parameters():
        assert_close(applied[n], p.grad, atol=1e-6, rtol=1e-4)


def test_bad_labels_are_refused(tiny_model_dir):
    _, _, rollout = _rollout(tiny_model_dir, n_prompts=2)
    with pytest.raises(UserError, match="answered the label 0.7"):
        online_dpo.ask_feedback(Fixed([1.0, 0.7]), rollout, None)
    with pytest.raises(UserError, match="labels for 2 pairs"):
        online_dpo.check_labels(torch.ones(3), 2, "x")


# --------------------------------------------------------------------------------------------------------
# Whole runs
# --------------------------------------------------------------------------------------------------------


def test_feedback_budget_with_a_source_that_answers_later(tiny_model_dir, prompts_file, tmp_path):
    """A protocol-only source: the stage waits algo.feedback_timeout, counts its queries, drops unanswered and
    tied pairs, and logs every pair with its label."""
    source = LateAnswers()
    cfg = _cfg(
        tiny_model_dir, prompts_file, tmp_path / "run", "algo.iterations=3", "algo.feedback_timeout=2.5"
    )
    online_dpo.train(cfg, feedback=source)
    rows = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "feedback/queries" in r]
    pairs = [json.loads(line) for line in (tmp_path / "run" / "rollouts.jsonl").read_text().splitlines()]
    assert len(pairs) == 3 * 4 and source.timeouts == [2.5] * 3
    asked = [p for p in pairs if p["first"] != p["second"]]
    assert rows[-1]["feedback/queries"] == source.queries == len(asked)
    for step, row in enumerate(rows, start=1):
        labels = [p["label"] for p in pairs if p["iteration"] == step]
        assert row["feedback/pairs_kept"] == sum(x in (0.0, 1.0) for x in labels)
        assert row["feedback/ties"] == labels.count(0.5)
        assert row["feedback/unanswered"] + row["feedback/identical"] == labels.count(None)
        assert row["feedback/queries"] == sum(
            p["first"] != p["second"] for p in pairs if p["iteration"] <= step
        )
    for p in pairs:  # the source's rule, as logged
        if p["label"] in (0.0, 1.0):
            assert p["label"] == float(len(p["first"]) < len(p["second"]))
            assert p["kl_first"] is not None and p["kl_second"] is not None


def test_a_step_without_decided_pairs_leaves_the_policy(tiny_model_dir, prompts_file, tmp_path):
    """Only ties and refusals: nothing to learn from, so no optimizer step (and no loss logged)."""
    source = Fixed([0.5, NAN, 0.5, 0.5], [NAN] * 4)
    cfg = _cfg(tiny_model_dir, prompts_file, tmp_path / "run", "algo.iterations=2")
    final = online_dpo.train(cfg, feedback=source)
    rows = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "feedback/queries" in r]
    assert [r["feedback/pairs_kept"] for r in rows] == [0, 0] and not any("loss/dpo" in r for r in rows)
    assert rows[-1]["feedback/queries"] == 8 and rows[0]["feedback/ties"] == 3
    start, end = load_causal_lm(tiny_model_dir).state_dict(), load_causal_lm(final).state_dict()
    assert all(torch.equal(start[k], end[k]) for k in start)


def test_online_dpo_raises_a_programmatic_reward(tiny_model_dir, prompts_file, tmp_path):
    """Labels from the count of "good" (argmax) lift that count in the policy's own samples."""
    cfg = _cfg(
        tiny_model_dir, prompts_file, tmp_path / "run", "algo.iterations=12", "algo.prompts_per_step=8"
    )
    online_dpo.train(cfg, feedback=RewardFeedback(WordCount()))
    pairs = [json.loads(line) for line in (tmp_path / "run" / "rollouts.jsonl").read_text().splitlines()]

    def score(steps):
        texts = [p[side] for p in pairs if p["iteration"] in steps for side in ("first", "second")]
        return sum(t.split().count("good") for t in texts) / len(texts)

    first, last = score({1, 2, 3}), score({10, 11, 12})
    assert last > first + 2.0, (first, last)
    rows = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "feedback/queries" in r]
    assert rows[-1]["feedback/queries"] == sum(p["first"] != p["second"] for p in pairs)
    # Before the first update (the first step with a pair that is not a tie) the policy is the reference; then
    # it moves away from it.
    trained = [r for r in rows if "kl/sequence" in r]
    assert trained[0]["kl/sequence"] == pytest.approx(0.0, abs=1e-5) and rows[-1]["kl/sequence"] > 1.0
    assert rows[-1]["perf/flops_per_s"] > 0 and rows[0]["reward/score"] == pytest.approx(
        score({1}), abs=1e-6
    )  # the source's scores of the (distinct) pairs it was asked
    # The time split of each step adds up to less than the whole run's wall time (the closing row).
    wall = read_metrics(tmp_path / "run" / "metrics.jsonl")[-1]["perf/wall_s"]
    parts = [f"perf/time_{k}" for k in ("generate", "feedback", "reference", "optimize")]
    assert all(r[k] >= 0 for r in rows for k in parts)
    assert sum(r["perf/time_iteration"] for r in rows) == pytest.approx(
        sum(r[k] for r in rows for k in parts)
    )
    assert sum(r["perf/time_iteration"] for r in rows) < wall
    # The rollout entropy (recorded while sampling) is a per-token entropy in (0, log V], and the policy that
    # learns to repeat "good" samples with less of it.
    entropies = [r["loss/entropy_rollout"] for r in rows]
    vocab = load_tokenizer(tiny_model_dir).vocab_size
    assert all(0 < e <= math.log(vocab) for e in entropies)
    assert entropies[-1] < entropies[0]


def test_resume_is_exact(tiny_model_dir, prompts_file, tmp_path):
    """Bradley-Terry draws make the labels random: the source's generator is checkpointed with the run. The
    crash comes after step 3 logged its pairs, so resuming also drops them from rollouts.jsonl."""

    def run(out, resume):
        cfg = _cfg(tiny_model_dir, prompts_file, out, "algo.iterations=4", "logging.save_every=2")
        feedback = RewardFeedback(WordCount(), mode="bradley_terry", seed=0)
        return online_dpo.train(cfg, resume=resume, feedback=feedback)

    assert_resume_matches(
        run, tmp_path, crash_in=(online_dpo, "append_pairs"), crash_on_call=4, checkpoint_step=2
    )
    assert (tmp_path / "a" / "rollouts.jsonl").read_text() == (tmp_path / "b" / "rollouts.jsonl").read_text()


# --------------------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------------------


def test_shipped_config_and_the_run_config_load(tmp_path):
    cfg = load_config("online-dpo", Path(__file__).parents[2] / "configs" / "online_dpo_tiny.yaml")
    assert cfg.model.name_or_path == "lab:sentiment" and cfg.algo.feedback == "reward"
    lab = load_config("online-dpo", None, ["algo.feedback=lab", "algo.annotators.noise=0.2", "algo.loss=ipo"])
    (tmp_path / "config.yaml").write_text("stage: online-dpo\n" + config_to_yaml(lab, comments=False))
    assert load_config("online-dpo", tmp_path / "config.yaml") == lab


def test_config_refusals(tiny_model_dir, prompts_file, tmp_path):
    for loss in ("kto", "bco"):
        with pytest.raises(ConfigError, match=f"algo.loss is {loss}, a loss of unpaired .* dpo, cdpo"):
            load_config("online-dpo", None, [f"algo.loss={loss}"])
    with pytest.raises(ConfigError, match="unknown key 'algo.precompute_ref_logps'"):
        load_config("online-dpo", None, ["algo.precompute_ref_logps=false"])  # offline DPO's key
    with pytest.raises(ConfigError, match="unknown key 'algo.prompts_per_iteration'; did you mean"):
        load_config("online-dpo", None, ["algo.prompts_per_iteration=4"])
    with pytest.raises(ConfigError, match="algo.annotators applies to algo.feedback=lab"):
        load_config("online-dpo", None, ["algo.annotators.noise=0.1"])
    with pytest.raises(ConfigError, match="algo.reward_model is set but algo.feedback=lab"):
        load_config("online-dpo", None, ["algo.feedback=lab", "algo.reward_model=rule:length"])
    with pytest.raises(ConfigError, match="algo.label_smoothing is not used by algo.loss=ipo"):
        load_config("online-dpo", None, ["algo.loss=ipo", "algo.label_smoothing=0.1"])
    with pytest.raises(ConfigError, match="algo.missing_eos_penalty"):
        load_config("online-dpo", None, ["algo.missing_eos_penalty=1"])
    with pytest.raises(ConfigError, match="ref_model is set but algo.loss=simpo"):
        load_config("online-dpo", None, ["algo.loss=simpo", "ref_model=x"])
    assert load_config("dpo", None, ["algo.precompute_ref_logps=false"]).algo.precompute_ref_logps is False
    # No reward to ask; the lab's annotators without a lab source passed in: refused before a model loads.
    no_reward = stage_config("online-dpo", tiny_model_dir, data=prompts_file, out=tmp_path / "a")
    with pytest.raises(ConfigError, match="algo.reward_model is empty"):
        online_dpo.train(no_reward)
    lab = stage_config(
        "online-dpo", tiny_model_dir, "algo.feedback=lab", data=prompts_file, out=tmp_path / "b"
    )
    with pytest.raises(ConfigError, match="algo.feedback=lab asks the lab's simulated annotators"):
        online_dpo.train(lab)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
