"""Skinny GEMMs of a decode step (a few dozen rows against a weight matrix), with the SiLU-mul of the MLP fused.

Specification (`model.py`, eager PyTorch; outputs rounded to the model dtype as those ops round):

    skinny_matmul:  out = x @ w^T                                    x: (M, K), w: (N, K) -> (M, N)
    gate_up_silu:   g, u = x @ w[:I]^T, x @ w[I:]^T (rounded);  out = silu(g) * u     w: (2 I, K) -> (M, I)

    skinny_partials: parts[s] = x[:, Ks] @ w[:, Ks]^T in float32, Ks the s-th of `split` equal runs of K
                     -> (split, M, N); sum(parts) = x @ w^T before rounding

One program per BLOCK_N output columns holds all M rows (M <= 64) and streams its columns' weights once over K;
the weight bytes dominate (M x K activations are re-read from L2 by every program). `gate_up_silu` computes the
gate and up columns j of one tile in the same program, so the SiLU-mul is the GEMM's epilogue: the decode MLP
loses a kernel and the (M, 2 I) intermediate. `skinny_partials` splits K over `split` programs per column tile
(split-K) for the projections whose output goes straight into the residual add + RMSNorm (o and down): that
kernel (`triton_fused.add_rms`) sums the float32 parts as it loads them, so the split costs no reduce kernel,
and a 2048-column projection gets split x 2048 / BLOCK_N programs instead of fewer than one per SM.
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
    out_ptr,      # (M, N) or, with SILU, (M, I); with PARTIAL (split, M, N) float32
    M, K, I, stride_x, stride_w, stride_o,
    k_per,        # K per split (program_id(1)): K when not split
    stride_p,     # with PARTIAL: elements between two splits' (M, N) parts
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SILU: tl.constexpr, UP: tl.constexpr,
    PARTIAL: tl.constexpr, PDL: tl.constexpr,
):
    pid = tl.program_id(0)
    k_start = tl.program_id(1).to(tl.int64) * k_per
    offs_m = tl.arange(0, BLOCK_M)
    mask_m = offs_m < M
    offs_n = (pid * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    offs_k = k_start + tl.arange(0, BLOCK_K)
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
    for k0 in range(BLOCK_K, k_per, BLOCK_K):  # fresh names inside the loop: no loop-carried type changes
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
    if PARTIAL:  # this split's float32 sum, unrounded: the reader (add_rms) sums the splits, then rounds
        tl.store(out_ptr + tl.program_id(1).to(tl.int64) * stride_p + offs_m[:, None] * stride_o + offs_n[None, :],
                 acc, mask=mask_m[:, None])
        return
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
        _skinny_kernel[(N // block_n,)](x, w, out, M, K, 0, x.stride(0), w.stride(0), out.stride(0), K, 0,
                                        BLOCK_M=max(16, triton.next_power_of_2(M)), BLOCK_N=block_n, BLOCK_K=block_k,
                                        SILU=False, UP=UPCAST, PARTIAL=False, num_warps=num_warps,
                                        num_stages=num_stages, **pdl.launch_options(x))
    return out


def matmul(x: torch.Tensor, w: torch.Tensor, launch: SkinnyLaunch | None) -> torch.Tensor:
    """x @ w^T: the skinny Triton GEMM with `launch`, or cuBLAS when it is None (not chosen at warm-up)."""
    return x @ w.t() if launch is None else skinny_matmul(x, w, **vars(launch))


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
        _skinny_kernel[(I // block_n,)](x, w_gu, out, M, K, I, x.stride(0), w_gu.stride(0), out.stride(0), K, 0,
                                        BLOCK_M=max(16, triton.next_power_of_2(M)), BLOCK_N=block_n, BLOCK_K=block_k,
                                        SILU=True, UP=UPCAST, PARTIAL=False, num_warps=num_warps,
                                        num_stages=num_stages, **pdl.launch_options(x))
    return out


def skinny_partials(x: torch.Tensor, w: torch.Tensor, *, split: int = 4, block_n: int = 32, block_k: int = 256,
                    num_warps: int = 4, num_stages: int = 4) -> torch.Tensor:
    """Split-K x @ w^T for x: (M <= 64, K), w: (N, K) -> float32 parts (split, M, N) whose sum is the product
    (unrounded); `triton_fused.add_rms` takes them in place of its x."""
    if split < 1 or x.shape[1] % split:
        raise ValueError(f"split={split} must be >= 1 and divide K={x.shape[1]}.")
    k_per = x.shape[1] // split
    _check(x, w, w.shape[0], block_n, block_k)
    if k_per % block_k:
        raise ValueError(f"K / split = {k_per} must be a multiple of block_k={block_k}.")
    M, K = x.shape
    N = w.shape[0]
    out = torch.empty((split, M, N), dtype=torch.float32, device=x.device)
    if M:
        _skinny_kernel[(N // block_n, split)](x, w, out, M, K, 0, x.stride(0), w.stride(0), out.stride(1), k_per,
                                              out.stride(0), BLOCK_M=max(16, triton.next_power_of_2(M)),
                                              BLOCK_N=block_n, BLOCK_K=block_k, SILU=False, UP=UPCAST, PARTIAL=True,
                                              num_warps=num_warps, num_stages=num_stages, **pdl.launch_options(x))
    return out


# ---- launch shapes ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class SkinnyLaunch:
    """Tiles and pipeline of one skinny GEMM (they do not change what is computed, only the float32 sum order)."""

    block_n: int = 32
    block_k: int = 256
    num_warps: int = 4
    num_stages: int = 4


@dataclass(frozen=True)
class SplitLaunch(SkinnyLaunch):
    """A `skinny_partials` launch (K in `split` runs) whose reduce runs in the add + RMSNorm after it."""

    split: int = 4


SKINNY_CANDIDATES = (SkinnyLaunch(16, 256, 4, 4), SkinnyLaunch(32, 256, 4, 4), SkinnyLaunch(32, 128, 4, 6),
                     SkinnyLaunch(64, 128, 4, 4), SkinnyLaunch(16, 128, 4, 6))
# Split-K launches tried for o / down. In whole decode graphs (bench/decode_profile.py --split, 2026-12-06) 4 splits
# of 32 columns x 256 deep were the fastest of 4 launches on both an H100 (1.284 ms against 1.341 unsplit) and an
# H200 (1.079 against 1.164); wider grids that timed well in the GEMM chain alone lost in the whole step.
SPLIT_CANDIDATES = (SplitLaunch(32, 256, 4, 4, split=4), SplitLaunch(32, 256, 4, 4, split=2))
_TUNED: dict[tuple, object] = {}
TIMINGS: dict[str, dict[str, float]] = {}  # per tuned shape, us of each timed candidate (for the benchmarks' logs)
SKINNY_MARGIN = 0.95  # a Triton GEMM replaces cuBLAS only when it times at most 95% of cuBLAS's time


def _cycle(ws: list[torch.Tensor], fn):
    """A no-argument callable that applies fn to the next weight of ws at each call: the 20 calls of a timing graph
    read distinct layers' weights from HBM, as a decode step does, not one matrix from L2 (50 MB on an H100)."""
    state = {"i": 0}

    def call():
        w = ws[state["i"] % len(ws)]
        state["i"] += 1
        return fn(w)

    return call


