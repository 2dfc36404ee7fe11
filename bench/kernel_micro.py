"""Per-kernel timings of the fused adapter path at one Llama-3.2-1B layer's shapes (GPU machine).

Usage: PYTHONPATH=. python bench/kernel_micro.py. Writes $OUT/kernel_micro.json if OUT is set.
With --serve: the serving kernels instead (`serve_main`, below), written to $OUT/kernel_micro_serve.json.

For each projection shape (tokens M = 8192), rank 16:
- the fused kernels' achieved bandwidth (bytes: each activation read or written once; adapter-sized tensors
  are negligible) for a few block sizes;
- one adapted layer's forward + backward minus the frozen base layer's, for the fused path, the two-pass path
  (shrink / expand / reduce, what ranks above 128 use) and dh by a separate pass instead of atomics;
- the same at M = 64 tokens, where the GPU work is negligible: the host-side cost per adapter.
A device-to-device copy gives the bandwidth ceiling.
"""

from __future__ import annotations

import json
import os
import time

import torch
import triton.testing
from torch.nn import functional as F

import rankwise.kernels.lora_fused as fused
from rankwise.kernels.dora_norm import dora_row_norm
from rankwise.kernels.lora_backward import lora_grad_dy, lora_grad_x_
from rankwise.kernels.lora_forward import launch_forward, lora_forward_

SHAPES = {"q/o": (2048, 2048), "k/v": (2048, 512), "gate/up": (2048, 8192), "down": (8192, 2048)}  # (in, out)
M = 8192


def ms(fn) -> float:
    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


def gbps(nbytes: float, t_ms: float) -> float:
    return nbytes / t_ms / 1e6


def layer_overhead(K: int, N: int, r: int, tokens: int, variant: str) -> tuple[float, float]:
    """(fwd+bwd of the adapted layer minus the base layer's, the base layer's), ms."""
    dev = "cuda"
    x = torch.randn(tokens, K, device=dev, dtype=torch.bfloat16, requires_grad=True)
    W = (torch.randn(N, K, device=dev) / K**0.5).bfloat16()
    A = torch.randn(r, K, device=dev, requires_grad=True)
    B = (torch.randn(N, r, device=dev) * 0.01).requires_grad_()
    m = torch.linalg.vector_norm(W.float(), dim=1).requires_grad_()
    dy = torch.randn(tokens, N, device=dev, dtype=torch.bfloat16)
    seed = torch.tensor([1], dtype=torch.int64, device=dev)

    def run(fn):
        def go():
            x.grad = A.grad = B.grad = m.grad = None
            fn().backward(dy)
        return ms(go)

    base = run(lambda: F.linear(x, W))
    saved = fused.MAX_RANK, fused.DH_ATOMIC_MAX_COLUMNS
    if variant.startswith("two-pass"):
        fused.MAX_RANK = 0
    if variant.startswith("dh-by-shrink"):
        fused.DH_ATOMIC_MAX_COLUMNS = 0
    if variant.startswith("dh-atomic"):
        fused.DH_ATOMIC_MAX_COLUMNS = 1 << 30
    try:
        if variant.endswith("dora"):
            t = run(lambda: fused.fused_dora_linear(x, W, None, A, B, 2.0, m))
        elif variant.endswith("dropout"):
            t = run(lambda: fused.fused_lora_linear(x, W, None, A, B, 2.0, None, 0.05, seed))
        else:
            t = run(lambda: fused.fused_lora_linear(x, W, None, A, B, 2.0))
    finally:
        fused.MAX_RANK, fused.DH_ATOMIC_MAX_COLUMNS = saved
    return t - base, base


