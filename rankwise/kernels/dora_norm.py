"""DoRA's row norms ||W + s B' A||_row without materialising W + s B' A.

With Bs = s B' (out, R), B' = B diag(e):

    ||W_j + Bs_j A||^2 = ||W_j||^2 + 2 Bs_j . (W A^T)_j + Bs_j (A A^T) Bs_j^T

Two kernels. `_partial`: programs over (row block, chunk of the in dimension) stream W (out, in) once and
add W A^T, ||W_j||^2 and (one row of programs) A A^T into a zeroed fp32 buffer with atomic adds; splitting
the in dimension keeps every SM busy even for the 512-row k/v weights. `_finish`: the (out, R) / (R, R)
algebra per row block. The frozen weight is read once per step; no (out, in) merged weight is written.
Ranks up to 128.
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
    dot_precision,
    interpreting,
    mma,
    rank_block,
)


@triton.jit
def _dora_norm_partial_kernel(
    W,  # (O, K) base weight (any strides: a Conv1D weight is read transposed)
    A,  # (R, K) factor
    WA,  # (O, R) fp32, zeroed: += W A^T
    SQ,  # (O,) fp32, zeroed: += row sums of W^2
    G,  # (R, R) fp32, zeroed: += A A^T (programs of row block 0)
    O,
    K,
    R,
    cols_per_chunk,  # int, a multiple of BLOCK_K
    stride_wo,
    stride_wk,
    stride_ar,
    stride_ak,
    BLOCK_O: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr,
    PREC: tl.constexpr,
    INTERPRET: tl.constexpr,
):
    pid_o = tl.program_id(0)
    pid_c = tl.program_id(1)
    ro = pid_o * BLOCK_O + tl.arange(0, BLOCK_O)
    rr = tl.arange(0, BLOCK_R)
    o_ok = ro < O
    r_ok = rr < R
    k_start = pid_c * cols_per_chunk
    k_end = tl.minimum(K, k_start + cols_per_chunk)
    wa = tl.zeros((BLOCK_O, BLOCK_R), dtype=tl.float32)
    gram = tl.zeros((BLOCK_R, BLOCK_R), dtype=tl.float32)
    sq = tl.zeros((BLOCK_O,), dtype=tl.float32)
    for k0 in range(k_start, k_end, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        k_ok = kk < k_end
        w = tl.load(W + ro[:, None].to(tl.int64) * stride_wo + kk[None, :] * stride_wk,
                    mask=o_ok[:, None] & k_ok[None, :], other=0.0)
        a = tl.load(A + rr[:, None] * stride_ar + kk[None, :] * stride_ak, mask=r_ok[:, None] & k_ok[None, :],
                    other=0.0).to(tl.float32)  # (BLOCK_R, BLOCK_K)
        wa = mma(w, tl.trans(a).to(w.dtype), wa, PREC, INTERPRET)
        if pid_o == 0:
            gram = mma(a, tl.trans(a), gram, PREC, INTERPRET)
        w32 = w.to(tl.float32)
        sq += tl.sum(w32 * w32, axis=1)
    tl.atomic_add(WA + ro[:, None] * R + rr[None, :], wa, mask=o_ok[:, None] & r_ok[None, :], sem="relaxed")
    tl.atomic_add(SQ + ro, sq, mask=o_ok, sem="relaxed")
    if pid_o == 0:
        tl.atomic_add(G + rr[:, None] * R + rr[None, :], gram, mask=r_ok[:, None] & r_ok[None, :], sem="relaxed")


@triton.jit
def _dora_norm_finish_kernel(
    WA,  # (O, R) fp32: W A^T
    SQ,  # (O,) fp32: ||W_j||^2
    G,  # (R, R) fp32: A A^T
    B,  # (O, R) B diag(e)
    NORM,  # (O,) fp32 output
    O,
    R,
    stride_bo,
    stride_br,
    scale,  # float: s
    BLOCK_O: tl.constexpr,
    BLOCK_R: tl.constexpr,
    PREC: tl.constexpr,
    INTERPRET: tl.constexpr,
):
    pid = tl.program_id(0)
    ro = pid * BLOCK_O + tl.arange(0, BLOCK_O)
    rr = tl.arange(0, BLOCK_R)
    o_ok = ro < O
    r_ok = rr < R
    bs = tl.load(B + ro[:, None] * stride_bo + rr[None, :] * stride_br, mask=o_ok[:, None] & r_ok[None, :],
                 other=0.0).to(tl.float32)
    bs = (bs * scale).to(tl.float32)  # (BLOCK_O, BLOCK_R); under torch.compile a float argument may arrive as fp64
    wa = tl.load(WA + ro[:, None] * R + rr[None, :], mask=o_ok[:, None] & r_ok[None, :], other=0.0)
    gram = tl.load(G + rr[:, None] * R + rr[None, :], mask=r_ok[:, None] & r_ok[None, :], other=0.0)
    sq = tl.load(SQ + ro, mask=o_ok, other=0.0)
    quad = tl.sum(mma(bs, gram, tl.zeros((BLOCK_O, BLOCK_R), dtype=tl.float32), PREC, INTERPRET) * bs, axis=1)
    norm2 = sq + 2.0 * tl.sum(wa * bs, axis=1) + quad
    tl.store(NORM + ro, tl.sqrt(tl.maximum(norm2, 0.0)), mask=o_ok)


def launch_dora_row_norm(w, a, b, scale, prec, block_o=None, block_k=None):
    """dora_row_norm without the input checks."""
    (O, K), R = w.shape, a.shape[0]
    buf = torch.zeros(O * R + O + R * R, dtype=torch.float32, device=w.device)
    wa, sq, gram = buf[: O * R], buf[O * R: O * R + O], buf[O * R + O:]
    norm = torch.empty(O, dtype=torch.float32, device=w.device)
    if O == 0:
        return norm
    interp = interpreting()
    block_o = block_o or (16 if interp else 64)
    block_k = block_k or (32 if interp else 128)
    o_blocks, k_blocks = cdiv(O, block_o), max(1, cdiv(K, block_k))
    chunks = 2 if interp else max(1, min(k_blocks, TARGET_PROGRAMS // o_blocks))
    cols_per_chunk = cdiv(k_blocks, chunks) * block_k
    block_r = rank_block(R)
    _dora_norm_partial_kernel[(o_blocks, max(1, cdiv(K, cols_per_chunk)))](
        w, a, wa, sq, gram, O, K, R, cols_per_chunk, w.stride()[0], w.stride()[1], a.stride()[0], a.stride()[1],
        BLOCK_O=block_o, BLOCK_K=block_k, BLOCK_R=block_r, PREC=prec, INTERPRET=interp, num_warps=4, num_stages=3,
    )
    _dora_norm_finish_kernel[(cdiv(O, 64),)](
        wa, sq, gram, b, norm, O, R, b.stride()[0], b.stride()[1], scale,
        BLOCK_O=64, BLOCK_R=block_r, PREC=prec, INTERPRET=interp, num_warps=4,
    )
    return norm


@torch.no_grad()
def dora_row_norm(w: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale: float = 1.0, *,
                  block_o: int | None = None, block_k: int | None = None) -> torch.Tensor:
    """||W + scale * b @ a||_row: (O,) fp32.  w: (O, K) base weight, a: (R, K) with R <= 128, b: (O, R)
    (B diag(e))."""
    check_2d("w", w)
    check_2d("a", a, cols=w.shape[1])
    check_2d("b", b, rows=w.shape[0], cols=a.shape[0])
    check_same_device(w=w, a=a, b=b)
    if a.shape[0] > 128:
        raise ValueError(f"dora_row_norm handles ranks up to 128, got {a.shape[0]}.")
    return launch_dora_row_norm(w, a, b, float(scale), dot_precision(w.dtype), block_o, block_k)
