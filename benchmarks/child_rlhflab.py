"""The rlhflab side of `compare_trl.py`, run in rlhflab's venv as its own process (for a clean peak RSS).

    python benchmarks/child_rlhflab.py JOB.json RESULT.json

JOB.json names a task ("dpo_loss", "dpo_time", "rm_time", "ppo_split") and its paths; RESULT.json gets the
measurements. Every figure comes from the stage's own training loop (`train(cfg)`) and its metrics.jsonl:
with logging.log_every=1 each row's perf/*_per_s gives that step's time.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from bench_common import current_rss_mb, peak_rss_mb, write_json

RSS_AFTER_PYTHON = current_rss_mb()

import torch  # noqa: E402

from rlhflab.config import load_config  # noqa: E402
from rlhflab.core.metrics_log import read_metrics  # noqa: E402

RSS_AFTER_IMPORTS = current_rss_mb()


def _common(job: dict, out_dir: str, train_path: str) -> list[str]:
    return [
        f"model.name_or_path={job['model_dir']}",
        "model.device=cpu",
        f"data.train_path={train_path}",
        # Large limits: nothing is truncated, so both frameworks see the same tokens.
        "data.max_length=512",
        "data.max_prompt_length=256",
        f"optim.batch_size={job['batch_size']}",
        "optim.epochs=1",
        f"logging.output_dir={out_dir}",
        "logging.log_every=1",
        "logging.tensorboard=false",
        "logging.progress=false",
        "seed=0",
    ]


def _step_seconds(rows: list[dict], rate_key: str, batch: int) -> tuple[list[float], list[float]]:
    """(seconds, real tokens) of every training step, from per-step metrics rows."""
    steps = [r for r in rows if rate_key in r]
    seconds = [batch / r[rate_key] for r in steps]
    tokens = [r["perf/tokens_per_s"] * s for r, s in zip(steps, seconds)]
    return seconds, tokens


def dpo_loss(job: dict) -> dict:
    """The stage's logged loss of its first step (one batch = the whole 8-pair file, policy != reference),
    the token ids it trains on, and each pair's policy and reference log-probs."""
    from rlhflab.data import load_records, tokenize_pair
    from rlhflab.models.loading import load_causal_lm, load_tokenizer
    from rlhflab.stages import dpo, reference

    out_dir = job["work"] + "/rlhflab_dpo_loss"
    cfg = load_config(
        "dpo",
        None,
        _common(job, out_dir, job["check_path"])
        + [
            f"ref_model={job['ref_dir']}",
            "optim.max_steps=1",
            f"optim.lr={job['dpo_lr']}",
            "algo.loss=dpo",
            f"algo.beta={job['beta']}",
        ],
    )
    dpo.train(cfg, overwrite=True)
    row = next(r for r in read_metrics(Path(out_dir) / "metrics.jsonl") if "loss/dpo" in r)
    tokenizer = load_tokenizer(job["model_dir"])
    # The stage's own tokenization and limits (the same as `_common` sets).
    examples = [
        tokenize_pair(r, tokenizer, max_length=512, max_prompt_length=256)
        for r in load_records(job["check_path"], "pairwise").records
    ]
    ids = []
    for ex in examples:
        n = len(ex["prompt_input_ids"])
        ids.append(
            {
                "prompt_ids": ex["prompt_input_ids"],
                "chosen_ids": ex["chosen_input_ids"][n:],
                "rejected_ids": ex["rejected_input_ids"][n:],
            }
        )
    logps = {}
    for name, path in (("policy", job["model_dir"]), ("ref", job["ref_dir"])):
        model = load_causal_lm(path, device="cpu")
        logps[name] = reference.reference_logps(
            model, examples, "pairwise", torch.device("cpu"), tokenizer.pad_token_id
        )[0].tolist()
    return {"loss": row["loss/dpo"], "token_ids": ids, "logps": logps}


def dpo_time(job: dict) -> dict:
    from rlhflab.stages import dpo

    out_dir = job["work"] + "/rlhflab_dpo_time"
    cfg = load_config(
        "dpo",
        None,
        _common(job, out_dir, job["data_path"])
        + [f"optim.lr={job['dpo_lr']}", "algo.loss=dpo", f"algo.beta={job['beta']}"],
    )
    t0 = time.perf_counter()
    dpo.train(cfg, overwrite=True)
    train_wall = time.perf_counter() - t0
    rows = read_metrics(Path(out_dir) / "metrics.jsonl")
    seconds, tokens = _step_seconds(rows, "perf/pairs_per_s", job["batch_size"])
    ref = next((r for r in rows if "perf/ref_seconds" in r), {})
    return {
        "step_seconds": seconds,
        "step_tokens": tokens,
        "ref_seconds": ref.get("perf/ref_seconds", 0.0),
        "ref_tokens": ref.get("perf/ref_tokens_per_s", 0.0) * ref.get("perf/ref_seconds", 0.0),
        "train_call_seconds": train_wall,
        "first_loss": next(r["loss/dpo"] for r in rows if "loss/dpo" in r),
        "logged_flops_per_s": [r["perf/flops_per_s"] for r in rows if "perf/flops_per_s" in r],
    }


