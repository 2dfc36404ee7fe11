"""Pictures of an adapter's ranks (matplotlib, Agg backend: no display needed).

- heatmap: final rank of every module, layers down, module types across (`rankwise.io.summary.split_layer`);
- ranks over training steps, from the rank history: the mean rank of each module type (thick) and every
  module (thin), as step functions.

`plot_adapter(adapter_dir, "ranks.png")` draws both side by side (the heatmap alone when there is no history).
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.ticker import MaxNLocator

from rankwise.io.summary import AdapterSummary, natural_key, split_layer, summarize_adapter


def rank_grid(summary: AdapterSummary) -> tuple[list[str], list[str], np.ndarray]:
    """(row labels, column labels, ranks (rows, cols) with NaN where a layer has no such module)."""
    cells = {}
    for m in summary.modules:
        layer, kind = split_layer(m.name)
        cells[("other" if layer is None else str(layer), kind)] = m.rank
    rows = sorted({r for r, _ in cells}, key=lambda r: (r == "other", natural_key(r)))
    cols = list(dict.fromkeys(k for _, k in cells))  # model order
    grid = np.full((len(rows), len(cols)), np.nan)
    for (r, k), rank in cells.items():
        grid[rows.index(r), cols.index(k)] = rank
    return rows, cols, grid


def draw_heatmap(ax, summary: AdapterSummary) -> None:
    rows, cols, grid = rank_grid(summary)
    masked = np.ma.masked_invalid(grid)
    cmap = plt.get_cmap("viridis").with_extremes(bad="#dddddd")  # grey: the layer has no such module
    image = ax.imshow(masked, aspect="auto", cmap=cmap, vmin=0, vmax=max(1, np.nanmax(grid)))
    ax.set_xticks(range(len(cols)), [c.replace(".", ".\n") if len(c) > 14 else c for c in cols], fontsize=7)
    ax.set_yticks(range(len(rows)), rows, fontsize=7 if len(rows) > 16 else 9)
    ax.set_xlabel("module type")
    ax.set_ylabel("layer")
    if grid.size <= 400:
        for i in range(grid.shape[0]):
            for j in range(grid.shape[1]):
                if not np.isnan(grid[i, j]):
                    light = grid[i, j] < 0.6 * np.nanmax(grid)
                    ax.text(j, i, f"{int(grid[i, j])}", ha="center", va="center", fontsize=7,
                            color="white" if light else "black")
    ax.set_title(f"final ranks ({summary.total_params:,} adapter parameters)")
    bar = ax.figure.colorbar(image, ax=ax, label="rank")
    bar.locator = MaxNLocator(integer=True)
    bar.update_ticks()


def draw_history(ax, summary: AdapterSummary) -> None:
    steps, series = summary.rank_steps()
    by_kind: dict[str, list[list[int]]] = {}
    for name, values in series.items():
        ax.step(steps, values, where="post", color="gray", alpha=0.15, linewidth=0.8)
        by_kind.setdefault(split_layer(name)[1], []).append(values)
    for kind, rows in by_kind.items():
        ax.step(steps, np.mean(np.array(rows, dtype=float), axis=0), where="post", linewidth=2, label=kind)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("training step")
    ax.set_ylabel("rank")
    ax.set_title("ranks over training (thick: mean per module type)")
    ax.legend(fontsize=7, loc="best")
    ax.grid(alpha=0.3)


def plot_adapter(adapter: str | Path, out: str | Path, *, title: str | None = None) -> Path:
    """Write the rank picture of the adapter folder `adapter` to `out` (PNG) and return its path."""
    summary = summarize_adapter(adapter)
    with_history = bool(summary.history)
    fig, axes = plt.subplots(1, 2 if with_history else 1, figsize=(15 if with_history else 8, 6), squeeze=False)
    draw_heatmap(axes[0][0], summary)
    if with_history:
        draw_history(axes[0][1], summary)
    fig.suptitle(title or f"{Path(adapter).name}: {summary.meta.get('method', 'LoRA')}")
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
