"""Exact resume: a run interrupted (SIGKILL, a crash, Ctrl-C) and resumed ends with the same weights as an
uninterrupted run, for fixed-rank LoRA and every registered allocator. Allocators that change ranks during
training must change some after the interruption; those that decide once before training (EVA, GoRA, ...) are
checked for exactness only."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from rankwise.allocate import available_allocators
from rankwise.io.checkpoint import list_checkpoints
from rankwise.train.config import TrainConfig
from rankwise.train.runner import Hooks, train

STEPS, SAVE_EVERY, STOP_AT = 12, 3, 7
# Options that make each method change ranks within STEPS steps (defaults are sized for real runs).
OPTIONS = {"adalora": {"interval": 2}, "increlora": {"top_h": 1, "interval": 1}}


def config(model: Path, files, out: Path, method: str, **over) -> TrainConfig:
    train_file, dev_file = files
    return TrainConfig(**{
        "model": str(model), "train_file": str(train_file), "eval_file": str(dev_file), "output_dir": str(out),
        "method": method, "budget": "r2", "steps": STEPS, "batch_size": 8, "max_length": 16,
        "max_train_samples": 48, "max_eval_samples": 16, "save_every": SAVE_EVERY, "lr": 5e-3, "threads": 1,
        "progress": False, "plot": False, "tensorboard": False, "allocator_options": OPTIONS.get(method, {}), **over,
    })


def final_state(out: Path) -> tuple[dict[str, torch.Tensor], list[str]]:
    tensors = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    history = (out / "adapter" / "rank_history.jsonl").read_text().splitlines()
    return tensors, history


def assert_same_run(a: Path, b: Path) -> None:
    ta, ha = final_state(a)
    tb, hb = final_state(b)
    assert ha == hb, "the rank decisions differ"
    assert ta.keys() == tb.keys()
    for key in ta:
        assert ta[key].shape == tb[key].shape, key
        assert torch.equal(ta[key], tb[key]), f"{key}: max diff {(ta[key] - tb[key]).abs().max():.3g}"
    ma, mb = (json.loads((p / "metrics.json").read_text()) for p in (a, b))
    assert ma["eval"] == mb["eval"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, cls_model_dir, sst_files):
    """Uninterrupted runs, one per method, computed once."""
    cache: dict[str, Path] = {}

    def get(method: str) -> Path:
        if method not in cache:
            out = tmp_path_factory.mktemp(f"ref-{method}")
            train(config(cls_model_dir, sst_files, out, method))
            cache[method] = out
        return cache[method]

    return get


class Crash(RuntimeError):
    pass


def _crash_at(step: int):
    def hook(run, s, loss):
        if s == step:
            raise Crash(f"simulated crash at step {s}")
    return hook


@pytest.mark.parametrize("method", available_allocators())
def test_crash_then_resume_matches_uninterrupted(method, reference, cls_model_dir, sst_files, tmp_path):
    out = tmp_path / "run"
    with pytest.raises(Crash):
        train(config(cls_model_dir, sst_files, out, method), Hooks(after_step=[_crash_at(STOP_AT)]))
    assert [p.name for p in list_checkpoints(out / "checkpoints")] == ["step-00000003", "step-00000006"]
    train(config(cls_model_dir, sst_files, out, method, resume="latest"))
    ref = reference(method)
    history = [json.loads(line) for line in final_state(ref)[1]]
    if any(h["step"] > 0 for h in history):  # it changes ranks during training: some change must come after
        # the resume point, or the test would not cover restoring a changing allocator (tune OPTIONS if not)
        assert any(h["step"] > 6 for h in history), f"{method} made no rank decision after step 6"
    assert_same_run(ref, out)


KILL_SCRIPT = textwrap.dedent("""
    import json, os, signal, sys
    from rankwise.train.config import TrainConfig
    from rankwise.train.runner import Hooks, train

    def die(run, step, loss):
        if step == {stop}:
            os.kill(os.getpid(), signal.SIGKILL)   # no cleanup, no atexit: as if the machine died

    train(TrainConfig(**json.loads(sys.argv[1])), Hooks(after_step=[die]))
""")


@pytest.mark.parametrize("method", ["fixed", "adalora"])
def test_sigkill_then_resume_matches_uninterrupted(method, reference, cls_model_dir, sst_files, tmp_path):
    if method not in available_allocators():
        pytest.skip(f"{method} is not registered")
    out = tmp_path / "run"
    cfg = config(cls_model_dir, sst_files, out, method)
    proc = subprocess.run([sys.executable, "-c", KILL_SCRIPT.format(stop=STOP_AT), json.dumps(cfg.to_dict())],
                          capture_output=True, text=True, timeout=300, check=False, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert not (out / "adapter").exists()  # it died before the end
    assert list_checkpoints(out / "checkpoints")[-1].name == "step-00000006"
    train(config(cls_model_dir, sst_files, out, method, resume="latest"))
    assert_same_run(reference(method), out)


def test_ctrl_c_writes_a_checkpoint_and_resume_matches(reference, cls_model_dir, sst_files, tmp_path):
    out = tmp_path / "run"

    def interrupt(run, step, loss):
        if step == 5:
            os.kill(os.getpid(), signal.SIGINT)

    summary = train(config(cls_model_dir, sst_files, out, "fixed", save_every=0), Hooks(after_step=[interrupt]))
    assert summary == {"interrupted": True, "step": 5}
    assert [p.name for p in list_checkpoints(out / "checkpoints")] == ["step-00000005"]
    train(config(cls_model_dir, sst_files, out, "fixed", save_every=0, resume="latest"))
    assert_same_run(reference("fixed"), out)  # the reference saved checkpoints too: that changes nothing


def test_resume_refuses_changed_settings(cls_model_dir, sst_files, tmp_path):
    out = tmp_path / "run"
    with pytest.raises(Crash):
        train(config(cls_model_dir, sst_files, out, "fixed"), Hooks(after_step=[_crash_at(4)]))
    with pytest.raises(ValueError, match=r"lr: 0.005 -> 0.001"):
        train(config(cls_model_dir, sst_files, out, "fixed", lr=1e-3, resume="latest"))


def test_resume_latest_without_checkpoint_explains(cls_model_dir, sst_files, tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint in"):
        train(config(cls_model_dir, sst_files, tmp_path / "fresh", "fixed", resume="latest"))
