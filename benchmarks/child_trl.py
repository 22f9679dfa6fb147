"""The TRL side of `compare_trl.py`, run in TRL's own venv (never rlhflab's) as its own process.

    /work/bench-venv/bin/python benchmarks/child_trl.py JOB.json RESULT.json

JOB.json names a task ("dpo_loss", "dpo_time", "rm_time", "sft_time", "grpo_time"), the shared model directory
and data files, and `variant`: the DPOConfig / RewardConfig / GRPOConfig options of the TRL setting being measured. An option this TRL's
config class does not have is left out and listed in RESULT.json (`options_missing`), with the options
passed (`options_used`) and the ones TRL itself switched off (`options_overridden`, e.g. `padding_free`,
which TRL 1.16's DPOTrainer turns back off with a warning).

Timing is the same hook as rlhflab's side (`bench_common.Clock`): a global optimizer-step post-hook stamps
every step's end; `compute_loss` and the reference pass record every batch's padded shape (and stamp the
start of step 1); model loading, dataset preparation, the reference precompute, the final evaluation and
saving are timed as phases. SFT (`sft_time`): SFTTrainer on the prompt-completion demonstrations with
completion_only_loss. With `lora` > 0 in the job, every trainer gets `peft_config=peft.LoraConfig(...)` with
rlhflab's setting (`bench_common.lora_settings`: rank r, alpha 2r, dropout 0, the seven linear projections of
every layer; the reward model's score head in `modules_to_save`, as rlhflab trains its head in full), and
every training task records what its model trains (`trainable`). Like rlhflab's stages, every run ends with an evaluation on the held-out file
and a save of the trained model, so that end-to-end times cover the same work.

GRPO (`grpo_time`): GRPOTrainer with the reward function of `bench_grpo` (the same numbers as rlhflab's
rule:length spec), its generation (`_generate`: tokenize, model.generate, decode) and reward
(`_calculate_rewards`) timed as phases, the first generation stamping the start of iteration 1; no
evaluation (rlhflab's GRPO stage has none), a save of the trained model at the end. The GRPO modules are
imported before the post-import baseline only for a GRPO job, so the DPO / RM processes import exactly what
they did before.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from pathlib import Path

import bench_grpo
from bench_common import Clock, current_rss_mb, lora_settings, peak_rss_mb, trainable_summary, write_json

RSS_AFTER_PYTHON = current_rss_mb()


def _job_field(key: str):
    """A field of the job this process runs (read before the imports, which depend on it)."""
    try:
        return json.loads(Path(sys.argv[1]).read_text()).get(key)
    except (IndexError, OSError, ValueError, AttributeError):
        return None


def _job_task() -> str:
    return _job_field("task") or ""


import torch  # noqa: E402
import transformers.models.llama.modeling_llama  # noqa: E402, F401
import trl  # noqa: E402
import trl.trainer.dpo_trainer as dpo_module  # noqa: E402
import trl.trainer.reward_trainer as reward_module  # noqa: E402
from datasets import Dataset  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402
from trl import DPOConfig, DPOTrainer, RewardConfig, RewardTrainer  # noqa: E402

if _job_task().startswith("grpo"):
    import trl.trainer.grpo_trainer as grpo_module
    from trl import GRPOConfig, GRPOTrainer
if _job_task().startswith("sft"):
    import trl.trainer.sft_trainer as sft_module
    from trl import SFTConfig, SFTTrainer
if _job_field("lora"):
    import peft  # noqa: F401  (imported before the baseline, as rlhflab's side imports it)

RSS_AFTER_IMPORTS = current_rss_mb()
CLOCK = Clock()


def _records(path: str) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def split_options(cls, variant: dict) -> tuple[dict, list[str]]:
    """(the variant's options that `cls` has, the names of those it does not have)."""
    fields = {f.name for f in dataclasses.fields(cls)}
    used = {k: v for k, v in variant.items() if k in fields}
    return used, sorted(k for k in variant if k not in fields and k != "max_steps")


def _args(cls, job: dict, out_dir: str, **kwargs):
    variant = dict(job["variant"])
    if variant.get("max_steps"):  # a shorter run (TRL as it comes is slow on CPU); kwargs may set it too
        kwargs.setdefault("max_steps", variant["max_steps"])
    used, missing = split_options(cls, variant)
    args = cls(
        output_dir=out_dir,
        per_device_train_batch_size=job["batch_size"],
        per_device_eval_batch_size=job.get("eval_batch_size", job["batch_size"]),
        gradient_accumulation_steps=1,
        num_train_epochs=1,
        seed=0,
        data_seed=0,
        use_cpu=True,
        report_to="none",
        save_strategy="no",
        eval_strategy="no",
        disable_tqdm=True,
        dataloader_num_workers=0,
        **{**used, **kwargs},
    )
    return args, used, missing


def _record_training_passes(trainer_cls, head_rows_of) -> None:
    """Record the padded shape of every batch the trainer's compute_loss sees (training and evaluation)."""
    inner = trainer_cls.compute_loss

    def recorded(self, model, inputs, *args, **kwargs):
        rows, cols = inputs["input_ids"].shape
        CLOCK.record_pass(
            "train" if model.training else "forward",
            rows,
            cols,
            int(inputs["attention_mask"].sum()),
            head_rows=head_rows_of(inputs),
            reads=rows,
        )
        return inner(self, model, inputs, *args, **kwargs)

    trainer_cls.compute_loss = recorded


def _peft_config(job: dict, task_type: str = "CAUSAL_LM"):
    """peft.LoraConfig of the job's LoRA setting (None without one): rlhflab's rank, alpha 2r, dropout 0 and
    target modules (its default all-linear on a Llama, spelled out). A reward model (task_type SEQ_CLS)
    also trains its score head in full (`modules_to_save`), as rlhflab's reward stage does."""
    if not job.get("lora"):
        return None
    from peft import LoraConfig

    lora = lora_settings(job["lora"])
    return LoraConfig(
        r=lora["r"],
        lora_alpha=lora["alpha"],
        lora_dropout=lora["dropout"],
        target_modules=lora["target_modules"],
        bias="none",
        task_type=task_type,
        modules_to_save=["score"] if task_type == "SEQ_CLS" else None,
    )


def _completion_tokens(inputs) -> int:
    return int(inputs["completion_mask"][:, 1:].sum()) if "completion_mask" in inputs else 0


def dpo_loss(job: dict) -> dict:
    """TRL's loss on its first batch (the whole 8-pair file, policy != reference, float32), through the
    trainer's own compute_loss, and the token ids TRL trains on."""
    tokenizer = AutoTokenizer.from_pretrained(job["model_dir"])
    ref = AutoModelForCausalLM.from_pretrained(job["ref_dir"], dtype=torch.float32)
    args, _, _ = _args(
        DPOConfig,
        job,
        job["out_dir"],
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


def _timed_phases(module, trainer_cls) -> None:
    CLOCK.wrap(module, "create_model_from_path", "load")
    CLOCK.wrap(trainer_cls, "_prepare_dataset", "data")


def _finish(trainer, out_dir: str, extra: dict) -> dict:
    """Train, evaluate on the held-out file, save the model: the work rlhflab's stages do end to end."""
    t0 = time.monotonic()
    out = trainer.train()
    train_call = time.monotonic() - t0
    CLOCK.wrap(trainer, "evaluate", "eval")
    CLOCK.wrap(trainer, "save_model", "save")
    metrics = trainer.evaluate()
    trainer.save_model(out_dir + "/final")
    clock = CLOCK.result()
    train = [p for p in clock["passes"] if p["kind"] == "train"]
    return {
        **clock,
        "step_tokens": [p["tokens"] for p in train],
        "train_call_seconds": train_call,
        "train_loss": out.training_loss,
        "eval_metrics": metrics,
        "trainable": trainable_summary(trainer.model),
        **extra,
    }


def dpo_time(job: dict) -> dict:
    _record_training_passes(DPOTrainer, _completion_tokens)
    _timed_phases(dpo_module, DPOTrainer)
    CLOCK.wrap(DPOTrainer, "_precompute_ref_logps", "reference")
    inner_ref = DPOTrainer.compute_ref_log_probs

    def recorded_ref(self, model, inputs):
        rows, cols = inputs["input_ids"].shape
        CLOCK.record_pass(
            "forward", rows, cols, int(inputs["attention_mask"].sum()), head_rows=_completion_tokens(inputs)
        )
        return inner_ref(self, model, inputs)

    DPOTrainer.compute_ref_log_probs = recorded_ref
    CLOCK.install()
    tokenizer = AutoTokenizer.from_pretrained(job["model_dir"])
    out_dir = job["out_dir"]
    args, used, missing = _args(
        DPOConfig, job, out_dir, learning_rate=job["dpo_lr"], beta=job["beta"], loss_type=["sigmoid"]
    )
    t0 = time.monotonic()
    trainer = DPOTrainer(
        model=job["model_dir"],
        args=args,
        train_dataset=Dataset.from_list(_records(job["data_path"])),
        eval_dataset=Dataset.from_list(_records(job["eval_path"])),
        processing_class=tokenizer,
        peft_config=_peft_config(job),
    )
    init_seconds = time.monotonic() - t0
    overridden = {
        k: getattr(trainer, k)
        for k in ("padding_free",)
        if k in used and getattr(trainer, k, None) != used[k]
    }
    return _finish(
        trainer,
        out_dir,
        {
            "init_seconds": init_seconds,
            "options_used": used,
            "options_missing": missing,
            "options_overridden": overridden,
            "live_reference": not trainer.precompute_ref_logps,
        },
    )


def rm_time(job: dict) -> dict:
    _record_training_passes(RewardTrainer, lambda inputs: 0)
    _timed_phases(reward_module, RewardTrainer)
    CLOCK.install()
    tokenizer = AutoTokenizer.from_pretrained(job["model_dir"])
    out_dir = job["out_dir"]
    args, used, missing = _args(RewardConfig, job, out_dir, learning_rate=job["rm_lr"])
    t0 = time.monotonic()
    trainer = RewardTrainer(
        model=job["model_dir"],
        args=args,
        train_dataset=Dataset.from_list(_records(job["data_path"])),
        eval_dataset=Dataset.from_list(_records(job["eval_path"])),
        processing_class=tokenizer,
        peft_config=_peft_config(job, "SEQ_CLS"),
    )
    init_seconds = time.monotonic() - t0
    return _finish(
        trainer,
        out_dir,
        {"init_seconds": init_seconds, "options_used": used, "options_missing": missing},
    )


def _label_tokens(inputs) -> int:
    """Positions whose next-token label counts (SFT's completion tokens)."""
    labels = inputs.get("labels")
    return int((labels[:, 1:] != -100).sum()) if labels is not None else _completion_tokens(inputs)


def sft_time(job: dict) -> dict:
    _record_training_passes(SFTTrainer, _label_tokens)
    _timed_phases(sft_module, SFTTrainer)
    CLOCK.install()
    tokenizer = AutoTokenizer.from_pretrained(job["model_dir"])
    out_dir = job["out_dir"]
    args, used, missing = _args(SFTConfig, job, out_dir, learning_rate=job["sft_lr"])
    t0 = time.monotonic()
    trainer = SFTTrainer(
        model=job["model_dir"],
        args=args,
        train_dataset=Dataset.from_list(_records(job["sft_path"])),
        eval_dataset=Dataset.from_list(_records(job["sft_eval_path"])),
        processing_class=tokenizer,
        peft_config=_peft_config(job),
    )
    init_seconds = time.monotonic() - t0
    return _finish(
        trainer,
        out_dir,
        {
            "init_seconds": init_seconds,
            "options_used": used,
            "options_missing": missing,
            "completion_only_loss": trainer.args.completion_only_loss,
        },
    )


def _instrument_grpo(record: dict) -> None:
    """Time GRPOTrainer's phases and record what each iteration sampled. Measurement only: every wrapped
    method returns what it returned."""
    inner_generate = GRPOTrainer._generate

    def generated(self, prompts):
        out = inner_generate(self, prompts)
        prompt_ids, completion_ids = out[0], out[1]
        ended = sum(1 for ids in completion_ids if ids and ids[-1] in self.eos_token_ids)
        record["generations"].append(
            bench_grpo.generation_record(
                [len(x) for x in prompt_ids], [len(x) for x in completion_ids], ended
            )
        )
        return out

    GRPOTrainer._generate = generated
    inner_rewards = GRPOTrainer._calculate_rewards

    def rewarded(self, *args, **kwargs):
        out = inner_rewards(self, *args, **kwargs)
        record["reward_means"].append(float(out.mean()))
        return out

    GRPOTrainer._calculate_rewards = rewarded
    CLOCK.wrap(grpo_module, "create_model_from_path", "load")
    CLOCK.wrap(GRPOTrainer, "_generate", "generate", first_step=True)
    CLOCK.wrap(GRPOTrainer, "_calculate_rewards", "score")
    inner_logps = GRPOTrainer._get_per_token_logps_and_entropies

    def recorded(self, model, input_ids, attention_mask, logits_to_keep, *args, **kwargs):
        rows, cols = input_ids.shape
        CLOCK.record_pass(
            "train" if torch.is_grad_enabled() else "forward",
            rows,
            cols,
            int(attention_mask.sum()),
            head_rows=int(attention_mask[:, -logits_to_keep:].sum()),
        )
        return inner_logps(self, model, input_ids, attention_mask, logits_to_keep, *args, **kwargs)

    GRPOTrainer._get_per_token_logps_and_entropies = recorded


def grpo_time(job: dict) -> dict:
    g, out_dir = job["grpo"], job["out_dir"]
    record = {"generations": [], "reward_means": []}
    _instrument_grpo(record)
    CLOCK.install()
    tokenizer = AutoTokenizer.from_pretrained(job["model_dir"])
    t0 = time.monotonic()
    dataset = Dataset.from_list([{"prompt": r["prompt"]} for r in _records(g["prompts_path"])])
    CLOCK.phases["data"] = time.monotonic() - t0
    per = bench_grpo.per_iteration(g)
    # The variant carries every GRPOConfig option (bench_grpo.trl_options, minus the batch size, which
    # _args sets from the job: 64 completions, one accumulation step).
    args, used, missing = _args(GRPOConfig, {**job, "batch_size": per, "eval_batch_size": per}, out_dir)
    t0 = time.monotonic()
    trainer = GRPOTrainer(
        model=job["model_dir"],
        reward_funcs=[bench_grpo.trl_reward_function(g)],
        args=args,
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=_peft_config(job),
    )
    init_seconds = time.monotonic() - t0
    t0 = time.monotonic()
    trainer.train()
    train_call = time.monotonic() - t0
    CLOCK.wrap(trainer, "save_model", "save")
    trainer.save_model(out_dir + "/final")
    settings = {
        k: getattr(trainer.args, k, None)
        for k in (*bench_grpo.trl_options(g, g["iterations"]), "bf16", "gradient_checkpointing", "optim")
    }
    return {
        **CLOCK.result(),
        **record,
        "init_seconds": init_seconds,
        "train_call_seconds": train_call,
        "options_used": used,
        "options_missing": missing,
        "settings": json.loads(json.dumps(settings, default=str)),
        "generation_config": json.loads(json.dumps(trainer.generation_config.to_diff_dict(), default=str)),
        "ref_model_loaded": getattr(trainer, "ref_model", None) is not None,
        "trainable": trainable_summary(trainer.model),
    }


TASKS = {
    "dpo_loss": dpo_loss,
    "dpo_time": dpo_time,
    "rm_time": rm_time,
    "sft_time": sft_time,
    "grpo_time": grpo_time,
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
            "trl": trl.__version__,
        }
    )
    write_json(sys.argv[2], result)


if __name__ == "__main__":
    main()
