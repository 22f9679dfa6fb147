"""Pretraining a task's base language model from scratch, deterministically, and caching it.

The base model is a tiny standard HF causal LM (`rlhflab.models.tiny.tiny_causal_lm`) trained on the
task's pretraining corpus rendered with the chat template, so it already answers in the task's shape
(badly: the corpus is unaligned). The result is saved with `save_pretrained` (model and tokenizer) in
`<cache root>/lab/<task>-v<version>-<budget>-s<seed>-<spec hash>/`, where the cache root is the
`cache_dir` argument, else $RLHFLAB_CACHE, else ~/.cache/rlhflab. Every stage loads it like any HF model.
The directory appears atomically (built aside, then renamed), so a crash never leaves half a model.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from rlhflab.lab.tasks.base import LabTask

INFO_FILE = "lab_info.json"
# Written into the base model's config.json; `save_pretrained` carries it into every model trained from it,
# so a later stage given such a model (e.g. runs/sft/final) can still make the task's built-in data.
LAB_TASK_KEY = "rlhflab_lab_task"


def cache_root(cache_dir: str | Path | None = None) -> Path:
    """Where lab artifacts are cached: `cache_dir`, else $RLHFLAB_CACHE, else ~/.cache/rlhflab."""
    if cache_dir is not None:
        return Path(cache_dir)
    env = os.environ.get("RLHFLAB_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "rlhflab"


def base_model_key(task: LabTask, budget: str, seed: int) -> str:
    """Cache directory name; the spec hash makes a changed architecture or budget a different entry."""
    spec = json.dumps(dataclasses.asdict(task.pretrain), sort_keys=True)
    digest = hashlib.sha256(f"{spec}|{task.pretrain.steps(budget)}".encode()).hexdigest()[:8]
    return f"{task.name}-v{task.version}-{budget}-s{seed}-{digest}"


def ensure_base_model(
    task: LabTask,
    *,
    budget: str = "default",
    seed: int = 0,
    cache_dir: str | Path | None = None,
    verbose: bool = False,
) -> Path:
    """Return the cached base model directory of `task`, pretraining it first if needed."""
    root = cache_root(cache_dir) / "lab"
    final = root / base_model_key(task, budget, seed)
    if (final / INFO_FILE).is_file():
        _mark_lab_task(final, task.name)  # a cached base model may lack the task mark
        return final
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".tmp-{final.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    model, tokenizer, info = pretrain_base_model(task, budget=budget, seed=seed, verbose=verbose)
    setattr(model.config, LAB_TASK_KEY, task.name)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / INFO_FILE).write_text(json.dumps(info, indent=2) + "\n")
    if final.exists():  # an incomplete leftover (no info file) or a concurrent builder's result
        if (final / INFO_FILE).is_file():
            shutil.rmtree(tmp, ignore_errors=True)
            return final
        shutil.rmtree(final)
    os.rename(tmp, final)
    return final


def _mark_lab_task(model_dir: Path, task_name: str) -> None:
    path = model_dir / "config.json"
    config = json.loads(path.read_text())
    if config.get(LAB_TASK_KEY) != task_name:
        from rlhflab.core.io import atomic_write_text

        config[LAB_TASK_KEY] = task_name
        atomic_write_text(path, json.dumps(config, indent=2) + "\n")


def _encode_corpus(task: LabTask, tokenizer, n: int, seed: int) -> list[list[int]]:
    pairs = task.pretraining_pairs(n, seed)
    # Render the chat template once around sentinels and fill them in: the template inserts contents
    # verbatim, and running Jinja per example would dominate the setup time.
    p_mark, r_mark = "\x00PROMPT\x00", "\x00RESPONSE\x00"
    skeleton = tokenizer.apply_chat_template(
        [{"role": "user", "content": p_mark}, {"role": "assistant", "content": r_mark}], tokenize=False
    )
    texts = [skeleton.replace(p_mark, p).replace(r_mark, r) for p, r in pairs]
    return [list(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]


def _batch(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
        mask[i, : len(r)] = 1
    return ids, mask


def _lr_factor(step: int, warmup: int, total: int) -> float:
    # Linear warmup, then cosine down to a tenth: the usual recipe, and robust at this tiny scale.
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress))


def pretrain_base_model(task: LabTask, *, budget: str = "default", seed: int = 0, verbose: bool = False):
    """Pretrain the base model of `task` from scratch. Returns (model, tokenizer, info dict).

    Deterministic for a given seed and thread count: the corpus, the initialization and the batch order
    all derive from `seed`. Next-token loss over every real token of "<|user|> p <|assistant|> r <eos>".
    """
    from rlhflab.models.tiny import tiny_causal_lm

    spec = task.pretrain
    steps = spec.steps(budget)
    tokenizer = task.build_tokenizer()
    model = tiny_causal_lm(
        tokenizer,
        arch=spec.arch,
        hidden_size=spec.hidden_size,
        num_layers=spec.num_layers,
        num_heads=spec.num_heads,
        seed=seed,
    )
    rows = _encode_corpus(task, tokenizer, steps * spec.batch_size, seed)
    opt = torch.optim.AdamW(model.parameters(), lr=spec.lr, betas=(0.9, 0.98), weight_decay=0.01)
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(rows), generator=gen).tolist()
    model.train()
    start, losses = time.perf_counter(), []
    for step in range(steps):
        batch = [rows[i] for i in order[step * spec.batch_size : (step + 1) * spec.batch_size]]
        ids, mask = _batch(batch, tokenizer.pad_token_id)
        labels = ids.masked_fill(mask == 0, -100)
        for group in opt.param_groups:
            group["lr"] = spec.lr * _lr_factor(step, spec.warmup_steps, steps)
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
        if verbose and (step % 100 == 0 or step == steps - 1):
            print(f"pretrain {task.name} step {step}/{steps} loss {loss.item():.3f}", flush=True)
    model.eval()
    seconds = time.perf_counter() - start
    tail = losses[-max(1, steps // 10) :]
    info = {
        "task": task.name,
        "version": task.version,
        "budget": budget,
        "seed": seed,
        "steps": steps,
        "spec": dataclasses.asdict(spec),
        "final_loss": sum(tail) / len(tail),
        "first_loss": losses[0],
        "seconds": round(seconds, 2),
        "threads": torch.get_num_threads(),
        "parameters": sum(p.numel() for p in model.parameters()),
    }
    return model, tokenizer, info
