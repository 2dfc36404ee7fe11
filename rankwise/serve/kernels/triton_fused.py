"""Fused elementwise kernels of the decoder layer (GPU path), so that a decode step is ~10 kernels per layer.

Specification: the PyTorch code they replace in `rankwise/serve/model.py` (`_rms`, `_rotate_half` + KVCache.write,
act * up), which follows transformers' Llama. Each kernel rounds to the model dtype where PyTorch's eager ops
round (every elementwise op computes in float32 and rounds its result), so bf16 outputs match eager PyTorch:

    add_rms:   r = x + res ;  h = w * (r * rsqrt(mean(r^2) + eps))            (HF: residual add, then RMSNorm)
               x may come as float32 split-K parts (S, T, N) of the GEMM before: x = round(sum_s parts[s])
    rope_kv:   q' = q cos + rot(q) sin,  k' likewise,  rot(x) = [-x2, x1];  cache[slot] <- (k', v)
    silu_mul:  a = silu(g) * u
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from rankwise.serve.kernels import l2_prefetch, pdl
from rankwise.serve.kernels.l2_prefetch import prefetch_l2


@triton.jit
def _add_rms_kernel(
    x_ptr,        # (T, N); with PARTS > 0, (PARTS, T, N) float32 split-K parts of x
    res_ptr,      # (T, N) residual, read when HAS_RES
    w_ptr,        # (N,)
    out_ptr,      # (T, N) normalised
    rout_ptr,     # (T, N) x + res, written when HAS_RES
    pf_ptr,       # with PREFETCH: the next GEMM's weights, pf_bytes of them brought into L2 (l2_prefetch.py)
    pf_bytes,
    N, eps, stride_x, stride_res, stride_out, stride_rout, stride_parts,
    HAS_RES: tl.constexpr, BLOCK: tl.constexpr, PARTS: tl.constexpr, PDL: tl.constexpr, PREFETCH: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    if PREFETCH:  # weights are constant: before the wait, while the kernel before still runs
        prefetch_l2(pf_ptr, pf_bytes, tl.program_id(0), tl.num_programs(0), l2_prefetch.THREADS)
    offs = tl.arange(0, BLOCK)
    mask = offs < N
    w = tl.load(w_ptr + offs, mask=mask, other=0.0)
    if PDL:  # x and res come from the kernels before (pdl.py)
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    dt = out_ptr.dtype.element_ty
    x = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0)
    if PARTS > 0:  # the GEMM's split-K reduce, then its rounding to the model dtype
        for s in tl.static_range(1, PARTS):
            x += tl.load(x_ptr + s * stride_parts + row * stride_x + offs, mask=mask, other=0.0)
        x = x.to(dt)
    if HAS_RES:
        r = tl.load(res_ptr + row * stride_res + offs, mask=mask, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(dt)
        tl.store(rout_ptr + row * stride_rout + offs, x, mask=mask)
    xf = x.to(tl.float32)
    var = tl.sum(xf * xf, axis=0) / N
    h = (xf * tl.rsqrt(var + eps)).to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + row * stride_out + offs, (w.to(tl.float32) * h.to(tl.float32)).to(out_ptr.dtype.element_ty),
             mask=mask)


def add_rms(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float,
            prefetch: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(rms(x + residual) * weight, x + residual); x, residual: (T, N); weight: (N,). Without a residual: (rms(x)
    * weight, x). x may also be the float32 split-K parts (S, T, N) of a GEMM (`triton_gemm.skinny_partials`,
    with a residual): x is then their sum rounded to the residual's dtype. prefetch: a weight the next kernel reads,
    brought into L2 meanwhile when `l2_prefetch` is on."""
    parts = x.dim() == 3
    if parts and (residual is None or x.dtype != torch.float32 or x.stride(0) != x.shape[1] * x.stride(1)):
        raise ValueError(f"split-K parts x (S, T, N) must be contiguous float32 and come with a residual; got "
                         f"{tuple(x.shape)} {x.dtype}, residual {None if residual is None else tuple(residual.shape)}.")
    rows = x[0] if parts else x
    if rows.dim() != 2 or rows.stride(1) != 1 or weight.shape != (rows.shape[1],):
        raise ValueError(f"x must be (T, N) with contiguous rows and weight (N,); got {tuple(x.shape)}, "
                         f"{tuple(weight.shape)}.")
    if residual is not None and (residual.shape != rows.shape or (not parts and residual.dtype != x.dtype)
                                 or residual.stride(1) != 1):
        raise ValueError(f"residual must match x {tuple(rows.shape)} {x.dtype}, got {tuple(residual.shape)} "
                         f"{residual.dtype}.")
    like = residual if parts else x
    out = torch.empty_like(like)
    rout = torch.empty_like(like) if residual is not None else x
    if rows.shape[0]:
        pf = l2_prefetch.launch_args(prefetch, like)
        _add_rms_kernel[(rows.shape[0],)](
            x, residual if residual is not None else x, weight, out, rout, pf["pf_ptr"], pf["pf_bytes"],
            rows.shape[1], eps, rows.stride(0), residual.stride(0) if residual is not None else 0, out.stride(0),
            rout.stride(0), x.stride(0) if parts else 0, HAS_RES=residual is not None,
            BLOCK=triton.next_power_of_2(rows.shape[1]), PARTS=x.shape[0] if parts else 0, PREFETCH=pf["PREFETCH"],
            **pdl.launch_options(like))
    return out, rout


