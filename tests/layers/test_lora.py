"""LoraLayer: forward vs PEFT for every base kind, multiple adapters, disabling, merge."""

import pytest
import torch
from tiny_models import ARCHS, ids, logits, randomize_adapters
from torch import nn

import rankwise

peft = pytest.importorskip("peft")


def test_unsupported_module_type_names_type_and_supported():
    model = nn.Sequential(nn.Conv2d(3, 3, 1), nn.Linear(3, 3))
    with pytest.raises(TypeError, match=r"torch.nn.modules.conv.Conv2d.*supported module types.*Linear"):
        rankwise.inject(model, rankwise.LoraConfig(target_modules=["0"]))


def test_dropout_only_in_training():
    torch.manual_seed(0)
    layer = rankwise.LoraLayer(nn.Linear(16, 16))
    adapter = layer.add_adapter("default", 4, 8.0, dropout=0.5)
    with torch.no_grad():
        adapter.lora_B.normal_()
    x = torch.randn(8, 16)
    layer.eval()
    assert torch.equal(layer(x), layer(x))
    layer.train()
    assert not torch.equal(layer(x), layer(x))


def test_multiple_adapters_switch_and_disable():
    build, targets = ARCHS["llama"]
    model = build()
    rankwise.inject(model, rankwise.LoraConfig(r=2, target_modules=["q_proj"]), "a")
    rankwise.inject(model, rankwise.LoraConfig(r=4, target_modules=["v_proj", "q_proj"]), "b")
    randomize_adapters(model)
    x = ids()
    base = logits(build(), x)
    rankwise.set_adapter(model, "a")
    out_a = logits(model, x)
    rankwise.set_adapter(model, "b")
    out_b = logits(model, x)
    assert not torch.allclose(out_a, out_b) and not torch.allclose(out_a, base)
    with rankwise.disable_adapters(model):
        assert torch.allclose(logits(model, x), base, atol=1e-6)
    assert torch.equal(logits(model, x), out_b)
    rankwise.delete_adapter(model, "b")
    assert rankwise.adapter_names(model) == ["a"]
    with pytest.raises(KeyError, match="has no adapter 'b'"):
        rankwise.set_adapter(model, "b")


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_dora_gradients_match_peft(arch):
    """Same weights, same loss: DoRA's gradients (norm treated as constant) equal PEFT's."""
    build, targets = ARCHS[arch]
    ours = build()
    rankwise.inject(ours, rankwise.LoraConfig(r=4, alpha=8, target_modules=targets[:2], use_dora=True))
    randomize_adapters(ours, seed=4)
    theirs = peft.get_peft_model(build(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets[:2], use_dora=True))
    with torch.no_grad():
        for name, layer in rankwise.lora_layers(ours):
            p_layer = theirs.base_model.model.get_submodule(name)
            a = layer.adapters["default"]
            p_layer.lora_A["default"].weight.copy_(a.lora_A)
            p_layer.lora_B["default"].weight.copy_(a.lora_B)
            p_layer.lora_magnitude_vector["default"].weight.copy_(a.magnitude)
    x = ids()
    for m in (ours, theirs):
        m.eval()  # no base-model dropout, so both see the same function; gradients still flow
        m(x).logits.pow(2).mean().backward()
    for name, layer in rankwise.lora_layers(ours):
        p_layer = theirs.base_model.model.get_submodule(name)
        a = layer.adapters["default"]
        assert torch.allclose(a.lora_A.grad, p_layer.lora_A["default"].weight.grad, atol=1e-5, rtol=1e-4)
        assert torch.allclose(a.magnitude.grad, p_layer.lora_magnitude_vector["default"].weight.grad, atol=1e-5, rtol=1e-4)


def test_dora_starts_as_base_model():
    build, targets = ARCHS["gpt2"]
    model = build()
    rankwise.inject(model, rankwise.LoraConfig(r=4, target_modules=targets, use_dora=True))
    x = ids()
    assert torch.allclose(logits(model, x), logits(build(), x), atol=1e-5)


def test_embedding_dora_is_refused_clearly():
    build, _ = ARCHS["llama"]
    with pytest.raises(ValueError, match="Embedding adapters support neither DoRA"):
        rankwise.inject(build(), rankwise.LoraConfig(target_modules=["embed_tokens"], use_dora=True))
