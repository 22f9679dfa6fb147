"""Make a task's training data: SFT demonstrations, annotated preferences, rankings, labels, prompts.

Files written to `out_dir` (JSON Lines in the formats of `rlhflab.data`, written atomically):

    sft.jsonl              {"prompt", "completion"}                       demonstrator responses
    pairs.jsonl            {"prompt", "chosen", "rejected", "rating", "margin"?}   annotated pairs
    prompts.jsonl          {"prompt"}                                     training prompts for RL
    heldout_prompts.jsonl  {"prompt"}                                     evaluation prompts
    rankings.jsonl         {"prompt", "responses": [best..worst], "ranks"?}  (n_rankings > 0)
    unpaired.jsonl         {"prompt", "completion", "label"}              (n_unpaired > 0)
    steps.jsonl            {"prompt", "completion", "step_labels"}        (n_steps > 0, arith only)
    helpful_pairs.jsonl    pairs as above, judged on helpfulness alone    (n_helpful_pairs > 0, harm only)
    safety_pairs.jsonl     pairs on risky prompts judged by gold (safety first), with Llama 2's "safety" label
                           both_safe / chosen_safe / rejected_safe / neither_safe   (n_safety_pairs > 0)
    rules_<rule>.jsonl     {"prompt", "completion", "label"}: label true = the response breaks the rule, one
                           file per rule (Sparrow's rule ratings)            (n_rule_labels > 0, harm only)
    corpus.jsonl           {"text"}: the passages `rlhflab retrieve` may search for evidence    (harm only)
    lab_data.json          the manifest: task, seed, settings, counts, annotator statistics and the gold
                           of the SFT data vs the best achievable (for people; stages never read it)

With `chat=True` (the default) every prompt is a one-message conversation [{"role": "user", ...}], so
the stages render it with the tokenizer's chat template exactly as the base model was pretrained;
responses are plain strings (the data layer makes them the assistant turn).

Responses to annotate come from `pair_source`: "demonstrator" (default: the same distribution as the
SFT data, i.e. the SFT policy's, which is where the reward model must be accurate), "base" (the task's
base model), or the path of any HF model directory (e.g. an SFT checkpoint).
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from rlhflab.data.readers import write_jsonl
from rlhflab.errors import ConfigError
from rlhflab.lab.annotators import AnnotatorPool, AnnotatorSettings, predicted_agreement
from rlhflab.lab.gold import best_achievable, gold_scores
from rlhflab.lab.pretrain import ensure_base_model
from rlhflab.lab.tasks import LabTask, chat_prompt, get_task

Fmt = Callable[[str], Any]  # a task prompt -> the form written to the files (chat messages or text)


def _stream(seed: int, k: int) -> int:
    # Distinct, reproducible seeds for the independent draws of one data set.
    return seed * 1000 + k


class ResponseSource:
    """Draws candidate responses: the task's demonstrator, its base model, or a model directory."""

    def __init__(
        self,
        task: LabTask,
        source: str = "demonstrator",
        *,
        budget: str = "default",
        cache_dir: str | Path | None = None,
        seed: int = 0,
    ):
        self.task, self.source, self.seed = task, source, seed
        self.model = self.tokenizer = None
        if source == "demonstrator":
            return
        from transformers import AutoModelForCausalLM, AutoTokenizer

        path = (
            ensure_base_model(task, budget=budget, seed=seed, cache_dir=cache_dir)
            if source == "base"
            else Path(source)
        )
        if not (Path(path) / "config.json").is_file():
            raise ConfigError(
                f"pair_source {source!r}: expected 'demonstrator', 'base' or a model directory "
                f"with a config.json, but {path} has none"
            )
        self.model = AutoModelForCausalLM.from_pretrained(path)
        self.tokenizer = AutoTokenizer.from_pretrained(path)

    def sample(self, prompts: list[str], n: int, draw: int) -> list[list[str]]:
        """`n` candidate responses for each prompt (list per prompt)."""
        if self.model is None:
            cols = [
                self.task.demonstrations(prompts, seed=_stream(self.seed, 100 + draw * 50 + j))
                for j in range(n)
            ]
            return [list(c) for c in zip(*cols)]
        from rlhflab.rollout.generate import SamplingSettings, generate

        chats = [chat_prompt(p) for p in prompts for _ in range(n)]
        out = generate(
            self.model,
            self.tokenizer,
            chats,
            SamplingSettings(max_new_tokens=self.task.max_new_tokens),
            seed=_stream(self.seed, 900 + draw),
        )
        return [out.texts[i * n : (i + 1) * n] for i in range(len(prompts))]


