"""Triton paged decode attention: one query token per sequence against its KV cache blocks.

Specification: `paged_decode_attention_ref` in `reference.py`. One program per (sequence, KV head) handles the
GROUP query heads that share that KV head (grouped-query attention), reads keys and values straight from the
cache blocks named by the block table (no gather copy), BLOCK_N tokens at a time (128 for head_dim <= 64), with an online softmax
(Milakov & Gimelshein 2018; the FlashAttention recurrence):

    m' = max(m, max_j s_j);  l' = l e^{m - m'} + sum_j e^{s_j - m'};  acc' = acc e^{m - m'} + sum_j e^{s_j - m'} v_j

and writes acc / l. The loop bound is the row's context length read on the device, so a CUDA graph captured
once replays for any lengths; a row of length 0 writes zeros.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

# Triton's CPU interpreter (TRITON_INTERPRET=1, used by the CI parity tests) multiplies bf16 tiles wrongly in
# tl.dot; there the operands are widened to float32 first (exact: bf16 values are exact in fp32).
UPCAST = os.environ.get("TRITON_INTERPRET", "0") == "1"


@triton.jit
def _mm(a, b, IEEE: tl.constexpr, UP: tl.constexpr):
    """a @ b with float32 accumulation; IEEE: full fp32 precision (fp32 inputs), UP: widen to fp32 first."""
    if UP:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    if IEEE:
        c = tl.dot(a, b, input_precision="ieee")
    else:
        c = tl.dot(a, b)
    return c


@triton.jit
def _paged_decode_kernel(
    q_ptr,        # (B, H, D)
    k_ptr,        # (num_blocks, block_size, H_kv, D)
    v_ptr,        # (num_blocks, block_size, H_kv, D)
    bt_ptr,       # (B, max_blocks) int32 block table
    ctx_ptr,      # (B,) int32 context lengths
    o_ptr,        # (B, H, D)
    scale,
    stride_qb, stride_qh, stride_kb, stride_kt, stride_kh, stride_btb, stride_ob, stride_oh,
    GROUP: tl.constexpr, BLOCK_G: tl.constexpr, D: tl.constexpr, BS: tl.constexpr, BLOCK_N: tl.constexpr,
    IEEE: tl.constexpr, UP: tl.constexpr,
):
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    n_ctx = tl.load(ctx_ptr + b)
    offs_g = tl.arange(0, BLOCK_G)
    mask_g = offs_g < GROUP
    heads = kvh * GROUP + offs_g
    offs_d = tl.arange(0, D)
    q = tl.load(q_ptr + b * stride_qb + heads[:, None] * stride_qh + offs_d[None, :],
                mask=mask_g[:, None], other=0.0)                                                # (BLOCK_G, D)
    m = tl.full((BLOCK_G,), float("-inf"), dtype=tl.float32)
    l = tl.zeros((BLOCK_G,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_G, D), dtype=tl.float32)
    for n0 in range(0, n_ctx, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mask_n = offs_n < n_ctx
        blk = tl.load(bt_ptr + b * stride_btb + offs_n // BS, mask=mask_n, other=0).to(tl.int64)
        kv_off = blk * stride_kb + (offs_n % BS) * stride_kt + kvh * stride_kh                     # (BLOCK_N,)
        k = tl.load(k_ptr + kv_off[:, None] + offs_d[None, :], mask=mask_n[:, None], other=0.0)  # (BLOCK_N, D)
        s = _mm(q, tl.trans(k), IEEE, UP) * scale                                           # (BLOCK_G, BLOCK_N)
        s = tl.where(mask_n[None, :], s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, 1))
        alpha = tl.exp(m - m_new)
        p = tl.exp(s - m_new[:, None])
        l = l * alpha + tl.sum(p, 1)
        v = tl.load(v_ptr + kv_off[:, None] + offs_d[None, :], mask=mask_n[:, None], other=0.0)  # (BLOCK_N, D)
        acc = acc * alpha[:, None] + _mm(p.to(v.dtype), v, IEEE, UP)
        m = m_new
    l = tl.where(l > 0, l, 1.0)
    out = acc / l[:, None]
    tl.store(o_ptr + b * stride_ob + heads[:, None] * stride_oh + offs_d[None, :],
             out.to(o_ptr.dtype.element_ty), mask=mask_g[:, None])


def paged_decode_attention(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
    context_lens: torch.Tensor, scale: float, out: torch.Tensor | None = None,
) -> torch.Tensor:
    """q: (B, H, D); k_cache, v_cache: (num_blocks, block_size, H_kv, D); block_tables: (B, max_blocks) int32;
    context_lens: (B,) int32 -> (B, H, D). See `paged_decode_attention_ref`."""
    if q.dim() != 3 or k_cache.dim() != 4 or k_cache.shape != v_cache.shape:
        raise ValueError(f"q must be (B, H, D) and the caches (num_blocks, block_size, H_kv, D) alike; got "
                         f"{tuple(q.shape)}, {tuple(k_cache.shape)}, {tuple(v_cache.shape)}.")
    B, H, D = q.shape
    _, BS, H_kv, Dk = k_cache.shape
    if Dk != D or H % H_kv:
        raise ValueError(f"head_dim {D} vs cache {Dk}, heads {H} vs kv heads {H_kv}: heads must be a multiple of "
                         "kv heads and head dims equal.")
    if D & (D - 1) or D < 16:
        raise ValueError(f"head_dim={D}: the Triton kernel needs a power of two >= 16; use attention_backend="
                         "'reference' for this model.")
    if block_tables.dtype != torch.int32 or context_lens.dtype != torch.int32:
        raise ValueError(f"block_tables and context_lens must be int32, got {block_tables.dtype}, "
                         f"{context_lens.dtype}.")
    if block_tables.shape[0] != B or context_lens.shape != (B,):
        raise ValueError(f"block_tables {tuple(block_tables.shape)} and context_lens {tuple(context_lens.shape)} "
                         f"must have B={B} rows.")
    if k_cache.stride() != v_cache.stride():
        raise ValueError(f"k_cache and v_cache must share strides, got {k_cache.stride()} and {v_cache.stride()}.")
    if k_cache.stride(3) != 1 or q.stride(2) != 1 or block_tables.stride(1) != 1:
        raise ValueError("q, the caches and block_tables need a contiguous last dimension.")
    if out is None:
        out = torch.empty_like(q)
    group = H // H_kv
    grid = (B, H_kv)
    _paged_decode_kernel[grid](
        q, k_cache, v_cache, block_tables, context_lens, out, scale,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), block_tables.stride(0),
        out.stride(0), out.stride(1),
        GROUP=group, BLOCK_G=max(16, triton.next_power_of_2(group)), D=D, BS=BS, BLOCK_N=128 if D <= 64 else 64,
        IEEE=q.dtype == torch.float32, UP=UPCAST,
    )
    return out
