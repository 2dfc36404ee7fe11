"""Training-step speed on a GPU: the frozen-base floor, HF PEFT and rankwise, same model, batch, optimizer.

Usage (on the GPU machine, from the repository root):
    PYTHONUNBUFFERED=1 PYTHONPATH=. python bench/train_speed.py [--cases NAME,...] [--steps 10] [--warmup 3]
Writes $OUT/train_speed.json (or --json PATH). Prints the table last.

Random-weight models built from configs (speed does not depend on weight values): Llama-3.2-1B's shape, as in
../shared/bench/peft_anchor_gpu.py, and Qwen2.5-0.5B's (bias on q/k/v, 14 heads, 24 layers). bf16, batch
8 x 1024 tokens, adapters on all 7 projections, AdamW(lr=1e-4). A step is forward + backward + optimizer
(+ the allocator's hooks); the floor is the frozen base's forward + backward to its inputs. Each case: a fresh
model, `--warmup` steps, then the median (and mean) of `--steps` steps timed with CUDA events. Peak memory is
torch.cuda.max_memory_allocated over the case (model build included), reset between cases.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time
import traceback

import torch

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
B, T = 8, 1024
DEVICE = "cuda"


def model_config(shape: str):
    from transformers import LlamaConfig, Qwen2Config

    if shape == "llama1b":
        return LlamaConfig(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                           num_key_value_heads=8, vocab_size=128256, max_position_embeddings=4096,
                           tie_word_embeddings=True, attn_implementation="sdpa")
    if shape == "qwen05b":
        return Qwen2Config(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                           num_key_value_heads=2, vocab_size=151936, max_position_embeddings=4096,
                           tie_word_embeddings=True, attn_implementation="sdpa")
    raise ValueError(f"unknown model shape {shape!r}; use llama1b or qwen05b")


def build(shape: str, checkpointing: bool = False):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    with torch.device(DEVICE):
        model = AutoModelForCausalLM.from_config(model_config(shape))
    model = model.to(torch.bfloat16)
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    return model


def time_steps(step, warmup: int, steps: int) -> tuple[float, float, float]:
    """(median ms, mean ms, median host ms): device time between events around each step, and the time the
    host took to issue it (near the device time when the step is bound by Python and launches)."""
    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    times, host = [], []
    for _ in range(steps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        t0 = time.perf_counter()
        step()
        host.append((time.perf_counter() - t0) * 1e3)
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times), statistics.fmean(times), statistics.median(host)


# ---- cases --------------------------------------------------------------------------------------------------
def floor_case(shape: str, checkpointing: bool = False):
    model = build(shape, checkpointing)
    model.requires_grad_(False)
    emb = model.get_input_embeddings()
    ids = torch.randint(0, model.config.vocab_size, (B, T), device=DEVICE)

    def step():
        h = emb(ids).detach().requires_grad_(True)
        model(inputs_embeds=h, labels=ids).loss.backward()

    return model, step, 0


def peft_case(shape: str, kind: str, r: int = 16, dropout: float = 0.0, checkpointing: bool = False):
    from peft import AdaLoraConfig, LoraConfig, get_peft_model

    model = build(shape, checkpointing)
    if kind == "adalora":
        cfg = AdaLoraConfig(init_r=24, target_r=r, target_modules=ALL, total_step=1000, tinit=2, tfinal=2, deltaT=1)
    else:
        cfg = LoraConfig(r=r, lora_alpha=2 * r, target_modules=ALL, lora_dropout=dropout, use_dora=kind == "dora")
    model = get_peft_model(model, cfg)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    ids = torch.randint(0, model.config.vocab_size, (B, T), device=DEVICE)
    state = {"i": 0}

    def step():
        model(input_ids=ids, labels=ids).loss.backward()
        if kind == "adalora":
            model.base_model.update_and_allocate(state["i"])
            state["i"] += 1
        opt.step()
        opt.zero_grad(set_to_none=True)

    return model, step, sum(p.numel() for p in params)


def rankwise_case(shape: str, kind: str, r: int = 16, dropout: float = 0.0, checkpointing: bool = False,
                  fused: bool = True):
    import rankwise
    from rankwise.allocate import Budget, available_allocators, make_allocator
    from rankwise.kernels import use_fused

    model = build(shape, checkpointing)
    allocator = None
    if kind in ("adalora", "sora"):
        if kind not in available_allocators():
            raise RuntimeError(f"allocator {kind!r} is not registered yet (available: {available_allocators()})")
        rankwise.inject(model, rankwise.LoraConfig(r=24 if kind == "adalora" else r, alpha=2 * r,
                                                   target_modules=ALL))
        options = {"warmup_steps": 2, "final_steps": 2} if kind == "adalora" else {}
        allocator = make_allocator(kind, model, Budget(avg_rank=r), options, total_steps=1000)
    else:
        rankwise.inject(model, rankwise.LoraConfig(r=r, alpha=2 * r, target_modules=ALL, dropout=dropout,
                                                   use_dora=kind == "dora"))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    if allocator is not None:
        allocator.attach(opt)
    ids = torch.randint(0, model.config.vocab_size, (B, T), device=DEVICE)
    state = {"step": 0}

    def step():
        state["step"] += 1
        with use_fused(fused):
            loss = model(input_ids=ids, labels=ids).loss
            if allocator is not None:
                extra = allocator.loss_term()
                loss = loss if extra is None else loss + extra
            loss.backward()
        if allocator is not None:
            allocator.on_backward(state["step"])
        opt.step()
        if allocator is not None:
            allocator.on_step(state["step"])
        opt.zero_grad(set_to_none=True)

    return model, step, sum(p.numel() for p in model.parameters() if p.requires_grad)


# name -> (builder, floor it is compared with, PEFT case its memory is compared with, target ratio or None)
CASES = {
    "floor": (lambda: floor_case("llama1b"), None, None, None),
    "floor_gc": (lambda: floor_case("llama1b", True), None, None, None),
    "peft_lora_r16": (lambda: peft_case("llama1b", "lora"), "floor", None, None),
    "peft_lora_r16_dropout": (lambda: peft_case("llama1b", "lora", dropout=0.05), "floor", None, None),
    "peft_dora_r16": (lambda: peft_case("llama1b", "dora"), "floor", None, None),
    "peft_adalora_r16": (lambda: peft_case("llama1b", "adalora"), "floor", None, None),
    "peft_lora_r16_gc": (lambda: peft_case("llama1b", "lora", checkpointing=True), "floor_gc", None, None),
    "rw_reference_lora_r16": (lambda: rankwise_case("llama1b", "lora", fused=False), "floor", "peft_lora_r16", None),
    "rw_lora_r16": (lambda: rankwise_case("llama1b", "lora"), "floor", "peft_lora_r16", 1.10),
    "rw_lora_r16_dropout": (lambda: rankwise_case("llama1b", "lora", dropout=0.05), "floor",
                            "peft_lora_r16_dropout", 1.15),
    "rw_dora_r16": (lambda: rankwise_case("llama1b", "dora"), "floor", "peft_dora_r16", 1.25),
    "rw_adalora_r16": (lambda: rankwise_case("llama1b", "adalora"), "floor", "peft_adalora_r16", 1.15),
    "rw_sora_r16": (lambda: rankwise_case("llama1b", "sora"), "floor", None, 1.15),
    "rw_lora_r64": (lambda: rankwise_case("llama1b", "lora", r=64), "floor", None, None),
    "rw_lora_r128": (lambda: rankwise_case("llama1b", "lora", r=128), "floor", None, None),
    "rw_lora_r16_gc": (lambda: rankwise_case("llama1b", "lora", checkpointing=True), "floor_gc",
                       "peft_lora_r16_gc", 1.10),
    "qwen_floor": (lambda: floor_case("qwen05b"), None, None, None),
    "qwen_peft_lora_r16": (lambda: peft_case("qwen05b", "lora"), "qwen_floor", None, None),
    "qwen_rw_lora_r16": (lambda: rankwise_case("qwen05b", "lora"), "qwen_floor", "qwen_peft_lora_r16", 1.10),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", default=",".join(CASES), help=f"comma-separated subset of {list(CASES)}")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = True
    names = [n.strip() for n in args.cases.split(",") if n.strip()]
    unknown = [n for n in names if n not in CASES]
    if unknown:
        sys.exit(f"unknown case(s) {unknown}; available: {list(CASES)}")
    import peft
    import transformers

    results = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
               "transformers": transformers.__version__,
               "peft": peft.__version__, "batch": f"{B} x {T} tokens, bf16", "steps": args.steps,
               "warmup": args.warmup, "cases": {}}
    for name in names:
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        t0 = time.time()
        try:
            model, step, trainable = CASES[name][0]()
            median, mean, host = time_steps(step, args.warmup, args.steps)
            row = {"ms": median, "mean_ms": mean, "host_ms": host,
                   "peak_gib": torch.cuda.max_memory_allocated() / 2**30,
                   "trainable": trainable}
            del model, step
        except Exception as exc:  # noqa: BLE001 -- one failing case must not lose the others
            traceback.print_exc()
            row = {"error": f"{type(exc).__name__}: {exc}"[:300]}
        row["wall_s"] = time.time() - t0
        results["cases"][name] = row
        print(name, json.dumps(row), flush=True)
    path = args.json or (os.path.join(os.environ["OUT"], "train_speed.json") if os.environ.get("OUT") else None)
    if path:
        with open(path, "w") as fh:
            json.dump(results, fh, indent=1)
    print_table(results)


def print_table(results: dict) -> None:
    cases = results["cases"]
    print(f"\n{results['gpu']}, torch {results['torch']}, {results['batch']}, median of {results['steps']} steps")
    print("| case | ms/step | mean | host | x floor | target | peak GiB | x PEFT peak | trainable |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, row in cases.items():
        if "error" in row:
            print(f"| {name} | error: {row['error'][:80]} | | | | | | | |")
            continue
        _, floor, peft_name, target = CASES[name]
        ratio = row["ms"] / cases[floor]["ms"] if floor in cases and "ms" in cases[floor] else float("nan")
        mem = (row["peak_gib"] / cases[peft_name]["peak_gib"]
               if peft_name in cases and "peak_gib" in cases[peft_name] else float("nan"))
        verdict = "" if target is None else f"<= {target:.2f} {'met' if ratio <= target else 'MISSED'}"
        print(f"| {name} | {row['ms']:.1f} | {row['mean_ms']:.1f} | {row['host_ms']:.0f} | {ratio:.3f} | {verdict} "
              f"| {row['peak_gib']:.1f} | {mem:.2f} | {row['trainable'] / 1e6:.1f}M |")


if __name__ == "__main__":
    main()
