"""The loss of a general (pairwise) preference model: P(y > y' | x) from both responses, no score per response.

A Bradley-Terry reward model gives each response one scalar, so its preferences are transitive by construction:
it cannot represent a "rock, paper, scissors" population of annotators. A general preference model reads the
prompt and BOTH responses and predicts the probability that the first is preferred (Jiang et al. 2023, PairRM;
Munos et al. 2023, "Nash Learning from Human Feedback", Sec. 3, the preference model P(y > y' | x)).

The model's backbone gives a logit g(x, a, b) for the text "x, a, b". Read alone, g need not be consistent
with the swapped order: P(a > b) + P(b > a) could differ from 1. We take the antisymmetric part

    s(x, a, b) = g(x, a, b) - g(x, b, a),        P(a > b | x) = sigma(s(x, a, b)),

so P(a > b) + P(b > a) = 1 and P(a > a) = 1/2 hold exactly, for any weights, and one pair trains both
orders at once (the loss of (a, b, y) equals the loss of (b, a, 1 - y)).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from rlhflab.losses.utils import LossOutput, check_same_shape, check_unit_interval, detach_metrics


def antisymmetric_logits(forward_logits: Tensor, backward_logits: Tensor) -> Tensor:
    """s = g(x, a, b) - g(x, b, a): the logit of P(a > b | x), antisymmetric in (a, b) by construction.

    forward_logits: [B] g(x, first, second); backward_logits: [B] g(x, second, first). Returns [B].
    """
    check_same_shape(forward_logits=forward_logits, backward_logits=backward_logits)
    return forward_logits - backward_logits


def general_preference(
    forward_logits: Tensor,
    backward_logits: Tensor,
    labels: Tensor,
    label_smoothing: float = 0.0,
) -> LossOutput:
    """Binary cross-entropy of a general preference model on labelled pairs.

    s = g(x, a, b) - g(x, b, a);  L = -[y' log sigma(s) + (1 - y') log sigma(-s)],  y' = eps + (1 - 2 eps) y
    (the pairwise preference model of Munos et al. 2023, Sec. 3, fitted by maximum likelihood as PairRM is,
    Jiang et al. 2023; eps is label smoothing, the assumed probability that a label is flipped).

    forward_logits: [B] g(x, first, second); backward_logits: [B] g(x, second, first); labels: [B] in [0, 1]:
    1 = the first response is preferred, 0 = the second, 0.5 = a tie (soft labels allowed). With label 1 the
    loss is Bradley-Terry on s: -log sigma(s). A tie is minimal at s = 0 (P = 1/2), with loss log 2.

    Returns loss [B] and detached metrics reward/margin (s), reward/prob_first (sigma(s)) and reward/accuracy
    (s on the labelled side of 0; NaN for a tie, which has no side).
    """
    check_same_shape(forward_logits=forward_logits, backward_logits=backward_logits, labels=labels)
    check_unit_interval("label_smoothing", label_smoothing, upper_open=True, upper=0.5)
    labels = labels.to(forward_logits.dtype)
    if labels.numel() and not bool(((labels >= 0) & (labels <= 1)).all()):
        raise ValueError(f"labels must be in [0, 1], got {labels.tolist()}")
    s = antisymmetric_logits(forward_logits, backward_logits)
    target = label_smoothing + (1 - 2 * label_smoothing) * labels
    # Written with logsigmoid on both sides (not BCE on probabilities) so large |s| stays finite and exact.
    loss = -(target * F.logsigmoid(s) + (1 - target) * F.logsigmoid(-s))
    decided = labels != 0.5
    correct = ((s > 0) == (labels > 0.5)).to(s.dtype)
    accuracy = torch.where(decided, correct, torch.full_like(correct, float("nan")))
    metrics = {"reward/margin": s, "reward/prob_first": torch.sigmoid(s), "reward/accuracy": accuracy}
    return LossOutput(loss, detach_metrics(metrics))


__all__ = ["antisymmetric_logits", "general_preference"]
