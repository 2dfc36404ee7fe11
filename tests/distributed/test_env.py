"""Single-process behaviour of rankwise.distributed: launcher variables, batch sharding, config validation,
the pass-through ParallelModel and gradient checkpointing (no process group needed)."""

from __future__ import annotations

import pytest
import torch
from allocate.synthetic import make_task
from tiny_models import randomize_adapters, tiny_llama
from torch import nn

import rankwise
from rankwise.distributed import (
    ParallelConfig,
    ParallelModel,
    enable_gradient_checkpointing,
    init_distributed,
    parallel_fit,
    shard_batch,
    split_micro_batches,
)


def test_shard_batch_takes_contiguous_equal_rows_of_every_tensor():
    batch = {"x": torch.arange(12).reshape(6, 2), "y": torch.arange(6), "meta": "kept", "pair": (torch.arange(6),)}
    parts = [shard_batch(batch, r, 3) for r in range(3)]
    assert [p["y"].tolist() for p in parts] == [[0, 1], [2, 3], [4, 5]]
    assert torch.equal(torch.cat([p["x"] for p in parts]), batch["x"])
    assert parts[1]["meta"] == "kept" and parts[2]["pair"][0].tolist() == [4, 5]
    assert shard_batch(batch, 0, 1) is batch


def test_uneven_batches_are_refused_with_the_fix():
    with pytest.raises(ValueError, match=r"5 rows cannot be split evenly into 2 processes.*multiple of 2"):
        shard_batch(torch.zeros(5, 3), 0, 2)
    with pytest.raises(ValueError, match="micro-batches"):
        split_micro_batches({"x": torch.zeros(6, 1)}, 4)
    assert [m["x"].shape[0] for m in split_micro_batches({"x": torch.zeros(6, 1)}, 3)] == [2, 2, 2]


def test_parallel_config_validates_and_resolves_auto(monkeypatch):
    with pytest.raises(ValueError, match=r"strategy='zero3'.*allowed: \['auto', 'ddp', 'fsdp'\]"):
        ParallelConfig(strategy="zero3")
    with pytest.raises(ValueError, match="fsdp_param_dtype='int8'"):
        ParallelConfig(fsdp_param_dtype="int8")
    with pytest.raises(ValueError, match="bucket_cap_mb"):
        ParallelConfig(bucket_cap_mb=0)
    monkeypatch.delenv("ACCELERATE_USE_FSDP", raising=False)
    assert ParallelConfig().resolved_strategy() == "ddp"
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")  # what `accelerate launch --use_fsdp` sets
    assert ParallelConfig().resolved_strategy() == "fsdp"
    assert ParallelConfig(strategy="ddp").resolved_strategy() == "ddp"


def test_init_distributed_without_a_launcher_is_one_process(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    env = init_distributed()
    assert (env.rank, env.world_size, env.is_main, env.distributed) == (0, 1, True, False)
    monkeypatch.setenv("WORLD_SIZE", "2")
    for var in ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(RuntimeError, match=r"torchrun --nproc-per-node N"):
        init_distributed()


def test_one_process_parallel_model_is_the_plain_loop():
    """World size 1: no DDP, and parallel_fit equals rankwise.train.loop.fit step for step."""
    from rankwise.train.loop import fit

    model, batches, loss_fn = make_task(seed=0, depth=4, r=4, n_batches=2, batch=16)
    ref, _, _ = make_task(seed=0, depth=4, r=4, n_batches=2, batch=16)
    pm = ParallelModel(model)
    assert pm.strategy == "none" and pm.rewraps == 0 and pm._ddp is None
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ref_opt = torch.optim.Adam([p for p in ref.parameters() if p.requires_grad], lr=1e-2)
    got = parallel_fit(pm, batches, 4, opt, loss_fn=loss_fn)
    want = fit(ref, batches, 4, ref_opt, loss_fn=loss_fn)
    assert got == pytest.approx(want, rel=1e-6)
    for (n, p), (_, q) in zip(model.named_parameters(), ref.named_parameters()):
        assert torch.allclose(p, q, atol=1e-6), n


def test_accumulation_equals_the_whole_batch_in_one_process():
    model, batches, loss_fn = make_task(seed=0, depth=4, r=4, n_batches=2, batch=16)
    ref, _, _ = make_task(seed=0, depth=4, r=4, n_batches=2, batch=16)
    runs = []
    for m, acc in ((model, 4), (ref, 1)):
        opt = torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=1e-3)
        runs.append(parallel_fit(ParallelModel(m), batches, 3, opt, loss_fn=loss_fn, accumulation_steps=acc))
    assert runs[0] == pytest.approx(runs[1], rel=1e-5)
    for (n, p), (_, q) in zip(model.named_parameters(), ref.named_parameters()):
        assert torch.allclose(p, q, atol=1e-6), n
    with pytest.raises(ValueError, match="accumulation_steps=0"):
        parallel_fit(ParallelModel(model), batches, 1, opt, loss_fn=loss_fn, accumulation_steps=0)


def test_gradient_checkpointing_keeps_adapter_gradients():
    """Non-reentrant checkpointing with frozen embeddings still gives every adapter its exact gradient."""
    grads = []
    for checkpointing in (False, True):
        model = tiny_llama(seed=0, layers=2)
        model.train()
        rankwise.inject(model, rankwise.LoraConfig(r=2, target_modules=["q_proj", "down_proj"]))
        randomize_adapters(model)  # B != 0, so that A gets a gradient too
        if checkpointing:
            enable_gradient_checkpointing(model)
        ids = torch.randint(0, 96, (2, 8), generator=torch.Generator().manual_seed(0))
        model(input_ids=ids, labels=ids).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) == 8
    for n in grads[0]:
        assert grads[0][n].abs().sum() > 0, n
        assert torch.allclose(grads[0][n], grads[1][n], atol=1e-6), n


def test_gradient_checkpointing_errors_name_the_fix():
    with pytest.raises(ValueError, match="use_reentrant=False"):
        enable_gradient_checkpointing(tiny_llama(), use_reentrant=True, distributed=True)
    with pytest.raises(TypeError, match=r"Sequential has no activation_checkpointing_enable"):
        enable_gradient_checkpointing(nn.Sequential(nn.Linear(2, 2)))


def test_uneven_split_differs_by_one_row_and_tiny_batches_go_whole():
    batch = {"y": torch.arange(7)}
    parts = [shard_batch(batch, r, 3, uneven=True)["y"].tolist() for r in range(3)]
    assert parts == [[0, 1, 2], [3, 4], [5, 6]]
    assert shard_batch({"y": torch.arange(2)}, 2, 3, uneven=True)["y"].tolist() == [0, 1]


def test_bridge_device_returns_outputs_where_inputs_came_from_and_removes_its_hooks():
    """On a CPU-only machine the target device is the CPU too; what is checked is that outputs keep their
    class (transformers' ModelOutput) and that the hooks go away."""
    from rankwise.distributed import bridge_device, inputs_on_device, mean_over_processes

    model = tiny_llama()
    ids = torch.randint(0, 96, (2, 5))
    want = model(input_ids=ids).logits
    remove = bridge_device(model)
    out = model(input_ids=ids)
    assert type(out).__name__ == "CausalLMOutputWithPast" and torch.equal(out.logits, want)
    remove()
    assert not model._forward_pre_hooks and not model._forward_hooks
    with inputs_on_device(model, torch.device("cpu")):
        assert len(model._forward_pre_hooks) == 1
    assert not model._forward_pre_hooks
    assert mean_over_processes(2.5) == 2.5
