"""Decode attention alone (GPU machine): split-context programs against one program per (row, KV head).

Usage: python3 bench/decode_attention.py [--out DIR]. Llama-3.2-1B's attention shape (32 heads, 8 KV heads, head dim
64, blocks of 16 tokens, bf16), the engine's kernel (`paged_decode_attention_rope`: rotary, cache write and
attention in one launch), for batch sizes x context lengths x `DECODE_LAUNCH["splits"]`. Each configuration is a
CUDA graph of calls over distinct caches (one per "layer", at least 256 MB in all) with random block tables, so the
keys and values come from HBM as in a decode step, not from L2. Reports us per call, the bandwidth of the keys and
values read, and the largest difference from the unsplit output. Writes decode_attention.json; a table last.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

from rankwise.serve.kernels import triton_attention as ta

H, HKV, D, BS = 32, 8, 64, 16
SPLITS = (1, 2, 4, 8, 16)
CASES = [(b, c) for b in (1, 4, 8, 32) for c in (192, 1024, 4096) if b * c <= 32 * 1024]


def build(B: int, ctx: int, min_bytes: float = 256e6, seed: int = 0):
    """Caches, block tables and inputs for `layers` independent calls of one configuration."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    nblk = -(-ctx // BS)
    per_layer = 2 * B * nblk * BS * HKV * D * 2
    layers = int(min(256, max(16, -(-min_bytes // per_layer))))
    NB = B * nblk + 1
    k = torch.randn(layers, NB, BS, HKV, D, device="cuda", dtype=torch.bfloat16, generator=g)
    v = torch.randn(layers, NB, BS, HKV, D, device="cuda", dtype=torch.bfloat16, generator=g)
    tables = torch.randperm(NB - 1, device="cuda", generator=g)[: B * nblk].add(1).view(B, nblk).to(torch.int32)
    qkv = torch.randn(B, (H + 2 * HKV) * D, device="cuda", dtype=torch.bfloat16, generator=g)
    cos = torch.randn(ctx, D, device="cuda", dtype=torch.bfloat16, generator=g)
    sin = torch.randn(ctx, D, device="cuda", dtype=torch.bfloat16, generator=g)
    pos = torch.full((B,), ctx - 1, device="cuda", dtype=torch.int64)
    active = torch.ones(B, dtype=torch.bool, device="cuda")
    return layers, k, v, tables, qkv, cos, sin, pos, active


def time_config(B: int, ctx: int, splits: int, data) -> tuple[float, torch.Tensor]:
    layers, k, v, tables, qkv, cos, sin, pos, active = data
    ta.DECODE_LAUNCH["splits"] = splits

    def call(i):
        return ta.paged_decode_attention_rope(qkv, cos, sin, pos, active, k[i], v[i], tables, D ** -0.5, H)

    out = call(0)  # compile outside the graph
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(layers):
            call(i)
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(5):
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(1e3 * start.elapsed_time(end) / layers)
    return sorted(times)[2], out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    args = ap.parse_args()
    saved = dict(ta.DECODE_LAUNCH)
    res = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
           "launch": saved, "rows": []}
    for B, ctx in CASES:
        data = build(B, ctx)
        kv_bytes = 2 * B * ctx * HKV * D * 2
        base_us, base_out = None, None
        for splits in SPLITS:
            if splits > -(-ctx // (saved["block_n"] or 128)):
                continue  # more splits than tiles: the extra programs have no key
            try:
                us, out = time_config(B, ctx, splits, data)
            except Exception as exc:  # a shape that does not compile is not a candidate
                res["rows"].append({"batch": B, "context": ctx, "splits": splits, "error": repr(exc)[:200]})
                continue
            if splits == 1:
                base_us, base_out = us, out
            diff = float((out.float() - base_out.float()).abs().max()) if base_out is not None else None
            row = {"batch": B, "context": ctx, "splits": splits, "us": us, "tb_s": kv_bytes / us / 1e6,
                   "speedup": base_us / us if base_us else None, "max_diff_vs_unsplit": diff,
                   "programs": B * HKV * splits}
            res["rows"].append(row)
            print(json.dumps(row), flush=True)
        del data
        torch.cuda.empty_cache()
        ta.DECODE_LAUNCH.clear()
        ta.DECODE_LAUNCH.update(saved)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    Path(args.out, "decode_attention.json").write_text(json.dumps(res, indent=1))
    print(f"\n{res['gpu']}: decode attention (rotary + cache write + attention), us per layer call")
    print(f"{'batch':>5} {'context':>7} {'splits':>6} {'programs':>8} {'us':>8} {'TB/s':>6} {'speedup':>7} {'diff':>8}")
    for r in res["rows"]:
        if "us" in r:
            print(f"{r['batch']:>5} {r['context']:>7} {r['splits']:>6} {r['programs']:>8} {r['us']:>8.2f} "
                  f"{r['tb_s']:>6.2f} {r['speedup']:>7.2f} {r['max_diff_vs_unsplit']:>8.1e}")
        else:
            print(f"{r['batch']:>5} {r['context']:>7} {r['splits']:>6} error {r['error']}")


if __name__ == "__main__":
    main()
