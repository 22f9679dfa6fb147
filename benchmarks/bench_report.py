"""Turn the measurements of `compare_trl.py` into JSON lines and the BENCHMARKS.md table.

Pure functions over plain dicts (no TRL, nothing timed), so `tests/benchmarks` can check them on made-up runs.
FLOPs are counted by `rlhflab.models.flops`, the accounting the stages log with (so this runs in rlhflab's venv).
"""

from __future__ import annotations

import json
from typing import Any

from bench_common import ModelDims, json_line, steady_stats

from rlhflab.models import flops

LOSS_TOLERANCE = 1e-4
PPO_PARTS = {
    "perf/time_generate": "generate",
    "perf/time_score": "score",
    "ref_logps": "reference pass",
    "policy_rollout_pass": "policy rollout pass (old log-probs, values, entropy)",
    "perf/time_optimize": "optimize (PPO epochs)",
}


def _matmul_params(dims: ModelDims, head_outputs: int) -> flops.MatmulParams:
    return flops.decoder_matmul_params(
        hidden=dims.hidden,
        layers=dims.layers,
        heads=dims.heads,
        kv_heads=dims.kv_heads,
        intermediate=dims.intermediate,
        head_outputs=head_outputs,
    )


def epoch_flops(lengths: list[dict], dims: ModelDims) -> dict[str, float]:
    """Needed FLOPs of one epoch over the pairs and its real tokens, with causal attention: DPO training
    (LM head at response tokens only), one reference forward, and reward-model training (a 1-output head
    per sequence, every layer at every token). `dpo_train_logged`: DPO training as the stage logs it in
    perf/flops_per_s (the same without the attention scores)."""
    seqs = [n for x in lengths for n in (x["prompt"] + x["chosen"], x["prompt"] + x["rejected"])]
    scored = sum(x["chosen"] + x["rejected"] for x in lengths)
    tokens, pairs = sum(seqs), flops.causal_pairs(seqs)
    lm = _matmul_params(dims, dims.vocab)
    return {
        "tokens": float(tokens),
        "dpo_train": flops.causal_lm_train_flops(lm, tokens, scored, pairs),
        "dpo_train_logged": flops.causal_lm_train_flops(lm, tokens, scored),
        "ref_forward": flops.causal_lm_forward_flops(lm, tokens, scored, pairs),
        "rm_train": flops.reward_model_train_flops(_matmul_params(dims, 1), tokens, len(seqs), pairs),
    }


def first_batch_check(rlhflab: dict, trl: dict) -> dict[str, Any]:
    """Do both frameworks train on the same token ids, and agree on the first batch's DPO loss?"""
    ids_equal = rlhflab["token_ids"] == trl["token_ids"]
    diff = abs(rlhflab["loss"] - trl["loss"])
    return {"token_ids_equal": ids_equal, "abs_diff": diff, "ok": ids_equal and diff <= LOSS_TOLERANCE}


