"""Shard the frozen base weights with FSDP2 (`torch.distributed.fsdp.fully_shard`); adapters stay replicated.

Design: FSDP shards only parameters that never change shape. Every frozen base parameter belongs to an
FSDP unit (each transformer block, then the root for embeddings, final norm and head): between uses it is
stored as a 1/N shard (a DTensor) and all-gathered for the block's forward and again for its backward.
Every trainable parameter (LoRA A / B, rank vectors, DoRA magnitudes, modules_to_save) is passed to
`fully_shard(..., ignored_params=...)`: it stays a plain replicated tensor, and DDP, wrapped on top by
`ParallelModel`, averages its gradients. So when an allocator replaces adapter parameters, no shard has to
be rebuilt: FSDP never saw them, and only the small DDP wrapper is rebuilt. Memory per GPU is then about
base / N + all adapters and their optimizer state, which for LoRA is a few percent of the base.

Because the frozen base weights never get gradients, FSDP has nothing to reduce-scatter; its traffic is
the all-gathers of the blocks' weights (forward, and backward again since activations need W^T).

Outside a block's forward a base weight is a shard, so code that reads full base weights (GoRA's and
Sensitivity's `prepare`, `merge`) must run before `shard_frozen_base` or after gathering the weights.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn


def is_sharded(model: nn.Module) -> bool:
    """True when some parameter of `model` is a DTensor (FSDP2 has sharded it)."""
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())


def _block_classes(model: nn.Module, blocks: Iterable[str] | None) -> set[str]:
    if blocks:
        return set(blocks)
    found: set[str] = set()
    for module in model.modules():
        found.update(getattr(module, "_no_split_modules", None) or [])
    if not found:
        containers = sorted({type(c).__name__ for m in model.modules() if isinstance(m, nn.ModuleList) for c in m})
        raise ValueError(
            f"{type(model).__name__} does not name its transformer blocks (transformers models list them in "
            f"`_no_split_modules`); pass fsdp_blocks=[class names] to shard by, e.g. one of {containers[:6]}."
        )
    return found


def shard_frozen_base(
    model: nn.Module,
    *,
    device: torch.device,
    world_size: int,
    blocks: Iterable[str] | None = None,
    param_dtype: torch.dtype | None = None,
    reshard_after_forward: bool = True,
) -> list[str]:
    """Apply FSDP2 to every block of `model` and to the root, ignoring trainable parameters. Mutates `model`
    (its class becomes FSDP<Class>; frozen parameters become DTensor shards on `device`).

    blocks: class names of the sharding units (default: the model's `_no_split_modules`).
    param_dtype: all-gather and compute the base weights in this dtype (e.g. torch.bfloat16 for an fp32
        checkpoint); None keeps their stored dtype.
    Returns the names of the sharded blocks.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    if is_sharded(model):
        raise ValueError(f"{type(model).__name__} is already sharded; call shard_frozen_base once per model.")
    mesh = init_device_mesh(device.type, (world_size,))
    trainable = {p for p in model.parameters() if p.requires_grad}
    policy = MixedPrecisionPolicy(param_dtype=param_dtype, cast_forward_inputs=False)
    wanted = _block_classes(model, blocks)
    units = [(n, m) for n, m in model.named_modules() if n and type(m).__name__ in wanted]
    if not units:
        raise ValueError(
            f"No module of {type(model).__name__} has a class in fsdp_blocks={sorted(wanted)}; pass the class "
            "name of its transformer block (e.g. 'LlamaDecoderLayer')."
        )
    for name, unit in sorted(units, key=lambda nm: -nm[0].count(".")):  # inner units before outer ones
        fully_shard(unit, mesh=mesh, reshard_after_forward=reshard_after_forward, mp_policy=policy,
                    ignored_params=trainable)
    # The root's weights (embeddings, head) are needed again as soon as backward starts: keep them gathered.
    fully_shard(model, mesh=mesh, reshard_after_forward=False, mp_policy=policy, ignored_params=trainable)
    _move_replicated(model, device)
    return [n for n, _ in units]


def _move_replicated(model: nn.Module, device: torch.device) -> None:
    """FSDP moves what it manages to `device`; move the ignored (trainable) parameters and the buffers too,
    in place, so optimizers built on them before sharding keep working. Meta tensors stay: a model built on
    the meta device is materialised afterwards with `model.to_empty(device=...)` and initialised."""
    from torch.distributed.tensor import DTensor

    with torch.no_grad():
        for p in model.parameters():
            if not isinstance(p, DTensor) and not p.is_meta and p.device != device:
                p.data = p.data.to(device)
        for module in model.modules():
            for key, buf in module._buffers.items():
                if buf is not None and not isinstance(buf, DTensor) and not buf.is_meta and buf.device != device:
                    module._buffers[key] = buf.to(device)
