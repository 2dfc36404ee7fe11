"""Read and write adapters in the Hugging Face PEFT format (peft_type LORA).

Files: `adapter_config.json` and `adapter_model.safetensors` with keys
`base_model.model.<module>.lora_A.weight (r, in)`, `.lora_B.weight (out, r)`, `.lora_B.bias`,
`.lora_embedding_A (r, vocab)`, `.lora_embedding_B (dim, r)`, `.lora_magnitude_vector (out,)` (DoRA).
Per-module ranks and alphas go to `rank_pattern` / `alpha_pattern`; rank-0 modules are left out (and named
in `exclude_modules` so PEFT does not create them). rankwise's own metadata (rank history, allocator) goes
to `rankwise.json` / `rank_history.jsonl` beside them, which PEFT ignores.

What is folded at export: rank vectors (AdaLoRA's singular values, SoRA's gates) into B; a DyLoRA truncation;
a moved base weight (PiSSA, LoRA-GA, CorDA) as a rank-2r LoRA on the original weights:
    dW = s B' A' - s B0 A0 = s [B' | -B0] [A' ; A0].
"""

from __future__ import annotations

import json
import re
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from rankwise.config import LoraConfig, match_pattern
from rankwise.inject import CONFIG_ATTR, _candidate_names, _matches, _set_submodule, freeze_base
from rankwise.io.atomic import atomic_directory
from rankwise.layers.adapter import LoraAdapter
from rankwise.layers.base_kinds import kind_of
from rankwise.layers.lora import LoraLayer
from rankwise.layers.scaling import alpha_from_scale, lora_scale

PREFIX = "base_model.model."
CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
LEGACY_WEIGHTS_NAME = "adapter_model.bin"
RANKWISE_META = "rankwise.json"
HISTORY_NAME = "rank_history.jsonl"


@dataclass
class ExportedModule:
    """One module as a plain LoRA: A (r, in), B (out, r), scale s, optional bias / DoRA magnitude."""

    name: str
    kind: str
    A: torch.Tensor
    B: torch.Tensor
    scale: float
    bias: torch.Tensor | None = None
    magnitude: torch.Tensor | None = None

    @property
    def r(self) -> int:
        return self.A.shape[0]


def export_module(layer: LoraLayer, adapter: LoraAdapter, name: str) -> ExportedModule | None:
    """Fold `adapter` into plain (A, B, s); None when its rank is 0."""
    with torch.no_grad():
        A, B, s = adapter.effective_factors()
        A, B = A.detach().float(), B.detach().float()
        if adapter.offset_A is not None:
            if adapter.truncate is not None:
                raise ValueError(f"{name}: cannot export a truncated adapter on a moved base weight.")
            A = torch.cat([A, adapter.offset_A.float()], dim=0)
            B = torch.cat([B, -adapter.offset_B.float()], dim=1)
        if A.shape[0] == 0:
            return None
        bias = adapter.lora_bias.detach().float().clone() if adapter.lora_bias is not None else None
        mag = adapter.magnitude.detach().float().clone() if adapter.magnitude is not None else None
    return ExportedModule(name, layer.kind.name, A.contiguous(), B.contiguous(), s, bias, mag)


def _most_common(values: list[Any]) -> Any:
    return Counter(values).most_common(1)[0][0]


def peft_pattern(values: dict[str, Any], default: Any) -> dict[str, Any]:
    """{module: value} for modules whose value differs from `default`, as keys that PEFT's rule resolves
    back to exactly that module (a key is regex-escaped when the plain name would also match another)."""
    pattern: dict[str, Any] = {}
    for name, value in values.items():
        if value != default:
            pattern[name] = value
    if any(match_pattern(pattern, n, default) != v for n, v in values.items()):
        pattern = {re.escape(k): v for k, v in pattern.items()}
    for n, v in values.items():
        assert match_pattern(pattern, n, default) == v, f"pattern does not resolve {n}"
    return pattern


