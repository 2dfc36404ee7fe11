"""IncreLoRA: start every module at rank 1 and add ranks to the most important modules until the budget.

Zhang et al., "IncreLoRA: Incremental Parameter Allocation Method for Parameter-Efficient Fine-tuning"
(arXiv:2308.12043).

    dW = s * P diag(lambda) Q         AdaLoRA's SVD-form triplets and orthogonality term (see adalora.py)

Module importance, with G = dL/d(dW) (out, in), the gradient of the loss with respect to the full update:

    I_m = sum |dW * G| / sqrt(out * in),   I_bar, U_bar: AdaLoRA's EMA and uncertainty,   score_m = I_bar U_bar

G is collected by hooks on the adapted layers, G = sum over tokens g_out x^T (for an embedding, g_out is added
into the columns of the looked-up ids); x is the layer input before the adapter's dropout (an approximation
when dropout > 0). The hooks hold one (out, in) matrix per module, like a full-weight gradient, and are
removed once the budget is full.

After `warmup_steps`, every `interval` steps, the `top_h` modules with the highest score (averaged over
processes) each get `k` new triplets (fewer where the budget or `Budget.max_rank` leaves room for fewer) until
no module's next rank fits the budget in parameters, which is never exceeded. With interval=None the interval
is chosen so that the budget fills by `fill_by` * total_steps.

Start (`init`, as AdaLoRA's): "lora" (default) gives every triplet, the first ones and the ones added later,
LoRA's start: Q a Kaiming-uniform row (LoRA's A), P = 0 and lambda = 1, so dW does not move when a triplet is
born and P takes the gradient s G Q^T at once. "gaussian" is the paper's: P, Q ~ N(0, init_std^2), lambda = 0
at the start and `new_lambda` (1e-5) for added triplets; every gradient of P and Q is then proportional to a
lambda near 0, and on short runs the model does not train (docs/BENCHMARKS.md, "Why AdaLoRA lost"). The reference pre-trains "reserve" triplets; we add fresh ones and give them a
learning-rate warm-up instead: for `new_warmup` steps after its birth step b, the optimizer's update of a new
component's entries (its Q row, P column and lambda) is scaled by c = min(1, (t - b) / new_warmup),
    p <- p_before + c * (p_after - p_before)     (applied in on_step, right after optimizer.step()).
This acts on the update, not the gradient: Adam normalises gradients, so scaling them would change nothing,
while a new component's zero Adam state makes its first steps ~3x the usual size without it.
The scale s is the adapter's stored scale (alpha / r as injected), fixed as ranks grow.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from rankwise.allocate.adalora import (
    SensitivityEMA,
    check_state_ranks,
    gaussian_triplets,
    lora_start_rows,
    orthogonality_loss,
    resolve_steps,
    to_svd_form,
)
from rankwise.allocate.base import Allocator, AllocatorConfig, all_reduce_mean, register_allocator


@dataclass
class IncreLoraConfig(AllocatorConfig):
    """init_rank of every module (at least Budget.min_rank); top_h modules grow per round (None: a quarter
    of the modules, at least 1) by k ranks each; warmup_steps (None: 10% of total_steps); interval between
    rounds (None: fill the budget by fill_by * total_steps); init "lora" or "gaussian", beta1 / beta2, gamma,
    init_std as in AdaLoRA; new_lambda of new triplets under "gaussian"; new_warmup: steps of update ramp for
    new triplets; scale (None: the adapter's)."""

    init_rank: int = 1
    init: str = "lora"
    top_h: int | None = None
    k: int = 1
    warmup_steps: int | None = None
    interval: int | None = None
    fill_by: float = 0.8
    beta1: float = 0.85
    beta2: float = 0.85
    gamma: float = 0.1
    init_std: float = 0.02
    new_lambda: float = 1e-5
    new_warmup: int = 10
    scale: float | None = None

    def __post_init__(self) -> None:
        if self.init not in ("lora", "gaussian"):
            raise ValueError(f"IncreLoraConfig.init={self.init!r}; allowed: 'lora' (default) or 'gaussian' (the paper).")
        checks = {
            "init_rank": self.init_rank >= 1, "k": self.k >= 1, "gamma": self.gamma >= 0,
            "top_h": self.top_h is None or self.top_h >= 1, "interval": self.interval is None or self.interval >= 1,
            "warmup_steps": self.warmup_steps is None or self.warmup_steps >= 0, "fill_by": 0 < self.fill_by <= 1,
            "beta1": 0 <= self.beta1 < 1, "beta2": 0 <= self.beta2 < 1, "init_std": self.init_std > 0,
            "new_warmup": self.new_warmup >= 1, "scale": self.scale is None or self.scale > 0,
        }
        bad = [key for key, ok in checks.items() if not ok]
        if bad:
            raise ValueError(
                f"IncreLoraConfig: invalid {', '.join(f'{k}={getattr(self, k)!r}' for k in bad)}; need init_rank, k, "
                "new_warmup >= 1; top_h, interval >= 1 or None; warmup_steps >= 0 or None; 0 < fill_by <= 1; "
                "0 <= beta < 1; gamma >= 0; init_std, scale > 0."
            )


@register_allocator
class IncreLora(Allocator):
    """IncreLoRA under a parameter budget."""

    name = "increlora"
    Config = IncreLoraConfig

    def __init__(self, model, budget, config=None, **kwargs) -> None:
        super().__init__(model, budget, config, **kwargs)
        cfg: IncreLoraConfig = self.config
        for name, adapter in self.modules.items():
            if adapter.use_dora:
                raise ValueError(f"IncreLoRA: module {name!r} uses DoRA; its dL/d(dW) is not the layer's, use plain LoRA.")
        r0 = self.budget.clamp("", max(cfg.init_rank, self.budget.min_rank))
        for name, adapter in self.modules.items():
            if adapter.r > r0:
                self.resize_module(name, list(range(r0)), step=0)
            elif adapter.r < r0:
                self.resize_module(name, None, r0 - adapter.r, step=0)
            to_svd_form(adapter, cfg.init_std, self.generator, cfg.scale, cfg.init)
        if self.current_params() > self.budget_params:
            raise ValueError(
                f"IncreLoRA: rank {r0} on every module needs {self.current_params():,} parameters, over the budget "
                f"{self.budget_params:,}; raise the budget, lower init_rank, or target fewer modules."
            )
        self.top_h = cfg.top_h if cfg.top_h is not None else max(1, len(self.modules) // 4)
        self.warmup = resolve_steps(cfg.warmup_steps, 0.1, self.total_steps)
        self.interval = cfg.interval if cfg.interval is not None else self._auto_interval()
        self.ema = SensitivityEMA(cfg.beta1, cfg.beta2)
        self.born = {n: torch.zeros(a.r, dtype=torch.long) for n, a in self.modules.items()}  # 0: initial
        self.full = False
        self._grads: dict[str, torch.Tensor] = {}  # name -> (out, in) dL/d(dW), this step
        self._before: dict[str, tuple[torch.Tensor, ...]] = {}  # young components before optimizer.step()
        self._hooks = [layer.register_forward_hook(self._forward_hook(n)) for n, layer in self.layers.items()]

    def _auto_interval(self) -> int:
        """Steps between rounds so that top_h * k ranks per round fill the budget by fill_by * T."""
        per_round = self.top_h * self.config.k * (sum(self.costs.values()) / len(self.costs))
        rounds = max(1, math.ceil((self.budget_params - self.current_params()) / per_round))
        span = self.config.fill_by * self.total_steps - self.warmup
        return max(1, int(span // rounds))

    # ---- dL/d(dW) by hooks -------------------------------------------------------------------------------
    def _forward_hook(self, name: str):
        def hook(layer, args, output):
            if self.full or not torch.is_grad_enabled() or not output.requires_grad:
                return
            x = args[0].detach()
            output.register_hook(lambda g: self._accumulate(name, layer, x, g))
        return hook

    @torch.no_grad()
    def _accumulate(self, name: str, layer, x: torch.Tensor, g: torch.Tensor) -> None:
        adapter = self.modules[name]
        g = g.detach().float().reshape(-1, adapter.out_features)  # (tokens, out)
        if layer.kind.name == "embedding":
            grad = torch.zeros(adapter.out_features, adapter.in_features, device=g.device)
            grad.index_add_(1, x.reshape(-1), g.t())  # (out, vocab)
        else:
            grad = g.t() @ x.float().reshape(-1, adapter.in_features)  # (out, in)
        self._grads[name] = grad + self._grads[name] if name in self._grads else grad

    # ---- hooks ------------------------------------------------------------------------------------------
    def loss_term(self) -> torch.Tensor | None:
        if self.config.gamma == 0:
            return None
        reg = orthogonality_loss(list(self.modules.values()))
        return None if reg is None else self.config.gamma * reg

    @torch.no_grad()
    def on_backward(self, step: int) -> None:
        for name, grad in self._grads.items():
            a = self.modules[name]
            dw = a.delta_weight().detach().float()  # (out, in)
            self.ema.update(name, (dw * grad).abs().sum() / math.sqrt(dw.numel()))
        self._grads = {}
        self._before = {}
        for name, a in self.modules.items():
            young = self._young(name, step)
            if young.numel():
                self._before[name] = (young, a.lora_A[young].clone(), a.lora_B[:, young].clone(),
                                      a.rank_vector[young].clone())

    def on_step(self, step: int) -> None:
        self._ramp_updates(step)
        if not self.full and step > self.warmup and (step - self.warmup) % self.interval == 0:
            self.grow(step)

    def finalize(self) -> None:
        self._remove_hooks()

    # ---- learning-rate warm-up of new components ------------------------------------------------------
    def _young(self, name: str, step: int) -> torch.Tensor:
        born = self.born[name]
        return torch.nonzero((born > 0) & (step - born < self.config.new_warmup)).flatten()

    @torch.no_grad()
    def _ramp_updates(self, step: int) -> None:
        """p <- p_before + c (p_after - p_before) on young components, c = (t - birth) / new_warmup."""
        for name, (idx, a0, b0, e0) in self._before.items():
            a = self.modules[name]
            c = ((step - self.born[name][idx]).float() / self.config.new_warmup).clamp(max=1.0).to(a.lora_A.device)
            a.lora_A[idx] = a0 + c[:, None] * (a.lora_A[idx] - a0)
            a.lora_B[:, idx] = b0 + c[None, :] * (a.lora_B[:, idx] - b0)
            a.rank_vector[idx] = e0 + c * (a.rank_vector[idx] - e0)
        self._before = {}

    # ---- growth -----------------------------------------------------------------------------------------
    def module_scores(self) -> dict[str, float]:
        """{module: I_bar U_bar}, averaged over processes."""
        local = torch.stack([self.ema.score(n, ()).reshape(()).cpu() for n in self.modules])
        return dict(zip(self.modules, all_reduce_mean(local).tolist()))

    def grow(self, step: int) -> None:
        """Give the top_h modules k new triplets each, within the budget; mark the budget full when no rank fits."""
        scores = self.module_scores()
        names = list(self.modules)
        hi = self.budget.max_rank if self.budget.max_rank is not None else math.inf
        left = self.budget_params - self.current_params()
        granted = 0
        for name in sorted(names, key=lambda n: (-scores[n], names.index(n))):
            if granted == self.top_h:
                break
            a = self.modules[name]
            add = int(min(self.config.k, hi - a.r, left // self.costs[name]))
            if add <= 0:
                continue
            q, p, e = self._new_triplets(a, add)
            self.resize_module(name, None, add, step=step, score=scores[name], new_A=q, new_B=p, new_e=e)
            self.born[name] = torch.cat([self.born[name], torch.full((add,), step, dtype=torch.long)])
            left -= add * self.costs[name]
            granted += 1
        if not any(self.costs[n] <= left and self.modules[n].r < hi for n in names):
            self.full = True
            self._remove_hooks()

    def _new_triplets(self, adapter, k: int) -> tuple[torch.Tensor, torch.Tensor, float]:
        """(Q rows (k, in), P columns (out, k), lambda) of k new triplets; dW is unchanged either way."""
        if self.config.init == "gaussian":
            q, p = gaussian_triplets(adapter, k, self.config.init_std, self.generator)
            return q, p, self.config.new_lambda
        like = adapter.lora_A
        p = torch.zeros(adapter.out_features, k, dtype=like.dtype, device=like.device)
        return lora_start_rows(adapter, k, self.generator), p, 1.0

    def _remove_hooks(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []

    # ---- state --------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state.update(ema=self.ema.state_dict(), born={n: b.clone() for n, b in self.born.items()}, full=self.full,
                     scales={n: a.scale for n, a in self.modules.items()})
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        check_state_ranks(self, state)
        super().load_state_dict(state)
        self.ema.load_state_dict(state["ema"])
        self.born = {n: b.clone() for n, b in state["born"].items()}
        self.full = bool(state["full"])
        if self.full:
            self._remove_hooks()
        for name, scale in state["scales"].items():
            self.modules[name].scale = float(scale)
