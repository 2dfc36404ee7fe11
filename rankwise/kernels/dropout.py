"""Dropout masks that every kernel regenerates from a seed instead of storing them.

Element (row, col) of an (M, N) activation is kept when a 16-bit hash value is >= round(p * 65536):

    pair  = row * ceil(N / 2) + col // 2                         (mod 2^32)
    bits  = lowbias32(pair * 0x9E3779B1 + lowbias32(seed))       (Wellons' 32-bit integer hash)
    value = low 16 bits for even col, high 16 bits for odd col

so the mask depends only on (seed, row, col, N), never on a kernel's block sizes: the forward, the backward
and `dropout_keep_mask` below see the same mask. Kept values are scaled by 1 / (1 - p), as nn.Dropout does
(the keep probability is 1 - round(p * 65536) / 65536, within 1e-5 of 1 - p).

Why a hash and not Philox (tl.rand): dropout needs unbiased, uncorrelated bits, not a cryptographic-grade
stream, and Philox costs ~20 integer operations per bf16 element, which would make the memory-bound adapter
kernels compute-bound. One hash gives two elements (~6 operations each). Masks of two seeds are the same
stream at a random offset: harmless for dropout, where each step sees different data.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from rankwise.kernels.common import cdiv, check_seed


def threshold16(p: float) -> int:
    """Drop an element when its 16-bit value is below this."""
    return round(p * 65536)


@triton.jit
def lowbias32(x):
    """Chris Wellons' lowbias32 integer hash (a bijection on uint32 with low avalanche bias)."""
    x = x ^ (x >> 16)
    x = x * 0x7FEB352D
    x = x ^ (x >> 15)
    x = x * 0x846CA68B
    x = x ^ (x >> 16)
    return x


@triton.jit
def mixed_seed(SEED):
    """SEED: (1,) int64 tensor -> hashed uint32 scalar."""
    return lowbias32(tl.load(SEED).to(tl.uint32))


@triton.jit
def keep_tile(seed, row0, col0, N, p16, BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr):
    """Keep mask (BLOCK_ROWS, BLOCK_COLS) of the tile at (row0, col0); col0 and BLOCK_COLS must be even.

    seed: mixed_seed(...); N: columns of the full activation; p16: threshold16(p)."""
    rows = (row0 + tl.arange(0, BLOCK_ROWS)).to(tl.int64)
    pairs = col0 // 2 + tl.arange(0, BLOCK_COLS // 2)
    pair = (rows[:, None] * ((N + 1) // 2) + pairs[None, :]).to(tl.uint32)  # (BLOCK_ROWS, BLOCK_COLS // 2)
    bits = lowbias32(pair * 0x9E3779B1 + seed)
    lo = (bits & 0xFFFF).to(tl.int32)
    hi = (bits >> 16).to(tl.int32)
    value = tl.reshape(tl.join(lo, hi), (BLOCK_ROWS, BLOCK_COLS))  # col 2j <- lo[j], col 2j + 1 <- hi[j]
    return value >= p16


@triton.jit
def _mask_kernel(
    SEED,  # (1,) int64
    OUT,  # (M, N) bool/int8 keep mask, written
    M,
    N,
    stride_om,
    p16,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    seed = mixed_seed(SEED)
    keep = keep_tile(seed, pid_m * BLOCK_M, pid_n * BLOCK_N, N, p16, BLOCK_M, BLOCK_N)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    ptrs = OUT + rm[:, None].to(tl.int64) * stride_om + rn[None, :]
    tl.store(ptrs, keep.to(tl.int8), mask=(rm[:, None] < M) & (rn[None, :] < N))


def dropout_keep_mask(seed: torch.Tensor, rows: int, cols: int, p: float) -> torch.Tensor:
    """The keep mask (rows, cols) bool the fused kernels use for `seed` and `p` (for references and tests)."""
    check_seed(seed, p if p > 0 else 0.5, seed.device)
    out = torch.empty(rows, cols, dtype=torch.int8, device=seed.device)
    if rows and cols:
        grid = (cdiv(rows, 32), cdiv(cols, 64))
        _mask_kernel[grid](seed, out, rows, cols, out.stride()[0], threshold16(p), BLOCK_M=32, BLOCK_N=64)
    return out.bool()
