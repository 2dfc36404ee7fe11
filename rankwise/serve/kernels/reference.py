"""Pure-PyTorch references of the serving kernels: the specification the Triton kernels are tested against,
and the CPU engine's implementation.

Batched LoRA over a packed pool (see `rankwise/serve/lora_batch.py` for the layout). Every resident adapter
lives in one flat buffer `pool`; for one site (a fused linear such as qkv) and adapter slot s:

    A_s   = pool[offA[s] : offA[s] + R_s * K].view(R_s, K)          R_s = sum of the parts' ranks
    B_sp^T = pool[offB[p, s] : offB[p, s] + r_sp * N_p].view(r_sp, N_p)   one per output part p
    g_sp  = pool[offG[p, s] : offG[p, s] + N_p]  (DoRA: magnitude / ||W0 + s B A||_row; absent: 1)

Tokens are visited in adapter-grouped order `tok_idx`; block b covers positions [blk_start[b], blk_end[b])
of that order, all using slot blk_slot[b] (-1: no adapter, skipped). Then

    shrink:  y[i, :R_s]            = x[tok_idx[i]] @ A_s^T                           (fp32)
    expand:  out[t, cols_p]        = g_sp * (out[t, cols_p] + scale[p, s] * y[i, r0_p : r0_p + r_sp] @ B_sp^T)

where `out` holds the base output without bias (DoRA: W' x = g * (W0 x + s B A x), the bias added after).
No adapter is padded to another's rank: each reads exactly its own rows.

Paged decode attention: one query token per sequence over its cached keys/values, found through a block table.
Prefill attention: the prompts of a step back to back, each token attending causally within its own prompt.
Greedy step: the argmax of each row's logits, and the rows advanced.
"""

from __future__ import annotations

import torch


def _blocks(tok_idx, blk_start, blk_end, blk_slot):
    starts, ends, slots = blk_start.tolist(), blk_end.tolist(), blk_slot.tolist()
    for b, s in enumerate(slots):
        if s >= 0 and ends[b] > starts[b]:
            yield starts[b], ends[b], s


def lora_shrink_ref(
    x: torch.Tensor,          # (T, K) model dtype
    pool: torch.Tensor,       # (numel,) model dtype
    y: torch.Tensor,          # (N, R_cap) float32, written for positions of blocks with an adapter
    tok_idx: torch.Tensor,    # (N,) int32: token of each position, grouped by adapter
    blk_start: torch.Tensor,  # (NB,) int32
    blk_end: torch.Tensor,    # (NB,) int32
    blk_slot: torch.Tensor,   # (NB,) int32, -1 for none
    offA: torch.Tensor,       # (S,) int64 element offset of A_s in pool
    rankA: torch.Tensor,      # (S,) int64 R_s (0: the adapter has no weights at this site)
) -> None:
    K = x.shape[1]
    offs, ranks = offA.tolist(), rankA.tolist()
    for start, end, s in _blocks(tok_idx, blk_start, blk_end, blk_slot):
        R = ranks[s]
        if R == 0:
            continue
        A = pool[offs[s]: offs[s] + R * K].view(R, K)
        tokens = tok_idx[start:end].long()
        y[start:end, :R] = x[tokens].float() @ A.float().t()


def lora_expand_ref(
    y: torch.Tensor,          # (N, R_cap) float32 from the shrink
    out: torch.Tensor,        # (T, N_total) model dtype, updated in place
    pool: torch.Tensor,       # (numel,)
    tok_idx: torch.Tensor, blk_start: torch.Tensor, blk_end: torch.Tensor, blk_slot: torch.Tensor,
    part_cols: tuple[int, ...],  # (P + 1,) column boundaries of the parts in out
    offB: torch.Tensor,       # (P, S) int64
    rankB: torch.Tensor,      # (P, S) int64 r_sp
    r0: torch.Tensor,         # (P, S) int64 first row of part p in y
    scale: torch.Tensor,      # (P, S) float32
    offG: torch.Tensor,       # (P, S) int64, -1 without DoRA
) -> None:
    P = len(part_cols) - 1
    offB_l, rank_l, r0_l = offB.tolist(), rankB.tolist(), r0.tolist()
    scale_l, offG_l = scale.tolist(), offG.tolist()
    for start, end, s in _blocks(tok_idx, blk_start, blk_end, blk_slot):
        tokens = tok_idx[start:end].long()
        for p in range(P):
            r = rank_l[p][s]
            if r == 0:
                continue
            c0, c1 = part_cols[p], part_cols[p + 1]
            width = c1 - c0
            Bt = pool[offB_l[p][s]: offB_l[p][s] + r * width].view(r, width)
            lo = y[start:end, r0_l[p][s]: r0_l[p][s] + r].to(pool.dtype)
            acc = lo.float() @ Bt.float()                                  # (n, width)
            o = out[tokens, c0:c1].float() + scale_l[p][s] * acc
            if offG_l[p][s] >= 0:
                o = pool[offG_l[p][s]: offG_l[p][s] + width].float() * o
            out[tokens, c0:c1] = o.to(out.dtype)


