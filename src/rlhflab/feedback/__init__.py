"""Feedback sources the online methods ask about the current policy's samples (see `base` for the contract):
a reward (`RewardFeedback`) and a general preference model (`PreferenceModelFeedback`) here; the lab's
simulated annotators in `rlhflab.lab.feedback`; an LM judge and human labellers plug in through the same
protocol."""

from rlhflab.feedback.base import (
    FIRST,
    SECOND,
    TIE,
    FeedbackSource,
    SyncFeedback,
    Ticket,
    ask_and_collect,
    check_pairs,
    labels_from_scores,
)
from rlhflab.feedback.preference_model import PreferenceModelFeedback
from rlhflab.feedback.reward import RewardFeedback

__all__ = [
    "FIRST",
    "SECOND",
    "TIE",
    "FeedbackSource",
    "PreferenceModelFeedback",
    "RewardFeedback",
    "SyncFeedback",
    "Ticket",
    "ask_and_collect",
    "check_pairs",
    "labels_from_scores",
]
