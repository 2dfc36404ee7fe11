"""DoRA's row norms ||W + s B' A||_row without materialising W + s B' A.

With Bs = s B' (out, R), B' = B diag(e):

    ||W_j + Bs_j A||^2 = ||W_j||^2 + 2 Bs_j . (W A^T)_j + Bs_j (A A^T) Bs_j^T

One pass over W (out, in) gives W A^T (out, R) and ||W_j||^2; the rest is (out, R) and (R, R) work. This
reads the frozen weight once per step instead of writing and re-reading an (out, in) fp32 merged weight.
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
    WA,  # (O, R) fp32 output: W @ A^T
    W2,  # (O,) fp32 output: squared row norms of W
    O,
    K,
    R,
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
    pid_r = tl.program_id(1)
    ro = pid_o * BLOCK_O + tl.arange(0, BLOCK_O)
    rr = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    rk = tl.arange(0, BLOCK_K)
    o_ok = ro < O
    acc = tl.zeros((BLOCK_O, BLOCK_R), dtype=tl.float32)
    sq = tl.zeros((BLOCK_O,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + rk
        w = tl.load(W + ro[:, None].to(tl.int64) * stride_wo + kk[None, :] * stride_wk,
                    mask=o_ok[:, None] & (kk[None, :] < K), other=0.0)
        a = tl.load(A + rr[None, :] * stride_ar + kk[:, None] * stride_ak,
                    mask=(rr[None, :] < R) & (kk[:, None] < K), other=0.0)  # (BLOCK_K, BLOCK_R)
        acc = mma(w, a.to(w.dtype), acc, PREC, INTERPRET)
        w32 = w.to(tl.float32)
        sq += tl.sum(w32 * w32, axis=1)
    tl.store(WA + ro[:, None] * R + rr[None, :], acc, mask=o_ok[:, None] & (rr[None, :] < R))
    if pid_r == 0:
        tl.store(W2 + ro, sq, mask=o_ok)


def weight_times_factor(
    w: torch.Tensor, a: torch.Tensor, *, block_o: int | None = None, block_k: int | None = None, num_warps: int = 4
) -> tuple[torch.Tensor, torch.Tensor]:
    """(W @ A^T (O, R) fp32, squared row norms of W (O,) fp32) in one pass over W.  w: (O, K), a: (R, K)."""
    check_2d("w", w)
    check_2d("a", a, cols=w.shape[1])
    check_same_device(w=w, a=a)
    (O, K), R = w.shape, a.shape[0]
    wa = torch.empty(O, R, dtype=torch.float32, device=w.device)
    w2 = torch.empty(O, dtype=torch.float32, device=w.device)
    if O == 0:
        return wa, w2
    if K == 0 or R == 0:
        return wa.zero_(), (w.float() ** 2).sum(1)
    interp = interpreting()
    block_r = rank_block(R)
    block_o = block_o or (16 if interp else 64)
    block_k = block_k or (32 if interp else 128)
    grid = (triton.cdiv(O, block_o), triton.cdiv(R, block_r))
    _dora_norm_kernel[grid](
        w, a, wa, w2, O, K, R, w.stride(0), w.stride(1), a.stride(0), a.stride(1),
        BLOCK_O=block_o, BLOCK_K=block_k, BLOCK_R=block_r, PREC=dot_precision(w.dtype), INTERPRET=interp,
        num_warps=num_warps, num_stages=3,
    )
    return wa, w2


@torch.no_grad()
def dora_row_norm(w: torch.Tensor, a: torch.Tensor, b_scaled: torch.Tensor) -> torch.Tensor:
    """||W + b_scaled @ a||_row: (O,) fp32.  w: (O, K) base weight, a: (R, K), b_scaled: (O, R) = s B diag(e)."""
    if b_scaled.shape != (w.shape[0], a.shape[0]):
        raise ValueError(f"b_scaled has shape {tuple(b_scaled.shape)}, expected ({w.shape[0]}, {a.shape[0]}).")
    wa, w2 = weight_times_factor(w, a)
    a32, b32 = a.float(), b_scaled.float()
    gram = a32 @ a32.t()  # (R, R)
    sq = w2 + 2 * (wa * b32).sum(1) + ((b32 @ gram) * b32).sum(1)
    return sq.clamp_min(0).sqrt()
