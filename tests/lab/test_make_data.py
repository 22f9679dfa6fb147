import json
from collections import Counter

import pytest

from rlhflab.data import LLAMA2_RATINGS, load_records
from rlhflab.errors import ConfigError
from rlhflab.lab.annotators import AnnotatorSettings
from rlhflab.lab.gold import gold_scores
from rlhflab.lab.make_data import make_task_data
from rlhflab.lab.tasks import prompt_text
from rlhflab.losses.reward import LLAMA2_MARGINS


def test_sentiment_data_loads_in_every_foundation_format(tmp_path):
    settings = AnnotatorSettings(temperature=0.1, margin_table="large", tie_margin=0.02, keep_ties=True)
    paths = make_task_data(
        "sentiment",
        tmp_path,
        n_sft=60,
        n_pairs=400,
        n_prompts=30,
        n_heldout=20,
        n_rankings=30,
        k=3,
        n_unpaired=40,
        annotator_settings=settings,
        seed=1,
    )
    kinds = {
        "sft": "sft",
        "pairs": "pairwise",
        "prompts": "prompt",
        "heldout": "prompt",
        "rankings": "ranked",
        "unpaired": "unpaired",
    }
    loaded = {}
    for key, kind in kinds.items():
        result = load_records(paths[key], kind)
        assert result.n_skipped == 0, result.skipped_errors
        loaded[key] = result.records
    manifest = json.loads(paths["manifest"].read_text())
    assert len(loaded["sft"]) == 60 and len(loaded["prompts"]) == 30 and len(loaded["heldout"]) == 20
    assert len(loaded["pairs"]) == manifest["counts"]["pairs"] > 300
    assert 20 < len(loaded["rankings"]) <= 30 and all(len(r.responses) == 3 for r in loaded["rankings"])
    assert len(loaded["unpaired"]) == 40 and {r.label for r in loaded["unpaired"]} == {True, False}
    # Prompts are chat conversations, the form the base model was pretrained on.
    assert loaded["sft"][0].prompt == [{"role": "user", "content": prompt_text(loaded["sft"][0].prompt)}]
    for rec in loaded["pairs"]:
        assert (
            rec.rating in LLAMA2_RATINGS
            and rec.margin == LLAMA2_MARGINS["large"][LLAMA2_RATINGS.index(rec.rating)]
        )
    stats = manifest["pairs"]
    assert abs(stats["agreement_with_gold"] - stats["predicted_agreement"]) < 0.06
    # The statistics count the file: with keep_ties every distinct pair of the 400 prompts is written.
    assert stats["ties"] > 0 and stats["n"] == len(loaded["pairs"]) == 400 - stats["dropped_identical"]
    assert stats["ratings"] == dict(Counter(r.rating for r in loaded["pairs"]))
    assert manifest["gold"]["sft_data"]["mean"] < manifest["gold"]["best_achievable_heldout"] - 0.3


def test_pairs_prefer_higher_gold_and_files_are_deterministic(tmp_path):
    settings = AnnotatorSettings(temperature=0.0)
    # Two runs with the same seed, into two directories.
    a, b = (
        make_task_data(
            "sentiment",
            tmp_path / name,
            n_sft=10,
            n_pairs=200,
            n_prompts=5,
            n_heldout=5,
            annotator_settings=settings,
            seed=3,
        )
        for name in ("a", "b")
    )
    for key in ("sft", "pairs", "prompts", "heldout"):
        assert a[key].read_text() == b[key].read_text()
    rows = [json.loads(line) for line in a["pairs"].read_text().splitlines()]
    prompts = [prompt_text(r["prompt"]) for r in rows]
    chosen = gold_scores("sentiment", prompts, [r["chosen"] for r in rows])
    rejected = gold_scores("sentiment", prompts, [r["rejected"] for r in rows])
    assert (chosen >= rejected).all()


def test_arith_step_labels_and_plain_text(tmp_path):
    paths = make_task_data(
        "arith", tmp_path, n_sft=20, n_pairs=50, n_prompts=10, n_heldout=10, n_steps=30, chat=False, seed=0
    )
    rows = [json.loads(line) for line in paths["steps"].read_text().splitlines()]
    assert len(rows) == 30 and all(isinstance(r["prompt"], str) for r in rows)
    assert all(len(r["step_labels"]) == len(task_operands(r["prompt"])) - 1 for r in rows)
    with pytest.raises(ConfigError, match="steps"):
        make_task_data("sentiment", tmp_path / "s", n_sft=2, n_pairs=2, n_prompts=2, n_heldout=2, n_steps=3)


def task_operands(prompt):
    from rlhflab.lab.tasks.arith import prompt_operands

    return prompt_operands(prompt)


def test_pairs_from_the_base_model(tmp_path, lab_cache, sentiment_base_dir):
    paths = make_task_data(
        "sentiment",
        tmp_path,
        n_sft=5,
        n_pairs=40,
        n_prompts=5,
        n_heldout=5,
        pair_source="base",
        budget="tiny",
        cache_dir=lab_cache,
        seed=0,
    )
    records = load_records(paths["pairs"], "pairwise").records
    assert len(records) > 20
    with pytest.raises(ConfigError, match="model directory"):
        make_task_data(
            "sentiment",
            tmp_path / "x",
            n_sft=2,
            n_pairs=2,
            n_prompts=2,
            n_heldout=2,
            pair_source=str(tmp_path / "missing"),
        )


def test_bad_arguments(tmp_path):
    with pytest.raises(ConfigError):
        make_task_data("sentiment", tmp_path, n_sft=-1)
    with pytest.raises(ConfigError):
        make_task_data("sentiment", tmp_path, n_rankings=3, k=1)