def paged_decode_attention_ref(
    q: torch.Tensor,             # (B, H, D) one query token per row
    k_cache: torch.Tensor,       # (num_blocks, block_size, H_kv, D)
    v_cache: torch.Tensor,       # (num_blocks, block_size, H_kv, D)
    block_tables: torch.Tensor,  # (B, max_blocks) int32
    context_lens: torch.Tensor,  # (B,) int32, 0 for an empty row (its output is 0)
    scale: float,
) -> torch.Tensor:               # (B, H, D)
    H, D = q.shape[1:]
    bs, H_kv = k_cache.shape[1], k_cache.shape[2]
    out = torch.zeros_like(q)
    for b, n in enumerate(context_lens.tolist()):
        if n == 0:
            continue
        blocks = block_tables[b, : (n + bs - 1) // bs].long()
        k = k_cache[blocks].reshape(-1, H_kv, D)[:n]               # (n, H_kv, D)
        v = v_cache[blocks].reshape(-1, H_kv, D)[:n]
        k = k.repeat_interleave(H // H_kv, dim=1).transpose(0, 1)   # (H, n, D)
        v = v.repeat_interleave(H // H_kv, dim=1).transpose(0, 1)
        att = (q[b].float()[:, None, :] @ k.float().transpose(1, 2)) * scale   # (H, 1, n)
        att = torch.softmax(att, dim=-1)
        out[b] = (att @ v.float())[:, 0, :].to(q.dtype)
    return out


def prefill_attention_ref(
    q: torch.Tensor,          # (T, H, D)
    k: torch.Tensor,          # (T, H_kv, D)
    v: torch.Tensor,          # (T, H_kv, D)
    seq_start: torch.Tensor,  # (T,) int32: index of the first token of token t's prompt
    scale: float,
) -> torch.Tensor:            # (T, H, D)
    """out[t] = softmax(q[t] k[j]^T * scale over j in [seq_start[t], t]) v."""
    T, H, D = q.shape
    group = H // k.shape[1]
    j = torch.arange(T, device=q.device)
    seen = (j[None, :] >= seq_start.long()[:, None]) & (j[None, :] <= j[:, None])          # (T, T)
    kk = k.float().repeat_interleave(group, dim=1).transpose(0, 1)                          # (H, T, D)
    vv = v.float().repeat_interleave(group, dim=1).transpose(0, 1)
    att = (q.float().transpose(0, 1) @ kk.transpose(1, 2)) * scale                          # (H, T, T)
    att = torch.softmax(att.masked_fill(~seen, float("-inf")), dim=-1)
    return (att @ vv).transpose(0, 1).to(q.dtype)


def greedy_advance_ref(
    logits: torch.Tensor,     # (B, V)
    tokens: torch.Tensor,     # (B,) int64 the rows' next input tokens, updated in place
    positions: torch.Tensor,  # (B,) int64 their positions, updated in place
    active: torch.Tensor,     # (B,) bool
) -> torch.Tensor:            # (B,) int64 next tokens
    """A greedy decode step's tail: argmax of each row (first index of the maximum); active rows continue from it
    at the next position."""
    nxt = logits.argmax(dim=-1)
    tokens.copy_(torch.where(active, nxt, tokens))
    positions.add_(active.to(torch.int64))
    return nxt
