"""Budget parsing, exact accounting, schedules and budgeted selection."""

import pytest
import torch
from tiny_models import tiny_llama

import rankwise
from rankwise.allocate import Budget, cubic_schedule, make_allocator, proportional_ranks, select_components
from rankwise.allocate.budget import params_of


def test_parse_and_validate():
    assert Budget.parse("1.2M").params == 1_200_000
    assert Budget.parse("300k").params == 300_000
    assert Budget.parse(5000).params == 5000
    assert Budget.parse("r8").avg_rank == 8.0 and Budget.parse("avg4.5").avg_rank == 4.5
    with pytest.raises(ValueError, match="not understood"):
        Budget.parse("lots")
    with pytest.raises(ValueError, match="exactly one"):
        Budget(params=10, avg_rank=2)
    with pytest.raises(ValueError, match="min_rank"):
        Budget(params=10, min_rank=3, max_rank=2)
    with pytest.raises(ValueError, match="below what min_rank=2 needs"):
        Budget(params=10, min_rank=2).total({"a": 100})


def test_avg_rank_equals_uniform_lora_params():
    model = tiny_llama()
    rankwise.inject(model, rankwise.LoraConfig(r=4, target_modules="all-linear"))
    alloc = make_allocator("fixed", model, Budget(avg_rank=4))
    assert alloc.budget_params == rankwise.adapter_param_count(model) == alloc.current_params()
    alloc = make_allocator("fixed", model, Budget(params=alloc.budget_params - 1))
    assert set(rankwise.rank_map(model).values()) == {3}, "one parameter short of rank 4 everywhere"


def test_cubic_schedule_shape():
    vals = [cubic_schedule(t, 100, 800, 200, warmup=10, final=20) for t in range(101)]
    assert vals[0] == vals[10] == 800 and vals[80] == vals[100] == 200
    assert all(a >= b for a, b in zip(vals, vals[1:]))
    assert vals[30] - vals[31] > vals[70] - vals[71], "cubic: fast early, slow late"


def test_select_components_respects_budget_min_max_and_scores():
    scores = {"a": torch.tensor([5.0, 1.0, 4.0]), "b": torch.tensor([3.0, 2.0, 0.5]), "c": torch.tensor([0.1, 0.2])}
    costs = {"a": 10, "b": 20, "c": 5}
    keep = select_components(scores, costs, budget_params=50, min_rank=1)
    ranks = {n: len(k) for n, k in keep.items()}
    assert params_of(ranks, costs) <= 50
    assert all(r >= 1 for r in ranks.values())
    assert keep["a"].tolist() == [0, 2]  # the two best of a
    capped = select_components(scores, costs, budget_params=1000, max_rank=2)
    assert max(len(k) for k in capped.values()) == 2


def test_select_components_ranks_by_score_per_parameter():
    """Budget 40: one b component (score 3, cost 40) or four a components (score 1 each, cost 10): 4 > 3."""
    scores = {"a": torch.tensor([1.0, 1.0, 1.0, 1.0]), "b": torch.tensor([3.0])}
    costs = {"a": 10, "b": 40}
    per_param = select_components(scores, costs, budget_params=40)
    assert {n: len(k) for n, k in per_param.items()} == {"a": 4, "b": 0}
    raw = select_components(scores, costs, budget_params=40, per_param=False)
    assert {n: len(k) for n, k in raw.items()} == {"a": 0, "b": 1}


def test_proportional_ranks_exactly_within_budget():
    weights = {"a": 3.0, "b": 1.0, "c": 0.0}
    costs = {"a": 64, "b": 64, "c": 128}
    ranks = proportional_ranks(weights, costs, budget_params=64 * 16, min_rank=1, max_rank=12)
    assert params_of(ranks, costs) <= 64 * 16
    assert ranks["a"] > ranks["b"] >= ranks["c"] >= 1 and ranks["a"] <= 12
    assert params_of(ranks, costs) > 64 * 16 - 128, "leftover is smaller than the cheapest useful rank"
