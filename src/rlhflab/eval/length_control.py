"""How much of a policy's gain is length: the gain at matched length, by regression on length.

A reward or a judge that likes longer answers makes any policy that writes more look better. Singhal et al.
(2023, "A Long Way to Go: Investigating Length Correlations in RLHF") found that most of PPO's reward gain on
their tasks came from longer outputs; Dubois et al. (2024, "Length-Controlled AlpacaEval") answer with a
regression on length and report the win rate the regression predicts at equal length. Here the outcome is a
per-sample score (gold reward), and the regression is ordinary least squares with an indicator for the policy
(an analysis of covariance):

    score_i = a + b * length_i + c * [i is the policy's sample] + e_i

fitted on the pooled samples of the policy and of the reference (SFT). The slope b is the within-group slope,
shared by both; c is the policy's gain at matched length. With means over each group (ybar, lbar),

    c = (ybar_policy - ybar_ref) - b * (lbar_policy - lbar_ref),

so the raw gain splits exactly into the part the length change explains, b * delta_length, and the rest, c.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from rlhflab.eval import metrics as M


@dataclass(frozen=True)
class LengthControl:
    """The split of a policy's raw gain over a reference into length and the rest."""

    raw_gain: float
    """mean score of the policy's samples minus the reference's."""
    delta_length: float
    """mean length of the policy's samples minus the reference's."""
    slope: float
    """b: score per unit of length, within groups."""
    gain_at_matched_length: float
    """c: the policy's gain the regression predicts at equal length (raw_gain - length_part)."""

    @property
    def length_part(self) -> float:
        """b * delta_length: the part of the raw gain the length change explains."""
        return self.slope * self.delta_length


def length_controlled_gain(policy_scores, policy_lengths, ref_scores, ref_lengths) -> LengthControl:
    """Fit score = a + b * length + c * is_policy by least squares on the pooled samples (1-D arrays, any
    equal-length pairs; the groups may differ in size). Returns the raw gain, the length change, b and c.
    With no length variation within groups b is 0 (nothing to regress on) and c is the raw gain."""
    ys, ls = np.asarray(policy_scores, np.float64).ravel(), np.asarray(policy_lengths, np.float64).ravel()
    yr, lr = np.asarray(ref_scores, np.float64).ravel(), np.asarray(ref_lengths, np.float64).ravel()
    if ys.size != ls.size or yr.size != lr.size:
        raise ValueError("scores and lengths must come in pairs (one length per scored sample)")
    if ys.size == 0 or yr.size == 0:
        raise ValueError("length_controlled_gain needs samples of both the policy and the reference")
    if not all(np.isfinite(a).all() for a in (ys, ls, yr, lr)):
        raise ValueError("scores and lengths must be finite")
    # The indicator model's b is the pooled within-group slope: centring each group on its own means removes
    # a and c, leaving one regression through the origin.
    dl = np.concatenate([ls - ls.mean(), lr - lr.mean()])
    dy = np.concatenate([ys - ys.mean(), yr - yr.mean()])
    sxx = float(dl @ dl)
    slope = float(dl @ dy) / sxx if sxx > 0 else 0.0
    raw, delta = float(ys.mean() - yr.mean()), float(ls.mean() - lr.mean())
    return LengthControl(raw, delta, slope, raw - slope * delta)


def length_adjusted(scores, lengths, slope: float, at_length: float) -> np.ndarray:
    """Scores moved along the fitted slope to a common length: score - slope * (length - at_length)."""
    return np.asarray(scores, np.float64) - slope * (np.asarray(lengths, np.float64) - at_length)


def length_controlled_win_rate(
    policy_scores, policy_lengths, ref_scores, ref_lengths, slope: float
) -> np.ndarray:
    """Per prompt, the win rate of the policy's samples over the reference's ([P, N] arrays, all sample pairs,
    ties 1/2) once every score is moved to the same length along `slope` (`length_adjusted`): the win rate
    at matched length (Dubois et al. 2024 predict it from a logistic model; here the regression is the
    one on the score itself, so both sides share one adjustment)."""
    at = float(np.mean(ref_lengths))
    return M.win_rate_all_pairs(
        length_adjusted(policy_scores, policy_lengths, slope, at),
        length_adjusted(ref_scores, ref_lengths, slope, at),
    )
