"""A crash mid-save never leaves a half adapter: the old one stays whole, or the new one is complete."""

import json

import pytest
import safetensors.torch
from tiny_models import ARCHS, ids, logits, randomize_adapters

import rankwise
from rankwise.io.atomic import atomic_directory, atomic_write_text


def _model(seed):
    build, _ = ARCHS["llama"]
    model = build()
    rankwise.inject(model, rankwise.LoraConfig(r=2, target_modules=["q_proj"]))
    randomize_adapters(model, seed=seed)
    return model


def test_crash_during_weights_write_keeps_previous_adapter(tmp_path, monkeypatch):
    out = tmp_path / "adapter"
    first = _model(1)
    rankwise.save_adapter(first, out)
    (out / "notes.txt").write_text("user file")
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def exploding_save(tensors, filename, metadata=None):
        with open(filename, "wb") as fh:
            fh.write(b"half a file")
        raise KeyboardInterrupt("simulated crash mid-write")

    monkeypatch.setattr("rankwise.io.peft.save_file", exploding_save)
    with pytest.raises(KeyboardInterrupt):
        rankwise.save_adapter(_model(2), out)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert not [p for p in tmp_path.iterdir() if p.name != "adapter"], "temporary files are cleaned up"
    monkeypatch.setattr("rankwise.io.peft.save_file", safetensors.torch.save_file)
    second = _model(2)
    rankwise.save_adapter(second, out)
    assert (out / "notes.txt").read_text() == "user file", "other files in the directory are kept"
    loaded = rankwise.load_adapter(ARCHS["llama"][0](), out)
    x = ids()
    assert (logits(loaded, x) - logits(second, x)).abs().max() <= 1e-6


def test_atomic_directory_and_text(tmp_path):
    target = tmp_path / "d"
    with pytest.raises(RuntimeError):
        with atomic_directory(target) as tmp:
            (tmp / "a").write_text("x")
            raise RuntimeError("boom")
    assert not target.exists()
    with atomic_directory(target) as tmp:
        (tmp / "a").write_text("x")
    assert (target / "a").read_text() == "x"
    atomic_write_text(tmp_path / "f.json", json.dumps({"k": 1}))
    assert json.loads((tmp_path / "f.json").read_text()) == {"k": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d", "f.json"]
