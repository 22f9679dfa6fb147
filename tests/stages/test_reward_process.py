"""`rlhflab rm algo.loss=step`: a process reward model on stepwise data. Wiring (the stage's loss on a batch is
the loss library's, on scores read row by row), learning (held-out step accuracy well above chance on a learnable
toy), what it saves, and the config and data it refuses."""

from __future__ import annotations

import json
import random

import pytest
import torch

from rlhflab.config import load_config
from rlhflab.core.metrics_log import read_metrics
from rlhflab.data.reward_batch import collate_reward_batch
from rlhflab.errors import ConfigError, DataError
from rlhflab.losses import process_reward_loss
from rlhflab.models.loading import load_tokenizer
from rlhflab.models.reward_model import RewardModel
from rlhflab.rewards import LearnedReward, ProcessReward
from rlhflab.stages import reward, reward_data

from ..helpers import SHORT_TEXT, stage_config, write_jsonl

SUBJECTS = ["the cat", "the dog", "the film", "the day", "it"]


def _solutions(n=160, seed=0):
    """A learnable toy: a step is right when it says "good", wrong when it says "bad"; labels stop at the first
    wrong step (Lightman et al.'s convention), so later steps are unlabelled."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        steps, labels = [], []
        for _ in range(rng.randint(1, 3)):
            good = rng.random() < 0.6
            steps.append(f"{rng.choice(SUBJECTS)} is {'good' if good else 'bad'}")
            labels.append(good)
            if not good:
                break
        rows.append({"prompt": f"what is {rng.choice(SUBJECTS)} ?", "completions": steps, "labels": labels})
    return rows


def _cfg(model_dir, out, data, *extra):
    return stage_config(
        "rm",
        model_dir,
        *SHORT_TEXT,
        "algo.loss=step",
        "data.step_separator=' , '",
        *extra,
        data=data,
        out=out,
    )


def test_prm_wiring_learning_and_saved_scorer(tiny_model_dir, tmp_path):
    rows = _solutions()
    data = write_jsonl(tmp_path / "steps.jsonl", rows)
    out = tmp_path / "run"
    cfg = _cfg(
        tiny_model_dir, out, data, "optim.max_steps=40", "data.eval_fraction=0.25", "logging.eval_every=20"
    )
    final = reward.train(cfg)

    # Learning: held-out step accuracy far above the majority class (the share of right steps), loss down.
    evals = [r for r in read_metrics(out / "metrics.jsonl") if "eval/accuracy" in r]
    _, held = reward_data.load_examples(cfg, "stepwise", load_tokenizer(tiny_model_dir), out)
    labels = [y for e in held for y in e["step_labels"]]
    chance = max(sum(labels), len(labels) - sum(labels)) / len(labels)
    assert evals[0]["step"] == 0 and evals[-1]["step"] == 40
    assert evals[-1]["eval/accuracy"] > max(0.9, chance + 0.2), (evals[-1], chance)
    assert evals[-1]["eval/auc"] > 0.95 and evals[-1]["eval/solution_accuracy"] > 0.85
    assert evals[-1]["eval/loss"] < 0.5 * evals[0]["eval/loss"]

    # Wiring: the stage's loss on a batch equals `process_reward_loss` on scores read one unpadded row at a time.
    model = RewardModel.from_pretrained(final)
    examples, _ = reward_data.load_examples(cfg, "stepwise", load_tokenizer(tiny_model_dir), out)
    batch = collate_reward_batch(examples[:8], "stepwise", pad_id=0)
    got = reward._batch_loss(model, batch, "stepwise", cfg, torch.device("cpu"))
    with torch.no_grad():
        scores = torch.zeros(batch["input_ids"].shape)
        for i, e in enumerate(examples[:8]):
            ids = torch.tensor([e["input_ids"]])
            scores[i, : ids.shape[1]] = model.token_rewards(ids, torch.ones_like(ids))[0, :, 0]
    expected = process_reward_loss(scores, batch["step_labels"], batch["step_mask"])
    torch.testing.assert_close(got.loss, expected.loss, atol=1e-5, rtol=0)
    assert got.metrics["reward/steps"].tolist() == [len(e["step_positions"]) for e in examples[:8]]

    # The saved model scores new responses as a ProcessReward: split at ' , ', product of step probabilities.
    settings = json.loads((final / "rlhflab_reward.json").read_text())
    assert settings["loss"] == "step" and settings["step_separator"] == " , "
    assert set(settings["score_stats"]) == {"product", "min"}
    prm = LearnedReward.from_pretrained(final)
    assert isinstance(prm, ProcessReward) and prm.aggregate == "product" and prm.name == "learned_product"
    prompts = ["what is the cat ?"] * 4
    responses = ["the cat is good , it is good", "the cat is good , it is bad", "the dog is bad", ""]
    probs = prm.step_probabilities(prompts, responses)
    assert [len(p) for p in probs] == [2, 2, 1, 0]
    assert probs[0].min() > 0.7 and probs[1][1] < 0.3 and probs[2][0] < 0.3
    product = prm.score(prompts, responses)
    torch.testing.assert_close(product[:3], torch.stack([p.prod() for p in probs[:3]]))
    assert product[3] == 0.0  # no step: nothing shown right
    worst = LearnedReward.from_pretrained(final, aggregate="min").score(prompts, responses)
    torch.testing.assert_close(worst[:3], torch.stack([p.min() for p in probs[:3]]))
    whitened = LearnedReward.from_pretrained(final, normalize=True).score(prompts, responses)
    stats = settings["score_stats"]["product"]
    torch.testing.assert_close(whitened, (product - stats["mean"][0]) / stats["std"][0])


def test_prm_config_and_data_are_checked(tiny_model_dir, tmp_path):
    with pytest.raises(ConfigError, match="data.step_separator.*read only by algo.loss=step"):
        load_config("rm", None, ["data.step_separator=' , '"])
    with pytest.raises(ConfigError, match="algo.loss=step reads each step's label"):
        load_config("rm", None, ["algo.loss=step", "algo.label_smoothing=0.1"])
    with pytest.raises(ConfigError, match="algo.center_rewards_coef"):
        load_config("rm", None, ["algo.loss=step", "algo.center_rewards_coef=0.01"])
    with pytest.raises(ConfigError, match="data.step_separator.*is empty"):
        load_config("rm", None, ["algo.loss=step", "data.step_separator="])
    # A step holding the separator would be split differently when scored: refused with file, record and field.
    bad = write_jsonl(
        tmp_path / "bad.jsonl",
        [{"prompt": "what is it ?", "completions": ["it is good , it is bad"], "labels": [True]}],
    )
    with pytest.raises(
        DataError, match=r"bad\.jsonl, record with prompt 'what is it \?', field 'completions'"
    ):
        reward.train(_cfg(tiny_model_dir, tmp_path / "r1", bad, "optim.max_steps=1"))
    # Pairwise data given to a step loss names the missing field.
    pairs = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": "hi", "chosen": "good", "rejected": "bad"}])
    with pytest.raises(DataError, match=r"pairs\.jsonl, line 1, field 'completions': is missing"):
        reward.train(_cfg(tiny_model_dir, tmp_path / "r2", pairs, "optim.max_steps=1"))