def build_peft_config(
    model: nn.Module, modules: list[ExportedModule], config: LoraConfig, *, use_rslora: bool, **extra: Any
) -> dict[str, Any]:
    ranks = {m.name: m.r for m in modules}
    alphas = {m.name: round(alpha_from_scale(m.scale, m.r, use_rslora), 10) for m in modules}
    r = _most_common(list(ranks.values()))
    alpha = _most_common(list(alphas.values()))
    leaves = sorted({n.rsplit(".", 1)[-1] for n in ranks})
    exported = set(ranks)
    exclude = [n for n in _candidate_names(model) if _matches(leaves, n) and n not in exported]
    name_or_path = getattr(getattr(model, "config", None), "_name_or_path", None) or None
    cfg = {
        "peft_type": "LORA",
        "task_type": extra.pop("task_type", None),
        "base_model_name_or_path": extra.pop("base_model_name_or_path", name_or_path),
        "r": int(r),
        "lora_alpha": alpha,
        "lora_dropout": config.dropout,
        "use_rslora": use_rslora,
        "use_dora": any(m.magnitude is not None for m in modules),
        "lora_bias": any(m.bias is not None for m in modules),
        "target_modules": leaves,
        "exclude_modules": exclude or None,
        "fan_in_fan_out": any(m.kind == "conv1d" for m in modules),
        "bias": "none",
        "init_lora_weights": True,
        "modules_to_save": config.modules_to_save,
        "rank_pattern": peft_pattern(ranks, r),
        "alpha_pattern": peft_pattern(alphas, alpha),
        "inference_mode": True,
        "revision": None,
    }
    cfg.update(extra)
    return cfg


def adapter_state_dict(model: nn.Module, modules: list[ExportedModule], config: LoraConfig) -> dict[str, torch.Tensor]:
    sd: dict[str, torch.Tensor] = {}
    for m in modules:
        key = PREFIX + m.name
        if m.kind == "embedding":
            sd[f"{key}.lora_embedding_A"] = m.A
            sd[f"{key}.lora_embedding_B"] = m.B
        else:
            sd[f"{key}.lora_A.weight"] = m.A
            sd[f"{key}.lora_B.weight"] = m.B
        if m.bias is not None:
            sd[f"{key}.lora_B.bias"] = m.bias
        if m.magnitude is not None:
            sd[f"{key}.lora_magnitude_vector"] = m.magnitude
    for save_name in config.modules_to_save or []:
        for name, module in model.named_modules():
            if _matches([save_name], name):
                for pname, p in module.named_parameters():
                    sd[f"{PREFIX}{name}.{pname}"] = p.detach().float().contiguous().clone()
    return sd


