"""Triton attention of the serving engine: paged decode (one query token per sequence) and varlen causal prefill.

Specifications: `paged_decode_attention_ref` and `prefill_attention_ref` in `reference.py`. Both use an online
softmax (Milakov & Gimelshein 2018; the FlashAttention recurrence) over BLOCK_N keys at a time:

    m' = max(m, max_j s_j);  l' = l e^{m - m'} + sum_j e^{s_j - m'};  acc' = acc e^{m - m'} + sum_j e^{s_j - m'} v_j

and write acc / l.

Decode: one program per (sequence, KV head) handles the GROUP query heads that share that KV head (grouped-query
attention) and reads keys and values straight from the cache blocks named by the block table (no gather copy).
The loop bound is the row's context length read on the device, so a CUDA graph captured once replays for any
lengths; a row of length 0 writes zeros. With `paged_decode_attention_rope` the same program also does the
step's rotary embedding and cache write (`rope_kv`'s work) from the fused qkv row: it rotates the group's queries
and its KV head's new key, stores the key and value in the cache, attends over the cached tokens before it and
adds the new token from registers, so a decode layer has no separate rotary kernel and never reads back what it
just wrote. With `DECODE_LAUNCH["splits"] = S > 1` (split-context, "flash-decoding") each (sequence, KV head) is
S programs over equal runs of whole tiles that write their (acc, m, l) partials, and `_decode_combine_kernel`
merges them: out = sum_s e^{m_s - M} acc_s / sum_s e^{m_s - M} l_s, M = max_s m_s (no gain at batch 32 and
context 192, docs/BENCHMARKS.md; for few rows with long contexts).

Prefill: the step's prompts lie back to back; token t attends to tokens [seq_start[t], t]. One program per
(BLOCK_M queries, head) walks the keys from the first prompt start in its block up to its last query, masking per
element, so any mix of prompt lengths is one launch whose shape depends on the token count only (a CUDA graph
per padded size).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from rankwise.serve.kernels import l2_prefetch, pdl
from rankwise.serve.kernels.l2_prefetch import prefetch_l2
from rankwise.serve.kernels.triton_fused import rope_rows

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
def _kv_tile(k_ptr, v_ptr, bt_ptr, b, kvh, n0, hi, offs_d, stride_btb, stride_kb, stride_kt, stride_kh,
             BS: tl.constexpr, BLOCK_N: tl.constexpr):
    """Keys and values n0 .. n0 + BLOCK_N of row b's cache (zeros from hi on), through its block table."""
    offs_n = n0 + tl.arange(0, BLOCK_N)
    mask_n = offs_n < hi
    blk = tl.load(bt_ptr + b * stride_btb + offs_n // BS, mask=mask_n, other=0).to(tl.int64)
    kv_off = blk * stride_kb + (offs_n % BS) * stride_kt + kvh * stride_kh                         # (BLOCK_N,)
    k = tl.load(k_ptr + kv_off[:, None] + offs_d[None, :], mask=mask_n[:, None], other=0.0)      # (BLOCK_N, D)
    v = tl.load(v_ptr + kv_off[:, None] + offs_d[None, :], mask=mask_n[:, None], other=0.0)      # (BLOCK_N, D)
    return k, v, mask_n


@triton.jit
def _paged_decode_kernel(
    q_ptr,        # (B, H, D) queries; with ROPE the fused (B, (H + 2 H_kv) D) qkv rows before rotary
    k_ptr,        # (num_blocks, block_size, H_kv, D)
    v_ptr,        # (num_blocks, block_size, H_kv, D)
    bt_ptr,       # (B, max_blocks) int32 block table
    ctx_ptr,      # (B,) int32 context lengths; with ROPE (B,) bool: the row is active
    o_ptr,        # (B, H, D)
    cos_ptr,      # (max_pos, D) with ROPE
    sin_ptr,      # (max_pos, D) with ROPE
    pos_ptr,      # (B,) int64 with ROPE: position of the new token
    part_ptr,     # with SPLITS > 1: (B, H, SPLITS, D + 2) float32 partials [acc (unnormalised), m, l]
    pf_ptr,       # with PREFETCH: the next GEMM's weights, pf_bytes of them brought into L2 (l2_prefetch.py)
    pf_bytes,
    scale,
    stride_qb, stride_qh, stride_kb, stride_kt, stride_kh, stride_btb, stride_ob, stride_oh, stride_cos,
    H: tl.constexpr, HKV: tl.constexpr, GROUP: tl.constexpr, BLOCK_G: tl.constexpr, D: tl.constexpr,
    BS: tl.constexpr, BLOCK_N: tl.constexpr, SPLITS: tl.constexpr, ROPE: tl.constexpr, IEEE: tl.constexpr,
    UP: tl.constexpr, PDL: tl.constexpr, PREFETCH: tl.constexpr,
):
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    if PREFETCH:  # weights are constant: no wait needed; the copy engine fetches while this kernel waits on memory
        prefetch_l2(pf_ptr, pf_bytes, (b * HKV + kvh) * SPLITS + split, tl.num_programs(0) * HKV * SPLITS,
                    l2_prefetch.THREADS)
    offs_g = tl.arange(0, BLOCK_G)
    mask_g = offs_g < GROUP
    heads = kvh * GROUP + offs_g
    offs_d = tl.arange(0, D)
    if ROPE:
        dt = o_ptr.dtype.element_ty
        half: tl.constexpr = D // 2
        rot_d = tl.where(offs_d < half, offs_d + half, offs_d - half)
        sign = tl.where(offs_d < half, -1.0, 1.0)
        pos = tl.load(pos_ptr + b)
        # the row's context and the slot of its new token, from the block table (an idle row: the scratch block 0)
        active = tl.load(ctx_ptr + b) != 0
        n_ctx = tl.where(active, pos + 1, 0).to(tl.int32)
        new_blk = tl.load(bt_ptr + b * stride_btb + pos // BS).to(tl.int64)
        c_off = tl.where(active, new_blk, 0) * stride_kb + (pos % BS) * stride_kt + kvh * stride_kh
        cos = tl.load(cos_ptr + pos * stride_cos + offs_d).to(tl.float32)[None, :]
        sin = tl.load(sin_ptr + pos * stride_cos + offs_d).to(tl.float32)[None, :]
        n_cached = n_ctx - 1  # the new token is the row's last; it is added from registers below
        lo, hi = _split_range(n_cached, split, SPLITS, BLOCK_N)
        # the split's first BLOCK_N cached keys and values were written by earlier steps, never by this one (its new
        # key goes to position pos, past them): with PDL they load while the kernel before this one finishes
        k0, v0, mask_n0 = _kv_tile(k_ptr, v_ptr, bt_ptr, b, kvh, lo, hi, offs_d, stride_btb, stride_kb,
                                   stride_kt, stride_kh, BS, BLOCK_N)
        if PDL:  # positions, block tables, rotary tables and cached keys are not written by the step's earlier kernels
            tl.extra.cuda.gdc_wait()
            tl.extra.cuda.gdc_launch_dependents()
        row = q_ptr + b * stride_qb
        q = rope_rows(tl.load(row + heads[:, None] * D + offs_d[None, :], mask=mask_g[:, None], other=0.0),
                      tl.load(row + heads[:, None] * D + rot_d[None, :], mask=mask_g[:, None], other=0.0),
                      sign, cos, sin, dt)                                                       # (BLOCK_G, D)
        k_row = row + (H + kvh) * D
        k_new = rope_rows(tl.load(k_row + offs_d)[None, :], tl.load(k_row + rot_d)[None, :], sign, cos, sin, dt)
        v_new = tl.load(row + (H + HKV + kvh) * D + offs_d)[None, :]                              # (1, D)
        first = (tl.zeros((1, D), tl.int32) + split) == 0  # split 0 writes the new key and value (a (1, D) mask:
        tl.store(k_ptr + c_off + offs_d[None, :], k_new, mask=first)  # the interpreter takes no scalar one)
        tl.store(v_ptr + c_off + offs_d[None, :], v_new, mask=first)
    else:
        if PDL:
            tl.extra.cuda.gdc_wait()
            tl.extra.cuda.gdc_launch_dependents()
        q = tl.load(q_ptr + b * stride_qb + heads[:, None] * stride_qh + offs_d[None, :],
                    mask=mask_g[:, None], other=0.0)                                            # (BLOCK_G, D)
        n_ctx = tl.load(ctx_ptr + b)
        n_cached = n_ctx
        lo, hi = _split_range(n_cached, split, SPLITS, BLOCK_N)
        k0, v0, mask_n0 = _kv_tile(k_ptr, v_ptr, bt_ptr, b, kvh, lo, hi, offs_d, stride_btb, stride_kb,
                                   stride_kt, stride_kh, BS, BLOCK_N)
    # the first tile (loaded above), then the rest of the cached keys BLOCK_N at a time
    s = _mm(q, tl.trans(k0), IEEE, UP) * scale                                                 # (BLOCK_G, BLOCK_N)
    s = tl.where(mask_n0[None, :], s, float("-inf"))
    m = tl.max(s, 1)
    m_safe0 = tl.where(m == float("-inf"), 0.0, m)  # no cached key at all (a row's first token, an idle row)
    p = tl.exp(s - m_safe0[:, None])
    l = tl.sum(p, 1)
    acc = _mm(p.to(v0.dtype), v0, IEEE, UP)                                                     # (BLOCK_G, D)
    for n0 in range(lo + BLOCK_N, hi, BLOCK_N):
        k, v, mask_n = _kv_tile(k_ptr, v_ptr, bt_ptr, b, kvh, n0, hi, offs_d, stride_btb, stride_kb,
                                stride_kt, stride_kh, BS, BLOCK_N)
        s = _mm(q, tl.trans(k), IEEE, UP) * scale                                           # (BLOCK_G, BLOCK_N)
        s = tl.where(mask_n[None, :], s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, 1))
        alpha = tl.exp(m - m_new)
        p = tl.exp(s - m_new[:, None])
        l = l * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + _mm(p.to(v.dtype), v, IEEE, UP)
        m = m_new
    if ROPE:
        s_new = tl.sum(q.to(tl.float32) * k_new.to(tl.float32), 1) * scale                        # (BLOCK_G,)
        s_new = tl.where((n_ctx > 0) & (split == SPLITS - 1), s_new, float("-inf"))  # the last split adds it
        m_new = tl.maximum(m, s_new)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # an idle row has no key at all
        alpha = tl.exp(m - m_safe)
        p_new = tl.exp(s_new - m_safe)
        l = l * alpha + p_new
        acc = acc * alpha[:, None] + p_new.to(v_new.dtype).to(tl.float32)[:, None] * v_new.to(tl.float32)
        m = m_new  # -inf only when the split saw no key at all (the partials keep it so)
    if SPLITS == 1:
        l = tl.where(l > 0, l, 1.0)
        out = acc / l[:, None]
        tl.store(o_ptr + b * stride_ob + heads[:, None] * stride_oh + offs_d[None, :],
                 out.to(o_ptr.dtype.element_ty), mask=mask_g[:, None])
    else:  # partials for `_decode_combine_kernel`; an empty split stores m = -inf, l = 0, acc = 0
        row = part_ptr + ((b * H + heads) * SPLITS + split) * (D + 2)                             # (BLOCK_G,)
        tl.store(row[:, None] + offs_d[None, :], acc, mask=mask_g[:, None])
        tl.store(row + D, m, mask=mask_g)
        tl.store(row + D + 1, l, mask=mask_g)


@triton.jit
def _split_range(n, split, SPLITS: tl.constexpr, BLOCK_N: tl.constexpr):
    """Tokens [lo, hi) of n that split `split` of SPLITS attends to: equal runs of whole BLOCK_N tiles."""
    if SPLITS == 1:
        lo = 0
        hi = n
    else:
        per = tl.cdiv(tl.cdiv(n, SPLITS), BLOCK_N) * BLOCK_N
        lo = split * per
        hi = tl.minimum(lo + per, n)
    return lo, hi


@triton.jit
def _decode_combine_kernel(
    part_ptr,     # (B, H, SPLITS, D + 2) float32 partials [acc, m, l]
    o_ptr,        # (B, H, D)
    stride_ob, stride_oh,
    H: tl.constexpr, D: tl.constexpr, SPLITS: tl.constexpr, BLOCK_S: tl.constexpr, PDL: tl.constexpr,
):
    """out = sum_s e^{m_s - M} acc_s / sum_s e^{m_s - M} l_s over the splits of one (row, head); M = max_s m_s."""
    b = tl.program_id(0)
    h = tl.program_id(1)
    if PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    offs_s = tl.arange(0, BLOCK_S)
    mask_s = offs_s < SPLITS
    offs_d = tl.arange(0, D)
    base = part_ptr + ((b * H + h) * SPLITS + offs_s) * (D + 2)                                  # (BLOCK_S,)
    m = tl.load(base + D, mask=mask_s, other=float("-inf"))
    l = tl.load(base + D + 1, mask=mask_s, other=0.0)
    acc = tl.load(base[:, None] + offs_d[None, :], mask=mask_s[:, None], other=0.0)            # (BLOCK_S, D)
    m_max = tl.max(m, 0)
    m_safe = tl.where(m_max == float("-inf"), 0.0, m_max)  # no key in any split: an idle row
    w = tl.exp(m - m_safe)                                                                        # (BLOCK_S,)
    total = tl.sum(w * l, 0)
    total = tl.where(total > 0, total, 1.0)
    out = tl.sum(w[:, None] * acc, 0) / total                                                    # (D,)
    tl.store(o_ptr + b * stride_ob + h * stride_oh + offs_d, out.to(o_ptr.dtype.element_ty))


def _check_cache(k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                 context_lens: torch.Tensor | None, B: int, H: int, D: int) -> None:
    if k_cache.dim() != 4 or k_cache.shape != v_cache.shape:
        raise ValueError(f"the caches must be (num_blocks, block_size, H_kv, D) alike; got {tuple(k_cache.shape)}, "
                         f"{tuple(v_cache.shape)}.")
    H_kv, Dk = k_cache.shape[2], k_cache.shape[3]
    if Dk != D or H % H_kv:
        raise ValueError(f"head_dim {D} vs cache {Dk}, heads {H} vs kv heads {H_kv}: heads must be a multiple of "
                         "kv heads and head dims equal.")
    if D & (D - 1) or D < 16:
        raise ValueError(f"head_dim={D}: the Triton kernel needs a power of two >= 16; use attention_backend="
                         "'reference' for this model.")
    if block_tables.dtype != torch.int32 or block_tables.dim() != 2 or block_tables.shape[0] != B:
        raise ValueError(f"block_tables must be (B={B}, max_blocks) int32, got {tuple(block_tables.shape)} "
                         f"{block_tables.dtype}.")
    if context_lens is not None and (context_lens.dtype != torch.int32 or context_lens.shape != (B,)):
        raise ValueError(f"context_lens must be (B={B},) int32, got {tuple(context_lens.shape)} {context_lens.dtype}.")
    if k_cache.stride() != v_cache.stride():
        raise ValueError(f"k_cache and v_cache must share strides, got {k_cache.stride()} and {v_cache.stride()}.")
    if k_cache.stride(3) != 1 or block_tables.stride(1) != 1:
        raise ValueError("the caches and block_tables need a contiguous last dimension.")


def paged_decode_attention(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
    context_lens: torch.Tensor, scale: float, out: torch.Tensor | None = None,
) -> torch.Tensor:
    """q: (B, H, D); k_cache, v_cache: (num_blocks, block_size, H_kv, D); block_tables: (B, max_blocks) int32;
    context_lens: (B,) int32 -> (B, H, D). See `paged_decode_attention_ref`."""
    if q.dim() != 3 or q.stride(2) != 1:
        raise ValueError(f"q must be (B, H, D) with a contiguous last dimension, got {tuple(q.shape)}.")
    B, H, D = q.shape
    _check_cache(k_cache, v_cache, block_tables, context_lens, B, H, D)
    out = torch.empty_like(q) if out is None else out
    _launch_decode(q, k_cache, v_cache, block_tables, context_lens, out, scale, q.stride(0), q.stride(1), H, None)
    return out


def paged_decode_attention_rope(
    qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor, active: torch.Tensor,
    k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor, scale: float, num_heads: int,
    prefetch: torch.Tensor | None = None,
) -> torch.Tensor:
    """A decode layer's `rope_kv` then `paged_decode_attention` in one kernel. qkv: (B, (H + 2 H_kv) D) fused
    projections of one new token per row; cos, sin: (max_pos, D); positions: (B,) int64 position of the new token;
    active: (B,) bool. An active row's new key (rotated) and value go to its slot block_tables[b, pos // bs] * bs +
    pos % bs and it attends to its pos + 1 tokens; an idle row writes to the scratch block 0 and gets zeros.
    prefetch: a weight the next kernel reads, brought into L2 meanwhile when `l2_prefetch` is on. Returns (B, H, D)."""
    B = qkv.shape[0]
    H_kv, D = k_cache.shape[2], k_cache.shape[3]
    if qkv.dim() != 2 or qkv.shape[1] != (num_heads + 2 * H_kv) * D or qkv.stride(1) != 1:
        raise ValueError(f"qkv {tuple(qkv.shape)} does not hold {num_heads} + 2 x {H_kv} heads of {D} contiguously.")
    if positions.dtype != torch.int64 or positions.shape != (B,) or active.dtype != torch.bool or active.shape != (B,):
        raise ValueError(f"positions must be (B,) int64 and active (B,) bool, got {tuple(positions.shape)} "
                         f"{positions.dtype}, {tuple(active.shape)} {active.dtype}.")
    if cos.stride() != sin.stride() or cos.stride(1) != 1 or cos.shape[1] != D:
        raise ValueError(f"cos and sin must be (max_pos, {D}) tables of one layout.")
    _check_cache(k_cache, v_cache, block_tables, None, B, num_heads, D)
    out = torch.empty((B, num_heads, D), dtype=qkv.dtype, device=qkv.device)
    _launch_decode(qkv, k_cache, v_cache, block_tables, active, out, scale, qkv.stride(0), D, num_heads,
                   (cos, sin, positions), prefetch)
    return out


# Launch shape of the decode kernel (keys per iteration, warps, pipeline stages, context splits); block_n None: 128
# keys for D <= 64, else 64. splits > 1 is split-context decoding (flash-decoding): each (row, KV head) is split
# into that many programs over equal runs of whole tiles, and `_decode_combine_kernel` merges their softmax
# partials, for batches whose B x H_kv programs leave SMs idle. It changes no result beyond float32 rounding.
# Module-level so that a benchmark can compare shapes.
DECODE_LAUNCH = {"block_n": None, "num_warps": 4, "num_stages": 3, "splits": 1}


def _launch_decode(q, k_cache, v_cache, block_tables, lens, out, scale, stride_qb, stride_qh, H, rope, prefetch=None):
    B = out.shape[0]
    _, BS, H_kv, D = k_cache.shape
    group = H // H_kv
    block_n = DECODE_LAUNCH["block_n"] or (128 if D <= 64 else 64)
    splits = int(DECODE_LAUNCH.get("splits") or 1)
    if splits < 1:
        raise ValueError(f"DECODE_LAUNCH['splits']={splits}: use 1 (no split) or more.")
    cos, sin, pos = rope if rope is not None else (lens,) * 3  # unused without rope
    part = (torch.empty((B, H, splits, D + 2), dtype=torch.float32, device=out.device) if splits > 1
            else out)  # unused with one split
    pf = l2_prefetch.launch_args(prefetch, out)
    _paged_decode_kernel[(B, H_kv, splits)](
        q, k_cache, v_cache, block_tables, lens, out, cos, sin, pos, part, pf["pf_ptr"], pf["pf_bytes"], scale,
        stride_qb, stride_qh, k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), block_tables.stride(0),
        out.stride(0), out.stride(1), cos.stride(0) if rope is not None else 0,
        H=H, HKV=H_kv, GROUP=group, BLOCK_G=max(16, triton.next_power_of_2(group)), D=D, BS=BS,
        BLOCK_N=block_n, SPLITS=splits, ROPE=rope is not None, IEEE=out.dtype == torch.float32, UP=UPCAST,
        num_warps=DECODE_LAUNCH["num_warps"], num_stages=DECODE_LAUNCH["num_stages"], **pdl.launch_options(out),
        PREFETCH=pf["PREFETCH"],
    )
    if splits > 1:
        _decode_combine_kernel[(B, H)](
            part, out, out.stride(0), out.stride(1), H=H, D=D, SPLITS=splits,
            BLOCK_S=max(2, triton.next_power_of_2(splits)), num_warps=1, **pdl.launch_options(out),
        )


