"""AdaLoRA (rankwise/allocate/adalora.py): budget schedule, allocation, pruning, export, processes, resume."""

import pytest
import torch
from allocate.checks import (
    SETUPS,
    build,
    distributed_results,
    export_max_diff,
    minilm_run,
    one_thread,
    resume_matches,
    trained_run,
)
from allocate.synthetic import important_share

from rankwise.allocate import cubic_schedule
from rankwise.allocate.adalora import AdaLoraConfig, orthogonality_loss

BUDGET, STEPS, CONFIG = SETUPS["adalora"]  # r_init = 8: 2048 -> 1024 parameters; t_i 15, t_f 30, deltaT 10


@pytest.fixture(autouse=True)
def _single_thread():
    with one_thread():
        yield


@pytest.fixture(scope="module")
def trained():
    return trained_run("adalora")


def test_budget_follows_the_cubic_schedule_and_ends_within_budget(trained):
    run, _ = trained
    alloc = run.alloc
    assert run.params[0] == 2048 and alloc.budget_params == 1024
    prune_steps = [t for t in range(1, STEPS + 1) if t > 15 and ((t - 15) % 10 == 0 or t >= STEPS - 30)]
    for t in prune_steps:
        b_t = int(cubic_schedule(t, STEPS, 2048, 1024, 15, 30))
        assert run.params[t] <= b_t, (t, run.params[t], b_t)
    assert all(run.params[t] <= 1024 for t in range(STEPS - 30, STEPS + 1))
    assert all(run.params[t] <= run.params[t - 1] for t in range(1, STEPS + 1)), "ranks only shrink"
    assert run.params[15] == 2048, "nothing is pruned during the warm-up"


def test_ranks_end_unequal_and_favour_the_important_modules(trained):
    run, _ = trained
    ranks = run.alloc.ranks
    assert len(set(ranks.values())) > 1, ranks
    assert important_share(ranks) > 0.6, ranks


def test_pruning_is_physical_and_keeps_adam_state_of_survivors(trained):
    run, resizes = trained
    prunes = [r for r in resizes if r["kept"] < r["old"]]
    assert prunes and all(set(r["attrs"]) == {"lora_A", "lora_B", "rank_vector"} for r in prunes), resizes
    for a in run.alloc.modules.values():
        assert a.lora_A.shape == (a.r, 32) and a.lora_B.shape == (32, a.r) and a.rank_vector.shape == (a.r,)
    assert [(h["module"], h["old_rank"], h["new_rank"]) for h in run.alloc.history] == \
        [(r["module"], r["old"], r["kept"]) for r in prunes]


def test_export_loads_in_peft_with_the_same_outputs(trained, tmp_path):
    run, _ = trained
    assert export_max_diff(run, tmp_path / "adapter") <= 1e-5


def test_pruning_zeroed_lowest_triplets_keeps_outputs():
    run = build("adalora", BUDGET, STEPS, CONFIG)
    run.train(1, 12)  # warm-up: no pruning yet, scores accumulated
    alloc = run.alloc
    a = alloc.modules["blocks.1"]
    with torch.no_grad():
        a.rank_vector[[2, 5]] = 0.0  # these triplets contribute nothing ...
    for key in ("blocks.1.e", "blocks.1.A", "blocks.1.B"):  # ... and score lowest
        dim = 1 if key.endswith("B") else 0
        alloc.ema.ibar[key].index_fill_(dim, torch.tensor([2, 5]), 0.0)
    kept_rows = alloc.ema.ibar["blocks.1.A"][[0, 1, 3, 4, 6, 7]].clone()
    before = run.outputs()
    alloc.prune_to(alloc.current_params() - 2 * 64, step=12)
    assert alloc.ranks == {"blocks.0": 8, "blocks.1": 6, "blocks.2": 8, "blocks.3": 8}
    assert torch.allclose(run.outputs(), before, atol=1e-6, rtol=0)
    assert torch.equal(alloc.ema.ibar["blocks.1.A"], kept_rows), "scores follow their triplets"


def test_orthogonality_term_is_zero_for_orthonormal_factors_and_positive_otherwise():
    run = build("adalora", BUDGET, STEPS, CONFIG)
    adapters = list(run.alloc.modules.values())
    assert orthogonality_loss(adapters).item() > 1.0  # N(0, 0.02) factors are far from orthonormal
    with torch.no_grad():
        for a in adapters:
            q = torch.linalg.qr(torch.randn(32, a.r))[0]  # (32, r) orthonormal columns
            a.lora_B.copy_(q)
            a.lora_A.copy_(q.t())
    assert orthogonality_loss(adapters).item() < 1e-5
    assert run.alloc.loss_term().item() == pytest.approx(0.1 * orthogonality_loss(adapters).item())


def test_default_scale_is_the_injected_alpha_over_r_and_low_scale_warns():
    run = build("adalora", BUDGET, STEPS, CONFIG)
    assert {a.scale for a in run.alloc.modules.values()} == {2.0}  # alpha = 2 r
    with pytest.warns(UserWarning, match="scale"):
        build("adalora", BUDGET, STEPS, {**CONFIG, "scale": 0.125})
    with pytest.raises(ValueError, match="gamma"):
        AdaLoraConfig(gamma=-1)


def test_two_processes_with_different_shards_make_identical_decisions():
    out = distributed_results("adalora")
    assert out[0]["history"] and out[0]["history"] == out[1]["history"]
    assert out[0]["ranks"] == out[1]["ranks"]
    assert out[0]["checksum"] != out[1]["checksum"], "the shards must differ, or the test proves nothing"


def test_resume_from_state_dicts_is_exact():
    same, straight, saved = resume_matches("adalora", k=40)
    assert same
    assert saved["history"] and saved["ema"]["ibar"], "the snapshot must hold rank changes and statistics"
    assert any(h["step"] > 40 for h in straight.alloc.history), "the continuation must also prune"


@pytest.mark.slow
def test_minilm_sst2_budget_held_and_ranks_change():
    out = minilm_run("adalora", {"warmup_steps": 4, "final_steps": 8, "interval": 3}, r=6)
    assert out["params"][0] > out["budget_params"] >= out["final_params"]
    assert all(p <= out["budget_params"] for s, p in out["params"].items() if s >= 30 - 8)
    assert out["ranks"] != out["start_ranks"] and len(set(out["ranks"].values())) > 1
