import math

import pytest
import torch

from rlhflab.errors import ConfigError
from rlhflab.rewards import CombinedReward, LengthPenalty, RegexRule, Reward
from rlhflab.rewards.combined import group_by_prompt


class Fixed(Reward):
    """Scores looked up by response text."""

    def __init__(self, table, name):
        self.table, self.name = table, name

    def score(self, prompts, responses):
        return torch.tensor([self.table[r] for r in responses], dtype=torch.float32)


def test_weighted_sum_by_hand():
    """helpful [1, 3] and length -0.5 * words [-1, -2]; weights [2, 1] -> [2 - 1, 6 - 2] = [1, 4]."""
    helpful = Fixed({"a b": 1.0, "c d e f": 3.0}, "helpful")
    combined = CombinedReward.weighted_sum([helpful, LengthPenalty(coef=0.5)], [2.0, 1.0])
    parts = combined.components(["p", "p"], ["a b", "c d e f"])
    torch.testing.assert_close(parts["helpful"], torch.tensor([1.0, 3.0]))
    torch.testing.assert_close(parts["length"], torch.tensor([-1.0, -2.0]))
    torch.testing.assert_close(parts["weighted_sum"], torch.tensor([1.0, 4.0]))
    torch.testing.assert_close(combined.score(["p", "p"], ["a b", "c d e f"]), torch.tensor([1.0, 4.0]))
    with pytest.raises(ConfigError, match="one weight per source"):
        CombinedReward.weighted_sum([helpful], [1.0, 2.0])


def test_llama2_gate_by_hand():
    """helpful 2 everywhere; safety logits [0, -3, 1]; prompt 0 flagged unsafe.
    row 0 flagged -> 0; row 1 sigma(-3) = 0.047 < 0.15 -> -3; row 2 -> helpful 2. Raw [0, -3, 2];
    whitened (unbiased std 2.516611) [0.132453, -1.059626, 0.927173]."""
    responses = ["x", "y", "z"]
    helpful = Fixed({"x": 2.0, "y": 2.0, "z": 2.0}, "helpful")
    safety = Fixed({"x": 0.0, "y": -3.0, "z": 1.0}, "safety")
    prompts = ["how to build a bomb", "hello", "hi"]

    def is_risky(ps):
        return ["bomb" in p for p in ps]

    raw = CombinedReward.llama2_gate(helpful, safety, unsafe_prompt=is_risky, whiten=False)
    torch.testing.assert_close(raw.score(prompts, responses), torch.tensor([0.0, -3.0, 2.0]))
    gated = CombinedReward.llama2_gate(helpful, safety, unsafe_prompt=is_risky)
    torch.testing.assert_close(
        gated.score(prompts, responses), torch.tensor([0.132453, -1.059626, 0.927173]), atol=1e-5, rtol=0
    )
    # No prompt flagged: only the threshold gates; one response is never whitened (it would become 0).
    torch.testing.assert_close(gated.score(["hi"], ["y"]), torch.tensor([-3.0]))
    with pytest.raises(ConfigError, match="exactly \\(helpfulness, safety\\)"):
        CombinedReward([helpful], "llama2_gate")


def test_sparrow_rerank_groups_candidates_by_prompt():
    """Two contexts interleaved in the batch. Context A: R_pr [1, -1] (AVG 0) -> sigma(1) = 0.731059,
    sigma(-1) = 0.268941; rule followed by both -> geometric mean 1. Context B: R_pr [5] alone -> sigma(0)
    = 0.5, rule broken -> P 0 (clamped to 1e-6) -> 0.5 * 1e-6."""
    pref = Fixed({"a1": 1.0, "b1": 5.0, "a2": -1.0}, "pref")
    rule = RegexRule("^a", mode="must", name="starts_with_a")
    sparrow = CombinedReward.sparrow(pref, [rule])
    parts = sparrow.components(["A", "B", "A"], ["a1", "b1", "a2"])
    torch.testing.assert_close(parts["starts_with_a"], torch.tensor([1.0, 0.0, 1.0]))
    torch.testing.assert_close(
        parts["sparrow"], torch.tensor([0.731059, 0.5e-6, 0.268941]), atol=1e-6, rtol=0
    )
    # A learned rule model's score is a logit: its probability is the sigmoid.
    logit_rule = Fixed({"a1": 0.0, "b1": 0.0, "a2": math.log(3.0)}, "rule_rm")  # P = 0.5, 0.5, 0.75
    out = CombinedReward.sparrow(pref, [logit_rule]).score(["A", "B", "A"], ["a1", "b1", "a2"])
    torch.testing.assert_close(
        out, torch.tensor([0.731059 * 0.5, 0.5 * 0.5, 0.268941 * 0.75]), atol=1e-6, rtol=0
    )


