"""DoRA: weight-decomposed low-rank adaptation (Liu et al., 2024, arXiv:2402.09353).

    W' = m * (W0 + s B A) / ||W0 + s B A||_row      m: (out,), the norm taken per output row

m starts at the row norms of W0. As in the paper (section 4.3) and PEFT, the norm is treated as a constant
in backward (detached), which saves memory and barely changes training. Written so that the base output is
reused instead of materialising W' x:

    y = W0 x + b  +  (m / n - 1) * (W0 x)  +  (m / n) * s B A x,      n = ||W0 + s B A||_row (detached)
"""

from __future__ import annotations

import torch


def row_norm(weight_out_in: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """||W0 + dW|| per output row: (out,). weight_out_in, delta: (out, in)."""
    w = weight_out_in.to(delta.dtype) + delta
    return torch.linalg.vector_norm(w, dim=1)


def dora_combine(
    base_no_bias: torch.Tensor, lora_out: torch.Tensor, magnitude: torch.Tensor, norm: torch.Tensor
) -> torch.Tensor:
    """The DoRA correction added to the base output (bias included there).

    base_no_bias: (..., out) = W0 x;  lora_out: (..., out) = s B A x;  magnitude, norm: (out,).
    """
    factor = (magnitude / norm.detach()).to(lora_out.dtype)  # (out,)
    return (factor - 1) * base_no_bias.to(lora_out.dtype) + factor * lora_out
