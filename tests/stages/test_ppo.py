import json

import pytest
import torch

from rlhflab.core.metrics_log import read_metrics
from rlhflab.errors import TrainingHealthError
from rlhflab.stages import ppo

from ..helpers import (
    PPO_PROMPTS,
    assert_resume_matches,
    assert_stopped_with_checkpoint_intact,
    causal_lm_state,
    stage_config,
    write_jsonl,
)


class WordCount:
    """A programmatic reward: how often `word` appears in the response."""

    def __init__(self, word="good"):
        self.word = word

    def score(self, prompts, responses):
        return torch.tensor([r.split().count(self.word) for r in responses], dtype=torch.float32)


@pytest.fixture()
def prompts_file(tmp_path):
    return write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": p} for p in PPO_PROMPTS[:8]] * 4)


def _cfg(model_dir, prompts, out, *extra):
    return stage_config(
        "ppo",
        model_dir,
        "algo.rollout_batch_size=32",
        "algo.minibatch_size=16",
        "algo.ppo_epochs=2",
        "sampling.max_new_tokens=8",
        "optim.lr=5e-3",
        "algo.kl_coef=0.01",
        *extra,
        data=prompts,
        out=out,
    )


def test_ppo_increases_a_programmatic_reward(tiny_model_dir, prompts_file, tmp_path):
    final = ppo.train(
        _cfg(tiny_model_dir, prompts_file, tmp_path / "run", "algo.iterations=16"), reward=WordCount()
    )
    rows = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "reward/score" in r]
    first = sum(r["reward/score"] for r in rows[:3]) / 3
    last = sum(r["reward/score"] for r in rows[-3:]) / 3
    assert last > first + 0.5, (first, last)
    for key in (
        "kl/sequence",
        "loss/clipfrac",
        "loss/value_error",
        "perf/time_generate",
        "perf/time_optimize",
        "perf/response_length",
        "loss/entropy_rollout",
    ):
        assert key in rows[-1]
    lines = (tmp_path / "run" / "rollouts.jsonl").read_text().splitlines()
    assert (
        len(lines) == 16 * 32
        and {"iteration", "prompt", "response", "score", "kl"} <= json.loads(lines[0]).keys()
    )
    from rlhflab.models.heads import ValueHead

    # The trained value head, not a fresh one: its bias starts at exactly 0 and the value loss moved it.
    head = ValueHead.load(final / "value_head.safetensors")
    assert head.linear.weight.shape == (1, 32) and head.linear.bias.item() != 0.0
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(final)  # a plain HF directory


def test_ppo_kl_is_zero_at_start_and_separate_critic_runs(tiny_model_dir, prompts_file, tmp_path):
    ppo.train(
        _cfg(
            tiny_model_dir,
            prompts_file,
            tmp_path / "run",
            "algo.iterations=1",
            "algo.separate_critic=true",
            "algo.adaptive_kl=true",
            "algo.target_kl=1",
        ),
        reward=WordCount(),
    )
    row = read_metrics(tmp_path / "run" / "metrics.jsonl")[0]
    # Policy == reference before the first update: the sampled KL estimate is exactly 0.
    assert row["kl/sequence"] == pytest.approx(0.0, abs=1e-5)
    # The logged coefficient is the one that shaped this iteration's rewards: the initial 0.01.
    assert row["kl/coef"] == pytest.approx(0.01)
    from rlhflab.models.heads import Critic

    # The critic saved is the trained one: its fresh head's bias (exactly 0) moved in the one iteration.
    critic = Critic.from_pretrained(tmp_path / "run" / "critic")
    assert critic.value_head.linear.in_features == 32 and critic.value_head.linear.bias.item() != 0.0


def test_ppo_resume_is_exact(tiny_model_dir, prompts_file, tmp_path):
    def run(out, resume):
        common = ["algo.iterations=4", "logging.save_every=2", "algo.adaptive_kl=true"]
        return ppo.train(_cfg(tiny_model_dir, prompts_file, out, *common), resume=resume, reward=WordCount())

    # Ctrl-C while the 3rd iteration's rollouts are written: resumed from the step-2 checkpoint.
    assert_resume_matches(
        run, tmp_path, crash_in=(ppo, "append_rollouts"), crash_on_call=3, checkpoint_step=2
    )


def test_ppo_stops_on_nan_reward(tiny_model_dir, prompts_file, tmp_path):
    class NaNAfterTwo(WordCount):
        calls = 0

        def score(self, prompts, responses):
            NaNAfterTwo.calls += 1
            out = super().score(prompts, responses)
            return out * float("nan") if NaNAfterTwo.calls > 2 else out

    with pytest.raises(TrainingHealthError, match="step 3: reward/score is not finite.*step-00000002"):
        ppo.train(
            _cfg(tiny_model_dir, prompts_file, tmp_path / "run", "algo.iterations=4", "logging.save_every=2"),
            reward=NaNAfterTwo(),
        )
    assert_stopped_with_checkpoint_intact(tmp_path / "run", 2)


def test_ppo_trains_on_a_llama2_gated_reward_from_the_config(tiny_model_dir, prompts_file, tmp_path):
    # Two reward sources named in the config, combined by Llama 2's safety gate (whitened per batch).
    out = tmp_path / "run"
    ppo.train(
        _cfg(
            tiny_model_dir,
            prompts_file,
            out,
            "algo.iterations=2",
            "algo.reward_model=rule:length:coef=0.1,rule:regex:pattern=hate:mode=must_not:penalty=4",
            "algo.reward_combine=llama2_gate",
            "algo.unsafe_prompt_pattern=you hate",
        )
    )
    rows = [r for r in read_metrics(out / "metrics.jsonl") if "reward/score" in r]
    assert len(rows) == 2
    # Whitened over the rollout batch: mean 0 (up to float rounding) and unit spread.
    assert all(abs(r["reward/score"]) < 1e-5 for r in rows)
    assert all(abs(r["reward/score_std"] - 1.0) < 1e-3 for r in rows)
    start, trained = causal_lm_state(tiny_model_dir), causal_lm_state(out / "final")
    assert any(not torch.equal(trained[k], start[k]) for k in start)  # the saved policy is the trained one
