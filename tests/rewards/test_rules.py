import pytest
import torch

from rlhflab.errors import ConfigError, UserError
from rlhflab.rewards import LengthPenalty, MissingEOSPenalty, RegexRule, RewardSource


def test_length_penalty_by_hand():
    prompts = ["p"] * 3
    responses = ["one two three", "", "a b c d e f g h i j"]
    # words: 3, 0, 10 -> -0.5 * [3, 0, 10]
    torch.testing.assert_close(
        LengthPenalty(coef=0.5).score(prompts, responses), torch.tensor([-1.5, 0.0, -5.0])
    )
    # target 4 words: -0.5 * |[3, 0, 10] - 4| = [-0.5, -2, -3]
    torch.testing.assert_close(
        LengthPenalty(coef=0.5, target=4).score(prompts, responses), torch.tensor([-0.5, -2.0, -3.0])
    )
    # characters: 13, 0, 19
    torch.testing.assert_close(
        LengthPenalty(coef=1.0, unit="chars").score(prompts, responses), torch.tensor([-13.0, 0.0, -19.0])
    )
    with pytest.raises(ConfigError, match="'words' or 'chars'"):
        LengthPenalty(unit="tokens")


def test_regex_rules_by_hand():
    prompts = ["p"] * 3
    responses = ["thanks a lot", "no way", "THANKS"]
    must = RegexRule(r"\bthanks\b", mode="must", penalty=2.0)
    torch.testing.assert_close(must.score(prompts, responses), torch.tensor([0.0, -2.0, -2.0]))
    assert must.followed(prompts, responses).tolist() == [True, False, False]
    must_not = RegexRule(r"(?i)thanks", mode="must_not")
    torch.testing.assert_close(must_not.score(prompts, responses), torch.tensor([-1.0, 0.0, -1.0]))
    torch.testing.assert_close(must_not.follow_probability(prompts, responses), torch.tensor([0.0, 1.0, 0.0]))
    with pytest.raises(ConfigError, match="not a valid regular expression"):
        RegexRule("(unclosed")
    with pytest.raises(ConfigError, match="'must' or 'must_not'"):
        RegexRule("x", mode="maybe")


def test_missing_eos_penalty_by_hand():
    responses = ["the end <eos>", "cut off", "done </s>  ", ""]
    torch.testing.assert_close(
        MissingEOSPenalty(penalty=3.0).score(["p"] * 4, responses), torch.tensor([0.0, -3.0, 0.0, -3.0])
    )
    only_custom = MissingEOSPenalty(eos_texts="<|stop|>")
    torch.testing.assert_close(
        only_custom.score(["p", "p"], ["a <|stop|>", "a <eos>"]), torch.tensor([0.0, -1.0])
    )


def test_rules_follow_the_protocol_and_check_the_batch():
    for source in (LengthPenalty(), RegexRule("x"), MissingEOSPenalty()):
        assert isinstance(source, RewardSource)
        assert source.score([], []).shape == (0,)
        with pytest.raises(UserError, match="2 prompts but 1 responses"):
            source.score(["a", "b"], ["c"])
    with pytest.raises(UserError, match="response 0 is list, not text"):
        LengthPenalty().score(["p"], [["a"]])
    assert LengthPenalty(coef=0.1).describe() == {
        "name": "length",
        "kind": "LengthPenalty",
        "coef": 0.1,
        "target": 0.0,
        "unit": "words",
    }
