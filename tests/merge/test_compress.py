"""Compression to a smaller rank: the energy criterion on known spectra, truncated-SVD optimality, PEFT loads."""

import json

import pytest
import torch
from safetensors.torch import load_file
from tiny_models import ids, logits, mlp, randomize_adapters, tiny_llama

import rankwise
from rankwise.layers.scaling import lora_scale
from rankwise.merge import compress_adapter, compress_adapter_dir, energy_rank, lowrank_svd
from rankwise.model import adapter_modules

peft = pytest.importorskip("peft")

SPECTRUM = [4.0, 2.0, 1.0, 0.5]  # squares 16, 4, 1, 0.25: cumulative shares .753, .941, .988, 1


def _llama_adapter(**kw):
    model = tiny_llama()
    rankwise.inject(model, rankwise.LoraConfig(
        r=4, alpha=8, target_modules=["q_proj", "v_proj", "up_proj", "down_proj"],
        rank_pattern={"up_proj": 6, "layers.1.self_attn.q_proj": 2}, alpha_pattern={"v_proj": 3.0}, **kw))
    randomize_adapters(model, seed=7, scale=0.2)
    return model


def _deltas(model, name="default"):
    with torch.no_grad():
        return {n: a.delta_weight().double() for n, _, a in adapter_modules(model, name)}


def _truncated(d, k):
    U, S, Vh = torch.linalg.svd(d, full_matrices=False)
    return U[:, :k] @ torch.diag(S[:k]) @ Vh[:k]


def _peft_logits(path, x):
    return logits(peft.PeftModel.from_pretrained(tiny_llama(), path).eval(), x)


@pytest.mark.parametrize("energy, k", [(0.5, 1), (0.75, 1), (0.9, 2), (0.98, 3), (0.99, 4), (1.0, 4)])
def test_energy_rank_on_known_spectrum(energy, k):
    assert energy_rank(torch.tensor(SPECTRUM), energy) == k
    assert energy_rank(torch.zeros(3), energy) == 0


def test_energy_criterion_on_constructed_delta():
    """dW = U diag(4, 2, 1, .5) V^T stored as a rank-6 factorisation that hides the spectrum."""
    model = mlp()
    rankwise.inject(model, rankwise.LoraConfig(r=6, alpha=3, target_modules=["2"]))
    g = torch.Generator().manual_seed(0)
    U = torch.linalg.qr(torch.randn(32, 4, generator=g, dtype=torch.float64))[0]
    V = torch.linalg.qr(torch.randn(32, 4, generator=g, dtype=torch.float64))[0]
    G = torch.randn(4, 6, generator=g, dtype=torch.float64)  # B A = U G G^+ S V^T = U S V^T
    delta = U @ torch.diag(torch.tensor(SPECTRUM, dtype=torch.float64)) @ V.T
    adapter = model[2].adapters["default"]
    with torch.no_grad():
        adapter.lora_B.copy_(U @ G / adapter.scale)
        adapter.lora_A.copy_(torch.linalg.pinv(G) @ torch.diag(torch.tensor(SPECTRUM, dtype=torch.float64)) @ V.T)
    torch.testing.assert_close(adapter.delta_weight().double(), delta, atol=1e-5, rtol=1e-5)
    _, S, _ = lowrank_svd(adapter.lora_A, adapter.lora_B * adapter.scale)
    torch.testing.assert_close(S[:4], torch.tensor(SPECTRUM, dtype=torch.float64), atol=1e-5, rtol=1e-5)
    assert compress_adapter(model, energy=0.9) == {"2": 2}
    torch.testing.assert_close(adapter.delta_weight().double(), _truncated(delta, 2), atol=1e-5, rtol=1e-5)
    assert adapter.alpha == pytest.approx(3.0) and adapter.scale == pytest.approx(lora_scale(3.0, 2, False))
    assert compress_adapter(model, energy=0.99) == {"2": 2}, "compression never grows a rank"
    assert compress_adapter(model, energy=0.7) == {"2": 1}


def test_fixed_rank_equals_truncated_svd_of_dense_delta(tmp_path):
    model = _llama_adapter()
    before = _deltas(model)
    old = rankwise.rank_map(model)
    x = ids()
    ranks = compress_adapter(model, rank=3)
    assert ranks == {n: min(3, r) for n, r in old.items()}
    after = _deltas(model)
    for n, d in before.items():
        torch.testing.assert_close(after[n], _truncated(d, ranks[n]), atol=1e-6, rtol=1e-5)
        assert rankwise.rank_map(model)[n] == ranks[n]
    assert any(r > 3 for r in old.values()) and any(r < 3 for r in old.values())
    rankwise.save_adapter(model, tmp_path / "c")
    assert (logits(model, x) - _peft_logits(tmp_path / "c", x)).abs().max().item() <= 1e-5


