"""The run's building blocks: data order, schedules, data-driven initialisers, LoRA+ groups, TensorBoard."""

from __future__ import annotations

import pytest

from rankwise.train.config import TrainConfig
from rankwise.train.runner import DataStream, Run, lr_lambda, train


def test_data_stream_visits_every_example_once_per_epoch_and_resumes():
    stream = DataStream([{"i": i} for i in range(10)], batch_size=4, seed=3)
    seen = [e["i"] for _ in range(3) for e in stream.next()]
    assert sorted(seen) == list(range(10)) and stream.state() == {"epoch": 1, "index": 0}
    ahead = [e["i"] for e in stream.next()]
    again = DataStream(stream.examples, 4, 3)
    again.load({"epoch": 1, "index": 0})
    assert [e["i"] for e in again.next()] == ahead
    assert stream.order(0) != stream.order(1)  # a new permutation every epoch


def test_schedules():
    linear = lr_lambda("linear", warmup=2, total=10)
    assert [round(linear(s), 3) for s in (0, 1, 2, 6, 10)] == [0.333, 0.667, 1.0, 0.5, 0.0]
    assert lr_lambda("cosine", 0, 10)(5) == pytest.approx(0.5)
    assert lr_lambda("constant", 1, 10)(9) == 1.0


def base(cls_model_dir, sst_files, tmp_path, **kw) -> TrainConfig:
    return TrainConfig(**{
        "model": str(cls_model_dir), "train_file": str(sst_files[0]), "output_dir": str(tmp_path / "out"),
        "method": "fixed", "budget": "r2", "steps": 2, "batch_size": 8, "max_length": 16, "max_train_samples": 32,
        "progress": False, "plot": False, "tensorboard": False, **kw,
    })


@pytest.mark.parametrize("init", ["lora_ga", "corda"])
def test_data_driven_initialisers_use_calibration_batches(init, cls_model_dir, sst_files, tmp_path):
    run = Run(base(cls_model_dir, sst_files, tmp_path, init=init, init_options={"n_batches": 2}))
    run.build()
    adapters = [a for _, layer in run.model.named_modules() if hasattr(layer, "adapters")
                for a in layer.adapters.values()]
    assert all(a.offset_A is not None for a in adapters)  # the base weight moved, as these methods do
    assert run.train()["steps"] == 2


def test_lora_plus_groups(cls_model_dir, sst_files, tmp_path):
    run = Run(base(cls_model_dir, sst_files, tmp_path, lr_ratio=16, lr=1e-3))
    run.build()
    lrs = {g["name"]: g["lr"] for g in run.optimizer.param_groups}
    assert lrs["lora_B"] == pytest.approx(16e-3) and lrs["lora_A"] == pytest.approx(1e-3)


def test_tensorboard_gets_the_logged_numbers(cls_model_dir, sst_files, tmp_path, monkeypatch):
    calls = []

    class Writer:
        def add_scalar(self, tag, value, step):
            calls.append((tag, step))

        def close(self):
            pass

    monkeypatch.setattr("rankwise.train.logger._tensorboard_writer", lambda path: Writer())
    train(base(cls_model_dir, sst_files, tmp_path, tensorboard=True, eval_file=str(sst_files[1]), log_every=1))
    assert ("train/loss", 1) in calls and ("train/trainable_params", 2) in calls and ("eval/accuracy", 2) in calls
