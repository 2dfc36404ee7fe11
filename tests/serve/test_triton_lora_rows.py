"""The row-form decode LoRA kernels against the pure-PyTorch references: small sizes in Triton's CPU interpreter
(CI), Llama-3.2-1B sizes on a GPU (`-m gpu`)."""

import pytest
import torch

pytest.importorskip("triton")

from rankwise.serve.kernels.reference import lora_expand_ref, lora_shrink_ref
from rankwise.serve.kernels.triton_lora_rows import RowLaunch, lora_expand_rows, lora_shrink_rows
from rankwise.serve.lora_batch import plan_blocks

from .test_triton_kernels import _pool_case


def _run_rows(K, parts, ranks, slots, dtype, device, launch, dora=True):
    """Row kernels and the reference (blocks of one row) on one site: (y_k, y_r, out_k, out_r, out0, used)."""
    pool, offA, rankA, offB, rankB, r0, scale, offG = _pool_case(K, parts, ranks, dora, dtype, device)
    cols = tuple([0] + list(torch.tensor(parts).cumsum(0).tolist()))
    B = len(slots)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(B, K, generator=g).to(device, dtype)
    out0 = torch.randn(B, cols[-1], generator=g).to(device, dtype)
    r_cap = max(sum(r) for r in ranks)
    row_slot = torch.tensor(slots, dtype=torch.int32, device=device)
    y_k = torch.zeros(launch.split, B, r_cap, device=device)
    out_k = out0.clone()
    lora_shrink_rows(x, pool, y_k, row_slot, offA, rankA, max_rank=r_cap, launch=launch)
    lora_expand_rows(y_k, out_k, pool, row_slot, cols, offB, rankB, r0, scale, offG, launch=launch)
    # the reference over blocks of one row each, in row order
    order, st, en, sl = plan_blocks(slots, 1)
    meta = [torch.tensor(a, dtype=torch.int32, device=device) for a in (order, st, en, sl)]
    y_grouped = torch.zeros(B, r_cap, device=device)
    out_r = out0.clone()
    lora_shrink_ref(x, pool, y_grouped, *meta, offA, rankA)
    lora_expand_ref(y_grouped, out_r, pool, *meta, cols, offB, rankB, r0, scale, offG)
    y_r = torch.zeros(B, r_cap, device=device)
    y_r[torch.tensor(order[: len(st)], device=device).long()] = y_grouped[: len(st)]
    used = torch.tensor([s >= 0 for s in slots], device=device)
    return y_k.sum(0), y_r, out_k, out_r, out0, used


RANKS = [[4, 2, 0], [16, 8, 8], [1, 0, 3], [0, 0, 0], [5, 7, 2]]
SLOTS = [0, 1, 1, -1, 2, 0, 3, 4, -1, 1]  # repeated, absent (-1) and empty (all ranks 0) adapters


@pytest.mark.parametrize("launch", [RowLaunch(1, 16, 64, 16, 16), RowLaunch(3, 8, 16, 4, 32),
                                    RowLaunch(2, 32, 32, 64, 16), RowLaunch()])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_row_kernels_match_reference_interpreter(launch, dtype):
    y_k, y_r, out_k, out_r, out0, used = _run_rows(48, (32, 16, 16), RANKS, SLOTS, dtype, "cpu", launch)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    for b, s in enumerate(SLOTS):
        if s >= 0:
            R = sum(RANKS[s])
            torch.testing.assert_close(y_k[b, :R], y_r[b, :R], atol=tol, rtol=tol)
    torch.testing.assert_close(out_k.float(), out_r.float(), atol=tol * 10, rtol=tol)
    assert torch.equal(out_k[~used], out0[~used]), "rows without an adapter must be left untouched"
    assert torch.equal(out_k[6], out0[6]), "an adapter with no weights at this site changes nothing"
    assert (out_r.float() - out0.float()).abs().max() > 0.1, "the adapters must change the output"


def test_row_kernels_one_part_site_interpreter():
    ranks = [[3], [9], [0]]
    slots = [2, 0, 1, 1, -1]
    _, _, out_k, out_r, out0, used = _run_rows(40, (24,), ranks, slots, torch.float32, "cpu", RowLaunch(2, 8, 16, 4, 8),
                                               dora=False)
    torch.testing.assert_close(out_k, out_r, atol=1e-4, rtol=1e-5)
    assert torch.equal(out_k[~used], out0[~used])


def test_row_launchers_reject_bad_inputs():
    x = torch.randn(4, 8)
    i64 = torch.zeros(1, dtype=torch.int64)
    slots = torch.zeros(4, dtype=torch.int32)
    with pytest.raises(ValueError, match="row_slot must be a \\(4,\\) int32"):
        lora_shrink_rows(x, torch.zeros(10), torch.zeros(1, 4, 8), slots.long(), i64, i64, max_rank=8,
                         launch=RowLaunch(1))
    with pytest.raises(ValueError, match=r"\(>= 2, >= 4, >= 8\)"):
        lora_shrink_rows(x, torch.zeros(10), torch.zeros(1, 4, 8), slots, i64, i64, max_rank=8, launch=RowLaunch(2))
    with pytest.raises(ValueError, match="pool must be 1-D"):
        lora_shrink_rows(x, torch.zeros(10, dtype=torch.bfloat16), torch.zeros(1, 4, 8), slots, i64, i64, max_rank=8,
                         launch=RowLaunch(1))
    with pytest.raises(ValueError, match="part_cols"):
        lora_expand_rows(torch.zeros(1, 4, 8), x, torch.zeros(10), slots, (0, 5), i64[None], i64[None], i64[None],
                         torch.zeros(1, 1), i64[None], launch=RowLaunch(1))


@pytest.mark.gpu
@pytest.mark.parametrize("launch", [None, RowLaunch(8, 8, 256, 32, 512), RowLaunch(2, 32, 512, 64, 128)])
@pytest.mark.parametrize("site", ["qkv", "o", "gate_up", "down"])
def test_row_kernels_real_sizes_gpu(site, launch):
    # Llama-3.2-1B: hidden 2048, kv 512, intermediate 8192; 32 decode rows of mixed adapters, 3 without
    from rankwise.serve.kernels.triton_lora_rows import default_row_launch

    K, parts = {"qkv": (2048, (2048, 512, 512)), "o": (2048, (2048,)), "gate_up": (2048, (8192, 8192)),
                "down": (8192, (2048,))}[site]
    cycle = [8, 16, 32, 64]
    ranks = [[cycle[(s + p) % 4] for p in range(len(parts))] for s in range(40)]
    slots = [(7 * b) % 40 for b in range(29)] + [-1] * 3
    launch = launch or default_row_launch(K)
    _, _, out_k, out_r, out0, used = _run_rows(K, parts, ranks, slots, torch.bfloat16, "cuda", launch)
    err = (out_k.float() - out_r.float()).abs()  # bf16: a 1-ulp flip of the rounded y moves an output by ~1%
    assert err.max() <= 0.02 * out_r.float().abs().max() and err.mean() <= 1e-3 * out_r.float().abs().max()
    assert torch.equal(out_k[~used], out0[~used])
