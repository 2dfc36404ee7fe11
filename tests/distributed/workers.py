"""Scenarios run both in one process and in 2 gloo processes (tests/allocate/dist_utils.run_distributed).

Each `run_*` function takes (rank, world, ...) and returns plain tensors / lists, so the test can compare a
2-process run with the single-process run on the same global batches. Module-level so spawn can import them.
"""

from __future__ import annotations

import gc
import weakref

import torch
import torch.distributed as dist

import rankwise
from rankwise.allocate import Allocator, Budget, all_reduce_mean, make_allocator, select_components
from rankwise.distributed import (
    ParallelConfig,
    ParallelModel,
    barrier,
    current_env,
    enable_gradient_checkpointing,
    is_sharded,
    parallel_fit,
    shard_batch,
)
from rankwise.io.shapes import match_adapter_shapes


class ToyAllocator(Allocator):
    """A small adaptive allocator for these tests (not registered): it scores component j of each module by
    sum |A_j * dA_j| + |B_:j * dB_:j| (averaged over processes), drops the lowest quarter of the parameters
    at `prune_steps` and gives the best module 2 new components (random A rows) at `grow_steps`."""

    name = "toy"

    def __init__(self, model, budget, config=None, *, prune_steps=(3, 7), grow_steps=(5,), **kwargs) -> None:
        super().__init__(model, budget, config, **kwargs)
        self.prune_steps, self.grow_steps = tuple(prune_steps), tuple(grow_steps)
        self.scores = {n: torch.zeros(a.r) for n, a in self.modules.items()}

    def on_backward(self, step: int) -> None:
        for n, a in self.modules.items():
            if a.r == 0 or a.lora_A.grad is None:
                continue
            s = (a.lora_A * a.lora_A.grad).abs().sum(1) + (a.lora_B * a.lora_B.grad).abs().sum(0)  # (r,)
            self.scores[n] = self.scores[n] + all_reduce_mean(s.detach()).cpu()

    def on_step(self, step: int) -> None:
        if step in self.prune_steps:
            keep = select_components(self.scores, self.costs, int(self.current_params() * 0.75))
            self.apply_keep(keep, step)
            self.scores = {n: self.scores[n][keep[n]] for n in self.scores}
        if step in self.grow_steps:
            best = max(self.scores, key=lambda n: float(self.scores[n].mean()) if self.scores[n].numel() else 0.0)
            self.resize_module(best, None, 2, step=step)
            self.scores[best] = torch.cat([self.scores[best], torch.zeros(2)])

    def state_dict(self):
        return {**super().state_dict(), "scores": {n: s.clone() for n, s in self.scores.items()}}

    def load_state_dict(self, state) -> None:
        super().load_state_dict(state)
        self.scores = {n: s.clone() for n, s in state["scores"].items()}


def adapter_tensors(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().float().cpu().clone() for n, p in model.named_parameters() if p.requires_grad}


# Short schedules so that registered allocators decide (and resize) within a 12-step run; allocators not
# named here run with their defaults.
SHORT_SCHEDULES = {
    "adalora": {"warmup_steps": 2, "final_steps": 2, "interval": 2},
    "sora": {"check_every": 2, "warmup_steps": 2, "final_steps": 2},
    "alora": {"warmup_steps": 2, "interval": 2, "n_rounds": 3},
    "increlora": {"warmup_steps": 2, "interval": 2},
}


def _allocator(kind: str, model, total_steps: int, seed: int = 0):
    if kind == "toy":
        return ToyAllocator(model, Budget(avg_rank=8), total_steps=total_steps, seed=seed)
    return make_allocator(kind, model, Budget(avg_rank=4), SHORT_SCHEDULES.get(kind), total_steps=total_steps,
                          seed=seed)


def run_mlp(rank: int, world: int, kind: str, accumulation: int = 1, steps: int = 8, save_dir: str | None = None,
            save_at: int = 0) -> dict:
    """The synthetic ResMLP task (tests/allocate/synthetic.py) with allocator `kind`; global batch 64."""
    from allocate.synthetic import make_task

    model, batches, loss_fn = make_task(seed=0, depth=4, r=8, n_batches=4, batch=64)
    mine = [shard_batch(b, rank, world) for b in batches]  # data-driven hooks see this process's rows
    alloc = _allocator(kind, model, steps)
    alloc.prepare(lambda: iter(mine), loss_fn)
    alloc.set_eval_batch(mine[-1], loss_fn)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    alloc.attach(opt)
    if rank == 1:
        torch.manual_seed(1234)  # different random state: new components must still come out identical
    pm = ParallelModel(model, ParallelConfig(strategy="ddp"), allocator=alloc)
    first = weakref.ref(pm._ddp) if pm._ddp is not None else None
    stop = save_at or steps  # toy's finalize is a no-op, so stopping early for a checkpoint changes nothing
    losses = parallel_fit(pm, batches, stop, opt, allocator=alloc, loss_fn=loss_fn, accumulation_steps=accumulation)
    pm.assert_in_sync()
    if save_dir is not None and rank == 0:
        rankwise.save_adapter(model, f"{save_dir}/adapter", history=alloc.history)
        torch.save({"model": adapter_tensors(model), "optimizer": opt.state_dict(), "allocator": alloc.state_dict(),
                    "step": stop}, f"{save_dir}/state.pt")
    barrier()
    gc.collect()
    return {"adapters": adapter_tensors(model), "losses": losses, "history": alloc.history, "ranks": alloc.ranks,
            "rewraps": pm.rewraps, "first_ddp_freed": first is None or first() is None or pm.rewraps == 1}


