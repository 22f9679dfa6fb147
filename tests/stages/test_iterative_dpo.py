"""Iterative DPO and sDPO (`rlhflab.stages.iterative_dpo`): the rounds' wiring (models, references), the pairs
each round writes, the label budget, sDPO's stages, resume by rounds, config refusals, and a learning run."""

import json
import math
from pathlib import Path

import pytest
import torch
import yaml

from rlhflab.config import load_config
from rlhflab.core.metrics_log import read_metrics
from rlhflab.errors import ConfigError
from rlhflab.feedback import RewardFeedback
from rlhflab.lab.launch import record_kind
from rlhflab.models.loading import load_causal_lm, load_tokenizer
from rlhflab.rollout.generate import SamplingSettings, generate
from rlhflab.stages import iterative_dpo
from rlhflab.stages.common import snapshot_dir

from ..helpers import (
    PPO_PROMPTS,
    assert_same_tensors,
    causal_lm_state,
    perturb_,
    stage_config,
    write_jsonl,
)


class WordCount:
    """A programmatic reward: how often `word` appears in the response."""

    name = "word-count"

    def __init__(self, word="good"):
        self.word = word

    def score(self, prompts, responses):
        return torch.tensor([r.split().count(self.word) for r in responses], dtype=torch.float32)


class CharCount:
    """A programmatic reward with few ties: the response's length in characters."""

    name = "char-count"

    def score(self, prompts, responses):
        return torch.tensor([len(r) for r in responses], dtype=torch.float32)


class Recording(RewardFeedback):
    """CharCount labels, keeping every (first, second, label) it answered."""

    def __init__(self):
        super().__init__(CharCount())
        self.answers = []

    def judge(self, prompts, first, second):
        labels, scores = super().judge(prompts, first, second)
        self.answers += list(zip(first, second, labels.tolist()))
        return labels, scores


@pytest.fixture()
def prompts_file(tmp_path):
    return write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": p} for p in PPO_PROMPTS])


def _cfg(model_dir, data, out, *extra, sdpo=False):
    common = ("data.max_length=24", "data.max_prompt_length=12", "optim.batch_size=4", "optim.lr=3e-2")
    if sdpo:
        return stage_config(
            "iterative-dpo", model_dir, "algo.mode=sdpo", f"data.pairs_path={data}", *common, *extra, out=out
        )
    return stage_config(
        "iterative-dpo",
        model_dir,
        "algo.reward_model=rule:length",  # replaced by the feedback the tests pass in
        "algo.prompts_per_round=8",
        "sampling.max_new_tokens=6",
        *common,
        *extra,
        data=data,
        out=out,
    )


def _dpo_config(run: Path, rnd: int) -> dict:
    return yaml.safe_load((run / f"round-{rnd}" / "dpo" / "config.yaml").read_text())


