"""The rlhflab side of `compare_trl.py`, run in rlhflab's venv as its own process (for a clean peak RSS).

    python benchmarks/child_rlhflab.py JOB.json RESULT.json

JOB.json names a task ("dpo_loss", "dpo_time", "rm_time", "sft_time", "ppo_split", "grpo_time", "gen_time")
and its paths; RESULT.json gets the measurements. With `lora` > 0 in the job, every stage trains rank-`lora`
LoRA adapters (`model.lora.*`, `bench_common.lora_settings`) and the sampler samples from a LoRA-wrapped
model, as rlhflab's PPO does; every training task records what its optimizer trains (`trainable`). Every figure comes from the stage's own `train(cfg)`, timed by the same hook as TRL's side
(`bench_common.Clock`): a global optimizer-step post-hook stamps every step's end, the collate functions
record every batch's padded shape (so the FLOPs the stage executes are counted from what it ran) and stamp
the start of step 1, and the stage's load / data / reference / eval / normalization / save functions are
timed as phases (GRPO: `rlhflab grpo`'s own `train(cfg)`, its sampling and scoring timed as phases, the
first sampling call stamping the start of iteration 1). Everything the stages import (transformers' Llama modelling code, peft, accelerate) is
imported before the post-import RSS baseline is read, as TRL's side imports TRL and its dependencies.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import bench_grpo
from bench_common import Clock, current_rss_mb, lora_settings, peak_rss_mb, trainable_summary, write_json

RSS_AFTER_PYTHON = current_rss_mb()

import accelerate  # noqa: E402, F401
import peft  # noqa: E402, F401
import torch  # noqa: E402
import transformers.models.llama.modeling_llama  # noqa: E402, F401

from rlhflab.config import load_config  # noqa: E402
from rlhflab.core.metrics_log import read_metrics  # noqa: E402
from rlhflab.rollout.generate import SamplingSettings, generate  # noqa: E402
from rlhflab.stages import (  # noqa: E402
    critic_free,
    dpo,
    ppo,
    preference_batch,
    reference,
    reward,
    reward_eval,
    sft,
)

RSS_AFTER_IMPORTS = current_rss_mb()
CLOCK = Clock()
TRAINABLE: dict = {}


def _lora_overrides(job: dict) -> list[str]:
    """rlhflab's config keys for the job's LoRA setting (none without one). target_modules stays at rlhflab's
    default, [all-linear]: every linear layer of the body (bench_common.LORA_TARGETS on a Llama)."""
    if not job.get("lora"):
        return []
    lora = lora_settings(job["lora"])
    return [
        "model.lora.enabled=true",
        f"model.lora.r={lora['r']}",
        f"model.lora.alpha={lora['alpha']}",
        f"model.lora.dropout={lora['dropout']}",
    ]


def _record_trainable(stage) -> None:
    """Record what the stage's optimizer trains (`bench_common.trainable_summary` of the module it is built
    on: the policy, the reward model with its head, PPO's policy + value head)."""
    inner = stage.build_optimizer

    def recorded(model, *args, **kwargs):
        TRAINABLE.update(trainable_summary(model))
        return inner(model, *args, **kwargs)

    stage.build_optimizer = recorded


