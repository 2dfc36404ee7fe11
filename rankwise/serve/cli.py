"""`rankwise serve`: the OpenAI-compatible server over a base model and a directory of PEFT adapters.

    rankwise serve --model path/to/llama --adapters path/to/adapters --port 8000
    python -m rankwise.serve.cli --model ... (the same, without the `rankwise` command)

`add_parser(subparsers)` registers the subcommand on the `rankwise` command's parser; `run(args)` serves.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from rankwise.serve.config import EngineConfig


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The `serve` options (for a parser made elsewhere, e.g. the `rankwise` command's registry)."""
    p.add_argument("--model", required=True, help="local transformers checkpoint of the Llama family")
    p.add_argument("--adapters", default=None, help="directory whose sub-folders are PEFT adapters, served by name")
    p.add_argument("--served-model-name", default=None, help="`model` value that selects the base (default: the "
                                                              "model folder's name)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    d = EngineConfig()
    p.add_argument("--max-num-seqs", type=int, default=d.max_num_seqs, help="rows decoded together")
    p.add_argument("--max-num-batched-tokens", type=int, default=d.max_num_batched_tokens)
    p.add_argument("--max-model-len", type=int, default=d.max_model_len, help="0: the model's limit, at most 4096")
    p.add_argument("--block-size", type=int, default=d.block_size)
    p.add_argument("--num-kv-blocks", type=int, default=d.num_kv_blocks)
    p.add_argument("--kv-cache-memory-gb", type=float, default=d.kv_cache_memory_gb)
    p.add_argument("--max-gpu-adapters", type=int, default=d.max_gpu_adapters)
    p.add_argument("--lora-pool-mb", type=float, default=d.lora_pool_mb)
    p.add_argument("--max-host-adapters", type=int, default=d.max_host_adapters)
    p.add_argument("--max-lora-rank", type=int, default=d.max_lora_rank)
    p.add_argument("--max-queue", type=int, default=d.max_queue, help="requests in beyond which the server answers 429")
    p.add_argument("--dtype", default=d.dtype, choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--device", default=d.device, help="auto, cpu, cuda, cuda:1, ...")
    p.add_argument("--no-cuda-graphs", action="store_true", help="run decode steps eagerly")
    p.add_argument("--pin", nargs="*", default=[], help="adapters to load and keep on the device from the start")
    p.add_argument("--log-level", default="warning")


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("serve", help="OpenAI-compatible server for a base model and many adapters",
                              description=__doc__.splitlines()[0])
    add_arguments(p)
    p.set_defaults(func=run)
    return p


def config_from_args(args: argparse.Namespace) -> EngineConfig:
    return EngineConfig(
        max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
        max_model_len=args.max_model_len, block_size=args.block_size, num_kv_blocks=args.num_kv_blocks,
        kv_cache_memory_gb=args.kv_cache_memory_gb, max_gpu_adapters=args.max_gpu_adapters,
        lora_pool_mb=args.lora_pool_mb, max_host_adapters=args.max_host_adapters, max_lora_rank=args.max_lora_rank,
        max_queue=args.max_queue, dtype=args.dtype, device=args.device, cuda_graphs=not args.no_cuda_graphs,
    )


def run(args: argparse.Namespace) -> int:
    import uvicorn

    from rankwise.serve.api import create_app
    from rankwise.serve.engine import Engine

    if not Path(args.model, "config.json").is_file():
        raise SystemExit(f"--model {args.model}: no config.json there; pass a local transformers checkpoint folder.")
    if args.adapters is not None and not Path(args.adapters).is_dir():
        raise SystemExit(f"--adapters {args.adapters}: not a directory.")
    engine = Engine.from_pretrained(args.model, config_from_args(args), adapter_dir=args.adapters)
    engine.warmup()
    for name in args.pin:
        engine.adapters.load(name, pin=True)
    name = args.served_model_name or Path(args.model).resolve().name
    app = create_app(engine, served_model_name=name)
    print(f"rankwise serve: model {name!r} on {engine.device} ({engine.dtype}), adapters from {args.adapters}; "
          f"http://{args.host}:{args.port}/v1", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    return 0


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="rankwise serve", description=__doc__.splitlines()[0])
    add_arguments(parser)
    run(parser.parse_args(argv))


if __name__ == "__main__":
    main()
