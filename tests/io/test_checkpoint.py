"""Checkpoints: atomic folders, pruning, RNG round trip, restoring changed ranks and optimizer groups by name."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from tiny_models import mlp

import rankwise
from rankwise.io import checkpoint as ckpt


def make():
    model = mlp()
    rankwise.inject(model, rankwise.LoraConfig(r=4, target_modules=["0", "2"]))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model(torch.randn(3, 8)).sum().backward()
    opt.step()
    return model, opt


def test_save_restore_changed_ranks_and_optimizer(tmp_path):
    model, opt = make()
    layer = model.get_submodule("0")
    remaps = layer.adapters["default"].resize([0, 2])  # rank 4 -> 2, as an allocator would
    rankwise.remap_optimizer(opt, remaps)
    layer.adapters["default"].scale = 0.75
    path = ckpt.save_checkpoint(tmp_path, 7, model=model, optimizer=opt, data_state={"epoch": 1, "index": 8})
    state = ckpt.load_checkpoint(path)
    fresh, _ = make()
    ckpt.restore_model(fresh, state)
    assert rankwise.rank_map(fresh) == {"0": 2, "2": 4}
    assert fresh.get_submodule("0").adapters["default"].scale == 0.75
    for (n, a), (_, b) in zip(model.state_dict().items(), fresh.state_dict().items()):
        assert torch.equal(a, b), n
    groups = ckpt.build_param_groups(fresh, state["param_names"])
    new_opt = torch.optim.AdamW(groups, lr=1e-2)
    new_opt.load_state_dict(state["optimizer"])
    for p in groups[0]["params"]:
        assert new_opt.state[p]["exp_avg"].shape == p.shape
    assert state["data"] == {"epoch": 1, "index": 8} and (path / "adapter" / "adapter_config.json").is_file()


def test_crash_during_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    model, opt = make()
    ckpt.save_checkpoint(tmp_path, 1, model=model, optimizer=opt)

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(ckpt, "save_adapter", boom, raising=False)
    monkeypatch.setattr("rankwise.io.peft.save_adapter", boom)
    with pytest.raises(OSError):
        ckpt.save_checkpoint(tmp_path, 2, model=model, optimizer=opt)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step-00000001"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-00000001"]  # no half-written folder left


def test_keep_prunes_old_checkpoints(tmp_path):
    model, opt = make()
    for step in (1, 2, 3):
        ckpt.save_checkpoint(tmp_path, step, model=model, optimizer=opt, keep=2, save_peft=False)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step-00000002", "step-00000003"]
    assert ckpt.latest_checkpoint(tmp_path).name == "step-00000003"


def test_rng_round_trip():
    state = ckpt.rng_state()
    expected = (random.random(), np.random.rand(), torch.rand(1))
    random.seed(123), np.random.seed(123), torch.manual_seed(123)
    ckpt.restore_rng(state)
    assert (random.random(), np.random.rand()) == expected[:2]
    assert torch.equal(torch.rand(1), expected[2])


def test_not_a_checkpoint_says_what_to_pass(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a rankwise checkpoint"):
        ckpt.load_checkpoint(tmp_path)