def _pairs(run: Path, rnd: int) -> list[dict]:
    return [json.loads(line) for line in (run / f"round-{rnd}" / "pairs.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("reference", ["round_start", "initial"])
def test_rounds_chain_models_and_pick_the_reference(tiny_model_dir, prompts_file, tmp_path, reference):
    run = tmp_path / "run"
    cfg = _cfg(tiny_model_dir, prompts_file, run, "algo.rounds=2", f"algo.reference={reference}")
    feedback = Recording()
    final = iterative_dpo.train(cfg, feedback=feedback)
    first, second = _dpo_config(run, 1), _dpo_config(run, 2)
    assert first["model"]["name_or_path"] == str(tiny_model_dir) == first["ref_model"]
    assert second["model"]["name_or_path"] == str(run / "round-1" / "dpo" / "final")
    expected_ref = second["model"]["name_or_path"] if reference == "round_start" else str(tiny_model_dir)
    assert second["ref_model"] == expected_ref
    assert second["data"]["train_path"] == str(run / "round-2" / "pairs.jsonl")
    assert second["optim"]["lr"] == 3e-2 and second["algo"]["beta"] == 0.1
    # RUN/final and the per-round snapshots are copies of the rounds' final models.
    assert final == run / "final"
    assert_same_tensors(causal_lm_state(final), causal_lm_state(run / "round-2" / "dpo" / "final"))
    assert_same_tensors(
        causal_lm_state(snapshot_dir(run, 1)), causal_lm_state(run / "round-1" / "dpo" / "final")
    )
    assert not any(p.is_symlink() for p in run.rglob("*"))
    # Each pairs file is the round's decided answers, chosen = the higher word count, in the order asked;
    # queries count every distinct pair asked, logged cumulatively per round.
    decided = [(a, b, lab) for a, b, lab in feedback.answers if lab in (0.0, 1.0) and a.strip() and b.strip()]
    written = _pairs(run, 1) + _pairs(run, 2)
    assert [(r["chosen"], r["rejected"]) for r in written] == [
        (a, b) if lab == 1.0 else (b, a) for a, b, lab in decided
    ]
    assert all(len(r["chosen"]) > len(r["rejected"]) for r in written)
    rows = read_metrics(run / "metrics.jsonl")
    per_round = [r for r in rows if "feedback/queries" in r]
    assert [r["step"] for r in per_round] == [1, 2]
    assert per_round[-1]["feedback/queries"] == len(feedback.answers) == feedback.queries
    assert [r["feedback/pairs_kept"] for r in per_round] == [len(_pairs(run, 1)), len(_pairs(run, 2))]
    assert all(
        sum(r[f"feedback/{k}"] for k in ("ties", "pairs_kept", "identical", "empty_response")) == 8
        for r in per_round
    )
    assert all("dpo/loss" in r and "dpo/accuracy" in r for r in per_round)
    # Each round's row carries its DPO run's last FLOP/s and the round's time split.
    for rnd, r in enumerate(per_round, 1):
        dpo_rows = [
            x for x in read_metrics(run / f"round-{rnd}" / "dpo" / "metrics.jsonl") if "perf/flops_per_s" in x
        ]
        assert r["perf/flops_per_s"] == dpo_rows[-1]["perf/flops_per_s"] > 0
        assert r["perf/time_sample_and_ask"] > 0 and r["perf/time_train"] > 0
        assert 0 < r["loss/entropy_rollout"] <= math.log(load_tokenizer(tiny_model_dir).vocab_size)
    # Round 1 samples the initial model (KL 0); round 2's policy has moved (lr 3e-2).
    assert per_round[0]["kl/sequence"] == 0.0 and abs(per_round[1]["kl/sequence"]) > 1e-4


def test_sdpo_splits_the_pairs_into_stages(tiny_model_dir, tmp_path):
    rows = [{"prompt": f"p {i}", "chosen": "good good", "rejected": "bad"} for i in range(14)]
    pairs = write_jsonl(tmp_path / "pairs.jsonl", rows)
    run = tmp_path / "run"
    iterative_dpo.train(_cfg(tiny_model_dir, pairs, run, "algo.rounds=3", sdpo=True))
    stages = [_pairs(run, r) for r in (1, 2, 3)]
    assert [len(s) for s in stages] == [5, 4, 5] and sum(stages, []) == rows  # contiguous, in file order
    for r in (2, 3):  # each stage's reference is the previous stage's model
        prev = str(run / f"round-{r - 1}" / "dpo" / "final")
        assert _dpo_config(run, r)["model"]["name_or_path"] == _dpo_config(run, r)["ref_model"] == prev
    assert [m["feedback/pairs_kept"] for m in read_metrics(run / "metrics.jsonl") if "dpo/loss" in m] == [
        5,
        4,
        5,
    ]
    with pytest.raises(ConfigError, match="fewer than algo.rounds"):
        iterative_dpo.train(_cfg(tiny_model_dir, pairs, tmp_path / "b", "algo.rounds=4", sdpo=True))


def test_resume_skips_finished_rounds(tiny_model_dir, prompts_file, tmp_path, monkeypatch):
    def run(out, resume=False):
        cfg = _cfg(tiny_model_dir, prompts_file, out, "algo.rounds=3")
        feedback = RewardFeedback(CharCount(), mode="bradley_terry", seed=0)
        return iterative_dpo.train(cfg, resume=resume, feedback=feedback)

    ref = run(tmp_path / "a")
    real, calls = iterative_dpo.dpo.train, []

    def crash_in_round_3(cfg, **kw):
        calls.append(cfg.logging.output_dir)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(cfg, **kw)

    monkeypatch.setattr(iterative_dpo.dpo, "train", crash_in_round_3)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "b")
    calls.clear()
    resumed = run(tmp_path / "b", resume=True)
    assert calls == [str(tmp_path / "b" / "round-3" / "dpo")]  # rounds 1 and 2 were not trained again
    assert_same_tensors(causal_lm_state(ref), causal_lm_state(resumed))
    a, b = (read_metrics(tmp_path / d / "metrics.jsonl") for d in ("a", "b"))
    key = "feedback/queries"
    assert [r[key] for r in a if key in r] == [r[key] for r in b if key in r]
    assert _pairs(tmp_path / "a", 3) == _pairs(tmp_path / "b", 3)


def test_reward_rises_over_rounds(tiny_model_dir, tmp_path):
    """Labels from the count of "good" lift that count in the policy's own samples, round over round (each
    round's score is of its starting policy's samples: round 3 samples the model two DPO runs made)."""
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": p} for p in PPO_PROMPTS * 8])
    run = tmp_path / "run"
    cfg = _cfg(
        tiny_model_dir,
        prompts,
        run,
        "algo.rounds=3",
        "algo.prompts_per_round=64",
        "sampling.max_new_tokens=10",
        "optim.batch_size=8",
        "optim.epochs=2",
    )
    iterative_dpo.train(cfg, feedback=RewardFeedback(WordCount()))
    scores = [r["reward/score"] for r in read_metrics(run / "metrics.jsonl") if "reward/score" in r]
    assert len(scores) == 3 and scores[2] > scores[1] > scores[0] and scores[2] > scores[0] + 1.0, scores


def test_config_refusals_and_registration(tiny_model_dir, prompts_file, tmp_path):
    with pytest.raises(ConfigError, match="algo.loss is kto, a loss of unpaired"):
        load_config("iterative-dpo", None, ["algo.loss=kto"])
    with pytest.raises(ConfigError, match="algo.prompts_per_round is set but algo.mode=sdpo"):
        load_config("iterative-dpo", None, ["algo.mode=sdpo", "algo.prompts_per_round=4"])
    with pytest.raises(ConfigError, match="algo.feedback is set but algo.mode=sdpo"):
        load_config("iterative-dpo", None, ["algo.mode=sdpo", "algo.feedback=lab"])
    with pytest.raises(ConfigError, match="algo.reference is initial, but sDPO"):
        load_config("iterative-dpo", None, ["algo.mode=sdpo", "algo.reference=initial"])
    with pytest.raises(ConfigError, match="algo.reference is set but algo.loss=simpo"):
        load_config("iterative-dpo", None, ["algo.loss=simpo", "algo.reference=initial"])
    with pytest.raises(ConfigError, match="data.pairs_path is set but algo.mode=iterative"):
        load_config("iterative-dpo", None, ["data.pairs_path=x.jsonl"])
    with pytest.raises(ConfigError, match="data.train_path is set but algo.mode=sdpo"):
        load_config("iterative-dpo", None, ["algo.mode=sdpo", "data.train_path=x.jsonl"])
    with pytest.raises(ConfigError, match="logging.save_every is not used by iterative-dpo"):
        load_config("iterative-dpo", None, ["logging.save_every=2"])
    with pytest.raises(ConfigError, match="algo.reward_model is set but algo.feedback=lab"):
        load_config("iterative-dpo", None, ["algo.feedback=lab", "algo.reward_model=rule:length"])
    with pytest.raises(ConfigError, match="unknown key 'algo.iterations'"):
        load_config("iterative-dpo", None, ["algo.iterations=3"])
    # No reward to ask; the lab's annotators with no source passed in: refused before a run directory exists.
    with pytest.raises(ConfigError, match="algo.reward_model is empty"):
        iterative_dpo.train(
            stage_config("iterative-dpo", tiny_model_dir, data=prompts_file, out=tmp_path / "a")
        )
    lab = stage_config(
        "iterative-dpo", tiny_model_dir, "algo.feedback=lab", data=prompts_file, out=tmp_path / "b"
    )
    with pytest.raises(ConfigError, match="algo.feedback=lab asks the lab's simulated annotators"):
        iterative_dpo.train(lab)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    assert record_kind("iterative-dpo", load_config("iterative-dpo")) == "prompt"
    assert record_kind("iterative-dpo", load_config("iterative-dpo", None, ["algo.mode=sdpo"])) == "pairwise"
    shipped = load_config("iterative-dpo", Path(__file__).parents[2] / "configs" / "iterative_dpo_tiny.yaml")
    assert shipped.algo.rounds == 3 and shipped.logging.snapshot_every == 1


def test_sequence_kl_is_the_summed_log_ratio_of_the_sampled_tokens(tiny_model_dir):
    """The per-round KL against a forward pass done by hand: sum over response tokens of log pi - log ref at
    the sampling temperature, averaged over responses; 0 against itself."""
    tokenizer = load_tokenizer(tiny_model_dir)
    policy = load_causal_lm(tiny_model_dir).eval()
    ref = perturb_(load_causal_lm(tiny_model_dir), 0.05, seed=1).eval()
    rollout = generate(policy, tokenizer, PPO_PROMPTS[:5] * 3, SamplingSettings(max_new_tokens=5), seed=0)

    def logps(model):
        with torch.no_grad():
            logits = model(
                input_ids=rollout.input_ids,
                attention_mask=rollout.attention_mask,
                position_ids=rollout.position_ids,
            ).logits[:, rollout.response_start - 1 : -1]
        lp = torch.log_softmax(logits.float() / 0.8, dim=-1)
        return lp.gather(-1, rollout.response_ids.unsqueeze(-1)).squeeze(-1)

    expected = ((logps(policy) - logps(ref)) * rollout.response_mask).sum(-1).mean()
    old_batch = iterative_dpo.SAMPLE_BATCH
    try:
        iterative_dpo.SAMPLE_BATCH = 4  # several batches, the last one short
        got = float(iterative_dpo._sequence_kl(policy, ref, rollout, 0.8).mean())
    finally:
        iterative_dpo.SAMPLE_BATCH = old_batch
    assert got == pytest.approx(float(expected), rel=1e-4, abs=1e-5) and abs(got) > 1e-3
    assert iterative_dpo._sequence_kl(policy, policy, rollout, 0.8).abs().max() == pytest.approx(
        0.0, abs=1e-6
    )


def test_pairs_do_not_depend_on_how_the_prompts_are_batched(
    tiny_model_dir, prompts_file, tmp_path, monkeypatch
):
    """Every response comes from the seed of its row in the round, so a round's pairs are the same whether its
    16 rows are sampled in one batch or in batches of 3 (a pair split across two): what lets processes share
    out the prompts (tests/stages/test_parallel.py runs two)."""
    runs = {}
    for batch in (iterative_dpo.SAMPLE_BATCH, 3):
        monkeypatch.setattr(iterative_dpo, "SAMPLE_BATCH", batch)
        run = tmp_path / f"batch-{batch}"
        iterative_dpo.train(_cfg(tiny_model_dir, prompts_file, run, "algo.rounds=1"), feedback=Recording())
        runs[batch] = _pairs(run, 1)
    one, split = runs.values()
    assert one == split and len(one) >= 4
    assert len({r["chosen"] for r in one}) > 1  # sampled, not one response everywhere


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            ["algo.reward_model=rule:length", "algo.feedback_mode=bradley_terry"],
            "reward draws labels from one random",
        ),
        (["algo.feedback=lab"], "lab draws the simulated annotators' labels from one random stream"),
        (
            ["algo.feedback=human", "algo.label_db=sqlite:///x.db", "algo.label_project=p"],
            "human asks people",
        ),
    ],
)
def test_feedback_that_depends_on_the_process_count_is_refused_across_processes(
    overrides, message, tiny_model_dir, prompts_file, tmp_path, monkeypatch
):
    """Each process asks about its share of the pairs: a source drawing from one random stream would label
    them differently for each process count, and people answer through one queue: refused before anything."""
    cfg = stage_config("iterative-dpo", tiny_model_dir, *overrides, data=prompts_file, out=tmp_path / "run")
    passed = Recording() if "algo.feedback=lab" in overrides else None  # the command line builds the lab's
    with pytest.raises(ConfigError, match=f"algo.feedback={message}.*across processes \\(WORLD_SIZE=2\\)"):
        iterative_dpo.preflight(cfg, feedback=passed, world=2)
    monkeypatch.setenv("WORLD_SIZE", "2")  # as torchrun sets it
    with pytest.raises(ConfigError, match="run iterative-dpo in one process"):
        iterative_dpo.preflight(cfg, feedback=passed)
    monkeypatch.delenv("WORLD_SIZE")
    if "algo.feedback=human" not in overrides:  # one process takes them (the label database is not made here)
        iterative_dpo.preflight(cfg, feedback=passed)
    drawn = stage_config("iterative-dpo", tiny_model_dir, "algo.reward_model=rule:length", data=prompts_file)
    iterative_dpo.preflight(drawn, world=2)  # argmax labels are the pair's own
    with pytest.raises(ConfigError, match="random stream"):  # a source passed in says how it labels
        iterative_dpo.preflight(drawn, feedback=RewardFeedback(CharCount(), mode="bradley_terry"), world=2)
