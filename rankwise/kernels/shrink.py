"""Shrink: h = scale * (x ⊙ keep) @ a^T, the thin product that takes activations down to the rank.

    x: (M, K) activations (bf16 / fp16 / fp32)      a: (R, K) any float dtype, cast to x's dtype in registers
    h: (M, R) fp32                                    keep: the dropout mask of `dropout.py` (optional)

Used for h = dropout(x) A^T in the forward (scale = 1 / (1 - p)) and for dg = s dy B in the backward
(a = B^T). One pass over x: dropout happens in registers, so no dropped copy of x is written or saved.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from rankwise.kernels.common import (
    cdiv,
    check_2d,
    check_same_device,
    check_seed,
    dot_precision,
    interpreting,
    mma,
    rank_block,
)
from rankwise.kernels.dropout import keep_tile, mixed_seed, threshold16


@triton.jit
def _shrink_kernel(
    X,  # (M, K) activations
    A,  # (R, K) factor
    H,  # (M, R) fp32 output
    SEED,  # (1,) int64 dropout seed (read only when HAS_DROPOUT)
    M,
    K,
    R,
    stride_xm,
    stride_xk,
    stride_ar,
    stride_ak,
    stride_hm,
    stride_hr,
    scale,  # float: multiplies the product
    p16,  # int: dropout threshold (dropout.threshold16)
    HAS_DROPOUT: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr,
    PREC: tl.constexpr,
    INTERPRET: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_r = tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rr = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    rk = tl.arange(0, BLOCK_K)
    x_rows = X + rm[:, None].to(tl.int64) * stride_xm
    if HAS_DROPOUT:
        seed = mixed_seed(SEED)
    else:
        seed = 0
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + rk
        x = tl.load(x_rows + kk[None, :] * stride_xk, mask=(rm[:, None] < M) & (kk[None, :] < K), other=0.0)
        if HAS_DROPOUT:
            x = tl.where(keep_tile(seed, pid_m * BLOCK_M, k0, K, p16, BLOCK_M, BLOCK_K), x, 0.0)
        a = tl.load(A + rr[None, :] * stride_ar + kk[:, None] * stride_ak,
                    mask=(rr[None, :] < R) & (kk[:, None] < K), other=0.0)  # (BLOCK_K, BLOCK_R)
        acc = mma(x, a.to(x.dtype), acc, PREC, INTERPRET)
    acc = acc * scale
    h_ptrs = H + rm[:, None].to(tl.int64) * stride_hm + rr[None, :] * stride_hr
    tl.store(h_ptrs, acc, mask=(rm[:, None] < M) & (rr[None, :] < R))


def lora_shrink(
    x: torch.Tensor,
    a: torch.Tensor,
    *,
    scale: float = 1.0,
    seed: torch.Tensor | None = None,
    p: float = 0.0,
    block_m: int | None = None,
    block_k: int | None = None,
    num_warps: int = 4,
    num_stages: int = 3,
) -> torch.Tensor:
    """h = scale * (x ⊙ keep(seed, p)) @ a^T: (M, R) fp32.  x: (M, K), a: (R, K).

    The dropout scale 1 / (1 - p) is NOT applied here: fold it into `scale`."""
    check_2d("x", x)
    check_2d("a", a, cols=x.shape[1])
    check_same_device(x=x, a=a, seed=seed)
    check_seed(seed, p, x.device)
    (M, K), R = x.shape, a.shape[0]
    h = torch.empty(M, R, dtype=torch.float32, device=x.device)
    if M == 0 or R == 0:
        return h
    if K == 0:
        return h.zero_()
    interp = interpreting()
    block_r = rank_block(R)
    block_m = block_m or (16 if interp else 64)
    block_k = block_k or (32 if interp else (128 if block_r <= 64 else 64))
    grid = (cdiv(M, block_m), cdiv(R, block_r))
    _shrink_kernel[grid](
        x, a, h, seed if p > 0 else h, M, K, R,
        x.stride()[0], x.stride()[1], a.stride()[0], a.stride()[1], h.stride()[0], h.stride()[1],
        float(scale), threshold16(p),
        HAS_DROPOUT=p > 0, BLOCK_M=block_m, BLOCK_K=block_k, BLOCK_R=block_r,
        PREC=dot_precision(x.dtype), INTERPRET=interp, num_warps=num_warps, num_stages=num_stages,
    )
    return h
