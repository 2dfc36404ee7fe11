"""GoRA: ranks from mean|W0 * G| within the budget and the clamp, the initial B is a descent step, the
base weights are left as they were, export loads in PEFT, and two processes decide alike."""

import math

import pytest
import torch
from allocate.branches import Branches, make_branches
from allocate.dist_decisions_b import assert_same_tensors, distributed_results
from allocate.synthetic import important_share, make_task

import rankwise
from rankwise.allocate import Budget, make_allocator
from rankwise.allocate.gora import projected_step_B
from rankwise.init.calibration import weight_gradients
from rankwise.train.loop import fit

peft = pytest.importorskip("peft")


def _total_loss(model, batches, lf) -> float:
    with torch.no_grad():
        return float(sum(lf(model, b) for b in batches))


def test_ranks_follow_gradient_importance_within_budget_and_clamp():
    model, batches, lf = make_branches(seed=1)
    alloc = make_allocator("gora", model, Budget(avg_rank=4), {"n_batches": 8})
    alloc.prepare(batches, lf)
    ranks = alloc.ranks
    assert rankwise.adapter_param_count(model) <= alloc.budget_params == 4 * 4 * 64
    assert len(set(ranks.values())) > 1 and important_share(ranks) > 0.6, ranks
    assert all(2 <= r <= 16 for r in ranks.values()), ranks  # [r_ref / 2, 4 r_ref] with r_ref = 4
    assert abs(sum(alloc.importance.values()) - 1) < 1e-9
    # importance is mean |W0 * G| normalised: recompute it independently
    grads, _ = weight_gradients(make_branches(seed=1)[0], batches, lf, n_batches=8)
    raw = {n: (model.get_submodule(n).weight_out_in() * g).abs().mean().item() for n, g in grads.items()}
    for n, v in raw.items():
        assert math.isclose(alloc.importance[n], v / sum(raw.values()), rel_tol=1e-5)
    for n, a in alloc.modules.items():  # rsLoRA scale alpha / sqrt(r_i)
        assert math.isclose(a.scale, 16 / math.sqrt(ranks[n]))


def test_on_the_residual_task_gradients_do_not_single_out_important_blocks():
    """Documents the limit (see branches.py): at the initial point every residual block can compensate the
    others, so GoRA's first-order importance is nearly flat there and the ranks stay near uniform."""
    model, batches, lf = make_task(seed=0)
    alloc = make_allocator("gora", model, Budget(avg_rank=4), {"n_batches": 8})
    alloc.prepare(batches, lf)
    assert max(alloc.importance.values()) < 1.5 * min(alloc.importance.values()), alloc.importance
    assert rankwise.adapter_param_count(model) <= alloc.budget_params


def test_initial_update_decreases_the_loss_and_the_sign_matters():
    model, batches, lf = make_branches(seed=2)
    base_weights = {n: layer.weight.detach().clone() for n, layer in rankwise.lora_layers(model)}
    before = _total_loss(model, batches, lf)
    alloc = make_allocator("gora", model, Budget(avg_rank=4), {"n_batches": 8, "gamma": 0.05})
    alloc.prepare(batches, lf)
    after = _total_loss(model, batches, lf)
    assert after < before - 1e-3, (before, after)
    for n, layer in rankwise.lora_layers(model):
        assert torch.equal(layer.weight, base_weights[n]), "GoRA must not move W0"
        assert not layer.weight.requires_grad and layer.weight.grad is None
    with torch.no_grad():
        for a in alloc.modules.values():
            a.lora_B.neg_()
    assert _total_loss(model, batches, lf) > before, "the opposite sign must increase the loss"


def test_projected_step_matches_its_definition():
    g = torch.Generator().manual_seed(0)
    G, A = torch.randn(6, 10, generator=g), torch.randn(3, 10, generator=g)
    B = projected_step_B(G, A, gamma=0.5, alpha=4.0)
    P = A.t() @ torch.linalg.inv(A @ A.t()) @ A  # (in, in) projector on A's rows
    assert torch.allclose(B @ A, -(0.5 / 4.0) * G @ P, atol=1e-5)


def test_export_after_training_loads_in_peft(tmp_path):
    model, batches, lf = make_branches(seed=3)
    alloc = make_allocator("gora", model, Budget(avg_rank=4), {"n_batches": 4})
    alloc.prepare(batches, lf)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    alloc.attach(opt)
    fit(model, batches, 20, opt, allocator=alloc, loss_fn=lf)
    x = batches[0]["x"]
    with torch.no_grad():
        ours = model(x)
    rankwise.save_adapter(model, tmp_path / "a")
    torch.manual_seed(3)
    theirs = peft.PeftModel.from_pretrained(Branches(), tmp_path / "a").eval()
    with torch.no_grad():
        assert (theirs(x) - ours).abs().max().item() <= 1e-5


def test_prepare_without_batches_says_what_to_pass():
    model, _, _ = make_branches()
    with pytest.raises(ValueError, match="calibration batches"):
        make_allocator("gora", model, Budget(avg_rank=4)).prepare(None)


def test_two_processes_make_identical_decisions():
    first, second = distributed_results()
    assert first["gora"]["ranks"] == second["gora"]["ranks"]
    assert_same_tensors(first["gora"]["tensors"], second["gora"]["tensors"])
