"""Adapter tiers: names stay inside the adapter directory; LRU eviction, pinning, references, unload."""

import os
import shutil
import time

import pytest
import torch

from rankwise.serve.adapter_cache import AdapterCache, AdapterError, RangeAllocator
from rankwise.serve.lora_batch import LoraLayout

LAYOUT = LoraLayout.for_model(num_layers=2, hidden=32, q_out=32, kv_out=16, intermediate=48)


def _cache(root, **kw):
    opts = dict(max_gpu_adapters=2, lora_pool_mb=1.0, max_host_adapters=8, max_lora_rank=64)
    opts.update(kw)
    return AdapterCache(root, LAYOUT, torch.float32, torch.device("cpu"), **opts)


def _acquire(cache, name, timeout=20.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        slot = cache.acquire(name)
        if slot is not None:
            return slot
        time.sleep(0.002)
    return None


def test_range_allocator_first_fit_and_coalescing():
    r = RangeAllocator(64 * 10)
    a, b, c = r.allocate(64 * 3), r.allocate(64 * 3), r.allocate(64 * 4)
    assert (a, b, c) == (0, 192, 384) and r.allocate(1) is None
    r.free(a, 64 * 3)
    r.free(c, 64 * 4)
    assert r.allocate(64 * 5) is None, "two free runs of 3 and 4 are not one of 5"
    r.free(b, 64 * 3)
    assert r.free_elements == 640 and r.allocate(640) == 0


def test_names_cannot_leave_the_adapter_directory(adapter_dir, tmp_path):
    root = tmp_path / "adapters"
    shutil.copytree(adapter_dir / "qv4", root / "ok")
    shutil.copytree(adapter_dir / "qv4", tmp_path / "secret")
    os.symlink(tmp_path / "secret", root / "link")  # a link inside that points outside
    cache = _cache(root)
    assert cache.resolve("ok") == (root / "ok").resolve()
    for name in ("../secret", "ok/../../secret", str(tmp_path / "secret"), "..", ".hidden", "a/b", "", "x" * 200):
        with pytest.raises(AdapterError, match="not valid") as exc:
            cache.resolve(name)
        assert exc.value.status == 400
    with pytest.raises(AdapterError, match="not found") as exc:
        cache.resolve("link")
    assert exc.value.status == 404
    assert cache.available() == ["ok"]


def test_lru_eviction_spares_adapters_in_use_and_pinned(adapter_dir):
    cache = _cache(adapter_dir)
    s_qv4 = _acquire(cache, "qv4")
    s_rs = _acquire(cache, "rs")
    assert {s_qv4, s_rs} == {0, 1}
    assert cache.acquire("all7") is None, "both slots are held by running requests: wait"
    cache.release("qv4")
    assert _acquire(cache, "all7") == s_qv4, "the idle adapter is evicted, the one in use is not"
    assert cache.describe("qv4")["state"] == "host" and cache.stats["gpu_evictions"] == 1
    cache.release("all7")
    cache.release("rs")
    cache.load("all7", pin=True)
    assert _acquire(cache, "qv4") is not None  # evicts rs (LRU, unpinned), not the pinned all7
    cache.release("qv4")
    assert cache.describe("rs")["state"] == "host" and cache.describe("all7")["state"] == "gpu"
    assert _acquire(cache, "rs") is not None  # evicts qv4, never all7
    assert cache.describe("all7")["state"] == "gpu"


def test_tables_point_at_the_pool_copy(adapter_dir):
    from rankwise.io.peft import read_adapter_files
    from rankwise.serve.lora_batch import pack_adapter

    cache = _cache(adapter_dir, max_gpu_adapters=4)
    for name in ("qv4", "all7", "rs"):
        slot = _acquire(cache, name)
        cfg, sd = read_adapter_files(adapter_dir / name)
        packed = pack_adapter(name, cfg, sd, LAYOUT, torch.float32, 64)
        base = int(cache.tables.offA[0, 0, slot]) - int(packed.offA[0, 0]) if packed.rankA[0, 0] else None
        if base is not None:
            assert torch.equal(cache.pool[base: base + packed.numel], packed.data)
        assert torch.equal(cache.tables.rankB[..., slot], packed.rankB)


def test_host_tier_is_bounded_and_unload_frees_everything(adapter_dir):
    cache = _cache(adapter_dir, max_gpu_adapters=4, max_host_adapters=2)
    for name in ("qv4", "all7", "rs"):
        assert _acquire(cache, name) is not None
        cache.release(name)
    assert cache.stats["host_evictions"] == 1 and cache.describe("qv4")["state"] == "gpu"
    cache.unload("qv4")
    assert cache.describe("qv4")["state"] == "disk" and cache.resident_count() == 2
    _acquire(cache, "rs")
    cache.unload("rs")  # in use: dropped when released
    assert cache.describe("rs")["state"] == "gpu"
    cache.release("rs")
    assert cache.describe("rs")["state"] == "disk"
    with pytest.raises(AdapterError) as exc:
        cache.unload("nope")
    assert exc.value.status == 404


def test_pool_too_small_for_an_adapter_names_the_option(adapter_dir):
    cache = _cache(adapter_dir, lora_pool_mb=0.001)
    with pytest.raises(AdapterError, match="--lora-pool-mb"):
        _acquire(cache, "all7")
