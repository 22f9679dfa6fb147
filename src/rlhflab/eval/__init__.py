"""Evaluation judged by the lab's gold reward: policies, reward models, reports.

from rlhflab.eval import evaluate_policy, evaluate_reward_model, write_report
"""

from rlhflab.eval.evaluate import (
    PolicySamples,
    evaluate_policy,
    evaluate_reward_model,
    heldout_pairs,
    reward_model_scorer,
    sample_policy,
    score_responses,
)
from rlhflab.eval.report import write_report

__all__ = [
    "PolicySamples",
    "evaluate_policy",
    "evaluate_reward_model",
    "heldout_pairs",
    "reward_model_scorer",
    "sample_policy",
    "score_responses",
    "write_report",
]
