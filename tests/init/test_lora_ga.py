"""LoRA-GA: A and B span the gradient's singular subspaces, the model is unchanged at step 0, the export is
rank 2r on the original weights and loads in PEFT after training, a clear error without data, and two
processes get the same initialisation."""

import json

import pytest
import torch
from allocate.dist_decisions_b import assert_same_tensors, distributed_results
from allocate.synthetic import ResMLP, make_task
from tiny_models import ids, logits, tiny_gpt2

import rankwise
from rankwise.init import lora_ga
from rankwise.train.loop import fit

peft = pytest.importorskip("peft")


def _lm_batches(n=3):
    return [{"input_ids": ids(seed=s), "labels": ids(seed=s)} for s in range(n)]


def test_factors_span_the_gradient_singular_subspaces_and_step_zero_is_unchanged():
    model, batches, lf = make_task(seed=0, r=4)
    x = batches[0]["x"]
    with torch.no_grad():
        before = model(x)
    original = {n: layer.weight.detach().clone() for n, layer in rankwise.lora_layers(model)}
    # reference gradient with plain .backward() on a fresh copy
    ref_model = make_task(seed=0, r=4)[0]
    for _, layer in rankwise.lora_layers(ref_model):
        layer.weight.requires_grad_(True)
    for b in batches:
        lf(ref_model, b).backward()
    grads = lora_ga.apply(model, batches, lf, gamma=16.0, n_batches=None)
    with torch.no_grad():
        assert (model(x) - before).abs().max().item() <= 1e-5
    for n, layer in rankwise.lora_layers(ref_model):
        G = layer.weight.grad / len(batches)
        assert torch.allclose(grads[n], G, atol=1e-5)
        u, _, vh = torch.linalg.svd(G)
        a = model.get_submodule(n).adapters["default"]
        c = 32**0.25 / 4.0
        v_r = vh[:4]  # (r, in)
        assert torch.allclose(a.lora_A @ v_r.t() @ v_r, a.lora_A, atol=1e-3), "A spans the top-r right vectors"
        assert torch.allclose(a.lora_A.norm(dim=1), torch.full((4,), c), atol=1e-4)
        u_r2 = u[:, 4:8]  # (out, r)
        assert torch.allclose(u_r2 @ u_r2.t() @ a.lora_B, a.lora_B, atol=1e-3), "B spans left vectors r..2r"
        moved = original[n] - model.get_submodule(n).weight
        assert torch.allclose(moved, a.scale * a.offset_B @ a.offset_A, atol=1e-6)
        assert moved.abs().max() > 1e-3


def test_export_is_rank_2r_on_the_original_weights_after_training(tmp_path):
    model = tiny_gpt2()
    rankwise.inject(model, rankwise.LoraConfig(r=4, alpha=8, target_modules=["c_attn", "c_fc"]))
    batches = _lm_batches()
    x = batches[0]["input_ids"]
    before = logits(model, x)
    lora_ga.apply(model, batches)  # model(**batch).loss by default
    assert (logits(model, x) - before).abs().max().item() <= 1e-5
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    fit(model, batches, 5, opt)
    model.eval()
    ours = logits(model, x)
    assert (ours - before).abs().max().item() > 1e-3, "training must have changed the model"
    rankwise.save_adapter(model, tmp_path / "ga")
    cfg = json.loads((tmp_path / "ga" / "adapter_config.json").read_text())
    assert cfg["r"] == 8, "rank 2r: trained factors plus the moved-base offset"
    theirs = logits(peft.PeftModel.from_pretrained(tiny_gpt2(), tmp_path / "ga").eval(), x)  # ORIGINAL base
    assert (theirs - ours).abs().max().item() <= 1e-5


def test_injection_without_data_explains_what_to_call():
    with pytest.raises(ValueError, match=r"rankwise\.init\.lora_ga\.apply"):
        rankwise.inject(ResMLP(), rankwise.LoraConfig(r=4, init="lora_ga", target_modules=["blocks.0"]))
    model, batches, lf = make_task(r=20)
    with pytest.raises(ValueError, match="2r = 40"):
        lora_ga.apply(model, batches, lf)


def test_two_processes_get_the_same_initialisation():
    first, second = distributed_results()
    assert_same_tensors(first["lora_ga"]["tensors"], second["lora_ga"]["tensors"])
