"""SFT negative log-likelihood with masks."""

from __future__ import annotations

import pytest
import torch

from rlhflab.losses.sft import sft_nll

F64 = torch.float64
LOGPS = torch.tensor([[-1.0, -2.0, -50.0], [-3.0, -4.0, -5.0]], dtype=F64)
MASK = torch.tensor([[True, True, False], [True, True, True]])


def test_sft_nll_reductions_by_hand():
    """NLL per token [[1, 2 | pad], [3, 4, 5]]: 5 real tokens, total 15.

    token_mean: per-row sums [3, 12] * B / N = [3, 12] * 2 / 5 = [1.2, 4.8]; mean = 15 / 5 = 3.
    sequence_mean: [3 / 2, 12 / 3] = [1.5, 4];  sequence_sum: [3, 12].
    """
    tok = sft_nll(LOGPS, MASK)
    torch.testing.assert_close(tok.loss, torch.tensor([1.2, 4.8], dtype=F64))
    assert tok.loss.mean().item() == pytest.approx(3.0)
    seq_mean, seq_sum = sft_nll(LOGPS, MASK, "sequence_mean"), sft_nll(LOGPS, MASK, "sequence_sum")
    torch.testing.assert_close(seq_mean.loss, torch.tensor([1.5, 4.0], dtype=F64))
    torch.testing.assert_close(seq_sum.loss, torch.tensor([3.0, 12.0], dtype=F64))
    torch.testing.assert_close(tok.metrics["loss/nll"], torch.tensor([1.5, 4.0], dtype=F64))
    assert tok.metrics["perf/tokens"].tolist() == [2.0, 3.0]
