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
    """The shapes of the benchmark's Llama-style decoder. Its FLOPs are counted by `rlhflab.models.flops`
    (in `bench_report`, which runs in rlhflab's venv; this module stays standard-library only)."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int


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