def _common(job: dict, out_dir: str, train_path: str, eval_path: str = "") -> list[str]:
    return _lora_overrides(job) + [
        f"model.name_or_path={job['model_dir']}",
        "model.device=cpu",
        f"data.train_path={train_path}",
        *([f"data.eval_path={eval_path}"] if eval_path else []),
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


def _record_collate(module, name: str) -> None:
    """Record every batch that `module.name` (a collate function) builds: a training pass when gradients
    are on, a forward pass otherwise."""
    inner = getattr(module, name)

    def recorded(*args, **kwargs):
        batch = inner(*args, **kwargs)
        rows, cols = batch["input_ids"].shape
        loss_mask = batch.get("loss_mask")
        CLOCK.record_pass(
            "train" if torch.is_grad_enabled() else "forward",
            rows,
            cols,
            int(batch["attention_mask"].sum()),
            head_rows=int(loss_mask[:, 1:].sum()) if loss_mask is not None else 0,
            reads=len(batch["read_positions"]) if "read_positions" in batch else rows,
        )
        return batch

    setattr(module, name, recorded)


def _timed_result(extra: dict) -> dict:
    clock = CLOCK.result()
    train = [p for p in clock["passes"] if p["kind"] == "train"]
    return {**clock, "step_tokens": [p["tokens"] for p in train], "trainable": dict(TRAINABLE), **extra}


def dpo_loss(job: dict) -> dict:
    """The stage's logged loss of its first step (one batch = the whole 8-pair file, policy != reference),
    the token ids it trains on, and each pair's policy and reference log-probs."""
    from rlhflab.data import load_records, tokenize_pair
    from rlhflab.models.loading import load_causal_lm, load_tokenizer
    from rlhflab.stages import dpo, reference

    out_dir = job["out_dir"]
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
    out_dir = job["out_dir"]
    _record_collate(preference_batch, "collate_preference")
    _record_collate(reference, "collate_preference")
    _record_trainable(dpo)
    for name, phase in (
        ("load_policy", "load"),
        ("_load_records", "data"),
        ("_tokenize_records", "data"),
        ("cached_reference_logps", "reference"),
        ("evaluate", "eval"),
        ("save_model", "save"),
    ):
        CLOCK.wrap(dpo, name, phase)
    CLOCK.install()
    cfg = load_config(
        "dpo",
        None,
        _common(job, out_dir, job["data_path"], job["eval_path"])
        + [f"optim.lr={job['dpo_lr']}", "algo.loss=dpo", f"algo.beta={job['beta']}"],
    )
    t0 = time.monotonic()
    dpo.train(cfg, overwrite=True)
    train_wall = time.monotonic() - t0
    rows = read_metrics(Path(out_dir) / "metrics.jsonl")
    return _timed_result(
        {
            "train_call_seconds": train_wall,
            "first_loss": next(r["loss/dpo"] for r in rows if "loss/dpo" in r),
            "logged_flops_per_s": [r["perf/flops_per_s"] for r in rows if "perf/flops_per_s" in r],
        }
    )


def rm_time(job: dict) -> dict:
    out_dir = job["out_dir"]
    _record_collate(reward, "collate_reward_batch")
    _record_collate(reward_eval, "collate_reward_batch")
    _record_trainable(reward)
    for name, phase in (
        ("load_tokenizer", "load"),
        ("_build_model", "load"),
        ("load_examples", "data"),
        ("_report", "eval"),
        ("fit_normalization", "normalization"),
        ("_save", "save"),
    ):
        CLOCK.wrap(reward, name, phase)
    CLOCK.install()
    cfg = load_config(
        "rm",
        None,
        _common(job, out_dir, job["data_path"], job["eval_path"]) + [f"optim.lr={job['rm_lr']}"],
    )
    t0 = time.monotonic()
    reward.train(cfg, overwrite=True)
    train_wall = time.monotonic() - t0
    rows = read_metrics(Path(out_dir) / "metrics.jsonl")
    return _timed_result(
        {
            "train_call_seconds": train_wall,
            "logged_flops_per_s": [r["perf/flops_per_s"] for r in rows if "perf/flops_per_s" in r],
        }
    )


def sft_time(job: dict) -> dict:
    """`rlhflab sft` on the demonstrations (prompt + chosen response; the prompt masked out of the loss)."""
    out_dir = job["out_dir"]
    _record_collate(sft, "collate_sft")
    _record_trainable(sft)
    for name, phase in (
        ("load_policy", "load"),
        ("load_stage_records", "data"),
        ("tokenize_sft", "data"),
        ("evaluate", "eval"),
        ("save_model", "save"),
    ):
        CLOCK.wrap(sft, name, phase)
    CLOCK.install()
    cfg = load_config(
        "sft",
        None,
        _common(job, out_dir, job["sft_path"], job["sft_eval_path"]) + [f"optim.lr={job['sft_lr']}"],
    )
    t0 = time.monotonic()
    sft.train(cfg, overwrite=True)
    train_wall = time.monotonic() - t0
    rows = read_metrics(Path(out_dir) / "metrics.jsonl")
    return _timed_result(
        {
            "train_call_seconds": train_wall,
            "first_loss": next(r["loss/sft"] for r in rows if "loss/sft" in r),
            "logged_flops_per_s": [r["perf/flops_per_s"] for r in rows if "perf/flops_per_s" in r],
        }
    )


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
    out_dir = job["out_dir"]
    timer: dict = {}
    _instrument_ppo(ppo, timer)
    _record_trainable(ppo)
    p = job["ppo"]
    cfg = load_config(
        "ppo",
        None,
        _lora_overrides(job)
        + [
            f"model.name_or_path={job['model_dir']}",
            "model.device=cpu",
            f"data.train_path={job['prompts_path']}",
            "data.max_prompt_length=256",
            f"algo.iterations={p['iterations']}",
            f"algo.rollout_batch_size={p['rollout_batch_size']}",
            f"algo.minibatch_size={p['minibatch_size']}",
            f"algo.ppo_epochs={p['ppo_epochs']}",
            f"sampling.max_new_tokens={p['max_new_tokens']}",
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
        "rollout_batch_size": p["rollout_batch_size"],
        "trainable": dict(TRAINABLE),
    }


def _instrument_grpo(record: dict) -> None:
    """Time `rlhflab grpo`'s phases and record what each iteration sampled and scored. Measurement only:
    every wrapped function returns what it returned."""
    g = record["settings"]
    inner_sample, inner_score = critic_free.sample, critic_free._score

    def sampled(policy, tokenizer, prompts, settings, **kwargs):
        out = inner_sample(policy, tokenizer, prompts, settings, **kwargs)
        record["generations"].append(
            bench_grpo.generation_record(
                out.prompt_mask.sum(-1).tolist(),
                out.response_lengths.tolist(),
                int(out.ended_with_eos.sum()),
            )
        )
        return out

    def scored(reward_source, cfg, rollout_):
        scores, raw = inner_score(reward_source, cfg, rollout_)
        # The TRL side's reward function on the same texts must give the same numbers.
        expected = bench_grpo.length_rewards(rollout_.texts, g["reward_coef"], g["reward_target"])
        record["reward_max_abs_diff"] = max(
            record["reward_max_abs_diff"], max(abs(a - b) for a, b in zip(raw.tolist(), expected))
        )
        record["reward_means"].append(float(raw.mean()))
        return scores, raw

    critic_free.sample, critic_free._score = sampled, scored
    for name, phase, first in (
        ("_setup", "load", False),
        ("load_prompts", "data", False),
        ("sample", "generate", True),
        ("_score", "score", False),
        ("save_model", "save", False),
    ):
        CLOCK.wrap(critic_free, name, phase, first_step=first)

    inner_logps = critic_free.rollout_logps

    def recorded(model, ro, *args, **kwargs):
        rows, cols = ro.input_ids.shape
        CLOCK.record_pass(
            "train" if torch.is_grad_enabled() else "forward",
            rows,
            cols,
            int(ro.attention_mask.sum()),
            head_rows=int(ro.response_mask.sum()),
        )
        return inner_logps(model, ro, *args, **kwargs)

    critic_free.rollout_logps = recorded


def grpo_time(job: dict) -> dict:
    """`rlhflab grpo` (critic_free.train) on the benchmark's prompts, as the CLI runs it from its config."""
    g, out_dir = job["grpo"], job["out_dir"]
    record = {"settings": g, "generations": [], "reward_means": [], "reward_max_abs_diff": 0.0}
    _instrument_grpo(record)
    _record_trainable(critic_free)
    CLOCK.install()
    overrides = (
        bench_grpo.rlhflab_overrides(g, g["iterations"])
        + _lora_overrides(job)
        + [
            f"model.name_or_path={job['model_dir']}",
            f"data.train_path={g['prompts_path']}",
            f"logging.output_dir={out_dir}",
            "logging.log_every=1",
            "logging.tensorboard=false",
            "logging.progress=false",
        ]
    )
    cfg = load_config("grpo", None, overrides)
    t0 = time.monotonic()
    critic_free.train(cfg, overwrite=True)
    train_wall = time.monotonic() - t0
    rows = [r for r in read_metrics(Path(out_dir) / "metrics.jsonl") if "perf/time_generate" in r]
    clock = CLOCK.result()
    return {
        **clock,
        **{k: v for k, v in record.items() if k != "settings"},
        "train_call_seconds": train_wall,
        "overrides": overrides,
        "trainable": dict(TRAINABLE),
        "logged": [
            {k: r[k] for k in ("perf/time_generate", "perf/response_length", "reward/score") if k in r}
            for r in rows
        ],
    }


def gen_time(job: dict) -> dict:
    """One sampler on one loaded model: `rlhflab.rollout.generate` (engine "rlhflab") or a plain
    `model.generate` call as a transformers user writes it (engine "transformers"), on the same rows, seeds
    and sampling settings. Each call is timed from prompt strings to decoded texts."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gm = job["generate"]
    prompts = [
        json.loads(x)["prompt"] for x in Path(gm["prompts_path"]).read_text().splitlines() if x.strip()
    ]
    rows = [p for p in prompts[: gm["prompts"]] for _ in range(gm["repeat"])]  # prompt-major, as GRPO's
    t0 = time.monotonic()
    tokenizer = AutoTokenizer.from_pretrained(job["model_dir"])
    model = AutoModelForCausalLM.from_pretrained(job["model_dir"], dtype=torch.float32).eval()
    if job.get("lora"):
        # As rlhflab's PPO samples with LoRA: from the policy wrapped in fresh adapters (B = 0, so it samples
        # what the base model does), through the PEFT wrapper's forward. Both engines sample from this model.
        from rlhflab.models.loading import LoraSettings, apply_lora

        lora = lora_settings(job["lora"])
        settings = LoraSettings(r=lora["r"], alpha=lora["alpha"], dropout=lora["dropout"])
        model = apply_lora(model, settings).eval()
    CLOCK.phases["load"] = time.monotonic() - t0
    settings = SamplingSettings(
        max_new_tokens=gm["max_new_tokens"],
        temperature=gm["temperature"],
        top_k=gm["top_k"],
        top_p=gm["top_p"],
    )
    eos = tokenizer.eos_token_id

    def ours(seed: int) -> list[list[int]]:
        out = generate(model, tokenizer, rows, settings, batch_size=len(rows), seed=seed)
        return [r[m].tolist() for r, m in zip(out.response_ids, out.response_mask)]

    def plain(seed: int) -> list[list[int]]:
        tokenizer.padding_side = "left"
        enc = tokenizer(rows, return_tensors="pt", padding=True)
        torch.manual_seed(seed)
        with torch.no_grad():
            out = model.generate(
                **enc,
                do_sample=True,
                max_new_tokens=gm["max_new_tokens"],
                temperature=gm["temperature"],
                top_k=gm["top_k"],
                top_p=gm["top_p"],
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=eos,
            )
        new = out[:, enc["input_ids"].shape[1] :].tolist()
        cut = [r[: r.index(eos) + 1] if eos in r else r for r in new]
        tokenizer.batch_decode(cut, skip_special_tokens=True)
        return cut

    sample = ours if gm["engine"] == "rlhflab" else plain
    calls = []
    for i in range(gm["warmup"] + gm["calls"]):
        t0 = time.monotonic()
        ids = sample(1000 + i)
        seconds = time.monotonic() - t0
        calls.append(
            {
                "seconds": seconds,
                "rows": len(ids),
                "tokens": sum(len(r) for r in ids),
                "ended_with_eos": sum(1 for r in ids if r and r[-1] == eos),
                "digest": bench_grpo.token_digest(ids),
            }
        )
    return {**CLOCK.result(), "calls": calls, "engine": gm["engine"], "sampled_from": type(model).__name__}


TASKS = {
    "dpo_loss": dpo_loss,
    "dpo_time": dpo_time,
    "rm_time": rm_time,
    "sft_time": sft_time,
    "ppo_split": ppo_split,
    "grpo_time": grpo_time,
    "gen_time": gen_time,
}


def main() -> None:
    job = json.loads(Path(sys.argv[1]).read_text())
    torch.manual_seed(0)
    result = TASKS[job["task"]](job)
    result.update(
        {
            "peak_rss_mb": peak_rss_mb(),
            "child_end": time.monotonic(),
            "rss_after_python_mb": RSS_AFTER_PYTHON,
            "rss_after_imports_mb": RSS_AFTER_IMPORTS,
            "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__,
        }
    )
    write_json(sys.argv[2], result)


if __name__ == "__main__":
    main()
