"""LoRA+: a larger learning rate for B than for A (Hayou et al., 2024, arXiv:2402.12354).

    lr(B) = ratio * lr(A),   ratio ~ 16

In LoRA's infinite-width analysis, equal learning rates make either A or B learn inefficiently; scaling B's rate
by a constant ratio fixes it. The result is a plain LoRA: only the optimizer changes.

`loraplus_param_groups(model, lr)` returns param groups for ANY torch optimizer, each carrying a "name":

    "lora_A"          A matrices                                   lr,          weight_decay
    "lora_B"          B matrices                                   lr * ratio,  weight_decay
    "lora_B_no_decay" 1-D adapter parameters on B's side: the LoRA bias, rank vectors (gates / singular values,
                      which fold into B), DoRA magnitudes           lr * ratio,  no decay (as PEFT)
    "embedding"       adapters on embeddings, when embedding_lr is given (PEFT's loraplus_lr_embedding)
    "other"           every other trainable parameter (modules_to_save such as a classifier head), split into
    "other_no_decay"  >= 2-D with weight_decay and 1-D without, at lr

Every group is present (possibly empty) so that `param_group(optimizer, name)` finds it. Resizes keep the groups:
`rankwise.optim.remap_optimizer` puts a resized parameter in the old one's place in its group, so a new B stays
in "lora_B" at lr * ratio. A parameter created later (an allocator enabling a rank vector) goes in with
`add_param(optimizer, name, param)`, which picks its group from its name.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

GROUPS = ("lora_A", "lora_B", "lora_B_no_decay", "embedding", "other", "other_no_decay")
B_SIDE_VECTORS = ("lora_bias", "rank_vector", "magnitude")


def group_name(param_name: str, param: torch.Tensor, embedding_adapters: set[str], split_embedding: bool) -> str:
    """Which LoRA+ group the parameter called `param_name` belongs to."""
    leaf = param_name.rsplit(".", 1)[-1]
    in_adapter = ".adapters." in f".{param_name}"
    if in_adapter and split_embedding and param_name.split(".adapters.")[0] in embedding_adapters:
        return "embedding"
    if in_adapter and leaf == "lora_A":
        return "lora_A"
    if in_adapter and leaf == "lora_B":
        return "lora_B"
    if in_adapter and leaf in B_SIDE_VECTORS:
        return "lora_B_no_decay"
    return "other" if param.ndim >= 2 else "other_no_decay"


def _embedding_layers(model: nn.Module) -> set[str]:
    from rankwise.model import lora_layers  # local: rankwise.model imports the layers package

    return {name for name, layer in lora_layers(model) if layer.kind.name == "embedding"}


def loraplus_param_groups(
    model: nn.Module,
    lr: float,
    ratio: float = 16.0,
    weight_decay: float = 0.0,
    *,
    embedding_lr: float | None = None,
) -> list[dict[str, Any]]:
    """Param groups of the trainable parameters of `model` (see the module docstring). Pass them to any
    optimizer: `torch.optim.AdamW(loraplus_param_groups(model, 2e-4), lr=2e-4)`."""
    if lr <= 0:
        raise ValueError(f"loraplus_param_groups: lr={lr!r} must be > 0.")
    if ratio <= 0:
        raise ValueError(f"loraplus_param_groups: ratio={ratio!r} must be > 0 (the paper uses ~16; 1 is plain LoRA).")
    if weight_decay < 0:
        raise ValueError(f"loraplus_param_groups: weight_decay={weight_decay!r} must be >= 0.")
    settings = {
        "lora_A": (lr, weight_decay),
        "lora_B": (lr * ratio, weight_decay),
        "lora_B_no_decay": (lr * ratio, 0.0),
        "embedding": (embedding_lr if embedding_lr is not None else lr, weight_decay),
        "other": (lr, weight_decay),
        "other_no_decay": (lr, 0.0),
    }
    groups = {name: {"name": name, "params": [], "lr": g_lr, "weight_decay": wd}
              for name, (g_lr, wd) in settings.items()}
    groups["embedding"]["split"] = embedding_lr is not None  # read back by add_param
    embedding = _embedding_layers(model)
    for pname, p in model.named_parameters():
        if p.requires_grad:
            groups[group_name(pname, p, embedding, embedding_lr is not None)]["params"].append(p)
    if not any(g["params"] for g in groups.values()):
        raise ValueError("loraplus_param_groups: the model has no trainable parameter; call rankwise.inject first.")
    return [groups[name] for name in GROUPS]


def param_group(optimizer: torch.optim.Optimizer, name: str) -> dict[str, Any]:
    """The param group called `name` (one of GROUPS) of an optimizer built from loraplus_param_groups."""
    for group in optimizer.param_groups:
        if group.get("name") == name:
            return group
    raise KeyError(
        f"The optimizer has no param group named {name!r} (it has {[g.get('name') for g in optimizer.param_groups]}); "
        "build it from rankwise.optim_groups.loraplus_param_groups."
    )


def add_param(optimizer: torch.optim.Optimizer, model: nn.Module, param_name: str, param: nn.Parameter) -> None:
    """Put a parameter created after the optimizer (e.g. a rank vector) into its LoRA+ group. Mutates `optimizer`."""
    split = bool(param_group(optimizer, "embedding").get("split", False))
    group = param_group(optimizer, group_name(param_name, param, _embedding_layers(model), split))
    if any(p is param for g in optimizer.param_groups for p in g["params"]):
        raise ValueError(f"Parameter {param_name!r} is already in the optimizer.")
    group["params"].append(param)