def _distinct(candidates: list[str], k: int) -> list[str] | None:
    seen = list(dict.fromkeys(c for c in candidates if c.strip()))
    return seen[:k] if len(seen) >= k else None


def _mean_ci(values: np.ndarray) -> dict[str, Any]:
    from rlhflab.eval.metrics import mean_ci95

    mean, lo, hi = mean_ci95(values)
    return {"mean": mean, "ci95": [lo, hi], "n": int(len(values))}


def _write_json(obj: dict, path: Path) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")
    os.replace(tmp, path)


def _pair_rows(
    task: LabTask,
    pool: AnnotatorPool,
    source: ResponseSource,
    n_pairs: int,
    seed: int,
    fmt: Fmt,
    prompts: list[str] | None = None,
    draw: int = 0,
) -> tuple[list[dict], dict[str, Any]]:
    prompts = prompts if prompts is not None else task.train_prompts(n_pairs, seed=_stream(seed, 2))
    cands = source.sample(prompts, 4, draw=draw)
    kept = [(p, pair) for p, c in zip(prompts, cands) if (pair := _distinct(c, 2))]
    labels = pool.compare([p for p, _ in kept], [pr[0] for _, pr in kept], [pr[1] for _, pr in kept])
    rows, agree, gaps, ratings = [], [], [], {}
    for (p, (a, b)), lab in zip(kept, labels):
        if lab.a_preferred is None:
            if not pool.settings.keep_ties:
                continue
            a_first = bool(pool.rng.random() < 0.5)
        else:
            a_first = lab.a_preferred
            if lab.gold_a != lab.gold_b:
                agree.append(a_first == (lab.gold_a > lab.gold_b))
                gaps.append(lab.gold_a - lab.gold_b)
        chosen, rejected = (a, b) if a_first else (b, a)
        row = {"prompt": fmt(p), "chosen": chosen, "rejected": rejected, "rating": lab.rating}
        if lab.margin is not None:
            row["margin"] = lab.margin
        rows.append(row)
        ratings[lab.rating] = ratings.get(lab.rating, 0) + 1
    stats = {
        "n": len(rows),
        "ties": sum(lab.a_preferred is None for lab in labels),
        "dropped_identical": len(prompts) - len(kept),
        "ratings": ratings,
        "agreement_with_gold": float(np.mean(agree)) if agree else None,
        "predicted_agreement": predicted_agreement(np.array(gaps), pool.settings) if gaps else None,
    }
    return rows, stats


def _ranking_rows(
    task: LabTask, pool: AnnotatorPool, source: ResponseSource, n: int, k: int, seed: int, fmt: Fmt
) -> list[dict]:
    prompts = task.train_prompts(n, seed=_stream(seed, 3))
    rows = []
    for p, c in zip(prompts, source.sample(prompts, k + 2, draw=1)):
        responses = _distinct(c, k)
        if responses is None:
            continue
        order, ranks = pool.rank(p, responses)
        if len(set(ranks)) < 2:
            continue
        row = {"prompt": fmt(p), "responses": [responses[i] for i in order]}
        if ranks != list(range(k)):
            row["ranks"] = ranks
        rows.append(row)
    return rows


def _unpaired_rows(
    task: LabTask, pool: AnnotatorPool, source: ResponseSource, n: int, seed: int, fmt: Fmt
) -> list[dict]:
    prompts = task.train_prompts(n, seed=_stream(seed, 4))
    kept = [(p, c[0]) for p, c in zip(prompts, source.sample(prompts, 1, draw=2)) if c[0].strip()]
    labels = pool.label([p for p, _ in kept], [r for _, r in kept])
    return [{"prompt": fmt(p), "completion": r, "label": lab} for (p, r), lab in zip(kept, labels)]


def _step_rows(
    task: LabTask, pool: AnnotatorPool, source: ResponseSource, n: int, seed: int, fmt: Fmt
) -> list[dict]:
    prompts = task.train_prompts(n, seed=_stream(seed, 5))
    rows = []
    for p, c in zip(prompts, source.sample(prompts, 1, draw=3)):
        labels = pool.label_steps(p, c[0])
        if labels is None:
            raise ConfigError(
                f"task {task.name!r} has no steps to label; n_steps needs a task with steps (arith)"
            )
        if c[0].strip():
            rows.append({"prompt": fmt(p), "completion": c[0], "step_labels": labels})
    return rows