def resume_mlp(save_dir: str, steps: int = 8) -> dict:
    """Single process: rebuild the task, load the 2-process checkpoint, train to `steps`."""
    from allocate.synthetic import make_task

    model, batches, loss_fn = make_task(seed=0, depth=4, r=8, n_batches=4, batch=64)
    state = torch.load(f"{save_dir}/state.pt", weights_only=False)
    alloc = ToyAllocator(model, Budget(avg_rank=8), total_steps=steps)
    match_adapter_shapes(model, state["model"])
    missing = set(state["model"]) - set(dict(model.named_parameters()))
    assert not missing, missing
    model.load_state_dict(state["model"], strict=False)
    alloc.refresh_modules()
    alloc.load_state_dict(state["allocator"])
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    opt.load_state_dict(state["optimizer"])
    alloc.attach(opt)
    pm = ParallelModel(model, ParallelConfig(strategy="ddp"), allocator=alloc)
    losses = parallel_fit(pm, batches, steps, opt, allocator=alloc, loss_fn=loss_fn, start_step=state["step"] + 1)
    return {"adapters": adapter_tensors(model), "losses": losses, "ranks": alloc.ranks}


def run_llama(rank: int, world: int, strategy: str, steps: int = 6, accumulation: int = 2) -> dict:
    """Tiny Llama, all-linear adapters, gradient checkpointing, the toy allocator resizing during training."""
    from tiny_models import tiny_llama

    model = tiny_llama(seed=0, layers=2)
    model.train()
    rankwise.inject(model, rankwise.LoraConfig(r=4, alpha=8, target_modules="all-linear"))
    enable_gradient_checkpointing(model, distributed=world > 1)
    g = torch.Generator().manual_seed(5)
    batches = []
    for _ in range(3):
        ids = torch.randint(0, 96, (8, 12), generator=g)
        batches.append({"input_ids": ids, "labels": ids})
    alloc = ToyAllocator(model, Budget(avg_rank=4), total_steps=steps, prune_steps=(2,), grow_steps=(4,))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-3)
    alloc.attach(opt)
    pm = ParallelModel(model, ParallelConfig(strategy=strategy), allocator=alloc)
    losses = parallel_fit(pm, batches, steps, opt, allocator=alloc, accumulation_steps=accumulation, grad_clip=1.0)
    pm.assert_in_sync()
    sharded = is_sharded(model)
    if world > 1 and rank == 0:
        env = current_env()
        assert env.world_size == world and dist.get_world_size() == world
    return {"adapters": adapter_tensors(model), "losses": losses, "history": alloc.history,
            "rewraps": pm.rewraps, "sharded": sharded, "ranks": alloc.ranks}


def run_core(rank: int, world: int, save_dir: str) -> dict:
    """Everything the core tests need from one 2-process launch (spawning costs seconds)."""
    return {
        "fixed": run_mlp(rank, world, "fixed"),
        "fixed_accum": run_mlp(rank, world, "fixed", accumulation=2),
        "toy": run_mlp(rank, world, "toy"),
        "toy_accum": run_mlp(rank, world, "toy", accumulation=2),
        "saved": run_mlp(rank, world, "toy", save_dir=save_dir, save_at=6),
        "llama_ddp": run_llama(rank, world, "ddp"),
        "llama_fsdp": run_llama(rank, world, "fsdp"),
        "diverged": run_diverging(rank, world),
    }


def run_registered(rank: int, world: int, kinds: list[str]) -> dict:
    return {kind: run_mlp(rank, world, kind, steps=12) for kind in kinds}


def run_diverging(rank: int, world: int) -> str:
    """Process 1 resizes an adapter that process 0 does not touch: the next forward must raise, on both."""
    from allocate.synthetic import make_task

    model, batches, loss_fn = make_task(seed=0, depth=4, r=4, n_batches=1, batch=8)
    pm = ParallelModel(model, ParallelConfig(strategy="ddp"))
    if rank == 1:
        next(iter(rankwise.adapter_modules(model)))[2].resize([0, 1])
    try:
        loss_fn(pm, batches[0])
    except RuntimeError as err:
        return str(err)
    return ""
