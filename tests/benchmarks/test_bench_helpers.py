"""The pure helpers of benchmarks/compare_trl.py: FLOP accounting (needed and executed, by value), step
statistics, the timing hook, memory above the post-import baseline, data, the JSON lines and the tables.

No TRL here and nothing timed: the benchmark itself is run by hand and its results live in BENCHMARKS.md.
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import bench_common as bc  # noqa: E402
import bench_report as br  # noqa: E402
import compare_trl as ct  # noqa: E402

DIMS = bc.SHAPES["tiny"]
# hidden 2, one layer: q, k, v, o 4 x 2 x 2 = 16 and gate/up/down 3 x 2 x 3 = 18 matmul weights (body 34);
# LM head 2 x 5 = 10; score head 2 x 1 = 2; attention width 2.
TOY = bc.ModelDims(hidden=2, layers=1, heads=1, kv_heads=1, intermediate=3, vocab=5)


def _pass(kind="train", rows=2, cols=3, tokens=5, head_rows=3, reads=2, phase="train", step=0):
    return {
        "kind": kind,
        "phase": phase,
        "rows": rows,
        "cols": cols,
        "tokens": tokens,
        "head_rows": head_rows,
        "reads": reads,
        "step": step,
    }


# --------------------------------------------------------------------------------------------------------
# Shapes and FLOPs
# --------------------------------------------------------------------------------------------------------


def test_shapes_and_parameter_counts():
    tiny, smol = bc.param_counts(bc.SHAPES["tiny"]), bc.param_counts(bc.SHAPES["smollm2"])
    assert tiny["total"] == 15_747_328 and tiny["embedding"] == 49152 * 256
    assert smol["total"] == 134_515_008  # SmolLM2-135M (tied embeddings)
    assert smol["embedding"] == 49152 * 576
    assert tiny["head_share"] == pytest.approx(0.799, abs=1e-3)
    assert smol["head_share"] == pytest.approx(0.2105, abs=1e-3)
    # TOY: layers 34 matmul weights + 2 x 2 norm weights, final norm 2; embedding 10.
    assert bc.param_counts(TOY) == {"layers": 40, "embedding": 10, "total": 50, "head_share": 0.2}


def test_epoch_flops_hand_worked():
    """Needed FLOPs (rlhflab.models.flops, tested in tests/models/test_flops.py): real tokens, causal."""
    # One pair, prompt 1, chosen 1, rejected 2: rows of 2 and 3 tokens, 5 tokens, 3 scored.
    ep = br.epoch_flops([{"prompt": 1, "chosen": 1, "rejected": 2}], TOY)
    body, attention = 2 * 34 * 5, 2 * 1 * 2 * (2 * 3 + 3 * 4)  # 340; Q K^T and A V over the triangles: 72
    assert ep["tokens"] == 5
    assert ep["ref_forward"] == body + attention + 2 * 2 * 5 * 3  # + the LM head (2 x 5) at 3 scored tokens
    assert ep["dpo_train"] == 3 * ep["ref_forward"]
    assert ep["dpo_train_logged"] == 3 * (body + 2 * 2 * 5 * 3)
    assert ep["rm_train"] == 3 * (body + attention + 2 * 2 * 1 * 2)


def test_trl_dpo_pass_flops_by_value():
    # 2 rows x 3 padded tokens: 6 tokens, 2 x 3 x 3 = 18 query-key pairs, the head at 2 x 2 positions.
    p = _pass(rows=2, cols=3, head_rows=1)  # head_rows is rlhflab's count: TRL's head ignores it
    body_train, attn_train = 6 * 34 * 6, 3 * 4 * 2 * 18  # 1224, 432
    assert br.trl_dpo_pass_flops(TOY, p, live_reference=False) == body_train + attn_train + 8 * 10 * 4  # 1976
    forward = 2 * 34 * 6 + 4 * 2 * 18 + 2 * 10 * 4  # 408 + 144 + 80 = 632
    assert br.trl_dpo_pass_flops(TOY, {**p, "kind": "forward"}, live_reference=False) == forward
    assert br.trl_dpo_pass_flops(TOY, p, live_reference=True) == 1976 + 632
    # On the tiny shape, where the LM head dominates, a TRL step executes over twice what rlhflab's does.
    real = _pass(rows=16, cols=90, head_rows=16 * 42)
    assert br.trl_dpo_pass_flops(DIMS, real, False) / br.rlhflab_dpo_pass_flops(DIMS, real) > 2


def test_rlhflab_dpo_pass_flops_by_value():
    p = _pass(rows=2, cols=3, head_rows=3)
    assert br.rlhflab_dpo_pass_flops(TOY, p) == 6 * 34 * 6 + 6 * 10 * 3 + 3 * 4 * 2 * 18  # 1836
    assert br.rlhflab_dpo_pass_flops(TOY, {**p, "kind": "forward"}) == 2 * (34 * 6 + 10 * 3) + 144  # 612
    # Above SAVED_PROBS_BYTES of float32 softmax, the backward recomputes the logits: 2 x head more each.
    many = br.SAVED_PROBS_BYTES // (4 * TOY.vocab) + 1
    big = _pass(rows=2, cols=3, head_rows=many)
    assert br.rlhflab_dpo_pass_flops(TOY, big) == 1224 + 432 + 8 * 10 * many


def test_reward_pass_flops_by_value():
    p = _pass(rows=2, cols=3, reads=2)
    # TRL: the 1-output score head at every padded token.
    assert br.trl_rm_pass_flops(TOY, p) == 6 * 34 * 6 + 6 * 2 * 6 + 432  # 1728
    assert br.trl_rm_pass_flops(TOY, {**p, "kind": "forward"}) == 2 * (34 * 6 + 2 * 6) + 144  # 576
    # rlhflab, one shared-prompt row of 5 tokens read at 2 positions: the last layer's q, o and MLP
    # (2 x 2 x 2 + 3 x 2 x 3 = 26 weights) and the score head only at the reads; k and v (8) everywhere;
    # the only layer is the last, so attention is the reads' queries against 5 keys: 4 x 2 x 2 x 5 = 80.
    q = _pass(rows=1, cols=5, reads=2)
    assert br.rlhflab_rm_pass_flops(TOY, q) == 6 * 8 * 5 + 6 * (26 + 2) * 2 + 3 * 80  # 816
    assert br.rlhflab_rm_pass_flops(TOY, {**q, "kind": "forward"}) == 2 * (8 * 5 + 28 * 2) + 80  # 272
    two = bc.ModelDims(hidden=2, layers=2, heads=1, kv_heads=1, intermediate=3, vocab=5)
    # Two layers: the first one whole (34 at every token, attention over the 5 x 5 square), then as above.
    assert br.rlhflab_rm_pass_flops(two, {**q, "kind": "forward"}) == 2 * (42 * 5 + 28 * 2) + 4 * 2 * (
        25 + 10
    )


def test_executed_flops_splits_steady_steps_and_phases():
    passes = [
        _pass(step=0),
        _pass(step=1),
        _pass(kind="forward", phase="reference"),
        _pass(kind="forward", phase="eval"),
    ]
    run = {"passes": passes, "live_reference": True}
    out = br.executed_flops(run, "trl", "dpo", TOY, warmup=1)
    assert out["steady"] == 2608 and out["train"] == 2 * 2608
    assert out["reference"] == out["eval"] == 632
    assert out["total"] == 2 * 2608 + 2 * 632
    ours = br.executed_flops({"passes": passes}, "rlhflab", "dpo", TOY, warmup=1)
    assert ours["steady"] == 1836 and ours["reference"] == 612
    assert br.executed_flops({"passes": passes[:2]}, "rlhflab", "rm", TOY, 0)["train"] == 2 * (
        br.rlhflab_rm_pass_flops(TOY, passes[0])
    )


# --------------------------------------------------------------------------------------------------------
# Timing and memory
# --------------------------------------------------------------------------------------------------------


def test_steady_stats_drops_warmup():
    stats = bc.steady_stats([10.0, 1.0, 2.0, 3.0], warmup=1, items_per_step=8)
    assert stats["steps"] == 3 and stats["seconds"] == 6.0
    assert stats["items_per_s"] == 4.0  # 3 steps x 8 pairs / 6 s
    assert stats["step_median_s"] == 2.0 and stats["step_min_s"] == 1.0 and stats["step_max_s"] == 3.0
    assert bc.steady_stats([1.0, 3.0, 5.0, 7.0], 0, 1)["step_median_s"] == 4.0
    with pytest.raises(ValueError, match="no steps left"):
        bc.steady_stats([1.0, 2.0], warmup=2, items_per_step=8)


def test_memory_above_baseline():
    assert bc.memory_above_baseline(1500.0, 600.0) == 900.0
    assert bc.memory_above_baseline(600.0, 600.5) == 0.0  # rounding between the two readings
    with pytest.raises(ValueError):
        bc.memory_above_baseline(-1.0, 600.0)


def test_step_seconds_from_stamps():
    assert bc.step_seconds_from_stamps(10.0, [12.0, 13.5, 16.0]) == [2.0, 1.5, 2.5]
    assert bc.step_seconds_from_stamps(None, []) == []
    with pytest.raises(ValueError, match="first training pass"):
        bc.step_seconds_from_stamps(None, [1.0])
    with pytest.raises(ValueError, match="first training pass"):
        bc.step_seconds_from_stamps(5.0, [4.0])


def test_clock_records_passes_phases_and_optimizer_steps():
    import torch

    clock = bc.Clock()

    class Stage:
        @staticmethod
        def evaluate():
            clock.record_pass("forward", 2, 7, 11)
            Stage.inner()
            return "done"

        @staticmethod
        def inner():
            time.sleep(0.01)

    clock.wrap(Stage, "evaluate", "eval")
    clock.wrap(Stage, "inner", "eval")  # nested in the same phase: counted once
    clock.install()
    p = torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.SGD([p], lr=0.1)
    clock.record_pass("train", 4, 9, 30, head_rows=12, reads=4)
    p.grad = torch.ones(2)
    opt.step()
    clock.record_pass("train", 4, 9, 30)
    opt.step()
    assert Stage.evaluate() == "done"
    out = clock.result()
    assert len(out["step_ends"]) >= 2 and len(out["step_seconds"]) == len(out["step_ends"])
    assert out["first_train"] <= out["step_ends"][0]
    assert [(x["kind"], x["phase"], x["step"]) for x in out["passes"]] == [
        ("train", "train", 0),
        ("train", "train", 1),
        ("forward", "eval", 2),
    ]
    assert out["passes"][0] | {} == _pass(rows=4, cols=9, tokens=30, head_rows=12, reads=4)
    assert 0.01 <= out["phases"]["eval"] < 0.5
    with pytest.raises(ValueError, match="kind"):
        clock.record_pass("backward", 1, 1, 1)


def _time_run(step: float, rss: float, baseline: float = 500.0, live: bool = False) -> dict:
    """A made-up timed run: 5 steps (the first 5 s), 1000 tokens each, a reference pass, an evaluation."""
    passes = [_pass(rows=16, cols=90, tokens=1000, head_rows=600, reads=16, step=i) for i in range(5)]
    passes += [
        _pass(kind="forward", rows=32, cols=90, tokens=2000, head_rows=1200, phase="reference"),
        _pass(kind="forward", rows=16, cols=90, tokens=1000, head_rows=600, phase="eval"),
    ]
    step_seconds = [5.0] + [step] * 4
    ends = [110.0 + sum(step_seconds[: i + 1]) for i in range(5)]
    return {
        "step_seconds": step_seconds,
        "step_tokens": [1000.0] * 5,
        "passes": passes,
        "live_reference": live,
        "phases": {"load": 3.0, "reference": 2.0, "eval": 1.0, "save": 0.5},
        "spawn": 100.0,
        "imports_done": 102.0,
        "first_train": 110.0,
        "step_ends": ends,
        "rss_after_imports_mb": baseline,
        "peak_rss_mb_wait4": rss,
        "process_seconds": 60.0,
    }


def test_time_split_and_end_to_end():
    run = _time_run(1.0, 900)
    split = br.time_split(run)
    assert list(split) == list(br.PHASES)
    assert split["startup"] == 2.0 and split["train"] == 9.0 and split["load"] == 3.0
    assert split["reference"] == 2.0 and split["normalization"] == 0.0 and split["save"] == 0.5
    assert split["other"] == pytest.approx(60.0 - 2 - 9 - 3 - 2 - 1 - 0.5)
    assert sum(split.values()) == pytest.approx(60.0)
    # 5 steps of 8 pairs = 40 pairs in the 60 s from spawn to exit; a run cut short counts its steps only.
    assert br.end_to_end_pairs_per_s(run, 8, 40) == pytest.approx(40 / 60)
    assert br.end_to_end_pairs_per_s(run, 8, 400) == pytest.approx(40 / 60)
    figs = br.run_figures(run, warmup=1, batch=8, n_pairs=40)
    assert figs["rss_above_baseline_mb"] == 400.0 and figs["steps_pairs_per_s"] == 8.0


# --------------------------------------------------------------------------------------------------------
# Data, JSON lines, probe
# --------------------------------------------------------------------------------------------------------


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


def test_shape_plan_defaults_and_flags():
    args = ct.parse_args([])
    assert ct.shape_plan(args, "tiny") == {
        "warmup": 3,
        "steps": 20,
        "variants": ["tuned", "live", "defaults"],
    }
    assert ct.shape_plan(args, "smollm2") == {"warmup": 1, "steps": 4, "variants": ["tuned", "live"]}
    args = ct.parse_args(
        ["--warmup", "0", "--steps", "2", "--trl-variants", "tuned,defaults", "--no-trl-defaults"]
    )
    assert ct.shape_plan(args, "smollm2") == {"warmup": 0, "steps": 2, "variants": ["tuned"]}
    # The tuned TRL settings carry rlhflab's optimizer, set explicitly, and the reference precompute.
    tuned = ct.DPO_VARIANTS["tuned"]
    assert tuned["optim"] == "adamw_torch_fused" and tuned["precompute_ref_log_probs"] is True
    assert tuned["padding_free"] is True and tuned["bf16"] is False and tuned["weight_decay"] == 0.0


# --------------------------------------------------------------------------------------------------------
# PPO split, median of rounds, the report
# --------------------------------------------------------------------------------------------------------


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


def _meta(shapes=("tiny",)):
    one = {
        "description": "toy",
        "n_params": 15_747_328,
        "params": bc.param_counts(DIMS),
        "warmup": 1,
        "steps": 4,
        "batch_size": 8,
        "n_pairs": 40,
        "n_eval": 16,
    }
    return {"batch_size": 8, "shapes": {s: one for s in shapes}}


PROBE = {"peak_gflops": 50.0, "gflops_by_size": {"1024": 50.0}, "threads": 2}


def test_summarize_builds_every_comparison_with_its_shape():
    ids = [{"prompt_ids": [1], "chosen_ids": [2], "rejected_ids": [3]}]
    tiny = {
        "loss_rlhflab": {"loss": 0.6, "token_ids": ids},
        "loss_trl": {"loss": 0.6, "token_ids": ids},
        "dpo_rlhflab": _time_run(1.0, 1000, baseline=400),
        "dpo_trl_tuned": {
            **_time_run(2.0, 2500, baseline=700),
            "options_missing": ["use_logits_to_keep"],
            "options_overridden": {"padding_free": False},
        },
        "dpo_trl_live": _time_run(3.0, 2600, baseline=700, live=True),
        "dpo_trl_defaults": {**_time_run(4.0, 1900, baseline=700, live=True), "variant": {"max_steps": 5}},
        "rm_rlhflab": _time_run(0.5, 800),
        "rm_trl_tuned": _time_run(0.6, 900),
        "ppo_rlhflab": _ppo_run(),
    }
    smol = {"rm_rlhflab": _time_run(4.0, 3000), "rm_trl_tuned": _time_run(6.0, 3500)}
    dims = {"tiny": DIMS, "smollm2": bc.SHAPES["smollm2"]}
    lines, table = br.summarize({"tiny": tiny, "smollm2": smol}, PROBE, _meta(("tiny", "smollm2")), dims)
    rows = [json.loads(x) for x in lines]
    comparisons = [bc.parse_json_line(x) for x in lines if "comparison" in json.loads(x)]

    def find(shape, comparison, metric, variant="TRL tuned"):
        return [
            r
            for r in comparisons
            if (r["shape"], r["comparison"], r["metric"]) == (shape, comparison, metric)
            and r["trl_variant"].startswith(variant)
        ]

    steady = find("tiny", "dpo", "pairs_per_s_steady")[0]
    assert steady["rlhflab"] == 8.0 and steady["trl"] == 4.0 and steady["ratio"] == 2.0
    assert find("tiny", "dpo", "pairs_per_s_steady", "TRL fp32")[0]["ratio"] == 3.0
    # End to end: 40 pairs in 60 s on both sides; TRL as it comes (cut short) has no end-to-end row.
    assert find("tiny", "dpo", "pairs_per_s_end_to_end")[0]["rlhflab"] == pytest.approx(40 / 60, abs=1e-5)
    assert not find("tiny", "dpo", "pairs_per_s_end_to_end", "TRL as it comes")
    assert find("tiny", "dpo", "pairs_per_s_steady", "TRL as it comes")[0]["ratio"] == 4.0
    memory = find("tiny", "dpo", "rss_above_baseline")[0]
    assert (memory["rlhflab"], memory["trl"], memory["better"]) == (600.0, 1800.0, "lower")
    # Executed GFLOP/s: each side's own recorded batches over its own steady seconds (4 steps after 1).
    gflops = find("tiny", "dpo", "executed_gflops")[0]
    ours = 4 * br.rlhflab_dpo_pass_flops(DIMS, tiny["dpo_rlhflab"]["passes"][1]) / 4.0 / 1e9
    theirs = 4 * br.trl_dpo_pass_flops(DIMS, tiny["dpo_trl_tuned"]["passes"][1], False) / 8.0 / 1e9
    assert gflops["rlhflab"] == pytest.approx(ours, rel=1e-5) and gflops["trl"] == pytest.approx(
        theirs, rel=1e-5
    )
    assert gflops["rlhflab_fraction_of_peak"] == pytest.approx(ours / 50.0, abs=1e-4)
    assert gflops["trl_gflop_per_pair"] > gflops["rlhflab_gflop_per_pair"]
    assert find("smollm2", "rm", "pairs_per_s_steady")[0]["ratio"] == 1.5
    assert not find("smollm2", "dpo", "pairs_per_s_steady")
    loss = next(r for r in comparisons if r["metric"] == "first_batch_loss")
    assert loss["ok"] and loss["better"] == "equal" and loss["shape"] == "tiny"
    assert {r.get("kind") for r in rows} >= {"ppo_split", "matmul_probe", "time_split"}
    # The table names the shape on every row, and says where each run's time went.
    assert "| tiny dpo: pairs_per_s_steady (pairs/s) | 8.00 | 4.00 | 2.00x | TRL tuned" in table
    assert "| smollm2 rm: pairs_per_s_steady (pairs/s) | 2.00 | 1.33 | 1.50x |" in table
    assert "Where the time goes, smollm2 shape" in table
    assert "| reference pass (precompute) | 2.0 | 2.0 |" in table
    assert (
        "- tiny: toy, 15.75M parameters, embedding / LM head 80% of them; batch 8, 40 training pairs" in table
    )
    assert "tiny: DPO training executed" in table
    assert (
        "dpo_trl_tuned: not in this TRL's config class (left out): use_logits_to_keep; switched back by TRL "
        "itself: padding_free -> False." in table
    )
    assert "PPO perf/flops_per_s (stage log): 2.00 GFLOP/s = 4.0% of the matmul peak." in table


def test_median_run_picks_the_middle_repeat_with_every_round():
    # Steady pairs/s with warm-up 1 and batch 8: 8 / step time -> 16, 8, 4; the median run is the 8 pairs/s one.
    fast, mid, slow = _time_run(0.5, 700), _time_run(1.0, 800), _time_run(2.0, 900)
    slow["process_seconds"] = 80.0
    picked = br.median_run([slow, fast, mid], warmup=1, batch=8, n_pairs=40)
    assert picked["peak_rss_mb_wait4"] == 800 and picked["repeat_pairs_per_s"] == [4.0, 16.0, 8.0]
    assert picked["repeat_e2e_pairs_per_s"] == [0.5, 0.667, 0.667]
    # An even count takes the lower middle run (the conservative one for the side being measured).
    assert br.median_run([fast, slow], warmup=1, batch=8)["peak_rss_mb_wait4"] == 900
    runs = {"rm_rlhflab": picked, "rm_trl_tuned": br.median_run([_time_run(2.0, 900)] * 3, 1, 8, 40)}
    lines, table = br.summarize({"tiny": runs}, PROBE, _meta(), {"tiny": DIMS})
    rows = [bc.parse_json_line(x) for x in lines if "comparison" in json.loads(x)]
    assert {r["comparison"] for r in rows} == {"rm"}  # no DPO runs, so no DPO lines
    steady = next(r for r in rows if r["metric"] == "pairs_per_s_steady")
    assert steady["ratio"] == 2.0 and steady["rlhflab_repeats"] == [4.0, 16.0, 8.0]
    assert steady["trl_repeats"] == [4.0] * 3
    assert "median of 3 interleaved runs (rlhflab 4.00/16.00/8.00, TRL 4.00/4.00/4.00)" in table
    assert "| tiny | rm_rlhflab | 4.00/16.00/8.00 | 0.50/0.67/0.67 |" in table
