"""Feedback sources (`rlhflab.feedback`): the label contract, the ticket life cycle, the query count, and the
labels of a reward's scores worked by hand (argmax) or against the Bradley-Terry probability (draws)."""

import math

import pytest
import torch
from torch.testing import assert_close

from rlhflab.errors import ConfigError, UserError
from rlhflab.feedback import (
    FeedbackSource,
    RewardFeedback,
    SyncFeedback,
    Ticket,
    ask_and_collect,
    labels_from_scores,
)

NAN = float("nan")


class Scores:
    """A reward whose score is the number written in the response ('nan' allowed); counts the responses."""

    name = "numbers"

    def __init__(self):
        self.calls = 0

    def score(self, prompts, responses):
        assert len(prompts) == len(responses)
        self.calls += 1
        return torch.tensor([float(r) for r in responses])


def test_labels_of_two_scores_by_hand():
    first = torch.tensor([2.0, 1.0, 1.0, NAN, 0.0, -1.0])
    second = torch.tensor([1.0, 2.0, 1.0, 0.0, NAN, -1.0])
    assert_close(
        labels_from_scores(first, second), torch.tensor([1.0, 0.0, 0.5, NAN, NAN, 0.5]), equal_nan=True
    )


def test_reward_feedback_argmax_labels_scores_and_queries():
    reward = Scores()
    fb = RewardFeedback(reward, mode="argmax")
    assert isinstance(fb, FeedbackSource) and fb.queries == 0
    ticket = fb.ask(["p"] * 4, ["3", "1", "2", "nan"], ["1", "3", "2", "0"])
    assert isinstance(ticket, Ticket) and ticket.size == 4
    labels = fb.collect(ticket, timeout=0.0)
    assert_close(labels, torch.tensor([1.0, 0.0, 0.5, NAN]), equal_nan=True)
    assert labels.dtype == torch.float32
    assert_close(fb.last_scores[0], torch.tensor([3.0, 1.0, 2.0, NAN]), equal_nan=True)
    assert_close(fb.last_scores[1], torch.tensor([1.0, 3.0, 2.0, 0.0]))
    assert reward.calls == 1  # both sides scored in one call (a reward model batches them)
    assert_close(ask_and_collect(fb, ["p"], ["0"], ["5"]), torch.tensor([0.0]))
    assert fb.queries == 5  # one query per pair asked


def test_a_ticket_is_collected_once_and_tickets_are_independent():
    fb = RewardFeedback(Scores())
    a = fb.ask(["p"], ["1"], ["0"])
    b = fb.ask(["p", "p"], ["0", "0"], ["1", "1"])
    assert_close(fb.collect(b), torch.tensor([0.0, 0.0]))  # out of order
    assert_close(fb.collect(a), torch.tensor([1.0]))
    with pytest.raises(UserError, match="already collected"):
        fb.collect(a)


def test_bad_batches_are_refused():
    fb = RewardFeedback(Scores())
    with pytest.raises(UserError, match="one prompt per pair"):
        fb.ask(["p", "q"], ["1"], ["2"])
    with pytest.raises(UserError, match="not two texts"):
        fb.ask(["p"], [1], ["2"])
    with pytest.raises(ConfigError, match="argmax, bradley_terry"):
        RewardFeedback(Scores(), mode="softmax")
    assert fb.queries == 0

    class Short(SyncFeedback):
        def judge(self, prompts, first, second):
            return torch.ones(len(prompts) + 1)

    with pytest.raises(ValueError, match="shape"):
        Short().ask(["p"], ["a"], ["b"])


def test_bradley_terry_draws_follow_the_sigmoid_of_the_gap():
    """P(first) = sigmoid(s1 - s2): at gaps 0, 1 and -2 the share of 1-labels is within 4 standard errors of
    0.5, 0.731 and 0.119; a NaN score still gives NaN."""
    n = 4000
    fb = RewardFeedback(Scores(), mode="bradley_terry", seed=3)
    for gap in (0.0, 1.0, -2.0):
        labels = fb.collect(fb.ask(["p"] * n, [str(gap)] * n, ["0"] * n))
        assert set(labels.unique().tolist()) <= {0.0, 1.0}
        p = 1 / (1 + math.exp(-gap))
        assert abs(labels.mean().item() - p) < 4 * math.sqrt(p * (1 - p) / n), gap
    assert math.isnan(fb.collect(fb.ask(["p"], ["nan"], ["0"]))[0])


def test_bradley_terry_draws_are_seeded_and_resumable():
    def draws(fb):
        return fb.collect(fb.ask(["p"] * 64, ["0.3"] * 64, ["0"] * 64))

    a, b = (
        RewardFeedback(Scores(), "bradley_terry", seed=7),
        RewardFeedback(Scores(), "bradley_terry", seed=7),
    )
    assert torch.equal(draws(a), draws(b))
    state = a.state_dict()
    expected = draws(a)
    c = RewardFeedback(Scores(), "bradley_terry", seed=99)  # another seed: its state is replaced
    c.load_state_dict(state)
    assert torch.equal(draws(c), expected)
    assert c.queries == 64 + 64 and not torch.equal(
        draws(RewardFeedback(Scores(), "bradley_terry", seed=8)), expected
    )
