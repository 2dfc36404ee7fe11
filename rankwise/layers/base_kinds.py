"""The base module types an adapter can wrap, and how to read their weight as (out, in).

A registry keyed by module class; `kind_of(module)` names the supported types in its error.
- nn.Linear: weight (out, in), y = x W^T + b.
- transformers' Conv1D (GPT-2): weight stored transposed (in, out), y = x W + b ("fan_in_fan_out").
- nn.Embedding: weight (vocab, dim); the adapter sees in = vocab, out = dim, as PEFT does.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class BaseKind:
    name: str
    features: Callable[[nn.Module], tuple[int, int]]  # module -> (in, out)
    fan_in_fan_out: bool  # weight stored as (in, out)


def _conv1d_class() -> type | None:
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # transformers is optional for plain PyTorch models
        return None
    return Conv1D


_KINDS: list[tuple[Callable[[], type | None], BaseKind]] = [
    (lambda: nn.Linear, BaseKind("linear", lambda m: (m.in_features, m.out_features), False)),
    (_conv1d_class, BaseKind("conv1d", lambda m: (m.weight.shape[0], m.weight.shape[1]), True)),
    (lambda: nn.Embedding, BaseKind("embedding", lambda m: (m.num_embeddings, m.embedding_dim), False)),
]


def supported_types() -> list[str]:
    return ["torch.nn.Linear", "transformers.pytorch_utils.Conv1D", "torch.nn.Embedding"]


def kind_of(module: nn.Module, name: str = "") -> BaseKind:
    for get_cls, kind in _KINDS:
        cls = get_cls()
        if cls is not None and isinstance(module, cls):
            return kind
    where = f" at {name!r}" if name else ""
    raise TypeError(
        f"Cannot put a LoRA adapter on {type(module).__module__}.{type(module).__name__}{where}; "
        f"supported module types are {supported_types()}. Exclude this module from target_modules."
    )


def is_supported(module: nn.Module) -> bool:
    try:
        kind_of(module)
    except TypeError:
        return False
    return True


def weight_out_in(module: nn.Module, kind: BaseKind) -> torch.Tensor:
    """The base weight as an (out, in) view (no copy)."""
    w = module.weight
    if kind.name == "embedding":
        return w.t()  # (vocab, dim) -> (dim, vocab)
    return w.t() if kind.fan_in_fan_out else w
