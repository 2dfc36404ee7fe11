"""Two gloo processes against one process with the same global batch (rankwise.distributed.parallel / step).

Each process gets half of every global batch; with DDP averaging gradients the run must follow the
single-process run up to float error, also when an allocator resizes adapters (DDP is rebuilt), with
gradient accumulation, with FSDP2 sharding the frozen base and with gradient checkpointing. Spawning is
slow, so one launch runs all core scenarios (workers.run_core) and a second one the registered allocators.
"""

from __future__ import annotations

import functools

import pytest
import torch
from allocate.dist_utils import run_distributed
from allocate.synthetic import make_task
from distributed.workers import resume_mlp, run_core, run_llama, run_mlp, run_registered

import rankwise
from rankwise.allocate import available_allocators, get_allocator_class
from rankwise.allocate.base import Allocator

ATOL = 1e-5


@functools.cache
def _one_mlp(kind: str, steps: int = 8) -> dict:
    """The one-process reference run (computed once per kind: several tests compare with it)."""
    return run_mlp(0, 1, kind, steps=steps)


@functools.cache
def _one_llama() -> dict:
    return run_llama(0, 1, "ddp")


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys(), sorted(set(a) ^ set(b))
    for k, v in a.items():
        assert v.shape == b[k].shape, (k, v.shape, b[k].shape)
    diffs = [(v - b[k]).abs().max().item() for k, v in a.items() if v.numel()]
    return max(diffs)


def _adaptive_allocators() -> list[str]:
    """Registered allocators that act during training (not only in a data-driven `prepare`)."""
    hooks = ("on_backward", "on_step", "loss_term")
    out = []
    for name in available_allocators():
        cls = get_allocator_class(name)
        if name != "fixed" and any(getattr(cls, h) is not getattr(Allocator, h) for h in hooks):
            out.append(name)
    return out


ADAPTIVE = _adaptive_allocators()

# Allocators whose scores are computed from each process's own (shard) statistics and then averaged, so
# they equal the one-process scores only approximately; their decisions and adapters must still match.
LOCAL_SCORES = {
    "increlora": "scores |dW * dL/dW| with dL/dW from each process's own activations (the full-weight "
                 "gradient is not all-reduced), then averages the scores",
}


def _decisions(history: list[dict]) -> list[tuple]:
    return [(h["step"], h["module"], h["old_rank"], h["new_rank"]) for h in history]


def _scores_close(a: list[dict], b: list[dict], rel: float = 1e-4) -> bool:
    return all((x["score"] is None) == (y["score"] is None) and
               (x["score"] is None or abs(x["score"] - y["score"]) <= rel * max(abs(y["score"]), 1e-12))
               for x, y in zip(a, b))


@pytest.fixture(scope="module")
def core(tmp_path_factory):
    save_dir = tmp_path_factory.mktemp("dist_ckpt")
    two = run_distributed(run_core, 2, (str(save_dir),), timeout_s=120)
    return two, save_dir


@pytest.fixture(scope="module")
def registered():
    if not ADAPTIVE:
        pytest.skip("no adaptive allocator is registered yet (rankwise.allocate.available_allocators())")
    return run_distributed(run_registered, 2, (ADAPTIVE,), timeout_s=120)


@pytest.mark.parametrize("scenario,kind,accumulation", [("fixed", "fixed", 1), ("fixed_accum", "fixed", 2)])
def test_ddp_fixed_rank_matches_one_process(core, scenario, kind, accumulation):
    two, _ = core
    one = _one_mlp(kind)
    r0, r1 = two[0][scenario], two[1][scenario]
    assert _max_diff(r0["adapters"], r1["adapters"]) == 0.0  # DDP keeps exact replicas
    assert _max_diff(r0["adapters"], one["adapters"]) < ATOL
    assert r0["losses"] == pytest.approx(one["losses"], rel=1e-5)
    assert r0["rewraps"] == 1