def main() -> None:
    torch.backends.cuda.matmul.allow_tf32 = True
    dev = "cuda"
    rows: list[dict] = []

    def add(kernel, shape, config, t, nbytes=None):
        rows.append({"kernel": kernel, "shape": shape, "config": config, "ms": t,
                     "GB/s": gbps(nbytes, t) if nbytes else float("nan")})

    big = torch.empty(2**29, dtype=torch.bfloat16, device=dev)
    t = ms(big.clone)
    ceiling = gbps(2 * big.numel() * 2, t)
    add("copy 1 GiB", "-", "-", t, 2 * big.numel() * 2)
    del big
    tiny = torch.zeros(1, device=dev)
    add("empty torch op (tiny add_)", "-", "-", ms(lambda: tiny.add_(1)))
    # host cost of issuing work: time 200 calls on the host, then synchronise
    xs, Ws = torch.randn(16, 2048, device=dev, dtype=torch.bfloat16), torch.randn(2048, 2048, device=dev,
                                                                                    dtype=torch.bfloat16)
    As, Bs = torch.randn(16, 2048, device=dev), torch.randn(2048, 16, device=dev)
    ys = torch.empty(16, 2048, device=dev, dtype=torch.bfloat16)
    for name, fn in (("host: tiny add_", lambda: tiny.add_(1)), ("host: F.linear", lambda: F.linear(xs, Ws)),
                     ("host: launch_forward", lambda: launch_forward(xs, As, Bs, ys, 1.0, None, None, None, None, 0.0,
                                                                     "tf32"))):
        for _ in range(20):
            fn()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(200):
            fn()
        add(name, "16 tok", "per call", (time.perf_counter() - t0) / 200 * 1e3)
        torch.cuda.synchronize()
    r = 16
    for label, (K, N) in SHAPES.items():
        x = torch.randn(M, K, device=dev, dtype=torch.bfloat16)
        y = torch.randn(M, N, device=dev, dtype=torch.bfloat16)
        A, B = torch.randn(r, K, device=dev), torch.randn(N, r, device=dev)
        h = torch.randn(M, r, device=dev)
        for bm in (16, 32):
            add("forward (x -> h, y += ...)", label, f"block_m={bm}",
                ms(lambda: lora_forward_(x, A, B, y, scale=1.0, block_m=bm)), M * K * 2 + 2 * M * N * 2)
        for bm, bn in ((64, 128), (32, 128)):
            flat = torch.zeros(M * r + N * r, device=dev)
            dh, db = flat[: M * r].view(M, r), flat[M * r:].view(N, r)
            add("grad_dy (dB, dh atomic)", label, f"bm={bm},bn={bn}",
                ms(lambda: lora_grad_dy(y, h, B, scale=1.0, dh=dh, db=db, block_m=bm, block_n=bn)), M * N * 2)
            add("grad_dy (dB only)", label, f"bm={bm},bn={bn}",
                ms(lambda: lora_grad_dy(y, h, None, scale=1.0, db=db, block_m=bm, block_n=bn)), M * N * 2)
            da = torch.zeros(r, K, device=dev)
            dx = torch.randn(M, K, device=dev, dtype=torch.bfloat16)
            add("grad_x (dA, dx += dh A)", label, f"bm={bm},bk={bn}",
                ms(lambda: lora_grad_x_(x, h, A, dx=dx, da=da, block_m=bm, block_k=bn)), 3 * M * K * 2)
        W = torch.randn(N, K, device=dev, dtype=torch.bfloat16)
        add("dora_row_norm", label, "-", ms(lambda: dora_row_norm(W, A, B, 2.0)), N * K * 2)
        for variant in ("fused", "dh-by-shrink", "fused dropout", "fused dora"):
            over, base = layer_overhead(K, N, r, M, variant)
            add(f"layer - base: {variant}", label, f"base {base:.3f} ms", over)
        for variant in ("fused", "fused dora"):
            over, base = layer_overhead(K, N, r, 64, variant)
            add(f"host cost (64 tokens): {variant}", label, f"base {base:.3f} ms", over)
        torch.cuda.empty_cache()
    out = os.environ.get("OUT")
    if out:
        with open(os.path.join(out, "kernel_micro.json"), "w") as fh:
            json.dump({"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows}, fh, indent=1)
    print(f"{'kernel':<36} {'shape':<8} {'config':<18} {'ms':>8} {'GB/s':>7}")
    for row in rows:
        print(f"{row['kernel']:<36} {row['shape']:<8} {row['config']:<18} {row['ms']:>8.4f} {row['GB/s']:>7.0f}")
    print(f"bandwidth ceiling (copy): {ceiling:.0f} GB/s")


# ---- serving kernels (--serve) ---------------------------------------------------------------------------

def graph_ms(fn, calls: int = 50) -> float:
    """ms per call of `fn` replayed from a CUDA graph of `calls` calls (no host launch cost: small kernels are
    timed as a decode step's graph runs them); median of 5 replays."""
    from rankwise.serve.kernels.graph_timing import graph_us

    return graph_us(fn, calls, replays=5) / 1e3


def lora_site(K: int, parts: tuple[int, ...], n_adapters: int, dev="cuda", dtype=torch.bfloat16):
    """A pool with n adapters at one site, ranks cycling 8, 16, 32, 64 (every part), and its (P, S) tables."""
    S, P = n_adapters, len(parts)
    cycle = [8, 16, 32, 64]
    offA, offB, rankB, r0 = [], [[0] * S for _ in parts], [[0] * S for _ in parts], [[0] * S for _ in parts]
    cursor = 0
    for s in range(S):
        r = cycle[s % 4]
        offA.append(cursor)
        cursor += -(-P * r * K // 64) * 64
        for p, w in enumerate(parts):
            offB[p][s], rankB[p][s], r0[p][s] = cursor, r, p * r
            cursor += -(-r * w // 64) * 64
    pool = (torch.randn(cursor, device=dev) * 0.02).to(dtype)
    i64 = lambda x: torch.tensor(x, dtype=torch.int64, device=dev)
    tables = dict(offA=i64(offA), rankA=i64([P * cycle[s % 4] for s in range(S)]), offB=i64(offB),
                  rankB=i64(rankB), r0=i64(r0), scale=torch.ones(P, S, device=dev), offG=i64([[-1] * S] * P))
    return pool, tables


def serve_main() -> None:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from rankwise.serve.kernels import triton_lora as tlora
    from rankwise.serve.kernels.triton_attention import (
        paged_decode_attention,
        paged_decode_attention_rope,
        prefill_attention,
    )
    from rankwise.serve.kernels.triton_fused import add_rms, rope_kv, silu_mul
    from rankwise.serve.kernels.triton_sampling import greedy_advance
    from rankwise.serve.lora_batch import plan_blocks
    from rankwise.serve.model import seq_starts

    dev, dt = "cuda", torch.bfloat16
    rows: list[dict] = []

    def save(rows):
        out = os.environ.get("OUT")
        if out:
            with open(os.path.join(out, "kernel_micro_serve.json"), "w") as fh:
                json.dump({"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows}, fh,
                          indent=1)

    def add(kernel, case, config, t):
        rows.append({"kernel": kernel, "case": case, "config": config, "us": 1e3 * t})
        print(f"{kernel:<34} {case:<26} {config:<34} {1e3 * t:>9.1f} us", flush=True)

    # LoRA at one site over segmented-kernel launch shapes: decode (32 rows of 32 distinct adapters,
    # or of 1 adapter) and prefill (one adapter per prompt, the engine's padded block count)
    shapes = [tlora.LoraLaunch(8), tlora.LoraLaunch(8, 32), tlora.LoraLaunch(16), tlora.LoraLaunch(4),
              tlora.LoraLaunch(8, 16, 64, 128), tlora.LoraLaunch(8, 16, 32, 256), tlora.LoraLaunch(1)]
    plan = [("qkv", "decode 32 adapters", list(range(32))), ("o", "decode 32 adapters", list(range(32))),
            ("qkv", "decode 1 adapter", [0] * 32), ("qkv", "prefill 300 tok, 1 adapter", [5] * 300),
            ("o", "prefill 300 tok, 1 adapter", [5] * 300),
            ("qkv", "prefill 2048 tok, 4 adapters", [s for s in range(4) for _ in range(512)]),
            ("gate_up", "decode 32 adapters", list(range(32))), ("down", "decode 32 adapters", list(range(32)))]
    sites = {"qkv": (2048, (2048, 512, 512)), "o": (2048, (2048,)), "gate_up": (2048, (8192, 8192)),
             "down": (8192, (2048,))}
    pools = {}
    for site, case, slots in plan:
        K, parts = sites[site]
        pool, tb = pools.setdefault(site, lora_site(K, parts, 40))
        cols = tuple([0] + list(torch.tensor(parts).cumsum(0).tolist()))
        T = len(slots)
        x = torch.randn(T, K, device=dev, dtype=dt)
        out = torch.randn(T, cols[-1], device=dev, dtype=dt)
        nb = T if case.startswith("decode") else T // 16 + 32  # the engine's decode rows / padded prefill blocks
        order, st, en, sl = plan_blocks(slots, 16, num_blocks=nb)
        meta = [torch.tensor(a, dtype=torch.int32, device=dev) for a in (order, st, en, sl)]
        y = torch.empty(64, T, 3 * 64, device=dev)  # room for every split below
        for c in shapes + [tlora.default_launch(K, nb)]:
            split = c.split * K // 2048 if c.split > 1 else 1  # the same K per program for K = 8192

            def both():
                tlora.lora_shrink(x, pool, y, *meta, tb["offA"], tb["rankA"], max_rank=len(parts) * 64, split=split,
                                  block_r=c.shrink_block_r)
                tlora.lora_expand(y, out, pool, *meta, cols, tb["offB"], tb["rankB"], tb["r0"], tb["scale"],
                                  tb["offG"], split=split, block_r=c.expand_block_r, block_n=c.expand_block_n)
            add(f"lora {site} shrink+expand", case, f"split={split} br={c.shrink_block_r} "
                f"ex=({c.expand_block_r},{c.expand_block_n})", graph_ms(both))
    del pools
    torch.cuda.empty_cache()
    save(rows)

    # one decode layer's other kernels at batch 32, and the whole-model GEMMs
    B, H, Hkv, D, bs = 32, 32, 8, 64, 16
    hidden, inter, vocab = 2048, 8192, 128256
    x = torch.randn(B, hidden, device=dev, dtype=dt)
    w = torch.randn(hidden, device=dev, dtype=dt)
    add("add_rms", "B=32", "-", graph_ms(lambda: add_rms(x, x, w, 1e-5)))
    gu = torch.randn(B, 2 * inter, device=dev, dtype=dt)
    add("silu_mul", "B=32", "-", graph_ms(lambda: silu_mul(gu)))
    for name, (n, k) in {"qkv": (3072, 2048), "o": (2048, 2048), "gate_up": (16384, 2048), "down": (2048, 8192),
                         "lm_head": (vocab, 2048)}.items():
        W = torch.randn(n, k, device=dev, dtype=dt)
        xa = torch.randn(B, k, device=dev, dtype=dt)
        add("cuBLAS x @ W^T", f"{name} B=32", f"{n}x{k}", graph_ms(lambda: xa @ W.t()))
        if name == "lm_head":
            add("lm_head + float + argmax", "B=32", "-", graph_ms(lambda: (xa @ W.t()).float().argmax(-1)))
            add("lm_head + argmax (bf16)", "B=32", "-", graph_ms(lambda: (xa @ W.t()).argmax(-1)))
    # the GEMMs of a whole decode step (16 layers + LM head) as one graph, with cuBLAS and with cuBLASLt
    mats = [torch.randn(n, k, device=dev, dtype=dt) for _ in range(16)
            for n, k in ((3072, 2048), (2048, 2048), (16384, 2048), (2048, 8192))]
    mats.append(torch.randn(vocab, 2048, device=dev, dtype=dt))
    xs = [torch.randn(B, m.shape[1], device=dev, dtype=dt) for m in mats]
    gbytes = sum(m.numel() * 2 for m in mats) / 1e9
    for lib in ("cublas", "cublaslt"):
        torch.backends.cuda.preferred_blas_library(lib)
        t = graph_ms(lambda: [x_ @ m.t() for x_, m in zip(xs, mats)], calls=5)
        add("decode step GEMMs (graph)", f"B=32 {gbytes:.2f} GB", lib, t)
    torch.backends.cuda.preferred_blas_library("cublas")
    NB = 2200
    kc = torch.randn(NB, bs, Hkv, D, device=dev, dtype=dt)
    vc = torch.randn_like(kc)
    cos, sin = torch.randn(4096, D, device=dev, dtype=dt), torch.randn(4096, D, device=dev, dtype=dt)
    qkv = torch.randn(B, (H + 2 * Hkv) * D, device=dev, dtype=dt)
    tables = torch.randperm(NB - 1, device=dev)[: B * 64].add(1).view(B, 64).to(torch.int32)
    active = torch.ones(B, dtype=torch.bool, device=dev)
    greedy_logits = torch.randn(B, vocab, device=dev, dtype=dt)
    tok, posb = torch.zeros(B, dtype=torch.int64, device=dev), torch.zeros(B, dtype=torch.int64, device=dev)
    add("argmax (torch)", "B=32 bf16", "-", graph_ms(lambda: greedy_logits.argmax(-1)))
    add("greedy_advance (Triton)", "B=32 bf16", "-", graph_ms(lambda: greedy_advance(greedy_logits, tok, posb, active)))
    for ctx in (192, 1024):
        pos = torch.full((B,), ctx - 1, dtype=torch.int64, device=dev)
        lens = (pos + 1).to(torch.int32)
        slots = tables.gather(1, (pos // bs)[:, None])[:, 0].long() * bs + pos % bs

        def separate():
            q, _ = rope_kv(qkv, cos, sin, pos, slots, kc, vc, H)
            paged_decode_attention(q, kc, vc, tables, lens, D ** -0.5)
        add("rope_kv + paged attention", f"B=32 ctx={ctx}", "2 kernels", graph_ms(separate))
        add("paged attention with rope", f"B=32 ctx={ctx}", "1 kernel",
            graph_ms(lambda: paged_decode_attention_rope(qkv, cos, sin, pos, active, kc, vc, tables, D ** -0.5, H)))
    for lens in ([300], [512] * 4, [64] * 8 + [100] * 6):
        T = sum(lens)
        q = torch.randn(T, H, D, device=dev, dtype=dt)
        k, v = torch.randn(T, Hkv, D, device=dev, dtype=dt), torch.randn(T, Hkv, D, device=dev, dtype=dt)
        starts = torch.tensor(seq_starts(lens, T), dtype=torch.int32, device=dev)
        add("prefill attention (Triton varlen)", f"{len(lens)} prompts, {T} tok", "-",
            graph_ms(lambda: prefill_attention(q, k, v, starts, D ** -0.5)))

        def sdpa():
            s0 = 0
            for n in lens:
                with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]):
                    torch.nn.functional.scaled_dot_product_attention(
                        q[s0: s0 + n].transpose(0, 1)[None], k[s0: s0 + n].transpose(0, 1)[None],
                        v[s0: s0 + n].transpose(0, 1)[None], is_causal=True, enable_gqa=True)
                s0 += n
        add("prefill attention (SDPA per prompt)", f"{len(lens)} prompts, {T} tok", "-", graph_ms(sdpa))
    save(rows)


if __name__ == "__main__":
    import sys

    serve_main() if "--serve" in sys.argv else main()