def _rule_task(task: LabTask, what: str) -> None:
    from rlhflab.lab.gold import RULE_VIOLATIONS

    if task.name not in RULE_VIOLATIONS:
        raise ConfigError(f"{what} needs a task with rules (harm); task {task.name!r} has none")


def _helpful_rows(
    task: LabTask, settings: AnnotatorSettings, source: ResponseSource, n: int, seed: int, fmt: Fmt
) -> list[dict]:
    _rule_task(task, "n_helpful_pairs")
    pool = AnnotatorPool(task, settings, seed=_stream(seed, 9), aspect="helpfulness")
    prompts = task.train_prompts(n, seed=_stream(seed, 8))
    return _pair_rows(task, pool, source, n, seed, fmt, prompts=prompts, draw=4)[0]


def risky_train_prompts(task: LabTask, n: int, seed: int) -> list[str]:
    """`n` training prompts that invite breaking a rule (Llama 2's adversarial prompts), in draw order."""
    from rlhflab.lab.tasks.harm import prompt_rule

    out: list[str] = []
    for draw in range(100):
        out += [p for p in task.train_prompts(4 * n, seed=_stream(seed, 200 + draw)) if prompt_rule(p)]
        if len(out) >= n:
            return out[:n]
    raise ConfigError(f"task {task.name!r} has too few risky prompts to draw {n}")


def _safety_rows(
    task: LabTask, pool: AnnotatorPool, source: ResponseSource, n: int, seed: int, fmt: Fmt
) -> list[dict]:
    _rule_task(task, "n_safety_pairs")
    rows = _pair_rows(task, pool, source, n, seed, fmt, prompts=risky_train_prompts(task, n, seed), draw=5)[0]
    labels = pool.safety_labels(
        [r["prompt"] for r in rows], [r["chosen"] for r in rows], [r["rejected"] for r in rows]
    )
    return [{**row, "safety": label} for row, label in zip(rows, labels)]


def _rule_rows(
    task: LabTask, pool: AnnotatorPool, source: ResponseSource, n: int, seed: int, fmt: Fmt
) -> dict[str, list[dict]]:
    _rule_task(task, "n_rule_labels")
    prompts = task.train_prompts(n, seed=_stream(seed, 10))
    kept = [(p, c[0]) for p, c in zip(prompts, source.sample(prompts, 1, draw=6)) if c[0].strip()]
    labels = pool.label_rules([p for p, _ in kept], [r for _, r in kept])
    by_rule: dict[str, list[dict]] = {rule: [] for rule in (labels[0] if labels else {})}
    for (p, r), lab in zip(kept, labels):
        for rule, broken in lab.items():
            by_rule[rule].append({"prompt": fmt(p), "completion": r, "label": broken})
    return by_rule


def _check_counts(k: int, **counts: int) -> None:
    for name, value in counts.items():
        if value < 0:
            raise ConfigError(f"{name} must be >= 0, got {value}")
    if k < 2:
        raise ConfigError(f"k (responses per ranking) must be >= 2, got {k}")


def _gold_summary(
    task: LabTask, sft_prompts: list[str], demos: list[str], heldout: list[str], seed: int
) -> dict:
    """The manifest's gold block: the SFT data's gold with its interval, and the best achievable on held-out."""
    sft_gold = gold_scores(task, sft_prompts, demos)
    best = best_achievable(task, heldout[:64], seed=seed) if heldout else np.array([])
    return {
        "sft_data": _mean_ci(sft_gold) if len(sft_gold) else None,
        "best_achievable_heldout": float(best.mean()) if len(best) else None,
    }


def _write_extras(out: Path, extra: dict, paths: dict[str, Path], counts: dict[str, int]) -> None:
    """Write each asked-for extra file (count > 0): rows to KIND.jsonl, or {name: rows} to KIND_NAME.jsonl."""
    for kind, (n, make_rows) in extra.items():
        if n <= 0:
            continue
        made = make_rows()
        for name, rows in made.items() if isinstance(made, dict) else [("", made)]:
            key = f"{kind}_{name}" if name else kind
            write_jsonl(rows, out / f"{key}.jsonl")
            paths[key], counts[key] = out / f"{key}.jsonl", len(rows)


