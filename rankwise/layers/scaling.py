"""Scale of the low-rank update.

LoRA (Hu et al., 2021): s = alpha / r.  rsLoRA (Kalajdzievski, 2023): s = alpha / sqrt(r), which keeps
updates comparable across ranks. A layer stores its scale as a number; the alpha written to a PEFT file is
recovered from it with `alpha_from_scale`, so a module whose rank changed during training keeps its scale.
"""

from __future__ import annotations

import math


def lora_scale(alpha: float, r: int, use_rslora: bool) -> float:
    if r <= 0:
        return 0.0
    return alpha / math.sqrt(r) if use_rslora else alpha / r


def alpha_from_scale(scale: float, r: int, use_rslora: bool) -> float:
    """Inverse of `lora_scale`: the alpha that gives `scale` at rank `r`."""
    return scale * math.sqrt(r) if use_rslora else scale * r
