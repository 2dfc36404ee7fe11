"""Target selection, errors for patterns that match nothing, freezing, summaries, architectures."""

import pytest
import torch
from tiny_models import ARCHS, ids, logits, mlp

import rankwise
from rankwise.inject import select_targets


def test_all_linear_skips_heads():
    for arch, (build, _) in ARCHS.items():
        names = select_targets(build(), rankwise.LoraConfig(target_modules="all-linear"))
        assert names, arch
        assert not any(n.split(".")[-1] in ("lm_head", "classifier") for n in names), (arch, names)
    llama = select_targets(ARCHS["llama"][0](), rankwise.LoraConfig(target_modules="all-linear"))
    assert len(llama) == 2 * 7


def test_suffix_regex_and_exclusions():
    model = ARCHS["llama"][0]()
    names = select_targets(model, rankwise.LoraConfig(target_modules=["q_proj", "self_attn.v_proj"]))
    assert names == [f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "v_proj")]
    names = select_targets(model, rankwise.LoraConfig(target_modules=r".*layers\.1\.mlp\..*_proj"))
    assert names == [f"model.layers.1.mlp.{p}" for p in ("gate_proj", "up_proj", "down_proj")]
    names = select_targets(model, rankwise.LoraConfig(target_modules="all-linear", exclude_modules=["o_proj", "model.layers.0.mlp.up_proj"]))
    assert len(names) == 14 - 2 - 1 and not any("o_proj" in n for n in names)


def test_pattern_that_matches_nothing_lists_candidates():
    model = ARCHS["llama"][0]()
    with pytest.raises(ValueError, match=r"'q_prj' matches no module.*q_proj"):
        rankwise.inject(model, rankwise.LoraConfig(target_modules=["q_proj", "q_prj"]))
    with pytest.raises(ValueError, match="matches no module"):
        rankwise.inject(model, rankwise.LoraConfig(target_modules=r"transformer\.h\..*"))
    with pytest.raises(ValueError, match=r"rank_pattern key 'v_proj' matches none"):
        rankwise.inject(model, rankwise.LoraConfig(target_modules=["q_proj"], rank_pattern={"v_proj": 2}))
    with pytest.raises(ValueError, match="exclude_modules entry 'nothing'"):
        rankwise.inject(model, rankwise.LoraConfig(target_modules=["q_proj"], exclude_modules=["nothing"]))
    with pytest.raises(ValueError, match="No module"):
        rankwise.inject(model, rankwise.LoraConfig(target_modules=["q_proj"], exclude_modules=["q_proj"]))
    assert not any(isinstance(m, rankwise.LoraLayer) for m in model.modules()), "failed injections change nothing"


def test_config_validation_messages():
    with pytest.raises(ValueError, match="r=-1"):
        rankwise.LoraConfig(r=-1)
    with pytest.raises(ValueError, match="dropout=1.5"):
        rankwise.LoraConfig(dropout=1.5)
    with pytest.raises(ValueError, match="Unknown initializer 'nope'.*pissa"):
        rankwise.LoraConfig(init="nope")
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['rank'\]"):
        rankwise.LoraConfig.from_dict({"rank": 4})
    cfg = rankwise.LoraConfig(r=4, rank_pattern={"q_proj": 2})
    assert rankwise.LoraConfig.from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_freezing_summary_and_training(arch):
    build, targets = ARCHS[arch]
    model = build()
    rankwise.inject(model, rankwise.LoraConfig(r=4, target_modules="all-linear", rank_pattern={targets[0]: 2}))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".adapters.default." in n for n in trainable)
    summary = rankwise.trainable_summary(model)
    assert summary["total"] == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert summary[targets[0]] > 0 and "trainable total" in rankwise.format_summary(summary)
    assert rankwise.adapter_param_count(model) == summary["total"]
    x = ids(4, 12)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-3)
    before = {n: p.clone() for n, p in model.named_parameters() if not p.requires_grad}
    model.train()
    for _ in range(3):
        out = model(x, labels=x if arch != "bert" else torch.tensor([0, 1, 0, 1]))
        out.loss.backward()
        opt.step()
        opt.zero_grad()
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters() if n in before)


def test_second_adapter_name_collision():
    model = mlp()
    rankwise.inject(model, rankwise.LoraConfig(target_modules=["0"]))
    with pytest.raises(ValueError, match="already has an adapter named 'default'"):
        rankwise.inject(model, rankwise.LoraConfig(target_modules=["2"]))


def test_merge_and_unload_on_sequential():
    model = mlp()
    rankwise.inject(model, rankwise.LoraConfig(r=2, target_modules=["0", "2"]))
    with torch.no_grad():
        for _, layer in rankwise.lora_layers(model):
            layer.adapters["default"].lora_B.normal_()
    x = torch.randn(5, 8)
    expected = logits(model, x)
    plain = rankwise.merge_and_unload(model)
    assert not any(isinstance(m, rankwise.LoraLayer) for m in plain.modules())
    assert torch.allclose(logits(plain, x), expected, atol=1e-5)
