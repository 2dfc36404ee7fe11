"""Triton kernels against the pure-PyTorch references: small sizes in the CPU interpreter (CI), real Llama-3.2-1B
sizes on a GPU (`-m gpu`)."""

import pytest
import torch

pytest.importorskip("triton")

from rankwise.serve.kernels.reference import (
    greedy_advance_ref,
    lora_expand_ref,
    lora_shrink_ref,
    paged_decode_attention_ref,
    prefill_attention_ref,
)
from rankwise.serve.lora_batch import plan_blocks
from rankwise.serve.model import _rotate_half


def _pool_case(K, parts, ranks, dora, dtype, device, seed=0):
    """A pool holding len(ranks) adapters for one site with `parts` output widths; ranks[s][p] (0 = absent)."""
    g = torch.Generator().manual_seed(seed)
    S, P = len(ranks), len(parts)
    chunks, cursor = [], 0
    offA = torch.zeros(S, dtype=torch.int64)
    rankA = torch.zeros(S, dtype=torch.int64)
    offB = torch.zeros(P, S, dtype=torch.int64)
    rankB = torch.zeros(P, S, dtype=torch.int64)
    r0 = torch.zeros(P, S, dtype=torch.int64)
    offG = torch.full((P, S), -1, dtype=torch.int64)
    scale = torch.rand(P, S, generator=g) + 0.5
    for s, rs in enumerate(ranks):
        R = sum(rs)
        offA[s], rankA[s] = cursor, R
        chunks.append(torch.randn(R * K, generator=g) / K ** 0.5)
        cursor += R * K + 64
        chunks.append(torch.zeros(64))
        row = 0
        for p, r in enumerate(rs):
            offB[p, s], rankB[p, s], r0[p, s] = cursor, r, row
            chunks.append(torch.randn(r * parts[p], generator=g))
            cursor += r * parts[p]
            row += r
            if dora and r:
                offG[p, s] = cursor
                chunks.append(torch.rand(parts[p], generator=g) + 0.5)
                cursor += parts[p]
    pool = torch.cat(chunks).to(dtype)
    assert pool.numel() == cursor
    t = lambda x: x.to(device)
    return t(pool), t(offA), t(rankA), t(offB), t(rankB), t(r0), t(scale.contiguous()), t(offG)


def _run_lora(T, K, parts, ranks, token_slots, block_t, dtype, device, dora=True, split=None, launch=None):
    """Triton against the reference on one site. launch: a LoraLaunch (its split overrides `split`)."""
    from rankwise.serve.kernels.triton_lora import LoraLaunch, lora_expand, lora_shrink, split_k

    pool, offA, rankA, offB, rankB, r0, scale, offG = _pool_case(K, parts, ranks, dora, dtype, device)
    cols = tuple([0] + list(torch.tensor(parts).cumsum(0).tolist()))
    order, st, en, sl = plan_blocks(token_slots, block_t, num_blocks=len(token_slots) + 2)
    meta = [torch.tensor(a, dtype=torch.int32, device=device) for a in (order, st, en, sl)]
    g = torch.Generator().manual_seed(1)
    x = torch.randn(T, K, generator=g).to(device, dtype)
    r_cap = max(sum(r) for r in ranks)
    launch = launch or LoraLaunch(split or split_k(K, len(st)))
    split = launch.split
    y_k = torch.zeros(split, T, r_cap, device=device)
    y_r = torch.zeros(T, r_cap, device=device)
    lora_shrink(x, pool, y_k, *meta, offA, rankA, max_rank=r_cap, split=split, block_t=block_t,
                block_r=launch.shrink_block_r)
    lora_shrink_ref(x, pool, y_r, *meta, offA, rankA)
    out0 = torch.randn(T, cols[-1], generator=g).to(device, dtype)
    out_k, out_r = out0.clone(), out0.clone()
    lora_expand(y_k, out_k, pool, *meta, cols, offB, rankB, r0, scale, offG, split=split, block_t=block_t,
                block_r=launch.expand_block_r, block_n=launch.expand_block_n)
    lora_expand_ref(y_r, out_r, pool, *meta, cols, offB, rankB, r0, scale, offG)
    used = torch.tensor([s >= 0 for s in token_slots], device=device)
    return y_k.sum(0), y_r, out_k, out_r, out0, used


