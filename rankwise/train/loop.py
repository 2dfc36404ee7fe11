"""The plain training loop: readable top to bottom, with the allocator's named hooks in their places.

    for each step: loss = loss_fn(model, batch) + allocator.loss_term(); backward;
                   allocator.on_backward; clip; optimizer.step; scheduler.step; allocator.on_step; zero_grad

The CLI (`rankwise train`) adds data, evaluation, checkpoints and logging around the same step, taken over
several micro-batches (gradient accumulation) and processes: `rankwise.distributed.step.parallel_train_step`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch import nn

from rankwise.allocate.base import Allocator, LossFn, default_loss


def train_step(
    model: nn.Module,
    batch: Any,
    step: int,
    optimizer: torch.optim.Optimizer,
    *,
    allocator: Allocator | None = None,
    loss_fn: LossFn = default_loss,
    scheduler: Any = None,
    grad_clip: float | None = None,
) -> float:
    """One optimisation step (1-based `step`); returns the task loss."""
    model.train()
    loss = loss_fn(model, batch)
    total = loss
    if allocator is not None:
        extra = allocator.loss_term()
        if extra is not None:
            total = total + extra
    total.backward()
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
    return float(loss.detach())


def cycle(batches: Iterable[Any] | Callable[[], Iterable[Any]]) -> Iterator[Any]:
    """Endless iterator over a re-iterable (or a factory of iterables)."""
    while True:
        it = batches() if callable(batches) else batches
        empty = True
        for b in it:
            empty = False
            yield b
        if empty:
            raise ValueError("The training data yielded no batches.")


def fit(
    model: nn.Module,
    batches: Iterable[Any] | Callable[[], Iterable[Any]],
    steps: int,
    optimizer: torch.optim.Optimizer,
    *,
    allocator: Allocator | None = None,
    loss_fn: LossFn = default_loss,
    scheduler: Any = None,
    grad_clip: float | None = None,
    on_step: Callable[[int, float], None] | None = None,
) -> list[float]:
    """Train for `steps` steps; returns the loss of each step. The allocator must already be attached."""
    losses = []
    stream = cycle(batches)
    for step in range(1, steps + 1):
        loss = train_step(model, next(stream), step, optimizer, allocator=allocator, loss_fn=loss_fn,
                          scheduler=scheduler, grad_clip=grad_clip)
        losses.append(loss)
        if on_step is not None:
            on_step(step, loss)
    if allocator is not None:
        allocator.finalize()
    return losses
