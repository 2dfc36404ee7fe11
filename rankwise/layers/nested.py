"""Nested-rank (DyLoRA) utilities: run, train and cut an adapter at a truncation b <= r.

    dW_b = (alpha / b) * B[:, :b] @ A[:b, :]          (Valipour et al., 2023, arXiv:2210.07558)

`LoraAdapter.truncate = b` makes the adapter compute dW_b (rankwise/layers/adapter.py). Here: set it for the
whole model, run a block at a given truncation, keep only component b's gradient (the authors' default, so
components 1..b-1 are not disturbed by training component b), and cut an adapter to its first b components
for good, with the scale that the truncation used (the function does not change).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from rankwise.layers.adapter import LoraAdapter
from rankwise.layers.scaling import lora_scale


def _adapters(model: nn.Module, adapter_name: str) -> list[LoraAdapter]:
    from rankwise.model import adapter_modules  # local: rankwise.model imports the layers package

    return [a for _, _, a in adapter_modules(model, adapter_name)]


def set_truncation(model: nn.Module, b: int | dict[str, int] | None, adapter_name: str = "default") -> None:
    """Every adapter runs its first `b` components (None: all of them); a dict gives one b per module.
    Mutates the adapters' `truncate`."""
    from rankwise.model import adapter_modules

    for name, _, adapter in adapter_modules(model, adapter_name):
        value = b.get(name) if isinstance(b, dict) else b
        if value is not None and value < 0:
            raise ValueError(f"Truncation {value} for {name!r} must be >= 0 (or None for the full rank).")
        adapter.truncate = value


@contextlib.contextmanager
def truncated(model: nn.Module, b: int | dict[str, int] | None, adapter_name: str = "default") -> Iterator[None]:
    """Run the block at truncation `b`, then restore each adapter's previous truncation."""
    adapters = _adapters(model, adapter_name)
    previous = [a.truncate for a in adapters]
    set_truncation(model, b, adapter_name)
    try:
        yield
    finally:
        for a, t in zip(adapters, previous):
            a.truncate = t


@torch.no_grad()
def keep_only_component_grad(adapter: LoraAdapter, b: int) -> None:
    """Zero the gradients of every component except b (1-based): A row b-1 and B column b-1.

    Equal to DyLoRA's forward with A[:b-1] and B[:, :b-1] detached. A module whose rank is below b is not
    trained at this step (its components were all trained at their own b)."""
    A, B = adapter.lora_A, adapter.lora_B  # (r, in), (out, r)
    keep = b - 1
    for p, dim in ((A, 0), (B, 1)):
        if p.grad is None:
            continue
        g = p.grad  # (r, in) or (out, r)
        if keep >= p.shape[dim]:
            g.zero_()
            continue
        mask = torch.zeros(p.shape[dim], dtype=torch.bool, device=g.device)
        mask[keep] = True
        shape = [1, 1]
        shape[dim] = -1
        g.mul_(mask.view(shape).to(g.dtype))


def truncation_scale(adapter: LoraAdapter, b: int) -> float:
    """The scale the adapter uses at truncation b (its stored scale at full rank)."""
    return adapter.scale if b >= adapter.r else lora_scale(adapter.alpha, b, adapter.use_rslora)
