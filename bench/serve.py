"""S-LoRA-style serving benchmark on one GPU: rankwise's engine with 0 to 1000 heterogeneous-rank adapters, against
PEFT's mixed-batch forward and HF generate, in one run.

    python bench/serve.py --out $OUT/serve.json            # full run (~6 min on an H100)
    python bench/serve.py --quick --out /tmp/serve.json    # a minute: fewer requests and configurations

Model: random-weight Llama-3.2-1B-shaped (hidden 2048, 16 layers, 32 heads / 8 KV heads, vocab 128256), bf16.
Adapters: PEFT-format folders on disk, ranks cycling 8, 16, 32, 64 on q, k, v, o (and a set on all 7 projections).
Workload: Poisson arrivals (S-LoRA: Gamma with cv = 1) at a rate above capacity, so throughput = capacity; input
and output lengths uniform in [8, 512], EOS ignored, greedy; adapter of a request = floor(n * power(alpha)),
alpha = 1 uniform, 0.3 skewed. Reported: req/s, output tok/s, TTFT and TPOT p50/p90/p99, peak GPU memory.
Also: batch-32 decode step time against the memory-bandwidth floor (bytes / measured copy bandwidth) and against
the weight GEMMs alone replayed as one CUDA graph; greedy outputs against PEFT (float32, exact) per adapter.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rankwise.serve.config import EngineConfig, SamplingParams
from rankwise.serve.engine import Engine, Request

QKVO = ["q_proj", "k_proj", "v_proj", "o_proj"]
ALL7 = QKVO + ["gate_proj", "up_proj", "down_proj"]
RANKS = [8, 16, 32, 64]
SHAPE = dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
             num_key_value_heads=8, head_dim=64, max_position_embeddings=4096, tie_word_embeddings=True)
SMOKE_SHAPE = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, head_dim=16, max_position_embeddings=2048, tie_word_embeddings=True)
DEV = "cuda" if torch.cuda.is_available() else "cpu"
LENGTHS = [8, 512]  # input and output lengths are uniform in this range


def sync() -> None:
    if DEV == "cuda":
        torch.cuda.synchronize()


def peak_gib() -> float:
    return torch.cuda.max_memory_allocated() / 2 ** 30 if DEV == "cuda" else float("nan")


def build_hf(dtype, layers=16, seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    with torch.device(DEV):
        model = LlamaForCausalLM(LlamaConfig(**{**SHAPE, "num_hidden_layers": min(layers, SHAPE["num_hidden_layers"])},
                                             attn_implementation="sdpa"))
    return model.to(dtype).eval()


def module_dims(mod: str) -> tuple[int, int]:
    h, kv, inter = SHAPE["hidden_size"], SHAPE["num_key_value_heads"] * SHAPE["head_dim"], SHAPE["intermediate_size"]
    return {"q_proj": (h, h), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (h, h), "gate_proj": (h, inter),
            "up_proj": (h, inter), "down_proj": (inter, h)}[mod]


def write_adapters(root: Path, prefix: str, n: int, targets: list[str], layers: int, dtype=torch.bfloat16,
                   dora: bool = False, seed: int = 0, b_scale: float = 0.02) -> list[str]:
    """n PEFT-format LoRA folders `<prefix><i>` with rank RANKS[i % 4], alpha = 2r (random A, B)."""
    from safetensors.torch import save_file

    g = torch.Generator(device=DEV).manual_seed(seed)
    layers = min(layers, SHAPE["num_hidden_layers"])
    names = []
    for i in range(n):
        r, name = RANKS[i % len(RANKS)], f"{prefix}{i:04d}"
        sd = {}
        for layer in range(layers):
            for mod in targets:
                n_in, n_out = module_dims(mod)
                part = "mlp" if mod in ("gate_proj", "up_proj", "down_proj") else "self_attn"
                key = f"base_model.model.model.layers.{layer}.{part}.{mod}"
                sd[f"{key}.lora_A.weight"] = (torch.randn(r, n_in, generator=g, device=DEV) / n_in ** 0.5).to(dtype)
                sd[f"{key}.lora_B.weight"] = (torch.randn(n_out, r, generator=g, device=DEV) * b_scale).to(dtype)
                if dora:
                    sd[f"{key}.lora_magnitude_vector"] = (1 + 0.1 * torch.rand(n_out, generator=g, device=DEV)).to(dtype)
        (root / name).mkdir(parents=True, exist_ok=True)
        save_file({k: v.cpu().contiguous() for k, v in sd.items()}, str(root / name / "adapter_model.safetensors"),
                  metadata={"format": "pt"})
        cfg = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": r, "lora_alpha": 2 * r, "target_modules": targets,
               "lora_dropout": 0.0, "bias": "none", "use_rslora": False, "use_dora": dora, "fan_in_fan_out": False,
               "rank_pattern": {}, "alpha_pattern": {}, "init_lora_weights": True, "inference_mode": True,
               "modules_to_save": None, "base_model_name_or_path": None}
        (root / name / "adapter_config.json").write_text(json.dumps(cfg))
        names.append(name)
    return names


def workload(n_req, rate, names, alpha, seed, lo=None, hi=None):
    lo, hi = lo or LENGTHS[0], min(hi or LENGTHS[1], LENGTHS[1])
    rng = np.random.default_rng(seed)
    arrivals = np.cumsum(rng.gamma(1.0, 1.0 / rate, n_req))
    ins, outs = rng.integers(lo, hi + 1, n_req), rng.integers(lo, hi + 1, n_req)
    picks = np.floor(len(names) * rng.power(alpha, n_req)).astype(int) if names else [None] * n_req
    reqs = []
    for i in range(n_req):
        prompt = rng.integers(0, SHAPE["vocab_size"], int(ins[i])).tolist()
        adapter = names[min(picks[i], len(names) - 1)] if names else None
        reqs.append((float(arrivals[i]), Request(prompt, adapter, SamplingParams(max_tokens=int(outs[i]),
                                                                                 ignore_eos=True), f"r{i}")))
    return reqs


class StepTimer:
    """Device time (CUDA events around each launch) and host time of the engine's prefill and decode launches."""

    def __init__(self, engine: Engine):
        self.engine, self.records = engine, []
        self._orig = {k: getattr(engine, f"_launch_{k}") for k in ("prefill", "decode")}
        for kind, fn in self._orig.items():
            setattr(engine, f"_launch_{kind}", self._wrap(kind, fn))

    def _wrap(self, kind, fn):
        def launch(seqs):
            t = time.perf_counter()
            ev = [torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)] if DEV == "cuda" else None
            if ev:
                ev[0].record()
            out = fn(seqs)
            if ev:
                ev[1].record()
            n = sum(len(s.tokens_to_prefill()) for s in seqs) if kind == "prefill" else len(seqs)
            self.records.append((kind, ev, time.perf_counter() - t, n))
            return out
        return launch

    def close(self) -> dict:
        for kind, fn in self._orig.items():
            setattr(self.engine, f"_launch_{kind}", fn)
        sync()
        out = {}
        for kind in ("prefill", "decode"):
            rec = [r for r in self.records if r[0] == kind]
            if not rec:
                continue
            gpu = [r[1][0].elapsed_time(r[1][1]) for r in rec] if DEV == "cuda" else [float("nan")]
            out[kind] = {"count": len(rec), "gpu_ms_total": float(np.sum(gpu)), "gpu_ms_median": float(np.median(gpu)),
                         "host_ms_median": 1e3 * float(np.median([r[2] for r in rec])),
                         "tokens_mean": float(np.mean([r[3] for r in rec]))}
        return out