@pytest.mark.parametrize("dtype,split", [(torch.float32, 1), (torch.float32, 3), (torch.bfloat16, 2)])
def test_lora_kernels_match_reference_interpreter(dtype, split):
    # qkv-like site: 3 parts of unequal width; 4 adapters with unequal and partly absent ranks; tokens interleaved
    ranks = [[4, 2, 0], [16, 8, 8], [1, 0, 3], [0, 0, 0]]
    slots = [0, 1, 1, -1, 2, 0, 1, 3, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 2]  # one adapter spans 2 blocks
    y_k, y_r, out_k, out_r, out0, used = _run_lora(len(slots), 48, (32, 16, 16), ranks, slots, 16, dtype, "cpu",
                                                   split=split)  # split: the shrink's reduction over K in parts
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    for t, s in enumerate(slots):
        if s >= 0 and sum(ranks[s]):
            pos = plan_blocks(slots, 16)[0].index(t)
            R = sum(ranks[s])
            torch.testing.assert_close(y_k[pos, :R], y_r[pos, :R], atol=tol, rtol=tol)
    torch.testing.assert_close(out_k.float(), out_r.float(), atol=tol * 10, rtol=tol)
    assert torch.equal(out_k[~used], out0[~used]), "tokens without an adapter must be left untouched"
    assert (out_r.float() - out0.float()).abs().max() > 0.1, "the adapters must change the output"


@pytest.mark.parametrize("launch", [(2, 32, 64, 16), (4, 16, 32, 32), (1, 16, 16, 16)])
def test_lora_launch_shapes_match_reference_interpreter(launch):
    # launch shapes (split, shrink rank tile, expand rank and column tiles) other than the default
    from rankwise.serve.kernels.triton_lora import LoraLaunch

    ranks = [[4, 2, 0], [16, 8, 8], [1, 0, 3], [0, 0, 0]]
    slots = [0, 1, 1, -1, 2, 0, 1, 3, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 2]
    y_k, y_r, out_k, out_r, out0, used = _run_lora(len(slots), 48, (32, 16, 16), ranks, slots, 16, torch.float32,
                                                   "cpu", launch=LoraLaunch(*launch))
    torch.testing.assert_close(out_k, out_r, atol=1e-4, rtol=1e-5)
    assert torch.equal(out_k[~used], out0[~used])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("block_n,splits", [(None, 1), (32, 1), (16, 3), (None, 4)])
def test_paged_attention_matches_reference_interpreter(dtype, block_n, splits, monkeypatch):
    # splits > 1: split-context programs and the combine kernel; (None, 4) leaves later splits with no key at all
    from rankwise.serve.kernels import triton_attention
    from rankwise.serve.kernels.triton_attention import paged_decode_attention

    monkeypatch.setitem(triton_attention.DECODE_LAUNCH, "block_n", block_n)
    monkeypatch.setitem(triton_attention.DECODE_LAUNCH, "splits", splits)

    g = torch.Generator().manual_seed(0)
    B, H, Hkv, D, bs, NB = 4, 8, 2, 16, 4, 100
    q = torch.randn(B, H, D, generator=g).to(dtype)
    k = torch.randn(NB, bs, Hkv, D, generator=g).to(dtype)
    v = torch.randn(NB, bs, Hkv, D, generator=g).to(dtype)
    tables = torch.randperm(NB - 1, generator=g)[: B * 24].add(1).view(B, 24).to(torch.int32)
    lens = torch.tensor([1, 0, 70, 93], dtype=torch.int32)  # crosses several 64-token tiles; one empty row
    out = paged_decode_attention(q, k, v, tables, lens, D ** -0.5)
    ref = paged_decode_attention_ref(q, k, v, tables, lens, D ** -0.5)
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(out.float(), ref.float(), atol=tol, rtol=tol)
    assert torch.all(out[1] == 0)


