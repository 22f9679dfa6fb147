"""The TRL side of `compare_trl.py`, run in TRL's own venv (never rlhflab's) as its own process.

    /work/bench-venv/bin/python benchmarks/child_trl.py JOB.json RESULT.json

JOB.json names a task ("dpo_loss", "dpo_time", "rm_time"), the shared model directory and data file,
and `variant` settings (precision, gradient checkpointing, reference precomputation). RESULT.json gets
per-step times (a callback stamps every optimizer step's end), real tokens per step, the reference
pass time (when TRL precomputes it) and peak RSS.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from bench_common import current_rss_mb, peak_rss_mb, write_json

RSS_AFTER_PYTHON = current_rss_mb()

import torch  # noqa: E402
import trl  # noqa: E402
from datasets import Dataset  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback  # noqa: E402
from trl import DPOConfig, DPOTrainer, RewardConfig, RewardTrainer  # noqa: E402

RSS_AFTER_IMPORTS = current_rss_mb()


class StepClock(TrainerCallback):
    """Wall time of every optimizer step: from the previous step's end (or the start of training)."""

    def __init__(self):
        self.ends: list[float] = []
        self.start = 0.0

    def on_train_begin(self, args, state, control, **kwargs):
        self.start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.ends.append(time.perf_counter())

    def step_seconds(self) -> list[float]:
        stamps = [self.start, *self.ends]
        return [b - a for a, b in zip(stamps, stamps[1:])]


def _records(path: str) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def _args(cls, job: dict, out_dir: str, **kwargs):
    variant = job["variant"]
    if variant.get("max_steps"):  # a shorter run (TRL as it comes is slow on CPU); kwargs may set it too
        kwargs.setdefault("max_steps", variant["max_steps"])
    return cls(
        output_dir=out_dir,
        per_device_train_batch_size=job["batch_size"],
        gradient_accumulation_steps=1,
        num_train_epochs=1,
        seed=0,
        data_seed=0,
        use_cpu=True,
        report_to="none",
        save_strategy="no",
        disable_tqdm=True,
        dataloader_num_workers=0,
        bf16=variant["bf16"],
        gradient_checkpointing=variant["gradient_checkpointing"],
        **kwargs,
    )


def _count_tokens(trainer_cls) -> list[int]:
    """Record the real tokens of every batch the trainer's compute_loss sees (training batches only)."""
    counts: list[int] = []
    inner = trainer_cls.compute_loss

    def counted(self, model, inputs, *args, **kwargs):
        if model.training:
            counts.append(int(inputs["attention_mask"].sum()))
        return inner(self, model, inputs, *args, **kwargs)

    trainer_cls.compute_loss = counted
    return counts


def dpo_loss(job: dict) -> dict:
    """TRL's loss on its first batch (the whole 8-pair file, policy != reference, float32), through the
    trainer's own compute_loss, and the token ids TRL trains on."""
    tokenizer = AutoTokenizer.from_pretrained(job["model_dir"])
    ref = AutoModelForCausalLM.from_pretrained(job["ref_dir"], dtype=torch.float32)
    args = _args(
        DPOConfig,
        job,
        job["work"] + "/trl_dpo_loss",
        learning_rate=job["dpo_lr"],
        beta=job["beta"],
        loss_type=["sigmoid"],
        max_steps=1,
    )
    trainer = DPOTrainer(
        model=job["model_dir"],
        ref_model=ref,
        args=args,
        train_dataset=Dataset.from_list(_records(job["check_path"])),
        processing_class=tokenizer,
    )
    ids = [
        {k: list(row[k]) for k in ("prompt_ids", "chosen_ids", "rejected_ids")}
        for row in trainer.train_dataset
    ]
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    trainer.model.train()
    with torch.no_grad():
        loss = trainer.compute_loss(trainer.model, batch)
    metrics = trainer._metrics["train"]
    return {
        "loss": float(loss),
        "token_ids": ids,
        "batch_rows": int(batch["input_ids"].shape[0]),
        "mean_logps": {"chosen": metrics["logps/chosen"][-1], "rejected": metrics["logps/rejected"][-1]},
    }


def dpo_time(job: dict) -> dict:
    precompute = job["variant"]["precompute_ref_log_probs"]
    clock, counts = StepClock(), _count_tokens(DPOTrainer)
    ref_pass = {"seconds": 0.0}
    inner = DPOTrainer._precompute_ref_logps

    def timed_precompute(self, *a, **kw):
        t0 = time.perf_counter()
        out = inner(self, *a, **kw)
        ref_pass["seconds"] += time.perf_counter() - t0
        return out

    DPOTrainer._precompute_ref_logps = timed_precompute
    tokenizer = AutoTokenizer.from_pretrained(job["model_dir"])
    args = _args(
        DPOConfig,
        job,
        job["work"] + "/trl_dpo_time",
        learning_rate=job["dpo_lr"],
        beta=job["beta"],
        loss_type=["sigmoid"],
        precompute_ref_log_probs=precompute,
    )
    t0 = time.perf_counter()
    trainer = DPOTrainer(
        model=job["model_dir"],
        args=args,
        train_dataset=Dataset.from_list(_records(job["data_path"])),
        processing_class=tokenizer,
        callbacks=[clock],
    )
    init_seconds = time.perf_counter() - t0
    t0 = time.perf_counter()
    out = trainer.train()
    return {
        "step_seconds": clock.step_seconds(),
        "step_tokens": counts,
        "ref_seconds": ref_pass["seconds"],
        "init_seconds": init_seconds,
        "train_call_seconds": time.perf_counter() - t0,
        "train_loss": out.training_loss,
        "log_history": trainer.state.log_history[:2],
    }


def rm_time(job: dict) -> dict:
    clock, counts = StepClock(), _count_tokens(RewardTrainer)
    tokenizer = AutoTokenizer.from_pretrained(job["model_dir"])
    args = _args(RewardConfig, job, job["work"] + "/trl_rm_time", learning_rate=job["rm_lr"])
    t0 = time.perf_counter()
    trainer = RewardTrainer(
        model=job["model_dir"],
        args=args,
        train_dataset=Dataset.from_list(_records(job["data_path"])),
        processing_class=tokenizer,
        callbacks=[clock],
    )
    init_seconds = time.perf_counter() - t0
    t0 = time.perf_counter()
    trainer.train()
    return {
        "step_seconds": clock.step_seconds(),
        "step_tokens": counts,
        "init_seconds": init_seconds,
        "train_call_seconds": time.perf_counter() - t0,
    }


TASKS = {"dpo_loss": dpo_loss, "dpo_time": dpo_time, "rm_time": rm_time}


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
            "trl": trl.__version__,
        }
    )
    write_json(sys.argv[2], result)


if __name__ == "__main__":
    main()
