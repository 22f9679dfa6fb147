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
outside the training step (evaluation, saving) runs on every process (`on_main`, `full_weights`).
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


class DataParallel:
    """This process's place among the data-parallel processes (one process: rank 0 of 1, no collectives)."""

    fsdp: Any = None  # the FSDPSettings when launched with an FSDP config (`stages.sharding`)

    def __init__(self) -> None:
        self.accelerator: Any = None
        self.rank, self.world = 0, 1
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            from accelerate import Accelerator

            from rlhflab.stages.sharding import fsdp_settings

            _refuse_accelerate_precision(os.environ)
            self.fsdp = fsdp_settings(os.environ)  # refuses what it does not act on, before anything starts
            self.accelerator = Accelerator(cpu=not torch.cuda.is_available())
            self.rank, self.world = self.accelerator.process_index, self.accelerator.num_processes

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def device(self) -> torch.device | None:
        """The device accelerate assigned this process (None with one process: the config's device)."""
        return None if self.accelerator is None else self.accelerator.device

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
        return f", data parallel over {self.world} processes" + (", sharded (FSDP)" if self.sharded else "")

    @property
    def sharded(self) -> bool:
        """Whether the model is sharded (FSDP): then every forward pass involves every process."""
        return self.fsdp is not None

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
        from rlhflab.stages.sharding import full_weights

        with full_weights(model, self.is_main):
            yield

    def sum_gradients(self, model: torch.nn.Module) -> None:
        """Sum every trainable parameter's gradient across processes, in one flat all-reduce (FSDP has already
        summed them in the backward pass)."""
        if self.world == 1 or self.sharded:
            return
        params = [p for p in model.parameters() if p.requires_grad]
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = self.accelerator.reduce(torch.cat([g.reshape(-1) for g in grads]), reduction="sum")
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
        return float(self.accelerator.reduce(x, reduction="sum"))

    def sum_all(self, values: dict[str, float]) -> dict[str, float]:
        """Each number of a dict summed over the processes, in one all-reduce (the keys are the same on every
        process: the same step's metrics)."""
        if self.world == 1:
            return values
        keys = sorted(values)
        x = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=self.device)
        return dict(zip(keys, self.accelerator.reduce(x, reduction="sum").tolist()))

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
            self.accelerator.wait_for_everyone()

    def max(self, value: float) -> float:
        """A number's maximum over the processes."""
        if self.world == 1:
            return value
        import torch.distributed as dist

        x = torch.tensor([value], dtype=torch.float64, device=self.device)
        dist.all_reduce(x, op=dist.ReduceOp.MAX)
        return float(x)

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
