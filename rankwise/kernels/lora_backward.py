"""The adapter's backward in two kernels, one per activation it must read.

    grad_dy:  dB += s dy^T h,   dh += s dy B_f,   colsum += sum_m dy,   dotsum += sum_m dy ⊙ y
    grad_x:   dA += keep_scale dh^T (x ⊙ keep),   dx += keep_scale (dh A) ⊙ keep

dy: (M, N), h / dh: (M, R) fp32, B_f: (N, R) (B diag(e), times DoRA's f), y: (M, N) (DoRA), x / dx: (M, K),
A: (R, K). Sums over the M tokens are split into chunks so that every SM has work even when N or K is small;
chunks meet through fp32 atomic adds into zeroed outputs (so the low bits of dA, dB, dh may differ from run to
run, as with cuBLAS split-K or flash attention's backward). dh needs all N columns before grad_x can use it,
hence two launches: grad_x runs after grad_dy.

dh also reduces over N: grad_dy adds each column block's share atomically (measured on an H100 at Llama-1B
sizes: cheaper than a second pass over dy for N from 512 to 8192). `DH_ATOMIC_MAX_COLUMNS` sets the width
above which the fused Function takes that second pass instead (shrink.lora_shrink). R <= 128 (one rank block).
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

DH_ATOMIC_MAX_COLUMNS = 1 << 30


@triton.jit
def _grad_dy_kernel(
    DY,  # (M, N) output gradient
    H,  # (M, R) fp32 saved h (read when HAS_DB)
    BF,  # (N, R) factor for dh (read when HAS_DH)
    Y,  # (M, N) output (read when HAS_DOT)
    DH,  # (M, R) fp32, zeroed, atomically accumulated (when HAS_DH)
    DB,  # (N, R) fp32, zeroed, atomically accumulated (when HAS_DB)
    CSUM,  # (N,) fp32, zeroed (when HAS_CSUM)
    DSUM,  # (N,) fp32, zeroed (when HAS_DOT)
    M,
    N,
    R,
    rows_per_chunk,  # int, a multiple of BLOCK_M
    stride_dym,
    stride_dyn,
    stride_hm,
    stride_bn,
    stride_br,
    stride_ym,
    stride_yn,
    scale,  # float: s, multiplies dB and dh
    HAS_DH: tl.constexpr,
    HAS_DB: tl.constexpr,
    HAS_CSUM: tl.constexpr,
    HAS_DOT: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_R: tl.constexpr,
    PREC: tl.constexpr,
    INTERPRET: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_c = tl.program_id(1)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rr = tl.arange(0, BLOCK_R)
    n_ok = rn < N
    r_ok = rr < R
    m_start = pid_c * rows_per_chunk
    m_end = tl.minimum(M, m_start + rows_per_chunk)
    if HAS_DH:
        bf = tl.load(BF + rn[:, None] * stride_bn + rr[None, :] * stride_br, mask=n_ok[:, None] & r_ok[None, :],
                     other=0.0).to(DY.dtype.element_ty)  # (BLOCK_N, BLOCK_R)
    acc = tl.zeros((BLOCK_N, BLOCK_R), dtype=tl.float32)
    csum = tl.zeros((BLOCK_N,), dtype=tl.float32)
    dsum = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for m0 in range(m_start, m_end, BLOCK_M):
        rm = m0 + tl.arange(0, BLOCK_M)
        m_ok = rm < m_end
        rows = rm[:, None].to(tl.int64)
        dy = tl.load(DY + rows * stride_dym + rn[None, :] * stride_dyn, mask=m_ok[:, None] & n_ok[None, :], other=0.0)
        if HAS_DB:
            h = tl.load(H + rows * stride_hm + rr[None, :], mask=m_ok[:, None] & r_ok[None, :], other=0.0)
            acc = mma(tl.trans(dy), h.to(dy.dtype), acc, PREC, INTERPRET)
        if HAS_DH:
            part = mma(dy, bf, tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32), PREC, INTERPRET)
            tl.atomic_add(DH + rows * R + rr[None, :], part * scale,
                          mask=m_ok[:, None] & r_ok[None, :], sem="relaxed")
        if HAS_CSUM:
            csum += tl.sum(dy.to(tl.float32), axis=0)
        if HAS_DOT:
            y = tl.load(Y + rows * stride_ym + rn[None, :] * stride_yn, mask=m_ok[:, None] & n_ok[None, :], other=0.0)
            dsum += tl.sum(dy.to(tl.float32) * y.to(tl.float32), axis=0)
    if HAS_DB:
        tl.atomic_add(DB + rn[:, None] * R + rr[None, :], acc * scale, mask=n_ok[:, None] & r_ok[None, :],
                      sem="relaxed")
    if HAS_CSUM:
        tl.atomic_add(CSUM + rn, csum, mask=n_ok, sem="relaxed")
    if HAS_DOT:
        tl.atomic_add(DSUM + rn, dsum, mask=n_ok, sem="relaxed")


@triton.jit
def _grad_x_kernel(
    X,  # (M, K) input (read when HAS_DA)
    DH,  # (M, R) fp32
    A,  # (R, K) factor (read when HAS_DX)
    DX,  # (M, K) input gradient, updated in place (when HAS_DX)
    DA,  # (R, K) fp32, zeroed, atomically accumulated (when HAS_DA)
    SEED,  # (1,) int64 dropout seed (read when HAS_DROPOUT)
    M,
    K,
    R,
    rows_per_chunk,  # int, a multiple of BLOCK_M
    stride_xm,
    stride_xk,
    stride_dhm,
    stride_ar,
    stride_ak,
    stride_dxm,
    stride_dxk,
    keep_scale,  # float: 1 / (1 - p)
    p16,  # int: dropout threshold (dropout.threshold16)
    HAS_DA: tl.constexpr,
    HAS_DX: tl.constexpr,
    HAS_DROPOUT: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr,
    PREC: tl.constexpr,
    INTERPRET: tl.constexpr,
):
    pid_k = tl.program_id(0)
    pid_c = tl.program_id(1)
    kk = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    rr = tl.arange(0, BLOCK_R)
    k_ok = kk < K
    r_ok = rr < R
    m_start = pid_c * rows_per_chunk
    m_end = tl.minimum(M, m_start + rows_per_chunk)
    if HAS_DROPOUT:
        seed = mixed_seed(SEED)
    else:
        seed = 0
    if HAS_DX:
        a = tl.load(A + rr[:, None] * stride_ar + kk[None, :] * stride_ak, mask=r_ok[:, None] & k_ok[None, :],
                    other=0.0).to(DX.dtype.element_ty)  # (BLOCK_R, BLOCK_K)
    acc = tl.zeros((BLOCK_K, BLOCK_R), dtype=tl.float32)
    for m0 in range(m_start, m_end, BLOCK_M):
        rm = m0 + tl.arange(0, BLOCK_M)
        m_ok = rm < m_end
        rows = rm[:, None].to(tl.int64)
        io_mask = m_ok[:, None] & k_ok[None, :]
        dh = tl.load(DH + rows * stride_dhm + rr[None, :], mask=m_ok[:, None] & r_ok[None, :], other=0.0)
        if HAS_DROPOUT:
            keep = keep_tile(seed, m0, pid_k * BLOCK_K, K, p16, BLOCK_M, BLOCK_K)
        if HAS_DA:
            x = tl.load(X + rows * stride_xm + kk[None, :] * stride_xk, mask=io_mask, other=0.0)
            if HAS_DROPOUT:
                x = tl.where(keep, x, 0.0)
            acc = mma(tl.trans(x), dh.to(x.dtype), acc, PREC, INTERPRET)
        if HAS_DX:
            upd = mma(dh.to(a.dtype), a, tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32), PREC, INTERPRET)
            if HAS_DROPOUT:
                upd = tl.where(keep, upd, 0.0)
            dx_ptrs = DX + rows * stride_dxm + kk[None, :] * stride_dxk
            dx = tl.load(dx_ptrs, mask=io_mask, other=0.0).to(tl.float32) + upd * keep_scale
            tl.store(dx_ptrs, dx.to(DX.dtype.element_ty), mask=io_mask)
    if HAS_DA:
        tl.atomic_add(DA + rr[None, :] * K + kk[:, None], acc * keep_scale, mask=k_ok[:, None] & r_ok[None, :],
                      sem="relaxed")


def _chunking(M: int, blocks: int, block_m: int, interp: bool) -> tuple[int, int]:
    """(chunks, rows_per_chunk): about TARGET_PROGRAMS programs over `blocks` column blocks."""
    m_blocks = max(1, cdiv(M, block_m))
    chunks = 2 if interp else TARGET_PROGRAMS // blocks
    chunks = max(1, min(chunks, m_blocks))
    rows_per_chunk = cdiv(m_blocks, chunks) * block_m
    return max(1, cdiv(M, rows_per_chunk)), rows_per_chunk


def launch_grad_dy(dy, h, b_f, scale, dh, db, colsum, y, dotsum, prec, block_m=None, block_n=None, num_warps=4,
                   num_stages=3):
    """lora_grad_dy without the input checks (the fused autograd Functions check once, up front)."""
    M, N = dy.shape
    R = (h if h is not None else b_f).shape[1]
    if M == 0 or N == 0:
        return
    interp = interpreting()
    # Narrow outputs (k/v: N = 512) have few column blocks; smaller row tiles spread dh's atomic adds better.
    block_m = block_m or (16 if interp else (32 if N <= 1024 else 64))
    block_n = block_n or (32 if interp else 128)
    n_blocks = cdiv(N, block_n)
    chunks, rows_per_chunk = _chunking(M, n_blocks, block_m, interp)
    dummy = dy
    _grad_dy_kernel[(n_blocks, chunks)](
        dy, h if h is not None else dummy, b_f if b_f is not None else dummy, y if y is not None else dummy,
        dh if dh is not None else dummy, db if db is not None else dummy, colsum if colsum is not None else dummy,
        dotsum if dotsum is not None else dummy, M, N, R, rows_per_chunk, dy.stride()[0], dy.stride()[1],
        h.stride()[0] if h is not None else 0, b_f.stride()[0] if b_f is not None else 0,
        b_f.stride()[1] if b_f is not None else 0, y.stride()[0] if y is not None else 0,
        y.stride()[1] if y is not None else 0, scale,
        HAS_DH=dh is not None, HAS_DB=db is not None, HAS_CSUM=colsum is not None, HAS_DOT=dotsum is not None,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_R=rank_block(R), PREC=prec, INTERPRET=interp,
        num_warps=num_warps, num_stages=num_stages,
    )


def lora_grad_dy(
    dy: torch.Tensor,
    h: torch.Tensor | None,
    b_f: torch.Tensor | None,
    *,
    scale: float,
    dh: torch.Tensor | None = None,
    db: torch.Tensor | None = None,
    colsum: torch.Tensor | None = None,
    y: torch.Tensor | None = None,
    dotsum: torch.Tensor | None = None,
    block_m: int | None = None,
    block_n: int | None = None,
    num_warps: int = 4,
    num_stages: int = 3,
) -> None:
    """Accumulate into the zeroed fp32 outputs that are given: dh (M, R) += s dy b_f, db (N, R) += s dy^T h,
    colsum (N,) += sum of dy, dotsum (N,) += sum of dy ⊙ y.  dy: (M, N), h: (M, R) fp32, b_f: (N, R)."""
    check_2d("dy", dy)
    M, N = dy.shape
    R = (h if h is not None else b_f).shape[1]
    if R > 128:
        raise ValueError(f"lora_grad_dy handles ranks up to 128, got {R}; use shrink / reduce.")
    for name, t, shape in (("h", h, (M, R)), ("b_f", b_f, (N, R)), ("dh", dh, (M, R)), ("db", db, (N, R)),
                           ("colsum", colsum, (N,)), ("y", y, (M, N)), ("dotsum", dotsum, (N,))):
        if t is not None and tuple(t.shape) != shape:
            raise ValueError(f"{name} has shape {tuple(t.shape)}, expected {shape}.")
    for name, t in (("dh", dh), ("db", db), ("colsum", colsum), ("dotsum", dotsum)):
        if t is not None and (t.dtype != torch.float32 or not t.is_contiguous()):
            raise ValueError(f"{name} must be a contiguous fp32 tensor (zeroed), got {t.dtype}.")
    if (db is None) != (h is None) or (dh is None) != (b_f is None) or (dotsum is None) != (y is None):
        raise ValueError("Give h with db, b_f with dh, and y with dotsum.")
    check_same_device(dy=dy, h=h, b_f=b_f, dh=dh, db=db, colsum=colsum, y=y, dotsum=dotsum)
    launch_grad_dy(dy, h, b_f, float(scale), dh, db, colsum, y, dotsum, dot_precision(dy.dtype), block_m, block_n,
                   num_warps, num_stages)


def launch_grad_x(x, dh, a, dx, da, seed, p, prec, block_m=None, block_k=None, num_warps=4, num_stages=3):
    """lora_grad_x_ without the input checks (the fused autograd Functions check once, up front)."""
    (M, R), K = dh.shape, a.shape[1]
    if M == 0 or K == 0 or (dx is None and da is None):
        return
    interp = interpreting()
    block_m = block_m or (16 if interp else 64)
    block_k = block_k or (32 if interp else 128)
    k_blocks = cdiv(K, block_k)
    chunks, rows_per_chunk = _chunking(M, k_blocks, block_m, interp)
    act = dx if dx is not None else x
    xx = x if x is not None else act
    _grad_x_kernel[(k_blocks, chunks)](
        xx, dh, a, act, da if da is not None else dh, seed if p > 0 else dh, M, K, R, rows_per_chunk,
        xx.stride()[0], xx.stride()[1], dh.stride()[0], a.stride()[0], a.stride()[1], act.stride()[0], act.stride()[1],
        1.0 / (1.0 - p), threshold16(p),
        HAS_DA=da is not None, HAS_DX=dx is not None, HAS_DROPOUT=p > 0,
        BLOCK_M=block_m, BLOCK_K=block_k, BLOCK_R=rank_block(R), PREC=prec, INTERPRET=interp,
        num_warps=num_warps, num_stages=num_stages,
    )


def lora_grad_x_(
    x: torch.Tensor | None,
    dh: torch.Tensor,
    a: torch.Tensor,
    *,
    dx: torch.Tensor | None = None,
    da: torch.Tensor | None = None,
    seed: torch.Tensor | None = None,
    p: float = 0.0,
    block_m: int | None = None,
    block_k: int | None = None,
    num_warps: int = 4,
    num_stages: int = 3,
) -> None:
    """dx (M, K) += ((dh a) ⊙ keep) / (1 - p) in place and da (R, K) += dh^T (x ⊙ keep) / (1 - p) into a zeroed
    fp32 tensor; either may be None.  x: (M, K), dh: (M, R) fp32, a: (R, K)."""
    check_2d("dh", dh)
    check_2d("a", a)
    (M, R), K = dh.shape, a.shape[1]
    if a.shape[0] != R or R > 128:
        raise ValueError(f"a has shape {tuple(a.shape)}; need ({R}, K) with R <= 128.")
    if da is not None and (x is None or tuple(x.shape) != (M, K) or tuple(da.shape) != (R, K)
                           or da.dtype != torch.float32 or not da.is_contiguous()):
        raise ValueError(f"da needs x of shape ({M}, {K}) and a contiguous fp32 da of shape ({R}, {K}).")
    if dx is not None and tuple(dx.shape) != (M, K):
        raise ValueError(f"dx has shape {tuple(dx.shape)}, expected ({M}, {K}).")
    check_same_device(x=x, dh=dh, a=a, dx=dx, da=da, seed=seed)
    check_seed(seed, p, dh.device)
    act = dx if dx is not None else x
    launch_grad_x(x, dh, a, dx, da, seed, p, dot_precision(act.dtype if act is not None else dh.dtype), block_m,
                  block_k, num_warps, num_stages)
