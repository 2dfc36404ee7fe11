"""`rankwise train` with grad_accum, gradient_checkpointing and precision (rankwise/train/config.py, runner.py):
accumulation trains the adapter of the larger batch, with one allocator step per optimizer step and exact
resume; checkpointing changes nothing but memory; bf16 trains on CPU and saves an fp32 adapter PEFT loads;
bad values are errors that name the fix. (2 processes x accumulation: tests/distributed/test_runner.py.)"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from rankwise.train.config import TrainConfig
from rankwise.train.runner import Hooks, Run, train

STEPS = 6


def config(model: Path, files, out: Path, **over) -> TrainConfig:
    train_file, dev_file = files
    return TrainConfig(**{
        "model": str(model), "train_file": str(train_file), "eval_file": str(dev_file), "output_dir": str(out),
        "method": "fixed", "budget": "r2", "steps": STEPS, "batch_size": 8, "max_length": 16,
        "max_train_samples": 48, "max_eval_samples": 16, "lr": 5e-3, "threads": 1, "log_every": 1,
        "progress": False, "plot": False, "tensorboard": False, **over,
    })


def adapter(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "adapter" / "adapter_model.safetensors"))


def history(out: Path) -> list[tuple[int, str, int]]:
    lines = (out / "adapter" / "rank_history.jsonl").read_text().splitlines()
    return [(h["step"], h["module"], h["new_rank"]) for h in map(json.loads, lines)]


def train_losses(out: Path) -> list[float]:
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    return [e["loss"] for e in log if e["type"] == "train"]


def assert_same_adapter(a: Path, b: Path, atol: float) -> None:
    ta, tb = adapter(a), adapter(b)
    assert ta.keys() == tb.keys()
    for key in ta:
        assert ta[key].shape == tb[key].shape, key
        assert torch.allclose(ta[key], tb[key], atol=atol), f"{key}: max diff {(ta[key] - tb[key]).abs().max():.3g}"


# ---- gradient accumulation -----------------------------------------------------------------------------------
ADALORA = {"interval": 1, "warmup_steps": 1, "final_steps": 1}


@pytest.mark.parametrize(("method", "options"), [("fixed", {}), ("adalora", ADALORA)])
def test_accumulating_two_micro_batches_trains_the_adapter_of_the_double_batch(
        method, options, no_dropout_model_dir, sst_files, tmp_path):
    """batch 4 x grad_accum 2 and batch 8 take the same 8 examples per step; AdaLoRA's scores (one on_backward
    per step, after the last micro-batch) see the same accumulated gradient, so it prunes the same triplets."""
    one, two = tmp_path / "b8", tmp_path / "b4x2"
    s1 = train(config(no_dropout_model_dir, sst_files, one, method=method, allocator_options=options))
    s2 = train(config(no_dropout_model_dir, sst_files, two, method=method, allocator_options=options,
                      batch_size=4, grad_accum=2))
    assert s1["effective_batch"] == s2["effective_batch"] == 8 and s2["steps"] == STEPS
    assert_same_adapter(one, two, atol=1e-5)
    assert history(one) == history(two)
    assert train_losses(one) == pytest.approx(train_losses(two), abs=1e-5)
    if method == "adalora":
        assert any(step > 0 for step, _, _ in history(one)), "AdaLoRA must prune in this run"


def test_the_allocator_sees_one_backward_and_one_step_per_optimizer_step(no_dropout_model_dir, sst_files, tmp_path):
    run = Run(config(no_dropout_model_dir, sst_files, tmp_path / "out", method="adalora", allocator_options=ADALORA,
                     batch_size=2, grad_accum=3))
    run.build()
    calls, forwards = [], []
    for hook in ("on_backward", "on_step"):
        original = getattr(run.allocator, hook)
        setattr(run.allocator, hook, lambda step, h=hook, f=original: (calls.append((h, step, len(forwards))), f(step)))
    run.model.register_forward_hook(lambda *args: forwards.append(1))
    run.train()
    # the training forwards of step t: 3 micro-batches, all before on_backward(t); evaluation adds none here
    assert calls == [(h, t, 3 * t) for t in range(1, STEPS + 1) for h in ("on_backward", "on_step")]
    assert run.step == STEPS and len(forwards) > 3 * STEPS  # + the final evaluation's


def test_resume_with_accumulation_is_exact_and_may_change_the_split(no_dropout_model_dir, sst_files, tmp_path):
    """A checkpoint counts optimizer steps: resuming a grad_accum=2 run reproduces it bit for bit; the same
    effective batch split another way resumes too; another effective batch is refused, naming the fix."""
    kw = {"method": "adalora", "allocator_options": ADALORA, "batch_size": 4, "grad_accum": 2, "save_every": 3}
    ref = tmp_path / "ref"
    train(config(no_dropout_model_dir, sst_files, ref, **kw))

    class Crash(RuntimeError):
        pass

    def crash(run, step, loss):
        if step == 4:
            raise Crash

    for name, resume_kw in (("same", {}), ("resplit", {"batch_size": 8, "grad_accum": 1})):
        out = tmp_path / name
        with pytest.raises(Crash):
            train(config(no_dropout_model_dir, sst_files, out, **kw), Hooks(after_step=[crash]))
        train(config(no_dropout_model_dir, sst_files, out, **{**kw, **resume_kw}, resume="latest"))
        assert history(out) == history(ref)
        if name == "same":
            assert all(torch.equal(adapter(ref)[k], v) for k, v in adapter(out).items())
        else:
            assert_same_adapter(ref, out, atol=1e-5)
    with pytest.raises(ValueError, match=r"effective batch .*8 -> 4 x 1 x 1 = 4.*stays 8"):
        train(config(no_dropout_model_dir, sst_files, tmp_path / "same", **{**kw, "grad_accum": 1}, resume="latest"))


# ---- gradient checkpointing ----------------------------------------------------------------------------------
def test_gradient_checkpointing_gives_the_same_training(cls_model_dir, sst_files, tmp_path):
    """With dropout on: non-reentrant checkpointing replays the saved RNG state, so the masks match too."""
    active = []
    hooks = Hooks(after_step=[lambda run, step, loss: active.append(run.model.is_gradient_checkpointing)])
    plain, ckpt = tmp_path / "plain", tmp_path / "ckpt"
    train(config(cls_model_dir, sst_files, plain, method="adalora", allocator_options=ADALORA))
    train(config(cls_model_dir, sst_files, ckpt, method="adalora", allocator_options=ADALORA,
                 gradient_checkpointing=True), hooks)
    assert active == [True] * STEPS
    assert_same_adapter(plain, ckpt, atol=1e-6)
    assert history(plain) == history(ckpt)
    assert train_losses(plain) == pytest.approx(train_losses(ckpt), abs=1e-6)


# ---- bf16 ------------------------------------------------------------------------------------------------------
def test_bf16_trains_on_cpu_and_saves_an_fp32_adapter_peft_loads(cls_model_dir, sst_files, tmp_path):
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForSequenceClassification

    import rankwise

    out, ref = tmp_path / "bf16", tmp_path / "fp32"
    # one batch of 8 rows seen again and again at a constant lr: the loss must fall
    kw = {"method": "adalora", "allocator_options": ADALORA, "steps": 12, "max_train_samples": 8, "lr": 1e-2,
          "scheduler": "constant", "warmup_ratio": 0.0}
    run = Run(config(cls_model_dir, sst_files, out, precision="bf16", **kw))
    run.build()
    layer = next(m for m in run.model.modules() if hasattr(m, "adapters"))
    dtypes = set()
    layer.register_forward_hook(lambda m, args, output: dtypes.add(output.dtype) if m.training else None)
    summary = run.train()
    assert dtypes == {torch.bfloat16}, "the training forward must run under bf16 autocast"
    assert all(p.dtype == torch.float32 for p in run.model.parameters() if p.requires_grad)
    assert summary["precision"] == "bf16"
    losses = train_losses(out)
    assert sum(losses[-4:]) / 4 < losses[0] - 0.05, losses
    train(config(cls_model_dir, sst_files, ref, **kw))
    assert losses == pytest.approx(train_losses(ref), abs=0.03)  # bf16 rounding, not another training

    assert {t.dtype for t in adapter(out).values()} == {torch.float32}
    ids = torch.randint(6, 30, (3, 9), generator=torch.Generator().manual_seed(0))
    ours = AutoModelForSequenceClassification.from_pretrained(cls_model_dir, num_labels=2).eval()
    rankwise.load_adapter(ours, out / "adapter")
    base = AutoModelForSequenceClassification.from_pretrained(cls_model_dir, num_labels=2)
    theirs = peft.PeftModel.from_pretrained(base, out / "adapter").eval()
    with torch.no_grad():
        assert torch.allclose(ours(input_ids=ids).logits, theirs(input_ids=ids).logits, atol=1e-5)


# ---- errors ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("key", "value", "message"), [
    ("grad_accum", 0, r"grad_accum=0: must be an integer >= 1 \(micro-batches per optimizer step"),
    ("grad_accum", "1.5", r"grad_accum='1.5': expected an integer"),
    ("precision", "fp16", r"precision='fp16': fp16 needs loss scaling.*Use bf16 .* or fp32"),
    ("precision", "bfloat", r"precision='bfloat': must be one of \['fp32', 'bf16'\]"),
    ("gradient_checkpointing", "sometimes", r"gradient_checkpointing='sometimes': expected true or false"),
])
def test_bad_values_name_the_value_and_the_fix(key, value, message, cls_model_dir, sst_files, tmp_path):
    with pytest.raises(ValueError, match=message):
        config(cls_model_dir, sst_files, tmp_path, **{key: value})


def test_flags_reach_the_config(cls_model_dir, sst_files):
    import argparse

    from rankwise.train.config import add_flags, flags_from_namespace

    parser = argparse.ArgumentParser()
    add_flags(parser)
    ns = parser.parse_args(["--model", str(cls_model_dir), "--train-file", str(sst_files[0]), "--grad-accum", "4",
                            "--precision", "bf16", "--gradient-checkpointing"])
    cfg = TrainConfig.from_sources(None, flags_from_namespace(ns))
    assert (cfg.grad_accum, cfg.precision, cfg.gradient_checkpointing) == (4, "bf16", True)


def test_device_is_validated_and_a_missing_gpu_named():
    from rankwise.train.runner import resolve_device

    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match="auto, cpu, cuda or cuda:N"):
        TrainConfig(model="m", train_file="t.tsv", device="gpu")
    if not torch.cuda.is_available():
        assert resolve_device("auto") == torch.device("cpu")
        with pytest.raises(ValueError, match="use device=cpu or auto"):
            resolve_device("cuda:0")
