"""Tables of the quality benchmark from its JSONL rows: mean ± std over seeds per task, the average over the
classification tasks, parameters actually used and wall time, one table per budget; then a summary that
counts wins against fixed-rank LoRA and PEFT's AdaLoRA (paired: over the seeds both rows ran) and names the best
adaptive allocator.

`metric="task"` scores classification tasks by their GLUE metric (accuracy, Matthews) and LM tasks by held-out
loss; `metric="loss"` scores every task by held-out loss (a classification row's `dev_loss`, the cross-entropy on
its dev set: a continuous measure of the same model with less seed noise than accuracy on a few hundred rows).

Rows run at several learning rates (`--lr 2e-3,4e-3,8e-3`) are reduced to one rate per task, budget and method
first: the rate whose mean `select_loss` (the loss on 64 held-out training rows, never the dev set) is lowest, so
each method is compared at its own best rate and the reported dev scores choose nothing.
"""

from __future__ import annotations

import statistics
from collections import defaultdict
from typing import Any

from bench.quality_tasks import CLS_TASKS, LM_TASKS  # LM tasks are scored by held-out loss: lower is better

REFERENCE_ROWS = ("fixed", "peft-lora", "peft-adalora")
TASK_ORDER = (*CLS_TASKS, *LM_TASKS)
HEADERS = {"sst2": "SST-2 acc", "cola": "CoLA mcc", "rte": "RTE acc", "mrpc": "MRPC acc", "gsm8k": "GSM8K loss",
           "alpaca": "Alpaca loss", "math": "Math loss"}
METRICS = ("task", "loss")


def _value(r: dict[str, Any], metric: str) -> float | None:
    """A finished row's value under `metric` (None: the row did not record it)."""
    if r["task"] in LM_TASKS:  # an LM task's score is minus the held-out loss; show the loss itself
        return r["metrics"]["loss"]
    return r["score"] if metric == "task" else r["metrics"].get("dev_loss")


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def summarize(rows: list[dict[str, Any]], metric: str = "task") -> dict[str, Any]:
    """{(budget, method, task): [scores]}, the same by seed, and friends, from the rows that finished."""
    if metric not in METRICS:
        raise ValueError(f"metric={metric!r}: choose from {METRICS}.")
    ok = [r for r in rows if "error" not in r and "skipped" not in r and _value(r, metric) is not None]
    scores: dict[tuple, list[float]] = defaultdict(list)
    by_seed: dict[tuple, dict[int, float]] = defaultdict(dict)
    params: dict[tuple, list[int]] = defaultdict(list)
    wall: dict[tuple, list[float]] = defaultdict(list)
    for r in ok:
        key = (r["budget"], r["method"], r["task"])
        scores[key].append(_value(r, metric))
        by_seed[key][r["seed"]] = _value(r, metric)
        params[(r["budget"], r["method"])].append(r["params"])
        wall[(r["budget"], r["method"])].append(r["wall_s"])
    budgets = sorted({k[0] for k in scores})
    methods = list(dict.fromkeys(k[1] for k in sorted(scores, key=lambda k: _method_rank(k[1]))))
    tasks = [t for t in TASK_ORDER if any(k[2] == t for k in scores)]
    return {"scores": scores, "by_seed": by_seed, "params": params, "wall": wall, "budgets": budgets,
            "methods": methods, "tasks": tasks, "metric": metric, "errors": [r for r in rows if "error" in r],
            "skipped": [r for r in rows if "skipped" in r]}


def _method_rank(m: str) -> tuple:
    order = {"fixed": 0, "peft-lora": 90, "peft-adalora": 91}
    return (order.get(m, 10), m)


def cls_average(s: dict, budget: int, method: str) -> float | None:
    """Mean over the classification tasks of the per-task means; None if a task is missing."""
    tasks = [t for t in s["tasks"] if t not in LM_TASKS]
    vals = [s["scores"].get((budget, method, t)) for t in tasks]
    if not tasks or any(not v for v in vals):
        return None
    return statistics.fmean(statistics.fmean(v) for v in vals)


def _better(task: str, a: float, b: float, metric: str = "task") -> bool:
    return a < b if task in LM_TASKS or metric == "loss" else a > b


