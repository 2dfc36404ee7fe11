"""SoRA (rankwise/allocate/sora.py): proximal gates, zero-gate removal, hard budget, export, processes, resume."""

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

BUDGET, STEPS, CONFIG = SETUPS["sora"]  # r_max = 8: 2048 parameters, budget 1024; cap at step 150 - 30
CAP = STEPS - 30


@pytest.fixture(autouse=True)
def _single_thread():
    with one_thread():
        yield


@pytest.fixture(scope="module")
def trained():
    return trained_run("sora")


def test_budget_holds_from_the_cap_on_and_after_finalize(trained):
    run, _ = trained
    assert run.params[0] == 2048 and run.alloc.budget_params == 1024
    assert all(run.params[t] <= 1024 for t in range(CAP, STEPS + 1))
    assert all(run.params[t] <= run.params[t - 1] for t in range(1, STEPS + 1)), "ranks only shrink"
    drops = [t for t in range(1, CAP) if run.params[t] < run.params[t - 1]]
    cost = 64  # in + out of every module: the schedule is met to within one rank
    assert drops and all(0 <= int(cubic_schedule(t, STEPS, 2048, 1024, 15, 30)) - run.params[t] < cost
                         for t in drops if t > 15), "before the cap, ranks follow the schedule b(t)"
    assert run.alloc.current_params() <= 1024
    assert all(bool((a.rank_vector != 0).all()) for a in run.alloc.modules.values()), "finalize drops zero gates"


def test_zero_gates_appear_before_the_cap_and_ranks_favour_the_important_modules(trained):
    run, _ = trained
    assert any(h["step"] < CAP for h in run.alloc.history), "the raised xi must zero gates before the hard cap"
    ranks = run.alloc.ranks
    assert len(set(ranks.values())) > 1 and important_share(ranks) > 0.6, ranks


def test_removal_keeps_adam_state_of_surviving_components(trained):
    _run, resizes = trained
    prunes = [r for r in resizes if r["kept"] < r["old"]]
    assert prunes and all(set(r["attrs"]) == {"lora_A", "lora_B", "rank_vector"} for r in prunes), resizes


def test_export_folds_gates_and_loads_in_peft_with_the_same_outputs(trained, tmp_path):
    run, _ = trained
    assert any(a.r == 0 for a in run.alloc.modules.values()), "the export must cover a module dropped entirely"
    assert export_max_diff(run, tmp_path / "adapter") <= 1e-5


def test_proximal_step_soft_thresholds_by_xi_times_the_learning_rate_ratio():
    run = build("sora", BUDGET, STEPS, {"xi": 0.01})
    sched = torch.optim.lr_scheduler.LambdaLR(run.opt, lambda step: 0.5)  # lr_t / lr_0 = 0.5
    gate = run.alloc.modules["blocks.0"].rank_vector
    with torch.no_grad():
        gate.copy_(torch.tensor([0.5, -0.5, 0.004, -0.004, 0.005, 1.0, -1.0, 0.0]))
    run.alloc.proximal_step()  # tau = 0.01 * 0.5
    expected = torch.tensor([0.495, -0.495, 0.0, 0.0, 0.0, 0.995, -0.995, 0.0])
    assert torch.allclose(gate.detach(), expected, atol=1e-7)
    run.alloc.xi_mult = 4.0  # the budget schedule's multiplier
    run.alloc.proximal_step()
    assert torch.allclose(gate.detach(), expected.sign() * (expected.abs() - 0.02).clamp(min=0), atol=1e-7)
    del sched


def test_dropping_zero_gates_keeps_outputs_and_respects_the_floor():
    run = build("sora", BUDGET, STEPS, CONFIG)
    run.train(1, 5)
    alloc = run.alloc
    with torch.no_grad():
        alloc.modules["blocks.1"].rank_vector[[0, 3, 4]] = 0.0
        alloc.modules["blocks.3"].rank_vector[:] = 0.0
    before = run.outputs()
    alloc.drop_zero_gates(step=5, floor=2048 - 6 * 64)  # 11 zero gates, room to drop 6
    assert alloc.current_params() == 2048 - 6 * 64
    assert torch.allclose(run.outputs(), before, atol=1e-6, rtol=0)
    alloc.drop_zero_gates(step=5)
    assert alloc.ranks == {"blocks.0": 8, "blocks.1": 5, "blocks.2": 8, "blocks.3": 0}
    assert torch.allclose(run.outputs(), before, atol=1e-6, rtol=0)


