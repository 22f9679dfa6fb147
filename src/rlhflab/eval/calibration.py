"""Calibration: how well a model's confidence in its answers matches how often they are right.

Pure estimators (numbers in, numbers out):

    reliability_bins(confidence, correct, n_bins)   the reliability diagram's bins: count, mean confidence and
                                                    accuracy per equal-width confidence bin
    expected_calibration_error(confidence, correct)  ECE = sum_b (n_b / N) |acc_b - conf_b| over those bins
                                                    (Naeini et al. 2015; Guo et al. 2017, eq. 3)
    bootstrap_ece(confidence, correct, present)     ECE with a percentile-bootstrap 95% interval over prompts,
                                                    or of a paired difference of two policies' ECEs

The answer probability a model assigns to its own final answer (the confidence the ECE reads):

    answer_spans(response_ids, response_mask, answer_id, digit_ids)   where the final answer's number is
    answer_logprob(logits, response_ids, start, length, digit_ids)    log p(the number, then a non-digit)
    answer_logprobs(model, rollout, answer_id, digit_ids)             both, on a sampled `Rollout`
    consistency_confidence(answers)                                   the share of a prompt's other samples that
                                                                      reach the same answer (reasoning marginalised)

A reliability diagram (DeGroot & Fienberg 1983; Niculescu-Mizil & Caruana 2005) plots each bin's accuracy
against its mean confidence: a calibrated model lies on the diagonal. The OpenAI (2023) GPT-4 technical report
(Figure 8) shows the pre-trained model's diagram on MMLU near the diagonal (ECE 0.007) and the post-trained
(RLHF) model's far from it (ECE 0.074); Kadavath et al. (2022) find pretrained LMs well calibrated on
multiple-choice answers and RLHF policies less so.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor


def _check(confidence, correct) -> tuple[np.ndarray, np.ndarray]:
    """Flat float confidences in [0, 1] and boolean correctness of the same length, or a ValueError."""
    conf = np.asarray(confidence, dtype=np.float64).reshape(-1)
    right = np.asarray(correct).reshape(-1)
    if conf.shape != right.shape:
        raise ValueError(
            f"calibration needs one correctness per confidence, got {conf.size} confidences and {right.size} labels"
        )
    if not np.isfinite(conf).all() or (conf < 0).any() or (conf > 1).any():
        bad = conf[~(np.isfinite(conf) & (conf >= 0) & (conf <= 1))][0]
        raise ValueError(f"confidences must be probabilities in [0, 1], got {bad!r}")
    if right.dtype != bool:
        if not np.isin(right, (0, 1)).all():
            raise ValueError("correct must be booleans (or 0/1), got other values")
        right = right.astype(bool)
    return conf, right


def bin_index(confidence, n_bins: int) -> np.ndarray:
    """The bin of each confidence among n_bins equal-width bins I_m = ((m-1)/M, m/M], m = 1..M (Guo et al.
    2017, Sec. 2), 0-based; a confidence of exactly 0 goes to the first bin.

    The edges are m / M in floating point, so a confidence written as 0.3 falls in (0.2, 0.3] as on paper."""
    if isinstance(n_bins, bool) or not isinstance(n_bins, int) or n_bins < 1:
        raise ValueError(f"n_bins must be a positive integer, got {n_bins!r}")
    edges = np.arange(n_bins + 1) / n_bins
    # side="left": the first edge >= c, so c equal to an edge m/M belongs to the bin that ends there.
    return np.clip(
        np.searchsorted(edges, np.asarray(confidence, dtype=np.float64), side="left") - 1, 0, n_bins - 1
    )


def reliability_bins(confidence, correct, n_bins: int = 10) -> dict[str, np.ndarray]:
    """The reliability diagram's bins of N predictions.

    confidence: [N] probabilities in [0, 1] the model gave its answers; correct: [N] bools (the answer was
    right). Returns arrays of shape [n_bins]: lower and upper (the bin's edges (lower, upper]), count (n_b),
    confidence (conf_b, the mean confidence in the bin) and accuracy (acc_b, the share right); empty bins have
    count 0 and nan confidence and accuracy. Guo et al. (2017), Sec. 2, "Reliability diagrams".
    """
    conf, right = _check(confidence, correct)
    idx = bin_index(conf, n_bins)
    count = np.bincount(idx, minlength=n_bins).astype(np.float64)
    sum_conf = np.bincount(idx, weights=conf, minlength=n_bins)
    sum_right = np.bincount(idx, weights=right.astype(np.float64), minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_conf, accuracy = sum_conf / count, sum_right / count
    return {
        "lower": np.arange(n_bins) / n_bins,
        "upper": np.arange(1, n_bins + 1) / n_bins,
        "count": count,
        "confidence": np.where(count > 0, mean_conf, np.nan),
        "accuracy": np.where(count > 0, accuracy, np.nan),
    }


def expected_calibration_error(confidence, correct, n_bins: int = 10) -> float:
    """ECE = sum_b (n_b / N) |acc_b - conf_b| over n_bins equal-width confidence bins.

    Naeini, Cooper & Hauskrecht (2015, "Obtaining well calibrated probabilities using Bayesian binning");
    Guo, Pleiss, Sun & Weinberger (2017, "On calibration of modern neural networks", eq. 3). confidence [N] in
    [0, 1], correct [N] bools; empty bins contribute nothing. 0 for a perfectly calibrated model, at most 1.
    Returns nan for N = 0 (no prediction: calibration is undefined). Raises ValueError on mismatched lengths,
    confidences outside [0, 1] or non-finite, correctness other than booleans/0/1, or n_bins < 1.
    """
    bins = reliability_bins(confidence, correct, n_bins)
    n = bins["count"].sum()
    if n == 0:
        return float("nan")
    full = bins["count"] > 0
    gaps = np.abs(bins["accuracy"][full] - bins["confidence"][full])
    return float((bins["count"][full] / n * gaps).sum())


def _bin_sums(confidence, correct, present, n_bins: int) -> tuple[np.ndarray, np.ndarray]:
    """Per prompt (row) and bin: the number of present predictions [P, M] and the sum of (correct - confidence)
    over them [P, M]. ECE = sum_b |sum_{i in b} (correct_i - conf_i)| / N, the same sum as eq. 3 regrouped."""
    present = np.asarray(present, dtype=bool)
    conf = np.where(present, np.nan_to_num(np.asarray(confidence, dtype=np.float64)), 0.0)
    right = np.asarray(correct, dtype=bool)
    if conf.ndim != 2 or conf.shape != right.shape or conf.shape != present.shape:
        raise ValueError(
            f"bootstrap_ece needs [P, K] confidence, correct and present, got {conf.shape}, {right.shape}, "
            f"{present.shape}"
        )
    _check(conf[present], right[present])
    idx = bin_index(conf, n_bins)
    onehot = (idx[..., None] == np.arange(n_bins)) & present[..., None]  # [P, K, M]
    counts = onehot.sum(axis=1).astype(np.float64)
    gaps = (onehot * (right.astype(np.float64) - conf)[..., None]).sum(axis=1)
    return counts, gaps


def _ece_of_weights(weights: np.ndarray, counts: np.ndarray, gaps: np.ndarray) -> np.ndarray:
    """ECE [B] of B weightings [B, P] of the prompts (bootstrap counts), from `_bin_sums`; nan where N = 0."""
    n = weights @ counts.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(n > 0, np.abs(weights @ gaps).sum(axis=1) / n, np.nan)


def bootstrap_ece(
    confidence,
    correct,
    present,
    *,
    baseline: Sequence | None = None,
    n_bins: int = 10,
    n_boot: int = 1000,
    seed: int = 0,
) -> tuple[float, float, float]:
    """(ECE, low, high): the ECE of every present prediction and its percentile-bootstrap 95% interval.

    confidence, correct, present: [P, K] for K samples of each of P prompts (present False: the sample has no
    answer, so no confidence; its confidence may be nan). The bootstrap resamples prompts, not samples, since
    the samples of one prompt are correlated through it (Efron & Tibshirani 1993, the percentile interval).
    With `baseline` = (confidence, correct, present) of another policy on the same P prompts, the returned
    value and interval are of ECE - ECE(baseline), each resample drawing the same prompts for both (paired).
    Resamples without any present prediction are dropped; (nan, nan, nan) when there is none at all.
    """
    counts, gaps = _bin_sums(confidence, correct, present, n_bins)
    if baseline is not None:
        base_counts, base_gaps = _bin_sums(*baseline, n_bins)
        if base_counts.shape[0] != counts.shape[0]:
            raise ValueError(
                f"a paired ECE needs the same prompts: {counts.shape[0]} vs {base_counts.shape[0]}"
            )
    rng = np.random.default_rng(seed)
    p = counts.shape[0]
    weights = np.vstack([np.ones(p), rng.multinomial(p, np.full(p, 1.0 / p), size=n_boot)])
    values = _ece_of_weights(weights, counts, gaps)
    if baseline is not None:
        values = values - _ece_of_weights(weights, base_counts, base_gaps)
    boot = values[1:][np.isfinite(values[1:])]
    if not np.isfinite(values[0]) or boot.size == 0:
        return float("nan"), float("nan"), float("nan")
    return float(values[0]), float(np.percentile(boot, 2.5)), float(np.percentile(boot, 97.5))


# --------------------------------------------------------------------------------------------------------
# The answer probability: how sure the policy is of the number it wrote after its answer marker
# --------------------------------------------------------------------------------------------------------


def answer_spans(
    response_ids: Tensor, response_mask: Tensor, answer_id: int, digit_ids: Sequence[int]
) -> tuple[Tensor, Tensor]:
    """Where each response's final answer is: start [B] (the column of its first digit token) and length [B]
    (its number of digit tokens; 0 when the response has no answer marker followed by a digit).

    response_ids, response_mask [B, R] (True = a real response token). The final answer is the run of digit
    tokens right after the last `answer_id` token that has one (as the arith gold reads the last "answer N")."""
    digits = torch.zeros(int(response_ids.max().item()) + 1 if response_ids.numel() else 1, dtype=torch.bool)
    digits[[d for d in digit_ids if d < digits.numel()]] = True
    is_digit = digits[response_ids.clamp(min=0)] & response_mask.bool()
    start = torch.zeros(response_ids.shape[0], dtype=torch.long)
    length = torch.zeros(response_ids.shape[0], dtype=torch.long)
    for b in range(response_ids.shape[0]):
        markers = ((response_ids[b] == answer_id) & response_mask[b].bool()).nonzero().flatten()
        for marker in reversed(markers.tolist()):
            s, n = marker + 1, 0
            while s + n < response_ids.shape[1] and is_digit[b, s + n]:
                n += 1
            if n:
                start[b], length[b] = s, n
                break
    return start, length


def answer_logprob(
    logits: Tensor, response_ids: Tensor, start: Tensor, length: Tensor, digit_ids: Sequence[int]
) -> Tensor:
    """log p(answer) [B]: the log-probability the model gives the number it wrote, teacher-forced on its own
    response up to the answer; nan where length is 0.

    logits: [B, R + 1, V], row t the model's scores for response token t given the prompt and response tokens
    before t (row R: after the whole response); response_ids [B, R]; start, length [B] from `answer_spans`.

        log p(answer) = sum_{t = s}^{s + L - 1} log p(y_t | x, y_<t) + log(1 - sum_{d in digits} p(d | x, y_<s+L))

    The first term is the product of the digit tokens' probabilities; the second is the probability that the
    number stops there (any non-digit next), so that p is the probability of the number N itself, not of every
    number that starts with N's digits ("1" is a prefix of "1 0"): the probabilities of different answers then
    sum to at most 1, as a confidence must.
    """
    if logits.dim() != 3 or logits.shape[:2] != (response_ids.shape[0], response_ids.shape[1] + 1):
        raise ValueError(
            f"answer_logprob needs logits [B, R + 1, V] for response_ids [B, R], got {tuple(logits.shape)} and "
            f"{tuple(response_ids.shape)}"
        )
    logps = torch.log_softmax(logits.float(), dim=-1)
    out = torch.full((response_ids.shape[0],), float("nan"))
    digits = torch.as_tensor(list(digit_ids), dtype=torch.long)
    for b in range(response_ids.shape[0]):
        s, n = int(start[b]), int(length[b])
        if n == 0:
            continue
        cols = torch.arange(s, s + n)
        tokens = logps[b, cols, response_ids[b, cols]].sum()
        # log(1 - p(any digit)) = log(-expm1(logsumexp)), exact also when p(any digit) is tiny.
        any_digit = torch.logsumexp(logps[b, s + n, digits], dim=0)
        out[b] = (tokens + torch.log(-torch.expm1(any_digit))).item()
    return out


@torch.no_grad()
def answer_logprobs(
    model, rollout, answer_id: int, digit_ids: Sequence[int], batch_size: int = 256
) -> Tensor:
    """log p(answer) [B] (`answer_logprob`) of every sampled response of `rollout` (a `Rollout`) under `model`,
    one forward pass per batch; nan for responses without a final answer."""
    device = next(model.parameters()).device
    start, length = answer_spans(rollout.response_ids, rollout.response_mask, answer_id, digit_ids)
    p = rollout.response_start
    out = []
    for s in range(0, len(rollout), batch_size):
        rows = slice(s, s + batch_size)
        ids = rollout.input_ids[rows].to(device)
        logits = model(
            input_ids=ids,
            attention_mask=rollout.attention_mask[rows].to(device),
            position_ids=rollout.position_ids[rows].to(device),
        ).logits[:, p - 1 :]  # row t predicts response token t; the last row, what follows the response
        out.append(
            answer_logprob(logits.cpu(), rollout.response_ids[rows], start[rows], length[rows], digit_ids)
        )
    return torch.cat(out) if out else torch.zeros(0)


def consistency_confidence(answers) -> np.ndarray:
    """[P, K] the share of a prompt's OTHER samples with the same final answer (nan where a sample has none).

    answers: [P, K] integer final answers of K samples per prompt, -1 for a sample without one. For sample i
    of prompt p, conf = #{j != i : a_pj = a_pi} / (K - 1): a leave-one-out Monte Carlo estimate of the
    probability that the policy reaches the answer a_pi at all, its reasoning marginalised out, unbiased
    because sample i is not among those it is counted against (agreement among samples as confidence:
    Wang et al. 2023, self-consistency; Xiong et al. 2024, consistency-based confidence). Samples without an
    answer count as disagreeing. Raises ValueError for K < 2 or a non-2-D input.
    """
    a = np.asarray(answers)
    if a.ndim != 2 or a.shape[1] < 2:
        raise ValueError(f"consistency_confidence needs [P, K] answers with K >= 2, got shape {a.shape}")
    same = (a[:, :, None] == a[:, None, :]).sum(axis=2) - 1  # the sample itself always agrees
    return np.where(a >= 0, same / (a.shape[1] - 1), np.nan)
