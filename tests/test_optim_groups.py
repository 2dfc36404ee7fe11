"""LoRA+ param groups: B at lr * ratio, every trainable parameter exactly once, any optimizer, and a resize
keeps the new B in B's group with its optimizer state."""

import pytest
import torch
from tiny_models import ids, tiny_bert, tiny_llama

import rankwise
from rankwise.optim import remap_optimizer
from rankwise.optim_groups import GROUPS, add_param, loraplus_param_groups, param_group


def _bert():
    model = tiny_bert()
    rankwise.inject(model, rankwise.LoraConfig(r=4, target_modules=["query", "value"], bias=True,
                                               modules_to_save=["classifier"]))
    return model


@pytest.mark.parametrize("opt_cls", [torch.optim.AdamW, torch.optim.SGD, torch.optim.Adagrad])
def test_groups_have_the_loraplus_rates_and_cover_every_trainable_parameter_once(opt_cls):
    model = _bert()
    opt = opt_cls(loraplus_param_groups(model, lr=1e-3, ratio=16, weight_decay=0.1), lr=1e-3)
    assert [g["name"] for g in opt.param_groups] == list(GROUPS)
    names = {id(p): n for n, p in model.named_parameters()}
    by_group = {g["name"]: {names[id(p)].rsplit(".", 1)[-1] for p in g["params"]} for g in opt.param_groups}
    assert by_group["lora_A"] == {"lora_A"} and by_group["lora_B"] == {"lora_B"}
    assert by_group["lora_B_no_decay"] == {"lora_bias"}
    assert by_group["other"] == {"weight"} and by_group["other_no_decay"] == {"bias"}  # the classifier
    assert param_group(opt, "lora_B")["lr"] == pytest.approx(16e-3)
    assert param_group(opt, "lora_A")["lr"] == pytest.approx(1e-3)
    assert param_group(opt, "lora_B_no_decay")["weight_decay"] == 0.0
    assert param_group(opt, "lora_B")["weight_decay"] == 0.1
    grouped = [p for g in opt.param_groups for p in g["params"]]
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert len(grouped) == len({id(p) for p in grouped}) == len(trainable)
    model(ids()).logits.sum().backward()
    opt.step()


def test_b_moves_ratio_times_faster_under_sgd():
    model = _bert()
    a = model.bert.encoder.layer[0].attention.self.query.adapters["default"]
    with torch.no_grad():
        a.lora_B.normal_()
    opt = torch.optim.SGD(loraplus_param_groups(model, lr=1e-2, ratio=16), lr=1e-2)
    A0, B0 = a.lora_A.detach().clone(), a.lora_B.detach().clone()
    model(ids()).logits.sum().backward()
    gA, gB = a.lora_A.grad.clone(), a.lora_B.grad.clone()
    opt.step()
    assert torch.allclose(A0 - a.lora_A, 1e-2 * gA, atol=1e-7)
    assert torch.allclose(B0 - a.lora_B, 16e-2 * gB, atol=1e-6)


def test_resized_b_stays_in_its_group_with_its_state():
    model = _bert()
    opt = torch.optim.AdamW(loraplus_param_groups(model, lr=1e-3, ratio=8), lr=1e-3)
    model(ids()).logits.sum().backward()
    opt.step()
    a = model.bert.encoder.layer[1].attention.self.value.adapters["default"]
    old_state = opt.state[a.lora_B]["exp_avg"].clone()  # (out, 4)
    remap_optimizer(opt, a.resize([0, 2], add=3))
    group_b = param_group(opt, "lora_B")
    assert any(p is a.lora_B for p in group_b["params"]) and group_b["lr"] == pytest.approx(8e-3)
    assert any(p is a.lora_A for p in param_group(opt, "lora_A")["params"])
    state = opt.state[a.lora_B]["exp_avg"]
    assert state.shape == (32, 5) and torch.equal(state[:, :2], old_state[:, [0, 2]]) and not state[:, 2:].any()
    opt.zero_grad()
    model(ids()).logits.sum().backward()
    opt.step()


def test_parameters_created_later_and_embedding_rate():
    model = tiny_llama()
    rankwise.inject(model, rankwise.LoraConfig(r=4, target_modules=["embed_tokens", "q_proj"]))
    opt = torch.optim.Adam(loraplus_param_groups(model, lr=1e-3, embedding_lr=1e-6), lr=1e-3)
    emb = param_group(opt, "embedding")
    assert len(emb["params"]) == 2 and emb["lr"] == 1e-6
    q = model.model.layers[0].self_attn.q_proj.adapters["default"]
    gate = q.enable_rank_vector(1.0)
    add_param(opt, model, "model.layers.0.self_attn.q_proj.adapters.default.rank_vector", gate)
    assert any(p is gate for p in param_group(opt, "lora_B_no_decay")["params"])
    with pytest.raises(ValueError, match="already"):
        add_param(opt, model, "model.layers.0.self_attn.q_proj.adapters.default.rank_vector", gate)
    with pytest.raises(ValueError, match="ratio"):
        loraplus_param_groups(model, lr=1e-3, ratio=0)
    with pytest.raises(KeyError, match="loraplus_param_groups"):
        param_group(torch.optim.SGD(model.parameters(), lr=1.0), "lora_B")
