"""Pieces every training stage wires together: device, model path, optimizer, schedule, run set-up.

Stages keep their own loops (readable top to bottom); what would otherwise be copied between them
lives here.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import math
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from rlhflab.config import (
    AdamWSection,
    EvalLoggingSection,
    LoggingSection,
    LoraSection,
    ModelSection,
    OptimSection,
    config_to_dict,
    config_to_yaml,
)
from rlhflab.core.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from rlhflab.core.io import atomic_dir, atomic_write_text
from rlhflab.core.metrics_log import MetricsLogger, SilentLogger
from rlhflab.core.progress import Progress
from rlhflab.core.run_dir import prepare_run_dir
from rlhflab.errors import ConfigError, UserError


def resolve_device(name: str) -> torch.device:
    """The device of model.device ('auto', 'cpu', 'cuda', 'cuda:N', 'mps')."""
    from rlhflab.models.loading import resolve_device as resolve

    return resolve(name, field="config: model.device")


def mixed_precision(
    model_cfg: ModelSection, device: torch.device
) -> Callable[[], contextlib.AbstractContextManager]:
    """A factory of the context that forward passes run in: torch.autocast(bfloat16) on `device` when
    model.autocast is 'bf16', else a no-op. Backward passes and optimizer steps run outside it (PyTorch's
    AMP recipe); bf16 has float32's exponent range, so no loss scaling is needed."""
    if model_cfg.autocast == "none":
        return contextlib.nullcontext
    return functools.partial(torch.autocast, device_type=device.type, dtype=torch.bfloat16)


def resolve_model_path(name_or_path: str) -> str:
    """A local model directory (models are never downloaded at run time)."""
    path = Path(name_or_path)
    if not path.exists():
        hint = (
            " ('lab:' names are resolved by the rlhflab command line and pipeline, or by "
            "rlhflab.lab.launch.resolve_lab)"
            if name_or_path.startswith("lab:")
            else ""
        )
        raise UserError(
            f"model '{name_or_path}' does not exist; give a local Hugging Face model directory "
            f"(models are never downloaded at run time){hint}"
        )
    return str(path)


def lora_settings(lora: LoraSection):
    """The models layer's LoRA settings from a config section."""
    from rlhflab.models.loading import LoraSettings

    modules = "all-linear" if lora.target_modules == ["all-linear"] else list(lora.target_modules)
    return LoraSettings(r=lora.r, alpha=lora.alpha, dropout=lora.dropout, target_modules=modules)


def load_policy(model_cfg: ModelSection, device: torch.device | None = None):
    """(model, tokenizer, device) from a model section, ready to train; `device` overrides model.device (the
    device a data-parallel launcher gave this process)."""
    from rlhflab.models.loading import load_causal_lm, load_tokenizer

    path = resolve_model_path(model_cfg.name_or_path)
    device = device if device is not None else resolve_device(model_cfg.device)
    lora = None
    if model_cfg.lora.enabled:
        lora = lora_settings(model_cfg.lora)
    model = load_causal_lm(
        path,
        dtype=model_cfg.dtype,
        device=str(device),
        lora=lora,
        gradient_checkpointing=model_cfg.gradient_checkpointing,
    )
    tokenizer = load_tokenizer(path)
    return model, tokenizer, device


def num_optimizer_steps(n_examples: int, optim: OptimSection, *, what: str = "records") -> tuple[int, int]:
    """(total optimizer steps, steps per epoch), refusing a dataset smaller than one batch."""
    steps_per_epoch = n_examples // optim.batch_size
    if steps_per_epoch == 0:
        raise ConfigError(
            f"config: the training data has {n_examples} {what}, fewer than optim.batch_size "
            f"({optim.batch_size}); lower optim.batch_size or add data"
        )
    total = optim.max_steps if optim.max_steps else steps_per_epoch * optim.epochs
    return total, steps_per_epoch


