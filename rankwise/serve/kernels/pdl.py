"""Programmatic dependent launch (PDL, Hopper and later) for the decode step's Triton kernels.

A kernel launched with PDL may start while the kernel before it in the stream is still running; it must call
`gdc_wait()` (griddepcontrol.wait: the previous grid has completed and its writes are visible) before it reads
anything that kernel may have written, and every program must reach that wait, also one that has nothing to do,
so that "this kernel completed" still implies "every kernel before it completed". Before the wait a kernel may
only read what no kernel of the step writes (block tables, adapter offsets, the LoRA pool, rotary tables). The
gain is the launch and the metadata loads of a small kernel hidden behind the tail of the one before; a step of
~130 kernels of a few microseconds each is where that matters.

`ENABLED` (RANKWISE_PDL=0 turns it off) is read at every launch, so a process can compare both; captured CUDA
graphs keep what they were captured with. Off in Triton's CPU interpreter and below compute capability 9.0.
"""

from __future__ import annotations

import os

import torch

ENABLED = os.environ.get("RANKWISE_PDL", "1") != "0"
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
_CAPABLE: dict[int, bool] = {}


def capable(t: torch.Tensor) -> bool:
    """Whether t lives on a GPU of compute capability 9.0 or later, outside Triton's CPU interpreter."""
    if _INTERPRET or not t.is_cuda:
        return False
    dev = t.device.index if t.device.index is not None else torch.cuda.current_device()
    if dev not in _CAPABLE:
        _CAPABLE[dev] = torch.cuda.get_device_capability(dev)[0] >= 9
    return _CAPABLE[dev]


def active(t: torch.Tensor) -> bool:
    """Whether kernels on t's device launch with PDL now."""
    return ENABLED and capable(t)


def launch_options(t: torch.Tensor) -> dict:
    """Keyword arguments for a Triton launch: the PDL constexpr of the kernel and Triton's launch_pdl option."""
    on = active(t)
    return {"PDL": on, "launch_pdl": True} if on else {"PDL": False}
