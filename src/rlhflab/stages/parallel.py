"""Data parallelism across the processes that `accelerate launch` or `torchrun` start.

    accelerate launch --multi_gpu --num_processes 2 -m rlhflab sft --config configs/sft_tiny.yaml
    torchrun --nproc_per_node 2 -m rlhflab sft --config configs/sft_tiny.yaml

Every process builds the same model from the same seed and walks the same batch schedule (a function of the
seed and the epoch); each takes its share of every step's batch (`shard`: rank r takes examples r, r + W,
...), computes its part of the step's loss normalized by the WHOLE batch's count, and the gradients are
summed across processes before the optimizer step (`sum_gradients`). The sum of the parts is the full batch's
gradient, so W processes take the same steps as one process with the same `optim.batch_size`, up to the order
of floating-point additions: the global batch does not change with the number of processes. Only the main
process writes (metrics, checkpoints, the final model).

The processes talk through accelerate's collectives (gloo on CPU, NCCL on GPUs); nothing here launches
processes. The gradient sum is an explicit all-reduce rather than a `DistributedDataParallel` wrapper because
the stages call the model's body and LM head separately (the head only where log-probs are needed), which a
DDP wrapper's forward would not see. Accelerate only picks the CPU backend when asked (`cpu=True`), so that
is what a machine without CUDA gets.

Launched with an FSDP config file (configs/accelerate/fsdp.yaml), `prepare` shards the model with PyTorch's
FSDP2 instead (`stages.sharding`): the gradients are then summed by FSDP itself, and work that reads the model
outside the training step (evaluation, saving) runs on every process (`on_main`, `full_weights`). Launched with
a DeepSpeed config file (configs/accelerate/deepspeed_zero3.yaml), `attach` wraps the model and its optimizer in
DeepSpeed's engine, and `backward` / `deepspeed_step` go through it (`stages.deepspeed_zero`). Under either,
checkpoints are gathered into the single-process format and loaded back into any layout (`full_optimizer_state`,
`load_full_state`), so a run resumes in another number of processes, with or without them.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from typing import Any

import torch


def _refuse_accelerate_precision(env) -> None:
    """accelerate's own mixed precision would wrap a model rlhflab never hands it: refuse it, naming the
    setting that does act."""
    from rlhflab.errors import ConfigError

    value = env.get("ACCELERATE_MIXED_PRECISION", "no")
    if value not in ("no", ""):
        raise ConfigError(
            f"accelerate config: mixed_precision={value} is not read by rlhflab; set mixed_precision: 'no' in the "
            "accelerate config and model.autocast=bf16 in the rlhflab config"
        )


# `attach`'s micro_batches for a stage whose steps take a number of backward passes that changes from step to
# step (online DPO: its pairs left after dropping ties), given by `begin_step`.
VARYING = -1


def silent(*_args: Any, **_kwargs: Any) -> None:
    """The printer of a process other than the main one: one process speaks for the run."""


class DataParallel:
    """This process's place among the data-parallel processes (one process: rank 0 of 1, no collectives)."""

    fsdp: Any = None  # the FSDPSettings when launched with an FSDP config (`stages.sharding`)
    zero: Any = None  # the DeepSpeedSettings when launched with a DeepSpeed config (`stages.deepspeed_zero`)
    engine: Any = None  # DeepSpeed's engine, once `attach` has built it
    _varying = False  # whether the engine's steps take a varying number of micro-batches (`begin_step`)
    accelerator: Any = None
    _device: torch.device | None = None

    def __init__(self) -> None:
        self.rank, self.world = 0, 1
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            from rlhflab.stages.deepspeed_zero import deepspeed_settings
            from rlhflab.stages.sharding import fsdp_settings

            # What an accelerate config asks and rlhflab does not act on is refused before anything starts.
            _refuse_accelerate_precision(os.environ)
            self.fsdp, self.zero = fsdp_settings(os.environ), deepspeed_settings(os.environ)
            if self.zero is not None:
                self._init_deepspeed()
            else:
                from accelerate import Accelerator

                self.accelerator = Accelerator(cpu=not torch.cuda.is_available())
                self.rank, self.world = self.accelerator.process_index, self.accelerator.num_processes
                self._device = self.accelerator.device

    @classmethod
    def one(cls) -> DataParallel:
        """One process on its own whatever the launch (rank 0 of 1: every share is the whole, no collectives)."""
        par = cls.__new__(cls)
        par.rank, par.world = 0, 1
        return par

    def _init_deepspeed(self) -> None:
        """The process group DeepSpeed's engine expects (NCCL on GPUs, gloo on CPU). accelerate's own state is
        not used here: on a machine without CUDA it counts every DeepSpeed process as rank 0 of 1."""
        import deepspeed
        import torch.distributed as dist

        deepspeed.init_distributed()
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        if torch.cuda.is_available():
            local = int(os.environ.get("LOCAL_RANK", "0"))
            torch.cuda.set_device(local)
            self._device = torch.device("cuda", local)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def voice(self, log: Callable[..., None] = print) -> Callable[..., None]:
        """`log` on the main process, `silent` on the others."""
        return log if self.is_main else silent

    @property
    def device(self) -> torch.device | None:
        """The device this process trains on (None with one process, or on CPU under DeepSpeed: the config's)."""
        return self._device

    def _all_reduce(self, x: torch.Tensor, op: str = "sum") -> torch.Tensor:
        import torch.distributed as dist

        dist.all_reduce(x, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
        return x

    def shard(self, items: list) -> list:
        """This process's share of one step's items: every W-th, starting at its rank."""
        return list(items)[self.rank :: self.world]

    def check_batch(self, batch_size: int, what: str = "optim.batch_size") -> None:
        """Every process needs at least one example of every step."""
        from rlhflab.errors import ConfigError

        if batch_size < self.world:
            raise ConfigError(
                f"config: {what}={batch_size} is smaller than the {self.world} processes; each process needs at "
                f"least one example per step: raise {what} or launch fewer processes"
            )

    def prepare(self, model: torch.nn.Module) -> torch.nn.Module:
        """The model to train: sharded across the processes under FSDP (call it before building the
        optimizer), else as it is."""
        if self.fsdp is None:
            return model
        from rlhflab.stages.sharding import shard_model

        return shard_model(model, self.fsdp)

    def describe(self) -> str:
        """How the run is spread, for a stage's opening line ("" for one process)."""
        if self.world == 1:
            return ""
        how = ", sharded (FSDP)" if self.fsdp is not None else ""
        how = f", DeepSpeed ZeRO-{self.zero.zero_stage}" if self.zero is not None else how
        return f", data parallel over {self.world} processes" + how

    @property
    def sharded(self) -> bool:
        """Whether the model's parameters are split across the processes (FSDP, ZeRO-3): then every forward pass
        involves every process."""
        return self.fsdp is not None or (self.zero is not None and self.zero.zero_stage == 3)

    def attach(self, model, optimizer, optim, *, packed: bool = False, micro_batches: int = 0) -> None:
        """Under DeepSpeed, wrap `model` and `optimizer` (built on the model's parameters) in its engine, for
        steps of optim.batch_size examples split evenly over the processes, each share in micro-batches of
        optim.micro_batch_size (one when 0 or `packed`), clipped at optim.max_grad_norm; nothing to do otherwise.
        `micro_batches`: the backward passes each process makes per step, when the stage decides them (the
        on-policy stages: one per minibatch, on every process, `lockstep`); VARYING: a number that changes from
        step to step, given by `begin_step` before each step's passes (the same on every process)."""
        if self.zero is None:
            return
        from rlhflab.errors import ConfigError

        # The optimizer's parameters in its groups' order, before DeepSpeed swaps them for its flat partitions: the
        # order of a single-process optimizer state (`full_optimizer_state`).
        self._groups = [list(g["params"]) for g in optimizer.param_groups]
        if micro_batches:
            self._build(model, optimizer, optim, micro_batches)
            return
        batch_size, micro_batch_size = optim.batch_size, 0 if packed else optim.micro_batch_size
        if batch_size % self.world:
            raise ConfigError(
                f"config: optim.batch_size={batch_size} does not split evenly over the {self.world} processes, "
                f"which DeepSpeed needs (the same micro-batches on each); make it a multiple of {self.world}"
            )
        share = batch_size // self.world
        self._build(model, optimizer, optim, -(-share // min(micro_batch_size or share, share)))

    def _build(self, model, optimizer, optim, micro: int) -> None:
        from rlhflab.stages.deepspeed_zero import build_engine

        # A varying count: an engine of one micro-batch per step, whose boundary `backward` sets itself.
        self._varying = micro == VARYING
        self.engine = build_engine(model, optimizer, self.zero, micro_batches=1 if self._varying else micro,
                                   world=self.world, max_grad_norm=optim.max_grad_norm)  # fmt: skip
        self._micro, self._micro_per_step = 0, 0 if self._varying else micro

    def begin_step(self, micro_batches: int) -> None:
        """The backward passes this process makes in the coming step, under an engine attached with VARYING
        micro-batches (every process the same count: `lockstep`); nothing to do otherwise."""
        if self.engine is not None and self._varying:
            self._micro, self._micro_per_step = 0, micro_batches

    @property
    def lockstep(self) -> bool:
        """Whether every process must join every forward and backward pass, holding rows or not: the parameters
        are sharded (FSDP, ZeRO-3), or DeepSpeed reduces the gradients in collectives during the backward pass. The
        parameters or the optimizer state are then split, so writing or reading a checkpoint needs every process too."""
        return self.sharded or self.engine is not None

    def backward(self, loss: torch.Tensor) -> None:
        """`loss.backward()` of one micro-batch's loss (normalized by the whole step's count); under DeepSpeed
        the engine's backward and micro-step, scaled so that the step's gradient is the sum over the processes
        and micro-batches (`stages.deepspeed_zero`)."""
        if self.engine is None:
            loss.backward()
            return
        if self._varying:
            # The engine was built for one micro-batch per step: it neither divides the loss by the step's count
            # (the stage's normalization already makes the sum the step's gradient) nor knows which pass is the
            # last, where ZeRO hands the accumulated gradient partitions to the update: that is marked here.
            self.engine.set_gradient_accumulation_boundary(self._micro + 1 == self._micro_per_step)
        gas = 1 if self._varying else self._micro_per_step  # what the engine divides each loss by
        self.engine.backward(loss * (gas * self.world))
        # ZeRO-3 expects its forward to reset these before the next micro-batch; the stages call the model's
        # parts directly, not the engine's forward.
        clear = getattr(self.engine.optimizer, "clear_backward_seen_flag", None)
        if clear is not None:
            clear()
        self._micro += 1
        if self._micro < self._micro_per_step:
            self.engine.step()  # a micro-step: no update yet

    def deepspeed_step(self, scheduler) -> float:
        """The engine's update at the step's last micro-batch (clipped by optim.max_grad_norm); returns the
        gradient norm before clipping."""
        from rlhflab.errors import UserError

        if self._micro != self._micro_per_step:
            raise UserError(
                f"DeepSpeed: this step had {self._micro} micro-batches on process {self.rank}, not the "
                f"{self._micro_per_step} the engine expected"
            )
        self.engine.step()
        scheduler.step()
        self._micro = 0
        norm = self.engine.get_global_grad_norm()
        return float(norm if norm is not None else 0.0)

    def on_main(self, work: Callable[[], Any]) -> Any:
        """`work()` (an evaluation) on the main process, None on the others; on every process when the model is
        sharded, since its forward passes need them all."""
        return work() if self.is_main or self.sharded else None

    @contextlib.contextmanager
    def full_weights(self, model: torch.nn.Module) -> Iterator[None]:
        """A sharded model's parameters gathered whole on the main process within the block (every process
        enters); nothing to do otherwise."""
        if not self.sharded:
            yield
            return
        if self.zero is not None:
            from rlhflab.stages.deepspeed_zero import gathered_parameters

            with gathered_parameters(model):
                yield
            return
        from rlhflab.stages.sharding import full_weights

        with full_weights(model, self.is_main):
            yield

    def full_optimizer_state(self, optimizer: torch.optim.Optimizer) -> dict:
        """The optimizer's state dict in the single-process format, gathered from the processes that hold parts of
        it (every process calls it); `optimizer.state_dict()` when nothing is split."""
        if self.engine is not None:
            from rlhflab.stages.deepspeed_zero import full_optimizer_state

            return full_optimizer_state(self.engine, self._groups)
        if self.fsdp is not None:
            from rlhflab.stages.sharding import full_optimizer_state

            return full_optimizer_state(optimizer)
        return optimizer.state_dict()

    def load_full_state(self, model, optimizer, model_state: dict, optimizer_state: dict) -> None:
        """Load a checkpoint in the single-process format (written by any number of processes) into this process's
        part of the model and optimizer (every process calls it)."""
        if self.engine is not None:
            from rlhflab.stages.deepspeed_zero import load_full_state

            load_full_state(self.engine, self._groups, model, model_state, optimizer_state)
        elif self.fsdp is not None:
            from rlhflab.stages.sharding import load_full_state

            load_full_state(model, optimizer, model_state, optimizer_state)
        else:
            model.load_state_dict(model_state)
            optimizer.load_state_dict(optimizer_state)

    def sum_gradients(self, model: torch.nn.Module) -> None:
        """Sum every trainable parameter's gradient across processes, in one flat all-reduce (FSDP and DeepSpeed
        have already summed them in the backward pass)."""
        if self.world == 1 or self.fsdp is not None or self.engine is not None:
            return
        params = [p for p in model.parameters() if p.requires_grad]
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = self._all_reduce(torch.cat([g.reshape(-1) for g in grads]))
        offset = 0
        for p in params:
            n = p.numel()
            p.grad = flat[offset : offset + n].view_as(p).clone()
            offset += n

    def sum(self, value: float) -> float:
        """A number summed over the processes (e.g. a loss each computed on its share)."""
        if self.world == 1:
            return value
        x = torch.tensor([value], dtype=torch.float64, device=self.device)
        return float(self._all_reduce(x))

    def sum_tensor(self, x: torch.Tensor) -> torch.Tensor:
        """A tensor summed element-wise over the processes (on the CPU, as given)."""
        if self.world == 1:
            return x
        return self._all_reduce(x.to(self.device or "cpu")).to(x.device)

    def sum_all(self, values: dict[str, float]) -> dict[str, float]:
        """Each number of a dict summed over the processes, in one all-reduce (the keys are the same on every
        process: the same step's metrics)."""
        if self.world == 1:
            return values
        keys = sorted(values)
        x = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=self.device)
        return dict(zip(keys, self._all_reduce(x).tolist()))

    def means(self, parts: dict[str, tuple[float, float]]) -> dict[str, float]:
        """{key: (sum, count)} of each process's share -> {key: total sum / total count} (0 with no count), in
        one all-reduce."""
        flat = self.sum_all({f"{k}\t{i}": v[i] for k, v in parts.items() for i in (0, 1)})
        return {k: flat[f"{k}\t0"] / flat[f"{k}\t1"] if flat[f"{k}\t1"] else 0.0 for k in parts}

    def main_first(self, make):
        """`make()` on the main process first, then on the others once it is done: for work that leaves a file
        the others then read instead of redoing it (a cache)."""
        if self.is_main:
            out = make()
            self.wait()
            return out
        self.wait()
        return make()

    def wait(self) -> None:
        """Every process reaches this point before any goes on (e.g. the main one has made the run directory)."""
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()

    def max(self, value: float) -> float:
        """A number's maximum over the processes."""
        if self.world == 1:
            return value
        x = torch.tensor([value], dtype=torch.float64, device=self.device)
        return float(self._all_reduce(x, op="max"))

    def local_rows(self, global_rows: list[int], group: int = 1) -> list[int]:
        """Where this process holds the rows `global_rows` of a batch whose groups of `group` consecutive rows
        (e.g. the k samples of one prompt) it was given by `shard` (row i of group p = i // group is row
        (p // W) * group + i % group of process p % W); the rows other processes hold are left out, in order."""
        w = self.world
        return [(i // group // w) * group + i % group for i in global_rows if (i // group) % w == self.rank]

    def gather(self, items: list) -> list:
        """Every process's `shard` of a batch put back together, in the batch's order (on every process)."""
        if self.world == 1:
            return list(items)
        import torch.distributed as dist

        parts: list[Any] = [None] * self.world
        dist.all_gather_object(parts, list(items))
        n = sum(len(p) for p in parts)
        return [parts[i % self.world][i // self.world] for i in range(n)]

    def masked_whiten(self, x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
        """`rlhflab.losses.masked_whiten` with the mean and unbiased variance of the masked positions of EVERY
        process's `x` (each holds some rows of one batch): what one process whitening the whole batch gets."""
        from rlhflab.losses.utils import fill_masked, masked_whiten

        if self.world == 1:
            return masked_whiten(x, mask, shift_mean=shift_mean)
        x = fill_masked(x, mask)
        m = mask.to(x.dtype)
        total = self.sum_all({"n": float(m.sum()), "sum": float((x * m).sum(dtype=torch.float64))})
        mean = total["sum"] / max(total["n"], 1.0)
        squares = self.sum(float((((x - mean) * m) ** 2).sum(dtype=torch.float64)))
        var = squares / (total["n"] - 1) if total["n"] > 1 else 0.0
        whitened = (x - mean) * torch.rsqrt(torch.tensor(var + 1e-8, dtype=x.dtype))
        return fill_masked(whitened + (0.0 if shift_mean else mean), mask)

    def metric_means(self, sums: dict[str, list[float]]) -> dict[str, float]:
        """`rlhflab.stages.common.metric_means` of every process's {key: [sum, count]} added up (a process may
        have seen no value of some key)."""
        if self.world > 1:
            keys = sorted({k for part in self.gather([sorted(sums)]) for k in part})
            flat = self.sum_all(
                {f"{k}\t{i}": (sums[k][i] if k in sums else 0.0) for k in keys for i in (0, 1)}
            )
            sums = {k: [flat[f"{k}\t0"], flat[f"{k}\t1"]] for k in keys}
        return {k: total / count for k, (total, count) in sums.items() if count}
