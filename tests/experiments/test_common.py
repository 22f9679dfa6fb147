"""What experiments share: the split of the user's overrides between the pipeline and the experiment."""

import pytest

from rlhflab.errors import ConfigError
from rlhflab.experiments.common import split_overrides

OWN = {"eval": {"prompts": 256, "samples": 2}}


def test_split_sends_stage_keys_on_and_keeps_its_own_integers():
    pipeline, own = split_overrides(
        "x",
        ["ppo.optim.lr=1e-4", "eval.prompts=8", "annotators.noise=0.1"],
        own=OWN,
        pipeline=("ppo", "annotators"),
    )
    assert pipeline == ["ppo.optim.lr=1e-4", "annotators.noise=0.1"]
    assert (
        own == {"eval": {"prompts": 8, "samples": 2}} and OWN["eval"]["prompts"] == 256
    )  # defaults untouched


@pytest.mark.parametrize(
    "item, message",
    [
        ("annotators.length_bias=1", "x: 'annotators.length_bias' is set by the experiment \\(varied\\)"),
        ("grpo.optim.lr=1e-4", "x: 'grpo.optim.lr' is for something .* it takes ppo., annotators., eval.prompts, eval.samples"),
        ("eval.curve_points=3", "x: unknown key 'eval.curve_points'; known: eval.prompts, eval.samples"),
        ("eval.samples=0", "x: 'eval.samples' must be a positive integer, got 0"),
        ("eval.samples=true", "positive integer"),
        ("eval.samples=2.5", "positive integer"),
    ],
)  # fmt: skip
def test_split_refuses_what_the_experiment_does_not_take(item, message):
    with pytest.raises(ConfigError, match=message):
        split_overrides(
            "x", [item], own=OWN, pipeline=("ppo", "annotators"), fixed={"annotators.length_bias": "varied"}
        )
