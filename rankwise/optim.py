"""Keep optimizer state across rank changes, and LoRA+ parameter groups.

After `LoraAdapter.resize` replaced a parameter by a smaller or larger one, `remap_optimizer` puts the new
parameter in the old one's place in every param group and carries its state over: per-element tensors
(Adam's exp_avg / exp_avg_sq, SGD's momentum_buffer) keep the rows / columns of surviving components and
get zeros for new ones; scalars such as Adam's `step` are copied.
"""

from __future__ import annotations

import torch

from rankwise.layers.adapter import ParamRemap


def _remap_tensor(t: torch.Tensor, remap: ParamRemap) -> torch.Tensor:
    if t.dim() == 0 or tuple(t.shape) != tuple(remap.old.shape):
        return t
    kept = t.index_select(remap.dim, remap.keep.to(t.device))
    shape = list(t.shape)
    shape[remap.dim] = remap.added
    return torch.cat([kept, torch.zeros(shape, dtype=t.dtype, device=t.device)], dim=remap.dim)


def remap_optimizer(optimizer: torch.optim.Optimizer | None, remaps: list[ParamRemap]) -> None:
    """Swap resized parameters inside `optimizer` and carry their state over. Mutates `optimizer`."""
    if optimizer is None or not remaps:
        return
    by_old = {id(r.old): r for r in remaps}
    for group in optimizer.param_groups:
        for i, p in enumerate(group["params"]):
            remap = by_old.get(id(p))
            if remap is None:
                continue
            group["params"][i] = remap.new
            state = optimizer.state.pop(p, None)
            if state is not None:
                optimizer.state[remap.new] = {k: _remap_tensor(v, remap) if torch.is_tensor(v) else v
                                              for k, v in state.items()}
