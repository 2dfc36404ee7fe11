"""PiSSA: unchanged model at step 0, principal subspace in the adapter, export as rank 2r on the original weights."""

import json

import pytest
import torch
from tiny_models import ARCHS, ids, logits, randomize_adapters

import rankwise
from rankwise.init import available_initializers

peft = pytest.importorskip("peft")


@pytest.mark.parametrize("init", ["pissa", "pissa_niter_4"])
def test_pissa_keeps_model_and_takes_principal_part(init):
    build, targets = ARCHS["llama"]
    model = build()
    x = ids()
    expected = logits(model, x)
    original = model.model.layers[0].self_attn.q_proj.weight.detach().clone()
    rankwise.inject(model, rankwise.LoraConfig(r=4, alpha=8, target_modules=targets, init=init))
    assert torch.allclose(logits(model, x), expected, atol=1e-5)
    layer = model.model.layers[0].self_attn.q_proj
    s = torch.linalg.svdvals(original)
    residual = torch.linalg.svdvals(layer.base_layer.weight)
    assert residual[0] < s[0]  # the top singular direction moved into the adapter
    if init == "pissa":
        assert torch.allclose(residual[0], s[4], atol=1e-4)


def test_pissa_export_is_rank_2r_on_original_weights(tmp_path):
    build, targets = ARCHS["gpt2"]
    model = build()
    rankwise.inject(model, rankwise.LoraConfig(r=3, alpha=6, target_modules=targets, init="pissa"))
    randomize_adapters(model, seed=9, scale=0.05)  # "training"
    x = ids()
    ours = logits(model, x)
    rankwise.save_adapter(model, tmp_path / "p")
    cfg = json.loads((tmp_path / "p" / "adapter_config.json").read_text())
    assert cfg["r"] == 6
    theirs = logits(peft.PeftModel.from_pretrained(build(), tmp_path / "p").eval(), x)
    assert (ours - theirs).abs().max().item() <= 1e-5


def test_registry_lists_builtins():
    assert {"default", "gaussian", "pissa"} <= set(available_initializers())