def save_adapter(
    model: nn.Module,
    path: str | Path,
    adapter_name: str = "default",
    *,
    history: list[dict] | None = None,
    metadata: dict[str, Any] | None = None,
    **config_extra: Any,
) -> Path:
    """Write adapter `adapter_name` of `model` to directory `path` in the PEFT format, atomically.

    `history`: allocation decisions (rank_history.jsonl); `metadata`: extra rankwise.json fields;
    `config_extra`: fields for adapter_config.json (e.g. task_type="CAUSAL_LM")."""
    configs = getattr(model, CONFIG_ATTR, {})
    if adapter_name not in configs:
        raise KeyError(f"The model has no adapter {adapter_name!r}; it has {list(configs)}.")
    config: LoraConfig = configs[adapter_name]
    modules = []
    from rankwise.model import adapter_modules  # local: model.py imports inject, which this module imports

    for name, layer, adapter in adapter_modules(model, adapter_name):
        exported = export_module(layer, adapter, name)
        if exported is not None:
            modules.append(exported)
    if not modules:
        raise ValueError(f"Adapter {adapter_name!r} has rank 0 on every module; there is nothing to save.")
    peft_config = build_peft_config(model, modules, config, use_rslora=config.use_rslora, **config_extra)
    sd = adapter_state_dict(model, modules, config)
    meta = {
        "format": "rankwise",
        "adapter_name": adapter_name,
        "ranks": {m.name: m.r for m in modules},
        "trainable_params": sum(m.r * (m.A.shape[1] + m.B.shape[0]) for m in modules),
        "rankwise_config": config.to_dict(),
    }
    meta.update(metadata or {})
    path = Path(path)
    with atomic_directory(path) as tmp:
        save_file(sd, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
        (tmp / CONFIG_NAME).write_text(json.dumps(peft_config, indent=2, sort_keys=True) + "\n")
        (tmp / RANKWISE_META).write_text(json.dumps(meta, indent=2) + "\n")
        if history is not None:
            (tmp / HISTORY_NAME).write_text("".join(json.dumps(h) + "\n" for h in history))
    return path


# ---- loading ------------------------------------------------------------------------------------------

_SUFFIXES = {
    ".lora_A.weight": "A",
    ".lora_B.weight": "B",
    ".lora_B.bias": "bias",
    ".lora_embedding_A": "A",
    ".lora_embedding_B": "B",
    ".lora_magnitude_vector": "magnitude",
    ".lora_magnitude_vector.weight": "magnitude",
}


def read_adapter_files(path: str | Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(config dict, state dict) of a PEFT-format adapter directory; never unpickles arbitrary objects."""
    path = Path(path)
    if not (path / CONFIG_NAME).is_file():
        raise FileNotFoundError(
            f"{path} has no {CONFIG_NAME}; pass the directory that PEFT's save_pretrained or "
            "rankwise.save_adapter wrote (hub names are not downloaded: pass a local path)."
        )
    config = json.loads((path / CONFIG_NAME).read_text())
    if (path / WEIGHTS_NAME).is_file():
        sd = load_file(str(path / WEIGHTS_NAME))
    elif (path / LEGACY_WEIGHTS_NAME).is_file():
        sd = torch.load(path / LEGACY_WEIGHTS_NAME, map_location="cpu", weights_only=True)
    else:
        raise FileNotFoundError(f"{path} has neither {WEIGHTS_NAME} nor {LEGACY_WEIGHTS_NAME}.")
    return config, sd


def parse_state_dict(sd: dict[str, torch.Tensor]) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, torch.Tensor]]:
    """Split keys into {module: {A, B, bias, magnitude}} and other tensors (modules_to_save, base layers)."""
    modules: dict[str, dict[str, torch.Tensor]] = {}
    other: dict[str, torch.Tensor] = {}
    for key, tensor in sd.items():
        name = key[len(PREFIX):] if key.startswith(PREFIX) else key
        for suffix, part in _SUFFIXES.items():
            if name.endswith(suffix):
                modules.setdefault(name[: -len(suffix)], {})[part] = tensor
                break
        else:
            other[name] = tensor
    return modules, other


def _shape_error(name: str, what: str, got: tuple, expected: tuple) -> ValueError:
    return ValueError(
        f"Adapter tensor {what} for module {name!r} has shape {got}, but the model's module needs {expected}. "
        "The adapter was trained on a different base model; load it onto the model it was trained for."
    )


def load_adapter(
    model: nn.Module, path: str | Path, adapter_name: str = "default", *, is_trainable: bool = False
) -> nn.Module:
    """Load a PEFT-format LoRA adapter (written by PEFT or rankwise) onto `model` in place and return it."""
    if adapter_name in getattr(model, CONFIG_ATTR, {}):
        raise ValueError(f"The model already has an adapter named {adapter_name!r}; pass another adapter_name.")
    cfg, sd = read_adapter_files(path)
    peft_type = cfg.get("peft_type", "LORA")
    if peft_type != "LORA":
        raise ValueError(
            f"{path}: peft_type {peft_type!r} is not supported; rankwise reads peft_type LORA. "
            "Convert it in PEFT first (e.g. AdaLoRA adapters: export as LoRA)."
        )
    modules, other = parse_state_dict(sd)
    use_rslora = bool(cfg.get("use_rslora", False))
    use_dora = bool(cfg.get("use_dora", False))
    dropout = float(cfg.get("lora_dropout", 0.0) or 0.0)
    alpha_default = float(cfg.get("lora_alpha", 8))
    alpha_pattern = cfg.get("alpha_pattern") or {}
    known = dict(model.named_modules())
    for name in modules:
        if name not in known:
            from rankwise.inject import _close

            raise ValueError(
                f"Adapter module {name!r} is not in {type(model).__name__}. Close candidates: "
                f"{_close(name, _candidate_names(model))}. Load the adapter onto the model class it was "
                "trained with (e.g. a ForSequenceClassification vs a base model changes the names)."
            )
    # Check every shape before touching the model, so a wrong base leaves it unchanged.
    for name, parts in modules.items():
        base = known[name].base_layer if isinstance(known[name], LoraLayer) else known[name]
        kind = kind_of(base, name)
        n_in, n_out = kind.features(base)
        if "A" not in parts or "B" not in parts:
            raise ValueError(f"Adapter module {name!r} lacks lora_A or lora_B in {path}; the file is incomplete.")
        r = parts["A"].shape[0]
        if tuple(parts["A"].shape) != (r, n_in):
            raise _shape_error(name, "lora_A", tuple(parts["A"].shape), (r, n_in))
        if tuple(parts["B"].shape) != (n_out, r):
            raise _shape_error(name, "lora_B", tuple(parts["B"].shape), (n_out, r))
        if "magnitude" in parts and tuple(parts["magnitude"].shape) != (n_out,):
            raise _shape_error(name, "lora_magnitude_vector", tuple(parts["magnitude"].shape), (n_out,))
    for name, parts in modules.items():
        module = model.get_submodule(name)
        if not isinstance(module, LoraLayer):
            module = LoraLayer(module, name)
            _set_submodule(model, name, module)
        r = parts["A"].shape[0]
        alpha = float(match_pattern(alpha_pattern, name, alpha_default))
        adapter = module.add_adapter(
            adapter_name, r, alpha, use_rslora=use_rslora, dropout=dropout if module.kind.name != "embedding" else 0.0,
            bias="bias" in parts, use_dora=use_dora and "magnitude" in parts,
        )
        with torch.no_grad():
            adapter.lora_A.copy_(parts["A"])
            adapter.lora_B.copy_(parts["B"])
            if adapter.lora_bias is not None:
                adapter.lora_bias.copy_(parts["bias"])
            if adapter.magnitude is not None:
                adapter.magnitude.copy_(parts["magnitude"])
        assert abs(adapter.scale - lora_scale(alpha, r, use_rslora)) < 1e-12
    _load_other(model, other, cfg, path)
    config = LoraConfig(
        r=int(cfg.get("r", 8)) or 1, alpha=alpha_default, dropout=dropout, target_modules=sorted(modules),
        rank_pattern={}, alpha_pattern={}, use_rslora=use_rslora, use_dora=use_dora,
        bias=any("bias" in p for p in modules.values()) and not use_dora,
        modules_to_save=cfg.get("modules_to_save"),
    )
    configs = getattr(model, CONFIG_ATTR, None) or {}
    configs[adapter_name] = config
    setattr(model, CONFIG_ATTR, configs)
    freeze_base(model)
    if not is_trainable:
        for _, layer in ((n, m) for n, m in model.named_modules() if isinstance(m, LoraLayer)):
            if adapter_name in layer.adapters:
                layer.adapters[adapter_name].requires_grad_(False)
    return model


def _load_other(model: nn.Module, other: dict[str, torch.Tensor], cfg: dict[str, Any], path: Any) -> None:
    """modules_to_save weights are copied into the model; PEFT's saved embedding base layers are skipped."""
    params = dict(model.named_parameters())
    for name, tensor in other.items():
        if ".base_layer." in name:
            continue  # PEFT stores the embedding base weight beside an embedding adapter; we keep the model's
        target = params.get(name)
        if target is None:
            target = params.get(name.replace(".modules_to_save.default.", "."))
        if target is None:
            warnings.warn(f"{path}: tensor {name!r} matches no adapter module or model parameter; ignored.")
            continue
        if target.shape != tensor.shape:
            raise _shape_error(name.rsplit(".", 1)[0], name, tuple(tensor.shape), tuple(target.shape))
        with torch.no_grad():
            target.copy_(tensor)