def rm_time(job: dict) -> dict:
    from rlhflab.stages import reward

    out_dir = job["work"] + "/rlhflab_rm_time"
    cfg = load_config("rm", None, _common(job, out_dir, job["data_path"]) + [f"optim.lr={job['rm_lr']}"])
    t0 = time.perf_counter()
    reward.train(cfg, overwrite=True)
    train_wall = time.perf_counter() - t0
    rows = read_metrics(Path(out_dir) / "metrics.jsonl")
    seconds, tokens = _step_seconds(rows, "perf/pairs_per_s", job["batch_size"])
    return {
        "step_seconds": seconds,
        "step_tokens": tokens,
        "train_call_seconds": train_wall,
        "logged_flops_per_s": [r["perf/flops_per_s"] for r in rows if "perf/flops_per_s" in r],
    }


class WordReward:
    """A programmatic reward: the share of response words that are 'good' or 'great'."""

    def score(self, prompts: list, responses: list[str]) -> torch.Tensor:
        return torch.tensor(
            [sum(w in ("good", "great") for w in r.split()) / max(len(r.split()), 1) for r in responses]
        )


def _instrument_ppo(ppo_module, timer: dict) -> None:
    """Time the reference pass and the policy's rollout pass apart, per iteration (the stage logs both
    together as perf/time_forward). Measurement only: every wrapped function returns what it returned."""
    iters: list[dict[str, float]] = timer.setdefault("iterations", [])

    def add(key: str, seconds: float) -> None:
        if iters:
            iters[-1][key] = iters[-1].get(key, 0.0) + seconds

    def wrap(name: str, key_of):
        inner = getattr(ppo_module, name)

        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            out = inner(*args, **kwargs)
            if (key := key_of(args)) is not None:
                add(key, time.perf_counter() - t0)
            return out

        setattr(ppo_module, name, timed)

    def new_iteration(inner):
        def timed(*args, **kwargs):
            iters.append({})
            return inner(*args, **kwargs)

        return timed

    ppo_module._make_experience = new_iteration(ppo_module._make_experience)
    wrap("token_logps", lambda args: "ref_logps" if args[0] is timer.get("ref") else None)
    wrap(
        "_response_pass",
        lambda args: "policy_rollout_pass" if not torch.is_grad_enabled() else "policy_train_pass",
    )
    setup = ppo_module._setup_models

    def setup_and_remember(cfg):
        out = setup(cfg)
        timer["ref"] = out[2]
        return out

    ppo_module._setup_models = setup_and_remember


def ppo_split(job: dict) -> dict:
    from rlhflab.stages import ppo

    out_dir = job["work"] + "/rlhflab_ppo"
    timer: dict = {}
    _instrument_ppo(ppo, timer)
    p = job["ppo"]
    cfg = load_config(
        "ppo",
        None,
        [
            f"model.name_or_path={job['model_dir']}",
            "model.device=cpu",
            f"data.train_path={job['prompts_path']}",
            "data.max_length=512",
            "data.max_prompt_length=256",
            f"algo.iterations={p['iterations']}",
            f"algo.rollout_batch_size={p['rollout_batch_size']}",
            f"algo.minibatch_size={p['minibatch_size']}",
            f"algo.ppo_epochs={p['ppo_epochs']}",
            f"sampling.max_new_tokens={p['max_new_tokens']}",
            f"optim.batch_size={p['minibatch_size']}",
            f"logging.output_dir={out_dir}",
            "logging.log_every=1",
            "logging.tensorboard=false",
            "logging.progress=false",
            "seed=0",
        ],
    )
    t0 = time.perf_counter()
    ppo.train(cfg, overwrite=True, reward=WordReward())
    rows = [r for r in read_metrics(Path(out_dir) / "metrics.jsonl") if "perf/time_generate" in r]
    keys = (
        "perf/time_generate",
        "perf/time_score",
        "perf/time_forward",
        "perf/time_optimize",
        "perf/response_length",
        "perf/flops_per_s",
        "perf/time_iteration",
    )
    return {
        "iterations": [{k: r[k] for k in keys if k in r} for r in rows],
        "passes": timer["iterations"],
        "train_call_seconds": time.perf_counter() - t0,
    }


TASKS = {"dpo_loss": dpo_loss, "dpo_time": dpo_time, "rm_time": rm_time, "ppo_split": ppo_split}


def main() -> None:
    job = json.loads(Path(sys.argv[1]).read_text())
    torch.manual_seed(0)
    result = TASKS[job["task"]](job)
    result.update(
        {
            "peak_rss_mb": peak_rss_mb(),
            "rss_after_python_mb": RSS_AFTER_PYTHON,
            "rss_after_imports_mb": RSS_AFTER_IMPORTS,
            "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__,
        }
    )
    write_json(sys.argv[2], result)


if __name__ == "__main__":
    main()
