"""The pure helpers of benchmarks/compare_trl.py: FLOP accounting, step statistics, data, the JSON lines.

No TRL here and nothing timed: the benchmark itself is run by hand and its results live in BENCHMARKS.md.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import bench_common as bc  # noqa: E402
import bench_report as br  # noqa: E402

DIMS = bc.ModelDims(hidden=256, layers=4, heads=4, kv_heads=4, intermediate=688, vocab=49152)
TOY = bc.ModelDims(hidden=2, layers=1, heads=1, kv_heads=1, intermediate=3, vocab=5)


def test_epoch_flops_hand_worked():
    """The benchmark counts its FLOPs with rlhflab.models.flops (tested in tests/models/test_flops.py)."""
    # TOY layer weights: q, k, v, o 4 x 2 x 2 = 16, gate/up/down 3 x 2 x 3 = 18: 34.
    # One pair, prompt 1, chosen 1, rejected 2: rows of 2 and 3 tokens, 5 tokens, 3 scored.
    ep = br.epoch_flops([{"prompt": 1, "chosen": 1, "rejected": 2}], TOY)
    body, attention = (
        2 * 34 * 5,
        2 * 1 * 2 * (2 * 3 + 3 * 4),
    )  # 340; Q K^T and A V over the causal triangles: 72
    assert ep["tokens"] == 5
    assert ep["ref_forward"] == body + attention + 2 * 2 * 5 * 3  # + the LM head (2 x 5) at 3 scored tokens
    assert ep["dpo_train"] == 3 * ep["ref_forward"]
    assert ep["dpo_train_logged"] == 3 * (body + 2 * 2 * 5 * 3)  # what the stage logs: no attention scores
    assert ep["rm_train"] == 3 * (body + attention + 2 * 2 * 1 * 2)  # a 1-output head read once per row


def test_steady_stats_drops_warmup():
    stats = bc.steady_stats([10.0, 1.0, 2.0, 3.0], warmup=1, items_per_step=8)
    assert stats["steps"] == 3 and stats["seconds"] == 6.0
    assert stats["items_per_s"] == 4.0  # 3 steps x 8 pairs / 6 s
    assert stats["step_median_s"] == 2.0 and stats["step_min_s"] == 1.0 and stats["step_max_s"] == 3.0
    assert bc.steady_stats([1.0, 3.0, 5.0, 7.0], 0, 1)["step_median_s"] == 4.0
    with pytest.raises(ValueError, match="no steps left"):
        bc.steady_stats([1.0, 2.0], warmup=2, items_per_step=8)


def test_json_line_round_trip_and_ratio():
    row = bc.parse_json_line(bc.json_line("dpo", "pairs_per_s", "pairs/s", 3.0, 1.5, trl_variant="x"))
    assert row["ratio"] == 2.0 and row["better"] == "higher" and row["trl_variant"] == "x"
    assert (
        bc.parse_json_line(bc.json_line("dpo", "peak_rss", "MiB", 900, 1000, better="lower"))["ratio"] == 0.9
    )
    assert math.isnan(json.loads(bc.json_line("a", "b", "c", 1.0, 0.0))["ratio"])
    with pytest.raises(ValueError, match="better"):
        bc.json_line("a", "b", "c", 1.0, 1.0, better="faster")
    with pytest.raises(ValueError, match="lacks ratio"):
        bc.parse_json_line(json.dumps({k: 1 for k in bc.JSON_KEYS if k != "ratio"}))


def test_synthetic_pairs_shape_and_determinism():
    pairs = bc.synthetic_pairs(20, seed=3)
    assert pairs == bc.synthetic_pairs(20, seed=3) and pairs != bc.synthetic_pairs(20, seed=4)
    for p in pairs:
        assert 20 <= len(p["prompt"].split()) <= 28 and not p["prompt"].endswith(" ")
        for key in ("chosen", "rejected"):
            # One leading space: the prompt/response boundary is a token boundary for BPE tokenizers.
            assert p[key].startswith(" ") and not p[key].startswith("  ")
            assert 32 <= len(p[key].split()) <= 48


def test_matmul_probe_reports_a_rate(monkeypatch):
    import torch

    # A fake clock: n = 64 takes 4 ms then 2 ms, n = 32 takes 1 ms then 3 ms; the best of each counts.
    ticks = iter([0.0, 0.004, 1.0, 1.002, 2.0, 2.001, 3.0, 3.003])
    monkeypatch.setattr(bc.time, "perf_counter", lambda: next(ticks))
    probe = bc.matmul_probe(sizes=(64, 32), repeats=2)
    # 2 n^3 FLOPs: 2 x 64^3 / 2 ms = 0.262144 GFLOP/s, 2 x 32^3 / 1 ms = 0.065536 GFLOP/s.
    assert probe["gflops_by_size"] == pytest.approx({"64": 0.262144, "32": 0.065536})
    assert probe["peak_gflops"] == pytest.approx(0.262144) and probe["threads"] == torch.get_num_threads()


def test_first_batch_check():
    ids = [{"prompt_ids": [1, 2], "chosen_ids": [3, 0], "rejected_ids": [4, 0]}]
    ours = {"loss": 0.66438, "token_ids": ids}
    assert br.first_batch_check(ours, {"loss": 0.66440, "token_ids": ids})["ok"]
    assert not br.first_batch_check(ours, {"loss": 0.66460, "token_ids": ids})["ok"]
    other = [{**ids[0], "chosen_ids": [3]}]
    check = br.first_batch_check(ours, {"loss": 0.66438, "token_ids": other})
    assert not check["ok"] and not check["token_ids_equal"]


def _ppo_run():
    iteration = {
        "perf/time_generate": 2.0,
        "perf/time_score": 0.5,
        "perf/time_forward": 1.0,
        "perf/time_optimize": 4.0,
        "perf/response_length": 32,
        "perf/flops_per_s": 2e9,
    }
    passes = {"ref_logps": 0.25, "policy_rollout_pass": 0.5, "policy_train_pass": 3.0}
    return {
        "iterations": [{**iteration, "perf/time_generate": 9.0}, iteration, iteration],
        "passes": [passes, passes, passes],
    }


def test_ppo_split_skips_warmup_and_shares_sum_to_one():
    split = br.ppo_split(_ppo_run())
    assert split["iterations_measured"] == 2
    seconds = split["seconds"]
    assert seconds["generate"] == 2.0 and seconds["reference pass"] == 0.25
    assert seconds["other experience work (GAE, KL shaping, checks)"] == 0.25  # 1.0 - 0.25 - 0.5
    assert split["seconds_per_iteration"] == pytest.approx(7.5)
    assert sum(split["share"].values()) == pytest.approx(1.0, abs=1e-3)
    assert split["slowest"] == "optimize (PPO epochs)"
    assert split["logged_gflops"] == 2.0


def _time_run(step: float, rss: float, ref: float = 0.0) -> dict:
    return {
        "step_seconds": [5.0] + [step] * 4,
        "step_tokens": [1000.0] * 5,
        "ref_seconds": ref,
        "peak_rss_mb_wait4": rss,
        "process_seconds": 60.0,
    }


def test_summarize_builds_every_comparison():
    ids = [{"prompt_ids": [1], "chosen_ids": [2], "rejected_ids": [3]}]
    runs = {
        "loss_rlhflab": {"loss": 0.6, "token_ids": ids},
        "loss_trl": {"loss": 0.6, "token_ids": ids},
        "dpo_rlhflab": _time_run(1.0, 1000, ref=2.0),
        "dpo_trl_precompute": _time_run(2.0, 2000, ref=3.0),
        "dpo_trl_matched": _time_run(3.0, 2000),
        "rm_rlhflab": _time_run(0.5, 800),
        "rm_trl_matched": _time_run(0.6, 900),
        "ppo_rlhflab": _ppo_run(),
        "dpo_trl_defaults": _time_run(4.0, 1900),
        "rm_trl_defaults": _time_run(2.0, 700),
    }
    meta = {"warmup": 1, "batch_size": 8, "n_pairs": 40, "n_params": 1000}
    probe = {"peak_gflops": 50.0, "gflops_by_size": {"1024": 50.0}, "threads": 2}
    lengths = [{"prompt": 10, "chosen": 20, "rejected": 30}] * 40
    lines, table = br.summarize(runs, probe, meta, lengths, DIMS)
    rows = [json.loads(x) for x in lines]
    comparisons = [bc.parse_json_line(x) for x in lines if "comparison" in json.loads(x)]
    steps = [
        r for r in comparisons if r["comparison"] == "dpo" and r["metric"] == "pairs_per_s_training_steps"
    ]
    assert steps[0]["rlhflab"] == 8.0 and steps[0]["trl"] == 4.0 and steps[0]["ratio"] == 2.0
    e2e = next(r for r in comparisons if r["metric"] == "pairs_per_s_end_to_end")
    assert e2e["rlhflab"] == pytest.approx(40 / (2.0 + 5.0 + 4.0), abs=1e-5)  # reference pass + every step
    defaults = [r for r in comparisons if "as it comes" in r["trl_variant"] and r["metric"] != "peak_rss"]
    # Runs cut short (max_steps) are compared on their steady steps: 4 after one warm-up step.
    assert [(r["comparison"], r["ratio"]) for r in defaults] == [("dpo", 4.0), ("rm", 4.0)]
    assert all(r["trl_variant"].endswith("(4 steps)") for r in defaults)
    assert br._dpo_figures(_time_run(1.0, 1), 1, 8, 400)["epoch_pairs_per_s"] == pytest.approx(40 / 9.0)
    loss = next(r for r in comparisons if r["metric"] == "first_batch_loss")
    assert loss["ok"] and loss["better"] == "equal"
    flops = next(r for r in comparisons if r["comparison"] == "dpo" and r["metric"] == "achieved_gflops")
    assert flops["rlhflab_fraction_of_peak"] == pytest.approx(flops["rlhflab"] / 50.0, abs=1e-4)
    assert {r.get("kind") for r in rows} >= {"ppo_split", "matmul_probe"}
    assert "| dpo: pairs_per_s_training_steps (pairs/s) | 8.00 | 4.00 | 2.00x |" in table
    ppo = next(r for r in rows if r.get("kind") == "ppo_split")
    assert ppo["logged_fraction_of_peak"] == pytest.approx(2.0 / 50.0)
    percent = f"{100 * flops['rlhflab_fraction_of_peak']:.1f}% of the measured matmul peak (50.0 GFLOP/s)"
    assert f"DPO training achieved {flops['rlhflab']:.1f} GFLOP/s = {percent}" in table
    assert "PPO perf/flops_per_s (stage log): 2.00 GFLOP/s = 4.0% of the matmul peak." in table
    logged = flops["rlhflab_logged_convention_gflops"]
    assert (
        f"As the stage logs it in perf/flops_per_s (rlhflab.models.flops without the attention scores) it is {logged:.1f}"
        in table
    )


def test_median_run_picks_the_middle_repeat_and_an_rm_only_summary():
    # Steady pairs/s with warm-up 1 and batch 8: 8 / step time -> 16, 8, 4; the median run is the 8 pairs/s one.
    fast, mid, slow = _time_run(0.5, 700), _time_run(1.0, 800), _time_run(2.0, 900)
    picked = br.median_run([slow, fast, mid], warmup=1, batch=8)
    assert picked["peak_rss_mb_wait4"] == 800 and picked["repeat_pairs_per_s"] == [4.0, 16.0, 8.0]
    # An even count takes the lower middle run (the conservative one for the side being measured).
    assert br.median_run([fast, slow], warmup=1, batch=8)["peak_rss_mb_wait4"] == 900
    runs = {
        "rm_rlhflab": picked,
        "rm_trl_matched": br.median_run([_time_run(2.0, 900)] * 3, warmup=1, batch=8),
    }
    meta = {"warmup": 1, "batch_size": 8, "n_pairs": 40, "n_params": 1000}
    probe = {"peak_gflops": 50.0, "gflops_by_size": {"1024": 50.0}, "threads": 2}
    lines, table = br.summarize(runs, probe, meta, [{"prompt": 10, "chosen": 20, "rejected": 30}] * 40, DIMS)
    rows = [bc.parse_json_line(x) for x in lines if "comparison" in json.loads(x)]
    assert {r["comparison"] for r in rows} == {"rm"}  # no DPO runs, so no DPO lines
    steps = next(r for r in rows if r["metric"] == "pairs_per_s_training_steps")
    assert (
        steps["ratio"] == 2.0
        and steps["rlhflab_repeats"] == [4.0, 16.0, 8.0]
        and steps["trl_repeats"] == [4.0] * 3
    )
    assert "median of 3 interleaved runs (rlhflab 4.0/16.0/8.0, TRL 4.0/4.0/4.0)" in table
