"""Distributed training throughput: DDP scaling (1 vs 2 GPUs, same global batch) of a Llama-3.2-1B-shaped
model while an allocator resizes its adapters, and FSDP2 on a Llama-70B-shaped model whose bf16 weights
(131 GiB) do not fit one GPU. Random weights and tokens: throughput does not depend on them.

    torchrun --nproc-per-node 2 bench/dist_scaling.py --model 1b --out $OUT/ddp2.json
    torchrun --nproc-per-node 1 bench/dist_scaling.py --model 1b --out $OUT/ddp1.json
    torchrun --nproc-per-node 2 bench/dist_scaling.py --model 70b --strategy fsdp --out $OUT/fsdp2.json
    python bench/dist_scaling.py --report $OUT/ddp1.json $OUT/ddp2.json $OUT/fsdp2.json   # the table

`--allocator fixed` (rank `--rank` throughout, no resizes) run on 1 and 2 GPUs gives the scaling of DDP alone;
set beside the `adalora` (default) or `sora` pair it separates the allocator's per-step host cost from DDP's.

Every run trains `--warmup` untimed steps, then `--steps` timed ones; the allocator's schedule spans both,
so resizes (and the DDP rebuilds they cause) fall inside the timed window. Throughput per GPU is global
tokens per second / GPUs; scaling efficiency = (per-GPU throughput on N GPUs) / (on 1 GPU). The 70B model
is built on the meta device, sharded, then materialised shard by shard (`to_empty`), as FSDP2 intends for
models that one process cannot hold.
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch
import torch.distributed as dist

SHAPES = {  # Llama-3.2-1B and Llama-3.1-70B
    "1b": {"hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16, "num_attention_heads": 32,
           "num_key_value_heads": 8, "tie_word_embeddings": True},
    "70b": {"hidden_size": 8192, "intermediate_size": 28672, "num_hidden_layers": 80, "num_attention_heads": 64,
            "num_key_value_heads": 8, "tie_word_embeddings": False},
    "tiny": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
             "num_key_value_heads": 2, "tie_word_embeddings": False},  # CPU check of this script (gloo)
}
VOCAB = {"1b": 128256, "70b": 128256, "tiny": 512}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build(args, env):
    """(model, number of base parameters): bf16 Llama with rank-r adapters on every linear layer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    import rankwise
    from rankwise.distributed import enable_gradient_checkpointing, shard_frozen_base
    from rankwise.layers.adapter import kaiming_rows

    cfg = LlamaConfig(vocab_size=VOCAB[args.model], max_position_embeddings=max(args.seq, 2048), rope_theta=500000.0,
                      **SHAPES[args.model])
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    meta = args.strategy == "fsdp" and env.distributed
    with torch.device("meta" if meta else env.device):
        model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    n_base = sum(p.numel() for p in model.parameters())
    rankwise.inject(model, rankwise.LoraConfig(r=args.rank, alpha=2 * args.rank, target_modules="all-linear"))
    if args.grad_ckpt:
        enable_gradient_checkpointing(model, distributed=env.distributed)
    model.train()
    if meta:
        shard_frozen_base(model, device=env.device, world_size=env.world_size)
        model.to_empty(device=env.device)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if ".adapters." in name:
                    continue
                if name.endswith("norm.weight"):
                    p.fill_(1.0)
                else:
                    p.normal_(0.0, 0.02)
            for _, _, adapter in rankwise.adapter_modules(model):
                adapter.lora_A.copy_(kaiming_rows(adapter.r, adapter.in_features, dtype=adapter.lora_A.dtype,
                                                  device=env.device))
                adapter.lora_B.zero_()
            rotary = model.model.rotary_emb  # buffers computed at construction: recompute them
            fresh = type(rotary)(config=cfg)
            for key, buf in fresh.named_buffers():
                getattr(rotary, key).copy_(buf)
    return model, n_base