def _weights(w: torch.Tensor | list[torch.Tensor]) -> list[torch.Tensor]:
    ws = [w] if isinstance(w, torch.Tensor) else list(w)
    if not ws or any(x.shape != ws[0].shape or x.dtype != ws[0].dtype for x in ws):
        raise ValueError("tuning needs one weight or a list of weights of one shape and dtype (the layers').")
    return ws


def tune_skinny(w: torch.Tensor | list[torch.Tensor], M: int, silu: bool) -> SkinnyLaunch | None:
    """The fastest `SkinnyLaunch` for x (M, K) @ w^T (or `gate_up_silu` when `silu`), or None when cuBLAS (plus the
    separate `silu_mul`) is faster or within 5% of it; timed once per process and shape, as CUDA graphs. w: one
    weight or the layers' weights of one projection (cycled through, so the timed weights come from HBM)."""
    from rankwise.serve.kernels.triton_fused import silu_mul

    ws = _weights(w)
    key = (torch.cuda.get_device_name(ws[0].device), ws[0].dtype, tuple(ws[0].shape), M, silu, len(ws))
    if key in _TUNED:
        return _TUNED[key]
    x = torch.randn(M, ws[0].shape[1], device=ws[0].device).to(ws[0].dtype)
    # A candidate must beat cuBLAS by SKINNY_MARGIN: on the H100 (2026-11-22) the o projection's Triton GEMM timed
    # 13% slower than cuBLAS in one process and was chosen at warm-up in another; a near-tie is left to cuBLAS.
    base = (lambda w: silu_mul(x @ w.t())) if silu else (lambda w: x @ w.t())
    log = TIMINGS.setdefault(f"{'gate_up_silu' if silu else 'gemm'} {tuple(ws[0].shape)} M={M}", {})
    log["cublas"] = graph_us(_cycle(ws, base))
    n_out = ws[0].shape[0] // 2 if silu else ws[0].shape[0]
    fits = [c for c in SKINNY_CANDIDATES if n_out % c.block_n == 0 and ws[0].shape[1] % c.block_k == 0]
    op = gate_up_silu if silu else skinny_matmul
    _TUNED[key] = _fastest(fits, lambda c: graph_us(_cycle(ws, lambda w: op(x, w, **vars(c)))),
                           SKINNY_MARGIN * log["cublas"], log)
    return _TUNED[key]


