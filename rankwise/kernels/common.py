"""Helpers shared by the Triton kernels: the dot product, block sizes, input checks.

Every kernel does its matrix products in the activation dtype (bf16 / fp16 operands, fp32 accumulation, as
torch.autocast would) and keeps everything adapter-sized (h = x A^T, the gradients of A and B) in fp32.
fp32 activations use TF32 when `torch.backends.cuda.matmul.allow_tf32` allows it, IEEE fp32 otherwise, so an
fp32 model gets the precision it asked PyTorch for.

Under TRITON_INTERPRET=1 (CPU tests) the interpreter's bf16 dot is wrong, so operands are upcast to fp32
there first; the values are the same bf16 numbers, only the order of the fp32 accumulation differs.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

# Programs to aim for when a kernel splits a reduction over tokens: a few waves on a 100+ SM GPU.
TARGET_PROGRAMS = 264


# Read once: triton decides between compiling and interpreting when the kernels are defined (import time).
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def interpreting() -> bool:
    return _INTERPRET


def dot_precision(dtype: torch.dtype) -> str:
    """Triton's input_precision for an fp32 dot, following PyTorch's TF32 switch
    (torch.backends.cuda.matmul.allow_tf32, read through its C getter: the attribute costs microseconds)."""
    if dtype == torch.float32 and not torch._C._get_cublas_allow_tf32():
        return "ieee"
    return "tf32"


def cdiv(a: int, b: int) -> int:
    # Plain integer arithmetic: triton.cdiv is a constexpr function with a per-call cost on the host.
    return -(-a // b)


def rank_block(r: int) -> int:
    """Block over the rank dimension: a power of two in [16, 128] (tl.dot needs >= 16)."""
    block = 16
    while block < r and block < 128:
        block *= 2
    return block


def check_2d(name: str, t: torch.Tensor, rows: int | None = None, cols: int | None = None) -> None:
    if t.dim() != 2:
        raise ValueError(f"{name} must be 2-D, got shape {tuple(t.shape)}.")
    if (rows is not None and t.shape[0] != rows) or (cols is not None and t.shape[1] != cols):
        raise ValueError(f"{name} has shape {tuple(t.shape)}, expected ({rows}, {cols}) (None = any).")
    if t.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{name} has dtype {t.dtype}; the kernels take {FLOAT_DTYPES}.")


def check_same_device(**tensors: torch.Tensor | None) -> None:
    device = None
    for t in tensors.values():
        if t is not None:
            if device is None:
                device = t.device
            elif t.device != device:
                found = {name: v.device for name, v in tensors.items() if v is not None}
                raise ValueError(f"All inputs must be on one device, got {found}.")


def check_seed(seed: torch.Tensor | None, p: float, device: torch.device) -> None:
    if not 0.0 <= p < 1.0:
        raise ValueError(f"Dropout probability p={p!r} must be in [0, 1).")
    if p > 0 and (seed is None or seed.numel() != 1 or seed.dtype != torch.int64 or seed.device != device):
        raise ValueError(f"Dropout p={p} needs `seed`: a one-element int64 tensor on {device}, got {seed!r}.")


@triton.jit
def mma(a, b, acc, PREC: tl.constexpr, INTERPRET: tl.constexpr):
    """acc + a @ b with fp32 accumulation; a: (M, K), b: (K, N), both of one dtype."""
    if INTERPRET:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc)
    elif a.dtype == tl.float32:
        return tl.dot(a, b, acc, input_precision=PREC)
    else:
        return tl.dot(a, b, acc)
