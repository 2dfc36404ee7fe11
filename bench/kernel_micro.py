"""Per-kernel timings of the fused adapter path at one Llama-3.2-1B layer's shapes (GPU machine).

Usage: PYTHONPATH=. python bench/kernel_micro.py [--quick]. Writes $OUT/kernel_micro.json if OUT is set.

For each projection shape (tokens M = 8192): the achieved bandwidth of shrink / expand / reduce over a few
block configurations next to the cuBLAS equivalent, and the time of one adapted layer's forward + backward
(rankwise.kernels.lora_fused) minus the frozen base layer's. Bytes counted: each activation read or written
once (the adapter-sized tensors are negligible). A device-to-device copy gives the bandwidth ceiling.
"""

from __future__ import annotations

import argparse
import json
import os

import torch
import triton.testing
from torch.nn import functional as F

from rankwise.kernels.expand import lora_expand_
from rankwise.kernels.lora_fused import fused_dora_linear, fused_lora_linear
from rankwise.kernels.reduce import lora_reduce
from rankwise.kernels.shrink import lora_shrink

SHAPES = {"q/o": (2048, 2048), "k/v": (2048, 512), "gate/up": (2048, 8192), "down": (8192, 2048)}  # (in, out)
M = 8192


def ms(fn) -> float:
    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


def gbps(nbytes: float, t_ms: float) -> float:
    return nbytes / t_ms / 1e6


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="default block sizes only")
    args = ap.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = True
    dev = "cuda"
    rows: list[dict] = []
    big = torch.empty(2**29, dtype=torch.bfloat16, device=dev)
    t = ms(lambda: big.clone())
    ceiling = gbps(2 * big.numel() * 2, t)
    rows.append({"kernel": "copy 1 GiB", "shape": "-", "config": "-", "ms": t, "GB/s": ceiling})
    del big
    seed = torch.tensor([1], dtype=torch.int64, device=dev)
    configs = [dict()] if args.quick else [dict(), dict(block_m=32), dict(block_m=128), dict(num_warps=8)]
    for label, (K, N) in SHAPES.items():
        for r in (16,) if label != "q/o" else (16, 64, 128):
            tag = f"{label} r={r}"
            x = torch.randn(M, K, device=dev, dtype=torch.bfloat16)
            y = torch.randn(M, N, device=dev, dtype=torch.bfloat16)
            A, B = torch.randn(r, K, device=dev), torch.randn(N, r, device=dev)
            h = torch.randn(M, r, device=dev)
            for cfg in configs:
                name = ",".join(f"{k}={v}" for k, v in cfg.items()) or "default"
                t = ms(lambda: lora_shrink(x, A, **cfg))
                rows.append({"kernel": "shrink", "shape": tag, "config": name, "ms": t, "GB/s": gbps(M * K * 2, t)})
                t = ms(lambda: lora_shrink(x, A, seed=seed, p=0.05, **cfg))
                rows.append({"kernel": "shrink+dropout", "shape": tag, "config": name, "ms": t,
                             "GB/s": gbps(M * K * 2, t)})
                ecfg = {k.replace("block_k", "block_n"): v for k, v in cfg.items()}
                t = ms(lambda: lora_expand_(y, h, B, **ecfg))
                rows.append({"kernel": "expand", "shape": tag, "config": name, "ms": t, "GB/s": gbps(2 * M * N * 2, t)})
                t = ms(lambda: lora_reduce(y, h, **cfg))
                rows.append({"kernel": "reduce", "shape": tag, "config": name, "ms": t, "GB/s": gbps(M * N * 2, t)})
            Ab, Bb, hb = A.bfloat16(), B.bfloat16(), h.bfloat16()
            t = ms(lambda: x @ Ab.t())
            rows.append({"kernel": "shrink (cuBLAS x@A^T)", "shape": tag, "config": "-", "ms": t, "GB/s": gbps(M * K * 2, t)})
            t = ms(lambda: y.addmm_(hb, Bb.t()))
            rows.append({"kernel": "expand (cuBLAS addmm_)", "shape": tag, "config": "-", "ms": t,
                         "GB/s": gbps(2 * M * N * 2, t)})
            t = ms(lambda: y.t() @ hb)
            rows.append({"kernel": "reduce (cuBLAS dy^T h)", "shape": tag, "config": "-", "ms": t, "GB/s": gbps(M * N * 2, t)})
            # one layer, forward + backward: base alone vs fused LoRA / DoRA
            W = (torch.randn(N, K, device=dev) / K**0.5).bfloat16()
            xg = x.clone().requires_grad_()
            Ap, Bp = A.clone().requires_grad_(), (B * 0.01).requires_grad_()
            m = torch.linalg.vector_norm(W.float(), dim=1).requires_grad_()
            dy = torch.randn(M, N, device=dev, dtype=torch.bfloat16)

            def run(fn):
                def go():
                    xg.grad = Ap.grad = Bp.grad = m.grad = None
                    fn().backward(dy)
                return ms(go)

            t_base = run(lambda: F.linear(xg, W))
            for case, fn in (("lora", lambda: fused_lora_linear(xg, W, None, Ap, Bp, 2.0)),
                             ("lora+dropout", lambda: fused_lora_linear(xg, W, None, Ap, Bp, 2.0, None, 0.05, seed)),
                             ("dora", lambda: fused_dora_linear(xg, W, None, Ap, Bp, 2.0, m))):
                t = run(fn)
                rows.append({"kernel": f"layer fwd+bwd {case} - base", "shape": tag, "config": f"base {t_base:.3f} ms",
                             "ms": t - t_base, "GB/s": float("nan")})
            del x, y, W, xg, dy
            torch.cuda.empty_cache()
    out = os.environ.get("OUT")
    if out:
        with open(os.path.join(out, "kernel_micro.json"), "w") as fh:
            json.dump({"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows}, fh, indent=1)
    print(f"{'kernel':<32} {'shape':<14} {'config':<22} {'ms':>8} {'GB/s':>8}")
    for row in rows:
        print(f"{row['kernel']:<32} {row['shape']:<14} {row['config']:<22} {row['ms']:>8.3f} {row['GB/s']:>8.0f}")
    print(f"bandwidth ceiling (copy): {ceiling:.0f} GB/s")


if __name__ == "__main__":
    main()
