"""Calibration estimators by hand: reliability bins, ECE, its bootstrap, and the answer probability."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from rlhflab.eval import calibration as C
from rlhflab.rollout.generate import Rollout, _left_pad, encode_prompts

CONF = [0.2, 0.3, 0.6, 0.8, 0.9, 1.0]
RIGHT = [False, True, True, False, True, True]


def test_ece_two_bins_by_hand():
    # Bins (0, 0.5] and (0.5, 1]. Bin 1: {0.2 wrong, 0.3 right}: conf 0.25, acc 0.5, gap 0.25.
    # Bin 2: {0.6 right, 0.8 wrong, 0.9 right, 1.0 right}: conf 3.3 / 4 = 0.825, acc 0.75, gap 0.075.
    # ECE = 2/6 * 0.25 + 4/6 * 0.075 = 0.083333 + 0.05 = 0.133333.
    bins = C.reliability_bins(CONF, RIGHT, n_bins=2)
    np.testing.assert_allclose(bins["count"], [2, 4])
    np.testing.assert_allclose(bins["confidence"], [0.25, 0.825])
    np.testing.assert_allclose(bins["accuracy"], [0.5, 0.75])
    np.testing.assert_allclose(bins["lower"], [0.0, 0.5])
    np.testing.assert_allclose(bins["upper"], [0.5, 1.0])
    assert C.expected_calibration_error(CONF, RIGHT, n_bins=2) == pytest.approx(0.8 / 6)


def test_ece_three_bins_by_hand():
    # (0, 1/3]: {0.2 F, 0.3 T} gap |0.5 - 0.25| = 0.25; (1/3, 2/3]: {0.6 T} gap 0.4;
    # (2/3, 1]: {0.8 F, 0.9 T, 1.0 T} conf 0.9, acc 2/3, gap 0.233333. ECE = (2*0.25 + 0.4 + 3*0.233333) / 6 = 1.6 / 6.
    assert C.expected_calibration_error(CONF, RIGHT, n_bins=3) == pytest.approx(1.6 / 6)


def test_ece_ten_bins_leaves_empty_bins_out():
    # Every prediction alone in its bin: ECE = mean |correct - conf| = (0.2 + 0.7 + 0.4 + 0.8 + 0.1 + 0) / 6.
    bins = C.reliability_bins(CONF, RIGHT, n_bins=10)
    assert bins["count"].tolist() == [0, 1, 1, 0, 0, 1, 0, 1, 1, 1]
    assert np.isnan(bins["accuracy"][0]) and np.isnan(bins["confidence"][3])
    assert C.expected_calibration_error(CONF, RIGHT) == pytest.approx(2.2 / 6)


def test_bin_edges_belong_to_the_bin_they_close():
    # Guo et al.'s bins are right-closed: 0.5 is in (0, 0.5], 0.3 in (0.2, 0.3]; 0 joins the first bin, 1.0 the last.
    assert C.bin_index([0.0, 0.5, 0.5000001, 1.0], 2).tolist() == [0, 0, 1, 1]
    assert C.bin_index([0.3, 0.7, 0.1, 0.30001], 10).tolist() == [2, 6, 0, 3]


def test_perfect_and_worst_calibration():
    assert C.expected_calibration_error([1.0, 1.0, 0.0], [True, True, False]) == 0.0
    assert C.expected_calibration_error([1.0, 0.0], [0, 1]) == 1.0  # 0/1 ints are accepted as labels
    # Calibrated in expectation: a bin of confidence 0.75 with 3 of 4 right.
    assert C.expected_calibration_error([0.75] * 4, [1, 1, 1, 0]) == pytest.approx(0.0)
    assert math.isnan(C.expected_calibration_error([], []))


@pytest.mark.parametrize(
    "conf,right,bins,match",
    [
        ([0.5, 0.2], [True], 10, "one correctness per confidence"),
        ([1.2], [True], 10, r"probabilities in \[0, 1\]"),
        ([-0.1], [True], 10, r"probabilities in \[0, 1\]"),
        ([float("nan")], [True], 10, r"probabilities in \[0, 1\]"),
        ([0.5], [2], 10, "booleans"),
        ([0.5], [True], 0, "n_bins must be a positive integer"),
    ],
)
def test_bad_input_raises(conf, right, bins, match):
    with pytest.raises(ValueError, match=match):
        C.expected_calibration_error(conf, right, n_bins=bins)


def test_bootstrap_ece_is_the_ece_and_pairs_prompts():
    rng = np.random.default_rng(0)
    conf = rng.random((30, 4))
    right = rng.random((30, 4)) < conf**2  # overconfident
    present = rng.random((30, 4)) < 0.8
    conf[~present] = np.nan  # an unanswered sample has no confidence
    ece, lo, hi = C.bootstrap_ece(conf, right, present, n_boot=200, seed=1)
    assert ece == pytest.approx(C.expected_calibration_error(conf[present], right[present]))
    assert lo <= ece <= hi and hi - lo > 0.01
    # The same policy as its own baseline: the paired difference is exactly 0 on every resample.
    assert C.bootstrap_ece(conf, right, present, baseline=(conf, right, present), n_boot=50) == (
        0.0,
        0.0,
        0.0,
    )
    # Paired: a policy whose per-prompt answers are the baseline's, one prompt's flipped, differs on that prompt only.
    d, dlo, dhi = C.bootstrap_ece(conf, ~right, present, baseline=(conf, right, present), n_boot=200)
    flipped = C.expected_calibration_error(conf[present], ~right[present])
    assert d == pytest.approx(flipped - ece) and dlo <= d <= dhi
    assert all(math.isnan(x) for x in C.bootstrap_ece(conf, right, np.zeros_like(present), n_boot=10))
    with pytest.raises(ValueError, match="same prompts"):
        C.bootstrap_ece(conf, right, present, baseline=(conf[:3], right[:3], present[:3]))


# --------------------------------------------------------------------------------------------------------
# The answer probability, against a manual forward pass of a tiny model
# --------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def arith_lm():
    from rlhflab.lab.tasks import get_task
    from rlhflab.models.tiny import build_word_tokenizer, tiny_causal_lm

    tokenizer = build_word_tokenizer(get_task("arith").vocabulary())
    return tiny_causal_lm(tokenizer, hidden_size=32, num_layers=2, num_heads=2, seed=3).eval(), tokenizer


def _rollout(tokenizer, prompts, responses):
    """A left-padded `Rollout` of given prompts and response texts (no EOS), as `generate` lays one out."""
    prompt_rows = encode_prompts(tokenizer, [[{"role": "user", "content": p}] for p in prompts])
    ids, mask = _left_pad(prompt_rows, tokenizer.pad_token_id, max(map(len, prompt_rows)))
    resp_rows = [tokenizer(r, add_special_tokens=False)["input_ids"] for r in responses]
    width = max(map(len, resp_rows))
    resp = torch.full((len(resp_rows), width), tokenizer.pad_token_id)
    resp_mask = torch.zeros((len(resp_rows), width), dtype=torch.bool)
    for i, r in enumerate(resp_rows):
        resp[i, : len(r)], resp_mask[i, : len(r)] = torch.tensor(r), True
    ended = torch.zeros(len(responses), dtype=torch.bool)
    return Rollout(ids, mask, resp, resp_mask, ended, list(responses), list(prompts)), prompt_rows, resp_rows


def _manual_answer_prob(model, tokenizer, prompt_ids, response_ids, answer_id, digit_ids):
    """p(answer) by hand: the last 'answer' marker, then one unpadded forward per digit and one after them."""
    digits = set(digit_ids)
    marker = max(i for i, t in enumerate(response_ids) if t == answer_id)
    end = marker + 1
    while end < len(response_ids) and response_ids[end] in digits:
        end += 1
    prob = 1.0
    for t in range(marker + 1, end + 1):
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([prompt_ids + response_ids[:t]])).logits[0, -1]
        p = torch.softmax(logits.double(), -1)
        prob *= float(p[response_ids[t]]) if t < end else 1.0 - float(p[sorted(digits)].sum())
    return prob


def test_answer_spans_find_the_last_answer(arith_lm):
    _, tok = arith_lm
    answer_id = tok.convert_tokens_to_ids("answer")
    digit_ids = tok.convert_tokens_to_ids([str(d) for d in range(10)])
    rollout, _, _ = _rollout(
        tok,
        ["add 1 + 2 ."] * 5,
        [
            "1 + 2 = 3 , answer 3 .",
            "answer 1 2 , answer 1 0",
            "1 + 2 = 3 ,",
            "answer .",
            "answer 7 , answer .",
        ],
    )
    start, length = C.answer_spans(rollout.response_ids, rollout.response_mask, answer_id, digit_ids)
    # Row 0: "answer" at column 6, its digit at 7. Row 1: the last "answer" is at column 4, then "1 0" at 5-6.
    # Row 4: the last "answer" has no number, so the answer is the one before it, "7" at column 1 (as gold reads it).
    assert start.tolist()[:2] == [7, 5] and start[4] == 1 and length.tolist() == [1, 2, 0, 0, 1]


def test_answer_probability_matches_a_manual_forward_pass(arith_lm):
    model, tok = arith_lm
    answer_id = tok.convert_tokens_to_ids("answer")
    digit_ids = tok.convert_tokens_to_ids([str(d) for d in range(10)])
    prompts = ["add 3 + 5 .", "what is 1 + 2 + 7 ?", "add 2 + 2 ."]
    responses = ["3 + 5 = 8 , answer 8 .", "1 + 2 = 3 , 3 + 7 = 1 0 , answer 1 0", "2 + 2 = 4 ,"]
    rollout, prompt_rows, resp_rows = _rollout(tok, prompts, responses)
    # Different prompt lengths: the batch is left-padded, which must not change any probability.
    assert len(set(map(len, prompt_rows))) > 1
    got = C.answer_logprobs(model, rollout, answer_id, digit_ids, batch_size=2).exp()
    for b in range(2):  # row 1's answer ends the response: its stop probability reads the row after it
        want = _manual_answer_prob(model, tok, prompt_rows[b], resp_rows[b], answer_id, digit_ids)
        assert float(got[b]) == pytest.approx(want, rel=1e-4)
        assert 0.0 < float(got[b]) < 1.0
    assert math.isnan(float(got[2]))  # no answer: no confidence


def test_answer_logprob_by_hand_on_fixed_logits():
    # Vocabulary {0: "answer", 1: "1", 2: "0", 3: "."}; digits {1, 2}. Response "answer 1 0 ." (R = 4).
    # Row 1 (predicts "1"): p = softmax([0, ln 2, ln 1, ln 1]) -> p("1") = 2 / 5.
    # Row 2 (predicts "0"): p("0") = 2 / 5 from [0, 0, ln 2, 0].
    # Row 3 (after "1 0"): p(digit) = (1 + 1) / (1 + 1 + 1 + 2) = 2 / 5 from [0, 0, 0, ln 2] -> stop 3 / 5.
    # p(answer 10) = 2/5 * 2/5 * 3/5 = 0.096.
    logits = torch.zeros(1, 5, 4)
    logits[0, 1] = torch.tensor([0.0, math.log(2), 0.0, 0.0])
    logits[0, 2] = torch.tensor([0.0, 0.0, math.log(2), 0.0])
    logits[0, 3] = torch.tensor([0.0, 0.0, 0.0, math.log(2)])
    ids = torch.tensor([[0, 1, 2, 3]])
    start, length = C.answer_spans(ids, torch.ones_like(ids, dtype=torch.bool), 0, [1, 2])
    assert (start.item(), length.item()) == (1, 2)
    assert C.answer_logprob(logits, ids, start, length, [1, 2]).exp().item() == pytest.approx(0.096)
    with pytest.raises(ValueError, match=r"logits \[B, R \+ 1, V\]"):
        C.answer_logprob(logits[:, :4], ids, start, length, [1, 2])


def test_consistency_confidence_by_hand():
    # Prompt 0: answers 7, 7, 8, 7 -> each 7 agrees with 2 of the 3 others, the 8 with none.
    # Prompt 1: 5, none, 5, 5 -> each 5 agrees with 2 of 3 (the blank disagrees), the blank has no confidence.
    conf = C.consistency_confidence([[7, 7, 8, 7], [5, -1, 5, 5]])
    np.testing.assert_allclose(conf, [[2 / 3, 2 / 3, 0.0, 2 / 3], [2 / 3, np.nan, 2 / 3, 2 / 3]])
    assert C.consistency_confidence([[3, 3]]).tolist() == [[1.0, 1.0]]
    with pytest.raises(ValueError, match="K >= 2"):
        C.consistency_confidence([[3]])