def _fastest(candidates, time_us, limit_us: float, log: dict):
    """The candidate with the least time_us(c) below limit_us, or None; each time recorded in log under repr(c)."""
    best, best_us = None, limit_us
    for c in candidates:
        try:
            us = log[repr(c)] = time_us(c)
        except Exception:  # a shape that does not compile or launch on this GPU is not a candidate
            continue
        if us < best_us:
            best, best_us = c, us
    return best


def decode_chain(layers: list[dict[str, torch.Tensor]], M: int, eps: float, gemm: dict,
                 split: SplitLaunch | None):
    """A no-argument callable running the weight GEMMs of a decode step's layers as the engine does (`model.py`):
    qkv; o -> add + RMSNorm; gate/up (+ SiLU-mul) -> down -> add + RMSNorm, with o and down as split-K parts
    reduced in the add + RMSNorm when `split` is given. layers[i]: the weights "qkv", "o", "gu", "d" and the norms
    "ln2", "ln_next" of layer i; gemm: the engine's chosen skinny launches (`decode_gemm`: qkv / o / gu / d /
    gu_silu, absent = cuBLAS). Inputs are random (M rows); the outputs are dropped."""
    from rankwise.serve.kernels.triton_fused import add_rms, silu_mul

    L0 = layers[0]
    dev, dt = L0["o"].device, L0["o"].dtype
    x = torch.randn(M, L0["qkv"].shape[1], device=dev).to(dt)     # (M, hidden)
    a = torch.randn(M, L0["o"].shape[1], device=dev).to(dt)       # (M, q_out): the attention's output
    res = torch.randn(M, L0["o"].shape[0], device=dev).to(dt)     # (M, hidden)

    fused = gemm.get("gu_silu")

    def run():
        for L in layers:
            matmul(x, L["qkv"], gemm.get("qkv"))
            o = matmul(a, L["o"], gemm.get("o")) if split is None else skinny_partials(a, L["o"], **vars(split))
            h, _ = add_rms(o, res, L["ln2"], eps)
            m = (gate_up_silu(h, L["gu"], **vars(fused)) if fused is not None
                 else silu_mul(matmul(h, L["gu"], gemm.get("gu"))))
            d = matmul(m, L["d"], gemm.get("d")) if split is None else skinny_partials(m, L["d"], **vars(split))
            add_rms(d, res, L["ln_next"], eps)

    return run


SPLIT_MARGIN = 0.97  # a split launch replaces the unsplit o / down only when the layers' chain takes <= 97% of the time


def tune_split(layers: list[dict[str, torch.Tensor]], M: int, eps: float, gemm: dict) -> SplitLaunch | None:
    """The split-K launch for the o and down projections (their parts reduced in the add + RMSNorm after them) that
    makes the decode step's GEMM chain (`decode_chain` over all layers, one CUDA graph) fastest, or None when no
    launch takes at most SPLIT_MARGIN of the unsplit chain's time. Timed as a chain, not alone: on an H200
    (2026-12-06) split-K o / down launches timed 8% slower than the unsplit ones in graphs of their own 20 calls yet
    made the whole decode step 7% faster."""
    L0 = layers[0]
    N_o, K_o = L0["o"].shape
    N_d, K_d = L0["d"].shape
    key = ("split", torch.cuda.get_device_name(L0["o"].device), L0["o"].dtype, (N_o, K_o, N_d, K_d), M,
           tuple(sorted((k, v) for k, v in gemm.items())), len(layers))
    if key in _TUNED:
        return _TUNED[key]
    log = TIMINGS.setdefault(f"decode GEMM chain, split-K o {(N_o, K_o)} / down {(N_d, K_d)}, M={M}", {})
    log["unsplit"] = graph_us(decode_chain(layers, M, eps, gemm, None), calls=2, replays=5)
    fits = [c for c in SPLIT_CANDIDATES
            if not any(n % c.block_n or k % c.split or (k // c.split) % c.block_k for n, k in ((N_o, K_o), (N_d, K_d)))]
    _TUNED[key] = _fastest(fits, lambda c: graph_us(decode_chain(layers, M, eps, gemm, c), calls=2, replays=5),
                           SPLIT_MARGIN * log["unsplit"], log)
    return _TUNED[key]
