"""Fused GPU kernels for training adapters, each next to its pure-PyTorch specification (reference.py).

    dispatch.py     when LoraLayer takes the fused path; `use_fused(False)` / RANKWISE_FUSED=0 turn it off
    lora_fused.py   autograd Functions: base GEMM + LoRA / DoRA adapter, forward and backward
    shrink.py       h = (x ⊙ keep) @ A^T                    (M, r)   one read of x
    expand.py       y <- (y + s (h B^T + b)) * f + b0        in place, one read and write of y
    reduce.py       (x ⊙ keep)^T @ g and column sums         the adapters' weight gradients
    dora_norm.py    ||W + s B A||_row from one read of W
    dropout.py      the seeded dropout mask every kernel regenerates

Only dispatch.py is imported with the package; the kernel modules import triton when first used.
"""

from rankwise.kernels.dispatch import fused_enabled, use_fused

__all__ = ["fused_enabled", "use_fused"]
