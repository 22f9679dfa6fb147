"""`rule:arithmetic`: a verifiable reward that checks the final answer against the prompt's own sum."""

from __future__ import annotations

import pytest
import torch

from rlhflab.errors import ConfigError, UserError
from rlhflab.rewards import ArithmeticVerifier, load_reward


def test_targets_and_answers_by_hand():
    v = ArithmeticVerifier()
    assert v.target("add 3 + 5 + 2 .") == 10
    assert (
        v.target([{"role": "system", "content": "1 + 1"}, {"role": "user", "content": "what is 9 + 9 ?"}])
        == 18
    )
    assert v.target("compute 1 0 - 3 + 2 .") == 9  # "1 0" as a word-level tokenizer decodes 10
    assert v.target("hello .") is None
    assert v.final_answer("3 + 5 = 8 , answer 8 .") == 8
    assert v.final_answer("answer 1 2 . answer 1 3 .") == 13  # the last answer counts
    assert v.final_answer("3 + 5 = 8 ,") is None


def test_scores_one_for_a_right_final_answer_only():
    prompts = ["add 3 + 5 + 2 ."] * 5 + ["say hi ."]
    responses = [
        "3 + 5 = 8 , 8 + 2 = 1 0 , answer 1 0 .",  # right
        "3 + 5 = 9 , 9 + 2 = 1 1 , answer 1 1 .",  # a slip carried to the answer
        "answer 1 0 .",  # right, without steps: only the outcome is verified
        "3 + 5 = 8 , 8 + 2 = 1 0 ,",  # no answer
        "answer 1 0 . answer 9 .",  # the last answer is wrong
        "answer 0 .",  # a prompt without a sum: nothing to verify
    ]
    assert v_score(prompts, responses) == [1.0, 0.0, 1.0, 0.0, 0.0, 0.0]
    named = ArithmeticVerifier(answer="result")
    assert named.score(["add 1 + 2 ."], ["result : 3"]).tolist() == [1.0]


def v_score(prompts, responses):
    out = ArithmeticVerifier().score(prompts, responses)
    assert out.dtype == torch.float32
    return out.tolist()


def test_spec_and_refusals():
    source = load_reward("rule:arithmetic:answer=result")
    assert isinstance(source, ArithmeticVerifier) and source.describe()["answer"] == "result"
    with pytest.raises(ConfigError, match="must be one word"):
        ArithmeticVerifier(answer="two words")
    with pytest.raises(UserError, match="unknown option 'coef'"):
        load_reward("rule:arithmetic:coef=1")
