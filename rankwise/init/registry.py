"""Registry of adapter initialisers.

An initialiser is `fn(layer, adapter, **kwargs) -> None` that sets `adapter.lora_A` / `lora_B` in place
(and, for methods that move the base weight, the base weight and `adapter.offset_A` / `offset_B`).
Weight-driven ones (default, gaussian, PiSSA) run at injection time; data-driven ones (LoRA-GA, CorDA,
EVA, GoRA) register here too and receive the statistics they need through `kwargs`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Protocol

from torch import nn


class Initializer(Protocol):
    def __call__(self, layer: nn.Module, adapter: nn.Module, **kwargs) -> None: ...


_REGISTRY: dict[str, Initializer] = {}


def register_initializer(name: str) -> Callable[[Initializer], Initializer]:
    """Decorator: `@register_initializer("pissa")`."""

    def deco(fn: Initializer) -> Initializer:
        if name in _REGISTRY:
            raise ValueError(f"Initializer {name!r} is already registered.")
        _REGISTRY[name] = fn
        return fn

    return deco


def available_initializers() -> list[str]:
    _load_builtin()
    return sorted(_REGISTRY)


def get_initializer(name: str) -> Initializer:
    _load_builtin()
    base, _, niter = name.partition("_niter_")  # "pissa_niter_4": PiSSA with a 4-iteration randomized SVD
    if base not in _REGISTRY or (niter and not niter.isdigit()):
        raise ValueError(f"Unknown initializer {name!r}; registered: {sorted(_REGISTRY)} (and 'pissa_niter_<k>').")
    return functools.partial(_REGISTRY[base], niter=int(niter)) if niter else _REGISTRY[base]


def _load_builtin() -> None:
    # Imported lazily: the modules register themselves on import.
    import rankwise.init.basic  # noqa: F401
    import rankwise.init.corda  # noqa: F401
    import rankwise.init.lora_ga  # noqa: F401
    import rankwise.init.pissa  # noqa: F401