@pytest.mark.parametrize("variant", [{}, {"use_rslora": True}, {"use_dora": True}])
def test_directory_compression_matches_in_place_and_loads_in_peft(tmp_path, variant):
    model = _llama_adapter(**variant)
    with torch.no_grad():  # a zero delta: the energy criterion gives it rank 0 (DoRA keeps rank 1)
        model.get_submodule("model.layers.0.mlp.down_proj").adapters["default"].lora_B.zero_()
    rankwise.save_adapter(model, tmp_path / "src")
    ranks_dir = compress_adapter_dir(tmp_path / "src", tmp_path / "dst", rank=3, energy=0.9)
    ranks_model = compress_adapter(model, rank=3, energy=0.9)
    dora = bool(variant.get("use_dora"))
    assert ranks_dir == ranks_model and ranks_dir["model.layers.0.mlp.down_proj"] == (1 if dora else 0)
    assert len(set(ranks_dir.values()) - {0}) >= 2
    cfg = json.loads((tmp_path / "dst" / "adapter_config.json").read_text())
    src_cfg = json.loads((tmp_path / "src" / "adapter_config.json").read_text())
    assert (cfg["lora_alpha"], cfg["alpha_pattern"]) == (src_cfg["lora_alpha"], src_cfg["alpha_pattern"])
    sd = load_file(tmp_path / "dst" / "adapter_model.safetensors")
    assert ("model.layers.0.mlp.down_proj" in (cfg.get("exclude_modules") or [])) != dora
    assert any("layers.0.mlp.down_proj" in k for k in sd) == dora
    x = ids()
    ours = logits(model, x)
    assert (ours - _peft_logits(tmp_path / "dst", x)).abs().max().item() <= 1e-5
    back = rankwise.load_adapter(tiny_llama(), tmp_path / "dst")
    assert (logits(back, x) - ours).abs().max().item() <= 1e-5
    meta = json.loads((tmp_path / "dst" / "rankwise.json").read_text())
    assert meta["ranks"] == ranks_dir
    assert all(kept >= 0.9 or ranks_dir[n] == 3 for n, kept in meta["kept_energy"].items()), "3 caps, else 0.9"


def test_dora_magnitude_and_bias_are_kept():
    for kw in ({"use_dora": True}, {"bias": True}):
        model = _llama_adapter(**kw)
        params = {n: (a.magnitude, a.lora_bias) for n, _, a in adapter_modules(model, "default")}
        kept = {n: [None if p is None else p.detach().clone() for p in ps] for n, ps in params.items()}
        compress_adapter(model, rank=1)
        for n, _, a in adapter_modules(model, "default"):
            for old, new in zip(kept[n], (a.magnitude, a.lora_bias)):
                assert (old is None) == (new is None) and (old is None or torch.equal(old, new))


def test_rank_vector_gets_singular_values_and_truncation_is_folded():
    model = _llama_adapter()
    layer = model.get_submodule("model.layers.0.mlp.up_proj")
    adapter = layer.adapters["default"]
    adapter.enable_rank_vector(torch.linspace(0.5, 1.5, 6))
    adapter.truncate = 5  # a DyLoRA truncation: the function uses 5 of 6 components
    with torch.no_grad():
        delta = adapter.delta_weight().double()
    compress_adapter(model, rank=2)
    assert adapter.truncate is None and adapter.r == 2
    S = torch.linalg.svdvals(delta)[:2]
    torch.testing.assert_close(adapter.rank_vector.double() * adapter.scale, S, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(adapter.delta_weight().double(), _truncated(delta, 2), atol=1e-6, rtol=1e-5)


def test_errors_name_the_value_and_the_fix(tmp_path):
    model = _llama_adapter()
    with pytest.raises(ValueError, match="Give rank=<int>"):
        compress_adapter(model)
    with pytest.raises(ValueError, match="energy=1.5"):
        compress_adapter(model, energy=1.5)
    with pytest.raises(ValueError, match="rank=0.*delete_adapter"):
        compress_adapter(model, rank=0)
    with pytest.raises(KeyError, match="'other'"):
        compress_adapter(model, "other", rank=2)
    rankwise.merge(model)
    with pytest.raises(ValueError, match="unmerge"):
        compress_adapter(model, rank=2)
    with pytest.raises(FileNotFoundError, match="local path"):
        compress_adapter_dir(tmp_path / "missing", tmp_path / "out", rank=2)
