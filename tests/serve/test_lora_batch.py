"""Packing PEFT adapters into the pool layout, grouping tokens into blocks, and the batched reference math."""

import pytest
import torch
from tiny_models import tiny_llama

from rankwise.io.peft import read_adapter_files
from rankwise.serve.lora_batch import (
    LoraLayout,
    LoraTables,
    apply_lora,
    build_lora_step,
    dense_delta,
    pack_adapter,
    plan_blocks,
)

peft = pytest.importorskip("peft")

LAYOUT = LoraLayout.for_model(num_layers=2, hidden=32, q_out=32, kv_out=16, intermediate=48)
SITE_OF = {"q_proj": (0, 0), "k_proj": (0, 1), "v_proj": (0, 2), "o_proj": (1, 0), "gate_proj": (2, 0),
           "up_proj": (2, 1), "down_proj": (3, 0)}


def _pack(adapter_dir, name, **kw):
    cfg, sd = read_adapter_files(adapter_dir / name)
    return pack_adapter(name, cfg, sd, LAYOUT, torch.float32, 64, **kw)


@pytest.mark.parametrize("name", ["qv4", "all7", "rs"])
def test_packed_deltas_equal_peft_delta_weights(adapter_dir, name):
    packed = _pack(adapter_dir, name)
    pm = peft.PeftModel.from_pretrained(tiny_llama(), adapter_dir / name)
    seen = 0
    for mod_name, module in pm.named_modules():
        if not hasattr(module, "get_delta_weight") or "default" not in getattr(module, "lora_A", {}):
            continue
        layer = int(mod_name.split("layers.")[1].split(".")[0])
        site, part = SITE_OF[mod_name.rsplit(".", 1)[-1]]
        ours = dense_delta(packed, LAYOUT, layer, site)[part]
        torch.testing.assert_close(ours, module.get_delta_weight("default").float(), atol=1e-6, rtol=1e-5)
        seen += 1
    assert seen == len(packed.ranks) > 0
    if name != "qv4":
        assert len(set(packed.ranks.values())) >= 2, "the case must cover unequal ranks within one adapter"


def test_plan_blocks_groups_by_slot_and_splits_long_runs():
    slots = [2, -1, 0, 2, 0, 2, 2, 2, -1]
    order, starts, ends, blk = plan_blocks(slots, block_t=2, num_blocks=6)
    assert sorted(order) == list(range(len(slots)))
    assert [slots[t] for t in order] == [0, 0, 2, 2, 2, 2, 2, -1, -1]
    assert list(zip(starts, ends, blk)) == [(0, 2, 0), (2, 4, 2), (4, 6, 2), (6, 7, 2), (0, 0, -1), (0, 0, -1)]
    with pytest.raises(ValueError, match="do not fit"):
        plan_blocks(slots, block_t=1, num_blocks=3)


def test_mixed_batch_reference_equals_per_token_dense_math(adapter_dir):
    names = ["qv4", "all7", "rs"]
    packs = [_pack(adapter_dir, n) for n in names]
    pool = torch.zeros(sum(p.numel for p in packs) + 64)
    tables = LoraTables(LAYOUT, num_slots=4, device=torch.device("cpu"))
    base = 0
    for slot, p in enumerate(packs):
        pool[base: base + p.numel] = p.data
        tables.install(slot, p, base)
        base += p.numel
    token_slots = [1, 0, -1, 2, 1, 1, 0, 2]
    g = torch.Generator().manual_seed(0)
    for site in range(4):
        x = torch.randn(len(token_slots), LAYOUT.site_in[site], generator=g)
        out = torch.randn(len(token_slots), LAYOUT.part_cols[site][-1], generator=g)
        expected = out.clone()
        for t, s in enumerate(token_slots):
            if s < 0:
                continue
            cols = LAYOUT.part_cols[site]
            for p, delta in enumerate(dense_delta(packs[s], LAYOUT, 1, site)):
                if delta is not None:
                    expected[t, cols[p]: cols[p + 1]] += delta @ x[t]
        step = build_lora_step(token_slots, block_t=2, r_cap=3 * 64, device=torch.device("cpu"))
        apply_lora(site, 1, x, out, step, tables, pool, LAYOUT, 64, "reference")
        torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_pack_rejects_what_cannot_be_served(adapter_dir):
    cfg, sd = read_adapter_files(adapter_dir / "all7")
    with pytest.raises(ValueError, match="--max-lora-rank 16"):
        pack_adapter("all7", cfg, sd, LAYOUT, torch.float32, max_rank=8)
    with pytest.raises(ValueError, match="peft_type 'IA3'"):
        pack_adapter("x", {**cfg, "peft_type": "IA3"}, sd, LAYOUT, torch.float32, 64)
    bad = dict(sd)
    bad["base_model.model.lm_head.weight"] = torch.zeros(96, 32)
    with pytest.raises(ValueError, match="modules_to_save"):
        pack_adapter("x", cfg, bad, LAYOUT, torch.float32, 64)
    wrong = LoraLayout.for_model(num_layers=2, hidden=64, q_out=64, kv_out=32, intermediate=96)
    with pytest.raises(ValueError, match="another base model"):
        pack_adapter("x", cfg, sd, wrong, torch.float32, 64)
    cfg_d, sd_d = read_adapter_files(adapter_dir / "dora")
    with pytest.raises(ValueError, match="needs the base weights"):
        pack_adapter("dora", cfg_d, sd_d, LAYOUT, torch.float32, 64)


def test_heterogeneous_ranks_take_only_their_own_bytes(adapter_dir):
    small, big = _pack(adapter_dir, "qv4"), _pack(adapter_dir, "all7")
    # qv4: rank 4 on q (32x32 in, 32 out) and v (16 out) in 2 layers; no padding to all7's rank 16
    expected = 2 * (8 * 32 + 4 * 32 + 4 * 16)
    assert expected <= small.numel <= expected + 2 * 3 * 64
    assert big.numel > 3 * small.numel