def pct(xs, q):
    return float(np.percentile(np.asarray(xs), q)) if len(xs) else float("nan")


def run_rankwise(engine: Engine, reqs) -> dict:
    """Drive the engine with requests arriving at their times; stats from the Python API's outputs."""
    sync()
    if DEV == "cuda":
        torch.cuda.reset_peak_memory_stats()
    timer = StepTimer(engine)
    cpu0 = time.process_time()
    start, i, done, arrival = time.perf_counter(), 0, {}, {}
    while len(done) < len(reqs):
        now = time.perf_counter() - start
        while i < len(reqs) and reqs[i][0] <= now:
            engine.add_request(reqs[i][1])
            arrival[reqs[i][1].request_id] = start + reqs[i][0]
            i += 1
        if engine.has_work():
            for out in engine.step():
                if out.finished:
                    done[out.request_id] = out
        elif i < len(reqs):
            time.sleep(max(0.0, min(0.002, reqs[i][0] - now)))
    end = max(o.finish_time for o in done.values())
    steps, cpu = timer.close(), time.process_time() - cpu0
    ttft = [o.first_token_time - arrival[k] for k, o in done.items()]
    tpot = [(o.finish_time - o.first_token_time) / (len(o.output_ids) - 1) for o in done.values()
            if len(o.output_ids) > 1]
    n_out = sum(len(o.output_ids) for o in done.values())
    bad = [k for k, o in done.items() if o.finish_reason != "length"]
    return {"requests": len(reqs), "seconds": end - start, "req_per_s": len(reqs) / (end - start),
            "output_tok_per_s": n_out / (end - start), "failed": len(bad),
            "ttft_ms": {q: 1e3 * pct(ttft, q) for q in (50, 90, 99)},
            "tpot_ms": {q: 1e3 * pct(tpot, q) for q in (50, 90, 99)},
            "peak_gib": peak_gib(), "steps": steps, "process_cpu_s": cpu, "engine": engine.stats()}


