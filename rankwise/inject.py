"""Put adapters into any PyTorch model: pick target modules, wrap them, freeze the rest, explain misses.

Targets are chosen by name suffix (a list), by one regex matched against the full dotted name (a string),
or by "all-linear" (every Linear / Conv1D except the output head and classifier). Unlike PEFT, a target,
exclusion, rank_pattern or alpha_pattern entry that matches nothing is an error listing close candidates.
"""

from __future__ import annotations

import difflib
import re
from collections import OrderedDict

from torch import nn

from rankwise.config import LoraConfig
from rankwise.init.registry import get_initializer
from rankwise.layers.base_kinds import is_supported, kind_of
from rankwise.layers.lora import LoraLayer

# Leaf names of output heads that "all-linear" leaves alone (PEFT excludes the output embedding only).
HEAD_NAMES = ("lm_head", "classifier", "score", "qa_outputs", "cls")

CONFIG_ATTR = "rankwise_configs"


def _candidate_names(model: nn.Module) -> list[str]:
    """Dotted names of the model's modules, seen through existing LoraLayers (their insides hidden)."""
    names = []
    for name, module in model.named_modules():
        if not name or ".adapters" in f".{name}" or name.endswith(".base_layer") or ".base_layer." in name:
            continue
        names.append(name)
    return names


def _close(key: str, names: list[str]) -> list[str]:
    leaves = sorted({n.rsplit(".", 1)[-1] for n in names})
    close = difflib.get_close_matches(key.rsplit(".", 1)[-1], leaves, n=5, cutoff=0.5)
    close += difflib.get_close_matches(key, names, n=3, cutoff=0.6)
    return close or leaves[:12]


def _matches(spec: list[str] | str, name: str) -> bool:
    if isinstance(spec, str):
        return re.fullmatch(spec, name) is not None
    return any(name == key or name.endswith("." + key) for key in spec)


def _head_modules(model: nn.Module) -> set[int]:
    ids = set()
    get_out = getattr(model, "get_output_embeddings", None)
    if callable(get_out):
        try:
            out = get_out()
        except (NotImplementedError, AttributeError):
            out = None
        if out is not None:
            ids.add(id(out))
    return ids


def _is_linear_body(module: nn.Module, name: str, heads: set[int]) -> bool:
    """For "all-linear": a Linear / Conv1D that is not the output head or a classifier."""
    base = module.base_layer if isinstance(module, LoraLayer) else module
    if not is_supported(base) or kind_of(base).name == "embedding":
        return False
    if id(base) in heads or any(part in HEAD_NAMES for part in name.split(".")):
        return False
    return True