@triton.jit
def rope_rows(x, x_rot, sign, cos, sin, DT: tl.constexpr):
    """x cos + rot(x) sin, rounded to DT after each product and the sum as eager PyTorch rounds. x, x_rot: (.., D)
    loaded at d and at (d + D/2) mod D; sign: (D,) -1 for the first half; cos, sin: (1, D) float32."""
    xr = (x_rot.to(tl.float32) * sign[None, :]).to(DT)
    return ((x.to(tl.float32) * cos).to(DT).to(tl.float32) + (xr.to(tl.float32) * sin).to(DT).to(tl.float32)).to(DT)


@triton.jit
def _rope_kv_kernel(
    qkv_ptr,      # (T, (H + 2 H_kv) D)
    cos_ptr,      # (max_pos, D)
    sin_ptr,      # (max_pos, D)
    pos_ptr,      # (T,) int64
    slot_ptr,     # (T,) int64 flat cache slot
    q_ptr,        # (T, H, D) out
    k_ptr,        # (T, H_kv, D) out
    kc_ptr,       # (num_slots, H_kv, D) cache
    vc_ptr,       # (num_slots, H_kv, D) cache
    stride_qkv, stride_cos,
    H: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr, BLOCK_H: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    pos = tl.load(pos_ptr + t)
    slot = tl.load(slot_ptr + t)
    half: tl.constexpr = D // 2
    offs_d = tl.arange(0, D)
    rot_d = tl.where(offs_d < half, offs_d + half, offs_d - half)
    sign = tl.where(offs_d < half, -1.0, 1.0)
    cos = tl.load(cos_ptr + pos * stride_cos + offs_d).to(tl.float32)[None, :]
    sin = tl.load(sin_ptr + pos * stride_cos + offs_d).to(tl.float32)[None, :]
    offs_h = tl.arange(0, BLOCK_H)
    dt = q_ptr.dtype.element_ty
    row = qkv_ptr + t * stride_qkv
    # queries: heads [0, H)
    mq = offs_h[:, None] < H
    x = tl.load(row + offs_h[:, None] * D + offs_d[None, :], mask=mq, other=0.0)
    xr = tl.load(row + offs_h[:, None] * D + rot_d[None, :], mask=mq, other=0.0)
    q = rope_rows(x, xr, sign, cos, sin, dt)
    tl.store(q_ptr + t * H * D + offs_h[:, None] * D + offs_d[None, :], q, mask=mq)
    # keys: heads [H, H + H_kv), rotated; values: [H + H_kv, H + 2 H_kv), copied
    mk = offs_h[:, None] < HKV
    x = tl.load(row + (H + offs_h[:, None]) * D + offs_d[None, :], mask=mk, other=0.0)
    xr = tl.load(row + (H + offs_h[:, None]) * D + rot_d[None, :], mask=mk, other=0.0)
    k = rope_rows(x, xr, sign, cos, sin, dt)
    tl.store(k_ptr + t * HKV * D + offs_h[:, None] * D + offs_d[None, :], k, mask=mk)
    tl.store(kc_ptr + slot * HKV * D + offs_h[:, None] * D + offs_d[None, :], k, mask=mk)
    v = tl.load(row + (H + HKV + offs_h[:, None]) * D + offs_d[None, :], mask=mk, other=0.0)
    tl.store(vc_ptr + slot * HKV * D + offs_h[:, None] * D + offs_d[None, :], v, mask=mk)


def rope_kv(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor,
            slot_mapping: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, num_heads: int
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary embedding of q and k from the fused qkv (T, (H + 2 H_kv) D); stores k', v into the caches
    (num_blocks, block_size, H_kv, D) at `slot_mapping`; returns q' (T, H, D) and k' (T, H_kv, D)."""
    T = qkv.shape[0]
    H_kv, D = k_cache.shape[2], k_cache.shape[3]
    if qkv.shape[1] != (num_heads + 2 * H_kv) * D or qkv.stride(1) != 1:
        raise ValueError(f"qkv {tuple(qkv.shape)} does not hold {num_heads} + 2 x {H_kv} heads of {D} contiguously.")
    if D & (D - 1) or not (k_cache.is_contiguous() and v_cache.is_contiguous()) or cos.stride() != sin.stride():
        raise ValueError(f"head_dim={D} must be a power of two and the caches and cos/sin tables contiguous.")
    if positions.dtype != torch.int64 or slot_mapping.dtype != torch.int64:
        raise ValueError(f"positions and slot_mapping must be int64, got {positions.dtype}, {slot_mapping.dtype}.")
    q = torch.empty((T, num_heads, D), dtype=qkv.dtype, device=qkv.device)
    k = torch.empty((T, H_kv, D), dtype=qkv.dtype, device=qkv.device)
    if T:
        _rope_kv_kernel[(T,)](qkv, cos, sin, positions, slot_mapping, q, k, k_cache, v_cache, qkv.stride(0),
                              cos.stride(0), H=num_heads, HKV=H_kv, D=D,
                              BLOCK_H=triton.next_power_of_2(max(num_heads, H_kv)))
    return q, k


@triton.jit
def _silu_mul_kernel(gu_ptr, out_ptr, I, stride_gu, stride_out, BLOCK: tl.constexpr, PDL: tl.constexpr):
    # gu: (T, 2 I) = [gate | up];  out: (T, I)
    if PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    t = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < I
    g = tl.load(gu_ptr + t * stride_gu + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(gu_ptr + t * stride_gu + I + offs, mask=mask, other=0.0).to(tl.float32)
    dt = out_ptr.dtype.element_ty
    s = (g / (1.0 + tl.exp(-g))).to(dt)
    tl.store(out_ptr + t * stride_out + offs, (s.to(tl.float32) * u).to(dt), mask=mask)


def silu_mul(gu: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for gu = [gate | up] (T, 2 I) -> (T, I)."""
    if gu.dim() != 2 or gu.shape[1] % 2 or gu.stride(1) != 1:
        raise ValueError(f"gu must be (T, 2 I) with contiguous rows, got {tuple(gu.shape)}.")
    T, I = gu.shape[0], gu.shape[1] // 2
    out = torch.empty((T, I), dtype=gu.dtype, device=gu.device)
    if T:
        BLOCK = min(1024, triton.next_power_of_2(I))
        _silu_mul_kernel[(T, triton.cdiv(I, BLOCK))](gu, out, I, gu.stride(0), out.stride(0), BLOCK=BLOCK,
                                                     **pdl.launch_options(gu))
    return out
