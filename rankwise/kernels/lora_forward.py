"""The adapter's forward in one kernel: one program per block of rows (tokens).

    h = keep_scale * (x ⊙ keep) @ A^T                         x: (M, K), A: (R, K)  ->  h: (M, R) fp32, stored
    y <- ((y + s (h @ B^T + b_lora)) * f) + post_bias         y: (M, N) in place, B: (N, R), vectors (N,)

A program first reduces its rows of x over K into h (kept in registers, also written for the backward), then
walks across N adding the rank-R product to its rows of y. Nothing depends on another program, so shrink and
expand need one launch instead of two and h never makes a round trip. R <= 128 (one rank block);
rankwise.kernels.shrink / expand cover larger ranks.
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

MAX_RANK = 128


@triton.jit
def _lora_forward_kernel(
    X,  # (M, K) activations
    A,  # (R, K) factor
    B,  # (N, R) factor (diag(e) folded in)
    H,  # (M, R) fp32 output: keep_scale * dropout(x) A^T
    Y,  # (M, N) base output, updated in place
    LB,  # (N,) LoRA bias (read when HAS_LB)
    F,  # (N,) DoRA factor (read when HAS_F)
    POST,  # (N,) added last, the base bias under DoRA (read when HAS_POST)
    SEED,  # (1,) int64 dropout seed (read when HAS_DROPOUT)
    M,
    K,
    N,
    R,
    stride_xm,
    stride_xk,
    stride_ar,
    stride_ak,
    stride_bn,
    stride_br,
    stride_hm,
    stride_ym,
    stride_yn,
    scale,  # float: s
    keep_scale,  # float: 1 / (1 - p)
    p16,  # int: dropout threshold (dropout.threshold16)
    HAS_LB: tl.constexpr,
    HAS_F: tl.constexpr,
    HAS_POST: tl.constexpr,
    HAS_DROPOUT: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_R: tl.constexpr,
    PREC: tl.constexpr,
    INTERPRET: tl.constexpr,
):
    pid = tl.program_id(0)
    rm = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    rr = tl.arange(0, BLOCK_R)
    m_ok = rm < M
    r_ok = rr < R
    rows = rm[:, None].to(tl.int64)
    if HAS_DROPOUT:
        seed = mixed_seed(SEED)
    else:
        seed = 0
    # h = dropout(x) A^T over K
    h = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    rk = tl.arange(0, BLOCK_K)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + rk
        x = tl.load(X + rows * stride_xm + kk[None, :] * stride_xk, mask=m_ok[:, None] & (kk[None, :] < K), other=0.0)
        if HAS_DROPOUT:
            x = tl.where(keep_tile(seed, pid * BLOCK_M, k0, K, p16, BLOCK_M, BLOCK_K), x, 0.0)
        a = tl.load(A + rr[None, :] * stride_ar + kk[:, None] * stride_ak, mask=r_ok[None, :] & (kk[:, None] < K),
                    other=0.0)  # (BLOCK_K, BLOCK_R)
        h = mma(x, a.to(x.dtype), h, PREC, INTERPRET)
    h = h * keep_scale
    tl.store(H + rows * stride_hm + rr[None, :], h, mask=m_ok[:, None] & r_ok[None, :])
    # y += s (h B^T + b), then DoRA's factor and bias
    h_act = h.to(Y.dtype.element_ty)
    rn0 = tl.arange(0, BLOCK_N)
    for n0 in range(0, N, BLOCK_N):
        rn = n0 + rn0
        n_ok = rn < N
        b = tl.load(B + rn[None, :] * stride_bn + rr[:, None] * stride_br, mask=n_ok[None, :] & r_ok[:, None],
                    other=0.0)  # (BLOCK_R, BLOCK_N)
        acc = mma(h_act, b.to(h_act.dtype), tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32), PREC, INTERPRET)
        if HAS_LB:
            acc += tl.load(LB + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        y_ptrs = Y + rows * stride_ym + rn[None, :] * stride_yn
        io_mask = m_ok[:, None] & n_ok[None, :]
        out = tl.load(y_ptrs, mask=io_mask, other=0.0).to(tl.float32) + acc * scale
        if HAS_F:
            out = out * tl.load(F + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        if HAS_POST:
            out += tl.load(POST + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        tl.store(y_ptrs, out.to(Y.dtype.element_ty), mask=io_mask)


def launch_forward(x, a, b, y, scale, lora_bias, f, post_bias, seed, p, prec, block_m=None, num_warps=4,
                   num_stages=3):
    """lora_forward_ without the input checks (the fused autograd Functions check once, up front)."""
    M, K = x.shape
    N, R = b.shape
    h = torch.empty(M, R, dtype=torch.float32, device=x.device)
    if M == 0:
        return h
    interp = interpreting()
    # 16-row programs stream best without dropout (H100/H200, Llama-1B shapes); the dropout mask's (rows, 128)
    # tiles are cheaper to build at 32 rows.
    block_m = block_m or (16 if interp or p == 0 else 32)
    dummy = h  # never read: the matching HAS_* flag is False
    _lora_forward_kernel[(cdiv(M, block_m),)](
        x, a, b, h, y, lora_bias if lora_bias is not None else dummy, f if f is not None else dummy,
        post_bias if post_bias is not None else dummy, seed if p > 0 else dummy, M, K, N, R,
        x.stride()[0], x.stride()[1], a.stride()[0], a.stride()[1], b.stride()[0], b.stride()[1], h.stride()[0],
        y.stride()[0], y.stride()[1], scale, 1.0 / (1.0 - p), threshold16(p),
        HAS_LB=lora_bias is not None, HAS_F=f is not None, HAS_POST=post_bias is not None, HAS_DROPOUT=p > 0,
        BLOCK_M=block_m, BLOCK_K=32 if interp else 128, BLOCK_N=32 if interp else 128, BLOCK_R=rank_block(R),
        PREC=prec, INTERPRET=interp, num_warps=num_warps, num_stages=num_stages,
    )
    return h


def lora_forward_(
    x: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    y: torch.Tensor,
    *,
    scale: float,
    lora_bias: torch.Tensor | None = None,
    f: torch.Tensor | None = None,
    post_bias: torch.Tensor | None = None,
    seed: torch.Tensor | None = None,
    p: float = 0.0,
    block_m: int | None = None,
    num_warps: int = 4,
    num_stages: int = 3,
) -> torch.Tensor:
    """Update y (M, N) in place as in the module docstring; returns h (M, R) fp32 = dropout(x) A^T.

    x: (M, K) with y's dtype, a: (R, K), b: (N, R), lora_bias / f / post_bias: (N,), R <= 128."""
    check_2d("x", x)
    check_2d("y", y, rows=x.shape[0])
    K, N = x.shape[1], y.shape[1]
    check_2d("a", a, cols=K)
    R = a.shape[0]
    check_2d("b", b, rows=N, cols=R)
    if R > MAX_RANK:
        raise ValueError(f"lora_forward_ handles ranks up to {MAX_RANK}, got {R}; use shrink.lora_shrink + "
                         "expand.lora_expand_.")
    if x.dtype != y.dtype:
        raise ValueError(f"x is {x.dtype} but y is {y.dtype}; they must match.")
    for name, v in (("lora_bias", lora_bias), ("f", f), ("post_bias", post_bias)):
        if v is not None and (v.dim() != 1 or v.shape[0] != N):
            raise ValueError(f"{name} must have shape ({N},), got {tuple(v.shape)}.")
    check_same_device(x=x, a=a, b=b, y=y, lora_bias=lora_bias, f=f, post_bias=post_bias, seed=seed)
    check_seed(seed, p, x.device)
    return launch_forward(x, a, b, y, float(scale), lora_bias, f, post_bias, seed, p, dot_precision(x.dtype),
                          block_m, num_warps, num_stages)
