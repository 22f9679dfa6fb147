"""Turn the measurements of `compare_trl.py` into JSON lines and the BENCHMARKS.md tables.

Pure functions over plain dicts (no TRL, nothing timed), so `tests/benchmarks` can check them on made-up runs.
FLOPs are counted with `rlhflab.models.flops`' building blocks (so this runs in rlhflab's venv), but from
what each side executed: the padded shape of every batch it ran (recorded by `bench_common.Clock`) and how
each framework computes (`trl_dpo_pass_flops`, `rlhflab_dpo_pass_flops`, `trl_rm_pass_flops`,
`rlhflab_rm_pass_flops`). TRL is never credited with rlhflab's work or the other way round.
"""

from __future__ import annotations

import json
from typing import Any

from bench_common import ModelDims, lora_adapter_weights, memory_above_baseline, steady_stats
from bench_grpo import _Rows, summarize_grpo

from rlhflab.models import flops
from rlhflab.models.logprobs import SAVED_PROBS_BYTES

LOSS_TOLERANCE = 1e-4
PPO_PARTS = {
    "perf/time_generate": "generate",
    "perf/time_score": "score",
    "ref_logps": "reference pass",
    "policy_rollout_pass": "policy rollout pass (old log-probs, values, entropy)",
    "perf/time_optimize": "optimize (PPO epochs)",
}
# Phases of one process, spawn to exit, in the order the time-split table lists them.
PHASES = (
    "startup",
    "load",
    "data",
    "reference",
    "train",
    "eval",
    "normalization",
    "save",
    "other",
)
PHASE_LABELS = {
    "startup": "python + imports (spawn to post-import baseline)",
    "load": "model load",
    "data": "data load + tokenization",
    "reference": "reference pass (precompute)",
    "train": "training steps (first batch to last optimizer step)",
    "eval": "final evaluation",
    "normalization": "reward normalization pass",
    "save": "save the model",
    "other": "other (config, trainer setup, exit)",
}
# The TRL settings, as the tables name them.
TRL_VARIANTS = {
    "tuned": "TRL tuned: fp32, no grad ckpt, precompute_ref_log_probs + precompute_ref_batch_size 32, "
    "padding_free requested, fused AdamW / wd 0 / constant lr set explicitly",
    "live": "TRL fp32, no grad ckpt, live reference (its default), same optimizer set explicitly",
    "defaults": "TRL as it comes on CPU: bf16 autocast, gradient checkpointing, live reference",
}


# --------------------------------------------------------------------------------------------------------
# FLOPs: what each side needs, and what each side executes
# --------------------------------------------------------------------------------------------------------


