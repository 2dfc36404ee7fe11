"""`rankwise train` (rankwise.train.runner) in 2 gloo processes against one process at the same effective batch
(batch_size x grad_accum x processes = 8): same adapter and rank decisions with DDP, DDP with gradient
accumulation and FSDP2, one writer, and a 2-process checkpoint resumed by one process."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from allocate.dist_utils import run_distributed
from safetensors.torch import load_file
from train_fixtures import no_dropout_model_dir, sst_files  # noqa: F401  (pytest fixtures)

from rankwise.distributed import is_sharded
from rankwise.train.config import TrainConfig
from rankwise.train.runner import Hooks, train

STEPS = 6


def _config(model: Path, files, out: Path, **over) -> dict:
    train_file, dev_file = files
    cfg = {"model": str(model), "train_file": str(train_file), "eval_file": str(dev_file), "output_dir": str(out),
               "method": "adalora", "budget": "r2", "steps": STEPS, "batch_size": 8, "max_length": 16, "max_train_samples": 48,
               "max_eval_samples": 16, "save_every": 3, "lr": 5e-3, "threads": 1, "progress": False, "plot": False,
               "tensorboard": False, "allocator_options": {"interval": 1, "warmup_steps": 1, "final_steps": 1}}
    cfg.update(over)
    return cfg


def run_train(rank: int, world: int, configs: dict[str, tuple[str, dict]]) -> dict[str, dict]:
    """One `train` per {name: (strategy, config)} (RANKWISE_STRATEGY picks DDP or FSDP2 for the frozen base)."""
    out = {}
    for name, (strategy, cfg) in configs.items():
        os.environ["RANKWISE_STRATEGY"] = strategy
        sharded = set()
        hooks = Hooks(after_step=[lambda run, step, loss, seen=sharded: seen.add(is_sharded(run.model))])
        out[name] = {**train(TrainConfig(**cfg), hooks), "sharded": sorted(sharded)}
    return out


def _adapter(out: Path) -> tuple[dict[str, torch.Tensor], list[str]]:
    return (load_file(str(out / "adapter" / "adapter_model.safetensors")),
            (out / "adapter" / "rank_history.jsonl").read_text().splitlines())


def _assert_close(a: Path, b: Path) -> None:
    (ta, ha), (tb, hb) = _adapter(a), _adapter(b)
    assert [json.loads(x)["new_rank"] for x in ha] == [json.loads(x)["new_rank"] for x in hb]
    assert ta.keys() == tb.keys()
    for key in ta:
        assert ta[key].shape == tb[key].shape, key
        assert torch.allclose(ta[key], tb[key], atol=1e-5), f"{key}: {(ta[key] - tb[key]).abs().max():.3g}"


@pytest.fixture(scope="module")
def runs(tmp_path_factory, no_dropout_model_dir, sst_files):  # noqa: F811
    """One process x batch 8; 2 processes x batch 4 (DDP, FSDP2); 2 processes x batch 2 x grad_accum 2 (DDP)."""
    one = tmp_path_factory.mktemp("one")
    two, fsdp, accum = (tmp_path_factory.mktemp(n) for n in ("two", "fsdp", "accum"))
    train(TrainConfig(**_config(no_dropout_model_dir, sst_files, one)))
    configs = {"ddp": ("ddp", _config(no_dropout_model_dir, sst_files, two, batch_size=4)),
               "fsdp": ("fsdp", _config(no_dropout_model_dir, sst_files, fsdp, batch_size=4)),
               "ddp_accum": ("ddp", _config(no_dropout_model_dir, sst_files, accum, batch_size=2, grad_accum=2))}
    summaries = run_distributed(run_train, 2, (configs,), timeout_s=180)
    return one, two, fsdp, accum, summaries


def test_two_processes_train_the_adapter_of_one(runs):
    one, two, fsdp, accum, summaries = runs
    history = (one / "adapter" / "rank_history.jsonl").read_text().splitlines()
    assert history and json.loads(history[0])["allocator"] == "adalora", "AdaLoRA must resize in this run"
    _assert_close(one, two)
    _assert_close(one, fsdp)  # FSDP2 over the frozen base (tiny BERT: BertLayer units), DDP for the adapters
    _assert_close(one, accum)  # no_sync for the first micro-batch, one all-reduce and one allocator step per step
    m1, m2 = (json.loads((p / "metrics.json").read_text()) for p in (one, two))
    assert m1["eval"]["accuracy"] == m2["eval"]["accuracy"]
    for name, strategy in (("ddp", "ddp"), ("fsdp", "fsdp"), ("ddp_accum", "ddp")):
        assert summaries[0][name]["eval"] == summaries[1][name]["eval"]  # every process evaluated the same model
        assert summaries[0][name]["sharded"] == [strategy == "fsdp"]
        assert summaries[0][name]["effective_batch"] == 8


def test_process_0_alone_writes(runs):
    one, two, _, _, _ = runs
    lines = lambda p: [json.loads(x) for x in (p / "log.jsonl").read_text().splitlines()]
    assert [(r["type"], r.get("step")) for r in lines(two)] == [(r["type"], r.get("step")) for r in lines(one)]
    assert sorted(p.name for p in (two / "checkpoints").iterdir()) == ["step-00000003"]


def test_a_two_process_checkpoint_resumes_in_one_process(runs, no_dropout_model_dir, sst_files, tmp_path):  # noqa: F811
    """Saved by 2 processes x batch 4, resumed by one process x batch 4 x grad_accum 2: the same 8 rows a step."""
    _, two, _, _, _ = runs
    shutil.copytree(two, tmp_path / "finished")  # the resumed run writes its adapter into the same folder
    cfg = _config(no_dropout_model_dir, sst_files, two, batch_size=4, grad_accum=2,
                  resume=str(two / "checkpoints" / "step-00000003"))
    train(TrainConfig(**cfg))
    _assert_close(tmp_path / "finished", two)