def decode_step_time(engine: Engine, adapters, batch=32, prompt=128, new=128) -> dict:
    """Batch-`batch` decode: ms per step once every row is decoding (median over the steady phase)."""
    rng = np.random.default_rng(1)
    for b in range(batch):
        engine.add_request(Request(rng.integers(0, SHAPE["vocab_size"], prompt).tolist(),
                                   adapters[b % len(adapters)] if adapters else None,
                                   SamplingParams(max_tokens=new, ignore_eos=True)))
    times = []
    timer = StepTimer(engine)
    while engine.has_work():
        before = engine.counters["steps_decode"]
        engine.step()
        if engine.counters["steps_decode"] > before and not engine.scheduler.waiting:
            times.append(time.perf_counter())
    steps = timer.close()
    gaps = np.diff(times[5:-5] if len(times) > 20 else times)
    step = float(np.median(gaps))
    return {"step_ms": 1e3 * step, "tok_per_s": batch / step, "context_mean": prompt + new / 2,
            "device_step_ms": steps["decode"]["gpu_ms_median"], "host_launch_ms": steps["decode"]["host_ms_median"]}


def gemm_graph_floor(engine: Engine, batch=32) -> float:
    """ms of the weight GEMMs of one decode step (fused like the engine's, plus the LM head) as one CUDA graph."""
    w = engine.model.w
    mats = [w[f"{i}.{k}"] for i in range(engine.model.spec.num_layers) for k in ("qkv", "o", "gu", "d")]
    mats.append(w["lm_head"])
    xs = [torch.randn(batch, m.shape[1], device=m.device, dtype=m.dtype) for m in mats]

    def run():
        for x, m in zip(xs, mats):
            x @ m.t()

    for _ in range(3):
        run()
    if DEV != "cuda":
        t = time.perf_counter()
        run()
        return 1e3 * (time.perf_counter() - t)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        run()
    for _ in range(3):
        graph.replay()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(50):
        graph.replay()
    torch.cuda.synchronize()
    return 1e3 * (time.perf_counter() - t) / 50


def copy_bandwidth() -> float:
    """Bytes read + written per second by a 2 GiB device-to-device copy."""
    a = torch.empty(2 ** 30 if DEV == "cuda" else 2 ** 24, dtype=torch.int16, device=DEV)
    b = torch.empty_like(a)
    for _ in range(3):
        b.copy_(a)
    sync()
    t = time.perf_counter()
    for _ in range(10):
        b.copy_(a)
    sync()
    bw = 2 * a.numel() * 2 * 10 / (time.perf_counter() - t)
    del a, b
    return bw


def hf_batch(model, reqs, new_tokens, adapter_names=None) -> dict:
    """HF generate on one static batch (left padding), `new_tokens` each; useful tokens = min(own length, new)."""
    prompts = [r.prompt for _, r in reqs]
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts], device=DEV)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=DEV)
    kw = {"adapter_names": adapter_names} if adapter_names else {}
    sync()
    t = time.perf_counter()
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                             do_sample=False, pad_token_id=0, **kw)
    sync()
    dt = time.perf_counter() - t
    useful = sum(min(r.params.max_tokens, new_tokens) for _, r in reqs)
    return {"seconds": dt, "output_tok_per_s": useful / dt, "batch": len(reqs), "new_tokens": new_tokens,
            "tokens": out[:, width:].tolist()}


