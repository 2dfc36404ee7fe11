"""The plain initialisers: PEFT's default and a gaussian A."""

from __future__ import annotations

import torch
from torch import nn

from rankwise.init.registry import register_initializer
from rankwise.layers.adapter import kaiming_rows


@register_initializer("default")
@torch.no_grad()
def default_init(layer: nn.Module, adapter: nn.Module, **_: object) -> None:
    """A Kaiming-uniform (as nn.Linear), B = 0: the model is unchanged at step 0 (Hu et al., 2021).

    For embeddings PEFT swaps the roles (A = 0, B normal); we do the same so both start identical."""
    if layer.kind.name == "embedding":
        adapter.lora_A.zero_()
        nn.init.normal_(adapter.lora_B)
        return
    a = adapter.lora_A
    a.copy_(kaiming_rows(a.shape[0], a.shape[1], dtype=a.dtype, device=a.device))
    adapter.lora_B.zero_()


@register_initializer("gaussian")
@torch.no_grad()
def gaussian_init(layer: nn.Module, adapter: nn.Module, **_: object) -> None:
    """A ~ N(0, 1/r^2) (PEFT's "gaussian"), B = 0."""
    r = max(adapter.r, 1)
    nn.init.normal_(adapter.lora_A, std=1.0 / r)
    adapter.lora_B.zero_()
    if layer.kind.name == "embedding":
        adapter.lora_A.zero_()
        nn.init.normal_(adapter.lora_B)