@triton.jit
def _prefill_attention_kernel(
    q_ptr,        # (T, H, D) rotated queries
    k_ptr,        # (T, H_kv, D) rotated keys (rows may be strided)
    v_ptr,        # (T, H_kv, D) values (rows may be strided)
    start_ptr,    # (T,) int32 first token of each token's prompt
    o_ptr,        # (T, H, D)
    scale, T, stride_qt, stride_kt, stride_vt, stride_ot,
    GROUP: tl.constexpr, D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, IEEE: tl.constexpr,
    UP: tl.constexpr,
):
    mb = tl.program_id(0)
    h = tl.program_id(1)
    kvh = h // GROUP
    offs_m = mb * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < T
    offs_d = tl.arange(0, D)
    q = tl.load(q_ptr + offs_m[:, None].to(tl.int64) * stride_qt + h * D + offs_d[None, :], mask=mask_m[:, None],
                other=0.0)                                                                      # (BLOCK_M, D)
    first = tl.load(start_ptr + offs_m, mask=mask_m, other=T)                                   # (BLOCK_M,)
    lo = tl.min(first, 0)
    hi = tl.minimum(mb * BLOCK_M + BLOCK_M, T)
    m = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, D), dtype=tl.float32)
    for n0 in range(lo, hi, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mask_n = offs_n < hi
        k = tl.load(k_ptr + offs_n[:, None].to(tl.int64) * stride_kt + kvh * D + offs_d[None, :],
                    mask=mask_n[:, None], other=0.0)                                            # (BLOCK_N, D)
        s = _mm(q, tl.trans(k), IEEE, UP) * scale                                           # (BLOCK_M, BLOCK_N)
        seen = (offs_n[None, :] >= first[:, None]) & (offs_n[None, :] <= offs_m[:, None])
        s = tl.where(seen, s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows whose prompt starts in a later tile
        alpha = tl.exp(m - m_safe)
        p = tl.exp(s - m_safe[:, None])
        l = l * alpha + tl.sum(p, 1)
        v = tl.load(v_ptr + offs_n[:, None].to(tl.int64) * stride_vt + kvh * D + offs_d[None, :],
                    mask=mask_n[:, None], other=0.0)
        acc = acc * alpha[:, None] + _mm(p.to(v.dtype), v, IEEE, UP)
        m = m_new
    l = tl.where(l > 0, l, 1.0)
    tl.store(o_ptr + offs_m[:, None].to(tl.int64) * stride_ot + h * D + offs_d[None, :],
             (acc / l[:, None]).to(o_ptr.dtype.element_ty), mask=mask_m[:, None])


def prefill_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seq_start: torch.Tensor,
                      scale: float) -> torch.Tensor:
    """Causal attention within each prompt of a flat step: q (T, H, D), k, v (T, H_kv, D) (rows may be strided,
    heads and head dims contiguous); seq_start: (T,) int32, the index of the first token of token t's prompt
    (a padding token is a prompt of its own) -> (T, H, D). See `prefill_attention_ref`."""
    if q.dim() != 3 or k.dim() != 3 or k.shape != v.shape or q.shape[0] != k.shape[0] or q.shape[2] != k.shape[2]:
        raise ValueError(f"q must be (T, H, D) and k, v (T, H_kv, D) alike; got {tuple(q.shape)}, {tuple(k.shape)}, "
                         f"{tuple(v.shape)}.")
    T, H, D = q.shape
    H_kv = k.shape[1]
    if H % H_kv or D & (D - 1) or D < 16:
        raise ValueError(f"heads {H} must be a multiple of kv heads {H_kv} and head_dim {D} a power of two >= 16.")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.stride(2) != 1 or t.stride(1) != D:
            raise ValueError(f"{name} needs contiguous heads of contiguous head dims, got strides {t.stride()}.")
    if seq_start.dtype != torch.int32 or seq_start.shape != (T,):
        raise ValueError(f"seq_start must be ({T},) int32, got {tuple(seq_start.shape)} {seq_start.dtype}.")
    out = torch.empty((T, H, D), dtype=q.dtype, device=q.device)
    if T:
        BLOCK = 64 if D <= 64 else 32
        _prefill_attention_kernel[(triton.cdiv(T, BLOCK), H)](
            q, k, v, seq_start, out, scale, T, q.stride(0), k.stride(0), v.stride(0), out.stride(0),
            GROUP=H // H_kv, D=D, BLOCK_M=BLOCK, BLOCK_N=BLOCK, IEEE=q.dtype == torch.float32, UP=UPCAST,
        )
    return out
