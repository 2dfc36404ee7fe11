"""The specification of the fused adapter path, in plain PyTorch (autograd gives the gradients).

    LoRA:  y = x W^T + b + s (B' A (x ⊙ keep / (1 - p)) + b_lora)          B' = B diag(e), A: (r, in), B: (out, r)
    DoRA:  y = f ⊙ (x W^T + s (B' A x + b_lora)) + b,   f = m / ||W + s B' A||_row (the norm is a constant)

`keep` is the dropout mask (rankwise.kernels.dropout.dropout_keep_mask gives the one a seed stands for).
Everything adapter-side is computed in fp32, as LoraLayer's reference path does; the fused kernels
(rankwise.kernels.lora_fused) must match these values and gradients to the precision of their dtype.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F


def lora_linear_ref(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scale: float,
    lora_bias: torch.Tensor | None = None,
    keep: torch.Tensor | None = None,
    p: float = 0.0,
) -> torch.Tensor:
    """x: (..., in), weight: (out, in), lora_A: (r, in), lora_B: (out, r) (diag(e) folded in), keep: (M, in)."""
    base = F.linear(x, weight, bias)  # (..., out)
    xd = x.to(lora_A.dtype)
    if keep is not None:
        xd = (xd.reshape(-1, x.shape[-1]) * keep.to(xd.dtype) / (1.0 - p)).reshape(x.shape)
    delta = (xd @ lora_A.t()) @ lora_B.t()  # (..., out)
    if lora_bias is not None:
        delta = delta + lora_bias
    return base + (delta * scale).to(base.dtype)


def dora_row_norm_ref(weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scale: float) -> torch.Tensor:
    """||W + s B' A||_row: (out,), materialising the merged weight in fp32."""
    merged = weight.to(torch.float32) + scale * (lora_B.float() @ lora_A.float())
    return torch.linalg.vector_norm(merged, dim=1)


def dora_linear_ref(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scale: float,
    magnitude: torch.Tensor,
    lora_bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """DoRA without dropout; magnitude: (out,)."""
    with torch.no_grad():
        norm = dora_row_norm_ref(weight, lora_A, lora_B, scale)
    f = magnitude / norm  # (out,)
    z = F.linear(x, weight).to(lora_A.dtype)
    delta = (x.to(lora_A.dtype) @ lora_A.t()) @ lora_B.t()
    if lora_bias is not None:
        delta = delta + lora_bias
    y = f * (z + scale * delta)
    if bias is not None:
        y = y + bias
    return y.to(x.dtype)
