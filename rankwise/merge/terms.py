"""An adapter as plain per-module low-rank terms, read from a model or a PEFT directory, and put back.

Combining and compressing work on one representation, `ExportedModule` (rankwise/io/peft.py):

    dW = s * B @ A      A: (r, in), B: (out, r), s a number; plus an optional bias b (out,) whose effective
                        value is s * b, and an optional DoRA magnitude m (out,)

`model_terms` reads it from a named adapter on a model (rank vectors and a DyLoRA truncation folded in, as
the exporter does), `dir_terms` from an adapter directory written by PEFT or rankwise, `install_adapter`
creates a new named adapter on a model from such terms, and `terms_state_dict` writes them as PEFT keys.
"""

from __future__ import annotations

import re
from collections import Counter, OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from rankwise.config import LoraConfig, match_pattern
from rankwise.inject import CONFIG_ATTR, _set_submodule
from rankwise.io.peft import PREFIX, ExportedModule, parse_state_dict, read_adapter_files
from rankwise.layers.base_kinds import kind_of, weight_out_in
from rankwise.layers.lora import LoraLayer
from rankwise.layers.scaling import alpha_from_scale, lora_scale
from rankwise.model import adapter_modules, adapter_names


@dataclass
class AdapterTerms:
    """One adapter as {module name: plain term}. `alphas` holds each module's alpha under `use_rslora`."""

    source: str  # adapter name or directory, for error messages
    modules: dict[str, ExportedModule]
    alphas: dict[str, float]
    use_rslora: bool
    modules_to_save: list[str] | None = None
    peft_config: dict[str, Any] = field(default_factory=dict)  # the directory's adapter_config.json
    other: dict[str, torch.Tensor] = field(default_factory=dict)  # non-LoRA tensors, keys as in the file

    @property
    def use_dora(self) -> bool:
        return any(m.magnitude is not None for m in self.modules.values())

    @property
    def has_bias(self) -> bool:
        return any(m.bias is not None for m in self.modules.values())


def model_terms(model: nn.Module, adapter_name: str) -> AdapterTerms:
    """The plain terms of adapter `adapter_name` on `model`, as deltas relative to the current base weights.

    Refuses merged adapters (the base weight then holds the delta already) and adapters whose initialiser
    moved the base weight (PiSSA, LoRA-GA, CorDA): their delta relative to the original weights exists only
    in the exported file."""
    if adapter_name not in adapter_names(model):
        raise KeyError(f"The model has no adapter {adapter_name!r}; it has {adapter_names(model)}.")
    config: LoraConfig = getattr(model, CONFIG_ATTR)[adapter_name]
    modules: dict[str, ExportedModule] = {}
    alphas: dict[str, float] = {}
    for name, layer, adapter in adapter_modules(model, adapter_name):
        if layer.merged:
            raise ValueError(
                f"{name}: adapter(s) {layer.merged} are merged into the base weight, so deltas cannot be read "
                "against it; call rankwise.unmerge(model) first."
            )
        if adapter.offset_A is not None:
            raise ValueError(
                f"{name}: adapter {adapter_name!r} was initialised by moving the base weight (PiSSA, LoRA-GA, "
                "CorDA). Save it with rankwise.save_adapter (which writes it as a plain LoRA on the original "
                "weights) and use the directory functions on a fresh base model instead."
            )
        with torch.no_grad():
            A, B, s = adapter.effective_factors()  # A: (r, in), B: (out, r)
        if A.shape[0] == 0:
            continue
        bias = adapter.lora_bias.detach() if adapter.lora_bias is not None else None
        mag = adapter.magnitude.detach() if adapter.magnitude is not None else None
        modules[name] = ExportedModule(name, layer.kind.name, A.detach(), B.detach(), s, bias, mag)
        alphas[name] = alpha_from_scale(s, A.shape[0], adapter.use_rslora)
    return AdapterTerms(adapter_name, modules, alphas, config.use_rslora, config.modules_to_save)


def dir_terms(path: str | Path) -> AdapterTerms:
    """The plain terms of a PEFT-format adapter directory (peft_type LORA), read without a model."""
    cfg, sd = read_adapter_files(path)
    peft_type = cfg.get("peft_type", "LORA")
    if peft_type != "LORA":
        raise ValueError(
            f"{path}: peft_type {peft_type!r} is not supported; rankwise reads peft_type LORA. "
            "Convert it in PEFT first (e.g. AdaLoRA adapters: export as LoRA)."
        )
    parts_by_module, other = parse_state_dict(sd)
    use_rslora = bool(cfg.get("use_rslora", False))
    use_dora = bool(cfg.get("use_dora", False))
    alpha_default = float(cfg.get("lora_alpha", 8))
    alpha_pattern = cfg.get("alpha_pattern") or {}
    emb = ".lora_embedding_A"
    embeddings = {k.removeprefix(PREFIX).removesuffix(emb) for k in sd if k.endswith(emb)}
    modules: dict[str, ExportedModule] = {}
    alphas: dict[str, float] = {}
    for name, parts in parts_by_module.items():
        if "A" not in parts or "B" not in parts:
            raise ValueError(f"Adapter module {name!r} lacks lora_A or lora_B in {path}; the file is incomplete.")
        A, B = parts["A"], parts["B"]  # (r, in), (out, r)
        if A.shape[0] != B.shape[1]:
            raise ValueError(f"{path}: module {name!r} has lora_A {tuple(A.shape)} and lora_B {tuple(B.shape)}, "
                             "whose ranks differ; the file is corrupt.")
        alpha = float(match_pattern(alpha_pattern, name, alpha_default))
        mag = parts.get("magnitude") if use_dora else None
        kind = "embedding" if name in embeddings else "linear"
        modules[name] = ExportedModule(name, kind, A, B, lora_scale(alpha, A.shape[0], use_rslora),
                                       parts.get("bias"), mag)
        alphas[name] = alpha
    raw_other = {(PREFIX + k if PREFIX + k in sd else k): v for k, v in other.items()}
    return AdapterTerms(str(path), modules, alphas, use_rslora, cfg.get("modules_to_save"), cfg, raw_other)