def test_two_processes_with_different_shards_make_identical_decisions():
    out = distributed_results("sora")
    assert out[0]["history"] and out[0]["history"] == out[1]["history"]
    assert out[0]["ranks"] == out[1]["ranks"]
    assert out[0]["checksum"] != out[1]["checksum"], "the shards must differ, or the test proves nothing"


def test_resume_from_state_dicts_is_exact():
    same, straight, saved = resume_matches("sora", k=60)
    assert same
    assert saved["history"], "the snapshot must hold rank changes"
    assert any(h["step"] > 60 for h in straight.alloc.history), "the continuation must also remove ranks"


def test_xi_schedule_raises_xi_and_resumes_exactly():
    # match_update off: with matched scales this run happens to sit under the schedule at step 100 (xi_mult 1)
    same, _, saved = resume_matches("sora", k=100, config={**CONFIG, "schedule": "xi", "match_update": False})
    assert same and saved["xi_mult"] > 1, "the snapshot must hold a raised xi"


def test_prune_schedule_keeps_the_surviving_gates_large():
    """The xi schedule shrinks every gate by the same raised tau; the prune schedule leaves xi alone, so the
    gates that survive stay near their trained size."""
    runs = {}
    for schedule in ("prune", "xi"):
        run = build("sora", BUDGET, STEPS, {**CONFIG, "schedule": schedule})
        run.train(1, CAP - 1)
        runs[schedule] = torch.cat([a.rank_vector.detach().abs() for a in run.alloc.modules.values()])
    assert runs["prune"][runs["prune"] > 0].mean() > runs["xi"][runs["xi"] > 0].mean()


@pytest.mark.parametrize("score", ["contribution", "gate"])
def test_budget_keeps_the_ranks_with_the_largest_terms_of_dw(score):
    """score="contribution" ranks a rank by |g| ||b|| ||a||, the size of its term of dW: with equal gates, the
    module whose B columns learned most keeps its ranks. score="gate" sees only the (equal) gates."""
    run = build("sora", BUDGET, STEPS, {**CONFIG, "score": score})
    alloc = run.alloc
    with torch.no_grad():
        for name, adapter in alloc.modules.items():
            adapter.rank_vector.fill_(0.5)
            adapter.lora_B.copy_(torch.full_like(adapter.lora_B, 1.0 if name == "blocks.2" else 0.01))
        alloc.modules["blocks.0"].rank_vector[:2] = 0.6  # the largest gates, on small terms
    alloc.keep_largest(step=1, params=2048 - 3 * 8 * 64)  # room for one module's 8 ranks
    if score == "contribution":
        assert alloc.ranks == {"blocks.0": 0, "blocks.1": 0, "blocks.2": 8, "blocks.3": 0}
    else:
        assert alloc.ranks["blocks.0"] >= 2 and alloc.ranks["blocks.2"] < 8, alloc.ranks


def test_config_errors_name_the_value():
    with pytest.raises(ValueError, match="score='norm'"):
        build("sora", BUDGET, STEPS, {"score": "norm"})
    with pytest.raises(ValueError, match="xi_growth=0.5"):
        build("sora", BUDGET, STEPS, {"xi_growth": 0.5})
    with pytest.raises(ValueError, match="unknown option"):
        build("sora", BUDGET, STEPS, {"lambda": 1})


@pytest.mark.slow
def test_minilm_sst2_budget_held_and_ranks_change():
    out = minilm_run("sora", {"xi": 3e-3, "warmup_steps": 3, "final_steps": 8, "check_every": 3}, r=8)
    assert out["params"][0] > out["budget_params"] >= out["final_params"]
    assert all(p <= out["budget_params"] for s, p in out["params"].items() if s >= 30 - 8)
    assert out["ranks"] != out["start_ranks"] and len(set(out["ranks"].values())) > 1