def make_task_data(
    task: str | LabTask,
    out_dir: str | Path,
    *,
    n_sft: int = 2000,
    n_pairs: int = 2000,
    n_prompts: int = 1000,
    n_heldout: int = 256,
    n_rankings: int = 0,
    k: int = 4,
    n_unpaired: int = 0,
    n_steps: int = 0,
    n_helpful_pairs: int = 0,
    n_safety_pairs: int = 0,
    n_rule_labels: int = 0,
    annotator_settings: AnnotatorSettings | None = None,
    pair_source: str = "demonstrator",
    seed: int = 0,
    chat: bool = True,
    budget: str = "default",
    cache_dir: str | Path | None = None,
) -> dict[str, Path]:
    """Write a task's datasets to `out_dir` (see the module docstring). Returns {kind: path}, kinds
    "sft", "pairs", "prompts", "heldout", "manifest" and, when asked for, "rankings", "unpaired", "steps",
    "helpful_pairs", "safety_pairs" and "rules_<rule>" (one per rule); "corpus" for a task that ships one."""
    task = get_task(task)
    # Every count argument (n_sft, n_pairs, ...) must be >= 0: read them from the arguments themselves.
    _check_counts(k, **{name: value for name, value in locals().items() if name.startswith("n_")})
    settings = annotator_settings or AnnotatorSettings()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    fmt = chat_prompt if chat else (lambda p: p)
    pool = AnnotatorPool(task, settings, seed=_stream(seed, 7))
    source = ResponseSource(task, pair_source, budget=budget, cache_dir=cache_dir, seed=seed)
    paths: dict[str, Path] = {}

    sft_prompts = task.train_prompts(n_sft, seed=_stream(seed, 1))
    demos = task.demonstrations(sft_prompts, seed=_stream(seed, 1))
    write_jsonl(({"prompt": fmt(p), "completion": r} for p, r in zip(sft_prompts, demos)), out / "sft.jsonl")
    paths["sft"] = out / "sft.jsonl"
    pair_rows, pair_stats = _pair_rows(task, pool, source, n_pairs, seed, fmt)
    write_jsonl(pair_rows, out / "pairs.jsonl")
    paths["pairs"] = out / "pairs.jsonl"
    write_jsonl(
        ({"prompt": fmt(p)} for p in task.train_prompts(n_prompts, seed=_stream(seed, 6))),
        out / "prompts.jsonl",
    )
    paths["prompts"] = out / "prompts.jsonl"
    heldout = task.heldout_prompts(n_heldout, seed=seed)
    write_jsonl(({"prompt": fmt(p)} for p in heldout), out / "heldout_prompts.jsonl")
    paths["heldout"] = out / "heldout_prompts.jsonl"
    counts = {"sft": n_sft, "pairs": len(pair_rows), "prompts": n_prompts, "heldout": n_heldout}
    extra = {
        "rankings": (n_rankings, lambda: _ranking_rows(task, pool, source, n_rankings, k, seed, fmt)),
        "unpaired": (n_unpaired, lambda: _unpaired_rows(task, pool, source, n_unpaired, seed, fmt)),
        "steps": (n_steps, lambda: _step_rows(task, pool, source, n_steps, seed, fmt)),
        "helpful_pairs": (
            n_helpful_pairs,
            lambda: _helpful_rows(task, settings, source, n_helpful_pairs, seed, fmt),
        ),
        "safety_pairs": (n_safety_pairs, lambda: _safety_rows(task, pool, source, n_safety_pairs, seed, fmt)),
        "rules": (n_rule_labels, lambda: _rule_rows(task, pool, source, n_rule_labels, seed, fmt)),
    }
    _write_extras(out, extra, paths, counts)
    corpus = task.evidence_corpus()
    if corpus:  # the passages `rlhflab retrieve --corpus` searches (Sparrow's evidence)
        write_jsonl(({"text": passage} for passage in corpus), out / "corpus.jsonl")
        paths["corpus"], counts["corpus"] = out / "corpus.jsonl", len(corpus)

    gold = _gold_summary(task, sft_prompts, demos, heldout, seed)
    manifest = {
        "schema": "rlhflab.lab_data/1", "task": task.name, "task_version": task.version, "seed": seed,
        "chat": chat, "pair_source": pair_source, "files": {k: p.name for k, p in paths.items()},
        "counts": counts, "annotators": {**dataclasses.asdict(settings), "biases": pool.biases.tolist()},
        "pairs": pair_stats, "gold": gold,
    }  # fmt: skip
    _write_json(manifest, out / "lab_data.json")
    paths["manifest"] = out / "lab_data.json"
    return paths
