import json

import pytest
import torch

from rlhflab.config import load_config
from rlhflab.core.checkpoint import latest_checkpoint
from rlhflab.core.metrics_log import read_metrics
from rlhflab.errors import TrainingHealthError
from rlhflab.stages import ppo


class WordCount:
    """A programmatic reward: how often `word` appears in the response."""

    def __init__(self, word="good"):
        self.word = word

    def score(self, prompts, responses):
        return torch.tensor([r.split().count(self.word) for r in responses], dtype=torch.float32)


@pytest.fixture()
def prompts_file(tmp_path):
    rows = [
        {"prompt": p}
        for p in [
            "the cat",
            "the dog",
            "i say",
            "what is",
            "how was the film",
            "the day was",
            "we like",
            "you hate",
        ]
    ] * 4
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _cfg(model_dir, prompts, out, *extra):
    return load_config(
        "ppo",
        None,
        [
            f"model.name_or_path={model_dir}",
            f"data.train_path={prompts}",
            f"logging.output_dir={out}",
            "model.device=cpu",
            "logging.progress=false",
            "logging.tensorboard=false",
            "logging.log_every=1",
            "algo.rollout_batch_size=32",
            "algo.minibatch_size=16",
            "algo.ppo_epochs=2",
            "sampling.max_new_tokens=8",
            "optim.lr=5e-3",
            "algo.kl_coef=0.01",
            *extra,
        ],
    )


def test_ppo_increases_a_programmatic_reward(tiny_model_dir, prompts_file, tmp_path):
    final = ppo.train(
        _cfg(tiny_model_dir, prompts_file, tmp_path / "run", "algo.iterations=16"), reward=WordCount()
    )
    rows = read_metrics(tmp_path / "run" / "metrics.jsonl")
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


def test_ppo_resume_is_exact(tiny_model_dir, prompts_file, tmp_path, monkeypatch):
    common = ["algo.iterations=4", "logging.save_every=2", "algo.adaptive_kl=true"]
    ref_final = ppo.train(_cfg(tiny_model_dir, prompts_file, tmp_path / "a", *common), reward=WordCount())

    real = ppo._append_rollouts
    calls = {"n": 0}

    def crash_on_third(*args):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        real(*args)

    monkeypatch.setattr(ppo, "_append_rollouts", crash_on_third)
    with pytest.raises(KeyboardInterrupt):
        ppo.train(_cfg(tiny_model_dir, prompts_file, tmp_path / "b", *common), reward=WordCount())
    monkeypatch.setattr(ppo, "_append_rollouts", real)
    assert latest_checkpoint(tmp_path / "b").name == "step-00000002"
    resumed = ppo.train(
        _cfg(tiny_model_dir, prompts_file, tmp_path / "b", *common), resume=True, reward=WordCount()
    )
    from transformers import AutoModelForCausalLM

    a = AutoModelForCausalLM.from_pretrained(ref_final).state_dict()
    b = AutoModelForCausalLM.from_pretrained(resumed).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


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
    state = torch.load(latest_checkpoint(tmp_path / "run") / "model.pt", weights_only=True)
    assert all(torch.isfinite(v).all() for v in state.values())


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
    rows = read_metrics(out / "metrics.jsonl")
    assert len(rows) == 2
    # Whitened over the rollout batch: mean 0 (up to float rounding) and unit spread.
    assert all(abs(r["reward/score"]) < 1e-5 for r in rows)
    assert all(abs(r["reward/score_std"] - 1.0) < 1e-3 for r in rows)
    from transformers import AutoModelForCausalLM

    start = AutoModelForCausalLM.from_pretrained(tiny_model_dir).state_dict()
    trained = AutoModelForCausalLM.from_pretrained(out / "final").state_dict()
    assert any(not torch.equal(trained[k], start[k]) for k in start)  # the saved policy is the trained one