@pytest.mark.parametrize("scenario,accumulation", [("toy", 1), ("toy_accum", 2)])
def test_ddp_rebuilt_after_resizes_matches_one_process(core, scenario, accumulation):
    two, _ = core
    one = _one_mlp("toy")
    r0, r1 = two[0][scenario], two[1][scenario]
    resize_steps = {h["step"] for h in one["history"]}
    assert resize_steps == {3, 5, 7}, one["history"]
    assert r0["history"] == r1["history"] == one["history"]
    assert r0["ranks"] == one["ranks"] != {n: 8 for n in one["ranks"]}
    # Process 1 drew the grown components from another random state: the rebuild's broadcast fixed that.
    assert _max_diff(r0["adapters"], r1["adapters"]) == 0.0
    assert _max_diff(r0["adapters"], one["adapters"]) < ATOL
    assert r0["rewraps"] == 1 + len(resize_steps)
    assert r0["first_ddp_freed"], "the replaced DDP wrapper (and its buckets) must be garbage-collected"


def test_registered_allocators_decide_identically_and_match_one_process(registered):
    failures = []
    for kind in ADAPTIVE:
        one = _one_mlp(kind, steps=12)
        r0, r1 = registered[0][kind], registered[1][kind]
        if r0["history"] != r1["history"]:
            failures.append(f"{kind}: the two processes decided differently: {r0['history']} vs {r1['history']}")
        elif _decisions(r0["history"]) != _decisions(one["history"]):
            failures.append(f"{kind}: decisions differ from one process: {_decisions(r0['history'])} vs "
                            f"{_decisions(one['history'])}")
        elif kind not in LOCAL_SCORES and not _scores_close(r0["history"], one["history"]):
            failures.append(f"{kind}: decision scores differ from one process: {r0['history']} vs {one['history']}")
        elif _max_diff(r0["adapters"], r1["adapters"]) != 0.0:
            failures.append(f"{kind}: the two processes' adapters differ")
        elif (d := _max_diff(r0["adapters"], one["adapters"])) >= ATOL:
            failures.append(f"{kind}: 2-process adapters differ from one process by {d:.3g}")
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_llama_with_checkpointing_accumulation_and_resizes_matches_one_process(core, strategy):
    two, _ = core
    one = _one_llama()
    r0, r1 = two[0][f"llama_{strategy}"], two[1][f"llama_{strategy}"]
    assert r0["sharded"] == (strategy == "fsdp")
    assert any(r == 0 for r in one["ranks"].values()), "a module pruned to rank 0 must be handled by DDP"
    assert r0["history"] == r1["history"] == one["history"] and r0["rewraps"] == 3
    assert _max_diff(r0["adapters"], r1["adapters"]) == 0.0
    assert _max_diff(r0["adapters"], one["adapters"]) < ATOL
    assert r0["losses"] == pytest.approx(one["losses"], rel=1e-5)


def test_checkpoint_saved_by_process_0_resumes_in_one_process(core):
    two, save_dir = core
    at_save = two[0]["saved"]
    # The PEFT adapter written by process 0 holds the 2-process weights at step 6.
    model, _, _ = make_task(seed=0, depth=4, r=8, n_batches=1)
    rankwise.delete_adapter(model, "default")
    rankwise.load_adapter(model, save_dir / "adapter")
    assert rankwise.rank_map(model) == at_save["ranks"]
    for name, _, adapter in rankwise.adapter_modules(model):
        a = at_save["adapters"][f"{name}.adapters.default.lora_A"]
        assert torch.allclose(adapter.lora_A, a)
    # One process continues from step 7 and ends where an uninterrupted one-process run ends.
    resumed = resume_mlp(str(save_dir), steps=8)
    straight = _one_mlp("toy")
    assert resumed["ranks"] == straight["ranks"]
    assert _max_diff(resumed["adapters"], straight["adapters"]) < ATOL
    assert resumed["losses"] == pytest.approx(straight["losses"][6:], rel=1e-5)


def test_processes_that_resize_differently_fail_with_an_explanation(core):
    two, _ = core
    for rank in (0, 1):
        assert "different decisions on different processes" in two[rank]["diverged"]
