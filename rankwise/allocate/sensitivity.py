"""Sensitivity-LoRA: ranks from the second-order sensitivity of the loss to each weight matrix.

After Zhang et al., 2025, "Sensitivity-LoRA: Low-Load Sensitivity-Based Fine-Tuning for Large Language
Models" (arXiv:2509.09119). The abstract names a global term (how sensitive the loss is to the matrix as a
whole) and a local term (how the sensitivity is spread inside it), from second-order information gathered in
one pass over calibration data, then a proportional allocation; the exact formula is not public. Ours, with
the empirical Fisher diagonal standing in for the Hessian diagonal:

    F_i = mean_b (dL_b / dW0_i)^2                          (out_i, in_i), one gradient per calibration batch
    global_i = sum(F_i) / sum_j sum(F_j)                    share of the total Fisher mass
    local_i  = erank(sqrt(F_i)) / min(out_i, in_i)          in (0, 1]
    erank(M) = exp(-sum_k p_k log p_k),  p_k = sigma_k(M) / sum_l sigma_l(M)   (Roy & Vetterli, 2007)
    w_i = global_i * local_i ** beta                        (beta = `local_exponent`, default 0.5)
    r_i = budget.proportional_ranks(w, in + out, budget): r_i ~ budget * w_i / (in_i + out_i), at most
          floor(max_rank_factor * r_ref) (r_ref = budget / sum_i (in_i + out_i), the budget's average rank);
          the parameters a capped module cannot take are shared among the others in proportion (water-filling)

sqrt(F_i) is the root-mean-square gradient arranged as the matrix; its effective rank counts how many
directions the sensitivity spreads over. Sensitivity concentrated in a few directions is served by a few
ranks, so the local term lowers such a module's share; beta = 0 gives a pure Fisher-mass allocation. The cap
(our choice, like GoRA's 4 r_ref) keeps one module from taking most of the budget: the Fisher mass of the
layers next to a freshly initialised head can be orders of magnitude above the rest (on MiniLM / SST-2 one
module took rank 147 of an average 4 without it, most others 0). F is
averaged over processes before deciding. Each module's adapter is then resized: the first min(r_i, r0)
injected components are kept and new ones start with B = 0, so the function does not change.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from rankwise.allocate.base import Allocator, AllocatorConfig, default_loss, register_allocator
from rankwise.allocate.budget import proportional_ranks
from rankwise.init.calibration import weight_gradients


@dataclass
class SensitivityConfig(AllocatorConfig):
    """n_batches: calibration batches for the Fisher diagonal; local_exponent: beta in w = global * local^beta;
    max_rank_factor: cap ranks at floor(factor * r_ref) (None: only the budget's max_rank)."""

    n_batches: int = 32
    local_exponent: float = 0.5
    max_rank_factor: float | None = 4.0

    def __post_init__(self) -> None:
        if self.n_batches < 1:
            raise ValueError(f"SensitivityConfig.n_batches={self.n_batches!r} must be >= 1.")
        if self.local_exponent < 0:
            raise ValueError(f"SensitivityConfig.local_exponent={self.local_exponent!r} must be >= 0.")
        if self.max_rank_factor is not None and self.max_rank_factor < 1:
            raise ValueError(f"SensitivityConfig.max_rank_factor={self.max_rank_factor!r} must be >= 1 (or None).")


def effective_rank(m: torch.Tensor) -> float:
    """exp(entropy of the normalised singular values) of m (out, in); 0 for a zero matrix."""
    s = torch.linalg.svdvals(m.double())
    total = s.sum()
    if total <= 0:
        return 0.0
    p = s / total
    p = p[p > 0]
    return float(torch.exp(-(p * p.log()).sum()))


def sensitivity_scores(fisher: dict[str, torch.Tensor], beta: float) -> dict[str, dict[str, float]]:
    """{module: {"global", "local", "weight"}} from the Fisher diagonals (the formula of the module docstring)."""
    mass = {n: float(f.double().sum()) for n, f in fisher.items()}
    total = sum(mass.values())
    if total <= 0:
        raise ValueError(
            "Sensitivity-LoRA: the Fisher diagonal is zero everywhere on the calibration batches; check that "
            "loss_fn depends on the adapted modules and that the batches carry labels."
        )
    out = {}
    for name, f in fisher.items():
        glob = mass[name] / total
        local = effective_rank(f.clamp_min(0).sqrt()) / min(f.shape)
        out[name] = {"global": glob, "local": local, "weight": glob * local**beta}
    return out


def capped_proportional_ranks(
    weights: dict[str, float], costs: dict[str, int], budget_params: int, min_rank: int, max_rank: int | None
) -> dict[str, int]:
    """`proportional_ranks` with water-filling: a module whose share would exceed `max_rank` is fixed at it and
    the parameters it cannot use are shared, in proportion again, among the others (without this, a capped
    module's surplus would go unused)."""
    fixed: dict[str, int] = {}
    while max_rank is not None:
        free = {n: w for n, w in weights.items() if n not in fixed}
        left = budget_params - sum(r * costs[n] for n, r in fixed.items())
        total = sum(max(w, 0.0) for w in free.values())
        over = [n for n, w in free.items() if total > 0 and left * max(w, 0.0) / total / costs[n] > max_rank]
        if not over:
            break
        fixed.update({n: max_rank for n in over})
    free = {n: w for n, w in weights.items() if n not in fixed}
    left = budget_params - sum(r * costs[n] for n, r in fixed.items())
    ranks = proportional_ranks(free, {n: costs[n] for n in free}, left, min_rank, max_rank) if free else {}
    return {n: fixed.get(n, ranks.get(n)) for n in weights}


@register_allocator
class SensitivityLoRA(Allocator):
    name = "sensitivity"
    Config = SensitivityConfig

    def __init__(self, model, budget, config=None, **kwargs) -> None:
        super().__init__(model, budget, config, **kwargs)
        self.scores: dict[str, dict[str, float]] = {}

    def max_rank(self) -> int | None:
        caps = [self.budget.max_rank]
        if self.config.max_rank_factor is not None:
            r_ref = self.budget_params / sum(self.costs.values())
            caps.append(max(math.floor(self.config.max_rank_factor * r_ref), self.budget.min_rank, 1))
        caps = [c for c in caps if c is not None]
        return min(caps) if caps else None

    def prepare(self, batches=None, loss_fn=default_loss) -> None:
        if batches is None:
            raise ValueError(
                "Sensitivity-LoRA sets ranks from the Fisher diagonal: pass calibration batches to "
                "prepare(batches, loss_fn)."
            )
        _, fisher = weight_gradients(self.model, batches, loss_fn, self.adapter_name,
                                     n_batches=self.config.n_batches, squares=True)
        self.scores = sensitivity_scores(fisher, self.config.local_exponent)
        weights = {n: s["weight"] for n, s in self.scores.items()}
        ranks = capped_proportional_ranks(weights, self.costs, self.budget_params, self.budget.min_rank,
                                          self.max_rank())
        for name, r in ranks.items():
            adapter = self.modules[name]
            keep = list(range(min(r, adapter.r)))
            self.resize_module(name, keep, r - len(keep), step=0, score=weights[name])

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["scores"] = dict(self.scores)
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.scores = dict(state["scores"])
