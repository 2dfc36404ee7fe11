"""A whole decode step's batched LoRA (16 layers x q/k/v and o, 32 rows of 32 distinct adapters, ranks 8-64) read
from HBM: the segmented kernels of `triton_lora.py` at their launch shapes against the row-form kernels of
`triton_lora_rows.py` (GEMV, one row per program) over a grid of tiles (GPU machine).

Every layer has its own adapters, so the step's ~410 MB stream from HBM as they do in serving (replaying one
site, as a naive tuning would, keeps its weights in the 50 MB L2). Usage: python3 bench/lora_decode_variants.py
[--out DIR] [--check] (--check: the row kernels against the reference at small sizes only, also under
TRITON_INTERPRET=1 on CPU). Writes lora_decode_variants.json; prints a table last.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rankwise.serve.kernels import triton_lora as tlora  # noqa: E402
from rankwise.serve.kernels.reference import lora_expand_ref, lora_shrink_ref  # noqa: E402
from rankwise.serve.kernels.triton_lora_rows import RowLaunch, lora_expand_rows, lora_shrink_rows  # noqa: E402
from rankwise.serve.lora_batch import plan_blocks  # noqa: E402


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
    """The row kernels against the reference at small sizes, with repeated and missing adapters."""
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
    for launch in (RowLaunch(1, 16, 64, 16, 32), RowLaunch(2, 8, 64, 64, 64), RowLaunch(4, 16, 32, 16, 16)):
        y = torch.zeros(launch.split, len(slots), site["max_rank"], device=device)
        row_slot = torch.tensor(slots, dtype=torch.int32, device=device)
        lora_shrink_rows(x, site["pool"], y, row_slot, site["offA"], site["rankA"], max_rank=site["max_rank"],
                         launch=launch)
        out = out0.clone()
        lora_expand_rows(y, out, site["pool"], row_slot, site["cols"], site["offB"], site["rankB"], site["r0"],
                         site["scale"], site["offG"], launch=launch)
        y_rows = torch.zeros_like(y_r)
        y_rows[torch.tensor(order).long()] = y_r  # grouped positions -> rows
        torch.testing.assert_close(y.sum(0), y_rows, atol=1e-2, rtol=1e-2)
        torch.testing.assert_close(out.float(), out_r.float(), atol=3e-2, rtol=3e-2)
    print("row kernels match the reference")


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
    # row form: one row per program
    rows_slot = torch.arange(B, dtype=torch.int32, device=device)
    for name in sites:
        for split, br, bk in itertools.product((1, 2, 4, 8), (8, 16, 32), (128, 256, 512)):
            c = RowLaunch(split, br, bk)

            def fn(c=c, name=name):
                for lay in layers:
                    t = lay[name]
                    lora_shrink_rows(x, t["pool"], y, rows_slot, t["offA"], t["rankA"], max_rank=t["max_rank"],
                                     launch=c)
            record("rows", name, f"shrink split={split} br={br} bk={bk}", step_us(fn))
        for split, br, bn in itertools.product((1, 4), (16, 32, 64), (128, 256, 512)):
            c = RowLaunch(split, expand_block_r=br, expand_block_n=bn)

            def fn(c=c, name=name):
                for lay in layers:
                    t = lay[name]
                    lora_expand_rows(y, outs[name], t["pool"], rows_slot, t["cols"], t["offB"], t["rankB"], t["r0"],
                                     t["scale"], t["offG"], launch=c)
            record("rows", name, f"expand split={split} br={br} bn={bn}", step_us(fn))
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
    for kind in ("tiled", "rows"):
        tot = sum(r["us_step"] for (k, _, _), r in best.items() if k == kind)
        print(f"{kind:<6} total {tot:8.1f} us  = {nbytes / tot / 1e6:.2f} TB/s")


if __name__ == "__main__":
    main()
