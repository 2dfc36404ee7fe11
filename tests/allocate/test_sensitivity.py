"""Sensitivity-LoRA: the documented formula, ranks within the budget favouring the sensitive modules, the
resize keeps the function, export loads in PEFT, and two processes decide alike."""

import math

import pytest
import torch
from allocate.branches import Branches, make_branches
from allocate.dist_decisions_b import assert_same_tensors, distributed_results
from allocate.synthetic import important_share
from tiny_models import randomize_adapters

import rankwise
from rankwise.allocate import Budget, make_allocator, proportional_ranks
from rankwise.allocate.sensitivity import effective_rank, sensitivity_scores
from rankwise.train.loop import fit

peft = pytest.importorskip("peft")


def _fisher_by_hand(model, batches, lf):
    """E_b[(dL_b/dW)^2] with plain .backward() on each base weight."""
    layers = dict(rankwise.lora_layers(model))
    sums = {n: torch.zeros_like(layer.weight) for n, layer in layers.items()}
    for layer in layers.values():
        layer.weight.requires_grad_(True)
    for b in batches:
        for layer in layers.values():
            layer.weight.grad = None
        lf(model, b).backward()
        for n, layer in layers.items():
            sums[n] += layer.weight.grad**2
    for layer in layers.values():
        layer.weight.requires_grad_(False)
        layer.weight.grad = None
    return {n: s / len(batches) for n, s in sums.items()}


def test_scores_follow_the_documented_formula_and_ranks_the_budget():
    model, batches, lf = make_branches(seed=0)
    fisher = _fisher_by_hand(make_branches(seed=0)[0], batches, lf)
    alloc = make_allocator("sensitivity", model, Budget(avg_rank=4), {"n_batches": 8, "local_exponent": 0.5})
    alloc.prepare(batches, lf)
    total = sum(f.sum().item() for f in fisher.values())
    for n, f in fisher.items():
        s = torch.linalg.svdvals(f.sqrt().double())
        p = s / s.sum()
        erank = math.exp(-(p * p.log()).sum().item())
        assert math.isclose(alloc.scores[n]["global"], f.sum().item() / total, rel_tol=1e-4)
        assert math.isclose(alloc.scores[n]["local"], erank / 32, rel_tol=1e-4)
        assert math.isclose(alloc.scores[n]["weight"], alloc.scores[n]["global"] * alloc.scores[n]["local"] ** 0.5,
                            rel_tol=1e-9)
    weights = {n: s["weight"] for n, s in alloc.scores.items()}
    assert alloc.ranks == proportional_ranks(weights, alloc.costs, alloc.budget_params, 0, 16)  # cap 4 x r_ref
    assert rankwise.adapter_param_count(model) <= alloc.budget_params == 4 * 4 * 64
    assert len(set(alloc.ranks.values())) > 1 and important_share(alloc.ranks) > 0.75, alloc.ranks


def test_effective_rank_counts_directions():
    assert math.isclose(effective_rank(torch.eye(5)), 5.0, rel_tol=1e-9)
    assert math.isclose(effective_rank(torch.outer(torch.arange(1.0, 4), torch.ones(3))), 1.0, rel_tol=1e-9)
    assert effective_rank(torch.zeros(3, 3)) == 0.0


def test_local_term_favours_spread_sensitivity_and_beta_zero_is_pure_fisher_mass():
    g = torch.Generator().manual_seed(0)
    u, v = torch.rand(32, 1, generator=g), torch.rand(1, 32, generator=g)
    concentrated = (u @ v) ** 2  # sqrt(F) has rank 1
    spread = torch.rand(32, 32, generator=g) ** 2
    spread *= concentrated.sum() / spread.sum()  # same Fisher mass
    scores = sensitivity_scores({"c": concentrated, "s": spread}, beta=0.5)
    assert math.isclose(scores["c"]["global"], scores["s"]["global"], rel_tol=1e-6)
    assert scores["c"]["local"] < 0.1 < scores["s"]["local"]
    assert scores["c"]["weight"] < scores["s"]["weight"]
    flat = sensitivity_scores({"c": concentrated, "s": spread}, beta=0.0)
    assert all(x["weight"] == x["global"] for x in flat.values())


def test_resizing_keeps_the_function():
    model, batches, lf = make_branches(seed=4, r=2)
    randomize_adapters(model, seed=1)  # non-zero B: the kept components carry over, new ones start at B = 0
    x = batches[0]["x"]
    with torch.no_grad():
        before = model(x)
    alloc = make_allocator("sensitivity", model, Budget(avg_rank=4, min_rank=2), {"n_batches": 4})
    alloc.prepare(batches, lf)
    assert min(alloc.ranks.values()) == 2 and max(alloc.ranks.values()) > 2, alloc.ranks
    with torch.no_grad():
        assert (model(x) - before).abs().max().item() <= 1e-6


def test_export_after_training_loads_in_peft(tmp_path):
    model, batches, lf = make_branches(seed=5)
    alloc = make_allocator("sensitivity", model, Budget(avg_rank=4, min_rank=1), {"n_batches": 4})
    alloc.prepare(batches, lf)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    alloc.attach(opt)
    fit(model, batches, 20, opt, allocator=alloc, loss_fn=lf)
    x = batches[0]["x"]
    with torch.no_grad():
        ours = model(x)
    rankwise.save_adapter(model, tmp_path / "s")
    torch.manual_seed(5)
    theirs = peft.PeftModel.from_pretrained(Branches(), tmp_path / "s").eval()
    with torch.no_grad():
        assert (theirs(x) - ours).abs().max().item() <= 1e-5


def test_two_processes_make_identical_decisions():
    first, second = distributed_results()
    assert first["sensitivity"]["ranks"] == second["sensitivity"]["ranks"]
    assert_same_tensors(first["sensitivity"]["tensors"], second["sensitivity"]["tensors"])


def test_rank_cap_spreads_a_concentrated_budget():
    model, batches, lf = make_branches(seed=0)
    alloc = make_allocator("sensitivity", model, Budget(avg_rank=4), {"n_batches": 4, "max_rank_factor": 1.5})
    alloc.prepare(batches, lf)
    assert alloc.ranks["blocks.0"] == alloc.ranks["blocks.2"] == 6, alloc.ranks  # floor(1.5 x 4)
    assert rankwise.adapter_param_count(model) == alloc.budget_params, "the capped surplus goes to the others"
    with pytest.raises(ValueError, match="max_rank_factor"):
        make_allocator("sensitivity", model, Budget(avg_rank=4), {"max_rank_factor": 0.5})
