"""Per-kernel timings of the fused adapter path at one Llama-3.2-1B layer's shapes (GPU machine).

Usage: PYTHONPATH=. python bench/kernel_micro.py. Writes $OUT/kernel_micro.json if OUT is set.

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


if __name__ == "__main__":
    main()
