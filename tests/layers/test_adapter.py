"""Rank resizing: function kept, optimizer state carried over, rank 0 valid."""

import pytest
import torch
from tiny_models import mlp
from torch import nn

import rankwise
from rankwise.layers.adapter import LoraAdapter
from rankwise.optim import remap_optimizer


def _layer(r=4, **kw):
    torch.manual_seed(0)
    layer = rankwise.LoraLayer(nn.Linear(6, 5))
    adapter = layer.add_adapter("default", r, 8.0, **kw)
    with torch.no_grad():
        adapter.lora_B.normal_()
    return layer, adapter


def test_pruning_zeroed_component_keeps_outputs():
    layer, adapter = _layer()
    with torch.no_grad():
        adapter.lora_B[:, 1] = 0  # component 1 contributes nothing
    x = torch.randn(3, 6)
    before = layer(x)
    adapter.resize([0, 2, 3])
    assert adapter.r == 3 and adapter.lora_A.shape == (3, 6) and adapter.lora_B.shape == (5, 3)
    assert torch.allclose(layer(x), before, atol=1e-6)


def test_pruning_a_live_component_changes_outputs():
    layer, adapter = _layer()
    x = torch.randn(3, 6)
    before = layer(x)
    adapter.resize([0, 2, 3])
    assert not torch.allclose(layer(x), before, atol=1e-4)


def test_growth_keeps_outputs_and_uses_given_init():
    layer, adapter = _layer(r=2)
    x = torch.randn(3, 6)
    before = layer(x)
    adapter.resize(None, add=3)
    assert adapter.r == 5 and torch.allclose(layer(x), before, atol=1e-6)
    new_a = torch.ones(1, 6)
    adapter.resize([0], add=1, new_A=new_a, new_B=torch.full((5, 1), 2.0))
    assert torch.equal(adapter.lora_A[1], new_a[0]) and torch.equal(adapter.lora_B[:, 1], torch.full((5,), 2.0))


def test_rank_vector_resizes_with_factors_and_is_folded():
    layer, adapter = _layer()
    e = adapter.enable_rank_vector(torch.tensor([1.0, 0.0, 2.0, 0.5]))
    assert e.shape == (4,)
    x = torch.randn(2, 6)
    before = layer(x)
    adapter.resize([0, 2, 3])  # component 1 had e = 0
    assert torch.equal(adapter.rank_vector.detach(), torch.tensor([1.0, 2.0, 0.5]))
    assert torch.allclose(layer(x), before, atol=1e-6)
    expected = adapter.scale * (adapter.lora_B * adapter.rank_vector) @ adapter.lora_A
    assert torch.allclose(adapter.delta_weight(), expected)


def test_rank_zero_is_the_base_module():
    layer, adapter = _layer()
    x = torch.randn(2, 6)
    adapter.resize([])
    assert adapter.r == 0
    assert torch.equal(layer(x), layer.base_layer(x))
    adapter.resize(None, add=2)  # and it can grow back
    assert adapter.r == 2 and torch.equal(layer(x), layer.base_layer(x))


def test_scale_is_kept_across_resizes_and_truncation_uses_rule():
    _, adapter = _layer(r=8)
    s = adapter.scale
    adapter.resize([0, 1, 2])
    assert adapter.scale == s == 1.0
    adapter.truncate = 2
    _, _, s_trunc = adapter.effective_factors()
    assert s_trunc == 4.0  # alpha / b, DyLoRA's rule


def test_bad_resize_arguments_name_the_problem():
    _, adapter = _layer()
    with pytest.raises(ValueError, match="out of range"):
        adapter.resize([0, 7])
    with pytest.raises(ValueError, match="duplicates"):
        adapter.resize([1, 1])
    with pytest.raises(ValueError, match="new_A"):
        adapter.resize(None, add=1, new_A=torch.zeros(2, 6))


@pytest.mark.parametrize("opt_cls", [torch.optim.AdamW, torch.optim.SGD])
def test_optimizer_state_of_survivors_is_kept(opt_cls):
    layer, adapter = _layer()
    kwargs = {"lr": 0.1, "momentum": 0.9} if opt_cls is torch.optim.SGD else {"lr": 0.1}
    opt = opt_cls(adapter.parameters(), **kwargs)
    for _ in range(3):
        layer(torch.randn(4, 6)).pow(2).sum().backward()
        opt.step()
        opt.zero_grad()
    key = "exp_avg" if opt_cls is torch.optim.AdamW else "momentum_buffer"
    old_a = opt.state[adapter.lora_A][key].clone()
    old_b = opt.state[adapter.lora_B][key].clone()
    remaps = adapter.resize([3, 0], add=1)
    remap_optimizer(opt, remaps)
    new_a = opt.state[adapter.lora_A][key]
    assert torch.equal(new_a[:2], old_a[[3, 0]]) and torch.equal(new_a[2], torch.zeros(6))
    assert torch.equal(opt.state[adapter.lora_B][key][:, :2], old_b[:, [3, 0]])
    assert all(p is not remaps[0].old for g in opt.param_groups for p in g["params"])
    layer(torch.randn(4, 6)).pow(2).sum().backward()
    opt.step()  # the optimizer keeps working on the new parameters


def test_adapter_dtype_for_half_base_is_fp32():
    layer = rankwise.LoraLayer(nn.Linear(6, 5).to(torch.bfloat16))
    adapter = layer.add_adapter("default", 2, 4.0)
    assert adapter.lora_A.dtype == torch.float32
    y = layer(torch.randn(2, 6, dtype=torch.bfloat16))
    assert y.dtype == torch.bfloat16


def test_lora_adapter_math_matches_formula():
    adapter = LoraAdapter(6, 5, 3, 6.0, use_rslora=True)
    with torch.no_grad():
        adapter.lora_B.normal_()
    x = torch.randn(4, 6)
    s = 6.0 / 3**0.5
    assert abs(adapter.scale - s) < 1e-12
    assert torch.allclose(adapter.linear_delta(x), s * x @ adapter.lora_A.t() @ adapter.lora_B.t(), atol=1e-6)


def test_plain_mlp_trains():
    model = mlp()
    rankwise.inject(model, rankwise.LoraConfig(r=2, target_modules=["0", "2", "4"]))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    x, y = torch.randn(32, 8), torch.randn(32, 4)
    losses = []
    for _ in range(30):
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.9 * losses[0]
    assert all(not p.requires_grad for n, p in model.named_parameters() if "base_layer" in n)


def test_rank_zero_keeps_dora_magnitude_and_bias():
    layer, adapter = _layer(use_dora=True)
    with torch.no_grad():
        adapter.magnitude.mul_(1.5)
    x = torch.randn(2, 6)
    adapter.resize([])
    # W' = m * W0 / ||W0||: the magnitude still scales the rows with no low-rank part left.
    w = layer.base_layer.weight
    expected = x @ (adapter.magnitude[:, None] * w / w.norm(dim=1, keepdim=True)).t() + layer.base_layer.bias
    assert torch.allclose(layer(x), expected, atol=1e-5)
    layer2, adapter2 = _layer(bias=True)
    with torch.no_grad():
        adapter2.lora_bias.fill_(1.0)
    adapter2.resize([])
    assert torch.allclose(layer2(x), layer2.base_layer(x) + adapter2.scale, atol=1e-6)
