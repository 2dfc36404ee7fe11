"""Reduce over tokens: out = scale * (x ⊙ keep)^T @ g, plus optional column sums of x and of x ⊙ y.

    x: (M, N) activations        g: (M, R) fp32        y: (M, N) optional
    out: (N, R) fp32, or (R, N) with transpose=True
    colsum: (N,) fp32 = sum_m x[m, n]          dotsum: (N,) fp32 = sum_m x[m, n] * y[m, n]

The weight gradients of an adapter are such reductions over the M tokens: dB = s dy^T h (with colsum giving
the LoRA bias gradient and dotsum DoRA's sum of dy ⊙ y) and dA = dh^T dropout(x) (transpose=True, the
dropout mask regenerated, never stored). The tokens are split into chunks, one program per (column block,
rank block, chunk) so the whole GPU works even when N is small; each program writes its partial sums and one
torch.sum adds the chunks (deterministic, unlike atomics). M is the long axis (8k+ tokens), so the partials,
(chunks, N, R) fp32, stay a few MB.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from rankwise.kernels.common import (
    TARGET_PROGRAMS,
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
def _reduce_kernel(
    X,  # (M, N) activations
    G,  # (M, R) fp32
    Y,  # (M, N) read when HAS_DOT
    OUT,  # (chunks, N, R) fp32 partials, strides given (may be laid out as (chunks, R, N))
    CSUM,  # (chunks, N) fp32 partial column sums of x (written when HAS_CSUM)
    DSUM,  # (chunks, N) fp32 partial column sums of x * y (written when HAS_DOT)
    SEED,  # (1,) int64 dropout seed (read when HAS_DROPOUT)
    M,
    N,
    R,
    rows_per_chunk,  # int, a multiple of BLOCK_M
    stride_xm,
    stride_xn,
    stride_gm,
    stride_gr,
    stride_ym,
    stride_yn,
    stride_oc,
    stride_on,
    stride_or,
    scale,  # float: multiplies out (not the sums)
    p16,  # int: dropout threshold (dropout.threshold16)
    HAS_DROPOUT: tl.constexpr,
    HAS_CSUM: tl.constexpr,
    HAS_DOT: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_R: tl.constexpr,
    PREC: tl.constexpr,
    INTERPRET: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_r = tl.program_id(1)
    pid_c = tl.program_id(2)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rr = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    n_ok = rn < N
    m_start = pid_c * rows_per_chunk
    m_end = tl.minimum(M, m_start + rows_per_chunk)
    if HAS_DROPOUT:
        seed = mixed_seed(SEED)
    else:
        seed = 0
    acc = tl.zeros((BLOCK_N, BLOCK_R), dtype=tl.float32)
    csum = tl.zeros((BLOCK_N,), dtype=tl.float32)
    dsum = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for m0 in range(m_start, m_end, BLOCK_M):
        rm = m0 + tl.arange(0, BLOCK_M)
        m_ok = rm < m_end
        rows = rm[:, None].to(tl.int64)
        x = tl.load(X + rows * stride_xm + rn[None, :] * stride_xn, mask=m_ok[:, None] & n_ok[None, :], other=0.0)
        if HAS_DROPOUT:
            x = tl.where(keep_tile(seed, m0, pid_n * BLOCK_N, N, p16, BLOCK_M, BLOCK_N), x, 0.0)
        g = tl.load(G + rows * stride_gm + rr[None, :] * stride_gr, mask=m_ok[:, None] & (rr[None, :] < R), other=0.0)
        acc = mma(tl.trans(x), g.to(x.dtype), acc, PREC, INTERPRET)
        if HAS_CSUM:
            csum += tl.sum(x.to(tl.float32), axis=0)
        if HAS_DOT:
            y = tl.load(Y + rows * stride_ym + rn[None, :] * stride_yn, mask=m_ok[:, None] & n_ok[None, :], other=0.0)
            dsum += tl.sum(x.to(tl.float32) * y.to(tl.float32), axis=0)
    out_ptrs = OUT + pid_c * stride_oc + rn[:, None] * stride_on + rr[None, :] * stride_or
    tl.store(out_ptrs, acc * scale, mask=n_ok[:, None] & (rr[None, :] < R))
    if pid_r == 0:
        if HAS_CSUM:
            tl.store(CSUM + pid_c * N + rn, csum, mask=n_ok)
        if HAS_DOT:
            tl.store(DSUM + pid_c * N + rn, dsum, mask=n_ok)


def lora_reduce(
    x: torch.Tensor,
    g: torch.Tensor,
    *,
    scale: float = 1.0,
    seed: torch.Tensor | None = None,
    p: float = 0.0,
    transpose: bool = False,
    colsum: bool = False,
    dot_with: torch.Tensor | None = None,
    chunks: int | None = None,
    block_m: int | None = None,
    block_n: int | None = None,
    num_warps: int = 4,
    num_stages: int = 3,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """(scale * (x ⊙ keep)^T @ g, colsum of x or None, colsum of x ⊙ dot_with or None).

    x: (M, N), g: (M, R) -> out (N, R) fp32, or (R, N) contiguous with transpose=True."""
    check_2d("x", x)
    M, N = x.shape
    check_2d("g", g, rows=M)
    if dot_with is not None:
        check_2d("dot_with", dot_with, rows=M, cols=N)
    check_same_device(x=x, g=g, dot_with=dot_with, seed=seed)
    check_seed(seed, p, x.device)
    R = g.shape[1]
    interp = interpreting()
    block_r = rank_block(R)
    block_m = block_m or (16 if interp else 64)
    block_n = block_n or (32 if interp else (128 if block_r <= 32 else 64))
    n_blocks, r_blocks = cdiv(N, block_n), cdiv(R, block_r)
    m_blocks = max(1, cdiv(M, block_m))
    if chunks is None:
        chunks = 2 if interp else TARGET_PROGRAMS // (n_blocks * r_blocks)
    chunks = max(1, min(chunks, m_blocks))
    rows_per_chunk = cdiv(m_blocks, chunks) * block_m
    chunks = max(1, cdiv(M, rows_per_chunk))
    dev = x.device
    part = torch.empty((chunks, R, N) if transpose else (chunks, N, R), dtype=torch.float32, device=dev)
    stride_on, stride_or = (part.stride()[2], part.stride()[1]) if transpose else (part.stride()[1], part.stride()[2])
    csum = torch.empty(chunks, N, dtype=torch.float32, device=dev) if colsum else None
    dsum = torch.empty(chunks, N, dtype=torch.float32, device=dev) if dot_with is not None else None
    if M == 0 or N == 0 or R == 0:
        part.zero_()
        for t in (csum, dsum):
            if t is not None:
                t.zero_()
    else:
        y = dot_with if dot_with is not None else x
        _reduce_kernel[(n_blocks, r_blocks, chunks)](
            x, g, y, part, csum if csum is not None else part, dsum if dsum is not None else part,
            seed if p > 0 else part, M, N, R, rows_per_chunk,
            x.stride()[0], x.stride()[1], g.stride()[0], g.stride()[1], y.stride()[0], y.stride()[1],
            part.stride()[0], stride_on, stride_or, float(scale), threshold16(p),
            HAS_DROPOUT=p > 0, HAS_CSUM=colsum, HAS_DOT=dot_with is not None,
            BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_R=block_r, PREC=dot_precision(x.dtype), INTERPRET=interp,
            num_warps=num_warps, num_stages=num_stages,
        )

    def total(t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else (t[0] if t.shape[0] == 1 else t.sum(0))

    return total(part), total(csum), total(dsum)
