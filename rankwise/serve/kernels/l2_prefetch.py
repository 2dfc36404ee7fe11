"""L2 prefetch of the next weight matrix from inside a decode step's latency-bound kernels (Hopper and later).

A batch-32 decode step streams ~2.5 GB of weights through skinny GEMMs, but between them run kernels that read
little and wait much (the decode attention reads its keys and values at ~1.2 TB/s, the residual-add + RMSNorm
kernels read 128 KB): while they run, HBM is idle. Here such a kernel asks the copy engine to bring the *next*
GEMM's weights into L2 (`cp.async.bulk.prefetch.L2.global`: fire and forget, no registers, no wait), so that GEMM
reads part of its weights from L2:

    decode attention of layer i   -> o_proj weights of layer i
    add + RMSNorm before the MLP  -> the first `LIMIT_MB` of gate/up of layer i
    add + RMSNorm after the MLP   -> qkv of layer i + 1 (the LM head's first `LIMIT_MB` after the last layer)

A prefetch never changes a result: it only moves bytes into the cache. `ENABLED` (RANKWISE_L2_PREFETCH=1 turns it
on) is read at every launch, so a process can compare both; captured CUDA graphs keep what they were captured with.
Off in Triton's CPU interpreter (no inline PTX there) and below compute capability 9.0.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from rankwise.serve.kernels import pdl

ENABLED = os.environ.get("RANKWISE_L2_PREFETCH", "0") == "1"
LIMIT_MB = float(os.environ.get("RANKWISE_L2_PREFETCH_MB", "16"))  # at most this much per prefetch
THREADS = 128  # pieces per program: one per thread of a 4-warp program


def active(t: torch.Tensor) -> bool:
    """Whether kernels on t's device prefetch now."""
    return ENABLED and pdl.capable(t)


def target(weight: torch.Tensor | None) -> tuple[torch.Tensor | None, int]:
    """(tensor, bytes to prefetch) for a launcher: the first min(size, LIMIT_MB) of `weight`; (None, 0) when off."""
    if weight is None or not active(weight) or not weight.is_contiguous():
        return None, 0
    nbytes = min(weight.numel() * weight.element_size(), int(LIMIT_MB * 2 ** 20))
    return weight, nbytes // 16 * 16


@triton.jit
def prefetch_l2(ptr, nbytes, part, parts, NT: tl.constexpr):
    """Program `part` of `parts` asks for its share of bytes [0, nbytes) of ptr's buffer to be brought into L2, NT
    threads one piece each (pieces are multiples of 16 bytes, as the instruction requires). Returns at once."""
    chunk = tl.cdiv(tl.cdiv(nbytes, parts), NT * 16) * (NT * 16)                     # bytes of this program
    piece = chunk // NT
    offs = part.to(tl.int64) * chunk + tl.arange(0, NT).to(tl.int64) * piece         # (NT,)
    size = tl.minimum(tl.maximum(nbytes - offs, 0), piece).to(tl.int32)
    base = ptr.to(tl.pointer_type(tl.int8))
    tl.inline_asm_elementwise(
        "{ .reg .pred p; setp.gt.s32 p, $2, 0; @p cp.async.bulk.prefetch.L2.global [$1], $2; mov.u32 $0, 0; }",
        "=r,l,r", [base + offs, size], dtype=tl.int32, is_pure=False, pack=1)


def launch_args(weight: torch.Tensor | None, like: torch.Tensor) -> dict:
    """Keyword arguments of a kernel with the (pf_ptr, pf_bytes, PREFETCH) parameters."""
    t, nbytes = target(weight)
    if t is None:
        return {"pf_ptr": like, "pf_bytes": 0, "PREFETCH": False}
    return {"pf_ptr": t, "pf_bytes": nbytes, "PREFETCH": True}

