"""Triton kernels for batched LoRA with heterogeneous ranks: a segmented shrink and expand over a packed pool.

The math and the layout are specified by `lora_shrink_ref` / `lora_expand_ref` in `reference.py`, which these
kernels must match (tests/serve/test_triton_kernels.py). Tokens come grouped by adapter; each program handles one
block of up to BLOCK_T tokens that share an adapter (a segment of a prompt in a prefill step),
so an adapter's A and B are read once per block, never once per token, and each adapter reads exactly its own
R_s rows. The shrink's reduction over K is split over SPLIT programs per block (partial sums in y[s], added by the
expand in a fixed order), which keeps many loads in flight when a step has few blocks; programs whose rank
tile lies past R_s return at once (the grid is sized by the largest rank so that a CUDA graph can replay it for
any mix of adapters, as S-LoRA's kernels do, but no memory is padded or read).

Decode steps (one token per row) use the row-form kernels of `triton_lora_rows.py` instead, which were faster there
at every launch shape (bench/lora_decode_variants.py). (A single fused shrink-expand kernel, each column program
recomputing its part's y, measured slower than both passes at every shape tried on an H100: docs/BENCHMARKS.md,
Serving.)
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from rankwise.serve.kernels import pdl

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
def _lora_shrink_kernel(
    x_ptr,        # (T, K) activations, model dtype
    pool_ptr,     # (numel,) packed adapter weights, model dtype
    y_ptr,        # (SPLIT, N, R_cap) float32 partial sums, one slice per K split
    tok_ptr,      # (N,) int32 token of each grouped position
    bstart_ptr,   # (NB,) int32 first position of the block
    bend_ptr,     # (NB,) int32 one past its last position
    bslot_ptr,    # (NB,) int32 adapter slot of the block, -1: none
    offA_ptr,     # (S,) int64 offset of A_s (R_s, K) in the pool
    rank_ptr,     # (S,) int64 R_s
    K, stride_x, stride_ys, stride_y,
    K_PER: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, IEEE: tl.constexpr,
    UP: tl.constexpr, PDL: tl.constexpr,
):
    b = tl.program_id(0)
    rb = tl.program_id(1)
    ks = tl.program_id(2)
    # the step's grouping and the adapter tables are written by no kernel of the step: read before the PDL wait
    slot = tl.load(bslot_ptr + b)
    R = tl.where(slot >= 0, tl.load(rank_ptr + tl.maximum(slot, 0)), 0)
    start = tl.load(bstart_ptr + b)
    end = tl.load(bend_ptr + b)
    a_base = tl.load(offA_ptr + tl.maximum(slot, 0))
    offs_t = start + tl.arange(0, BLOCK_T)
    mask_t = offs_t < end
    tok = tl.load(tok_ptr + offs_t, mask=mask_t, other=0).to(tl.int64)
    offs_r = rb * BLOCK_R + tl.arange(0, BLOCK_R)
    mask_r = offs_r < R
    # the first A tile too: the pool is not written by the step, so under PDL its load overlaps the kernel before
    k_first = ks * K_PER
    offs_k = k_first + tl.arange(0, BLOCK_K)
    a_ptrs = pool_ptr + a_base + offs_r[None, :].to(tl.int64) * K + offs_k[:, None]
    at = tl.load(a_ptrs, mask=mask_r[None, :] & (offs_k[:, None] < K), other=0.0)              # (BLOCK_K, BLOCK_R)
    if PDL:  # every program waits, also one with nothing to do (pdl.py)
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    if slot < 0:
        return
    if rb * BLOCK_R >= R:
        return
    xt = tl.load(x_ptr + tok[:, None] * stride_x + offs_k[None, :],
                 mask=mask_t[:, None] & (offs_k[None, :] < K), other=0.0)                       # (BLOCK_T, BLOCK_K)
    acc = _mm(xt, at, IEEE, UP)
    for k0 in range(k_first + BLOCK_K, k_first + K_PER, BLOCK_K):  # the rest of the K range (fresh names)
        offs_kk = k0 + tl.arange(0, BLOCK_K)
        mask_kk = offs_kk < K
        xk = tl.load(x_ptr + tok[:, None] * stride_x + offs_kk[None, :],
                     mask=mask_t[:, None] & mask_kk[None, :], other=0.0)                       # (BLOCK_T, BLOCK_K)
        ak = tl.load(pool_ptr + a_base + offs_r[None, :].to(tl.int64) * K + offs_kk[:, None],
                     mask=mask_r[None, :] & mask_kk[:, None], other=0.0)                       # (BLOCK_K, BLOCK_R)
        acc += _mm(xk, ak, IEEE, UP)
    tl.store(y_ptr + ks * stride_ys + offs_t[:, None].to(tl.int64) * stride_y + offs_r[None, :], acc,
             mask=mask_t[:, None] & mask_r[None, :])


@triton.jit
def _lora_expand_kernel(
    y_ptr,        # (SPLIT, N, R_cap) float32 partial sums from the shrink
    out_ptr,      # (T, N_total) model dtype, updated in place
    pool_ptr,     # (numel,)
    tok_ptr, bstart_ptr, bend_ptr, bslot_ptr,
    offB_ptr,     # (P, S) int64 offset of B_sp^T (r_sp, N_p)
    rankB_ptr,    # (P, S) int64 r_sp
    r0_ptr,       # (P, S) int64 first row of part p in y
    scale_ptr,    # (P, S) float32
    offG_ptr,     # (P, S) int64 DoRA factor g_sp (N_p,), -1: none
    S, c1, c2, w0, w1, w2, SPLIT, stride_ys, stride_y, stride_out, NBLK_N,
    BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, IEEE: tl.constexpr, UP: tl.constexpr,
    PDL: tl.constexpr,
):
    b = tl.program_id(0)
    pid = tl.program_id(1)
    # tables and grouping first (no kernel of the step writes them), then the PDL wait, then y and out
    slot = tl.load(bslot_ptr + b)
    p = pid // NBLK_N
    nb = pid % NBLK_N
    ps = p * S + tl.maximum(slot, 0)
    r = tl.where(slot >= 0, tl.load(rankB_ptr + ps), 0)
    width = tl.where(p == 0, w0, tl.where(p == 1, w1, w2))
    c0 = tl.where(p == 0, 0, tl.where(p == 1, c1, c2))
    start = tl.load(bstart_ptr + b)
    end = tl.load(bend_ptr + b)
    offs_t = start + tl.arange(0, BLOCK_T)
    mask_t = offs_t < end
    tok = tl.load(tok_ptr + offs_t, mask=mask_t, other=0).to(tl.int64)
    row0 = tl.load(r0_ptr + ps)
    b_base = tl.load(offB_ptr + ps)
    scale = tl.load(scale_ptr + ps)
    g_off = tl.load(offG_ptr + ps)
    offs_n = nb * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < width
    # the first B^T tile too (the pool is not written by the step: under PDL this load overlaps the kernel before)
    offs_j = tl.arange(0, BLOCK_R)
    mask_j = offs_j < r
    bt = tl.load(pool_ptr + b_base + offs_j[:, None].to(tl.int64) * width + offs_n[None, :],
                 mask=mask_j[:, None] & mask_n[None, :], other=0.0)                             # (BLOCK_R, BLOCK_N)
    if PDL:  # every program waits, also one with nothing to do (pdl.py)
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    if slot < 0:
        return
    if r == 0:
        return
    if nb * BLOCK_N >= width:
        return
    y_ptrs = y_ptr + offs_t[:, None].to(tl.int64) * stride_y + row0 + offs_j[None, :]
    yt = tl.zeros((BLOCK_T, BLOCK_R), dtype=tl.float32)
    for sk in range(SPLIT):  # the shrink's partial sums over K, added in a fixed order (deterministic)
        yt += tl.load(y_ptrs + sk * stride_ys, mask=mask_t[:, None] & mask_j[None, :], other=0.0)
    acc = _mm(yt.to(bt.dtype), bt, IEEE, UP)                                                    # (BLOCK_T, BLOCK_N)
    for j0 in range(BLOCK_R, r, BLOCK_R):  # ranks above BLOCK_R (fresh names: no loop-carried type changes)
        offs_jj = j0 + tl.arange(0, BLOCK_R)
        mask_jj = offs_jj < r
        yj_ptrs = y_ptr + offs_t[:, None].to(tl.int64) * stride_y + row0 + offs_jj[None, :]
        yj = tl.zeros((BLOCK_T, BLOCK_R), dtype=tl.float32)
        for sk in range(SPLIT):
            yj += tl.load(yj_ptrs + sk * stride_ys, mask=mask_t[:, None] & mask_jj[None, :], other=0.0)
        bj = tl.load(pool_ptr + b_base + offs_jj[:, None].to(tl.int64) * width + offs_n[None, :],
                     mask=mask_jj[:, None] & mask_n[None, :], other=0.0)                        # (BLOCK_R, BLOCK_N)
        acc += _mm(yj.to(bj.dtype), bj, IEEE, UP)
    o_ptrs = out_ptr + tok[:, None] * stride_out + c0 + offs_n[None, :]
    mask = mask_t[:, None] & mask_n[None, :]
    o = tl.load(o_ptrs, mask=mask, other=0.0).to(tl.float32) + scale * acc
    if g_off >= 0:
        g = tl.load(pool_ptr + g_off + offs_n, mask=mask_n, other=1.0).to(tl.float32)
        o = o * g[None, :]
    tl.store(o_ptrs, o.to(out_ptr.dtype.element_ty), mask=mask)


def _check_blocks(tok_idx, blk_start, blk_end, blk_slot, device) -> None:
    for name, t in (("tok_idx", tok_idx), ("blk_start", blk_start), ("blk_end", blk_end), ("blk_slot", blk_slot)):
        if t.dtype != torch.int32 or t.dim() != 1 or t.device != device:
            raise ValueError(f"{name}: expected a 1-D int32 tensor on {device}, got {tuple(t.shape)} {t.dtype} on "
                             f"{t.device}; build it with rankwise.serve.lora_batch.build_lora_step.")
    if not (blk_start.shape == blk_end.shape == blk_slot.shape):
        raise ValueError(f"blk_start/blk_end/blk_slot lengths differ: {blk_start.shape[0]}, {blk_end.shape[0]}, "
                         f"{blk_slot.shape[0]}; they describe the same blocks.")


K_PER = 256  # K elements per shrink program


def split_k(K: int, num_blocks: int) -> int:
    """Programs sharing one block's reduction over K: K / K_PER for decode-sized batches (<= 32 blocks, where few
    blocks would leave the GPU idle), 1 otherwise. Two values per K only, so each site compiles two variants."""
    return max(1, triton.cdiv(K, K_PER)) if num_blocks <= 32 else 1


def lora_shrink(
    x: torch.Tensor, pool: torch.Tensor, y: torch.Tensor, tok_idx: torch.Tensor, blk_start: torch.Tensor,
    blk_end: torch.Tensor, blk_slot: torch.Tensor, offA: torch.Tensor, rankA: torch.Tensor, *,
    max_rank: int, split: int, block_t: int = 16, block_r: int = 16,
) -> None:
    """y[s, i, :R_s] = partial sums (over the s-th K range) of x[tok_idx[i]] @ A_s^T for every block with an
    adapter; sum over s = `lora_shrink_ref`'s y.

    x: (T, K); pool: (numel,) same dtype; y: (>= split, N, R_cap) float32 with R_cap >= max_rank; max_rank: the
    largest R_s the grid must cover (a fixed number keeps a captured CUDA graph valid for any adapter mix);
    split: `split_k(K, num_blocks)` (or a tuned `LoraLaunch.split`), the same number passed to `lora_expand`;
    block_r: rank rows per program."""
    if x.dim() != 2 or x.stride(1) != 1:
        raise ValueError(f"x must be (tokens, in_features) with contiguous rows, got shape {tuple(x.shape)} "
                         f"strides {x.stride()}.")
    if pool.dtype != x.dtype or pool.dim() != 1:
        raise ValueError(f"pool must be 1-D of x's dtype {x.dtype}, got {tuple(pool.shape)} {pool.dtype}.")
    if y.dtype != torch.float32 or y.dim() != 3 or y.shape[0] < split or y.shape[2] < max_rank or y.stride(2) != 1:
        raise ValueError(f"y must be a (>= {split}, N, >= {max_rank}) float32 buffer, got {tuple(y.shape)} {y.dtype}.")
    K = x.shape[1]
    if not 1 <= split <= K:
        raise ValueError(f"split={split} for K={K}: use rankwise.serve.kernels.triton_lora.split_k.")
    _check_blocks(tok_idx, blk_start, blk_end, blk_slot, x.device)
    if offA.dtype != torch.int64 or rankA.dtype != torch.int64 or offA.shape != rankA.shape:
        raise ValueError(f"offA and rankA must be int64 of one shape (S,), got {offA.dtype} {tuple(offA.shape)} "
                         f"and {rankA.dtype} {tuple(rankA.shape)}.")
    NB = blk_slot.shape[0]
    if NB == 0 or max_rank == 0:
        return
    BLOCK_R = block_r
    per_split = triton.cdiv(K, split)
    BLOCK_K = min(128, max(16, triton.next_power_of_2(per_split)))
    k_per = triton.cdiv(per_split, BLOCK_K) * BLOCK_K  # each program's K range, a multiple of BLOCK_K
    grid = (NB, triton.cdiv(max_rank, BLOCK_R), split)
    _lora_shrink_kernel[grid](
        x, pool, y, tok_idx, blk_start, blk_end, blk_slot, offA, rankA,
        x.shape[1], x.stride(0), y.stride(0), y.stride(1),
        K_PER=k_per, BLOCK_T=block_t, BLOCK_R=BLOCK_R, BLOCK_K=BLOCK_K, IEEE=x.dtype == torch.float32, UP=UPCAST,
        **pdl.launch_options(x),
    )


def lora_expand(
    y: torch.Tensor, out: torch.Tensor, pool: torch.Tensor, tok_idx: torch.Tensor, blk_start: torch.Tensor,
    blk_end: torch.Tensor, blk_slot: torch.Tensor, part_cols: tuple[int, ...], offB: torch.Tensor,
    rankB: torch.Tensor, r0: torch.Tensor, scale: torch.Tensor, offG: torch.Tensor, *, split: int,
    block_t: int = 16, block_r: int = 16, block_n: int = 128,
) -> None:
    """out[t, cols_p] = g_sp * (out[t, cols_p] + scale * (sum_s y[s, i, r0:r0 + r_sp]) @ B_sp^T), in place
    (see `lora_expand_ref`). out: (T, N_total) with parts at `part_cols` (1 to 3 parts); split: the shrink's;
    block_r, block_n: rank and column tile of a program."""
    P = len(part_cols) - 1
    if not 1 <= P <= 3 or part_cols[0] != 0 or part_cols[-1] != out.shape[1]:
        raise ValueError(f"part_cols={part_cols}: need 2 to 4 boundaries from 0 to out's width {out.shape[1]}.")
    if out.dim() != 2 or out.stride(1) != 1 or pool.dtype != out.dtype:
        raise ValueError(f"out must be (tokens, N) with contiguous rows and pool's dtype {pool.dtype}; got "
                         f"{tuple(out.shape)} strides {out.stride()} {out.dtype}.")
    if y.dtype != torch.float32 or y.dim() != 3 or y.shape[0] < split or y.stride(2) != 1:
        raise ValueError(f"y must be the (>= {split}, N, R) float32 buffer the shrink wrote, got {tuple(y.shape)} "
                         f"{y.dtype}.")
    _check_blocks(tok_idx, blk_start, blk_end, blk_slot, out.device)
    S = offB.shape[-1]
    for name, t, dt in (("offB", offB, torch.int64), ("rankB", rankB, torch.int64), ("r0", r0, torch.int64),
                        ("scale", scale, torch.float32), ("offG", offG, torch.int64)):
        if t.dtype != dt or tuple(t.shape) != (P, S) or not t.is_contiguous():
            raise ValueError(f"{name} must be a contiguous ({P}, {S}) {dt} table, got {tuple(t.shape)} {t.dtype}.")
    NB = blk_slot.shape[0]
    if NB == 0:
        return
    widths = [part_cols[i + 1] - part_cols[i] for i in range(P)] + [0] * (3 - P)
    cols = list(part_cols[1:P]) + [out.shape[1]] * (3 - P)
    BLOCK_N = block_n if max(widths) >= block_n else max(16, triton.next_power_of_2(max(widths)))
    nblk = triton.cdiv(max(widths), BLOCK_N)
    grid = (NB, P * nblk)
    _lora_expand_kernel[grid](
        y, out, pool, tok_idx, blk_start, blk_end, blk_slot, offB, rankB, r0, scale, offG,
        S, cols[0], cols[1], widths[0], widths[1], widths[2], split, y.stride(0), y.stride(1), out.stride(0), nblk,
        BLOCK_T=block_t, BLOCK_N=BLOCK_N, BLOCK_R=block_r, IEEE=out.dtype == torch.float32, UP=UPCAST,
        **pdl.launch_options(out),
    )


# ---- launch shapes ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class LoraLaunch:
    """Launch shape of one site's shrink and expand: the shrink's K split and rank tile, the expand's rank and
    column tiles. The split changes the order of the float32 sums; the tiles do not change what is computed."""

    split: int
    shrink_block_r: int = 16
    expand_block_r: int = 16
    expand_block_n: int = 128


def default_launch(K: int, num_blocks: int) -> LoraLaunch:
    return LoraLaunch(split_k(K, num_blocks))


def _candidates(K: int) -> tuple[list[LoraLaunch], list[tuple[int, int]]]:
    """Shrink shapes (split, rank tile) and expand tiles (rank, columns) that bench/lora_decode_variants.py times
    for these kernels on decode steps; the first of each is the default."""
    s = max(1, triton.cdiv(K, K_PER))
    shrinks = [LoraLaunch(s), LoraLaunch(s, 32), LoraLaunch(2 * s), LoraLaunch(max(1, s // 2)), LoraLaunch(2 * s, 32),
               LoraLaunch(s, 64)]
    return shrinks, [(16, 128), (64, 128), (32, 256), (32, 128), (64, 256), (16, 64)]
