"""Decisions of DyLoRA, GoRA, EVA, Sensitivity, LoRA-GA and CorDA in 2 gloo processes with different data.

One spawn runs every method (spawning costs seconds), and `distributed_results()` caches what each process
returned, so test_dylora / test_gora / test_eva / test_sensitivity / test_lora_ga / test_corda share it.
Each process starts from the same model and sees a different half of the batches; gradients of the training
steps are NOT synchronised (no DDP), so only the statistics the methods reduce make the decisions agree.
"""

from __future__ import annotations

import functools

import torch
from allocate.branches import make_branches
from allocate.dist_utils import run_distributed
from allocate.synthetic import make_task


def _tensors(model) -> dict[str, torch.Tensor]:
    import rankwise

    return {f"{n}.{k}": getattr(a, k).detach().clone()
            for n, _, a in rankwise.adapter_modules(model) for k in ("lora_A", "lora_B")}


def decisions(rank: int, world: int) -> dict:
    import rankwise
    from rankwise.allocate import Budget, make_allocator
    from rankwise.init import corda, lora_ga

    out: dict = {}
    model, batches, lf = make_task(seed=0, n_batches=8, batch=32)
    mine = batches[rank::world]
    out["data"] = torch.cat([b["x"] for b in mine])

    alloc = make_allocator("dylora", model, Budget(avg_rank=4), {"select": "greedy_loss", "update": "all"}, seed=3)
    alloc.set_eval_batch(mine[-1], lf)
    alloc.attach(None)
    for step in range(1, 21):  # plain SGD by hand: importing torch.optim costs seconds in a fresh process
        lf(model, mine[step % 3]).backward()
        alloc.on_backward(step)
        with torch.no_grad():
            for p in model.parameters():
                if p.grad is not None:
                    p.sub_(0.02 * p.grad)
                    p.grad = None
        alloc.on_step(step)
    alloc.finalize()
    out["dylora"] = {"ranks": alloc.ranks, "sampled": list(alloc.sampled), "path": alloc.path}

    for name in ("gora", "sensitivity"):
        model, batches, lf = make_branches(seed=0, n_batches=8, batch=32)
        alloc = make_allocator(name, model, Budget(avg_rank=4), {"n_batches": 4})
        alloc.prepare(batches[rank::world], lf)
        out[name] = {"ranks": alloc.ranks, "tensors": _tensors(model)}

    model, batches, lf = make_task(seed=0, n_batches=8, batch=32)
    alloc = make_allocator("eva", model, Budget(avg_rank=4), {"tau": 0.9})
    alloc.prepare(batches[rank::world], lf)
    out["eva"] = {"ranks": alloc.ranks, "tensors": _tensors(model), "batches": alloc.batches_used}

    model, batches, lf = make_task(seed=0, r=4, n_batches=8, batch=32)
    lora_ga.apply(model, batches[rank::world], lf)
    out["lora_ga"] = {"tensors": _tensors(model)}

    model, batches, _ = make_task(seed=0, r=4, n_batches=8, batch=32)
    corda.apply(model, batches[rank::world], forward_fn=lambda m, b: m(b["x"]))
    weights = {n: layer.weight_out_in().detach().clone() for n, layer in rankwise.lora_layers(model)}
    out["corda"] = {"tensors": _tensors(model), "weights": weights}
    return out


@functools.lru_cache(maxsize=1)
def distributed_results() -> tuple[dict, dict]:
    first, second = run_distributed(decisions, world=2)
    assert not torch.equal(first["data"], second["data"]), "the processes must see different data"
    return first, second


def assert_same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), f"{key} differs between processes"
