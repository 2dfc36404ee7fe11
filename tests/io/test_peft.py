"""PEFT-format parity in both directions on tiny Llama, GPT-2 and BERT models with unequal ranks."""

import json

import pytest
import torch
from safetensors.torch import load_file
from tiny_models import ARCHS, ids, logits, randomize_adapters

import rankwise

peft = pytest.importorskip("peft")

VARIANTS = {
    "lora": {},
    "rslora": {"use_rslora": True},
    "dora": {"use_dora": True},
    "bias": {"bias": True},
}


def _rankwise_config(arch: str, **kw) -> rankwise.LoraConfig:
    targets = ARCHS[arch][1]
    first = {"llama": "q_proj", "gpt2": "c_attn", "bert": "query"}[arch]
    return rankwise.LoraConfig(
        r=4, alpha=8, target_modules=targets,
        rank_pattern={f"layers.1.self_attn.{first}" if arch == "llama" else rf"1\..*{first}": 2, "k_proj" if arch == "llama" else targets[-1]: 6},
        alpha_pattern={targets[-1]: 3.0},
        **kw,
    )


@pytest.mark.parametrize("arch", sorted(ARCHS))
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_rankwise_save_loads_in_peft(tmp_path, arch, variant):
    build, _ = ARCHS[arch]
    model = build()
    rankwise.inject(model, _rankwise_config(arch, **VARIANTS[variant]))
    randomize_adapters(model, seed=3)
    x = ids()
    ours = logits(model, x)
    rankwise.save_adapter(model, tmp_path / "a")
    cfg = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["rank_pattern"], cfg
    ranks = {t.shape[0] for k, t in load_file(tmp_path / "a" / "adapter_model.safetensors").items() if k.endswith("lora_A.weight")}
    assert len(ranks) >= 2, "the test must cover unequal ranks"
    theirs_model = peft.PeftModel.from_pretrained(build(), tmp_path / "a").eval()
    theirs = logits(theirs_model, x)
    assert (ours - theirs).abs().max().item() <= 1e-5
    with rankwise.disable_adapters(model):
        base = logits(model, x)
    assert (ours - base).abs().max().item() > 1e-3, "the adapter must change the output"


@pytest.mark.parametrize("arch", sorted(ARCHS))
@pytest.mark.parametrize("variant", ["lora", "rslora", "dora"])
def test_peft_save_loads_in_rankwise(tmp_path, arch, variant):
    build, targets = ARCHS[arch]
    first = targets[0]
    pcfg = peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=targets, rank_pattern={first: 2, targets[-1]: 6},
        alpha_pattern={targets[1]: 5}, use_rslora=variant == "rslora", use_dora=variant == "dora",
        init_lora_weights=False,
    )
    pm = peft.get_peft_model(build(), pcfg).eval()
    x = ids()
    theirs = logits(pm, x)
    pm.save_pretrained(tmp_path / "p")
    model = rankwise.load_adapter(build(), tmp_path / "p")
    ours = logits(model, x)
    assert (ours - theirs).abs().max().item() <= 1e-5
    assert rankwise.rank_map(model)  # adapters present
    assert len(set(rankwise.rank_map(model).values())) >= 2


def test_embedding_adapter_round_trip(tmp_path):
    build, _ = ARCHS["llama"]
    model = build()
    rankwise.inject(model, rankwise.LoraConfig(r=4, alpha=8, target_modules=["embed_tokens", "q_proj"]))
    randomize_adapters(model, seed=5)
    x = ids()
    ours = logits(model, x)
    rankwise.save_adapter(model, tmp_path / "e")
    theirs = logits(peft.PeftModel.from_pretrained(build(), tmp_path / "e").eval(), x)
    assert (ours - theirs).abs().max().item() <= 1e-5
    back = logits(rankwise.load_adapter(build(), tmp_path / "e"), x)
    assert (ours - back).abs().max().item() <= 1e-6


def test_modules_to_save_classifier_round_trip(tmp_path):
    build, _ = ARCHS["bert"]
    model = build()
    rankwise.inject(model, rankwise.LoraConfig(r=4, target_modules=["query", "value"], modules_to_save=["classifier"]))
    assert model.classifier.weight.requires_grad
    randomize_adapters(model, seed=2)
    with torch.no_grad():
        model.classifier.weight.add_(1.0)
    x = ids()
    ours = logits(model, x)
    rankwise.save_adapter(model, tmp_path / "c", task_type="SEQ_CLS")
    theirs = logits(peft.PeftModel.from_pretrained(build(), tmp_path / "c").eval(), x)
    assert (ours - theirs).abs().max().item() <= 1e-5
    back = logits(rankwise.load_adapter(build(), tmp_path / "c"), x)
    assert (ours - back).abs().max().item() <= 1e-6


def test_rank_zero_modules_left_out_and_peft_agrees(tmp_path):
    build, targets = ARCHS["llama"]
    model = build()
    rankwise.inject(model, rankwise.LoraConfig(r=4, target_modules=targets, rank_pattern={"layers.0.mlp.up_proj": 0, "v_proj": 0}))
    randomize_adapters(model, seed=1)
    x = ids()
    ours = logits(model, x)
    rankwise.save_adapter(model, tmp_path / "z")
    sd = load_file(tmp_path / "z" / "adapter_model.safetensors")
    assert not any("v_proj" in k or "layers.0.mlp.up_proj" in k for k in sd)
    cfg = json.loads((tmp_path / "z" / "adapter_config.json").read_text())
    assert "model.layers.0.mlp.up_proj" in cfg["exclude_modules"]
    pm = peft.PeftModel.from_pretrained(build(), tmp_path / "z").eval()
    assert (logits(pm, x) - ours).abs().max().item() <= 1e-5


def test_wrong_base_names_module_and_shapes(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    build, _ = ARCHS["llama"]
    model = build()
    rankwise.inject(model, rankwise.LoraConfig(r=4, target_modules=["q_proj"]))
    rankwise.save_adapter(model, tmp_path / "w")
    other = LlamaForCausalLM(LlamaConfig(vocab_size=96, hidden_size=48, intermediate_size=48, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2))
    with pytest.raises(ValueError, match=r"model.layers.0.self_attn.q_proj.*\(4, 32\).*\(4, 48\)"):
        rankwise.load_adapter(other, tmp_path / "w")
    assert not any(isinstance(m, rankwise.LoraLayer) for m in other.modules()), "a failed load changes nothing"
    shallow = LlamaForCausalLM(LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                           num_attention_heads=4, num_key_value_heads=2))
    with pytest.raises(ValueError, match="model.layers.1.self_attn.q_proj"):
        rankwise.load_adapter(shallow, tmp_path / "w")


def test_legacy_bin_loads_with_weights_only(tmp_path):
    build, _ = ARCHS["llama"]
    model = build()
    rankwise.inject(model, rankwise.LoraConfig(r=2, target_modules=["q_proj"]))
    randomize_adapters(model)
    rankwise.save_adapter(model, tmp_path / "b")
    sd = load_file(tmp_path / "b" / "adapter_model.safetensors")
    (tmp_path / "b" / "adapter_model.safetensors").unlink()
    torch.save(sd, tmp_path / "b" / "adapter_model.bin")
    x = ids()
    back = rankwise.load_adapter(build(), tmp_path / "b")
    assert (logits(back, x) - logits(model, x)).abs().max().item() <= 1e-6


def test_missing_dir_error_says_pass_local_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="local path"):
        rankwise.load_adapter(ARCHS["llama"][0](), tmp_path / "nope")
