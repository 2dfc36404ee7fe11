"""DoRA's row norms ||W + s B' A||_row without materialising W + s B' A.

With Bs = s B' (out, R), B' = B diag(e):

    ||W_j + Bs_j A||^2 = ||W_j||^2 + 2 Bs_j . (W A^T)_j + Bs_j (A A^T) Bs_j^T

One launch: each program streams its rows of W (out, in) once, accumulating W A^T, ||W_j||^2 and A A^T, and
finishes the (out, R) / (R, R) algebra in registers. The frozen weight is read once per step instead of an
(out, in) fp32 merged weight being written and read again. Ranks up to 128.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from rankwise.kernels.common import check_2d, check_same_device, dot_precision, interpreting, mma, rank_block


@triton.jit
def _dora_norm_kernel(
    W,  # (O, K) base weight (any strides: a Conv1D weight is read transposed)
    A,  # (R, K) factor
    BS,  # (O, R) s B diag(e)
    NORM,  # (O,) fp32 output
    O,
    K,
    R,
    stride_wo,
    stride_wk,
    stride_ar,
    stride_ak,
    stride_bo,
    stride_br,
    BLOCK_O: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr,
    PREC: tl.constexpr,
    INTERPRET: tl.constexpr,
):
    pid = tl.program_id(0)
    ro = pid * BLOCK_O + tl.arange(0, BLOCK_O)
    rr = tl.arange(0, BLOCK_R)
    rk = tl.arange(0, BLOCK_K)
    o_ok = ro < O
    r_ok = rr < R
    wa = tl.zeros((BLOCK_O, BLOCK_R), dtype=tl.float32)  # W A^T
    gram = tl.zeros((BLOCK_R, BLOCK_R), dtype=tl.float32)  # A A^T (each program recomputes it: A is small)
    sq = tl.zeros((BLOCK_O,), dtype=tl.float32)  # ||W_j||^2
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + rk
        w = tl.load(W + ro[:, None].to(tl.int64) * stride_wo + kk[None, :] * stride_wk,
                    mask=o_ok[:, None] & (kk[None, :] < K), other=0.0)
        a = tl.load(A + rr[:, None] * stride_ar + kk[None, :] * stride_ak, mask=r_ok[:, None] & (kk[None, :] < K),
                    other=0.0).to(tl.float32)  # (BLOCK_R, BLOCK_K)
        wa = mma(w, tl.trans(a).to(w.dtype), wa, PREC, INTERPRET)
        gram = mma(a, tl.trans(a), gram, PREC, INTERPRET)
        w32 = w.to(tl.float32)
        sq += tl.sum(w32 * w32, axis=1)
    bs = tl.load(BS + ro[:, None] * stride_bo + rr[None, :] * stride_br, mask=o_ok[:, None] & r_ok[None, :],
                 other=0.0).to(tl.float32)  # (BLOCK_O, BLOCK_R)
    cross = tl.sum(wa * bs, axis=1)
    quad = tl.sum(mma(bs, gram, tl.zeros((BLOCK_O, BLOCK_R), dtype=tl.float32), PREC, INTERPRET) * bs, axis=1)
    tl.store(NORM + ro, tl.sqrt(tl.maximum(sq + 2.0 * cross + quad, 0.0)), mask=o_ok)


@torch.no_grad()
def dora_row_norm(w: torch.Tensor, a: torch.Tensor, b_scaled: torch.Tensor, *, block_o: int | None = None,
                  block_k: int | None = None, num_warps: int = 4) -> torch.Tensor:
    """||W + b_scaled @ a||_row: (O,) fp32 in one launch.  w: (O, K) base weight, a: (R, K) with R <= 128,
    b_scaled: (O, R) = s B diag(e)."""
    check_2d("w", w)
    check_2d("a", a, cols=w.shape[1])
    check_2d("b_scaled", b_scaled, rows=w.shape[0], cols=a.shape[0])
    check_same_device(w=w, a=a, b_scaled=b_scaled)
    (O, K), R = w.shape, a.shape[0]
    if R > 128:
        raise ValueError(f"dora_row_norm handles ranks up to 128, got {R}.")
    norm = torch.empty(O, dtype=torch.float32, device=w.device)
    if O == 0:
        return norm
    interp = interpreting()
    # Small row blocks: O can be 512 (k/v projections) and every program streams whole rows of W.
    block_o = block_o or (16 if interp or O <= 2048 else 32)
    block_k = block_k or (32 if interp else 128)
    _dora_norm_kernel[(triton.cdiv(O, block_o),)](
        w, a, b_scaled, norm, O, K, R, w.stride(0), w.stride(1), a.stride(0), a.stride(1),
        b_scaled.stride(0), b_scaled.stride(1), BLOCK_O=block_o, BLOCK_K=block_k, BLOCK_R=rank_block(R),
        PREC=dot_precision(w.dtype), INTERPRET=interp, num_warps=num_warps, num_stages=3,
    )
    return norm