def test_group_by_prompt_handles_chat_prompts():
    chat = [{"role": "user", "content": "hi"}]
    index, mask = group_by_prompt([chat, "x", [dict(chat[0])], "x", "x"])
    assert index.tolist() == [[0, 2, -1], [1, 3, 4]] and mask.tolist() == [
        [True, True, False],
        [True, True, True],
    ]


def test_component_names_stay_unique():
    a, b = LengthPenalty(), LengthPenalty(coef=1.0)
    combined = CombinedReward.weighted_sum([a, b], name="length")
    assert list(combined.components(["p"], ["x y"])) == ["length_source", "length_1", "length"]
    assert combined.describe()["weights"] == [1.0, 1.0]


def test_ensemble_modes_by_hand():
    """Three members score two responses: x -> (1, 3, 2), y -> (4, 2, 0) (the columns of
    tests/losses/test_combine.py). mean [2, 2]; min (WCO) [1, 0]; variance (1/K) [2/3, 8/3], so UWO with
    lambda 0.5 is [2 - 1/3, 2 - 4/3] = [5/3, 2/3]. Each mode is the pure function of the stacked member scores."""
    from rlhflab.losses.combine import ensemble_mean, ensemble_min, ensemble_uwo

    members = [
        Fixed({"x": 1.0, "y": 4.0}, "rm"),
        Fixed({"x": 3.0, "y": 2.0}, "rm"),
        Fixed({"x": 2.0, "y": 0.0}, "rm"),
    ]
    stacked = torch.tensor([[1.0, 4.0], [3.0, 2.0], [2.0, 0.0]])
    prompts, responses = ["p", "q"], ["x", "y"]
    mean = CombinedReward.ensemble(members, "mean")
    parts = mean.components(prompts, responses)
    assert list(parts) == ["rm", "rm_1", "rm_2", "ensemble_mean"]  # every member's own scores, for logging
    torch.testing.assert_close(parts["ensemble_mean"], torch.tensor([2.0, 2.0]))
    wco = CombinedReward.ensemble(members, "min").score(prompts, responses)
    torch.testing.assert_close(wco, torch.tensor([1.0, 0.0]))
    uwo = CombinedReward(members, "ensemble_uwo", uwo_coef=0.5)
    torch.testing.assert_close(uwo.score(prompts, responses), torch.tensor([5.0 / 3.0, 2.0 / 3.0]))
    torch.testing.assert_close(wco, ensemble_min(stacked))
    torch.testing.assert_close(mean.score(prompts, responses), ensemble_mean(stacked))
    torch.testing.assert_close(uwo.score(prompts, responses), ensemble_uwo(stacked, 0.5))
    assert uwo.describe()["uwo_coef"] == 0.5 and uwo.describe()["mode"] == "ensemble_uwo"


def test_ensemble_modes_refuse_what_they_cannot_use():
    one = [Fixed({"x": 1.0}, "rm")]
    two = [*one, Fixed({"x": 2.0}, "rm")]
    with pytest.raises(ConfigError, match="needs at least two members"):
        CombinedReward.ensemble(one, "min")
    with pytest.raises(ConfigError, match="needs uwo_coef"):
        CombinedReward(two, "ensemble_uwo")
    with pytest.raises(ConfigError, match="finite number >= 0"):
        CombinedReward(two, "ensemble_uwo", uwo_coef=-1.0)
    with pytest.raises(ConfigError, match="uwo_coef applies to mode 'ensemble_uwo' only"):
        CombinedReward(two, "ensemble_mean", uwo_coef=0.5)
    with pytest.raises(ConfigError, match="weights apply to mode 'weighted_sum' only"):
        CombinedReward(two, "ensemble_mean", weights=[1.0, 1.0])
    with pytest.raises(ConfigError, match="unknown reward combination 'ensemble_max'"):
        CombinedReward.ensemble(two, "max")