def run(args) -> dict:
    import rankwise
    from rankwise.allocate import Budget, make_allocator
    from rankwise.distributed import (
        ParallelConfig,
        ParallelModel,
        init_distributed,
        parallel_train_step,
        shard_batch,
        split_micro_batches,
    )

    env = init_distributed()
    model, n_base = build(args, env)
    total = args.warmup + args.steps
    name = args.allocator
    warmup = max(args.warmup // 2, 1)
    schedules = {"adalora": {"warmup_steps": warmup, "final_steps": 2, "interval": args.interval},
                 "sora": {"warmup_steps": warmup, "final_steps": 2, "check_every": args.interval}}
    budget = Budget(avg_rank=args.rank if name == "fixed" else args.rank / 2)
    alloc = make_allocator(name, model, budget, schedules.get(name), total_steps=total)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    alloc.attach(opt)
    pm = ParallelModel(model, ParallelConfig(strategy=args.strategy), allocator=alloc, env=env)
    g = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, VOCAB[args.model], (args.global_batch, args.seq), generator=g) for _ in range(4)]
    times, losses = [], []
    cuda = env.device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    for step in range(1, total + 1):
        ids = shard_batch(batches[step % 4], env.rank, env.world_size).to(env.device)
        micro = split_micro_batches({"input_ids": ids, "labels": ids}, args.accum)
        _sync(env.device)
        t0 = time.perf_counter()
        losses.append(parallel_train_step(pm, micro, step, opt, allocator=alloc))  # returns a synced float
        _sync(env.device)
        times.append(time.perf_counter() - t0)
    timed = times[args.warmup:]
    peak = torch.tensor([torch.cuda.max_memory_allocated() / 2**30 if cuda else 0.0], device=env.device)
    if env.distributed:
        dist.all_reduce(peak, op=dist.ReduceOp.MAX)
    tokens = args.global_batch * args.seq
    result = {
        "model": f"llama-{args.model}-shaped", "base_params": n_base, "strategy": pm.strategy,
        "gpus": env.world_size, "global_batch": args.global_batch, "seq": args.seq, "accum": args.accum,
        "grad_ckpt": args.grad_ckpt, "allocator": name, "rank": args.rank, "warmup": args.warmup,
        "steps": args.steps, "mean_step_s": sum(timed) / len(timed), "median_step_s": statistics.median(timed),
        "step_times_s": timed, "tokens_per_s": tokens * len(timed) / sum(timed),
        "peak_mem_gib": float(peak), "rewraps": pm.rewraps, "resizes": len(alloc.history),
        "adapter_params": rankwise.adapter_param_count(model), "loss_first": losses[0], "loss_last": losses[-1],
        "gpu": torch.cuda.get_device_name() if cuda else "cpu", "torch": torch.__version__,
        "date": datetime.date.today().isoformat(),
    }
    result["tokens_per_s_per_gpu"] = result["tokens_per_s"] / env.world_size
    result["median_tokens_per_s_per_gpu"] = tokens / result["median_step_s"] / env.world_size
    if env.is_main and args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))
    if env.is_main:
        print(json.dumps({k: v for k, v in result.items() if k != "step_times_s"}), flush=True)
    return result


def _allocator(result: dict) -> str:
    return result.get("allocator", "adalora")  # result files written before --allocator existed: adalora


def report(paths: list[str]) -> str:
    rows = [json.loads(Path(p).read_text()) for p in paths if Path(p).is_file()]
    base = {(r["model"], _allocator(r)): r for r in rows if r["gpus"] == 1}  # efficiency: same model and allocator
    lines = [("| model | allocator | strategy | GPUs | global batch x seq | tokens/s | tokens/s/GPU (mean) | "
              "efficiency (mean) | tokens/s/GPU (median step) | efficiency (median) | peak GiB/GPU | "
              "resizes / DDP rebuilds |"),
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        one = base.get((r["model"], _allocator(r)))
        accum = f" (accum {r['accum']})" if r["accum"] > 1 else ""
        eff = f"{100 * r['tokens_per_s_per_gpu'] / one['tokens_per_s_per_gpu']:.1f}%" if one else "-"
        eff_med = (f"{100 * r['median_tokens_per_s_per_gpu'] / one['median_tokens_per_s_per_gpu']:.1f}%"
                   if one else "-")
        lines.append(
            f"| {r['model']} ({r['base_params'] / 1e9:.2f}B) | {_allocator(r)} | {r['strategy']} | {r['gpus']} | "
            f"{r['global_batch']} x {r['seq']}{accum} | "
            f"{r['tokens_per_s']:,.0f} | {r['tokens_per_s_per_gpu']:,.0f} | {eff} | "
            f"{r['median_tokens_per_s_per_gpu']:,.0f} | {eff_med} | {r['peak_mem_gib']:.1f} | "
            f"{r['resizes']} / {r['rewraps']} |"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=sorted(SHAPES), default="1b")
    ap.add_argument("--strategy", choices=["ddp", "fsdp"], default="ddp")
    ap.add_argument("--global-batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--accum", type=int, default=1)
    ap.add_argument("--rank", type=int, default=16, help="initial rank; adalora / sora prune towards the average "
                    "rank rank/2, fixed keeps this rank")
    ap.add_argument("--allocator", choices=["adalora", "fixed", "sora"], default="adalora",
                    help="fixed: no allocator work, to measure DDP scaling alone")
    ap.add_argument("--interval", type=int, default=4, help="steps between AdaLoRA prunes / SoRA checks")
    ap.add_argument("--warmup", type=int, default=4)
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--grad-ckpt", action="store_true")
    ap.add_argument("--out", default=None)
    ap.add_argument("--report", nargs="*", default=None, help="print the table of these result files")
    args = ap.parse_args()
    if args.report is not None:
        print(report(args.report))
        return
    from rankwise.distributed import destroy_distributed

    try:
        run(args)
    finally:
        destroy_distributed()


if __name__ == "__main__":
    main()