def select_targets(model: nn.Module, config: LoraConfig) -> list[str]:
    """Names of the modules `config` targets, in model order. Raises on patterns that match nothing."""
    names = _candidate_names(model)
    modules = dict(model.named_modules())
    if config.target_modules == "all-linear":
        heads = _head_modules(model)
        chosen = [n for n in names if _is_linear_body(modules[n], n, heads)]
    else:
        spec = config.target_modules
        keys = [spec] if isinstance(spec, str) else list(spec)
        for key in keys:
            if not any(_matches(key if isinstance(spec, str) else [key], n) for n in names):
                raise ValueError(
                    f"target_modules entry {key!r} matches no module of {type(model).__name__}. "
                    f"Close candidates: {_close(key, names)}. Names are matched as suffixes of the dotted "
                    "module name (a list) or as a full-name regex (a string)."
                )
        chosen = [n for n in names if _matches(spec, n)]
    if config.exclude_modules:
        excl = config.exclude_modules
        for key in [excl] if isinstance(excl, str) else excl:
            if not any(_matches(key if isinstance(excl, str) else [key], n) for n in chosen):
                raise ValueError(
                    f"exclude_modules entry {key!r} matches none of the targeted modules. "
                    f"Close candidates: {_close(key, chosen)}."
                )
        chosen = [n for n in chosen if not _matches(excl, n)]
    if not chosen:
        raise ValueError(
            f"No module of {type(model).__name__} was selected by target_modules={config.target_modules!r} "
            f"and exclude_modules={config.exclude_modules!r}. Candidates: {_close('proj', names)}."
        )
    for field_name, pattern in (("rank_pattern", config.rank_pattern), ("alpha_pattern", config.alpha_pattern)):
        for key in pattern:
            if not any(re.match(rf"(.*\.)?({key})$", n) for n in chosen):
                raise ValueError(
                    f"{field_name} key {key!r} matches none of the targeted modules; it would be ignored. "
                    f"Targeted modules include: {chosen[:6]}."
                )
    return chosen


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def inject(model: nn.Module, config: LoraConfig, adapter_name: str = "default") -> nn.Module:
    """Add adapter `adapter_name` to `model` in place and return the model.

    Wraps every targeted module in a `LoraLayer` (or adds to an existing one), initialises it, freezes all
    base parameters and unfreezes the adapter and `config.modules_to_save`.
    """
    configs: OrderedDict = getattr(model, CONFIG_ATTR, None) or OrderedDict()
    if adapter_name in configs:
        raise ValueError(f"The model already has an adapter named {adapter_name!r}; choose another name.")
    targets = select_targets(model, config)
    init_fn = get_initializer(config.init)
    for name in targets:
        module = model.get_submodule(name)
        if not isinstance(module, LoraLayer):
            module = LoraLayer(module, name)
            _set_submodule(model, name, module)
        adapter = module.add_adapter(
            adapter_name,
            config.rank_for(name),
            config.alpha_for(name),
            use_rslora=config.use_rslora,
            dropout=config.dropout,
            bias=config.bias,
            use_dora=config.use_dora,
        )
        if adapter.r > 0:
            init_fn(module, adapter, **config.init_kwargs)
        if adapter.use_dora:  # m from the (possibly moved) base weight, so the model is unchanged at step 0
            adapter.magnitude.data.copy_(
                (module.weight_out_in().to(adapter.lora_A.dtype) + adapter.delta_weight().detach()).norm(dim=1)
            )
    configs[adapter_name] = config
    setattr(model, CONFIG_ATTR, configs)
    freeze_base(model)
    return model


def freeze_base(model: nn.Module) -> None:
    """requires_grad only for adapter parameters and modules_to_save of every adapter. Mutates `model`."""
    save = set()
    for config in getattr(model, CONFIG_ATTR, {}).values():
        save.update(config.modules_to_save or [])
    for name, param in model.named_parameters():
        in_adapter = ".adapters." in f".{name}"
        in_saved = any(_matches([key], name.rsplit(".", 1)[0]) or f".{key}." in f".{name}" for key in save)
        param.requires_grad_(in_adapter or in_saved)


def trainable_summary(model: nn.Module) -> dict[str, int]:
    """Trainable parameters by module type (leaf name of the wrapped module) and in total."""
    by_type: dict[str, int] = {}
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer):
            leaf = name.rsplit(".", 1)[-1]
            n = sum(p.numel() for p in module.adapters.parameters() if p.requires_grad)
            by_type[leaf] = by_type.get(leaf, 0) + n
    adapter_total = sum(by_type.values())
    total = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if total > adapter_total:
        by_type["modules_to_save"] = total - adapter_total
    by_type["total"] = total
    by_type["all_params"] = sum(p.numel() for p in model.parameters())
    return by_type


def format_summary(summary: dict[str, int]) -> str:
    rows = [f"{k:<20} {v:>14,}" for k, v in summary.items() if k not in ("total", "all_params")]
    pct = 100.0 * summary["total"] / max(summary["all_params"], 1)
    rows.append(f"{'trainable total':<20} {summary['total']:>14,}  ({pct:.3f}% of {summary['all_params']:,})")
    return "\n".join(rows)