def fp32_peft_check(root: Path, n_req=16, new=16) -> dict:
    """Real widths, 2 layers, float32: every request of a mixed batch equals PEFT with its adapter alone."""
    import peft

    names = write_adapters(root, "c", 6, QKVO, 2, torch.float32, seed=5)
    names += write_adapters(root, "c7_", 2, ALL7, 2, torch.float32, seed=6)
    names += write_adapters(root, "cd", 2, QKVO, 2, torch.float32, dora=True, seed=7)
    engine = Engine(build_hf(torch.float32, layers=2), EngineConfig(max_num_seqs=16, max_model_len=256, dtype="float32",
                                                                    lora_pool_mb=512, max_gpu_adapters=16),
                    adapter_dir=root, eos_token_ids=())
    engine.warmup()
    reqs = [(0.0, Request(r.prompt[:40], names[i % len(names)] if i % 5 else None, SamplingParams(max_tokens=new),
                          f"c{i}")) for i, (_, r) in enumerate(workload(n_req, 1.0, [], 1.0, 3, lo=8, hi=40))]
    outs = engine.generate([r for _, r in reqs])
    del engine
    gc.collect()
    same = 0
    for adapter in sorted({r.adapter for _, r in reqs}, key=str):
        model = build_hf(torch.float32, layers=2)
        if adapter:
            model = peft.PeftModel.from_pretrained(model, root / adapter).eval()
        for (_, req), out in zip(reqs, outs):
            if req.adapter != adapter:
                continue
            x = torch.tensor([req.prompt], device=DEV)
            ref = model.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=new, do_sample=False,
                                 eos_token_id=None, pad_token_id=0)[0, x.shape[1]:].tolist()
            same += ref == out.output_ids
        del model
    gc.collect()
    if DEV == "cuda":
        torch.cuda.empty_cache()
    return {"requests": n_req, "identical_to_peft": same, "adapters": len(names)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."), "serve.json"))
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--requests", type=int, default=400)
    ap.add_argument("--rate", type=float, default=100.0, help="req/s of the saturating runs")
    ap.add_argument("--work", default=None, help="folder for adapters (default: a temporary one)")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes, runs on a CPU: checks the script itself")
    ap.add_argument("--configs", default=None,
                    help="comma-separated subset of the saturated runs: none,1,32,100,big,skewed,all7,again")
    ap.add_argument("--no-check", action="store_true", help="skip the float32 check against PEFT")
    ap.add_argument("--no-baselines", action="store_true", help="skip HF generate and PEFT's mixed batch")
    ap.add_argument("--no-latency", action="store_true", help="skip the 10 req/s (unsaturated) runs")
    ap.add_argument("--decode-only", action="store_true",
                    help="only the batch-32 decode step against the floors (32 adapters written, no serving runs)")
    ap.add_argument("--lora-order", default="auto", help="EngineConfig.lora_order: auto, side, shrink_first, gemm_first")
    args = ap.parse_args()
    if args.smoke:
        SHAPE.update(SMOKE_SHAPE)
        LENGTHS[1] = 40
        args.quick = True
    quick = args.quick
    n_req = (12 if args.smoke else 60) if quick else args.requests
    n_big = 32 if args.decode_only else (8 if args.smoke else 100) if quick else 1000
    root = Path(args.work or tempfile.mkdtemp(prefix="rankwise-serve-"))
    res: dict = {"gpu": torch.cuda.get_device_name() if DEV == "cuda" else "cpu (smoke)", "torch": torch.__version__,
                 "date": time.strftime("%Y-%m-%d"), "args": vars(args)}

    def save():
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(res, indent=1, default=str))

    t0 = time.perf_counter()
    if not args.no_check:
        res["fp32_peft_check"] = fp32_peft_check(root / "check")
        print("fp32 check", res["fp32_peft_check"], flush=True)
    res["copy_bandwidth_tb_s"] = copy_bandwidth() / 1e12

    hf = build_hf(torch.bfloat16)
    t = time.perf_counter()
    qkvo = write_adapters(root / "a", "q", n_big, QKVO, 16)
    n_all7 = 1 if args.decode_only else (4 if args.smoke else 32) if quick else 100
    all7 = write_adapters(root / "a", "s", n_all7, ALL7, 16, seed=1)
    res["adapter_write_s"] = time.perf_counter() - t
    cfg = EngineConfig(max_num_seqs=32, max_model_len=1024, max_gpu_adapters=128,
                       lora_pool_mb=4096 if DEV == "cuda" else 64, max_host_adapters=len(qkvo) + len(all7), adapter_load_threads=8,
                       lora_order=args.lora_order)
    engine = Engine(hf, cfg, adapter_dir=root / "a", eos_token_ids=())
    t = time.perf_counter()
    engine.warmup()
    res["graph_capture_s"] = time.perf_counter() - t
    launch = engine.batch.lora_launch
    res["decode_lora_launch"] = [vars(x) for x in launch] if launch else None  # tuned per site (qkv, o, gate_up, down)
    res["prefill_graphs"] = len(engine.prefill.graphs)
    res["decode_gemm"] = {k: vars(v) for k, v in engine.model.decode_gemm.items()}  # skinny Triton GEMMs chosen
    res["lora_order"] = {"decode": engine.batch.lora_ctx["order"], "prefill": engine.prefill.lora_ctx["order"]}
    print("warmup", {k: res[k] for k in ("graph_capture_s", "decode_lora_launch", "prefill_graphs")}, flush=True)
    t = time.perf_counter()
    engine.preload(qkvo + all7)  # all adapters in host memory, as in S-LoRA's setup
    res["host_preload_s_per_adapter"] = (time.perf_counter() - t) / len(qkvo + all7)
    print(f"setup {time.perf_counter() - t0:.0f}s", flush=True)

    # decode at batch 32 against the floors
    spec = engine.model.spec
    weight_bytes = sum(v.numel() * v.element_size() for k, v in engine.model.w.items() if k != "embed")
    dec = {"base": decode_step_time(engine, None), "32_adapters": decode_step_time(engine, qkvo[:32])}
    kv_bytes = 32 * dec["base"]["context_mean"] * 2 * spec.num_layers * spec.kv_out * 2
    floor_ms = 1e3 * (weight_bytes + kv_bytes) / (res["copy_bandwidth_tb_s"] * 1e12)
    dec["bandwidth_floor_ms"] = floor_ms
    dec["gemm_graph_floor_ms"] = gemm_graph_floor(engine)
    dec["base_vs_bandwidth_floor"] = dec["base"]["step_ms"] / floor_ms
    dec["base_vs_gemm_floor"] = dec["base"]["step_ms"] / dec["gemm_graph_floor_ms"]
    res["decode_batch32"] = dec
    print("decode", json.dumps(dec), flush=True)
    save()
    if args.decode_only:
        print(f"decode batch 32: {dec['base']['step_ms']:.3f} ms no adapters, {dec['32_adapters']['step_ms']:.3f} ms "
              f"with 32; bandwidth floor {floor_ms:.3f} ms (x{dec['base_vs_bandwidth_floor']:.2f}), GEMM-graph "
              f"floor {dec['gemm_graph_floor_ms']:.3f} ms; decode_gemm {res['decode_gemm']}")
        return

    runs = {}
    res["big_label"] = f"{n_big} adapters"
    configs = {"none": ("no adapters", [], 1.0), "1": ("1 adapter", qkvo[:1], 1.0),
               "32": ("32 adapters", qkvo[:32], 1.0), "100": ("100 adapters", qkvo[:100], 1.0),
               "big": (f"{n_big} adapters", qkvo, 1.0), "skewed": (f"{n_big} adapters, skewed", qkvo, 0.3),
               "all7": (f"{len(all7)} adapters, all 7 projections", all7, 1.0),
               "again": ("no adapters (again, last)", [], 1.0)}
    keys = args.configs.split(",") if args.configs else (["none", "1", "32", "big", "all7"] if quick else list(configs))
    unknown = set(keys) - set(configs)
    if unknown:
        raise SystemExit(f"--configs: unknown {sorted(unknown)}; choose from {list(configs)}")
    configs = [configs[k] for k in configs if k in keys]
    for label, names, alpha in configs:
        runs[label] = run_rankwise(engine, workload(n_req, args.rate, names, alpha, seed=7))
        print(label, {k: runs[label][k] for k in ("req_per_s", "output_tok_per_s", "failed", "steps", "process_cpu_s")},
              flush=True)
        res["rankwise"] = runs
        save()
    if not args.no_latency:
        lat = {}
        for label, names in (("no adapters", []), (f"{n_big} adapters", qkvo)):
            lat[label] = run_rankwise(engine, workload(max(4, n_req // 4), 10.0, names, 1.0, seed=8))
        res["rankwise_10_req_s"] = lat
        save()
    if args.no_baselines:
        res["total_s"] = time.perf_counter() - t0
        save()
        print_table(res)
        return

    # HF baselines on one static batch of 32 requests of the same workload
    batch = workload(min(32, len(qkvo)), 1.0, qkvo[:32], 1.0, seed=9)
    new = 16 if quick else 32
    res["hf_base"] = hf_batch(hf, batch, 2 * new)
    ours = engine.generate([Request(r.prompt, r.adapter, SamplingParams(max_tokens=new), f"p{i}")
                            for i, (_, r) in enumerate(batch)])
    import peft

    pm = peft.PeftModel.from_pretrained(hf, root / "a" / qkvo[0], adapter_name=qkvo[0])
    for name in qkvo[1:32]:
        pm.load_adapter(root / "a" / name, adapter_name=name)
    pm.eval()
    res["peft_mixed_32"] = hf_batch(pm, batch, new, adapter_names=[r.adapter for _, r in batch])
    prefix = []
    for o, ref in zip(ours, res["peft_mixed_32"].pop("tokens")):
        k = 0
        while k < new and o.output_ids[k] == ref[k]:
            k += 1
        prefix.append(k)
    res["bf16_agreement_with_peft_mixed"] = {"mean_identical_prefix": float(np.mean(prefix)), "of": new}
    res["hf_base"].pop("tokens")
    res["total_s"] = time.perf_counter() - t0
    save()
    print_table(res)


def print_table(res: dict) -> None:
    first = next(iter(res["rankwise"].values()))
    base = res["rankwise"].get("no adapters", first)["output_tok_per_s"]
    print(f"\n{res['gpu']}, torch {res['torch']}, {res['date']}")
    print("| engine | req/s | output tok/s | vs no-adapter | TTFT p50/p90/p99 ms | TPOT p50/p90/p99 ms | peak GiB |")
    print("|---|---|---|---|---|---|---|")
    for label, r in res["rankwise"].items():
        f = lambda d: "/".join(f"{d[q]:.0f}" if d[q] >= 10 else f"{d[q]:.1f}" for q in (50, 90, 99))
        print(f"| rankwise, {label} | {r['req_per_s']:.2f} | {r['output_tok_per_s']:,.0f} | "
              f"{r['output_tok_per_s'] / base:.2f} | {f(r['ttft_ms'])} | {f(r['tpot_ms'])} | {r['peak_gib']:.1f} |")
    for key, label in (("hf_base", "HF generate, base"), ("peft_mixed_32", "PEFT mixed batch, 32 adapters")):
        if key not in res:
            continue
        r = res[key]
        print(f"| {label} (batch 32, {r['new_tokens']} tokens) | - | {r['output_tok_per_s']:,.0f} | "
              f"{r['output_tok_per_s'] / base:.3f} | - | - | - |")
    d = res["decode_batch32"]
    print(f"\ndecode batch 32: {d['base']['step_ms']:.2f} ms/step no adapters ({d['base']['tok_per_s']:,.0f} tok/s), "
          f"{d['32_adapters']['step_ms']:.2f} ms with 32 adapters; bandwidth floor {d['bandwidth_floor_ms']:.2f} ms "
          f"(x{d['base_vs_bandwidth_floor']:.2f}), GEMM-graph floor {d['gemm_graph_floor_ms']:.2f} ms "
          f"(x{d['base_vs_gemm_floor']:.2f})")
    big, runs = res["big_label"], res["rankwise"]
    parts = [f"decode / floor = {d['base_vs_bandwidth_floor']:.2f} (<= 1.5)"]
    if big in runs and "no adapters" in runs:
        parts.insert(0, f"{big} / no adapters = {runs[big]['output_tok_per_s'] / base:.2f} (>= 0.80)")
    if "peft_mixed_32" in res and "32 adapters" in runs:
        ratio = runs["32 adapters"]["output_tok_per_s"] / res["peft_mixed_32"]["output_tok_per_s"]
        parts.append(f"32 adapters / PEFT = {ratio:.0f}x (>= 20x)")
    if "fp32_peft_check" in res:
        c = res["fp32_peft_check"]
        parts.append(f"fp32 PEFT check {c['identical_to_peft']}/{c['requests']}")
    print("targets: " + "; ".join(parts))


if __name__ == "__main__":
    main()