def paired_means(s: dict, budget: int, method: str, ref: str, task: str) -> tuple[float, float] | None:
    """The two rows' means over the seeds both ran (None if they share none)."""
    mine, theirs = s["by_seed"].get((budget, method, task), {}), s["by_seed"].get((budget, ref, task), {})
    common = sorted(set(mine) & set(theirs))
    if not common:
        return None
    return statistics.fmean(mine[k] for k in common), statistics.fmean(theirs[k] for k in common)


def choose_lr(rows: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], dict[tuple, dict[str, Any]]]:
    """Keep, for each (task, budget, method) run at more than one learning rate, the rows of the rate with the
    lowest mean selection loss over the seeds every rate ran (all its seeds if they share none). Returns the
    kept rows and, per such group, {"chosen": lr, "grid": {lr: (mean dev value, mean selection loss, seeds)}}.
    Rows without a selection loss (runs before it was recorded) are never chosen."""
    done = [r for r in rows if "score" in r and "error" not in r and "skipped" not in r]
    groups: dict[tuple, dict[float, dict[int, dict]]] = defaultdict(lambda: defaultdict(dict))
    for r in done:
        groups[(r["task"], r["budget"], r["method"])][r["lr"]][r["seed"]] = r
    drop: set[int] = set()
    grid: dict[tuple, dict[str, Any]] = {}
    for key, by_lr in groups.items():
        if len(by_lr) < 2:
            continue
        eligible = {lr: seeds for lr, seeds in by_lr.items()
                    if all(r["metrics"].get("select_loss") is not None for r in seeds.values())}
        if not eligible:
            continue
        common = set.intersection(*(set(seeds) for seeds in eligible.values()))

        def sel(lr: float) -> float:
            seeds = eligible[lr]
            return statistics.fmean(seeds[k]["metrics"]["select_loss"] for k in (common or seeds))

        chosen = min(eligible, key=sel)
        grid[key] = {"chosen": chosen, "grid": {
            lr: (statistics.fmean(_value(r, "task") for r in seeds.values()),
                 sel(lr) if lr in eligible else None, len(seeds)) for lr, seeds in sorted(by_lr.items())}}
        drop.update(id(r) for lr, seeds in by_lr.items() if lr != chosen for r in seeds.values())
    return [r for r in rows if id(r) not in drop], grid


def _print_lr_grid(grid: dict[tuple, dict[str, Any]], markdown: bool) -> None:
    lrs = sorted({lr for g in grid.values() for lr in g["grid"]})
    head = ["task", "budget", "method", *[f"lr {lr:g}" for lr in lrs], "chosen"]
    table = []
    for (task, budget, method), g in sorted(grid.items(), key=lambda kv: (TASK_ORDER.index(kv[0][0]), kv[0][1],
                                                                         _method_rank(kv[0][2]))):
        digits = 4 if task in LM_TASKS else 1  # the rates of one method differ in the third decimal
        cells = [task, f"r{budget}", method]
        for lr in lrs:
            cell = g["grid"].get(lr)
            if cell is None:
                cells.append("-")
                continue
            value, sel, n = cell
            mark = "**" if markdown and lr == g["chosen"] else ""
            cells.append(f"{mark}{value:.{digits}f}{mark} / " + ("-" if sel is None else f"{sel:.3f}") + f" ({n})")
        edge = " (grid edge)" if g["chosen"] in (min(g["grid"]), max(g["grid"])) else ""
        cells.append(f"{g['chosen']:g}{edge}")
        table.append(cells)
    print("\nLearning-rate grid: dev value / selection loss on held-out training rows (seeds); each method keeps "
          "the rate with the lowest selection loss")
    _print_table(head, table, markdown)