def _rope_decode_case(device, dtype, B, H, Hkv, D, bs, NB, max_ctx, seed=0):
    """Decode rows with cached tokens and one new token each: the fused rotary + cache write + attention against
    the PyTorch rotary (the model's reference path), the cache write and `paged_decode_attention_ref`."""
    from rankwise.serve.kernels.triton_attention import paged_decode_attention_rope

    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g).to(device, dtype)
    qkv, cos, sin = r(B, (H + 2 * Hkv) * D), r(max_ctx, D), r(max_ctx, D)
    k_cache, v_cache = r(NB, bs, Hkv, D), r(NB, bs, Hkv, D)
    nblk = (max_ctx + bs - 1) // bs
    tables = torch.randperm(NB - 1, generator=g)[: B * nblk].add(1).view(B, nblk).to(device, torch.int32)
    pos = torch.randint(0, max_ctx, (B,), generator=g).to(device)
    pos[0] = 0
    active = torch.ones(B, dtype=torch.bool, device=device)
    active[1] = False  # an idle row: context 0, writes to the scratch block 0
    block = tables.gather(1, (pos // bs)[:, None])[:, 0].long()
    slots = torch.where(active, block * bs + pos % bs, pos % bs)
    lens = torch.where(active, pos + 1, 0).to(torch.int32)
    kc, vc = k_cache.clone(), v_cache.clone()
    out = paged_decode_attention_rope(qkv, cos, sin, pos, active, kc, vc, tables, D ** -0.5, H)
    c, s = cos[pos][:, None], sin[pos][:, None]
    q = qkv[:, : H * D].view(B, H, D)
    k = qkv[:, H * D: (H + Hkv) * D].view(B, Hkv, D)
    q, k = q * c + _rotate_half(q) * s, k * c + _rotate_half(k) * s
    k_cache.view(-1, Hkv, D)[slots] = k
    v_cache.view(-1, Hkv, D)[slots] = qkv[:, (H + Hkv) * D:].view(B, Hkv, D)
    ref = paged_decode_attention_ref(q, k_cache, v_cache, tables, lens, D ** -0.5)
    return out, ref, (kc, vc), (k_cache, v_cache)


@pytest.mark.parametrize("block_n,splits", [(None, 1), (16, 1), (16, 3), (None, 2)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_attention_with_rope_matches_reference_interpreter(dtype, block_n, splits, monkeypatch):
    # block_n None: every context fits the first tile (loaded before the PDL wait); 16: the loop over later tiles;
    # splits > 1: the new token is added by the last split, stored by the first, merged by the combine kernel
    from rankwise.serve.kernels import triton_attention

    monkeypatch.setitem(triton_attention.DECODE_LAUNCH, "block_n", block_n)
    monkeypatch.setitem(triton_attention.DECODE_LAUNCH, "splits", splits)
    out, ref, (kc, vc), (k_ref, v_ref) = _rope_decode_case("cpu", dtype, B=4, H=8, Hkv=2, D=16, bs=4, NB=100,
                                                           max_ctx=90)
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(kc.float(), k_ref.float(), atol=tol, rtol=tol)  # the new keys / values stored
    torch.testing.assert_close(vc, v_ref, atol=0, rtol=0)
    torch.testing.assert_close(out.float(), ref.float(), atol=tol, rtol=tol)
    assert torch.all(out[1] == 0), "an idle row gives zeros"


def _prefill_case(device, dtype, lens, H, Hkv, D, pad):
    from rankwise.serve.kernels.triton_attention import prefill_attention

    g = torch.Generator().manual_seed(0)
    T = sum(lens) + pad
    q = torch.randn(T, H, D, generator=g).to(device, dtype)
    kv = torch.randn(T, 2 * Hkv * D, generator=g).to(device, dtype)  # strided rows, as views of the fused qkv
    k, v = kv[:, : Hkv * D].view(T, Hkv, D), kv[:, Hkv * D:].view(T, Hkv, D)
    starts = [s for i, n in enumerate(lens) for s in [sum(lens[:i])] * n] + list(range(sum(lens), T))
    seq_start = torch.tensor(starts, dtype=torch.int32, device=device)
    out = prefill_attention(q, k, v, seq_start, D ** -0.5)
    ref = prefill_attention_ref(q, k, v, seq_start, D ** -0.5)
    # and the reference against SDPA, prompt by prompt (what the model's CPU path runs)
    s0 = 0
    for n in lens:
        sd = torch.nn.functional.scaled_dot_product_attention(
            q[s0: s0 + n].transpose(0, 1)[None].float(), k[s0: s0 + n].transpose(0, 1)[None].float(),
            v[s0: s0 + n].transpose(0, 1)[None].float(), is_causal=True, scale=D ** -0.5, enable_gqa=True)
        torch.testing.assert_close(ref[s0: s0 + n].float(), sd[0].transpose(0, 1), atol=2e-2, rtol=2e-2)
        s0 += n
    return out, ref


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_prefill_attention_matches_reference_interpreter(dtype):
    # prompts that start mid-tile and span tiles (BLOCK 64 for D <= 64), then 3 padding tokens
    out, ref = _prefill_case("cpu", dtype, [5, 70, 1, 60], H=4, Hkv=2, D=16, pad=3)
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(out.float(), ref.float(), atol=tol, rtol=tol)


def _greedy_case(device, dtype, B, V):
    from rankwise.serve.kernels.triton_sampling import greedy_advance

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(B, V, generator=g).to(device, dtype)
    logits[0, 7] = logits[0, V - 3] = logits[0, V // 2] = 50.0  # ties in different chunks: the first wins
    logits[1, 200] = logits[1, 201] = 60.0                         # ties within a chunk
    tokens = torch.randint(0, V, (B,), generator=g).to(device)
    positions = torch.randint(0, 100, (B,), generator=g).to(device)
    active = (torch.arange(B) % 3 != 1).to(device)
    t_k, p_k, t_r, p_r = tokens.clone(), positions.clone(), tokens.clone(), positions.clone()
    nxt_k = greedy_advance(logits, t_k, p_k, active)
    nxt_r = greedy_advance_ref(logits, t_r, p_r, active)
    assert nxt_k.tolist() == nxt_r.tolist() and nxt_k[0] == 7 and nxt_k[1] == 200
    assert t_k.tolist() == t_r.tolist() and p_k.tolist() == p_r.tolist()


def test_greedy_advance_matches_reference_interpreter():
    _greedy_case("cpu", torch.float32, B=5, V=300)


def test_launchers_reject_bad_inputs():
    from rankwise.serve.kernels.triton_attention import paged_decode_attention
    from rankwise.serve.kernels.triton_lora import lora_shrink

    x = torch.randn(4, 8)
    i32 = torch.zeros(4, dtype=torch.int32)
    i64 = torch.zeros(1, dtype=torch.int64)
    with pytest.raises(ValueError, match="pool must be 1-D"):
        lora_shrink(x, torch.zeros(10, dtype=torch.bfloat16), torch.zeros(1, 4, 8), i32, i32, i32, i32, i64, i64,
                    max_rank=8, split=1)
    with pytest.raises(ValueError, match="tok_idx"):
        lora_shrink(x, torch.zeros(10), torch.zeros(1, 4, 8), i32.long(), i32, i32, i32, i64, i64, max_rank=8, split=1)
    with pytest.raises(ValueError, match=r"\(>= 2, N, >= 8\)"):
        lora_shrink(x, torch.zeros(10), torch.zeros(1, 4, 8), i32, i32, i32, i32, i64, i64, max_rank=8, split=2)
    with pytest.raises(ValueError, match="head_dim=12"):
        paged_decode_attention(torch.randn(1, 2, 12), torch.randn(3, 4, 2, 12), torch.randn(3, 4, 2, 12),
                               torch.zeros(1, 2, dtype=torch.int32), torch.ones(1, dtype=torch.int32), 1.0)


# ---- real sizes on the GPU -------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("launch", [None, (16, 32, 64, 128), (4, 16, 32, 256)])
@pytest.mark.parametrize("site", ["qkv", "gate_up", "down"])
def test_lora_kernels_real_sizes_gpu(site, launch):
    # Llama-3.2-1B: hidden 2048, kv 512, intermediate 8192; 32 decode rows of mixed adapters + a 300-token prefill
    K, parts = {"qkv": (2048, (2048, 512, 512)), "gate_up": (2048, (8192, 8192)), "down": (8192, (2048,))}[site]
    cycle = [8, 16, 32, 64]
    ranks = [[cycle[(s + p) % 4] for p in range(len(parts))] for s in range(40)]
    slots = [s % 40 for s in range(32)] + [-1] * 3 + [7] * 300
    from rankwise.serve.kernels.triton_lora import LoraLaunch

    _, _, out_k, out_r, out0, used = _run_lora(len(slots), K, parts, ranks, slots, 16, torch.bfloat16, "cuda",
                                               launch=LoraLaunch(*launch) if launch else None)
    # bf16 outputs: y is rounded to bf16 before the expand, so a 1-ulp flip of y can move an output by ~1%
    err = (out_k.float() - out_r.float()).abs()
    assert err.max() <= 0.02 * out_r.float().abs().max() and err.mean() <= 1e-3 * out_r.float().abs().max()
    assert torch.equal(out_k[~used], out0[~used])


@pytest.mark.gpu
@pytest.mark.parametrize("splits", [1, 4])
def test_paged_attention_real_sizes_gpu(splits, monkeypatch):
    from rankwise.serve.kernels import triton_attention
    from rankwise.serve.kernels.triton_attention import paged_decode_attention

    monkeypatch.setitem(triton_attention.DECODE_LAUNCH, "splits", splits)

    B, H, Hkv, D, bs, NB = 32, 32, 8, 64, 16, 2100
    q = torch.randn(B, H, D, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(NB, bs, Hkv, D, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(NB, bs, Hkv, D, device="cuda", dtype=torch.bfloat16)
    tables = (torch.randperm(NB - 1, device="cuda")[: B * 64].add(1).view(B, 64)).to(torch.int32)
    lens = torch.randint(1, 1024, (B,), device="cuda", dtype=torch.int32)
    out = paged_decode_attention(q, k, v, tables, lens, D ** -0.5)
    ref = paged_decode_attention_ref(q, k, v, tables, lens, D ** -0.5)
    torch.testing.assert_close(out.float(), ref.float(), atol=2e-2, rtol=2e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("splits", [1, 3])
def test_decode_attention_with_rope_real_sizes_gpu(splits, monkeypatch):
    from rankwise.serve.kernels import triton_attention

    monkeypatch.setitem(triton_attention.DECODE_LAUNCH, "splits", splits)
    out, ref, (kc, vc), (k_ref, v_ref) = _rope_decode_case("cuda", torch.bfloat16, B=32, H=32, Hkv=8, D=64, bs=16,
                                                           NB=2100, max_ctx=1024)
    torch.testing.assert_close(kc.float(), k_ref.float(), atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(vc, v_ref, atol=0, rtol=0)
    torch.testing.assert_close(out.float(), ref.float(), atol=2e-2, rtol=2e-2)


@pytest.mark.gpu
def test_greedy_advance_real_sizes_gpu():
    _greedy_case("cuda", torch.bfloat16, B=32, V=128256)


@pytest.mark.gpu
def test_prefill_attention_real_sizes_gpu():
    out, ref = _prefill_case("cuda", torch.bfloat16, [300, 17, 512, 1, 200], H=32, Hkv=8, D=64, pad=50)
    torch.testing.assert_close(out.float(), ref.float(), atol=2e-2, rtol=2e-2)
