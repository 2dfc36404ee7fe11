"""Expand, in place: y <- ((y + scale * ((g @ b^T) ⊙ keep + bias)) * f) + post_bias.

    y: (M, N) activations, updated in place     g: (M, R) fp32      b: (N, R) any float dtype
    bias, f, post_bias: (N,) optional            keep: the dropout mask of `dropout.py` (optional)

The forward adds s (B diag(e) A x + b_lora) to the base output y = x W^T + b (g = h, b = B diag(e)); DoRA also
passes f = m / ||W + s B A|| and post_bias = the base bias (then y holds x W^T without it). The backward adds
dh A to dx = dy W (g = dh, b = A^T) with the dropout mask of the forward and scale 1 / (1 - p).
One read and one write of y; the rank-R product never leaves registers.
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
def _expand_kernel(
    Y,  # (M, N) activations, read and written
    G,  # (M, R) fp32
    B,  # (N, R) factor
    BIAS,  # (N,) added inside the scale (read when HAS_BIAS)
    F,  # (N,) column factor (read when HAS_F)
    POST,  # (N,) added last (read when HAS_POST)
    SEED,  # (1,) int64 dropout seed (read when HAS_DROPOUT)
    M,
    N,
    R,
    stride_ym,
    stride_yn,
    stride_gm,
    stride_gr,
    stride_bn,
    stride_br,
    scale,  # float
    p16,  # int: dropout threshold (dropout.threshold16)
    HAS_BIAS: tl.constexpr,
    HAS_F: tl.constexpr,
    HAS_POST: tl.constexpr,
    HAS_DROPOUT: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_R: tl.constexpr,
    PREC: tl.constexpr,
    INTERPRET: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rr = tl.arange(0, BLOCK_R)
    m_ok = rm < M
    n_ok = rn < N
    y_ptrs = Y + rm[:, None].to(tl.int64) * stride_ym + rn[None, :] * stride_yn
    y = tl.load(y_ptrs, mask=m_ok[:, None] & n_ok[None, :], other=0.0)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for r0 in range(0, R, BLOCK_R):
        r = r0 + rr
        g = tl.load(G + rm[:, None].to(tl.int64) * stride_gm + r[None, :] * stride_gr,
                    mask=m_ok[:, None] & (r[None, :] < R), other=0.0)  # (BLOCK_M, BLOCK_R)
        b = tl.load(B + rn[None, :] * stride_bn + r[:, None] * stride_br,
                    mask=n_ok[None, :] & (r[:, None] < R), other=0.0)  # (BLOCK_R, BLOCK_N)
        acc = mma(g.to(y.dtype), b.to(y.dtype), acc, PREC, INTERPRET)
    if HAS_DROPOUT:
        acc = tl.where(keep_tile(mixed_seed(SEED), pid_m * BLOCK_M, pid_n * BLOCK_N, N, p16, BLOCK_M, BLOCK_N),
                       acc, 0.0)
    if HAS_BIAS:
        acc += tl.load(BIAS + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    out = y.to(tl.float32) + acc * scale
    if HAS_F:
        out = out * tl.load(F + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    if HAS_POST:
        out += tl.load(POST + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptrs, out.to(y.dtype), mask=m_ok[:, None] & n_ok[None, :])


def lora_expand_(
    y: torch.Tensor,
    g: torch.Tensor,
    b: torch.Tensor,
    *,
    scale: float = 1.0,
    bias: torch.Tensor | None = None,
    f: torch.Tensor | None = None,
    post_bias: torch.Tensor | None = None,
    seed: torch.Tensor | None = None,
    p: float = 0.0,
    block_m: int | None = None,
    block_n: int | None = None,
    num_warps: int = 4,
    num_stages: int = 2,
) -> torch.Tensor:
    """y <- ((y + scale * ((g @ b^T) ⊙ keep(seed, p) + bias)) * f) + post_bias, in place; returns y.

    y: (M, N), g: (M, R) fp32, b: (N, R), bias / f / post_bias: (N,). The dropout scale is not applied here."""
    check_2d("y", y)
    M, N = y.shape
    check_2d("g", g, rows=M)
    check_2d("b", b, rows=N, cols=g.shape[1])
    for name, v in (("bias", bias), ("f", f), ("post_bias", post_bias)):
        if v is not None and (v.dim() != 1 or v.shape[0] != N):
            raise ValueError(f"{name} must have shape ({N},), got {tuple(v.shape)}.")
    check_same_device(y=y, g=g, b=b, bias=bias, f=f, post_bias=post_bias, seed=seed)
    check_seed(seed, p, y.device)
    R = g.shape[1]
    if M == 0 or N == 0:
        return y
    interp = interpreting()
    block_r = rank_block(R)
    block_m = block_m or (16 if interp else 64)
    block_n = block_n or (32 if interp else 128)
    grid = (cdiv(M, block_m), cdiv(N, block_n))
    dummy = g  # never read: the matching HAS_* flag is False
    _expand_kernel[grid](
        y, g, b, bias if bias is not None else dummy, f if f is not None else dummy,
        post_bias if post_bias is not None else dummy, seed if p > 0 else dummy, M, N, R,
        y.stride()[0], y.stride()[1], g.stride()[0], g.stride()[1], b.stride()[0], b.stride()[1],
        float(scale), threshold16(p),
        HAS_BIAS=bias is not None, HAS_F=f is not None, HAS_POST=post_bias is not None, HAS_DROPOUT=p > 0,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_R=block_r, PREC=dot_precision(y.dtype), INTERPRET=interp,
        num_warps=num_warps, num_stages=num_stages,
    )
    return y
