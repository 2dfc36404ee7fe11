"""Batched LoRA for a decode step in row form: one batch row per program row, GEMV instead of tiled dot products.

A decode step has one token per row, and with many adapters almost every row has its own. The segmented kernels
of `triton_lora.py` treat each row as a block of up to 16 tokens (tl.dot's smallest tile) reached through the
grouping tables (block start -> token index -> row), a chain of dependent loads that every program pays before
its first weight arrives. Here row b is program row b: its slot is one load (`row_slot[b]`, written by the host
before the step, so under PDL it and the adapter's first weight tile load before the wait on the previous kernel),
x[b] and y[b] need no index, and the products are summed with tl.sum in float32 (a (BLOCK_R, BLOCK_K) tile of A
against x[b]; a (BLOCK_R, BLOCK_N) tile of B^T against y[b]). The expand's grid covers the column tiles of all
parts back to back, so no program is sized for the widest part and exits at once.

The math equals `lora_shrink_ref` / `lora_expand_ref` over blocks of one token (tests/serve/test_triton_lora_rows.py):
y[s, b, :R] holds the s-th K range's partial sums of x[b] @ A^T, and the expand adds them in a fixed order, rounds
y to the model dtype as the reference does, and adds scale * y @ B^T (times the DoRA factor) into out[b]. Rows with
slot -1 are left untouched. On a 16-layer decode step of 32 distinct adapters (bench/lora_decode_variants.py,
H100) these kernels took 431 us against the tiled kernels' 510 us at their best launch shapes.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from rankwise.serve.kernels import pdl
from rankwise.serve.kernels.graph_timing import graph_us


@triton.jit
def _rows_shrink_kernel(
    x_ptr,      # (B, K) activations, model dtype
    pool_ptr,   # (numel,) packed adapter weights
    y_ptr,      # (SPLIT, B, R_cap) float32 partial sums
    slot_ptr,   # (B,) int32 adapter slot of each row, -1: none
    offA_ptr,   # (S,) int64 offset of A_s (R_s, K)
    rank_ptr,   # (S,) int64 R_s
    K, stride_x, stride_ys, stride_y,
    K_PER: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, PDL: tl.constexpr,
):
    b = tl.program_id(0)
    ks = tl.program_id(1)
    rb = tl.program_id(2)
    # row_slot and the adapter tables are written by no kernel of the step: read before the PDL wait
    slot = tl.load(slot_ptr + b)
    R = tl.where(slot >= 0, tl.load(rank_ptr + tl.maximum(slot, 0)), 0)
    a_base = tl.load(offA_ptr + tl.maximum(slot, 0))
    offs_r = rb * BLOCK_R + tl.arange(0, BLOCK_R)
    mask_r = offs_r < R
    k_first = ks * K_PER
    offs_k = k_first + tl.arange(0, BLOCK_K)
    a = tl.load(pool_ptr + a_base + offs_r[:, None].to(tl.int64) * K + offs_k[None, :],
                mask=mask_r[:, None] & (offs_k[None, :] < K), other=0.0)                       # (BLOCK_R, BLOCK_K)
    if PDL:  # every program waits, also one with nothing to do (pdl.py)
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    if rb * BLOCK_R >= R:
        return
    row = b.to(tl.int64)
    xk = tl.load(x_ptr + row * stride_x + offs_k, mask=offs_k < K, other=0.0).to(tl.float32)
    acc = tl.sum(a.to(tl.float32) * xk[None, :], axis=1)                                       # (BLOCK_R,)
    for k0 in range(k_first + BLOCK_K, k_first + K_PER, BLOCK_K):  # the rest of the K range (fresh names)
        offs_kk = k0 + tl.arange(0, BLOCK_K)
        mask_kk = offs_kk < K
        xkk = tl.load(x_ptr + row * stride_x + offs_kk, mask=mask_kk, other=0.0).to(tl.float32)
        ak = tl.load(pool_ptr + a_base + offs_r[:, None].to(tl.int64) * K + offs_kk[None, :],
                     mask=mask_r[:, None] & mask_kk[None, :], other=0.0)
        acc += tl.sum(ak.to(tl.float32) * xkk[None, :], axis=1)
    tl.store(y_ptr + ks * stride_ys + row * stride_y + offs_r, acc, mask=mask_r)


@triton.jit
def _rows_expand_kernel(
    y_ptr,      # (SPLIT, B, R_cap) float32 from the shrink
    out_ptr,    # (B, N_total) model dtype, updated in place
    pool_ptr,
    slot_ptr,   # (B,) int32
    offB_ptr, rankB_ptr, r0_ptr, scale_ptr, offG_ptr,   # (P, S) tables, as in triton_lora._lora_expand_kernel
    S, c1, c2, w0, w1, w2, t0, t1, SPLIT, stride_ys, stride_y, stride_out,
    BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, PDL: tl.constexpr,
):
    b = tl.program_id(0)
    pid = tl.program_id(1)
    slot = tl.load(slot_ptr + b)
    # column tile pid of the parts laid back to back: t0 tiles of part 0, t1 of part 1, the rest of part 2
    p = tl.where(pid < t0, 0, tl.where(pid < t0 + t1, 1, 2))
    nb = pid - tl.where(p == 0, 0, tl.where(p == 1, t0, t0 + t1))
    width = tl.where(p == 0, w0, tl.where(p == 1, w1, w2))
    c0 = tl.where(p == 0, 0, tl.where(p == 1, c1, c2))
    ps = p * S + tl.maximum(slot, 0)
    r = tl.where(slot >= 0, tl.load(rankB_ptr + ps), 0)
    row0 = tl.load(r0_ptr + ps)
    b_base = tl.load(offB_ptr + ps)
    scale = tl.load(scale_ptr + ps)
    g_off = tl.load(offG_ptr + ps)
    offs_n = nb * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < width
    offs_j = tl.arange(0, BLOCK_R)
    mask_j = offs_j < r
    bt = tl.load(pool_ptr + b_base + offs_j[:, None].to(tl.int64) * width + offs_n[None, :],
                 mask=mask_j[:, None] & mask_n[None, :], other=0.0)                             # (BLOCK_R, BLOCK_N)
    if PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    if r == 0:
        return
    row = b.to(tl.int64)
    y_row = y_ptr + row * stride_y + row0
    yj = tl.zeros((BLOCK_R,), dtype=tl.float32)
    for sk in range(SPLIT):  # the shrink's partial sums over K, added in a fixed order (deterministic)
        yj += tl.load(y_row + sk * stride_ys + offs_j, mask=mask_j, other=0.0)
    # y rounded to the model dtype before the product, as the reference does
    acc = tl.sum(yj.to(bt.dtype).to(tl.float32)[:, None] * bt.to(tl.float32), axis=0)           # (BLOCK_N,)
    for j0 in range(BLOCK_R, r, BLOCK_R):  # ranks above BLOCK_R (fresh names)
        offs_jj = j0 + tl.arange(0, BLOCK_R)
        mask_jj = offs_jj < r
        yjj = tl.zeros((BLOCK_R,), dtype=tl.float32)
        for sk in range(SPLIT):
            yjj += tl.load(y_row + sk * stride_ys + offs_jj, mask=mask_jj, other=0.0)
        bj = tl.load(pool_ptr + b_base + offs_jj[:, None].to(tl.int64) * width + offs_n[None, :],
                     mask=mask_jj[:, None] & mask_n[None, :], other=0.0)
        acc += tl.sum(yjj.to(bj.dtype).to(tl.float32)[:, None] * bj.to(tl.float32), axis=0)
    o_ptrs = out_ptr + row * stride_out + c0 + offs_n
    o = tl.load(o_ptrs, mask=mask_n, other=0.0).to(tl.float32) + scale * acc
    if g_off >= 0:
        o = o * tl.load(pool_ptr + g_off + offs_n, mask=mask_n, other=1.0).to(tl.float32)
    tl.store(o_ptrs, o.to(out_ptr.dtype.element_ty), mask=mask_n)


@dataclass(frozen=True)
class RowLaunch:
    """Launch shape of one site's row-form shrink (K split, rank and K tiles) and expand (rank and column tiles).
    The split changes the order of the float32 sums; the tiles do not change what is computed."""

    split: int = 4
    shrink_block_r: int = 16
    shrink_block_k: int = 512
    expand_block_r: int = 64
    expand_block_n: int = 256


def default_row_launch(K: int) -> RowLaunch:
    """The shape that was fastest for K = 2048 on an H100 (bench/lora_decode_variants.py), with the K range per
    program kept at 512 for wider inputs."""
    return RowLaunch(split=max(1, triton.cdiv(K, 512)))


def max_row_split(K: int) -> int:
    """The largest split `tune_rows` tries for input K: the y workspace of a tuned decode step needs this many."""
    return max(1, triton.cdiv(K, 256))


def _check_rows(row_slot: torch.Tensor, rows: int, device: torch.device) -> None:
    if row_slot.dtype != torch.int32 or row_slot.dim() != 1 or row_slot.shape[0] != rows or row_slot.device != device:
        raise ValueError(f"row_slot must be a ({rows},) int32 tensor on {device} (one adapter slot per row, -1: "
                         f"none), got {tuple(row_slot.shape)} {row_slot.dtype} on {row_slot.device}.")


def lora_shrink_rows(x: torch.Tensor, pool: torch.Tensor, y: torch.Tensor, row_slot: torch.Tensor,
                     offA: torch.Tensor, rankA: torch.Tensor, *, max_rank: int, launch: RowLaunch) -> None:
    """y[s, b, :R_b] = the s-th K range's partial sums of x[b] @ A_{slot b}^T for every row b with an adapter.

    x: (B, K) with contiguous rows; pool: (numel,) of x's dtype; y: (>= launch.split, B, >= max_rank) float32;
    row_slot: (B,) int32; offA, rankA: (S,) int64; max_rank: the largest R_s the grid must cover (fixed, so that a
    captured CUDA graph replays for any adapter mix)."""
    if x.dim() != 2 or x.stride(1) != 1:
        raise ValueError(f"x must be (rows, in_features) with contiguous rows, got {tuple(x.shape)} {x.stride()}.")
    if pool.dtype != x.dtype or pool.dim() != 1:
        raise ValueError(f"pool must be 1-D of x's dtype {x.dtype}, got {tuple(pool.shape)} {pool.dtype}.")
    B, K = x.shape
    split = launch.split
    if not 1 <= split <= K:
        raise ValueError(f"split={split} for K={K}: use 1 to {K} (rankwise.serve.kernels.triton_lora_rows.tune_rows).")
    if (y.dtype != torch.float32 or y.dim() != 3 or y.shape[0] < split or y.shape[1] < B or y.shape[2] < max_rank
            or y.stride(2) != 1):
        raise ValueError(f"y must be a (>= {split}, >= {B}, >= {max_rank}) float32 buffer, got {tuple(y.shape)} "
                         f"{y.dtype}.")
    _check_rows(row_slot, B, x.device)
    if offA.dtype != torch.int64 or rankA.dtype != torch.int64 or offA.shape != rankA.shape:
        raise ValueError(f"offA and rankA must be int64 of one shape (S,), got {offA.dtype} {tuple(offA.shape)} "
                         f"and {rankA.dtype} {tuple(rankA.shape)}.")
    if B == 0 or max_rank == 0:
        return
    block_k = min(launch.shrink_block_k, max(16, triton.next_power_of_2(triton.cdiv(K, split))))
    k_per = triton.cdiv(triton.cdiv(K, split), block_k) * block_k
    grid = (B, split, triton.cdiv(max_rank, launch.shrink_block_r))
    _rows_shrink_kernel[grid](x, pool, y, row_slot, offA, rankA, K, x.stride(0), y.stride(0), y.stride(1),
                              K_PER=k_per, BLOCK_R=launch.shrink_block_r, BLOCK_K=block_k, **pdl.launch_options(x))


def lora_expand_rows(y: torch.Tensor, out: torch.Tensor, pool: torch.Tensor, row_slot: torch.Tensor,
                     part_cols: tuple[int, ...], offB: torch.Tensor, rankB: torch.Tensor, r0: torch.Tensor,
                     scale: torch.Tensor, offG: torch.Tensor, *, launch: RowLaunch) -> None:
    """out[b, cols_p] = g * (out[b, cols_p] + scale * round(sum_s y[s, b, r0:r0 + r]) @ B^T) in place, for every row
    with an adapter (`lora_expand_ref` over blocks of one row). out: (B, N_total), parts at `part_cols` (1 to 3)."""
    P = len(part_cols) - 1
    if not 1 <= P <= 3 or part_cols[0] != 0 or part_cols[-1] != out.shape[1]:
        raise ValueError(f"part_cols={part_cols}: need 2 to 4 boundaries from 0 to out's width {out.shape[1]}.")
    if out.dim() != 2 or out.stride(1) != 1 or pool.dtype != out.dtype:
        raise ValueError(f"out must be (rows, N) with contiguous rows and pool's dtype {pool.dtype}; got "
                         f"{tuple(out.shape)} strides {out.stride()} {out.dtype}.")
    B = out.shape[0]
    if y.dtype != torch.float32 or y.dim() != 3 or y.shape[0] < launch.split or y.shape[1] < B or y.stride(2) != 1:
        raise ValueError(f"y must be the (>= {launch.split}, >= {B}, R) float32 buffer the shrink wrote, got "
                         f"{tuple(y.shape)} {y.dtype}.")
    _check_rows(row_slot, B, out.device)
    S = offB.shape[-1]
    for name, t, dt in (("offB", offB, torch.int64), ("rankB", rankB, torch.int64), ("r0", r0, torch.int64),
                        ("scale", scale, torch.float32), ("offG", offG, torch.int64)):
        if t.dtype != dt or tuple(t.shape) != (P, S) or not t.is_contiguous():
            raise ValueError(f"{name} must be a contiguous ({P}, {S}) {dt} table, got {tuple(t.shape)} {t.dtype}.")
    if B == 0:
        return
    widths = [part_cols[i + 1] - part_cols[i] for i in range(P)] + [0] * (3 - P)
    cols = list(part_cols[1:P]) + [out.shape[1]] * (3 - P)
    block_n = min(launch.expand_block_n, max(16, triton.next_power_of_2(max(widths))))
    tiles = [triton.cdiv(w, block_n) for w in widths]
    _rows_expand_kernel[(B, sum(tiles))](
        y, out, pool, row_slot, offB, rankB, r0, scale, offG, S, cols[0], cols[1], widths[0], widths[1], widths[2],
        tiles[0], tiles[1], launch.split, y.stride(0), y.stride(1), out.stride(0),
        BLOCK_N=block_n, BLOCK_R=launch.expand_block_r, **pdl.launch_options(out),
    )


# ---- launch shapes ---------------------------------------------------------------------------------------

_TUNED: dict[tuple, RowLaunch] = {}
L2_SPAN_BYTES = 128 << 20  # tuning reads this many bytes of distinct adapters per replay: more than any L2 holds


def _candidates(K: int) -> tuple[list[tuple[int, int, int]], list[tuple[int, int]]]:
    """(split, rank tile, K tile) shrink shapes and (rank tile, column tile) expand shapes `tune_rows` tries, the
    default first (bench/lora_decode_variants.py ranks them at K = 2048; splits scale with K)."""
    s = max(1, triton.cdiv(K, 512))
    shrinks = [(s, 16, 512), (s, 8, 512), (s, 32, 512), (max(1, s // 2), 16, 512), (2 * s, 8, 256), (s, 16, 256)]
    return shrinks, [(64, 256), (32, 256), (64, 128), (32, 512)]


def tune_rows(K: int, part_widths: tuple[int, ...], rows: int, max_lora_rank: int, dtype: torch.dtype,
              device: torch.device) -> RowLaunch:
    """The fastest `RowLaunch` for a site of input K and these output parts in a decode step of `rows` rows, each
    with its own adapter (ranks cycling 8 to max_lora_rank), timed once per process. Each timed replay runs the
    site over enough distinct adapter copies to read L2_SPAN_BYTES, so the weights come from memory, as in a
    decode step over many layers, not from the L2 cache."""
    key = (torch.cuda.get_device_name(device), dtype, K, part_widths, rows, max_lora_rank)
    if key in _TUNED:
        return _TUNED[key]
    P, S = len(part_widths), rows
    ranks = [min(max_lora_rank, 8 << (s % 4)) for s in range(S)]
    offA, offB, rankB, r0, cursor = [], [[0] * S for _ in range(P)], [[0] * S for _ in range(P)], \
        [[0] * S for _ in range(P)], 0
    for s, r in enumerate(ranks):
        offA.append(cursor)
        cursor += P * r * K
        for p, w in enumerate(part_widths):
            offB[p][s], rankB[p][s], r0[p][s] = cursor, r, p * r
            cursor += r * w
    copies = max(1, -(-L2_SPAN_BYTES // (cursor * torch.empty((), dtype=dtype).element_size())))
    i64 = lambda v: torch.tensor(v, dtype=torch.int64, device=device)  # noqa: E731
    pool = (torch.randn(cursor * copies, device=device) * 0.02).to(dtype)
    shift = [c * cursor for c in range(copies)]
    offA_t = [i64([o + d for o in offA]) for d in shift]
    offB_t = [i64([[o + d for o in row] for row in offB]) for d in shift]
    rankA_t, rankB_t, r0_t = i64([P * r for r in ranks]), i64(rankB), i64(r0)
    scale, offG = torch.ones(P, S, device=device), i64([[-1] * S] * P)
    row_slot = torch.arange(S, dtype=torch.int32, device=device)
    x = torch.randn(S, K, device=device).to(dtype)
    out = torch.zeros(S, sum(part_widths), device=device, dtype=dtype)
    cols = (0, *itertools.accumulate(part_widths))
    y = torch.zeros(max_row_split(K), S, P * max_lora_rank, device=device)
    shrinks, expands = _candidates(K)

    def shrink_all(c: RowLaunch) -> None:
        for oa in offA_t:
            lora_shrink_rows(x, pool, y, row_slot, oa, rankA_t, max_rank=P * max_lora_rank, launch=c)

    def expand_all(c: RowLaunch) -> None:
        for ob in offB_t:
            lora_expand_rows(y, out, pool, row_slot, cols, ob, rankB_t, r0_t, scale, offG, launch=c)

    timed = []
    for split, br, bk in shrinks:
        c = RowLaunch(split, br, bk)
        try:
            timed.append((graph_us(lambda: shrink_all(c), calls=2), c))
        except Exception:  # a shape that does not compile or launch on this GPU is not a candidate
            continue
    best = min(timed, key=lambda tc: tc[0])[1] if timed else default_row_launch(K)
    timed = []
    for br, bn in expands:
        c = RowLaunch(best.split, best.shrink_block_r, best.shrink_block_k, br, bn)
        try:
            timed.append((graph_us(lambda: expand_all(c), calls=2), c))
        except Exception:
            continue
    if timed:
        best = min(timed, key=lambda tc: tc[0])[1]
    _TUNED[key] = best
    return best


__all__ = ["RowLaunch", "default_row_launch", "lora_expand_rows", "lora_shrink_rows", "max_row_split", "tune_rows"]
