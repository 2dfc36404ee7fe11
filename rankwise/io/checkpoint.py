"""Resumable training checkpoints: everything needed to continue a run exactly, written atomically.

A checkpoint is a folder `<dir>/step-00000120/` holding
- `state.pt`: the model's adapter tensors at their current ranks (plus modules_to_save and base weights that
  an initialiser moved), each adapter's scale, the optimizer state with the parameter names of every group,
  the scheduler, the allocator's `state_dict`, the python / numpy / torch RNG states, the data position and
  whatever the caller adds (`extra`: config, step, metrics);
- `adapter/`: the same adapter in the PEFT format, usable on its own.

The folder is built complete in a temporary sibling and renamed into place (`atomic_directory`), so a run
killed at any moment (even by SIGKILL) leaves the previous checkpoint or the new one, never a torn one.
Restoring is `restore_model` (shapes, then values), `build_param_groups` (the same parameters in the same
order) and `restore_rng`. Files load with `torch.load(weights_only=True)`: no arbitrary objects are unpickled.
"""

from __future__ import annotations

import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from rankwise.io.atomic import atomic_directory
from rankwise.io.shapes import match_adapter_shapes
from rankwise.model import lora_layers

STATE_NAME = "state.pt"
ADAPTER_DIR = "adapter"
_STEP_DIR = re.compile(r"^step-(\d+)$")


# ---- what is saved ----------------------------------------------------------------------------------------

def model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Tensors that differ from a freshly built base model: every adapter tensor (A, B, rank vectors, DoRA
    magnitudes, base offsets), every trainable parameter (modules_to_save) and base weights that an
    initialiser moved (PiSSA-style). Keys are `model.state_dict()` keys."""
    moved = {name for name, layer in lora_layers(model)
             if any(a.offset_A is not None for a in layer.adapters.values())}
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    out = {}
    for key, tensor in model.state_dict(keep_vars=True).items():
        base_of_moved = any(key.startswith(f"{m}.base_layer.") for m in moved)
        if ".adapters." in f".{key}" or key in trainable or base_of_moved:
            out[key] = tensor.detach().clone()
    return out


def adapter_attributes(model: nn.Module) -> dict[str, dict[str, Any]]:
    """Plain attributes of adapters that are not tensors but change during training (scale, truncation)."""
    return {f"{layer_name}.adapters.{name}": {"scale": float(a.scale), "truncate": a.truncate}
            for layer_name, layer in lora_layers(model) for name, a in layer.adapters.items()}


def param_names(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[list[str]]:
    """The model name of every parameter in every optimizer group, in order."""
    names = {id(p): n for n, p in model.named_parameters()}
    out = []
    for group in optimizer.param_groups:
        missing = [tuple(p.shape) for p in group["params"] if id(p) not in names]
        if missing:
            raise RuntimeError(f"The optimizer holds parameters that are not in the model (shapes {missing[:3]}); "
                               "after a resize, call rankwise.remap_optimizer so it holds the new ones.")
        out.append([names[id(p)] for p in group["params"]])
    return out


def rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {"key": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    npst = state["numpy"]
    np.random.set_state(("MT19937", npst["key"].numpy().astype(np.uint32), npst["pos"], npst["has_gauss"],
                         npst["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---- writing --------------------------------------------------------------------------------------------

def save_checkpoint(
    directory: str | Path,
    step: int,
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any = None,
    allocator: Any = None,
    data_state: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
    adapter_name: str = "default",
    keep: int | None = None,
    save_peft: bool = True,
) -> Path:
    """Write `<directory>/step-<step>/` atomically and return it; keep only the newest `keep` checkpoints."""
    from rankwise.io.peft import save_adapter  # local: peft.py imports the model helpers too

    state = {
        "step": int(step),
        "model": model_state(model),
        "adapter_attributes": adapter_attributes(model),
        "optimizer": None if optimizer is None else optimizer.state_dict(),
        "param_names": None if optimizer is None else param_names(model, optimizer),
        "scheduler": None if scheduler is None else scheduler.state_dict(),
        "allocator": None if allocator is None else allocator.state_dict(),
        "rng": rng_state(),
        "data": dict(data_state or {}),
        "extra": dict(extra or {}),
    }
    path = Path(directory) / f"step-{step:08d}"
    with atomic_directory(path) as tmp:
        torch.save(state, tmp / STATE_NAME)
        if save_peft:
            history = None if allocator is None else list(allocator.history)
            save_adapter(model, tmp / ADAPTER_DIR, adapter_name, history=history, metadata={"step": int(step)})
    if keep is not None:
        for old in list_checkpoints(directory)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return path


# ---- reading --------------------------------------------------------------------------------------------

def list_checkpoints(directory: str | Path) -> list[Path]:
    """Complete checkpoints under `directory`, oldest first (temporary folders of a killed save are skipped)."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in directory.iterdir()
             if (m := _STEP_DIR.match(p.name)) and (p / STATE_NAME).is_file()]
    return [p for _, p in sorted(found)]


def latest_checkpoint(directory: str | Path) -> Path | None:
    found = list_checkpoints(directory)
    return found[-1] if found else None


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    file = path / STATE_NAME if path.is_dir() else path
    if not file.is_file():
        raise FileNotFoundError(f"{path} is not a rankwise checkpoint (no {STATE_NAME}); pass a step-NNNNNNNN "
                                "folder from <output_dir>/checkpoints, or --resume latest.")
    return torch.load(file, map_location="cpu", weights_only=True)


def restore_model(model: nn.Module, state: dict[str, Any]) -> None:
    """Give `model` (built and injected like the saved one) the saved ranks and values. Mutates `model`."""
    tensors = state["model"]
    match_adapter_shapes(model, tensors)
    result = model.load_state_dict(tensors, strict=False)
    if result.unexpected_keys:
        raise ValueError(f"The checkpoint holds tensors this model lacks: {result.unexpected_keys[:5]}. Resume "
                         "with the same model, target_modules and method as the interrupted run.")
    layers = dict(lora_layers(model))
    for key, attrs in state.get("adapter_attributes", {}).items():
        layer_name, _, adapter_name = key.rpartition(".adapters.")
        adapter = layers[layer_name].adapters[adapter_name]
        adapter.scale = float(attrs["scale"])
        adapter.truncate = attrs["truncate"]


def build_param_groups(model: nn.Module, names: list[list[str]]) -> list[dict[str, Any]]:
    """Optimizer groups holding the named parameters in the saved order (load the optimizer state after)."""
    params = dict(model.named_parameters())
    missing = [n for group in names for n in group if n not in params]
    if missing:
        raise ValueError(f"The checkpoint's optimizer refers to parameters the model lacks: {missing[:5]}.")
    return [{"params": [params[n] for n in group]} for group in names]
