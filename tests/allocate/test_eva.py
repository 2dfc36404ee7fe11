"""EVA: ranks and A equal an exact PCA reference, padding is skipped, q/k/v share one decomposition, the
budget holds, the model is unchanged at step 0, export loads in PEFT, and two processes decide alike."""

import math

import pytest
import torch
from allocate.dist_decisions_b import assert_same_tensors, distributed_results
from allocate.synthetic import make_task
from tiny_models import tiny_bert

import rankwise
from rankwise.allocate import Budget, make_allocator, select_components
from rankwise.allocate.eva import RunningPCA
from rankwise.train.loop import fit

peft = pytest.importorskip("peft")


def _reference(model, batches):
    """Exact PCA of every block's stacked inputs, hooked on the base layers (independent of EVA's code)."""
    rows = {n: [] for n, _ in rankwise.lora_layers(model)}
    hooks = [layer.base_layer.register_forward_hook(lambda m, a, o, n=n: rows[n].append(a[0].detach()))
             for n, layer in rankwise.lora_layers(model)]
    with rankwise.disable_adapters(model), torch.no_grad():
        for b in batches:
            model(b["x"])
    for h in hooks:
        h.remove()
    out = {}
    for n, r in rows.items():
        x = torch.cat(r).double()
        x = x - x.mean(0)
        _, s, vh = torch.linalg.svd(x, full_matrices=False)
        out[n] = ((s**2 / (s**2).sum()).float(), vh.float())
    return out


def _bert_batches(n=3, seed=0, pad_id=None):
    g = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(n):
        ids = torch.randint(1, 96, (4, 12), generator=g)
        mask = torch.ones(4, 12, dtype=torch.long)
        mask[1, 7:] = 0
        mask[3, 4:] = 0
        if pad_id is not None:
            ids = ids.masked_fill(mask == 0, pad_id)
        batches.append({"input_ids": ids, "attention_mask": mask, "labels": torch.tensor([0, 1, 0, 1])})
    return batches


def test_ranks_and_components_match_an_exact_pca_reference():
    model, batches, lf = make_task(seed=0)
    alloc = make_allocator("eva", model, Budget(avg_rank=4), {"tau": 1.0, "max_batches": 5})
    alloc.prepare(batches, lf)
    used = batches[: alloc.batches_used]
    ref = _reference(make_task(seed=0)[0], used)
    k = math.ceil(2 * 4)
    keep = select_components({n: ratios[:k] for n, (ratios, _) in ref.items()}, alloc.costs, alloc.budget_params)
    assert alloc.ranks == {n: len(idx) for n, idx in keep.items()}
    assert len(set(alloc.ranks.values())) > 1 and min(alloc.ranks.values()) == 0, alloc.ranks
    assert rankwise.adapter_param_count(model) <= alloc.budget_params
    for n, a in alloc.modules.items():
        cos = (a.lora_A @ ref[n][1][: a.r].t()).diagonal().abs()  # unit rows, equal up to sign
        assert torch.allclose(cos, torch.ones_like(cos), atol=1e-3), (n, cos)
        assert a.r == 0 or math.isclose(a.scale, 16 / 8)  # alpha_i = alpha * r_i / r0 keeps s = alpha / r0


def test_model_unchanged_at_step_zero_and_export_after_training_loads_in_peft(tmp_path):
    model = tiny_bert()
    rankwise.inject(model, rankwise.LoraConfig(r=4, alpha=8, target_modules=["query", "key", "value", "dense"]))
    batches = _bert_batches()
    with torch.no_grad():
        before = model(**batches[0]).logits
    alloc = make_allocator("eva", model, Budget(avg_rank=4))
    alloc.prepare(batches)
    with torch.no_grad():
        assert (model(**batches[0]).logits - before).abs().max().item() <= 1e-6
    assert rankwise.adapter_param_count(model) <= alloc.budget_params
    assert len(set(alloc.ranks.values())) > 1, alloc.ranks
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    alloc.attach(opt)
    fit(model, batches, 10, opt, allocator=alloc)
    model.eval()
    with torch.no_grad():
        ours = model(**batches[0]).logits
    rankwise.save_adapter(model, tmp_path / "e")
    theirs = peft.PeftModel.from_pretrained(tiny_bert(), tmp_path / "e").eval()
    with torch.no_grad():
        assert (theirs(**batches[0]).logits - ours).abs().max().item() <= 1e-5


def test_padding_is_skipped_and_qkv_share_a_decomposition():
    decided = []
    for pad_id in (0, 7):  # different ids at the padded positions only
        model = tiny_bert()
        rankwise.inject(model, rankwise.LoraConfig(r=4, alpha=8, target_modules=["query", "key", "value"]))
        alloc = make_allocator("eva", model, Budget(avg_rank=4), {"max_batches": 3, "tau": 1.0})
        alloc.prepare(_bert_batches(pad_id=pad_id))
        decided.append({n: a.lora_A.detach().clone() for n, a in alloc.modules.items()})
        q = "bert.encoder.layer.0.attention.self.query"
        assert alloc.group_of[q.replace("query", "key")] == q and alloc.group_of[q.replace("query", "value")] == q
        pca = alloc.pca[q]
        assert pca.n == 3 * (48 - 5 - 8), "one row per unmasked token"
    for n in decided[0]:
        assert torch.allclose(decided[0][n], decided[1][n], atol=1e-5), n


def test_power_iteration_for_wide_layers_matches_the_exact_decomposition():
    g = torch.Generator().manual_seed(0)
    scales = torch.logspace(0, -2, 80, dtype=torch.float64)  # decaying spectrum, as activations have
    basis = torch.linalg.qr(torch.randn(80, 80, generator=g, dtype=torch.float64))[0]
    exact, tracked = RunningPCA(80, 6), RunningPCA(80, 6)
    tracked.exact_max_dim = 16  # force the warm-started block power iteration
    for _ in range(5):
        rows = (torch.randn(200, 80, generator=g, dtype=torch.float64) * scales) @ basis.t()
        exact.update(rows)
        tracked.update(rows)
    assert torch.allclose(tracked.ratios, exact.ratios, rtol=1e-4)
    cos = (tracked.components * exact.components).sum(1).abs()
    assert (cos > 0.999).all(), cos


def test_converges_early_on_iid_data_and_rejects_embeddings():
    model, batches, lf = make_task(seed=1, n_batches=16, batch=256)
    alloc = make_allocator("eva", model, Budget(avg_rank=2), {"tau": 0.9})
    alloc.prepare(batches, lf)
    assert alloc.all_converged and alloc.batches_used < 16
    bert = tiny_bert()
    rankwise.inject(bert, rankwise.LoraConfig(r=4, target_modules=["word_embeddings", "query"]))
    with pytest.raises(ValueError, match="embedding"):
        make_allocator("eva", bert, Budget(avg_rank=4))


def test_two_processes_make_identical_decisions():
    first, second = distributed_results()
    assert first["eva"]["ranks"] == second["eva"]["ranks"]
    assert first["eva"]["batches"] == second["eva"]["batches"]
    assert_same_tensors(first["eva"]["tensors"], second["eva"]["tensors"])
