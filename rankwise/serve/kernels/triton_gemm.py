"""Skinny GEMMs of a decode step (a few dozen rows against a weight matrix), with the SiLU-mul of the MLP fused.

Specification (`model.py`, eager PyTorch; outputs rounded to the model dtype as those ops round):

    skinny_matmul:  out = x @ w^T                                    x: (M, K), w: (N, K) -> (M, N)
    gate_up_silu:   g, u = x @ w[:I]^T, x @ w[I:]^T (rounded);  out = silu(g) * u     w: (2 I, K) -> (M, I)

One program per BLOCK_N output columns holds all M rows (M <= 64) and streams its columns' weights once over K;
the weight bytes dominate (M x K activations are re-read from L2 by every program). `gate_up_silu` computes the
gate and up columns j of one tile in the same program, so the SiLU-mul is the GEMM's epilogue: the decode MLP
loses a kernel and the (M, 2 I) intermediate.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from rankwise.serve.kernels import pdl
from rankwise.serve.kernels.graph_timing import graph_us

# Triton's CPU interpreter (TRITON_INTERPRET=1, the CI parity tests) multiplies bf16 tiles wrongly in tl.dot; there
# the operands are widened to float32 first (exact).
UPCAST = os.environ.get("TRITON_INTERPRET", "0") == "1"


@triton.jit
def _skinny_kernel(
    x_ptr,        # (M, K) activations
    w_ptr,        # (N, K) weight rows; with SILU (2 I, K) = [gate; up]
    out_ptr,      # (M, N) or, with SILU, (M, I)
    M, K, I, stride_x, stride_w, stride_o,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SILU: tl.constexpr, UP: tl.constexpr,
    PDL: tl.constexpr,
):
    pid = tl.program_id(0)
    offs_m = tl.arange(0, BLOCK_M)
    mask_m = offs_m < M
    offs_n = (pid * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    offs_k = tl.arange(0, BLOCK_K)
    x_ptrs = x_ptr + offs_m[:, None] * stride_x + offs_k[None, :]
    w_ptrs = w_ptr + offs_n[:, None] * stride_w + offs_k[None, :]
    if SILU:
        u_ptrs = w_ptr + (I + offs_n[:, None]) * stride_w + offs_k[None, :]
    # the first weight tile before the PDL wait: weights are constant, so this load overlaps the kernel before
    w = tl.load(w_ptrs)                                                               # (BLOCK_N, BLOCK_K)
    if SILU:
        wu = tl.load(u_ptrs)
    if PDL:  # only the activations come from the kernel before (pdl.py)
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    x = tl.load(x_ptrs, mask=mask_m[:, None], other=0.0)                             # (BLOCK_M, BLOCK_K)
    if UP:
        x = x.to(tl.float32)
        w = w.to(tl.float32)
    acc = tl.dot(x, tl.trans(w))
    if SILU:
        if UP:
            wu = wu.to(tl.float32)
        acc_u = tl.dot(x, tl.trans(wu))
    for k0 in range(BLOCK_K, K, BLOCK_K):  # fresh names inside the loop: no loop-carried type changes
        xk = tl.load(x_ptrs + k0, mask=mask_m[:, None], other=0.0)
        wk = tl.load(w_ptrs + k0)
        if UP:
            xk = xk.to(tl.float32)
            wk = wk.to(tl.float32)
        acc = tl.dot(xk, tl.trans(wk), acc)
        if SILU:
            uk = tl.load(u_ptrs + k0)
            if UP:
                uk = uk.to(tl.float32)
            acc_u = tl.dot(xk, tl.trans(uk), acc_u)
    dt = out_ptr.dtype.element_ty
    if SILU:  # silu_mul's rounding: g, u rounded as the GEMM's output, silu(g) rounded, the product rounded
        g = acc.to(dt).to(tl.float32)
        s = (g / (1.0 + tl.exp(-g))).to(dt).to(tl.float32)
        res = (s * acc_u.to(dt).to(tl.float32)).to(dt)
    else:
        res = acc.to(dt)
    tl.store(out_ptr + offs_m[:, None] * stride_o + offs_n[None, :], res, mask=mask_m[:, None])


def _check(x: torch.Tensor, w: torch.Tensor, n_out: int, block_n: int, block_k: int) -> None:
    if x.dim() != 2 or w.dim() != 2 or x.shape[1] != w.shape[1] or x.dtype != w.dtype:
        raise ValueError(f"x (M, K) and w (N, K) of one dtype, got {tuple(x.shape)} {x.dtype}, {tuple(w.shape)} "
                         f"{w.dtype}.")
    if x.stride(1) != 1 or w.stride(1) != 1:
        raise ValueError("x and w need contiguous rows.")
    if x.shape[0] > 64:
        raise ValueError(f"M={x.shape[0]} rows: the skinny GEMM holds every row in one tile (M <= 64); use cuBLAS.")
    if n_out % block_n or x.shape[1] % block_k:
        raise ValueError(f"N={n_out} and K={x.shape[1]} must be multiples of block_n={block_n}, block_k={block_k}.")


def skinny_matmul(x: torch.Tensor, w: torch.Tensor, *, block_n: int = 32, block_k: int = 256, num_warps: int = 4,
                  num_stages: int = 4, out: torch.Tensor | None = None) -> torch.Tensor:
    """x @ w^T for x: (M <= 64, K), w: (N, K) -> (M, N)."""
    _check(x, w, w.shape[0], block_n, block_k)
    M, K = x.shape
    N = w.shape[0]
    out = torch.empty((M, N), dtype=x.dtype, device=x.device) if out is None else out
    if M:
        _skinny_kernel[(N // block_n,)](x, w, out, M, K, 0, x.stride(0), w.stride(0), out.stride(0),
                                        BLOCK_M=max(16, triton.next_power_of_2(M)), BLOCK_N=block_n, BLOCK_K=block_k,
                                        SILU=False, UP=UPCAST, num_warps=num_warps, num_stages=num_stages,
                                        **pdl.launch_options(x))
    return out


def gate_up_silu(x: torch.Tensor, w_gu: torch.Tensor, *, block_n: int = 32, block_k: int = 256,
                 num_warps: int = 4, num_stages: int = 4) -> torch.Tensor:
    """silu(x @ w_gu[:I]^T) * (x @ w_gu[I:]^T) for x: (M <= 64, K), w_gu: (2 I, K) -> (M, I)."""
    if w_gu.shape[0] % 2:
        raise ValueError(f"w_gu must stack gate and up rows, (2 I, K); got {tuple(w_gu.shape)}.")
    I = w_gu.shape[0] // 2
    _check(x, w_gu, I, block_n, block_k)
    M, K = x.shape
    out = torch.empty((M, I), dtype=x.dtype, device=x.device)
    if M:
        _skinny_kernel[(I // block_n,)](x, w_gu, out, M, K, I, x.stride(0), w_gu.stride(0), out.stride(0),
                                        BLOCK_M=max(16, triton.next_power_of_2(M)), BLOCK_N=block_n, BLOCK_K=block_k,
                                        SILU=True, UP=UPCAST, num_warps=num_warps, num_stages=num_stages,
                                        **pdl.launch_options(x))
    return out


# ---- launch shapes ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class SkinnyLaunch:
    """Tiles and pipeline of one skinny GEMM (they do not change what is computed, only the float32 sum order)."""

    block_n: int = 32
    block_k: int = 256
    num_warps: int = 4
    num_stages: int = 4


SKINNY_CANDIDATES = (SkinnyLaunch(16, 256, 4, 4), SkinnyLaunch(32, 256, 4, 4), SkinnyLaunch(32, 128, 4, 6),
                     SkinnyLaunch(64, 128, 4, 4), SkinnyLaunch(16, 128, 4, 6))
_TUNED: dict[tuple, SkinnyLaunch | None] = {}
SKINNY_MARGIN = 0.95  # a Triton GEMM replaces cuBLAS only when it times at most 95% of cuBLAS's time


def tune_skinny(w: torch.Tensor, M: int, silu: bool) -> SkinnyLaunch | None:
    """The fastest `SkinnyLaunch` for x (M, K) @ w^T (or `gate_up_silu` when `silu`), or None when cuBLAS (plus the
    separate `silu_mul`) is faster or within 5% of it; timed once per process and shape, as CUDA graphs."""
    from rankwise.serve.kernels.triton_fused import silu_mul

    key = (torch.cuda.get_device_name(w.device), w.dtype, tuple(w.shape), M, silu)
    if key in _TUNED:
        return _TUNED[key]
    x = torch.randn(M, w.shape[1], device=w.device).to(w.dtype)
    # A candidate must beat cuBLAS by SKINNY_MARGIN: on the H100 (2026-11-22) the o projection's Triton GEMM timed
    # 13% slower than cuBLAS in one process and was chosen at warm-up in another; a near-tie is left to cuBLAS.
    best, best_us = None, SKINNY_MARGIN * graph_us((lambda: silu_mul(x @ w.t())) if silu else (lambda: x @ w.t()))
    n_out = w.shape[0] // 2 if silu else w.shape[0]
    for c in SKINNY_CANDIDATES:
        if n_out % c.block_n or w.shape[1] % c.block_k:
            continue
        fn = (lambda: gate_up_silu(x, w, **vars(c))) if silu else (lambda: skinny_matmul(x, w, **vars(c)))
        try:
            us = graph_us(fn)
        except Exception:  # a shape that does not compile or launch on this GPU is not a candidate
            continue
        if us < best_us:
            best, best_us = c, us
    _TUNED[key] = best
    return best