def print_report(rows: list[dict[str, Any]], markdown: bool = False, metric: str = "task") -> dict[str, Any]:
    rows, grid = choose_lr(rows)
    if grid:
        _print_lr_grid(grid, markdown)
    s = summarize(rows, metric)
    s["lr_grid"] = grid
    if not s["budgets"]:
        print("No finished rows.")
        return s
    for budget in s["budgets"]:
        head = ["method", *[HEADERS[t] if metric == "task" else HEADERS[t].split()[0] + " loss" for t in s["tasks"]],
                "avg", "params", "wall s"]
        table = []
        for m in s["methods"]:
            cells = [m]
            for t in s["tasks"]:
                v = s["scores"].get((budget, m, t))
                digits = 3 if t in LM_TASKS or metric == "loss" else 1
                cells.append(f"{_mean_std(v)[0]:.{digits}f} ± {_mean_std(v)[1]:.{digits}f}"
                             + (f" ({len(v)})" if v and len(v) != _max_n(s, budget, t) else "") if v else "-")
            avg = cls_average(s, budget, m)
            cells.append("-" if avg is None else f"{avg:.{3 if metric == 'loss' else 2}f}")
            p = s["params"].get((budget, m))
            cells.append(f"{statistics.fmean(p) / 1e3:.1f}k" if p else "-")
            w = s["wall"].get((budget, m))
            cells.append(f"{statistics.fmean(w):.1f}" if w else "-")
            table.append(cells)
        print(f"\nBudget: uniform rank {budget} (mean ± std over seeds; avg over classification tasks; params = "
              "adapter parameters at the end; wall = seconds per row, set-up + training"
              + ("; every task by held-out loss, lower is better)" if metric == "loss" else ")"))
        _print_table(head, table, markdown)
    _print_summary(s, markdown)
    for r in s["errors"]:
        print(f"error: {r['task']} {r['method']} r{r['budget']} seed {r['seed']}: {r['error']}")
    if s["skipped"]:
        print(f"{len(s['skipped'])} row(s) skipped by the time limit.")
    mixed = mixed_settings(rows, ignore=("lr",) if grid else ())
    if mixed:
        print(f"warning: these rows were trained with different {', '.join(mixed)} (an --out file that already "
              "held rows of another run?): the means above mix them. Pass a new --out, or --report one file per run.")
    return s


def mixed_settings(rows: list[dict[str, Any]], ignore: tuple[str, ...] = ()) -> list[str]:
    """The training settings that differ between the finished rows of one task (steps, lr, batch size), less
    `ignore` (the learning rate, once a grid chose one per method)."""
    done = [r for r in rows if "score" in r]
    return [key for key in ("steps", "lr", "batch_size") if key not in ignore
            if any(len({r.get(key) for r in done if r["task"] == t}) > 1 for t in {r["task"] for r in done})]


def _max_n(s: dict, budget: int, task: str) -> int:
    return max((len(v) for (b, _, t), v in s["scores"].items() if b == budget and t == task), default=0)


def _print_summary(s: dict, markdown: bool) -> None:
    head = ["method", *[f"avg r{b}" for b in s["budgets"]], "avg", "beats fixed", "beats peft-adalora"]
    table, overall = [], {}
    for m in s["methods"]:
        avgs = [cls_average(s, b, m) for b in s["budgets"]]
        mean = statistics.fmean(avgs) if all(a is not None for a in avgs) else None
        overall[m] = mean
        digits = 3 if s["metric"] == "loss" else 2
        cells = [m, *["-" if a is None else f"{a:.{digits}f}" for a in avgs],
                 "-" if mean is None else f"{mean:.{digits}f}"]
        for ref in ("fixed", "peft-adalora"):
            wins = total = 0
            for b in s["budgets"]:
                for t in s["tasks"]:
                    pair = paired_means(s, b, m, ref, t) if m != ref else None
                    if pair:
                        total += 1
                        wins += _better(t, *pair, s["metric"])
            cells.append(f"{wins}/{total}" if total else "-")
        table.append(cells)
    print("\nSummary (task x budget cells where the method's mean is better than the reference's, over the seeds "
          "both ran)")
    _print_table(head, table, markdown)
    adaptive = {m: v for m, v in overall.items() if m.partition("@")[0] not in REFERENCE_ROWS and v is not None}
    if adaptive:
        loss = s["metric"] == "loss"
        best = (min if loss else max)(adaptive, key=adaptive.get)
        fixed = overall.get("fixed")
        d = 3 if loss else 2
        print(f"\nBest adaptive allocator by mean over {'classification ' if loss else ''}tasks and budgets: {best} "
              f"({adaptive[best]:.{d}f}" + ("" if fixed is None else f"; fixed-rank LoRA {fixed:.{d}f}") + ")")


def _print_table(head: list[str], rows: list[list[str]], markdown: bool) -> None:
    if markdown:
        print("| " + " | ".join(head) + " |")
        print("|" + "|".join("---" if i == 0 else "---:" for i in range(len(head))) + "|")
        for r in rows:
            print("| " + " | ".join(r) + " |")
        return
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows)]
    print("  ".join(h.ljust(w) if i == 0 else h.rjust(w) for i, (h, w) in enumerate(zip(head, widths))))
    for r in rows:
        print("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))))
