"""The lab's simulated annotators as a feedback source (`rlhflab.lab.feedback.AnnotatorFeedback`) and its
construction from a stage config (`rlhflab.lab.launch.lab_feedback`)."""

import json

import numpy as np
import pytest
import torch
import yaml

from rlhflab.cli import main
from rlhflab.config import load_config
from rlhflab.core.metrics_log import read_metrics
from rlhflab.errors import ConfigError
from rlhflab.feedback import FeedbackSource
from rlhflab.lab.annotators import AnnotatorPool, AnnotatorSettings
from rlhflab.lab.feedback import AnnotatorFeedback
from rlhflab.lab.gold import gold_scores
from rlhflab.lab.launch import lab_feedback, record_kind
from rlhflab.lab.tasks import get_task, prompt_text


@pytest.fixture(scope="module")
def pairs():
    task = get_task("sentiment")
    prompts = task.train_prompts(400, seed=21)
    return prompts, task.demonstrations(prompts, seed=22), task.demonstrations(prompts, seed=23)


def _ask(fb, prompts, first, second):
    return fb.collect(fb.ask(prompts, first, second))


def test_noiseless_annotators_prefer_the_higher_gold(pairs):
    prompts, a, b = pairs
    fb = AnnotatorFeedback("sentiment", AnnotatorSettings(temperature=0.0))
    assert isinstance(fb, FeedbackSource)
    labels = _ask(fb, prompts, a, b)
    gap = gold_scores(get_task("sentiment"), prompts, a) - gold_scores(get_task("sentiment"), prompts, b)
    decided = gap != 0
    assert decided.sum() > 300
    assert labels.numpy()[decided].tolist() == (gap[decided] > 0).astype(float).tolist()
    assert fb.queries == len(prompts)


@pytest.mark.parametrize(
    "settings",
    [
        AnnotatorSettings(temperature=0.3, noise=0.2),
        AnnotatorSettings(temperature=0.1, n_annotators=3, bias_spread=0.5),
        AnnotatorSettings(temperature=0.0, tie_margin=0.2),
    ],
)
def test_labels_are_the_pools_judgments(pairs, settings):
    """Every setting acts through the pool: the labels are exactly a same-seed pool's choices, ties 0.5."""
    prompts, a, b = pairs
    labels = _ask(AnnotatorFeedback("sentiment", settings, seed=5), prompts, a, b)
    judgments = AnnotatorPool("sentiment", settings, seed=5).compare(prompts, a, b)
    expected = [0.5 if j.a_preferred is None else float(j.a_preferred) for j in judgments]
    assert labels.tolist() == expected


def test_ties_are_half_or_a_random_order_with_keep_ties(pairs):
    prompts, a, b = pairs
    tied = _ask(AnnotatorFeedback("sentiment", AnnotatorSettings(tie_margin=100.0)), prompts, a, b)
    assert (tied == 0.5).all()
    kept = _ask(
        AnnotatorFeedback("sentiment", AnnotatorSettings(tie_margin=100.0, keep_ties=True)), prompts, a, b
    )
    assert set(kept.tolist()) == {0.0, 1.0} and abs(kept.mean().item() - 0.5) < 0.1


def test_label_noise_one_half_is_chance(pairs):
    prompts, a, b = pairs
    labels = _ask(
        AnnotatorFeedback("sentiment", AnnotatorSettings(temperature=0.0, noise=0.5), seed=1), prompts, a, b
    )
    gap = gold_scores(get_task("sentiment"), prompts, a) - gold_scores(get_task("sentiment"), prompts, b)
    agree = np.mean((labels.numpy() == 1.0) == (gap > 0))
    assert abs(agree - 0.5) < 0.1


def test_state_dict_resumes_the_draws(pairs):
    prompts, a, b = pairs
    settings = AnnotatorSettings(temperature=0.5, noise=0.1)
    fb = AnnotatorFeedback("sentiment", settings, seed=2)
    _ask(fb, prompts[:50], a[:50], b[:50])
    state = fb.state_dict()
    expected = _ask(fb, prompts, a, b)
    other = AnnotatorFeedback("sentiment", settings, seed=2)
    other.load_state_dict(state)
    assert torch.equal(_ask(other, prompts, a, b), expected) and other.queries == 50 + len(prompts)


def test_lab_feedback_builds_the_configured_annotators(tmp_path):
    cfg = load_config(
        "online-dpo",
        None,
        [
            "model.name_or_path=lab:sentiment:tiny",
            "algo.feedback=lab",
            "algo.annotators.noise=0.1",
            "algo.annotators.n_annotators=3",
            "algo.annotators.keep_ties=true",
            "seed=4",
        ],
    )
    fb = lab_feedback(cfg, "online-dpo", log=lambda _: None)
    assert isinstance(fb, AnnotatorFeedback) and fb.pool.task.name == "sentiment"
    assert (fb.settings.noise, fb.settings.n_annotators, fb.settings.keep_ties) == (0.1, 3, True)
    assert lab_feedback(load_config("online-dpo"), "online-dpo") is None  # feedback=reward
    assert record_kind("online-dpo", cfg) == "prompt"
    (tmp_path / "config.json").write_text("{}")  # a model of no lab task
    plain = load_config("online-dpo", None, [f"model.name_or_path={tmp_path}", "algo.feedback=lab"])
    with pytest.raises(ConfigError, match="belongs to no lab task"):
        lab_feedback(plain, "online-dpo")


def test_the_command_line_asks_the_lab_annotators(lab_cache, monkeypatch, tmp_path, capsys):
    """`rlhflab online-dpo algo.feedback=lab` on a lab model: the annotators of its task label the pairs."""
    monkeypatch.setenv("RLHFLAB_CACHE", str(lab_cache))
    out = tmp_path / "run"
    args = [
        "online-dpo",
        "model.name_or_path=lab:sentiment:tiny",
        "algo.feedback=lab",
        "algo.annotators.temperature=0",
        "algo.iterations=2",
        "algo.prompts_per_step=4",
        "sampling.max_new_tokens=8",
        "model.device=cpu",
        "logging.progress=false",
        "logging.tensorboard=false",
        "logging.log_every=1",
        f"logging.output_dir={out}",
    ]
    assert main(args) == 0
    pairs = [json.loads(line) for line in (out / "rollouts.jsonl").read_text().splitlines()]
    asked = [p for p in pairs if p["first"] != p["second"]]
    prompts = [prompt_text(p["prompt"]) for p in asked]
    gaps = gold_scores(get_task("sentiment"), prompts, [p["first"] for p in asked])
    gaps -= gold_scores(get_task("sentiment"), prompts, [p["second"] for p in asked])
    # Noiseless annotators (temperature 0): the label is the higher gold's side (a coin flip at equal gold).
    assert [p["label"] for p, g in zip(asked, gaps) if g != 0] == [float(g > 0) for g in gaps if g != 0]
    assert len(asked) >= 6 and all(p["label"] in (0.0, 1.0) for p in asked)
    assert [r for r in read_metrics(out / "metrics.jsonl") if "feedback/queries" in r][-1][
        "feedback/queries"
    ] == len(asked)
    used = yaml.safe_load((out / "config.yaml").read_text())
    assert used["data"]["train_path"].endswith("prompts.jsonl") and used["algo"]["feedback"] == "lab"
    capsys.readouterr()
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "config.json").write_text("{}")
    assert main(["online-dpo", f"model.name_or_path={plain}", "algo.feedback=lab"]) == 2
    assert "belongs to no lab task" in capsys.readouterr().err
