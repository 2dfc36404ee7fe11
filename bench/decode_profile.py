"""Where a batch-32 decode step's device time goes (GPU machine), and what candidate changes would buy.

Usage: python3 bench/decode_profile.py [--out DIR]. Builds the engine of bench/serve.py (random-weight
Llama-3.2-1B shape, bf16, 32 rows), sets the 32 rows up directly (context 192, the benchmark's mean) with no adapter
or with 32 distinct q/k/v/o adapters (ranks 8-64), and for each variant captures the decode graph afresh and times
its replays with CUDA events:
  - side stream on / off (does the LoRA shrink overlap the base GEMM?), PDL off / on (`kernels/pdl.py`);
  - one torch.profiler trace per case: device time per kernel, busy time (union of kernel intervals) per step;
  - LoRA orders (EngineConfig.lora_order), forced skinny q/k/v/o GEMMs, decode attention launch shapes;
  - with --gemms: candidate skinny GEMMs (`kernels/triton_gemm.py`) against cuBLAS at the step's shapes;
  - with --split (alone): the base step tuned, without split-K, with forced split-K o / down projections (reduced in
    the add + RMSNorm after them); the warm-up's tuning timings; the base step's kernels;
  - a prefill step of PREFILL_T tokens (the serving benchmark's mean step is ~290) as a graph: no LoRA, one
    adapter, four adapters; LoRA orders, K split, 32 tokens per LoRA block (`PrefillRunner.lora_launch`,
    `block_t`); its kernels from the profiler.
Writes decode_profile.json; prints a table last.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import serve as sb  # noqa: E402  (bench/serve.py)

from rankwise.serve.config import EngineConfig  # noqa: E402
from rankwise.serve.engine import Engine  # noqa: E402
from rankwise.serve.kernels import graph_timing, l2_prefetch, pdl  # noqa: E402
from rankwise.serve.kernels.triton_gemm import SkinnyLaunch, SplitLaunch  # noqa: E402
from rankwise.serve.lora_batch import plan_blocks  # noqa: E402

B, CTX = 32, 192
# decode attention launch shapes compared (`triton_attention.DECODE_LAUNCH`); splits > 1: split-context decoding
ATTENTION_CASES = (
    {"block_n": 64}, {"num_warps": 8}, {"num_stages": 2}, {"block_n": 64, "num_stages": 4},
    {"block_n": 256, "num_warps": 8}, {"splits": 2}, {"splits": 2, "block_n": 64}, {"splits": 3, "block_n": 64},
    {"splits": 4, "block_n": 64}, {"splits": 6, "block_n": 32}, {"splits": 4, "block_n": 32, "num_warps": 2},
)
PREFETCH_MB = (16, 64)  # `l2_prefetch.LIMIT_MB` values compared with --attention and --split

# forced split-K launches compared with --split
SPLIT_CASES = (SplitLaunch(32, 256, split=2), SplitLaunch(32, 256, split=4), SplitLaunch(16, 256, split=4),
               SplitLaunch(32, 128, split=8))


def setup_rows(engine: Engine, slots: list[int]) -> None:
    """Rows [0, B) decoding at position CTX - 1 over distinct random KV blocks, adapter slot per row."""
    b = engine.batch
    nblk = -(-CTX // engine.kv.block_size) + 8
    perm = torch.randperm(engine.kv.k.shape[1] - 1)[: B * nblk] + 1
    b.block_tables.zero_()
    b.block_tables[:B, :nblk] = perm.view(B, nblk).to(torch.int32).to(b.block_tables.device)
    b.active[:B] = True
    b.tokens[:B] = torch.randint(0, 1000, (B,), device=b.tokens.device)
    order, st, en, sl = plan_blocks(slots, b.block_t, num_blocks=b.R)
    b.l_meta.copy_(torch.tensor([order, st, en, sl], dtype=torch.int32))
    b.l_rows[:B] = torch.tensor(slots, dtype=torch.int32)
    b.any_lora = any(s >= 0 for s in slots)
    b.all_greedy = True


def reset_positions(engine: Engine) -> None:
    engine.batch.positions[:B] = CTX - 1


def replay_ms(graph, replays: int, before=None) -> float:
    """Median of 3 rounds of `replays` back-to-back replays, ms per replay (CUDA events); `before` runs ahead of
    each round, followed by one untimed replay."""
    times = []
    for _ in range(3):
        if before is not None:
            before()
            graph.replay()
        torch.cuda.synchronize()
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        for _ in range(replays):
            graph.replay()
        e.record()
        e.synchronize()
        times.append(s.elapsed_time(e) / replays)
    return sorted(times)[1]


def graph_step_ms(engine: Engine, sites, replays: int = 40) -> float:
    b = engine.batch
    reset_positions(engine)
    b.capture(B, sites, True)
    graph, _ = b.graphs[(B, sites, True)]
    ms = replay_ms(graph, replays, before=lambda: reset_positions(engine))
    reset_positions(engine)
    return ms


def profile_case(engine: Engine, sites, steps: int = 5, graph: bool = True) -> dict:
    """Kernels of `steps` decode steps (graph replays, or eager forwards): per kernel name us per step, and the
    busy (union) and span time per step."""
    from torch.profiler import ProfilerActivity, profile

    b = engine.batch
    reset_positions(engine)
    if graph:
        g, _ = b.graphs[(B, sites, True)]
        fn = g.replay
    else:
        fn = lambda: b._decode_forward(B, sites, True)  # noqa: E731
    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            fn()
        torch.cuda.synchronize()
    reset_positions(engine)
    path = Path(tempfile.mkdtemp()) / "trace.json"
    prof.export_chrome_trace(str(path))
    ev = [e for e in json.loads(path.read_text())["traceEvents"] if e.get("cat") == "kernel"]
    if not ev:
        return {"kernels": 0}
    per = defaultdict(float)
    cnt = defaultdict(int)
    for e in ev:
        name = e["name"]
        key = name if len(name) < 60 else name[:60]
        per[key] += e["dur"] / steps
        cnt[key] += 1
    iv = sorted((e["ts"], e["ts"] + e["dur"]) for e in ev)
    busy, cur_s, cur_e = 0.0, iv[0][0], iv[0][1]
    for s, e in iv[1:]:
        if s > cur_e:
            busy += cur_e - cur_s
            cur_s, cur_e = s, e
        else:
            cur_e = max(cur_e, e)
    busy += cur_e - cur_s
    streams = sorted({e.get("tid") for e in ev}, key=str)
    first = sorted(ev, key=lambda e: e["ts"])[: len(ev) // steps]
    lora_seq = [(e["name"][:20], round(e["dur"], 1)) for e in first if "lora" in e["name"]][:8]
    top = sorted(per.items(), key=lambda kv: -kv[1])
    return {"kernels_per_step": len(ev) / steps, "kernel_sum_us": sum(per.values()), "busy_us": busy / steps,
            "span_us": (iv[-1][1] - iv[0][0]) / steps, "streams": [str(s) for s in streams],
            "by_kernel_us": {k: round(v, 2) for k, v in top}, "lora_first_layers": lora_seq, "count_per_step": {k: cnt[k] / steps for k, _ in top}}


PREFILL_T = 320


def prefill_step_ms(engine: Engine, token_slots: list[int], sites, replays: int = 30) -> float:
    """A prefill graph of PREFILL_T tokens (one prompt per adapter run of token_slots) captured afresh, timed."""
    runner = engine.prefill
    runner.graphs.clear()
    lens, prev = [], None
    for s in token_slots:
        if s != prev or lens[-1] >= 256:
            lens.append(0)
        lens[-1] += 1
        prev = s
    ids = torch.randint(0, 1000, (PREFILL_T,)).tolist()
    pos = [p for n in lens for p in range(n)]
    runner.run(ids, pos, [0] * PREFILL_T, lens, token_slots, sites)   # captures; cache writes go to scratch
    return replay_ms(runner.graphs[(runner.padded(PREFILL_T), sites)], replays)


def prefill_cases(engine: Engine, slots: list[int], qkvo) -> tuple[dict, dict]:
    """Prefill graph times for LoRA orders and launch shapes (`PrefillRunner.lora_launch`, `block_t`)."""
    from rankwise.serve.kernels.triton_lora import LoraLaunch, default_launch

    runner, res = engine.prefill, {}
    ctx = runner.lora_ctx
    layout = ctx["layout"]
    split = tuple(LoraLaunch(default_launch(layout.site_in[s], 1).split) for s in range(4))
    one = [slots[0]] * PREFILL_T
    four = [slots[i * 4] for i in range(4) for _ in range(PREFILL_T // 4)]
    block_t = runner.block_t
    cases = [("none", [-1] * PREFILL_T, None, "side", None, block_t)]
    for label, ts in (("1 adapter", one), ("4 adapters", four)):
        cases += [(f"{label} side", ts, qkvo, "side", None, block_t),
                  (f"{label} gemm_first", ts, qkvo, "gemm_first", None, block_t),
                  (f"{label} side, K split", ts, qkvo, "side", split, block_t),
                  (f"{label} gemm_first, K split", ts, qkvo, "gemm_first", split, block_t),
                  (f"{label} side, block_t 32", ts, qkvo, "side", None, 32)]
    for name, ts, sites, order, launch, bt in cases:
        ctx["order"], runner.lora_launch, runner.block_t = order, launch, bt
        try:
            res[name] = prefill_step_ms(engine, ts, sites)
        except Exception as exc:
            res[name] = f"error {exc!r}"[:300]
        finally:
            ctx["order"], runner.lora_launch, runner.block_t = "side", None, block_t
            runner.graphs.clear()
        print(f"prefill {PREFILL_T} {name:<44} {res[name]}", flush=True)
    prof = {}
    try:
        from torch.profiler import ProfilerActivity, profile

        prefill_step_ms(engine, one, qkvo, replays=2)
        graph = engine.prefill.graphs[(engine.prefill.padded(PREFILL_T), qkvo)]
        with profile(activities=[ProfilerActivity.CUDA]) as pr:
            for _ in range(3):
                graph.replay()
            torch.cuda.synchronize()
        per = defaultdict(float)
        for e in pr.key_averages():
            per[e.key[:60]] += e.device_time_total / 3 if hasattr(e, "device_time_total") else e.cuda_time_total / 3
        prof = {k: round(v, 1) for k, v in sorted(per.items(), key=lambda kv: -kv[1])[:16]}
    except Exception as exc:
        prof = {"error": repr(exc)[:300]}
    engine.prefill.graphs.clear()
    return res, prof


def graph_us(fn, calls: int = 20) -> float:
    return graph_timing.graph_us(fn, calls, replays=5)


def gemm_candidates(engine: Engine) -> list[dict]:
    from rankwise.serve.kernels.triton_fused import silu_mul
    from rankwise.serve.kernels.triton_gemm import gate_up_silu, skinny_matmul

    w = engine.model.w
    rows = []
    for key in ("qkv", "o", "gu", "d"):
        W = w[f"0.{key}"]
        x = torch.randn(B, W.shape[1], device=W.device, dtype=W.dtype) * 0.5
        ref = x @ W.t()
        if key == "gu":
            ref_m = silu_mul(ref)
            rows.append({"site": key, "impl": "cuBLAS + silu_mul", "us": graph_us(lambda: silu_mul(x @ W.t()))})
        else:
            rows.append({"site": key, "impl": "cuBLAS", "us": graph_us(lambda: x @ W.t())})
        N = W.shape[0] // 2 if key == "gu" else W.shape[0]
        for bn in (16, 32, 64):
            for bk in (128, 256):
                for warps, stages in ((4, 3), (4, 4), (4, 6), (8, 4)):
                    if N % bn or W.shape[1] % bk:
                        continue
                    try:
                        if key == "gu":
                            f = lambda: gate_up_silu(x, W, block_n=bn, block_k=bk, num_warps=warps,  # noqa: E731
                                                     num_stages=stages)
                            err = (f().float() - ref_m.float()).abs().max().item()
                        else:
                            f = lambda: skinny_matmul(x, W, block_n=bn, block_k=bk, num_warps=warps,  # noqa: E731
                                                      num_stages=stages)
                            err = (f().float() - ref.float()).abs().max().item()
                        rows.append({"site": key, "impl": f"triton bn={bn} bk={bk} w={warps} s={stages}",
                                     "us": graph_us(f), "max_err": err})
                    except Exception as exc:  # a shape that does not compile or fit is not a candidate
                        rows.append({"site": key, "impl": f"triton bn={bn} bk={bk} w={warps} s={stages}",
                                     "error": str(exc)[:200]})
        best = min((r for r in rows if r["site"] == key and "us" in r and r["impl"].startswith("triton")),
                   key=lambda r: r["us"], default=None)
        print(key, rows[[r["site"] for r in rows].index(key)], "best triton", best, flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--work", default=None)
    ap.add_argument("--gemms", action="store_true", help="also time skinny GEMM launch shapes against cuBLAS")
    ap.add_argument("--quick", action="store_true", help="only PDL on/off and the three LoRA orders")
    ap.add_argument("--attention", action="store_true",
                    help="only the base step with and without the L2 prefetch (kernels/l2_prefetch.py)")
    ap.add_argument("--split", action="store_true",
                    help="only the base step: tuned, without / with forced split-K o and down projections; then "
                         "its kernels")
    args = ap.parse_args()
    out: dict = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__}
    res_path = Path(args.out) / "decode_profile.json"

    def save():
        res_path.write_text(json.dumps(out, indent=1, default=str))

    root = Path(args.work or tempfile.mkdtemp(prefix="rankwise-prof-"))
    hf = sb.build_hf(torch.bfloat16)
    names = sb.write_adapters(root / "a", "q", 32, sb.QKVO, 16)
    cfg = EngineConfig(max_num_seqs=32, max_model_len=1024, max_gpu_adapters=128, lora_pool_mb=4096,
                       max_host_adapters=64, adapter_load_threads=8)
    engine = Engine(hf, cfg, adapter_dir=root / "a", eos_token_ids=())
    t = time.perf_counter()
    engine.warmup()
    out["warmup_s"] = time.perf_counter() - t
    out["lora_launch"] = [vars(x) for x in engine.batch.lora_launch]
    engine.preload(names, on_device=True)
    slots = [engine.adapters.acquire(n) for n in names]
    assert all(s is not None and s >= 0 for s in slots), slots
    engine.batch.site_mask = engine.adapters.site_mask()
    qkvo = (True, True, False, False)
    print("warmup", out["warmup_s"], out["lora_launch"], flush=True)

    steps = {}
    ctx = engine.batch.lora_ctx
    tuned = dict(engine.model.decode_gemm)
    out["decode_gemm"] = {k: vars(v) for k, v in tuned.items()}
    print("decode_gemm", out["decode_gemm"], flush=True)
    from rankwise.serve.kernels import triton_attention as ta

    forced = dict(tuned, qkv=SkinnyLaunch(32, 256, 4, 3), o=SkinnyLaunch(16, 128, 4, 3))

    def case(name, slots_, sites, order="side", gemm=None, pdl_on=True, attn=None, prefetch_mb=None):
        pdl.ENABLED = pdl_on
        l2_prefetch.ENABLED, saved_mb = prefetch_mb is not None, l2_prefetch.LIMIT_MB
        l2_prefetch.LIMIT_MB = prefetch_mb or saved_mb
        ctx["order"] = order
        engine.model.decode_gemm = tuned if gemm is None else gemm
        saved = dict(ta.DECODE_LAUNCH)
        ta.DECODE_LAUNCH.update(attn or {})
        try:
            setup_rows(engine, slots_)
            steps[name] = graph_step_ms(engine, sites)
        except Exception as exc:
            steps[name] = f"error {exc!r}"[:300]
        finally:
            ta.DECODE_LAUNCH.clear()
            ta.DECODE_LAUNCH.update(saved)
            pdl.ENABLED, ctx["order"], engine.model.decode_gemm = True, "side", tuned
            l2_prefetch.ENABLED, l2_prefetch.LIMIT_MB = False, saved_mb
        print(f"{name:<48} {steps[name]}", flush=True)

    none, one = [-1] * B, [slots[0]] * B
    case("base (PDL, tuned GEMMs)", none, None)
    if args.split:
        from rankwise.serve.kernels import triton_gemm as tg

        out["tuning_us"] = tg.TIMINGS
        save()
        unsplit = {k: v for k, v in tuned.items() if not k.endswith("_split")}
        case("base, no split-K", none, None, gemm=unsplit)
        for c in SPLIT_CASES:
            case(f"base, split-K o/down {c}", none, None, gemm=dict(unsplit, o_split=c, d_split=c))
        case("base (PDL, tuned GEMMs) again", none, None)
        out["graph_step_ms"] = steps
        save()
        setup_rows(engine, none)
        graph_step_ms(engine, None, replays=5)
        out["profile"] = {"base graph": profile_case(engine, None)}
        save()
        p = out["profile"]["base graph"]
        print(f"\n== base graph: {p.get('kernels_per_step', 0):.0f} kernels/step, busy {p.get('busy_us', 0):.0f} us")
        for name, us in list(p.get("by_kernel_us", {}).items())[:14]:
            print(f"  {us:8.1f} us  x{p['count_per_step'][name]:<5.0f} {name}")
        print("\n== tuning (us per call, graphs over the 16 layers' weights) ==")
        for k, v in tg.TIMINGS.items():
            print(k, {c: round(us, 2) for c, us in v.items()})
        print("\n== graph step ms (batch 32, context 192) ==")
        for k, v in steps.items():
            print(f"{k:<56} {v if isinstance(v, str) else f'{v:.4f}'}")
        return
    if args.attention:
        for mb in PREFETCH_MB:
            case(f"base L2 prefetch <= {mb} MB", none, None, prefetch_mb=mb)
        case("base (PDL, tuned GEMMs) again", none, None)
        out["graph_step_ms"] = steps
        save()
        print("\n== graph step ms (batch 32, context 192) ==")
        for k, v in steps.items():
            print(f"{k:<48} {v if isinstance(v, str) else f'{v:.4f}'}")
        return
    case("base no PDL", none, None, pdl_on=False)
    case("base cuBLAS only", none, None, gemm={})
    if not args.quick:
        case("base skinny qkv/o forced", none, None, gemm=forced)
        for attn in ATTENTION_CASES:
            case(f"base attn {attn}", none, None, attn=attn)
    for order in ("side", "gemm_first", "shrink_first"):
        case(f"lora32 {order}", slots, qkvo, order=order)
        if not args.quick:
            case(f"lora32 {order} skinny qkv/o", slots, qkvo, order=order, gemm=forced)
    case("lora32 side no PDL", slots, qkvo, pdl_on=False)
    for order in ("side", "gemm_first", "shrink_first") if not args.quick else ():
        case(f"lora1 {order}", one, qkvo, order=order)
    out["graph_step_ms"] = steps
    save()
    out["prefill_step_ms"], out["prefill_profile_us"] = prefill_cases(engine, slots, qkvo)
    save()
    lora_cases = {o: steps.get(f"lora32 {o}") for o in ("side", "gemm_first", "shrink_first")}
    best = min((o for o, v in lora_cases.items() if isinstance(v, float)), key=lambda o: lora_cases[o], default="side")
    out["best_order"] = best
    Path(args.out, "best_order").write_text(best)
    attn_cases = {k: v for k, v in steps.items() if k.startswith("base attn") and isinstance(v, float)}
    out["best_attn"] = min(attn_cases, key=attn_cases.get) if attn_cases else None
    ctx["order"] = best
    prof = {}
    for label, sl, sites in (("base", [-1] * B, None), ("lora32", slots, qkvo)):
        setup_rows(engine, sl)
        graph_step_ms(engine, sites, replays=5)  # recapture with the defaults (and the best order)
        for graph in (True,):
            try:
                prof[f"{label} {'graph' if graph else 'eager'}"] = profile_case(engine, sites, graph=graph)
            except Exception as exc:
                prof[f"{label} {'graph' if graph else 'eager'}"] = {"error": repr(exc)[:300]}
    out["profile"] = prof
    save()
    if args.gemms:
        out["gemm_candidates"] = gemm_candidates(engine)
        save()

    print("\n== graph step ms (batch 32, context 192) ==")
    for k, v in steps.items():
        print(f"{k:<40} {v if isinstance(v, str) else f'{v:.4f}'}")
    for k, p in prof.items():
        if "by_kernel_us" not in p:
            print(k, p)
            continue
        print(f"\n== {k}: {p['kernels_per_step']:.0f} kernels/step, sum {p['kernel_sum_us']:.0f} us, busy "
              f"{p['busy_us']:.0f} us, span {p['span_us']:.0f} us, streams {p['streams']}")
        for name, us in list(p["by_kernel_us"].items())[:14]:
            print(f"  {us:8.1f} us  x{p['count_per_step'][name]:<5.0f} {name}")
        print("  first LoRA kernels:", p.get("lora_first_layers"))
    print(f"\n== prefill step of {PREFILL_T} tokens (graph ms) ==")
    for k, v in out["prefill_step_ms"].items():
        print(f"{k:<40} {v if isinstance(v, str) else f'{v:.4f}'}")
    print("prefill kernels (us per step, 1 adapter):", out["prefill_profile_us"])
    print("best order", out["best_order"], "best attention launch", out["best_attn"])


if __name__ == "__main__":
    main()
