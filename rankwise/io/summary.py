"""What is in a saved adapter, read without the base model: ranks, alphas, scales, parameters, rank history.

Used by `rankwise inspect` and the rank plots. Modules an allocator pruned to rank 0 are not in the weights
file; they are recovered from the rank history (rank_history.jsonl) when it exists.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rankwise.config import match_pattern
from rankwise.io.peft import HISTORY_NAME, RANKWISE_META, parse_state_dict, read_adapter_files


@dataclass
class ModuleInfo:
    name: str
    rank: int
    alpha: float
    scale: float
    in_features: int | None
    out_features: int | None

    @property
    def params(self) -> int:
        return self.rank * ((self.in_features or 0) + (self.out_features or 0))


@dataclass
class AdapterSummary:
    path: Path
    config: dict[str, Any]
    modules: list[ModuleInfo]
    history: list[dict[str, Any]] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)
    other_params: int = 0  # modules_to_save tensors (e.g. a classifier head)

    @property
    def total_params(self) -> int:
        return sum(m.params for m in self.modules)

    def rank_steps(self) -> tuple[list[int], dict[str, list[int]]]:
        """(steps, {module: rank at each step}) from the history: each module's rank before its first
        decision is that decision's old rank; modules never changed keep their final rank throughout."""
        final = {m.name: m.rank for m in self.modules}
        last = int(self.meta.get("steps") or max([h["step"] for h in self.history] or [0]))
        steps = sorted({0, last, *(int(h["step"]) for h in self.history)})
        by_module: dict[str, list[dict]] = {}
        for h in self.history:
            by_module.setdefault(h["module"], []).append(h)
        series = {}
        for name, final_rank in final.items():
            decisions = sorted(by_module.get(name, []), key=lambda h: h["step"])
            rank = decisions[0]["old_rank"] if decisions else final_rank
            values, i = [], 0
            for s in steps:
                while i < len(decisions) and decisions[i]["step"] <= s:
                    rank = decisions[i]["new_rank"]
                    i += 1
                values.append(rank)
            series[name] = values
        return steps, series


def summarize_adapter(path: str | Path) -> AdapterSummary:
    path = Path(path)
    config, sd = read_adapter_files(path)
    modules_sd, other = parse_state_dict(sd)
    rslora = bool(config.get("use_rslora", False))
    default_alpha = float(config.get("lora_alpha", 8))
    modules = []
    for name, parts in modules_sd.items():
        r = int(parts["A"].shape[0])
        alpha = float(match_pattern(config.get("alpha_pattern") or {}, name, default_alpha))
        scale = alpha / math.sqrt(r) if rslora else alpha / r
        modules.append(ModuleInfo(name, r, alpha, scale, int(parts["A"].shape[1]), int(parts["B"].shape[0])))
    meta = json.loads((path / RANKWISE_META).read_text()) if (path / RANKWISE_META).is_file() else {}
    history = []
    if (path / HISTORY_NAME).is_file():
        history = [json.loads(line) for line in (path / HISTORY_NAME).read_text().splitlines() if line.strip()]
    known = {m.name for m in modules}
    for name in dict.fromkeys(h["module"] for h in history):  # pruned to rank 0: not in the weights
        if name not in known:
            modules.append(ModuleInfo(name, 0, 0.0, 0.0, None, None))
    modules.sort(key=lambda m: natural_key(m.name))
    other_params = sum(t.numel() for k, t in other.items() if ".base_layer." not in k)
    return AdapterSummary(path, config, modules, history, meta, other_params)


def natural_key(name: str) -> list[Any]:
    """Sort 'layer.10' after 'layer.9'."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def split_layer(name: str) -> tuple[int | None, str]:
    """'model.layers.3.self_attn.q_proj' -> (3, 'self_attn.q_proj'); no index -> (None, name)."""
    m = re.match(r"^(?:.*?\.)?(\d+)\.(.+)$", name)
    return (int(m.group(1)), m.group(2)) if m else (None, name)


def format_table(summary: AdapterSummary) -> str:
    cfg = summary.config
    lines = [
        f"adapter: {summary.path}",
        f"base model: {cfg.get('base_model_name_or_path')}  task: {cfg.get('task_type')}  "
        f"{'rsLoRA ' if cfg.get('use_rslora') else ''}{'DoRA ' if cfg.get('use_dora') else ''}".rstrip(),
        f"{'module':<60} {'rank':>5} {'alpha':>8} {'scale':>8} {'params':>10}",
    ]
    for m in summary.modules:
        lines.append(f"{m.name:<60} {m.rank:>5} {m.alpha:>8.4g} {m.scale:>8.4g} {m.params:>10,}")
    ranks = [m.rank for m in summary.modules]
    lines.append(f"{len(ranks)} modules, ranks {min(ranks)}..{max(ranks)} (mean {sum(ranks) / len(ranks):.2f}), "
                 f"{summary.total_params:,} adapter parameters"
                 + (f" + {summary.other_params:,} in modules_to_save" if summary.other_params else ""))
    if summary.history:
        lines.append(f"rank history: {len(summary.history)} decisions by {summary.history[0].get('allocator')} "
                     f"between steps {summary.history[0]['step']} and {summary.history[-1]['step']}")
    return "\n".join(lines)