def build_optimizer(model: torch.nn.Module, optim: AdamWSection, total_steps: int):
    """AdamW over trainable parameters (no decay on biases and norms) and a warm-up + decay schedule."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim < 2 or "norm" in name.lower() else decay).append(p)
    groups = [
        {"params": decay, "weight_decay": optim.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    params = decay + no_decay
    # The fused kernel updates every tensor in one pass instead of a Python loop over parameters: ~6x faster
    # optimizer steps for a 16M-parameter model on 2 CPU cores (BENCHMARKS.md), the same maths.
    fused = bool(params) and all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in params)
    optimizer = torch.optim.AdamW(
        [g for g in groups if g["params"]], lr=optim.lr, betas=optim.betas, fused=fused
    )

    def factor(step: int) -> float:
        if optim.warmup_steps and step < optim.warmup_steps:
            return (step + 1) / optim.warmup_steps
        if optim.scheduler == "constant":
            return 1.0
        progress = (step - optim.warmup_steps) / max(1, total_steps - optim.warmup_steps)
        progress = min(max(progress, 0.0), 1.0)
        if optim.scheduler == "linear":
            return 1.0 - progress
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    return optimizer, scheduler


# Counts whose end-to-end rate a run reports when it closes (what a user waits for, per unit of work).
END_TO_END_UNITS = ("pairs", "examples", "rollouts", "tokens")


@dataclass
class Run:
    """An open run directory with its metrics logger. `Loop.close` hands it the loop's totals, so that
    `close` can report end-to-end throughput next to the training loop's: the fixed costs around the loop
    (loading, a reference pass, evaluation, normalization, saving) count in the first, not the second."""

    dir: Path
    logger: MetricsLogger | SilentLogger
    name: str = "run"
    started: float = field(default_factory=time.time)
    totals: dict[str, float] = field(default_factory=dict)
    loop_seconds: float = 0.0
    final_step: int = 0

    def close(self) -> None:
        if isinstance(self.logger, SilentLogger):  # not the main process: the main one reports
            return
        wall = max(time.time() - self.started, 1e-9)
        units = [u for u in END_TO_END_UNITS if self.totals.get(u)]
        if units:
            row = {"perf/wall_s": wall, "perf/loop_s": self.loop_seconds}
            for u in units:
                row[f"perf/end_to_end_{u}_per_s"] = self.totals[u] / wall
                row[f"perf/loop_{u}_per_s"] = self.totals[u] / max(self.loop_seconds, 1e-9)
            self.logger.log(self.final_step, row)
            u = units[0]
            print(
                f"{self.name}: {self.totals[u]:.0f} {u} in {wall:.1f} s from start to saved model "
                f"({row[f'perf/end_to_end_{u}_per_s']:.3g} {u}/s end to end, "
                f"{row[f'perf/loop_{u}_per_s']:.3g} {u}/s in the training loop)"
            )
        self.logger.close()


def open_run(
    cfg: Any, stage: str, logging_cfg: LoggingSection, *, resume: bool, overwrite: bool, parallel=None
) -> Run:
    """The run directory with its logger. With several data-parallel processes (`parallel`, a
    `stages.parallel.DataParallel`), the main one prepares the directory and writes; the others wait for it and
    get a silent logger."""
    if parallel is not None and parallel.world > 1:
        if not logging_cfg.output_dir:
            raise ConfigError(
                f"config: logging.output_dir is empty, and each of the {parallel.world} processes would name its "
                "own timestamped run directory; set logging.output_dir"
            )
        if not parallel.is_main:
            parallel.wait()  # the main process has prepared (or cleared) the directory
            return Run(dir=Path(logging_cfg.output_dir), logger=SilentLogger(), name=stage)
        run = open_run(cfg, stage, logging_cfg, resume=resume, overwrite=overwrite)
        parallel.wait()
        return run
    run_dir = prepare_run_dir(logging_cfg.output_dir, stage, resume=resume, overwrite=overwrite)
    # The resolved config goes to disk before any work, so a crashed run still says how it was launched.
    atomic_write_text(run_dir / "config.yaml", f"stage: {stage}\n" + config_to_yaml(cfg, comments=False))
    logger = MetricsLogger(
        run_dir,
        tensorboard=logging_cfg.tensorboard,
        wandb=logging_cfg.wandb,
        wandb_project=logging_cfg.wandb_project,
        config=config_to_dict(cfg),
    )
    return Run(dir=run_dir, logger=logger, name=stage)


def clip_gradients(model: torch.nn.Module, max_grad_norm: float) -> float:
    """Clip the global gradient norm (when max_grad_norm > 0); returns the norm before clipping.

    The caller checks that the norm is finite before stepping: a NaN gradient must stop the run, not
    reach the weights.
    """
    params = [p for p in model.parameters() if p.grad is not None]
    if not params:
        return 0.0
    if max_grad_norm > 0:
        norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
    else:
        norm = torch.nn.utils.get_total_norm([p.grad for p in params])
    # A sharded model's (FSDP) norm is a distributed tensor: its value is the whole model's.
    return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)


def optimizer_step(optimizer, scheduler) -> None:
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)


def finish(
    par,
    run: Run,
    model,
    name: str,
    step: int,
    evaluate: Callable | None,
    save: Callable[[], Any],
    what: str = "model",
) -> None:
    """A stage's end: the final evaluation (logged, printed) and `save()` of the model, by the main process; a
    sharded model's every process evaluates and gathers the weights. The others return once it is saved."""
    final = par.on_main(evaluate) if evaluate is not None else None
    with par.full_weights(model):
        if par.is_main:
            if final:
                metrics = run.logger.log(step, final)
                print(f"{name}: " + "  ".join(f"{k}={v:.4f}" for k, v in metrics.items()))
            out = save()
            run.close()
            print(f"{name}: saved the {what} to {out}")
    par.wait()


