"""Host-to-device copies that never make the host wait for queued device work.

A copy from pageable host memory may synchronise with the stream (the driver stages it), which would stall the
engine's pipeline (the host prepares step n + 1 while the device runs step n). Going through pinned memory keeps
the copy asynchronous; PyTorch's pinned-memory allocator keeps the staging buffer alive until the copy is done.
"""

from __future__ import annotations

import torch


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """`t` (on the host) on `device`, asynchronously on CUDA."""
    device = torch.device(device)
    if device.type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)
