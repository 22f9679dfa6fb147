"""Reference log-probs of a whole dataset, computed once and cached in the run directory.

Offline preference methods compare the policy with a frozen reference on the same responses at every step.
The reference never changes, so its summed response log-probs are computed once before training (batched
by length) and kept in RUN/ref_logps.pt with a fingerprint of the reference and of every token; a resumed
run reuses them, and no reference model stays in memory while training.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import time
from array import array
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from torch import Tensor

from rlhflab.core.health import check_finite
from rlhflab.data.collate import collate_preference
from rlhflab.models.flops import causal_lm_forward_flops, matmul_params
from rlhflab.models.logprobs import response_logps

REF_CACHE = "ref_logps.pt"


def response_tokens(examples: list[dict], indices: Iterable[int]) -> int:
    """Response tokens of examples[indices], both sides of a pair: where the LM head runs."""
    return sum(sum(m[1:]) for i in indices for k, m in examples[i].items() if k.endswith("loss_mask"))


def cache_rows(values: Tensor, indices: list[int]) -> Tensor:
    """Cached per-example log-probs ([N, 2] pairs or [N]) as the rows of a collated batch ([2B] or [B])."""
    picked = values[indices]
    return torch.cat([picked[:, 0], picked[:, 1]]) if picked.ndim == 2 else picked


@torch.no_grad()
def reference_logps(
    model,
    examples: list[dict],
    kind: str,
    device,
    pad_id: int,
    batch_size: int = 32,
    amp: Callable = contextlib.nullcontext,
) -> tuple[Tensor, int]:
    """Summed response log-probs of every example under `model`: ([N, 2] (chosen, rejected) for pairs or
    [N] for unpaired examples, float32 on the CPU; real tokens processed).

    Examples are batched by length, so little compute goes to padding.
    """
    was_training = model.training
    model.eval()
    ex = examples
    order = sorted(range(len(ex)), key=lambda i: -len(ex[i].get("input_ids") or ex[i]["chosen_input_ids"]))
    out = torch.zeros(len(examples), 2) if kind == "pairwise" else torch.zeros(len(examples))
    tokens = 0
    for s in range(0, len(order), batch_size):
        idx = order[s : s + batch_size]
        batch = collate_preference([examples[i] for i in idx], kind, pad_id)
        sums = response_logps(model, batch, device, amp)[0].float().cpu()
        out[idx] = torch.stack(sums.chunk(2), dim=1) if kind == "pairwise" else sums
        tokens += int(batch["attention_mask"].sum())
    model.train(was_training)
    return out, tokens


def _reference_share(ref, examples, kind, device, pad_id, batch_size, amp, par) -> tuple[Tensor, int]:
    """`reference_logps` of all of `examples`, each process computing the rows of its `par.shard`."""
    if par is None or par.world == 1:
        return reference_logps(ref, examples, kind, device, pad_id, batch_size, amp)
    mine = par.shard(list(range(len(examples))))
    whole = torch.zeros(len(examples), 2) if kind == "pairwise" else torch.zeros(len(examples))
    if mine:
        whole[mine], n = reference_logps(
            ref, [examples[i] for i in mine], kind, device, pad_id, batch_size, amp
        )
    else:
        n = 0
    return par.sum_tensor(whole), n


def _fingerprint(ref_id: str, sets: dict[str, list[dict]]) -> str:
    """A hash of the reference's identity and every token and loss-mask entry the cache was made from."""
    h = hashlib.sha256(ref_id.encode())
    for name, examples in sorted(sets.items()):
        h.update(f"|{name}:{len(examples)}|".encode())
        for e in examples:
            for key in sorted(k for k in e if k.endswith(("input_ids", "loss_mask"))):
                h.update(key.encode() + array("q", (int(v) for v in e[key])).tobytes())
    return h.hexdigest()


def cached_reference_logps(
    run_dir: Path,
    ref_id: str,
    sets: dict[str, list[dict]],
    kind: str,
    load_ref,
    device,
    pad_id: int,
    batch_size: int,
    log=print,
    amp: Callable = contextlib.nullcontext,
    par=None,
) -> tuple[dict[str, Tensor], dict]:
    """Reference log-probs of every example set ({"train": ..., "eval": ..., ...}), from RUN/ref_logps.pt
    when it was made for the same reference and tokens, else computed with `load_ref()` and cached.

    Across processes (`par`, a `stages.parallel.DataParallel`) each computes the rows of its share of every set
    and the shares are summed into the whole tensors on every process (zeros elsewhere: the sum is exact); the
    main process writes the cache.

    Returns ({set name: tensor}, perf metrics of the pass: {} when the cache was reused).
    """
    path = run_dir / REF_CACHE
    fingerprint = _fingerprint(ref_id, sets)
    cache = torch.load(path, map_location="cpu", weights_only=True) if path.exists() else None
    if par is not None:
        par.wait()  # every process has read the old cache before the main one replaces it
    if cache is not None:
        if cache.get("fingerprint") == fingerprint:
            log(f"reference: reusing the reference log-probs cached in {path}")
            return cache["logps"], {}
        log(f"reference: {path} was made for other data or another reference; computing it again")
    ref = load_ref()
    t0, tokens, logps = time.time(), 0, {}
    for name, examples in sets.items():
        logps[name], n = _reference_share(ref, examples, kind, device, pad_id, batch_size, amp, par)
        tokens += n
    elapsed = max(time.time() - t0, 1e-9)
    for name, values in logps.items():
        check_finite({f"reference log-probs ({name})": values}, step=0)
    if par is None or par.is_main:
        tmp = path.with_name(f".{path.name}.tmp")  # a crash mid-write must not leave a cache that loads
        torch.save({"fingerprint": fingerprint, "logps": logps}, tmp)
        os.replace(tmp, path)
    tokens = par.sum(tokens) if par is not None else tokens
    n_examples = len(sets.get("train", []))
    head_tokens = sum(response_tokens(s, range(len(s))) for s in sets.values())
    ref_flops = causal_lm_forward_flops(matmul_params(ref), tokens, head_tokens) if ref is not None else 0.0
    perf = {
        "perf/ref_examples_per_s": sum(len(s) for s in sets.values()) / elapsed,
        "perf/ref_tokens_per_s": tokens / elapsed,
        # A forward pass, the LM head at response tokens only (rlhflab.models.flops).
        "perf/ref_flops_per_s": ref_flops / elapsed,
        "perf/ref_seconds": elapsed,
    }
    log(f"reference: cached the log-probs of {n_examples} training examples in {elapsed:.1f}s ({path})")
    return logps, perf