def accumulate_metrics(sums: dict[str, list[float]], metrics: dict[str, torch.Tensor]) -> None:
    """Add each metric's sum and count of non-NaN values to `sums` (NaN marks "not this kind", e.g. the
    reward of a desirable example under reward/rejected), so `metric_means` gives per-kind means."""
    for k, v in metrics.items():
        v = v.detach().float()
        seen = ~torch.isnan(v)
        acc = sums.setdefault(k, [0.0, 0.0])
        acc[0] += float(v[seen].sum())
        acc[1] += float(seen.sum())


def metric_means(sums: dict[str, list[float]]) -> dict[str, float]:
    return {k: total / count for k, (total, count) in sums.items() if count}


def snapshot_dir(run_dir: Path, step: int) -> Path:
    """Where `Loop` saves the model of step `step` (logging.snapshot_every)."""
    return Path(run_dir) / "snapshots" / f"step-{step:06d}"


class Loop:
    """The bookkeeping every stage's loop shares, written once: resume from the latest checkpoint, a progress
    bar with ETA, metrics every logging.log_every steps (with the counts accumulated since the last log, for
    throughput), evaluation every logging.eval_every steps, checkpoints every logging.save_every steps. The
    stage's own step (the maths) stays in its train(), read top to bottom:

        loop = Loop(run, "dpo", cfg.logging, total_steps, model, optimizer, scheduler, resume=resume)
        while loop.step < loop.total:
            ...one optimizer step...
            loop.count(tokens=n)
            loop.end_step({...metrics...}, perf=lambda counts, seconds: {...}, show={"loss": "loss/dpo"})
        loop.close()

    `state`: extra stage state to checkpoint (e.g. PPO's KL controller); on resume `resumed_state` holds it.
    `snapshot(path)`: saves the trained model to `path` (as the stage's final save does), every
    logging.snapshot_every steps, into RUN/snapshots/step-NNNNNN.
    `writes=False` (a data-parallel process other than the main one): the same steps, resumed from the same
    checkpoint, but no evaluation, snapshot, checkpoint or progress bar. `parallel` (a
    `stages.parallel.DataParallel`) sets `writes` to whether this is the main process; with a sharded model
    (FSDP) every process takes part in the evaluations, snapshots and checkpoints, which gather the weights; under
    DeepSpeed every process takes part in the checkpoints, which gather the optimizer state from its partitions.
    """

    def __init__(
        self,
        run: Run,
        name: str,
        logging_cfg: LoggingSection,
        total: int,
        model: torch.nn.Module,
        optimizer,
        scheduler,
        *,
        resume: bool,
        state: Callable[[], dict] | None = None,
        snapshot: Callable[[Path], Any] | None = None,
        writes: bool = True,
        parallel: Any = None,
    ):
        if logging_cfg.snapshot_every and snapshot is None:
            raise ConfigError(f"config: logging.snapshot_every is not supported by {name}; leave it 0")
        self.snapshot = snapshot
        self.run, self.name, self.cfg, self.total = run, name, logging_cfg, total
        self.model, self.optimizer, self.scheduler, self._state = model, optimizer, scheduler, state
        self.step, self.last_ckpt, self.resumed_state = 0, None, {}
        self.parallel = parallel
        # writes=False: a data-parallel process other than the main one (same steps, no files, no bar).
        self.writes = writes if parallel is None else parallel.is_main
        # Parameters or optimizer state split across the processes (FSDP, DeepSpeed): checkpoints are gathered
        # into the single-process format and loaded back into each process's part, by every process.
        self._gathers = parallel is not None and parallel.lockstep
        if resume and (ckpt := latest_checkpoint(run.dir)) is not None:
            restore = functools.partial(parallel.load_full_state, model, optimizer) if self._gathers else None
            loaded = load_checkpoint(
                ckpt, model=model, optimizer=optimizer, scheduler=scheduler, restore=restore
            )
            self.step, self.last_ckpt = loaded.pop("step"), ckpt
            self.resumed_state = loaded
            if self.writes:
                print(f"{name}: resumed from {ckpt} at step {self.step}")
        self.progress = Progress(
            total, name, enabled=logging_cfg.progress and self.writes, completed=self.step
        )
        self.counts: dict[str, float] = {}
        self.totals: dict[
            str, float
        ] = {}  # since this process started the loop (a resumed run: since resume)
        self._t_last = self._t_start = time.time()

    def count(self, **amounts: float) -> None:
        """Add to the counts handed to the next log (tokens, examples, ...)."""
        for key, n in amounts.items():
            self.counts[key] = self.counts.get(key, 0) + n
            self.totals[key] = self.totals.get(key, 0) + n

    def end_step(
        self,
        metrics: dict[str, Any],
        *,
        perf: Callable[[dict[str, float], float], dict] | None = None,
        show: dict[str, str] | None = None,
        evaluate: Callable[[], dict[str, float]] | None = None,
    ) -> None:
        """After an optimizer step: when a log is due, `metrics` and `perf(counts, seconds since the last log)`
        are logged (`show`: progress-bar label -> logged key); `evaluate()` runs when an evaluation is due
        (the final one is the stage's); a checkpoint is written when one is due."""
        self.step += 1
        if self.step % self.cfg.log_every == 0 or self.step == self.total:
            seconds = max(time.time() - self._t_last, 1e-9)
            row = self.run.logger.log(self.step, {**metrics, **(perf(self.counts, seconds) if perf else {})})
            self.counts, self._t_last = {}, time.time()
            self.progress.update(0, {label: row[key] for label, key in (show or {}).items()})
        sharded = self.parallel is not None and self.parallel.sharded
        # With a sharded model every process runs these (its forward passes and the gathers need them all);
        # the main one writes.
        every = getattr(self.cfg, "eval_every", 0)
        if self.writes or sharded:
            if evaluate is not None and every and self.step % every == 0 and self.step < self.total:
                result = evaluate()
                if self.writes:
                    self.run.logger.log(self.step, result)
            if self.cfg.snapshot_every and self.step % self.cfg.snapshot_every == 0:
                with self.parallel.full_weights(self.model) if sharded else contextlib.nullcontext():
                    if self.writes:
                        self.snapshot(snapshot_dir(self.run.dir, self.step))
        due = self.cfg.save_every and self.step % self.cfg.save_every == 0 and self.step < self.total
        if due and (self.writes or self._gathers):
            self._checkpoint()
        if self.writes:
            self.progress.update(1)

    def _checkpoint(self) -> None:
        """Write a checkpoint (gathered whole first from the processes' parts: the single-process format)."""
        optimizer_state = self.parallel.full_optimizer_state(self.optimizer) if self._gathers else None
        with self.parallel.full_weights(self.model) if self._gathers else contextlib.nullcontext():
            if self.writes:
                self.last_ckpt = save_checkpoint(
                    self.run.dir,
                    self.step,
                    model=self.model,
                    optimizer=self.optimizer,
                    scheduler=self.scheduler,
                    keep=self.cfg.keep_checkpoints,
                    state=self._state() if self._state else None,
                    optimizer_state=optimizer_state,
                )

    def close(self) -> None:
        self.progress.close()
        self.run.totals, self.run.final_step = dict(self.totals), self.step
        self.run.loop_seconds = time.time() - self._t_start


def plain_json(text: Any) -> Any:
    """A record's text as JSON (a chat's messages as dicts)."""
    if dataclasses.is_dataclass(text):
        return dataclasses.asdict(text)
    if isinstance(text, (list, tuple)):
        return [plain_json(t) for t in text]
    return text


def write_jsonl_atomic(path: Path, rows: list[dict]) -> None:
    """Rows as JSON Lines at `path` (parents made), written whole or not at all."""
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in rows))


def copy_model_dir(src: Path, dest: Path) -> Path:
    """A model directory copied whole (no symlinks), appearing at `dest` complete or not at all."""
    with atomic_dir(dest) as tmp:
        shutil.copytree(src, tmp, dirs_exist_ok=True)
    return dest


def inner_run_logging(log: LoggingSection, output_dir: Path) -> EvalLoggingSection:
    """The logging section of a stage run inside a round-based run (a round's DPO or SFT): the outer run's
    reporting settings, its own output directory."""
    return EvalLoggingSection(
        output_dir=str(output_dir),
        log_every=log.log_every,
        tensorboard=log.tensorboard,
        wandb=log.wandb,
        wandb_project=log.wandb_project,
        progress=log.progress,
    )