def base_weight(model: nn.Module, name: str) -> torch.Tensor:
    """The frozen base weight of module `name` as (out, in) (a view; wrapped or not)."""
    module = model.get_submodule(name)
    base = module.base_layer if isinstance(module, LoraLayer) else module
    return weight_out_in(base, kind_of(base, name))


def check_fits(model: nn.Module, terms: AdapterTerms) -> None:
    """Raise, naming the module and both shapes, if a term does not fit `model`'s module of that name."""
    known = dict(model.named_modules())
    for name, m in terms.modules.items():
        if name not in known:
            raise ValueError(
                f"{terms.source}: module {name!r} is not in {type(model).__name__}. Pass the base model the "
                "adapter was trained on (the same class: a ForCausalLM and a bare model name modules differently)."
            )
        base = known[name].base_layer if isinstance(known[name], LoraLayer) else known[name]
        kind = kind_of(base, name)
        n_in, n_out = kind.features(base)
        if (m.A.shape[1], m.B.shape[0]) != (n_in, n_out) or (m.kind == "embedding") != (kind.name == "embedding"):
            raise ValueError(
                f"{terms.source}: module {name!r} has lora_A {tuple(m.A.shape)} / lora_B {tuple(m.B.shape)} "
                f"({m.kind}), but the model's {kind.name} needs (r, {n_in}) / ({n_out}, r). The adapter was "
                "trained on a different base model; pass the one it was trained for."
            )


def most_common(values: list[Any]) -> Any:
    return Counter(values).most_common(1)[0][0]


def install_adapter(
    model: nn.Module,
    name: str,
    modules: dict[str, ExportedModule],
    *,
    use_rslora: bool,
    modules_to_save: list[str] | None = None,
) -> None:
    """Create adapter `name` on `model` holding exactly `modules` (each keeps its own rank and scale).

    Mutates `model`: wraps modules not wrapped yet and registers a `LoraConfig` describing the result, so
    that `rankwise.save_adapter(model, path, name)` writes it with per-module rank / alpha patterns."""
    if not modules:
        raise ValueError(f"Adapter {name!r} would be empty (every module has rank 0); nothing was added.")
    configs: OrderedDict = getattr(model, CONFIG_ATTR, None) or OrderedDict()
    if name in configs:
        raise ValueError(f"The model already has an adapter named {name!r}; pass another name.")
    check_fits(model, AdapterTerms(name, modules, {}, use_rslora))
    ranks = {n: m.r for n, m in modules.items()}
    alphas = {n: round(alpha_from_scale(m.scale, m.r, use_rslora), 10) for n, m in modules.items()}
    for mod_name, m in modules.items():
        module = model.get_submodule(mod_name)
        if not isinstance(module, LoraLayer):
            module = LoraLayer(module, mod_name)
            _set_submodule(model, mod_name, module)
        adapter = module.add_adapter(name, m.r, alphas[mod_name], use_rslora=use_rslora,
                                     bias=m.bias is not None, use_dora=m.magnitude is not None)
        adapter.scale = m.scale  # exact, where alpha -> scale would round
        with torch.no_grad():
            adapter.lora_A.copy_(m.A)
            adapter.lora_B.copy_(m.B)
            if m.bias is not None:
                adapter.lora_bias.copy_(m.bias)
            if m.magnitude is not None:
                adapter.magnitude.copy_(m.magnitude)
    r, alpha = most_common(list(ranks.values())), most_common(list(alphas.values()))
    configs[name] = LoraConfig(
        r=r, alpha=alpha, target_modules=sorted(modules),
        rank_pattern={re.escape(n): v for n, v in ranks.items() if v != r},
        alpha_pattern={re.escape(n): v for n, v in alphas.items() if v != alpha},
        use_rslora=use_rslora, use_dora=any(m.magnitude is not None for m in modules.values()),
        bias=any(m.bias is not None for m in modules.values()), modules_to_save=modules_to_save,
    )
    setattr(model, CONFIG_ATTR, configs)


def terms_state_dict(modules: dict[str, ExportedModule], dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """PEFT keys for plain terms (the scale goes to the config as alpha, not into the tensors)."""
    sd: dict[str, torch.Tensor] = {}
    for name, m in modules.items():
        key = PREFIX + name
        embedding = m.kind == "embedding"
        a_key, b_key = (".lora_embedding_A", ".lora_embedding_B") if embedding else (".lora_A.weight", ".lora_B.weight")
        sd[key + a_key] = m.A.to(dtype).contiguous()
        sd[key + b_key] = m.B.to(dtype).contiguous()
        if m.bias is not None:
            sd[key + ".lora_B.bias"] = m.bias.to(dtype).contiguous()
        if m.magnitude is not None:
            sd[key + ".lora_magnitude_vector"] = m.magnitude.to(dtype).contiguous()
    return sd
