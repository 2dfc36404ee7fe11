"""GoRA: ranks and initialisation from the full-weight gradient, decided once before training.

He et al., 2025, "GoRA: Gradient-driven Adaptive Low Rank Adaptation" (arXiv:2502.12171). In `prepare`:

1. G_i = mean over `n_batches` calibration batches of dL/dW0_i   (out_i, in_i), averaged over processes.
2. Importance I_i = mean |W0_i * G_i| (elementwise product), normalised to sum 1.
3. r_ref = budget / sum_i (in_i + out_i) (the uniform rank the budget pays for);
   r_i ~ budget * I_i / (in_i + out_i) by `budget.proportional_ranks`, clamped to
   [floor(r_ref / 2), floor(4 r_ref)] (and the budget's own min/max rank); sum_i r_i (in_i + out_i) <= budget.
4. A_i random (Kaiming-uniform rows, drawn from the allocator's seeded generator so every process agrees) and
   B_i = -(gamma / alpha_i) G_i A_i^T (A_i A_i^T)^-1          (out_i, r_i)
   with scale s_i = alpha_i / sqrt(r_i) (rsLoRA). Then the initial update is
   s_i B_i A_i = -(gamma / sqrt(r_i)) G_i P_i,   P_i = A_i^T (A_i A_i^T)^-1 A_i the projector on A_i's rows:
   one gradient-descent step of size gamma / sqrt(r_i) on the gradient projected onto A_i's row space. W0 is
   not changed, so the model at step 0 is the model after that step. The reference code's "compress" init
   computes the same product with this minus sign; <G, -G P> = -||G P||^2 <= 0, so the loss decreases to
   first order (tests/allocate/test_gora.py checks it).

The exporter writes each module's alpha from its scale (rankwise/io/peft.py), so the PEFT file carries
alpha_i * sqrt(r_i) per module under plain alpha / r scaling.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from rankwise.allocate.base import Allocator, AllocatorConfig, default_loss, register_allocator
from rankwise.allocate.budget import proportional_ranks
from rankwise.init.calibration import weight_gradients
from rankwise.layers.scaling import lora_scale


@dataclass
class GoRAConfig(AllocatorConfig):
    """n_batches: calibration batches for G (32 in the reference); gamma: step size of the initial update."""

    n_batches: int = 32
    gamma: float = 0.05

    def __post_init__(self) -> None:
        if self.n_batches < 1:
            raise ValueError(f"GoRAConfig.n_batches={self.n_batches!r} must be >= 1.")
        if self.gamma < 0:
            raise ValueError(f"GoRAConfig.gamma={self.gamma!r} must be >= 0 (0 gives B = 0, a plain LoRA start).")


def random_rows(rows: int, cols: int, generator: torch.Generator) -> torch.Tensor:
    """(rows, cols) ~ U(-1/sqrt(cols), 1/sqrt(cols)), nn.Linear's Kaiming-uniform, from `generator`."""
    bound = 1.0 / math.sqrt(cols)
    return (torch.rand(rows, cols, generator=generator) * 2 - 1) * bound


def projected_step_B(grad: torch.Tensor, A: torch.Tensor, gamma: float, alpha: float) -> torch.Tensor:
    """B = -(gamma / alpha) G A^T (A A^T)^-1: grad (out, in), A (r, in) -> (out, r)."""
    gram = A @ A.t()  # (r, r)
    solve = torch.linalg.solve(gram + 1e-8 * torch.eye(A.shape[0]), A @ grad.t())  # (r, out) = (AA^T)^-1 A G^T
    return -(gamma / alpha) * solve.t()


@register_allocator
class GoRA(Allocator):
    name = "gora"
    Config = GoRAConfig

    def __init__(self, model, budget, config=None, **kwargs) -> None:
        super().__init__(model, budget, config, **kwargs)
        self.importance: dict[str, float] = {}
        self.r_ref = self.budget_params / sum(self.costs.values())

    def rank_bounds(self) -> tuple[int, int]:
        lo = max(self.budget.min_rank, math.floor(self.r_ref / 2))
        hi = math.floor(4 * self.r_ref)
        if self.budget.max_rank is not None:
            hi = min(hi, self.budget.max_rank)
        return lo, max(hi, lo)

    @torch.no_grad()
    def decide(self, grads: dict[str, torch.Tensor]) -> dict[str, int]:
        """Importance and ranks from the gradients (same on every process: the gradients are reduced)."""
        raw = {}
        for name, g in grads.items():
            w = self.layers[name].weight_out_in().detach().float().cpu()  # (out, in)
            raw[name] = float((w * g).abs().mean())
        total = sum(raw.values())
        if total <= 0:
            raise ValueError(
                "GoRA: every gradient is zero on the calibration batches, so no module looks important; check "
                "that loss_fn depends on the adapted modules and that the batches carry labels."
            )
        self.importance = {n: v / total for n, v in raw.items()}
        lo, hi = self.rank_bounds()
        return proportional_ranks(self.importance, self.costs, self.budget_params, lo, hi)

    def prepare(self, batches=None, loss_fn=default_loss) -> None:
        if batches is None:
            raise ValueError("GoRA sets ranks from gradients: pass calibration batches to prepare(batches, loss_fn).")
        grads, _ = weight_gradients(self.model, batches, loss_fn, self.adapter_name, n_batches=self.config.n_batches)
        ranks = self.decide(grads)
        for name, r in ranks.items():
            adapter = self.modules[name]
            A = random_rows(r, adapter.in_features, self.generator)  # (r, in)
            B = projected_step_B(grads[name], A, self.config.gamma, adapter.alpha)  # (out, r)
            dtype, device = adapter.lora_A.dtype, adapter.lora_A.device
            self.resize_module(name, [], r, step=0, score=self.importance[name],
                               new_A=A.to(dtype=dtype, device=device), new_B=B.to(dtype=dtype, device=device))
            adapter.scale = lora_scale(adapter.alpha, r, use_rslora=True)

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["importance"] = dict(self.importance)
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.importance = dict(state["importance"])
