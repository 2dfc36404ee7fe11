"""Rank pictures: the grid behind the heatmap, the rank-over-steps series, and the PNG itself."""

from __future__ import annotations

import json

import numpy as np
import torch
from PIL import Image
from tiny_models import tiny_llama

import rankwise
from rankwise.io.summary import split_layer, summarize_adapter
from rankwise.plot import plot_adapter, rank_grid


def saved_adapter(tmp_path):
    model = tiny_llama(layers=2)
    rankwise.inject(model, rankwise.LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                               rank_pattern={"layers.1.self_attn.q_proj": 2,
                                                             "layers.0.self_attn.v_proj": 0}))
    for _, _, a in rankwise.adapter_modules(model):
        torch.nn.init.normal_(a.lora_B)
    history = [{"step": 5, "module": "model.layers.1.self_attn.q_proj", "old_rank": 4, "new_rank": 2,
                "score": 0.1, "allocator": "test"},
               {"step": 9, "module": "model.layers.0.self_attn.v_proj", "old_rank": 6, "new_rank": 0,
                "score": 0.0, "allocator": "test"}]
    return rankwise.save_adapter(model, tmp_path / "a", history=history, metadata={"steps": 12})


def test_split_layer():
    assert split_layer("model.layers.3.self_attn.q_proj") == (3, "self_attn.q_proj")
    assert split_layer("bert.pooler.dense") == (None, "bert.pooler.dense")


def test_grid_and_history(tmp_path):
    path = saved_adapter(tmp_path)
    summary = summarize_adapter(path)
    rows, cols, grid = rank_grid(summary)
    assert rows == ["0", "1"] and cols == ["self_attn.q_proj", "self_attn.v_proj"]
    assert grid[0, 1] == 0  # pruned to 0: known from the history only
    assert not np.isnan(grid).any()
    steps, series = summary.rank_steps()
    assert steps == [0, 5, 9, 12]
    assert series["model.layers.1.self_attn.q_proj"] == [4, 2, 2, 2]
    assert series["model.layers.0.self_attn.v_proj"] == [6, 6, 0, 0]


def test_png_is_written(tmp_path):
    out = plot_adapter(saved_adapter(tmp_path), tmp_path / "ranks.png")
    image = Image.open(out)
    assert image.size[0] > image.size[1] > 300  # heatmap and history side by side
    assert json.loads((tmp_path / "a" / "rankwise.json").read_text())["steps"] == 12
