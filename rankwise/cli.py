"""The `rankwise` command: train | inspect | merge | combine | compress | export | serve | demo.

Each subcommand is one entry in `COMMANDS` (its flags and the function that runs it). Errors that a user can
fix (a bad flag value, a missing column, a wrong path) print as one line `rankwise <command>: error: ...`
with exit status 2, not as a traceback (set RANKWISE_DEBUG=1 to see the traceback).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for the hub, whatever the environment says
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


# ---- train ------------------------------------------------------------------------------------------------

def _train_args(p: argparse.ArgumentParser) -> None:
    from rankwise.train.config import add_flags

    p.add_argument("--config", help="YAML file with any of the keys below (flags override it)")
    add_flags(p)


def _train(args: argparse.Namespace) -> int:
    from rankwise.train.config import TrainConfig, flags_from_namespace
    from rankwise.train.runner import train

    cfg = TrainConfig.from_sources(args.config, flags_from_namespace(args))
    summary = train(cfg)
    if summary.get("interrupted"):
        print(f"stopped at step {summary['step']}; continue with the same command plus --resume")
        return 130
    print(json.dumps(summary, indent=2))
    print(f"adapter: {summary['adapter']}\nmetrics: {Path(cfg.output_dir) / 'metrics.json'}")
    if summary.get("plot"):
        print(f"rank picture: {summary['plot']}")
    return 0


# ---- inspect ----------------------------------------------------------------------------------------------

def _inspect_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("adapter", help="adapter folder (PEFT format)")
    p.add_argument("--plot", metavar="FILE.png", help="write a heatmap of ranks (and ranks over steps)")
    p.add_argument("--json", action="store_true", help="print the per-module table as JSON")


def _inspect(args: argparse.Namespace) -> int:
    from rankwise.io.summary import format_table, summarize_adapter

    summary = summarize_adapter(args.adapter)
    if args.json:
        rows = [{"module": m.name, "rank": m.rank, "alpha": m.alpha, "scale": m.scale, "params": m.params}
                for m in summary.modules]
        print(json.dumps({"modules": rows, "total_params": summary.total_params,
                          "history": len(summary.history)}, indent=2))
    else:
        print(format_table(summary))
    if args.plot:
        from rankwise.plot import plot_adapter

        print(f"rank picture: {plot_adapter(args.adapter, args.plot)}")
    return 0


# ---- merge / combine / compress / export ------------------------------------------------------------------

def _load_base(base: str, adapter: str):
    from rankwise.io.peft import RANKWISE_META, read_adapter_files
    from rankwise.train.models import load_base_for_adapter

    config, _ = read_adapter_files(adapter)
    meta_file = Path(adapter) / RANKWISE_META
    meta = json.loads(meta_file.read_text()) if meta_file.is_file() else {}
    return load_base_for_adapter(base, config, meta)


def _save_tokenizer(base: str, out: str) -> None:
    from rankwise.train.models import load_tokenizer

    try:
        load_tokenizer(base).save_pretrained(out)
    except (OSError, ValueError) as err:  # a model folder without a tokenizer is still a model
        print(f"note: no tokenizer saved ({err})", file=sys.stderr)


def _merge_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("base", help="base model folder or .gguf file the adapter was trained on")
    p.add_argument("adapter", help="adapter folder (PEFT format)")
    p.add_argument("out", help="folder for the merged full model (transformers format)")


def _merge(args: argparse.Namespace) -> int:
    import rankwise

    model = _load_base(args.base, args.adapter)
    rankwise.load_adapter(model, args.adapter)
    rankwise.merge_and_unload(model)
    model.save_pretrained(args.out)
    _save_tokenizer(args.base, args.out)
    print(f"merged model: {args.out}")
    return 0


def _combine_args(p: argparse.ArgumentParser) -> None:
    from rankwise.merge import supported_methods

    p.add_argument("base", help="base model folder or .gguf file the adapters were trained on")
    p.add_argument("out", help="folder for the combined adapter")
    p.add_argument("adapters", nargs="+", help="adapter folders to combine")
    p.add_argument("--weights", help="comma-separated weights, one per adapter (default: equal, summing to 1)")
    p.add_argument("--method", default="linear", choices=supported_methods())
    p.add_argument("--rank", type=int, help="svd / ties: rank of the result")
    p.add_argument("--energy", type=float, help="svd / ties: keep this fraction of each delta's energy")
    p.add_argument("--density", type=float, help="ties: fraction of entries kept")


def _combine(args: argparse.Namespace) -> int:
    from rankwise.merge import combine_adapter_dirs

    n = len(args.adapters)
    weights = [1.0 / n] * n if not args.weights else [float(w) for w in args.weights.split(",")]
    if len(weights) != n:
        raise ValueError(f"--weights has {len(weights)} value(s) for {n} adapter(s); give one per adapter.")
    model = _load_base(args.base, args.adapters[0])
    ranks = combine_adapter_dirs(model, args.adapters, weights, args.method, args.out, rank=args.rank,
                                 energy=args.energy, density=args.density)
    print(f"combined adapter ({args.method}, {len(ranks)} modules, ranks {min(ranks.values())}.."
          f"{max(ranks.values())}): {args.out}")
    return 0


def _compress_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("adapter", help="adapter folder (PEFT format)")
    p.add_argument("out", help="folder for the compressed adapter")
    p.add_argument("--rank", type=int, help="at most this rank per module")
    p.add_argument("--energy", type=float, help="smallest rank keeping this fraction of each delta's energy")


def _compress(args: argparse.Namespace) -> int:
    from rankwise.io.summary import summarize_adapter
    from rankwise.merge import compress_adapter_dir

    before = summarize_adapter(args.adapter).total_params
    compress_adapter_dir(args.adapter, args.out, rank=args.rank, energy=args.energy)
    after = summarize_adapter(args.out).total_params
    print(f"compressed adapter: {args.out} ({before:,} -> {after:,} adapter parameters)")
    return 0


def _export_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("source", help="a run folder (its latest checkpoint), a checkpoint folder, or an adapter folder")
    p.add_argument("out", help="folder for the PEFT-format adapter")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"],
                   help="tensor type of the written adapter")


def _export(args: argparse.Namespace) -> int:
    from rankwise.io.export import export_adapter

    path = export_adapter(args.source, args.out, dtype=args.dtype)
    print(f"adapter: {path}")
    return 0


# ---- serve ------------------------------------------------------------------------------------------------

def _serve_args(p: argparse.ArgumentParser) -> None:
    from rankwise.serve.cli import add_arguments

    add_arguments(p)


def _serve(args: argparse.Namespace) -> int:
    from rankwise.serve.cli import run

    return run(args) or 0


# ---- demo -------------------------------------------------------------------------------------------------

def _demo_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--output-dir", default="rankwise-demo", help="where the adapters, table and picture go")
    p.add_argument("--steps", type=int, default=None, help="training steps per method (default: the demo's)")


def _demo(args: argparse.Namespace) -> int:
    from rankwise.demo import run_demo

    run_demo(args.output_dir, steps=args.steps)
    return 0


Command = tuple[str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]
COMMANDS: dict[str, Command] = {
    "train": ("fine-tune with a parameter budget (flags or --config FILE.yaml)", _train_args, _train),
    "inspect": ("ranks, parameters and scaling of an adapter; --plot for a picture", _inspect_args, _inspect),
    "merge": ("fold an adapter into its base model and save the full model", _merge_args, _merge),
    "combine": ("combine adapters (linear, cat, svd, ties) into one", _combine_args, _combine),
    "compress": ("shrink an adapter to a rank or an energy fraction (truncated SVD)", _compress_args, _compress),
    "export": ("write a PEFT adapter from a run or checkpoint, optionally in another dtype", _export_args, _export),
    "serve": ("OpenAI-compatible server for a base model and many adapters", _serve_args, _serve),
    "demo": ("fine-tune MiniLM on an SST-2 sample: adaptive vs fixed rank", _demo_args, _demo),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rankwise", description="LoRA with a parameter budget instead of a rank.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (help_text, add_args, run) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        add_args(p)
        p.set_defaults(run=run, parser=p)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from rankwise.train.data import DataError

    try:
        return args.run(args)
    except (ValueError, FileNotFoundError, KeyError, DataError) as err:
        if os.environ.get("RANKWISE_DEBUG"):
            raise
        message = err.args[0] if isinstance(err, KeyError) and err.args else str(err)
        args.parser.exit(2, f"rankwise {args.command}: error: {message}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
