"""The training step of `rankwise.train.loop.train_step`, for several processes and gradient accumulation.

    for each micro-batch i of this process's share of the global batch (n micro-batches):
        (inside pm.no_sync() except for the last)   loss_i = loss_fn(pm, micro_i) / n;   backward
        (the allocator's loss_term is added once, to the last micro-batch, as in a single-process step)
    allocator.on_backward  -> clip -> optimizer.step -> scheduler.step -> allocator.on_step -> zero_grad

After the last backward the gradients are the average over processes of sum_i grad(loss_i) / n, i.e. the
gradient of the mean loss over the global batch, so allocator scores computed from them are the same on
every process and the same as in one process with the whole batch. A resize in `on_step` is picked up by
the next forward of the `ParallelModel` (it rebuilds DDP).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
import torch.distributed as dist

from rankwise.allocate.base import Allocator, LossFn, default_loss
from rankwise.distributed.env import shard_batch, split_micro_batches, to_device
from rankwise.distributed.parallel import ParallelModel


def _autocast(pm: ParallelModel, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=pm.env.device.type, dtype=dtype)


def parallel_train_step(
    pm: ParallelModel,
    micro_batches: list[Any],
    step: int,
    optimizer: torch.optim.Optimizer,
    *,
    allocator: Allocator | None = None,
    loss_fn: LossFn = default_loss,
    scheduler: Any = None,
    grad_clip: float | None = None,
    autocast_dtype: torch.dtype | None = None,
) -> float:
    """One optimizer step (1-based `step`) over this process's `micro_batches`; returns the task loss averaged
    over micro-batches and processes (the loss a single process would report for the global batch)."""
    if not micro_batches:
        raise ValueError("parallel_train_step got no micro-batches; pass this process's share of the batch.")
    pm.train()
    n = len(micro_batches)
    loss_sum = torch.zeros((), device=pm.env.device)
    for i, micro in enumerate(micro_batches):
        last = i == n - 1
        with pm.no_sync() if not last else contextlib.nullcontext():
            with _autocast(pm, autocast_dtype):
                loss = loss_fn(pm, micro)
            total = loss / n
            if last and allocator is not None:
                extra = allocator.loss_term()  # full precision, added once per optimizer step
                if extra is not None:
                    total = total + extra
            total.backward()
        loss_sum = loss_sum + loss.detach().float()
    if allocator is not None:
        allocator.on_backward(step)
    if grad_clip:
        torch.nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], grad_clip)
    optimizer.step()
    if scheduler is not None:
        scheduler.step()
    if allocator is not None:
        allocator.on_step(step)
    optimizer.zero_grad(set_to_none=True)
    mean = loss_sum / n
    if pm.env.distributed:
        dist.all_reduce(mean, op=dist.ReduceOp.SUM)
        mean = mean / pm.env.world_size
    return float(mean)


def parallel_fit(
    pm: ParallelModel,
    global_batches: Iterable[Any] | Callable[[], Iterable[Any]],
    steps: int,
    optimizer: torch.optim.Optimizer,
    *,
    accumulation_steps: int = 1,
    allocator: Allocator | None = None,
    loss_fn: LossFn = default_loss,
    scheduler: Any = None,
    grad_clip: float | None = None,
    autocast_dtype: torch.dtype | None = None,
    on_step: Callable[[int, float], None] | None = None,
    start_step: int = 1,
) -> list[float]:
    """Train up to optimizer step `steps` on global batches (every process iterates the same global batches
    and keeps its shard, moved to its device and split into `accumulation_steps` micro-batches). Returns the
    loss of each step.
    The allocator must already be attached; `finalize` is called at the end, as in `rankwise.train.loop.fit`.
    start_step: resume at this step (1-based): the first start_step - 1 global batches are skipped, so a run
    resumed from a checkpoint sees the batches an uninterrupted run would, whatever the number of processes."""
    from rankwise.train.loop import cycle

    if accumulation_steps < 1:
        raise ValueError(f"accumulation_steps={accumulation_steps} must be >= 1.")
    if start_step < 1:
        raise ValueError(f"start_step={start_step} must be >= 1 (steps are 1-based).")
    losses: list[float] = []
    stream: Iterator[Any] = cycle(global_batches)
    for _ in range(start_step - 1):
        next(stream)
    for step in range(start_step, steps + 1):
        mine = to_device(shard_batch(next(stream), pm.env.rank, pm.env.world_size), pm.env.device)
        micro = split_micro_batches(mine, accumulation_steps)
        loss = parallel_train_step(pm, micro, step, optimizer, allocator=allocator, loss_fn=loss_fn,
                                   scheduler=scheduler, grad_clip=grad_clip, autocast_dtype=autocast_dtype)
        losses.append(loss)
        if on_step is not None:
            on_step(step, loss)
    if allocator is not None:
        allocator.finalize()
    return losses
