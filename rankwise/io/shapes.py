"""Make a model's adapters take the shapes stored in a state dict (before `load_state_dict` on resume).

Adaptive allocators change ranks during training, and may add rank vectors; a fresh model built from the
config has the initial shapes. `match_adapter_shapes` resizes every adapter (and creates rank vectors) so
that `model.load_state_dict(state)` then succeeds. Values are overwritten by that load, so new components
are created with zeros here.
"""

from __future__ import annotations

import torch
from torch import nn

from rankwise.model import lora_layers


def match_adapter_shapes(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Resize adapters of `model` in place to the ranks found in `state` (a model state_dict)."""
    for layer_name, layer in lora_layers(model):
        for adapter_name, adapter in layer.adapters.items():
            prefix = f"{layer_name}.adapters.{adapter_name}."
            a = state.get(prefix + "lora_A")
            if a is None:
                continue
            if prefix + "rank_vector" in state and adapter.rank_vector is None:
                adapter.enable_rank_vector(0.0)
            r = a.shape[0]
            if r < adapter.r:
                adapter.resize(list(range(r)))
            elif r > adapter.r:
                adapter.resize(None, r - adapter.r, new_A=torch.zeros(r - adapter.r, adapter.in_features,
                                                                       dtype=adapter.lora_A.dtype, device=adapter.lora_A.device))
            for buf in ("offset_A", "offset_B"):
                if prefix + buf in state and getattr(adapter, buf) is None:
                    setattr(adapter, buf, torch.zeros_like(state[prefix + buf]))
