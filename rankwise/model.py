"""Model-level operations over every `LoraLayer`: choose, disable, merge, unload, delete adapters.

rankwise injects into the user's own model object (no wrapper class), so a transformers model stays a
transformers model for `Trainer`, `generate` and `save_pretrained`; these functions act on all layers.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch import nn

from rankwise.inject import CONFIG_ATTR, _set_submodule
from rankwise.layers.adapter import LoraAdapter
from rankwise.layers.lora import LoraLayer


def lora_layers(model: nn.Module) -> Iterator[tuple[str, LoraLayer]]:
    """(dotted name, layer) for every adapted module, in model order."""
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer):
            yield name, module


def adapter_modules(model: nn.Module, adapter_name: str = "default") -> Iterator[tuple[str, LoraLayer, LoraAdapter]]:
    """(name, layer, adapter) for every layer that holds adapter `adapter_name`."""
    for name, layer in lora_layers(model):
        if adapter_name in layer.adapters:
            yield name, layer, layer.adapters[adapter_name]


def adapter_names(model: nn.Module) -> list[str]:
    return list(getattr(model, CONFIG_ATTR, {}))


def _require(model: nn.Module, name: str) -> None:
    if name not in adapter_names(model):
        raise KeyError(f"The model has no adapter {name!r}; it has {adapter_names(model)}.")


def set_adapter(model: nn.Module, name: str) -> None:
    """Make `name` the active adapter everywhere (layers without it run their base module only)."""
    _require(model, name)
    for _, layer in lora_layers(model):
        layer.active_adapter = name if name in layer.adapters else None


@contextlib.contextmanager
def disable_adapters(model: nn.Module) -> Iterator[None]:
    """Run the plain base model inside the block."""
    layers = [layer for _, layer in lora_layers(model)]
    if any(layer.merged for layer in layers):
        raise RuntimeError("Adapters are merged into the base weights; call unmerge(model) before disabling them.")
    previous = [layer.disabled for layer in layers]
    for layer in layers:
        layer.disabled = True
    try:
        yield
    finally:
        for layer, was in zip(layers, previous):
            layer.disabled = was


def delete_adapter(model: nn.Module, name: str) -> None:
    _require(model, name)
    for _, layer in lora_layers(model):
        if name in layer.adapters:
            layer.delete_adapter(name)
    del getattr(model, CONFIG_ATTR)[name]


def merge(model: nn.Module, name: str | None = None, *, safe: bool = True) -> None:
    """Fold adapter `name` (default: each layer's active one) into the base weights. Mutates `model`.

    With `safe`, every merged weight is checked for NaN/Inf first and nothing is written if one is found."""
    if name is not None:
        _require(model, name)
    todo = []
    for layer_name, layer in lora_layers(model):
        target = name or layer.active_adapter
        if target is not None and target in layer.adapters and target not in layer.merged:
            todo.append((layer_name, layer, target))
    if safe:  # check every layer before changing any, so a bad one leaves the whole model untouched
        bad = [layer_name for layer_name, layer, target in todo if not layer.merge_is_finite(target)]
        if bad:
            raise ValueError(
                f"Merging would put NaN/Inf into the base weights of {bad[:5]}{' ...' if len(bad) > 5 else ''}; "
                "nothing was changed. Check the adapter's weights (training may have diverged)."
            )
    for _, layer, target in todo:
        layer.merge(target, safe=False)


def unmerge(model: nn.Module) -> None:
    for _, layer in lora_layers(model):
        layer.unmerge()


def unload(model: nn.Module, *, merge_first: bool = False, name: str | None = None) -> nn.Module:
    """Replace every LoraLayer by its base module (merging adapter `name` first when asked). Mutates and
    returns `model`."""
    if merge_first:
        merge(model, name)
    for layer_name, layer in list(lora_layers(model)):
        _set_submodule(model, layer_name, layer.base_layer)
    if hasattr(model, CONFIG_ATTR):
        delattr(model, CONFIG_ATTR)
    return model


def merge_and_unload(model: nn.Module, name: str | None = None) -> nn.Module:
    """Plain modules with the adapter folded in: what you deploy when only one adapter is needed."""
    return unload(model, merge_first=True, name=name)


def rank_map(model: nn.Module, adapter_name: str = "default") -> dict[str, int]:
    """{module name: current rank}."""
    return {name: adapter.r for name, _, adapter in adapter_modules(model, adapter_name)}


def adapter_param_count(model: nn.Module, adapter_name: str = "default") -> int:
    """The budget measure: sum over modules of r_i * (in_i + out_i) (rank vectors and DoRA not included)."""
    return sum(a.r * a.params_per_rank for _, _, a in adapter_modules(model, adapter_name))