def _matmul_params(
    dims: ModelDims, head_outputs: int, lora_r: int = 0, head_trained: bool = False
) -> flops.MatmulParams:
    """The decoder's matmul weights with a head of `head_outputs` outputs; with `lora_r`, the base weights are
    frozen (`frozen_body`, and `frozen_head` unless `head_trained`: a reward model's score head trains in full)
    and the rank-`lora_r` adapters of every layer's seven projections are trainable body weights."""
    base = flops.decoder_matmul_params(
        hidden=dims.hidden,
        layers=dims.layers,
        heads=dims.heads,
        kv_heads=dims.kv_heads,
        intermediate=dims.intermediate,
        head_outputs=head_outputs,
    )
    if not lora_r:
        return base
    return base._replace(
        body=base.body + dims.layers * lora_adapter_weights(dims, lora_r),
        frozen_body=base.body,
        frozen_head=0 if head_trained else base.head,
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


def _padded(p: dict) -> tuple[int, int]:
    """(padded tokens, query-key pairs) of a recorded batch: a masked SDPA call (padding, or a 4-D mask)
    scores the whole padded square of every row, so both are counted over rows x cols."""
    return p["rows"] * p["cols"], p["rows"] * p["cols"] * p["cols"]


# How the per-pass functions below count a training step (`flops.causal_lm_train_flops` and
# `flops.reward_model_train_flops` with the frozen weights of `_matmul_params`), as the report states it.
ACCOUNTING = {
    "full": "full fine-tuning: a training step costs 6 FLOPs per matmul weight per token it runs at (forward 2, "
    "backward 2 for the input gradient + 2 for the weight gradient), ~6 N T",
    "lora": "LoRA: the frozen base weights (the body, and the LM head where it runs) get no weight gradient, so "
    "a training step costs 4 FLOPs per frozen weight per token (forward 2 + input gradient 2), ~4 N T instead "
    "of 6 N T, plus 6 per adapter weight (r x (in + out) per adapted projection) and per weight of a head that "
    "trains in full (the reward model's score head); TRL's fused LM head: forward + tile recompute + input "
    "gradient = 6 per head weight per position instead of 8; reference passes run the base model without "
    "adapters",
}


def trl_dpo_pass_flops(dims: ModelDims, p: dict, live_reference: bool, lora_r: int = 0) -> float:
    """FLOPs that TRL 1.16's DPOTrainer executes on CPU for one recorded batch (chosen and rejected stacked:
    rows x cols padded tokens).

    - The body at every padded token, attention over the whole padded square.
    - Its fused LM head (`trl.kernels.chunked_logprob`) scores every position but the last of each row,
      prompt and padding included: the compact path (valid positions only) runs only with Triton on CUDA
      or XPU. Forward: one head matmul per position. Training: in the backward the tile is recomputed and
      then the two gradient matmuls run, so 8 x head weights per position in all; with LoRA the head is
      frozen and its weight gradient is skipped (6 x).
    - A training step with a live reference (no precompute) also runs a reference forward of the batch
      (with LoRA: the base model, adapters disabled).
    - With `lora_r`: the frozen body costs 4 per weight per token in training (no weight gradient), the
      adapters 6 (`ACCOUNTING["lora"]`).
    """
    lm = _matmul_params(dims, dims.vocab, lora_r)
    tokens, pairs = _padded(p)
    head = p["rows"] * (p["cols"] - 1)
    forward = flops.causal_lm_forward_flops(lm, tokens, head, pairs)
    if p["kind"] == "forward":
        return forward
    head_train = (6.0 if lora_r else 8.0) * lm.head * head
    train = flops.causal_lm_train_flops(lm, tokens, 0, pairs) + head_train
    reference = flops.causal_lm_forward_flops(_matmul_params(dims, dims.vocab), tokens, head, pairs)
    return train + (reference if live_reference else 0.0)


def trl_sft_pass_flops(dims: ModelDims, p: dict, lora_r: int = 0) -> float:
    """FLOPs that TRL 1.16's SFTTrainer executes on CPU for one recorded batch: as DPO's policy pass
    (`trl_dpo_pass_flops` without a reference): SFT's loss goes through the same fused LM head
    (`add_fused_lm_head`), which on CPU scores every position but the last of each row."""
    return trl_dpo_pass_flops(dims, p, False, lora_r)


def rlhflab_dpo_pass_flops(dims: ModelDims, p: dict, lora_r: int = 0) -> float:
    """FLOPs that rlhflab's DPO (or SFT) stage executes for one recorded batch: the body at every padded
    token, attention over the padded square, the LM head only at the response positions (`head_rows`).
    Training: the head keeps its softmax for the backward when it fits `SAVED_PROBS_BYTES` (6 x head weights
    per position: forward + two gradient matmuls), else recomputes the logits (8 x); with `lora_r` the frozen
    body and head get no weight gradient (4 per weight per token, `ACCOUNTING["lora"]`), the adapters 6."""
    lm = _matmul_params(dims, dims.vocab, lora_r)
    tokens, pairs = _padded(p)
    head = p["head_rows"]
    if p["kind"] == "forward":
        return flops.causal_lm_forward_flops(lm, tokens, head, pairs)
    recompute = 2.0 * lm.head * head if head * dims.vocab * 4 > SAVED_PROBS_BYTES else 0.0
    return flops.causal_lm_train_flops(lm, tokens, head, pairs) + recompute


def trl_rm_pass_flops(dims: ModelDims, p: dict, lora_r: int = 0) -> float:
    """FLOPs that TRL's RewardTrainer executes for one recorded batch (one row per response): the
    *ForSequenceClassification model runs the body and its 1-output score head at every padded token (it
    pools the last real token afterwards), attention over the padded square. With `lora_r`: the body is
    frozen (4 per weight per token in training), the adapters and the score head train (6)."""
    score = _matmul_params(dims, 1, lora_r, head_trained=True)
    tokens, pairs = _padded(p)
    if p["kind"] == "forward":
        return flops.causal_lm_forward_flops(score, tokens, tokens, pairs)
    return flops.causal_lm_train_flops(score, tokens, tokens, pairs)


def rlhflab_rm_pass_flops(dims: ModelDims, p: dict, lora_r: int = 0) -> float:
    """FLOPs that rlhflab's reward stage executes for one recorded batch (shared-prompt rows: prompt,
    chosen, rejected in one row; `reads` positions read): the body at every padded token, except the last
    layer's query, attention output and MLP, which run only at the reads (the final-layer fast path), as
    does the score head; attention over the padded square at every layer but the last, where only the
    reads query (against every key). With `lora_r`: the body is frozen (4 per weight per token in
    training), the adapters (those of the last layer's q, o, gate, up, down at the reads only) and the
    score head train (6)."""
    base = _matmul_params(dims, 1, lora_r, head_trained=True)
    final = 2 * dims.hidden * dims.hidden + 3 * dims.hidden * dims.intermediate  # q, o, gate, up, down
    params = base._replace(final_at_reads=final)
    if lora_r:
        at_reads = ("q_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
        params = params._replace(
            final_at_reads=final + lora_adapter_weights(dims, lora_r, at_reads), frozen_final_at_reads=final
        )
    tokens, square = _padded(p)
    reads = p["reads"]
    attention = 4.0 * base.attn_dim * ((dims.layers - 1) * square + reads * p["cols"])
    if p["kind"] == "forward":
        return flops.reward_model_forward_flops(params, tokens, reads) + attention
    return flops.reward_model_train_flops(params, tokens, reads) + 3.0 * attention


def pass_flops(
    side: str, comparison: str, dims: ModelDims, p: dict, live_reference: bool = False, lora_r: int = 0
) -> float:
    """Executed FLOPs of one recorded batch of `side` ("rlhflab" or "trl") in `comparison` ("sft", "dpo",
    "rm"), with rank-`lora_r` adapters (0: full fine-tuning)."""
    if comparison == "dpo":
        if side == "trl":
            return trl_dpo_pass_flops(dims, p, live_reference, lora_r)
        return rlhflab_dpo_pass_flops(dims, p, lora_r)
    if comparison == "sft":
        return (
            trl_sft_pass_flops(dims, p, lora_r) if side == "trl" else rlhflab_dpo_pass_flops(dims, p, lora_r)
        )
    return trl_rm_pass_flops(dims, p, lora_r) if side == "trl" else rlhflab_rm_pass_flops(dims, p, lora_r)


def executed_flops(
    run: dict, side: str, comparison: str, dims: ModelDims, warmup: int, lora_r: int = 0
) -> dict[str, float]:
    """Executed FLOPs of a timed run, from its recorded batches: `steady` (the training steps after the
    warm-up, what the steady-state GFLOP/s divides), `train` (every training step), and each other
    phase's forward passes (`reference`, `eval`, `normalization`), `total` (all of them). With `lora_r`, a
    reference precompute runs the base model (adapters off) and is counted without them."""
    live = bool(run.get("live_reference", False))
    out = {"steady": 0.0, "train": 0.0, "total": 0.0}
    for p in run["passes"]:
        f = pass_flops(side, comparison, dims, p, live, 0 if p["phase"] == "reference" else lora_r)
        out["total"] += f
        if p["kind"] == "train":
            out["train"] += f
            out["steady"] += f if p["step"] >= warmup else 0.0
        else:
            out[p["phase"]] = out.get(p["phase"], 0.0) + f
    return out


# --------------------------------------------------------------------------------------------------------
# Figures of one run
# --------------------------------------------------------------------------------------------------------


def first_batch_check(rlhflab: dict, trl: dict) -> dict[str, Any]:
    """Do both frameworks train on the same token ids, and agree on the first batch's DPO loss?"""
    ids_equal = rlhflab["token_ids"] == trl["token_ids"]
    diff = abs(rlhflab["loss"] - trl["loss"])
    return {"token_ids_equal": ids_equal, "abs_diff": diff, "ok": ids_equal and diff <= LOSS_TOLERANCE}


def end_to_end_pairs_per_s(run: dict, batch: int, n_pairs: int) -> float:
    """Pairs trained per second of the whole process, spawn to exit (imports, model load, tokenization,
    reference pass, training, evaluation, normalization, saving): a whole epoch (n_pairs) unless the run
    was cut short (max_steps)."""
    return min(n_pairs, batch * len(run["step_seconds"])) / run["process_seconds"]


def time_split(run: dict) -> dict[str, float]:
    """Seconds of each phase of the process (PHASES), spawn to exit, from the parent's spawn and exit stamps
    and the child's stamps on the same clock; `other` is what is left (config, trainer setup, exit)."""
    phases = run.get("phases", {})
    split = {
        "startup": run["imports_done"] - run["spawn"],
        "train": (run["step_ends"][-1] - run["first_train"]) if run["step_ends"] else 0.0,
        **{k: phases.get(k, 0.0) for k in ("load", "data", "reference", "eval", "normalization", "save")},
    }
    split["other"] = max(run["process_seconds"] - sum(split.values()), 0.0)
    return {k: split[k] for k in PHASES}


def run_figures(run: dict, warmup: int, batch: int, n_pairs: int) -> dict[str, Any]:
    steady = steady_stats(run["step_seconds"], warmup, batch)
    baseline = run["rss_after_imports_mb"]
    return {
        "steps_pairs_per_s": steady["items_per_s"],
        "step_median_s": steady["step_median_s"],
        "steps": steady["steps"],
        "steady_seconds": steady["seconds"],
        "steady_tokens": float(sum(run["step_tokens"][warmup:])),
        "e2e_pairs_per_s": end_to_end_pairs_per_s(run, batch, n_pairs),
        "process_seconds": run["process_seconds"],
        "peak_rss_mb": run["peak_rss_mb_wait4"],
        "baseline_rss_mb": baseline,
        "rss_above_baseline_mb": memory_above_baseline(run["peak_rss_mb_wait4"], baseline),
        "split": time_split(run),
        "repeats": run.get("repeat_pairs_per_s", []),
        "repeats_e2e": run.get("repeat_e2e_pairs_per_s", []),
    }


def median_run(results: list[dict], warmup: int, batch: int, n_pairs: int | None = None) -> dict:
    """The run with the median steady-state throughput among repeats of one measurement (the lower middle
    one for an even count), with every repeat's pairs/s in `repeat_pairs_per_s` and, given n_pairs, its
    end-to-end pairs/s in `repeat_e2e_pairs_per_s` (in run order)."""
    speeds = [steady_stats(r["step_seconds"], warmup, batch)["items_per_s"] for r in results]
    order = sorted(range(len(results)), key=speeds.__getitem__)
    picked = {**results[order[(len(order) - 1) // 2]], "repeat_pairs_per_s": [round(x, 3) for x in speeds]}
    if n_pairs is not None:
        picked["repeat_e2e_pairs_per_s"] = [
            round(end_to_end_pairs_per_s(r, batch, n_pairs), 3) for r in results
        ]
    return picked


# --------------------------------------------------------------------------------------------------------
# Tables
# --------------------------------------------------------------------------------------------------------


def _rounds(label: str, mine: list[float], peer: list[float]) -> str:
    if len(mine) < 2:
        return ""
    return (
        f"; {label} of {len(mine)} interleaved runs (rlhflab {'/'.join(f'{x:.2f}' for x in mine)}, "
        f"TRL {'/'.join(f'{x:.2f}' for x in peer)})"
    )


# The trained comparisons of `summarize_shape`: table name, and what one training example is.
TRAINED = {"sft": ("SFT", "sample"), "dpo": ("DPO", "pair"), "rm": ("Reward-model", "pair")}
SFT_LABELS = {
    "tuned": "TRL tuned: fp32, no grad ckpt, completion_only_loss, fused AdamW / wd 0 / constant lr set explicitly",
    "defaults": "TRL as it comes on CPU: bf16 autocast, gradient checkpointing, completion_only_loss",
}


def variant_label(comparison: str, variant: str) -> str:
    """How the tables name TRL setting `variant` of `comparison`."""
    if comparison == "sft":
        return SFT_LABELS[variant]
    label = TRL_VARIANTS[variant]
    if comparison == "rm":
        label = label.replace(", live reference", "").replace(" (its default)", "")
        label = label.replace(
            "precompute_ref_log_probs + precompute_ref_batch_size 32, padding_free requested, ", ""
        )
    return label


def summarize_shape(
    shape: str, runs: dict[str, dict], probe: dict, meta: dict, dims: ModelDims
) -> tuple[list[str], list[tuple[str, ...]], dict[str, dict]]:
    """(JSON lines, table rows, time splits by run name) of every comparison of one shape in `runs`:
    "sft_rlhflab", "sft_trl_<variant>", "dpo_rlhflab", "dpo_trl_<variant>", "rm_rlhflab", "rm_trl_<variant>",
    "loss_rlhflab"/"loss_trl", and what each side trains (grpo_* too)."""
    w, b, n = meta["warmup"], meta["batch_size"], meta["n_pairs"]
    out = _Rows(shape)
    figs = {k: run_figures(v, w, b, n) for k, v in runs.items() if k.startswith(RUN_PREFIXES)}
    splits = {k: f["split"] for k, f in figs.items()}
    if "loss_rlhflab" in runs and "loss_trl" in runs:
        check = first_batch_check(runs["loss_rlhflab"], runs["loss_trl"])
        out.add(
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
    for comparison in TRAINED:
        if f"{comparison}_rlhflab" in figs:
            comparison_rows(out, comparison, runs, figs, probe["peak_gflops"], meta, dims)
    trainable_rows(out, runs, meta.get("lora", 0))
    return out.lines, out.rows, splits


RUN_PREFIXES = tuple(f"{c}_" for c in TRAINED)


def comparison_rows(
    out: _Rows, comparison: str, runs: dict, figs: dict, peak: float, meta: dict, dims: ModelDims
) -> None:
    """Rows of one trained comparison: rlhflab against each TRL setting that ran (throughput steady and
    end to end, SFT's tokens/s, memory; executed GFLOP/s against the tuned setting)."""
    w, b = meta["warmup"], meta["batch_size"]
    item = TRAINED[comparison][1]
    r = figs[f"{comparison}_rlhflab"]
    for variant in TRL_VARIANTS:
        name = f"{comparison}_trl_{variant}"
        if name not in figs:
            continue
        t, label = figs[name], variant_label(comparison, variant)
        full_epoch = not (runs[name].get("variant") or {}).get("max_steps")
        out.add(
            comparison,
            f"{item}s_per_s_steady",
            f"{item}s/s",
            r["steps_pairs_per_s"],
            t["steps_pairs_per_s"],
            f"{label} ({t['steps']} steady steps)" + _rounds("median", r["repeats"], t["repeats"]),
            rlhflab_repeats=r["repeats"],
            trl_repeats=t["repeats"],
        )
        e2e_note = (
            f"{label}; process spawn to exit ({r['process_seconds']:.0f} s vs {t['process_seconds']:.0f} s)"
        )
        if full_epoch:
            out.add(
                comparison,
                f"{item}s_per_s_end_to_end",
                f"{item}s/s",
                r["e2e_pairs_per_s"],
                t["e2e_pairs_per_s"],
                e2e_note
                + _rounds("run with the median steady rate; rounds", r["repeats_e2e"], t["repeats_e2e"]),
                rlhflab_repeats=r["repeats_e2e"],
                trl_repeats=t["repeats_e2e"],
            )
        if comparison == "sft":
            token_rows(
                out, runs[f"{comparison}_rlhflab"], runs[name], r, t, label, e2e_note if full_epoch else ""
            )
        out.add(
            comparison,
            "rss_above_baseline",
            "MiB",
            r["rss_above_baseline_mb"],
            t["rss_above_baseline_mb"],
            f"{label}; peak RSS minus RSS after imports (peaks {r['peak_rss_mb']:.0f} vs "
            f"{t['peak_rss_mb']:.0f} MiB, baselines {r['baseline_rss_mb']:.0f} vs {t['baseline_rss_mb']:.0f})",
            better="lower",
            fmt="{:.0f}",
        )
        if variant == "tuned":
            lora = meta.get("lora", 0)
            ours = executed_flops(runs[f"{comparison}_rlhflab"], "rlhflab", comparison, dims, w, lora)
            theirs = executed_flops(runs[name], "trl", comparison, dims, w, lora)
            per = [x["steady"] / (f["steps"] * b) / 1e9 for x, f in ((ours, r), (theirs, t))]
            ours_g, theirs_g = (
                ours["steady"] / r["steady_seconds"] / 1e9,
                theirs["steady"] / t["steady_seconds"] / 1e9,
            )
            out.add(
                comparison,
                "executed_gflops",
                "GFLOP/s",
                ours_g,
                theirs_g,
                f"{label}; each side's own executed FLOPs (padded batches, its LM head / score head where it runs "
                f"it; {'LoRA' if lora else 'full fine-tuning'} accounting) over its steady steps; per {item} "
                f"rlhflab {per[0]:.1f} GFLOP, TRL {per[1]:.1f} GFLOP",
                matmul_peak_gflops=round(peak, 2),
                rlhflab_fraction_of_peak=round(ours_g / peak, 4),
                trl_fraction_of_peak=round(theirs_g / peak, 4),
                flop_accounting="lora" if lora else "full",
                **{f"rlhflab_gflop_per_{item}": round(per[0], 3), f"trl_gflop_per_{item}": round(per[1], 3)},
            )


def token_rows(out: _Rows, ours: dict, theirs: dict, r: dict, t: dict, label: str, e2e_note: str) -> None:
    """SFT's tokens/s (each side's own real tokens, prompt included: attention mask 1), over its steady steps
    and, for a whole epoch (`e2e_note` set), over the process spawn to exit."""
    out.add(
        "sft",
        "tokens_per_s_steady",
        "tokens/s",
        r["steady_tokens"] / r["steady_seconds"],
        t["steady_tokens"] / t["steady_seconds"],
        f"{label}; real tokens (prompt + completion) of the steady steps: rlhflab {r['steady_tokens']:.0f}, "
        f"TRL {t['steady_tokens']:.0f}",
        fmt="{:.0f}",
    )
    if e2e_note:
        mine, peer = sum(ours["step_tokens"]), sum(theirs["step_tokens"])
        out.add(
            "sft",
            "tokens_per_s_end_to_end",
            "tokens/s",
            mine / r["process_seconds"],
            peer / t["process_seconds"],
            f"{e2e_note}; trained tokens: rlhflab {mine:.0f}, TRL {peer:.0f}",
            fmt="{:.0f}",
        )


def trainable_rows(out: _Rows, runs: dict[str, dict], lora: int) -> None:
    """What each side's optimizer trains, per comparison (rlhflab against TRL's tuned setting, or GRPO's)."""
    for comparison in ("sft", "dpo", "rm", "grpo"):
        ours = runs.get(f"{comparison}_rlhflab", {}).get("trainable")
        peer = next((runs[k] for k in (f"{comparison}_trl_tuned", f"{comparison}_trl") if k in runs), {})
        theirs = peer.get("trainable")
        if not ours or not theirs:
            continue
        modules = "; adapted modules: rlhflab {} ({}), TRL {} ({})".format(
            "/".join(ours["lora_modules"]) or "none",
            ours["lora_module_count"],
            "/".join(theirs["lora_modules"]) or "none",
            theirs["lora_module_count"],
        )
        setting = f"LoRA r={lora}" if lora else "full fine-tuning"
        head = "; both include the 1 x hidden score head" if comparison == "rm" else ""
        out.add(
            comparison,
            "trainable_params",
            "parameters",
            float(ours["trainable_params"]),
            float(theirs["trainable_params"]),
            f"{setting}: parameters the optimizer trains (shared tensors once){head}{modules}",
            better="equal",
            fmt="{:.0f}",
            rlhflab_lora_modules=ours["lora_modules"],
            trl_lora_modules=theirs["lora_modules"],
        )


def summarize(
    shape_runs: dict[str, dict[str, dict]],
    probe: dict,
    meta: dict,
    dims: dict[str, ModelDims],
) -> tuple[list[str], str]:
    """(JSON lines, markdown) of every shape in `shape_runs` ({shape: {run name: run}}); meta["shapes"]
    holds each shape's warmup, batch_size, n_pairs and parameter counts (and its "grpo" / "generate"
    settings when those comparisons ran: `bench_grpo.summarize_grpo`)."""
    lines: list[str] = []
    rows: list[tuple[str, ...]] = []
    splits: dict[str, dict[str, dict]] = {}
    extra: list[str] = []
    for shape, runs in shape_runs.items():
        shape_lines, r, s = summarize_shape(shape, runs, probe, meta["shapes"][shape], dims[shape])
        grpo_lines, grpo_rows, grpo_md = summarize_grpo(shape, runs, meta["shapes"][shape])
        lines += shape_lines + grpo_lines
        rows += r + grpo_rows
        splits[shape] = s
        extra += grpo_md
    notes = efficiency(lines) + option_notes(shape_runs) + accounting_notes(lines, meta)
    ppo = {shape: runs["ppo_rlhflab"] for shape, runs in shape_runs.items() if "ppo_rlhflab" in runs}
    for shape, run in ppo.items():
        split = ppo_split(run)
        if split["logged_gflops"] is not None:
            split["logged_fraction_of_peak"] = round(split["logged_gflops"] / probe["peak_gflops"], 4)
        lora = meta["shapes"][shape].get("lora", 0)
        lines.append(json.dumps({"kind": "ppo_split", "shape": shape, "lora": lora, **split}))
    for shape, by_run in splits.items():
        if by_run:  # none when only the GRPO / sampler comparisons ran (bench_grpo has its own split)
            lines.append(json.dumps({"kind": "time_split", "shape": shape, "seconds": by_run}))
    lines.append(json.dumps({"kind": "matmul_probe", **probe}))
    return lines, markdown(rows, meta, probe, splits, shape_runs, notes, ppo, extra)


def option_notes(shape_runs: dict[str, dict[str, dict]]) -> list[str]:
    """One sentence per TRL setting whose requested options the installed TRL lacks or switched off."""
    out, seen = [], set()
    for runs in shape_runs.values():
        for name, run in runs.items():
            missing, overridden = run.get("options_missing") or [], run.get("options_overridden") or {}
            key = (name.removesuffix("_r0"), tuple(missing), tuple(sorted(overridden)))
            if not (missing or overridden) or key in seen:
                continue
            seen.add(key)
            parts = []
            if missing:
                parts.append(f"not in this TRL's config class (left out): {', '.join(missing)}")
            if overridden:
                parts.append(
                    "switched back by TRL itself: " + ", ".join(f"{k} -> {v}" for k, v in overridden.items())
                )
            out.append(f"{name}: " + "; ".join(parts) + ".")
    return out


def efficiency(lines: list[str]) -> list[str]:
    """Sentences on achieved (executed) FLOP/s against the matmul peak, from the executed_gflops lines."""
    out = []
    for row in map(json.loads, lines):
        if row.get("metric") != "executed_gflops":
            continue
        name, item = TRAINED[row["comparison"]]
        out.append(
            f"{row['shape']}: {name} training executed {row['rlhflab']:.1f} GFLOP/s = "
            f"{100 * row['rlhflab_fraction_of_peak']:.1f}% of the measured matmul peak "
            f"({row['matmul_peak_gflops']:.1f} GFLOP/s) at {row[f'rlhflab_gflop_per_{item}']:.1f} GFLOP per "
            f"{item}; TRL (tuned) {row['trl']:.1f} GFLOP/s = {100 * row['trl_fraction_of_peak']:.1f}% at "
            f"{row[f'trl_gflop_per_{item}']:.1f} GFLOP per {item} (each side's own executed FLOPs)."
        )
    return out


def accounting_notes(lines: list[str], meta: dict) -> list[str]:
    """Which FLOP accounting the executed GFLOP/s rows used (full fine-tuning or LoRA), and the PPO note."""
    used = {row.get("flop_accounting") for row in map(json.loads, lines)} - {None}
    out = [f"FLOP accounting ({kind}): {ACCOUNTING[kind]}." for kind in sorted(used)]
    if any("ppo" in m.get("compares", ()) for m in meta["shapes"].values()):
        out.append(
            "PPO: rlhflab alone; TRL 1.16 has no PPO trainer (neither trl nor trl.experimental), so there is "
            "no TRL figure to put beside it."
        )
    return out


def round_table(shape_runs: dict[str, dict[str, dict]], meta: dict) -> list[str]:
    """Per-round steady and end-to-end pairs/s of every timed run, in run order."""
    out = ["| shape | run | steady pairs/s per round | end-to-end pairs/s per round |", "|---|---|---|---|"]
    for shape, runs in shape_runs.items():
        for name, run in runs.items():
            if not name.startswith(RUN_PREFIXES):
                continue
            steady = "/".join(f"{x:.2f}" for x in run.get("repeat_pairs_per_s", []))
            e2e = "/".join(f"{x:.2f}" for x in run.get("repeat_e2e_pairs_per_s", []))
            out.append(f"| {shape} | {name} | {steady} | {e2e} |")
    return out


def split_table(shape: str, by_run: dict[str, dict]) -> list[str]:
    """Seconds per phase (rows) of each run (columns), the median run of each."""
    names = list(by_run)
    out = [
        f"Where the time goes, {shape} shape (seconds, spawn to exit, the median run of each):",
        "",
        "| phase | " + " | ".join(names) + " |",
        "|---|" + "---|" * len(names),
    ]
    for phase in PHASES:
        out.append(
            f"| {PHASE_LABELS[phase]} | " + " | ".join(f"{by_run[n][phase]:.1f}" for n in names) + " |"
        )
    out.append("| **total** | " + " | ".join(f"{sum(by_run[n].values()):.1f}" for n in names) + " |")
    return out


def markdown(
    rows: list[tuple[str, ...]],
    meta: dict,
    probe: dict,
    splits: dict[str, dict[str, dict]],
    shape_runs: dict[str, dict[str, dict]],
    notes: list[str] = (),
    ppo: dict[str, dict] | None = None,
    extra: list[str] = (),
) -> str:
    """The table.md text: each shape's setting, the comparison table, the probe, notes, per-round figures,
    time splits, GRPO's tables (`extra`) and each shape's PPO split (`ppo`: {shape: run})."""
    out = []
    for shape, m in meta["shapes"].items():
        pc = m.get("params") or {}
        share = f", embedding / LM head {100 * pc['head_share']:.0f}% of them" if pc else ""
        line = f"- {shape}: {m['description']}, {m['n_params'] / 1e6:.2f}M parameters{share}"
        if {"sft", "dpo", "rm"} & set(m.get("compares", ("dpo", "rm"))):
            line += (
                f"; batch {m['batch_size']}, {m['n_pairs']} training pairs (one epoch = {m['warmup']} warm-up + "
                f"{m['steps']} measured steps), {m['n_eval']} held-out pairs"
            )
        out.append(line + ".")
        if "sft" in m.get("compares", ()):
            out.append(
                "  SFT: the same pairs' prompts with their chosen responses as prompt + completion "
                "demonstrations, the prompt masked out of the loss on both sides; the same epoch and batch."
            )
        if "grpo" in m:
            g = m["grpo"]
            out.append(
                f"  GRPO: {g['prompts_per_iteration']} prompts x {g['num_generations']} samples = "
                f"{g['per_iteration']} completions per iteration and optimizer step, at most {g['max_new_tokens']} "
                f"new tokens, temperature 1, no top-k / top-p, lr {g['lr']:g}, beta {g['beta']:g}, reward "
                f"{g['reward']}; {g['warmup']} warm-up + {g['steps']} measured iterations ({g['n_prompts']} "
                "prompts, each used once)."
            )
        if "generate" in m:
            g = m["generate"]
            out.append(
                f"  Sampler: {g['rows']} rows ({g['prompts']} prompts x {g['repeat']}), at most "
                f"{g['max_new_tokens']} new tokens, temperature 1, no top-k / top-p, the same seed per call on "
                f"both sides; {g['warmup']} warm-up + {g['calls']} measured calls."
            )
    out += [
        "",
        "| comparison | rlhflab | TRL | rlhflab / TRL | TRL setting and notes |",
        "|---|---|---|---|---|",
    ]
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
    if any(len(r.get("repeat_pairs_per_s", [])) > 1 for runs in shape_runs.values() for r in runs.values()):
        out += ["", "Per round (run order):", "", *round_table(shape_runs, meta)]
    for shape, by_run in splits.items():
        if by_run:
            out += ["", *split_table(shape, by_run)]
    out += list(extra)
    for shape, run in (ppo or {}).items():
        out += ppo_table(shape, run, meta["shapes"][shape], probe)
    return "\n".join(out) + "\n"


def ppo_table(shape: str, run: dict, m: dict, probe: dict) -> list[str]:
    """Markdown: one shape's PPO run (rlhflab alone): throughput and where an iteration's time goes."""
    split = ppo_split(run)
    p = m.get("ppo") or {}
    setting = f"LoRA r={m['lora']}" if m.get("lora") else "full fine-tuning"
    out = [
        "",
        f"PPO iteration split (rlhflab, {shape} shape, {setting}; TRL 1.16 has no PPO trainer; "
        f"{p.get('rollout_batch_size', '?')} rollouts of at most {p.get('max_new_tokens', '?')} new tokens per "
        f"iteration, {p.get('ppo_epochs', '?')} PPO epochs of minibatch {p.get('minibatch_size', '?')}; mean of "
        f"{split['iterations_measured']} iterations after one warm-up, {split['seconds_per_iteration']:.2f} s per "
        "iteration):",
        "",
        "| part | seconds | share |",
        "|---|---|---|",
    ]
    out += [f"| {k} | {v:.3f} | {100 * split['share'][k]:.1f}% |" for k, v in split["seconds"].items()]
    if split["rollouts_per_s"] is not None:
        out += [
            "",
            f"PPO throughput ({shape}): {split['rollouts_per_s']:.2f} rollouts/s, "
            f"{split['response_tokens_per_s']:.1f} response tokens/s (mean response "
            f"{split['response_length']:.1f} tokens); trainable parameters (policy + value head) "
            f"{split['trainable_params']}.",
        ]
    if split["logged_gflops"] is not None:
        out += [
            "",
            f"PPO perf/flops_per_s (stage log): {split['logged_gflops']:.2f} GFLOP/s = "
            f"{100 * split['logged_gflops'] / probe['peak_gflops']:.1f}% of the matmul peak.",
        ]
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
    flops_per_s = [x["perf/flops_per_s"] for x in iters if "perf/flops_per_s" in x]
    rollouts = run.get("rollout_batch_size")
    length = sum(x.get("perf/response_length", 0.0) for x in iters) / len(iters)
    return {
        "iterations_measured": len(iters),
        "seconds_per_iteration": total,
        # Rollouts (prompts answered) and sampled response tokens per second of a whole iteration.
        "rollouts_per_s": rollouts / total if rollouts else None,
        "response_tokens_per_s": rollouts * length / total if rollouts else None,
        "response_length": length,
        "trainable_params": (run.get("trainable") or {}).get("trainable_params"),
        # The stage's own perf/flops_per_s (rlhflab.models.flops), mean over the measured iterations.
        "logged_gflops": round(sum(flops_per_s) / len(flops_per_s) / 1e9, 3) if flops_per_s else None,
        "seconds": {k: round(v, 4) for k, v in parts.items()},
        "share": {k: round(v / total, 4) for k, v in parts.items()},
        "slowest": max(parts, key=parts.get),
    }