def median_run(results: list[dict], warmup: int, batch: int) -> dict:
    """The run with the median steady-state throughput among repeats of one measurement (the lower middle
    one for an even count), with every repeat's pairs/s in `repeat_pairs_per_s` (in run order)."""
    speeds = [steady_stats(r["step_seconds"], warmup, batch)["items_per_s"] for r in results]
    order = sorted(range(len(results)), key=speeds.__getitem__)
    return {**results[order[(len(order) - 1) // 2]], "repeat_pairs_per_s": [round(x, 3) for x in speeds]}


def _dpo_figures(run: dict, warmup: int, batch: int, n_pairs: int) -> dict[str, float]:
    steady = steady_stats(run["step_seconds"], warmup, batch)
    epoch_seconds = run.get("ref_seconds", 0.0) + sum(run["step_seconds"])
    return {
        "steps_pairs_per_s": steady["items_per_s"],
        "step_median_s": steady["step_median_s"],
        "steps": steady["steps"],
        "steady_seconds": steady["seconds"],
        "steady_tokens": float(sum(run["step_tokens"][warmup:])),
        "ref_seconds": run.get("ref_seconds", 0.0),
        # Pairs actually trained: a whole epoch (n_pairs) unless the run was cut short (max_steps).
        "epoch_pairs_per_s": min(n_pairs, batch * len(run["step_seconds"])) / epoch_seconds,
        "epoch_seconds": epoch_seconds,
        "peak_rss_mb": run["peak_rss_mb_wait4"],
        "process_seconds": run["process_seconds"],
        "repeats": run.get("repeat_pairs_per_s", []),
    }


def _gflops(flops_per_token: float, fig: dict) -> float:
    return flops_per_token * fig["steady_tokens"] / fig["steady_seconds"] / 1e9


def summarize(
    runs: dict[str, dict], probe: dict, meta: dict, lengths: list[dict], dims: ModelDims
) -> tuple[list[str], str]:
    """(JSON lines, markdown table) of every comparison in `runs`."""
    w, b, n = meta["warmup"], meta["batch_size"], meta["n_pairs"]
    peak = probe["peak_gflops"]
    ep = epoch_flops(lengths, dims)
    figs = {k: _dpo_figures(v, w, b, n) for k, v in runs.items() if k.startswith(("dpo_", "rm_"))}
    lines: list[str] = []
    rows: list[tuple[str, str, str, str, str]] = []

    def add(
        comparison: str,
        metric: str,
        unit: str,
        ours: float,
        theirs: float,
        note: str,
        better: str = "higher",
        fmt: str = "{:.2f}",
        repeats: tuple[dict, dict] | None = None,
        **extra: Any,
    ) -> None:
        if repeats and len(repeats[0]["repeats"]) > 1:  # medians of interleaved runs: show every run
            mine, peer = (x["repeats"] for x in repeats)
            extra.update(rlhflab_repeats=mine, trl_repeats=peer)
            note += (
                f"; median of {len(mine)} interleaved runs (rlhflab {'/'.join(f'{x:.1f}' for x in mine)}, "
                f"TRL {'/'.join(f'{x:.1f}' for x in peer)})"
            )
        lines.append(
            json_line(comparison, metric, unit, ours, theirs, better=better, trl_variant=note, **extra)
        )
        ratio = ours / theirs if theirs else float("nan")
        rows.append(
            (f"{comparison}: {metric} ({unit})", fmt.format(ours), fmt.format(theirs), f"{ratio:.2f}x", note)
        )

    # DPO
    if "dpo_rlhflab" in figs:
        check = first_batch_check(runs["loss_rlhflab"], runs["loss_trl"])
        add(
            "dpo",
            "first_batch_loss",
            "nats",
            runs["loss_rlhflab"]["loss"],
            runs["loss_trl"]["loss"],
            "float32, explicit reference (another seed)",
            better="equal",
            fmt="{:.6f}",
            **check,
        )
        r, tp, tm = figs["dpo_rlhflab"], figs["dpo_trl_precompute"], figs["dpo_trl_matched"]
        add(
            "dpo",
            "pairs_per_s_training_steps",
            "pairs/s",
            r["steps_pairs_per_s"],
            tp["steps_pairs_per_s"],
            "TRL fp32, no grad ckpt, precompute_ref_log_probs=True (both: steps only, reference precomputed)",
            repeats=(r, tp),
        )
        add(
            "dpo",
            "pairs_per_s_training_steps",
            "pairs/s",
            r["steps_pairs_per_s"],
            tm["steps_pairs_per_s"],
            "TRL fp32, no grad ckpt, TRL default live reference (its steps include the reference forward)",
            repeats=(r, tm),
        )
        add(
            "dpo",
            "pairs_per_s_end_to_end",
            "pairs/s",
            r["epoch_pairs_per_s"],
            tm["epoch_pairs_per_s"],
            "one epoch incl. reference pass; TRL fp32, no grad ckpt, live reference (TRL default)",
        )
        add(
            "dpo",
            "pairs_per_s_end_to_end",
            "pairs/s",
            r["epoch_pairs_per_s"],
            tp["epoch_pairs_per_s"],
            "one epoch incl. reference pass; TRL fp32, no grad ckpt, precompute_ref_log_probs=True",
        )
        add(
            "dpo",
            "peak_rss",
            "MiB",
            r["peak_rss_mb"],
            tm["peak_rss_mb"],
            "TRL fp32, no grad ckpt, live reference",
            better="lower",
            fmt="{:.0f}",
        )
        add(
            "dpo",
            "peak_rss",
            "MiB",
            r["peak_rss_mb"],
            tp["peak_rss_mb"],
            "TRL fp32, no grad ckpt, precompute",
            better="lower",
            fmt="{:.0f}",
        )
        if "dpo_trl_defaults" in figs:
            td = figs["dpo_trl_defaults"]
            add(
                "dpo",
                "pairs_per_s_training_steps",
                "pairs/s",
                r["steps_pairs_per_s"],
                td["steps_pairs_per_s"],
                f"TRL as it comes on CPU: bf16 autocast, gradient checkpointing, live reference ({td['steps']} steps)",
            )
            add(
                "dpo",
                "peak_rss",
                "MiB",
                r["peak_rss_mb"],
                td["peak_rss_mb"],
                "TRL as it comes (bf16, grad ckpt)",
                better="lower",
                fmt="{:.0f}",
            )
        per_token = ep["dpo_train"] / ep["tokens"]
        ours, theirs = _gflops(per_token, r), _gflops(per_token, tp)
        add(
            "dpo",
            "achieved_gflops",
            "GFLOP/s",
            ours,
            theirs,
            "needed matmul FLOPs (head at response tokens only), training steps; TRL with precompute",
            matmul_peak_gflops=round(peak, 2),
            rlhflab_fraction_of_peak=round(ours / peak, 4),
            trl_fraction_of_peak=round(theirs / peak, 4),
            rlhflab_logged_convention_gflops=round(_gflops(ep["dpo_train_logged"] / ep["tokens"], r), 2),
        )
    # Reward model
    if "rm_rlhflab" in figs:
        r, tm = figs["rm_rlhflab"], figs["rm_trl_matched"]
        add(
            "rm",
            "pairs_per_s_training_steps",
            "pairs/s",
            r["steps_pairs_per_s"],
            tm["steps_pairs_per_s"],
            "TRL fp32, no grad ckpt",
            repeats=(r, tm),
        )
        add(
            "rm",
            "peak_rss",
            "MiB",
            r["peak_rss_mb"],
            tm["peak_rss_mb"],
            "TRL fp32, no grad ckpt",
            better="lower",
            fmt="{:.0f}",
        )
        if "rm_trl_defaults" in figs:
            td = figs["rm_trl_defaults"]
            add(
                "rm",
                "pairs_per_s_training_steps",
                "pairs/s",
                r["steps_pairs_per_s"],
                td["steps_pairs_per_s"],
                f"TRL as it comes on CPU: bf16 autocast, gradient checkpointing ({td['steps']} steps)",
            )
            add(
                "rm",
                "peak_rss",
                "MiB",
                r["peak_rss_mb"],
                td["peak_rss_mb"],
                "TRL as it comes (bf16, grad ckpt)",
                better="lower",
                fmt="{:.0f}",
            )
        per_token = ep["rm_train"] / ep["tokens"]
        ours, theirs = _gflops(per_token, r), _gflops(per_token, tm)
        add(
            "rm",
            "achieved_gflops",
            "GFLOP/s",
            ours,
            theirs,
            "needed matmul FLOPs, training steps; TRL fp32",
            matmul_peak_gflops=round(peak, 2),
            rlhflab_fraction_of_peak=round(ours / peak, 4),
            trl_fraction_of_peak=round(theirs / peak, 4),
        )
    if "ppo_rlhflab" in runs:
        split = ppo_split(runs["ppo_rlhflab"])
        if split["logged_gflops"] is not None:
            split["logged_fraction_of_peak"] = round(split["logged_gflops"] / peak, 4)
        lines.append(json.dumps({"kind": "ppo_split", **split}))
    lines.append(json.dumps({"kind": "matmul_probe", **probe}))
    return lines, markdown(rows, meta, probe, runs, efficiency(lines))


def efficiency(lines: list[str]) -> list[str]:
    """Sentences on achieved FLOP/s against the matmul peak, from the achieved_gflops lines."""
    out = []
    for row in map(json.loads, lines):
        if row.get("metric") != "achieved_gflops":
            continue
        name = {"dpo": "DPO", "rm": "Reward-model"}[row["comparison"]]
        text = (
            f"{name} training achieved {row['rlhflab']:.1f} GFLOP/s = "
            f"{100 * row['rlhflab_fraction_of_peak']:.1f}% of the measured matmul peak "
            f"({row['matmul_peak_gflops']:.1f} GFLOP/s); TRL {row['trl']:.1f} GFLOP/s = "
            f"{100 * row['trl_fraction_of_peak']:.1f}% (needed matmul FLOPs counted from the shapes)."
        )
        if "rlhflab_logged_convention_gflops" in row:
            text += (
                " As the stage logs it in perf/flops_per_s (rlhflab.models.flops without the attention "
                f"scores) it is {row['rlhflab_logged_convention_gflops']:.1f} GFLOP/s."
            )
        out.append(text)
    return out


def ppo_split(run: dict, skip: int = 1) -> dict[str, Any]:
    """Mean seconds per PPO iteration of each part (after `skip` warm-up iterations) and their shares."""
    iters = run["iterations"][skip:]
    passes = run["passes"][skip:]
    if not iters:
        raise ValueError(f"PPO ran {len(run['iterations'])} iterations; need more than {skip}")
    parts = {}
    for key, label in PPO_PARTS.items():
        source = passes if key in ("ref_logps", "policy_rollout_pass") else iters
        parts[label] = sum(x.get(key, 0.0) for x in source) / len(source)
    forward = sum(x["perf/time_forward"] for x in iters) / len(iters)
    parts["other experience work (GAE, KL shaping, checks)"] = max(
        forward - parts[PPO_PARTS["ref_logps"]] - parts[PPO_PARTS["policy_rollout_pass"]], 0.0
    )
    total = sum(parts.values())
    flops = [x["perf/flops_per_s"] for x in iters if "perf/flops_per_s" in x]
    return {
        "iterations_measured": len(iters),
        "seconds_per_iteration": total,
        # The stage's own perf/flops_per_s (rlhflab.models.flops), mean over the measured iterations.
        "logged_gflops": round(sum(flops) / len(flops) / 1e9, 3) if flops else None,
        "seconds": {k: round(v, 4) for k, v in parts.items()},
        "share": {k: round(v / total, 4) for k, v in parts.items()},
        "slowest": max(parts, key=parts.get),
    }


def markdown(rows: list[tuple[str, ...]], meta: dict, probe: dict, runs: dict, notes: list[str] = ()) -> str:
    out = ["| comparison | rlhflab | TRL | rlhflab / TRL | TRL setting and notes |", "|---|---|---|---|---|"]
    out += [f"| {' | '.join(row)} |" for row in rows]
    out.append("")
    out.append(
        f"Matmul probe: {probe['peak_gflops']:.1f} GFLOP/s float32 peak "
        f"({', '.join(f'{k}: {v:.1f}' for k, v in probe['gflops_by_size'].items())}), "
        f"{probe['threads']} threads"
        + (
            f"; {probe['peak_gflops_at_end']:.1f} GFLOP/s at the end of the run."
            if "peak_gflops_at_end" in probe
            else "."
        )
    )
    out += ["", *notes] if notes else []
    if "ppo_rlhflab" in runs:
        split = ppo_split(runs["ppo_rlhflab"])
        out += [
            "",
            f"PPO iteration split (rlhflab, mean of {split['iterations_measured']} iterations after one "
            f"warm-up, {split['seconds_per_iteration']:.2f} s per iteration):",
            "",
            "| part | seconds | share |",
            "|---|---|---|",
        ]
        out += [f"| {k} | {v:.3f} | {100 * split['share'][k]:.1f}% |" for k, v in split["seconds"].items()]
        if split["logged_gflops"] is not None:
            out += [
                "",
                f"PPO perf/flops_per_s (stage log): {split['logged_gflops']:.2f} GFLOP/s = "
                f"{100 * split['logged_gflops'] / probe['peak_gflops']:.1f}% of the matmul peak.",
            ]
    return "\n".join(out) + "\n"
