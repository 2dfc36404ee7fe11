"""DyLoRA: nested truncations train, the chosen ranks fit the budget and favour the important modules, the
cut keeps the function, the export loads in PEFT, and two processes decide alike."""

import pytest
import torch
from allocate.dist_decisions_b import distributed_results
from allocate.synthetic import ResMLP, important_share, make_task

import rankwise
from rankwise.allocate import Budget, make_allocator
from rankwise.layers.nested import keep_only_component_grad, set_truncation, truncated
from rankwise.train.loop import train_step

peft = pytest.importorskip("peft")


def _train(update="all", steps=600, select="greedy_loss", seed=0, budget=Budget(avg_rank=4)):
    model, batches, lf = make_task(seed=seed, r=8, use_rslora=True)
    alloc = make_allocator("dylora", model, budget, {"select": select, "update": update}, total_steps=steps)
    alloc.set_eval_batch(batches[-1], lf)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    alloc.attach(opt)
    for step in range(1, steps + 1):
        train_step(model, batches[step % 7], step, opt, allocator=alloc, loss_fn=lf)
    return model, batches, lf, alloc


def _losses(model, batch, lf, r_max=8):
    with torch.no_grad():
        out = []
        for b in range(r_max + 1):
            with truncated(model, b):
                out.append(float(lf(model, batch)))
    return out


@pytest.fixture(scope="module")
def trained():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # 600 steps of 32-wide matrices: threads only add contention on a busy machine
    try:
        return _train()
    finally:
        torch.set_num_threads(threads)


def test_every_truncation_works_after_training(trained):
    model, batches, lf, _ = trained
    losses = _losses(model, batches[-1], lf)  # losses[0]: the base model
    assert losses[8] < 0.15 * losses[0], losses
    assert losses[1] < 0.7 * losses[0], f"rank 1 alone must already help: {losses}"
    for b in range(2, 9):  # monotone up to noise: no truncation much worse than a smaller one
        assert losses[b] <= 1.1 * min(losses[1:b]), losses


def test_greedy_ranks_fit_budget_and_favour_important_modules(trained):
    model, _, _, alloc = trained
    alloc.finalize()
    ranks = alloc.ranks
    assert rankwise.adapter_param_count(model) <= alloc.budget_params == 4 * 4 * 64
    assert len(set(ranks.values())) > 1, ranks
    assert important_share(ranks) > 0.55, ranks
    assert alloc.path and all(p["new_rank"] < p["old_rank"] for p in alloc.path)
    assert alloc.evaluations < 4 * 16, alloc.evaluations  # rounds keep the forward passes bounded
    assert all(a.truncate is None for a in alloc.modules.values())


def test_cut_keeps_the_function_and_export_loads_in_peft(tmp_path):
    model, batches, lf, alloc = _train(steps=60)
    ranks = alloc.greedy_ranks()
    x = batches[0]["x"]
    set_truncation(model, ranks)
    with torch.no_grad():
        before = model(x)
    alloc.cut(ranks, step=60)
    set_truncation(model, None)
    with torch.no_grad():
        after = model(x)
    assert rankwise.rank_map(model) == ranks
    assert (before - after).abs().max().item() <= 1e-5
    rankwise.save_adapter(model, tmp_path / "a")
    base = ResMLP()
    base.load_state_dict({k.replace("base_layer.", ""): v for k, v in model.state_dict().items()
                          if ".adapters." not in k})
    theirs = peft.PeftModel.from_pretrained(base, tmp_path / "a").eval()
    with torch.no_grad():
        assert (theirs(x) - after).abs().max().item() <= 1e-5


def test_uniform_selection_and_last_component_update():
    model, batches, lf, alloc = _train(update="last", steps=40, select="uniform", budget=Budget(avg_rank=3))
    assert _losses(model, batches[-1], lf)[8] < _losses(model, batches[-1], lf)[0]
    alloc.finalize()
    assert set(alloc.ranks.values()) == {3}
    # the authors' update: with truncation b only A row b-1 and B column b-1 keep a gradient
    adapter = next(iter(alloc.modules.values()))
    adapter.lora_A.grad = torch.ones_like(adapter.lora_A)
    adapter.lora_B.grad = torch.ones_like(adapter.lora_B)
    keep_only_component_grad(adapter, 2)
    assert adapter.lora_A.grad.sum(1).tolist() == [0.0, 32.0, 0.0]
    assert adapter.lora_B.grad.sum(0).tolist() == [0.0, 32.0, 0.0]


def test_sampling_is_seeded_and_greedy_needs_eval_batch():
    model, _, _ = make_task()
    a = make_allocator("dylora", model, Budget(avg_rank=4), seed=5)
    a.attach(None)
    for s in range(1, 20):
        a.on_step(s)
    b = make_allocator("dylora", make_task()[0], Budget(avg_rank=4), seed=5)
    b.attach(None)
    for s in range(1, 20):
        b.on_step(s)
    assert a.sampled == b.sampled and set(a.sampled) <= set(range(1, 9)) and len(set(a.sampled)) > 3
    with pytest.raises(ValueError, match="set_eval_batch"):
        make_allocator("dylora", make_task()[0], Budget(avg_rank=4), {"select": "greedy_loss"}).attach(None)
    with pytest.raises(ValueError, match="select"):
        make_allocator("dylora", make_task()[0], Budget(avg_rank=4), {"select": "best"})


def test_two_processes_make_identical_decisions():
    first, second = distributed_results()
    assert first["dylora"]["sampled"] == second["dylora"]["sampled"]
    assert first["dylora"]["ranks"] == second["dylora"]["ranks"]
    assert first["dylora"]["path"] == second["dylora"]["path"]
    assert sum(first["dylora"]["ranks"].values()) * 64 <= 4 * 4 * 64
