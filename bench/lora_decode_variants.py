"""A whole decode step's batched LoRA (16 layers x q/k/v and o, 32 rows of 32 distinct adapters, ranks 8-64) from
HBM: the engine's tiled kernels at every launch shape `tune_launch` tries, against GEMV-form kernels (one token per
program, tl.sum instead of tl.dot, compact expand grid) over a grid of tiles (GPU machine).

Why: `tune_launch` times one site replayed 20 times, so its A and B stay in the 50 MB L2; a real step reads 16
layers' adapters from HBM. Here every layer has its own adapters, so the step's ~410 MB stream from HBM as they do
in serving. Usage: python3 bench/lora_decode_variants.py [--out DIR] [--check] (--check: small sizes against the
reference only, also under TRITON_INTERPRET=1 on CPU). Writes lora_decode_variants.json; prints a table last.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
from pathlib import Path

import torch
import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rankwise.serve.kernels import triton_lora as tlora  # noqa: E402
from rankwise.serve.kernels.reference import lora_expand_ref, lora_shrink_ref  # noqa: E402
from rankwise.serve.lora_batch import plan_blocks  # noqa: E402


@triton.jit
def _gemv_shrink(x_ptr, pool_ptr, y_ptr, tok_ptr, bstart_ptr, bslot_ptr, offA_ptr, rank_ptr, K, stride_x, stride_ys,
                 stride_y, K_PER: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
                 LOOP_R: tl.constexpr):
    """y[ks, i, rows] = x[tok[i], k range] . A_s[rows, k range] for a block of one token (decode)."""
    b = tl.program_id(0)
    ks = tl.program_id(1)
    rb = tl.program_id(2)
    slot = tl.load(bslot_ptr + b)
    if slot < 0:
        return
    R = tl.load(rank_ptr + slot)
    i = tl.load(bstart_ptr + b)
    tok = tl.load(tok_ptr + i).to(tl.int64)
    a_base = tl.load(offA_ptr + slot)
    k_first = ks * K_PER
    r_lo = rb * BLOCK_R
    if LOOP_R:
        r_hi = R
    else:
        r_hi = tl.minimum(R, r_lo + BLOCK_R)
    for r0 in range(r_lo, r_hi, BLOCK_R):
        offs_r = r0 + tl.arange(0, BLOCK_R)
        mask_r = offs_r < R
        acc = tl.zeros((BLOCK_R,), dtype=tl.float32)
        for k0 in range(k_first, k_first + K_PER, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            mask_k = offs_k < K
            xk = tl.load(x_ptr + tok * stride_x + offs_k, mask=mask_k, other=0.0).to(tl.float32)
            a = tl.load(pool_ptr + a_base + offs_r[:, None].to(tl.int64) * K + offs_k[None, :],
                        mask=mask_r[:, None] & mask_k[None, :], other=0.0)                    # (BLOCK_R, BLOCK_K)
            acc += tl.sum(a.to(tl.float32) * xk[None, :], axis=1)
        tl.store(y_ptr + ks * stride_ys + i.to(tl.int64) * stride_y + offs_r, acc, mask=mask_r)


@triton.jit
def _gemv_expand(y_ptr, out_ptr, pool_ptr, tok_ptr, bstart_ptr, bslot_ptr, offB_ptr, rankB_ptr, r0_ptr, scale_ptr,
                 offG_ptr, S, c1, c2, w0, w1, w2, t0, t1, SPLIT, stride_ys, stride_y, stride_out,
                 BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr):
    """out[tok[i], cols] += scale * y[i, part rows] @ B^T[:, cols] for a block of one token; the grid's second axis
    runs over the column tiles of all parts back to back (t0, t1: tiles of parts 0 and 1), none of them dead."""
    b = tl.program_id(0)
    pid = tl.program_id(1)
    slot = tl.load(bslot_ptr + b)
    if slot < 0:
        return
    p = tl.where(pid < t0, 0, tl.where(pid < t0 + t1, 1, 2))
    nb = pid - tl.where(p == 0, 0, tl.where(p == 1, t0, t0 + t1))
    width = tl.where(p == 0, w0, tl.where(p == 1, w1, w2))
    c0 = tl.where(p == 0, 0, tl.where(p == 1, c1, c2))
    ps = p * S + slot
    r = tl.load(rankB_ptr + ps)
    if r == 0:
        return
    i = tl.load(bstart_ptr + b)
    tok = tl.load(tok_ptr + i).to(tl.int64)
    row0 = tl.load(r0_ptr + ps)
    b_base = tl.load(offB_ptr + ps)
    offs_n = nb * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < width
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for j0 in range(0, r, BLOCK_R):
        offs_j = j0 + tl.arange(0, BLOCK_R)
        mask_j = offs_j < r
        yj = tl.zeros((BLOCK_R,), dtype=tl.float32)
        for sk in range(SPLIT):
            yj += tl.load(y_ptr + sk * stride_ys + i.to(tl.int64) * stride_y + row0 + offs_j, mask=mask_j, other=0.0)
        bt = tl.load(pool_ptr + b_base + offs_j[:, None].to(tl.int64) * width + offs_n[None, :],
                     mask=mask_j[:, None] & mask_n[None, :], other=0.0)                         # (BLOCK_R, BLOCK_N)
        acc += tl.sum(yj.to(bt.dtype).to(tl.float32)[:, None] * bt.to(tl.float32), axis=0)
    scale = tl.load(scale_ptr + ps)
    g_off = tl.load(offG_ptr + ps)
    o_ptrs = out_ptr + tok * stride_out + c0 + offs_n
    o = tl.load(o_ptrs, mask=mask_n, other=0.0).to(tl.float32) + scale * acc
    if g_off >= 0:
        o = o * tl.load(pool_ptr + g_off + offs_n, mask=mask_n, other=1.0).to(tl.float32)
    tl.store(o_ptrs, o.to(out_ptr.dtype.element_ty), mask=mask_n)


def gemv_shrink(x, pool, y, tok, bstart, bslot, offA, rankA, *, max_rank, split, block_r, block_k, loop_r,
                num_warps=4):
    K = x.shape[1]
    per = triton.cdiv(K, split)
    k_per = triton.cdiv(per, block_k) * block_k
    grid = (bslot.shape[0], split, 1 if loop_r else triton.cdiv(max_rank, block_r))
    _gemv_shrink[grid](x, pool, y, tok, bstart, bslot, offA, rankA, K, x.stride(0), y.stride(0), y.stride(1),
                       K_PER=k_per, BLOCK_R=block_r, BLOCK_K=block_k, LOOP_R=loop_r, num_warps=num_warps)


def gemv_expand(y, out, pool, tok, bstart, bslot, cols, offB, rankB, r0, scale, offG, *, split, block_n, block_r,
                num_warps=4):
    P = len(cols) - 1
    widths = [cols[i + 1] - cols[i] for i in range(P)] + [0] * (3 - P)
    c = list(cols[1:P]) + [out.shape[1]] * (3 - P)
    tiles = [triton.cdiv(w, block_n) for w in widths]
    grid = (bslot.shape[0], sum(tiles))
    _gemv_expand[grid](y, out, pool, tok, bstart, bslot, offB, rankB, r0, scale, offG, offB.shape[-1], c[0], c[1],
                       widths[0], widths[1], widths[2], tiles[0], tiles[1], split, y.stride(0), y.stride(1),
                       out.stride(0), BLOCK_N=block_n, BLOCK_R=block_r, num_warps=num_warps)


def make_site(K, parts, ranks, dtype, device, gen):
    """One site's pool and tables for adapters of these ranks (every part at the adapter's rank)."""
    P, S = len(parts), len(ranks)
    offA, offB, rankB, r0 = [], [[0] * S for _ in range(P)], [[0] * S for _ in range(P)], [[0] * S for _ in range(P)]
    cursor = 0
    for s, r in enumerate(ranks):
        offA.append(cursor)
        cursor += P * r * K
        for p, w in enumerate(parts):
            offB[p][s], rankB[p][s], r0[p][s] = cursor, r, p * r
            cursor += r * w
    i64 = lambda v: torch.tensor(v, dtype=torch.int64, device=device)  # noqa: E731
    pool = (torch.randn(cursor, generator=gen) * 0.05).to(device, dtype)
    return dict(pool=pool, offA=i64(offA), rankA=i64([P * r for r in ranks]), offB=i64(offB), rankB=i64(rankB),
                r0=i64(r0), scale=torch.full((P, S), 0.5, device=device), offG=i64([[-1] * S] * P),
                cols=tuple(itertools.accumulate([0, *parts])), max_rank=P * max(ranks))


def check(device, dtype):
    """Both GEMV kernels against the reference at small sizes, with repeated and missing adapters."""
    gen = torch.Generator().manual_seed(0)
    site = make_site(256, (64, 32, 32), [8, 16, 0, 4], dtype, device, gen)
    slots = [0, 1, 3, -1, 1, 0]
    order, st, en, sl = plan_blocks(slots, 1, num_blocks=len(slots) + 1)
    meta = [torch.tensor(a, dtype=torch.int32, device=device) for a in (order, st, en, sl)]
    x = torch.randn(len(slots), 256, generator=gen).to(device, dtype)
    out0 = torch.randn(len(slots), site["cols"][-1], generator=gen).to(device, dtype)
    y_r = torch.zeros(len(slots), site["max_rank"], device=device)
    lora_shrink_ref(x, site["pool"], y_r, *meta, site["offA"], site["rankA"])
    out_r = out0.clone()
    lora_expand_ref(y_r, out_r, site["pool"], *meta, site["cols"], site["offB"], site["rankB"], site["r0"],
                    site["scale"], site["offG"])
    for split, br, bk, loop_r, bn in [(1, 16, 64, False, 32), (2, 8, 64, True, 64), (4, 16, 32, False, 16)]:
        y = torch.zeros(split, len(slots), site["max_rank"], device=device)
        gemv_shrink(x, site["pool"], y, meta[0], meta[1], meta[3], site["offA"], site["rankA"],
                    max_rank=site["max_rank"], split=split, block_r=br, block_k=bk, loop_r=loop_r)
        out = out0.clone()
        gemv_expand(y, out, site["pool"], meta[0], meta[1], meta[3], site["cols"], site["offB"], site["rankB"],
                    site["r0"], site["scale"], site["offG"], split=split, block_n=bn, block_r=br)
        torch.testing.assert_close(y.sum(0), y_r, atol=1e-2, rtol=1e-2)
        torch.testing.assert_close(out.float(), out_r.float(), atol=3e-2, rtol=3e-2)
    print("gemv kernels match the reference")


def step_us(fn, reps: int = 5) -> float:
    """Microseconds of one call of fn (a whole step's LoRA) replayed from a CUDA graph, median of reps."""
    fn()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    g.replay()
    torch.cuda.synchronize()
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    ts = []
    for _ in range(reps):
        s.record()
        g.replay()
        e.record()
        e.synchronize()
        ts.append(1e3 * s.elapsed_time(e))
    return sorted(ts)[len(ts) // 2]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--check", action="store_true")
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    check(device, dtype)
    if args.check or device.type != "cuda":
        return
    L, B, K = 16, 32, 2048
    sites = {"qkv": (K, (2048, 512, 512)), "o": (K, (2048,))}
    ranks = [8 << (s % 4) for s in range(B)]
    gen = torch.Generator().manual_seed(0)
    layers = [{name: make_site(k, parts, ranks, dtype, device, gen) for name, (k, parts) in sites.items()}
              for _ in range(L)]
    nbytes = sum(t["pool"].numel() * 2 for lay in layers for t in lay.values())
    x = torch.randn(B, K, device=device, dtype=dtype)
    outs = {n: torch.zeros(B, sum(p), device=device, dtype=dtype) for n, (_, p) in sites.items()}
    y = torch.zeros(32, B, 192, device=device)
    rows = []

    def record(kind, name, cfg, us):
        rows.append({"kind": kind, "site": name, "config": cfg, "us_step": us})
        print(f"{kind:<8} {name:<4} {cfg:<44} {us:8.1f} us/step", flush=True)

    # the engine's tiled kernels: blocks of 16 tokens (one per adapter here), every tuned shape
    o16, s16, e16, l16 = plan_blocks(list(range(B)), 16, num_blocks=B)
    m16 = [torch.tensor(a, dtype=torch.int32, device=device) for a in (o16, s16, e16, l16)]
    shrinks, expands = tlora._candidates(K)
    for name in sites:
        for c in shrinks:
            def fn(c=c, name=name):
                for lay in layers:
                    t = lay[name]
                    tlora.lora_shrink(x, t["pool"], y, *m16, t["offA"], t["rankA"], max_rank=t["max_rank"],
                                      split=c.split, block_r=c.shrink_block_r)
            record("tiled", name, f"shrink split={c.split} br={c.shrink_block_r}", step_us(fn))
        for br, bn in expands:
            def fn(br=br, bn=bn, name=name):
                for lay in layers:
                    t = lay[name]
                    tlora.lora_expand(y, outs[name], t["pool"], *m16, t["cols"], t["offB"], t["rankB"], t["r0"],
                                      t["scale"], t["offG"], split=8, block_r=br, block_n=bn)
            record("tiled", name, f"expand split=8 br={br} bn={bn}", step_us(fn))
    # GEMV form: one token per block
    o1, s1, e1, l1 = plan_blocks(list(range(B)), 1, num_blocks=B)
    m1 = [torch.tensor(a, dtype=torch.int32, device=device) for a in (o1, s1, e1, l1)]
    for name in sites:
        for split, br, bk, loop_r, nw in itertools.product((1, 2, 4, 8), (8, 16, 32), (128, 256, 512), (False, True),
                                                           (4, 8)):
            if bk * split > 2 * K:
                continue

            def fn(split=split, br=br, bk=bk, loop_r=loop_r, nw=nw, name=name):
                for lay in layers:
                    t = lay[name]
                    gemv_shrink(x, t["pool"], y, m1[0], m1[1], m1[3], t["offA"], t["rankA"], max_rank=t["max_rank"],
                                split=split, block_r=br, block_k=bk, loop_r=loop_r, num_warps=nw)
            record("gemv", name, f"shrink split={split} br={br} bk={bk} loop_r={int(loop_r)} w={nw}", step_us(fn))
        for split, br, bn, nw in itertools.product((1, 4), (8, 16, 32, 64), (64, 128, 256, 512), (4, 8)):
            def fn(split=split, br=br, bn=bn, nw=nw, name=name):
                for lay in layers:
                    t = lay[name]
                    gemv_expand(y, outs[name], t["pool"], m1[0], m1[1], m1[3], t["cols"], t["offB"], t["rankB"],
                                t["r0"], t["scale"], t["offG"], split=split, block_n=bn, block_r=br, num_warps=nw)
            record("gemv", name, f"expand split={split} br={br} bn={bn} w={nw}", step_us(fn))
    best = {}
    for r in rows:
        key = (r["kind"], r["site"], r["config"].split()[0])
        if key not in best or r["us_step"] < best[key]["us_step"]:
            best[key] = r
    Path(args.out).mkdir(parents=True, exist_ok=True)
    with open(Path(args.out) / "lora_decode_variants.json", "w") as fh:
        json.dump({"gpu": torch.cuda.get_device_name(), "adapter_bytes_per_step": nbytes, "rows": rows}, fh, indent=1)
    print(f"\n== best per kind and pass, one decode step (16 layers), {nbytes / 1e6:.0f} MB of adapters ==")
    for (kind, site, what), r in sorted(best.items()):
        print(f"{kind:<6} {site:<4} {what:<7} {r['us_step']:8.1f} us  {r['config']}")
    for kind in ("tiled", "gemv"):
        tot = sum(r["us_step"] for (k, _, _), r in best.items() if k == kind)
        print(f"{kind:<6} total {tot:8.1f} us  = {nbytes / tot / 1e6:.2f} TB/s")


if __name__ == "__main__":
    main()
