"""Model-level merge / unmerge / merge_and_unload (rankwise/model.py, rankwise/layers/lora.py), and PEFT parity."""

import pytest
import torch
from tiny_models import ids, logits, mlp, randomize_adapters, tiny_gpt2, tiny_llama

import rankwise
from rankwise.inject import CONFIG_ATTR

CASES = {
    "linear": (mlp, dict(target_modules=["0", "2", "4"], rank_pattern={"2": 6})),
    "linear_bias": (mlp, dict(target_modules=["0", "2", "4"], bias=True)),
    "conv1d": (tiny_gpt2, dict(target_modules=["c_attn", "c_proj", "c_fc"], use_rslora=True,
                               rank_pattern={"c_fc": 2})),
    "conv1d_bias": (tiny_gpt2, dict(target_modules=["c_attn", "c_fc"], bias=True)),
    "conv1d_dora": (tiny_gpt2, dict(target_modules=["c_attn", "c_proj"], use_dora=True)),
    "embedding": (tiny_llama, dict(target_modules=["embed_tokens", "q_proj"])),
    "dora": (tiny_llama, dict(target_modules=["q_proj", "v_proj", "down_proj"], use_dora=True,
                              rank_pattern={"v_proj": 2}, alpha_pattern={"down_proj": 3.0})),
}


def _inputs(build):
    return torch.randn(3, 8, generator=torch.Generator().manual_seed(0)) if build is mlp else ids()


def _build(case):
    build, kw = CASES[case]
    model = build()
    rankwise.inject(model, rankwise.LoraConfig(r=4, alpha=8, **kw))
    randomize_adapters(model, seed=11, scale=0.2)
    return model, _inputs(build)


def _base_params(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if ".adapters." not in n}


def _max_diff(a, b):
    return max((a[n] - b[n]).abs().max().item() for n in a)


@pytest.mark.parametrize("case", sorted(CASES))
def test_merge_unmerge_restores_weights_and_keeps_outputs(case):
    model, x = _build(case)
    before = _base_params(model)
    out = logits(model, x)
    rankwise.merge(model)
    assert all(layer.merged == ["default"] for _, layer in rankwise.lora_layers(model))
    assert _max_diff(before, _base_params(model)) > 1e-3, "merging must change the base weights"
    assert (logits(model, x) - out).abs().max().item() <= 1e-5
    rankwise.merge(model)  # merging a merged adapter again is a no-op, not a double add
    assert (logits(model, x) - out).abs().max().item() <= 1e-5
    rankwise.unmerge(model)
    assert not any(layer.merged for _, layer in rankwise.lora_layers(model))
    assert _max_diff(before, _base_params(model)) <= 1e-6
    assert (logits(model, x) - out).abs().max().item() <= 1e-6


@pytest.mark.parametrize("case", sorted(CASES))
def test_merge_and_unload_gives_plain_modules_with_same_outputs(case):
    model, x = _build(case)
    out = logits(model, x)
    plain = rankwise.merge_and_unload(model)
    assert not any(isinstance(m, rankwise.LoraLayer) for m in plain.modules())
    assert not any(".adapters." in n or "base_layer" in n for n, _ in plain.named_parameters())
    assert not hasattr(plain, CONFIG_ATTR)
    assert (logits(plain, x) - out).abs().max().item() <= 1e-5
    fresh = CASES[case][0]()  # same seed: the original base weights
    assert (logits(fresh, x) - out).abs().max().item() > 1e-3, "the adapter must change the outputs"


def _poison(model, which: int, value: float):
    layers = [layer for _, layer in rankwise.lora_layers(model)]
    with torch.no_grad():
        layers[which].adapters["default"].lora_B[0, 0] = value


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_safe_merge_refuses_nan_inf_and_leaves_the_layer_untouched(value):
    model, _ = _build("linear")
    _poison(model, 0, value)
    before = _base_params(model)
    with pytest.raises(ValueError, match="NaN/Inf"):
        rankwise.merge(model, safe=True)
    after = _base_params(model)
    assert all(torch.equal(before[n], after[n]) for n in before)
    assert not any(layer.merged for _, layer in rankwise.lora_layers(model))
    rankwise.merge(model, safe=False)  # what the check prevents
    assert not torch.isfinite(model[0].base_layer.weight).all()


def test_safe_merge_leaves_the_whole_model_untouched_when_a_later_layer_is_bad():
    model, _ = _build("linear")
    _poison(model, -1, float("nan"))
    before = _base_params(model)
    with pytest.raises(ValueError, match="NaN/Inf"):
        rankwise.merge(model, safe=True)
    after = _base_params(model)
    assert all(torch.equal(before[n], after[n]) for n in before)


@pytest.mark.parametrize("variant", ["lora", "rslora", "dora"])
def test_merged_weights_equal_peft_merge_and_unload(tmp_path, variant):
    peft = pytest.importorskip("peft")
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj"]
    if variant == "lora":
        targets.append("embed_tokens")
    model = tiny_llama()
    rankwise.inject(model, rankwise.LoraConfig(
        r=4, alpha=8, target_modules=targets, rank_pattern={"layers.1.self_attn.q_proj": 2, "up_proj": 6},
        alpha_pattern={"v_proj": 3.0}, use_rslora=variant == "rslora", use_dora=variant == "dora"))
    randomize_adapters(model, seed=5, scale=0.2)
    rankwise.save_adapter(model, tmp_path / "a")
    theirs = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / "a").merge_and_unload()
    ours = rankwise.merge_and_unload(model)
    sd_ours, sd_theirs, sd_base = ours.state_dict(), theirs.state_dict(), tiny_llama().state_dict()
    assert sd_ours.keys() == sd_theirs.keys()
    assert max((sd_ours[k] - sd_theirs[k]).abs().max().item() for k in sd_ours) <= 1e-5
    changed = [k for k in sd_ours if (sd_ours[k] - sd_base[k]).abs().max().item() > 1e-3]
    assert len(changed) == 2 * len(targets) - (1 if variant == "lora" else 0), changed  # 2 layers, 1 embedding
    x = ids()
    assert (logits(ours, x) - logits(theirs, x)).abs().max().item() <= 1e-5
