"""CorDA: top-r (ipm) / bottom-r (kpm) triplets of W0 C, the model is unchanged at step 0, padding is left
out of C, the export is rank 2r on the original weights and loads in PEFT after training, a clear error
without data, and two processes get the same initialisation."""

import json

import pytest
import torch
from allocate.dist_decisions_b import assert_same_tensors, distributed_results
from allocate.synthetic import ResMLP, make_task
from tiny_models import ids, logits, tiny_bert, tiny_llama

import rankwise
from rankwise.init import corda
from rankwise.init.calibration import input_covariances
from rankwise.train.loop import fit

peft = pytest.importorskip("peft")


def _forward(model, batch):
    return model(batch["x"])


@pytest.mark.parametrize("mode", ["ipm", "kpm"])
def test_triplets_of_w_times_covariance_and_unchanged_step_zero(mode):
    model, batches, _ = make_task(seed=0, r=4)
    x = batches[0]["x"]
    with torch.no_grad():
        before = model(x)
    original = {n: layer.weight.detach().clone() for n, layer in rankwise.lora_layers(model)}
    covs = corda.apply(model, batches, mode=mode, forward_fn=_forward)
    with torch.no_grad():
        assert (model(x) - before).abs().max().item() <= 1e-5
    for n, layer in rankwise.lora_layers(model):
        a = layer.adapters["default"]
        C = covs[n].double()
        damped = C + 0.01 * C.diagonal().mean() * torch.eye(32, dtype=torch.float64)  # first damping suffices here
        u, s, vh = torch.linalg.svd(original[n].double() @ damped)
        pick = slice(0, 4) if mode == "ipm" else slice(28, 32)
        expected = u[:, pick] @ torch.diag(s[pick]) @ vh[pick] @ torch.linalg.inv(damped)  # (out, in)
        assert torch.allclose(a.delta_weight().double(), expected, atol=1e-4), (n, mode)
        assert torch.allclose(original[n] - layer.weight, a.delta_weight(), atol=1e-5)


def test_covariance_leaves_padding_out():
    model = tiny_bert()
    rankwise.inject(model, rankwise.LoraConfig(r=2, target_modules=["query"]))
    mask = torch.ones(2, 10, dtype=torch.long)
    mask[1, 6:] = 0
    batch = {"input_ids": ids(), "attention_mask": mask}
    name = "bert.encoder.layer.0.attention.self.query"
    seen = []
    hook = model.get_submodule(name).register_forward_hook(lambda m, a, o: seen.append(a[0].detach()))
    covs = input_covariances(model, [batch], lambda m, b: m(**b))
    hook.remove()
    rows = seen[0][mask.bool()]  # (16, 32): the unmasked tokens only
    assert torch.allclose(covs[name], rows.t() @ rows / 16, atol=1e-5)


def test_export_is_rank_2r_on_the_original_weights_after_training(tmp_path):
    model = tiny_llama()
    rankwise.inject(model, rankwise.LoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]))
    batches = [{"input_ids": ids(seed=s), "labels": ids(seed=s)} for s in range(3)]
    x = batches[0]["input_ids"]
    before = logits(model, x)
    corda.apply(model, batches, mode="kpm")
    assert (logits(model, x) - before).abs().max().item() <= 1e-4
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    fit(model, batches, 5, opt)
    model.eval()
    ours = logits(model, x)
    assert (ours - before).abs().max().item() > 1e-3
    rankwise.save_adapter(model, tmp_path / "c")
    assert json.loads((tmp_path / "c" / "adapter_config.json").read_text())["r"] == 8
    theirs = logits(peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / "c").eval(), x)  # ORIGINAL base
    assert (theirs - ours).abs().max().item() <= 1e-5


def test_injection_without_data_and_bad_mode_explain_the_fix():
    with pytest.raises(ValueError, match=r"rankwise\.init\.corda\.apply"):
        rankwise.inject(ResMLP(), rankwise.LoraConfig(r=4, init="corda", target_modules=["blocks.0"]))
    model, batches, _ = make_task()
    with pytest.raises(ValueError, match="ipm"):
        corda.apply(model, batches, mode="top", forward_fn=_forward)


def test_two_processes_get_the_same_initialisation():
    first, second = distributed_results()
    assert_same_tensors(first["corda"]["tensors"], second["corda"]["tensors"])
    assert_same_tensors(first["corda"]["weights"], second["corda"]["weights"])
