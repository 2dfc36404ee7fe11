"""Greedy next tokens of a decode batch, and the rows advanced, in two small kernels (GPU path of a greedy step).

Specification: `greedy_advance_ref` in `reference.py`:

    nxt[b] = argmax_v logits[b, v]   (the first index of the maximum, as torch.argmax)
    tokens[b] = nxt[b] if active[b] else tokens[b];   positions[b] += active[b]

torch.argmax over a (32, 128256) batch reduces each row in one thread block (32 blocks for the whole GPU: 34 us on
an H100 against 3 us of bandwidth); here the vocabulary is split into chunks (B x 64 programs), each writing its
maximum and the first index where it occurs, and one program per row picks the first chunk holding the row's
maximum. The advance (4 small PyTorch kernels before) is done by that same program.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from rankwise.serve.kernels import pdl


@triton.jit
def _argmax_chunks_kernel(
    logits_ptr,   # (B, V)
    val_ptr,      # (B, NCH) float32 chunk maxima
    idx_ptr,      # (B, NCH) int32 first index of each chunk's maximum
    V, stride_l,
    CHUNK: tl.constexpr, NCH: tl.constexpr, PDL: tl.constexpr,
):
    if PDL:  # pdl.py
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    b = tl.program_id(0)
    c = tl.program_id(1)
    offs = c * CHUNK + tl.arange(0, CHUNK)
    x = tl.load(logits_ptr + b.to(tl.int64) * stride_l + offs, mask=offs < V, other=float("-inf")).to(tl.float32)
    best = tl.argmax(x, 0, tie_break_left=True)
    tl.store(val_ptr + b * NCH + c, tl.max(x, 0))
    tl.store(idx_ptr + b * NCH + c, c * CHUNK + best)


@triton.jit
def _argmax_finish_kernel(
    val_ptr,      # (B, NCH) float32
    idx_ptr,      # (B, NCH) int32
    out_ptr,      # (B,) int64 next tokens
    tok_ptr,      # (B,) int64 the rows' next input tokens, advanced in place
    pos_ptr,      # (B,) int64 their positions, advanced in place
    active_ptr,   # (B,) bool
    NCH: tl.constexpr, PDL: tl.constexpr,
):
    if PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    b = tl.program_id(0)
    offs = tl.arange(0, NCH)
    vals = tl.load(val_ptr + b * NCH + offs)
    idx = tl.load(idx_ptr + b * NCH + offs)
    first = tl.argmax(vals, 0, tie_break_left=True)  # the first chunk holding the maximum
    nxt = tl.sum(tl.where(offs == first, idx, 0), 0).to(tl.int64)
    tl.store(out_ptr + b, nxt)
    active = tl.load(active_ptr + b) != 0
    tl.store(tok_ptr + b, tl.where(active, nxt, tl.load(tok_ptr + b)))
    tl.store(pos_ptr + b, tl.load(pos_ptr + b) + active.to(tl.int64))


def greedy_advance(logits: torch.Tensor, tokens: torch.Tensor, positions: torch.Tensor,
                   active: torch.Tensor) -> torch.Tensor:
    """logits: (B, V) with contiguous rows; tokens, positions: (B,) int64, updated in place; active: (B,) bool
    -> next tokens (B,) int64. See `greedy_advance_ref`."""
    B, V = logits.shape
    if logits.stride(1) != 1:
        raise ValueError(f"logits must have contiguous rows, got strides {logits.stride()}.")
    for name, t, dt in (("tokens", tokens, torch.int64), ("positions", positions, torch.int64),
                        ("active", active, torch.bool)):
        if t.shape != (B,) or t.dtype != dt or t.stride(0) != 1:
            raise ValueError(f"{name} must be a contiguous ({B},) {dt} tensor, got {tuple(t.shape)} {t.dtype}.")
    chunk = max(128, triton.next_power_of_2(triton.cdiv(V, 64)))
    nch = max(2, triton.next_power_of_2(triton.cdiv(V, chunk)))
    vals = torch.empty((B, nch), dtype=torch.float32, device=logits.device)
    idx = torch.empty((B, nch), dtype=torch.int32, device=logits.device)
    out = torch.empty(B, dtype=torch.int64, device=logits.device)
    if B:
        _argmax_chunks_kernel[(B, nch)](logits, vals, idx, V, logits.stride(0), CHUNK=chunk, NCH=nch,
                                         **pdl.launch_options(logits))
        _argmax_finish_kernel[(B,)](vals, idx, out, tokens, positions, active, NCH=nch, **pdl.launch_options(logits))
    return out
