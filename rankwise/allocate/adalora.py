"""AdaLoRA: SVD-form adapters whose least important triplets are removed on a cubic budget schedule.

Zhang et al., "Adaptive Budget Allocation for Parameter-Efficient Fine-Tuning", ICLR 2023 (arXiv:2303.10512).

    dW = s * P diag(lambda) Q        P = lora_B (out, r),  lambda = rank_vector (r,),  Q = lora_A (r, in)

dW = 0 at step 0: by default (`init="lora"`) Q starts as LoRA's A (Kaiming-uniform rows), P = 0 and lambda = 1;
`init="gaussian"` is the paper's P, Q ~ N(0, init_std^2), lambda = 0. The training loss gets the orthogonality term

    R = gamma * mean over the 2M matrices of ( ||P^T P - I||_F , ||Q Q^T - I||_F )

Every element w of P, lambda, Q has a sensitivity I = |w * dL/dw|, smoothed as (eq. 8-9 of the paper)

    I_bar <- beta1 I_bar + (1 - beta1) I,   U_bar <- beta2 U_bar + (1 - beta2) |I - I_bar|,   s(w) = I_bar * U_bar

and triplet i scores S_i = s(lambda_i) + mean_j s(P_ji) + mean_j s(Q_ij). The budget b(t), in parameters, follows
`budget.cubic_schedule` from b0 (the parameters of the initial ranks) down to the `Budget`: b0 for t <= t_i,
cubic decay, the Budget for the last t_f steps. Every `interval` steps after the warm-up, and once when the
final phase starts, the highest-scoring triplets that fit b(t) are kept (`select_components`, each triplet
costing in + out of its module) and the others are physically removed. Scores are averaged over processes
first, so every process removes the same triplets.

Deliberate differences from the paper / PEFT:
- removal is physical and permanent: PEFT only masks lambda and computes at r_init all run long (a masked
  triplet can come back); here the cost falls as the ranks do.
- the default start is LoRA's (Q Kaiming, P = 0, lambda = 1), not the paper's (P, Q ~ N(0, 0.02^2), lambda = 0).
  With the paper's start every P and Q gradient is proportional to lambda = 0 and lambda_i only sees the
  projection p_i^T G q_i of the gradient on a random direction, so the adapter barely learns for hundreds of
  steps: on MiniLM / SST-2 after 100 steps at lr 1e-3 the update norm ||dW|| was 14x smaller than plain LoRA's
  and the training loss still at chance (0.68 vs 0.47; 0.68 even with scale 20), while the LoRA start reached
  0.45 (docs/BENCHMARKS.md, Quality). P = 0 gets LoRA's B gradient s G Q^T at once; the orthogonality term
  has zero gradient at P = 0 and pulls the factors towards SVD form as they grow.
- the scale s is the adapter's stored scale, alpha / r_init, fixed for the run (changing it with the rank would
  change the function). With rankwise's convention alpha = 2 r that is 2, the step size of plain LoRA. PEFT's
  AdaLoRA users often keep lora_alpha = 8 with a large init_r, e.g. 8 / 64 = 0.125: the singular values then
  learn 16x slower than plain LoRA's update (METHODS.md: the MetaMathQA run that lost to LoRA). Set `scale` to
  override it; a scale below 0.5 triggers a warning.

The helpers at the top (SVD-form init, orthogonality term, `SensitivityEMA`) are shared with IncreLoRA.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import torch

from rankwise.allocate.base import Allocator, AllocatorConfig, all_reduce_mean, register_allocator
from rankwise.allocate.budget import cubic_schedule, select_components
from rankwise.layers.adapter import LoraAdapter


# ---- helpers shared with IncreLoRA ------------------------------------------------------------------------
def gaussian_triplets(adapter: LoraAdapter, k: int, std: float, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """k new SVD-form triplets' factors: (Q rows (k, in), P columns (out, k)), both ~ N(0, std^2)."""
    q = torch.randn(k, adapter.in_features, generator=generator) * std
    p = torch.randn(adapter.out_features, k, generator=generator) * std
    like = adapter.lora_A
    return q.to(dtype=like.dtype, device=like.device), p.to(dtype=like.dtype, device=like.device)


def lora_start_rows(adapter: LoraAdapter, k: int, generator: torch.Generator) -> torch.Tensor:
    """k rows (k, in) like LoRA's A: U(-1/sqrt(in), 1/sqrt(in)), on the adapter's device and dtype."""
    bound = 1.0 / adapter.in_features**0.5
    q = (torch.rand(k, adapter.in_features, generator=generator) * 2 - 1) * bound
    return q.to(dtype=adapter.lora_A.dtype, device=adapter.lora_A.device)


@torch.no_grad()
def to_svd_form(adapter: LoraAdapter, std: float, generator: torch.Generator, scale: float | None,
                init: str = "gaussian") -> None:
    """Re-initialise `adapter` in place as AdaLoRA triplets with dW = 0: "gaussian" P, Q ~ N(0, std^2) and
    lambda = 0 (the paper); "lora" Q ~ U(-1/sqrt(in), 1/sqrt(in)) (LoRA's A), P = 0, lambda = 1."""
    if init == "lora":
        adapter.lora_A.copy_(lora_start_rows(adapter, adapter.r, generator))
        adapter.lora_B.zero_()
        adapter.enable_rank_vector(1.0).data.fill_(1.0)
    else:
        q, p = gaussian_triplets(adapter, adapter.r, std, generator)
        adapter.lora_A.copy_(q)
        adapter.lora_B.copy_(p)
        adapter.enable_rank_vector(0.0).zero_()
    if scale is not None:
        adapter.scale = float(scale)


def orthogonality_loss(adapters: list[LoraAdapter]) -> torch.Tensor | None:
    """mean over matrices of ||P^T P - I||_F and ||Q Q^T - I||_F (rank-0 adapters have no matrices).

    It runs every step, so factors of the same shape are stacked and go through one bmm and one batched
    norm: a few kernels per distinct shape instead of several per module (on a GPU the launches, not the
    flops, are the cost of this term)."""
    groups: dict[tuple, list[torch.Tensor]] = {}  # (P or Q, shape, dtype, device) -> factors
    for a in adapters:
        if a.r == 0:
            continue
        for kind, f in (("P", a.lora_B), ("Q", a.lora_A)):
            groups.setdefault((kind, tuple(f.shape), f.dtype, f.device), []).append(f)
    terms = []
    for (kind, _, dtype, device), factors in groups.items():
        x = torch.stack(factors)  # P: (G, out, r); Q: (G, r, in)
        gram = x.transpose(1, 2) @ x if kind == "P" else x @ x.transpose(1, 2)  # P^T P or Q Q^T: (G, r, r)
        eye = torch.eye(gram.shape[-1], dtype=dtype, device=device)
        terms.append(torch.linalg.matrix_norm(gram - eye))  # (G,)
    return torch.cat(terms).mean() if terms else None


class SensitivityEMA:
    """Smoothed sensitivity times uncertainty (AdaLoRA eq. 8-9), for tensors of any shape under string keys.

    I_bar <- beta1 I_bar + (1 - beta1) I;  U_bar <- beta2 U_bar + (1 - beta2) |I - I_bar|;  score = I_bar U_bar.
    """

    def __init__(self, beta1: float, beta2: float) -> None:
        self.beta1, self.beta2 = beta1, beta2
        self.ibar: dict[str, torch.Tensor] = {}
        self.ubar: dict[str, torch.Tensor] = {}

    def update(self, key: str, value: torch.Tensor) -> None:
        self.update_many([key], [value])

    @torch.no_grad()
    def update_many(self, keys: list[str], values: list[torch.Tensor]) -> None:
        """`update` of many tensors at once: each line of the EMA is one `_foreach` op over all of them (a few
        kernel launches per step instead of several per tensor). A new key, or one whose shape changed,
        starts from zeros."""
        values = [v.detach().float() for v in values]
        for key, value in zip(keys, values, strict=True):
            if key not in self.ibar or self.ibar[key].shape != value.shape:
                self.ibar[key] = torch.zeros_like(value)
                self.ubar[key] = torch.zeros_like(value)
        if not keys:
            return
        ibar, ubar = [self.ibar[k] for k in keys], [self.ubar[k] for k in keys]
        torch._foreach_mul_(ibar, self.beta1)
        torch._foreach_add_(ibar, values, alpha=1 - self.beta1)  # I_bar
        deviation = torch._foreach_sub(values, ibar)
        torch._foreach_abs_(deviation)  # |I - I_bar|
        torch._foreach_mul_(ubar, self.beta2)
        torch._foreach_add_(ubar, deviation, alpha=1 - self.beta2)  # U_bar

    def score(self, key: str, shape: tuple[int, ...], device: torch.device | None = None) -> torch.Tensor:
        """I_bar * U_bar, or zeros of `shape` for a key never updated."""
        if key not in self.ibar or tuple(self.ibar[key].shape) != tuple(shape):
            return torch.zeros(shape, device=device)
        return self.ibar[key] * self.ubar[key]

    def select(self, key: str, dim: int, keep: torch.Tensor) -> None:
        """Keep entries `keep` along `dim` (after the matching parameter was resized)."""
        for store in (self.ibar, self.ubar):
            if key in store:
                store[key] = store[key].index_select(dim, keep.to(store[key].device))

    def state_dict(self) -> dict[str, Any]:
        return {"ibar": {k: v.clone() for k, v in self.ibar.items()},
                "ubar": {k: v.clone() for k, v in self.ubar.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.ibar = {k: v.clone() for k, v in state["ibar"].items()}
        self.ubar = {k: v.clone() for k, v in state["ubar"].items()}


def check_state_ranks(alloc: Allocator, state: dict[str, Any]) -> None:
    """A resumed allocator must see the ranks its state was saved with."""
    if state.get("name") != alloc.name:
        raise ValueError(f"State of allocator {state.get('name')!r} cannot be loaded into {alloc.name!r}.")
    if dict(state["ranks"]) != alloc.ranks:
        raise ValueError(
            f"{alloc.name}: the model's ranks {alloc.ranks} differ from the saved ones {dict(state['ranks'])}; call "
            "rankwise.io.shapes.match_adapter_shapes(model, model_state) and model.load_state_dict(model_state) "
            "before allocator.load_state_dict."
        )


def resolve_steps(value: int | None, fraction: float, total_steps: int) -> int:
    return round(fraction * total_steps) if value is None else int(value)


# ---- AdaLoRA --------------------------------------------------------------------------------------------
@dataclass
class AdaLoraConfig(AllocatorConfig):
    """gamma: orthogonality weight (paper 0.1-0.5); beta1 / beta2: sensitivity / uncertainty EMA;
    warmup_steps t_i (None: 10% of total_steps); final_steps t_f (None: 20%); interval deltaT between prunes;
    init: "lora" (Q Kaiming, P = 0, lambda = 1) or "gaussian" (the paper: P, Q ~ N(0, init_std^2), lambda = 0);
    init_std of P and Q for "gaussian"; scale: s of dW = s P diag(lambda) Q (None: the adapter's alpha / r_init)."""

    gamma: float = 0.1
    beta1: float = 0.85
    beta2: float = 0.85
    warmup_steps: int | None = None
    final_steps: int | None = None
    interval: int = 10
    init: str = "lora"
    init_std: float = 0.02
    scale: float | None = None

    def __post_init__(self) -> None:
        if self.init not in ("lora", "gaussian"):
            raise ValueError(f"AdaLoraConfig.init={self.init!r}; allowed: 'lora' (default) or 'gaussian' (the paper).")
        if self.gamma < 0:
            raise ValueError(f"AdaLoraConfig.gamma={self.gamma!r} must be >= 0 (paper: 0.1-0.5).")
        for key in ("beta1", "beta2"):
            if not 0.0 <= getattr(self, key) < 1.0:
                raise ValueError(f"AdaLoraConfig.{key}={getattr(self, key)!r} must be in [0, 1) (paper: 0.85).")
        for key in ("warmup_steps", "final_steps"):
            if getattr(self, key) is not None and getattr(self, key) < 0:
                raise ValueError(f"AdaLoraConfig.{key}={getattr(self, key)!r} must be >= 0 or None.")
        if self.interval < 1:
            raise ValueError(f"AdaLoraConfig.interval={self.interval!r} must be >= 1 step.")
        if self.init_std <= 0 or (self.scale is not None and self.scale <= 0):
            raise ValueError(f"AdaLoraConfig: init_std={self.init_std!r} and scale={self.scale!r} must be > 0.")


@register_allocator
class AdaLora(Allocator):
    """AdaLoRA under a parameter budget; the adapter's injected ranks are r_init (give ~1.5x the target)."""

    name = "adalora"
    fold_scale_into = "rank_vector"  # P stays near orthonormal for the orthogonality term
    Config = AdaLoraConfig

    def __init__(self, model, budget, config=None, **kwargs) -> None:
        super().__init__(model, budget, config, **kwargs)
        cfg: AdaLoraConfig = self.config
        for adapter in self.modules.values():
            to_svd_form(adapter, cfg.init_std, self.generator, cfg.scale, cfg.init)
        low = {n: a.scale for n, a in self.modules.items() if a.r > 0 and a.scale < 0.5}
        if low:
            warnings.warn(
                f"AdaLoRA scale s = alpha / r_init is {min(low.values()):.3g} on {len(low)} module(s): singular values "
                "will learn slowly (PEFT's MetaMathQA problem). Pass AdaLoraConfig(scale=2.0) or inject with alpha = 2 r.",
                stacklevel=2,
            )
        self.warmup = resolve_steps(cfg.warmup_steps, 0.1, self.total_steps)
        self.final = resolve_steps(cfg.final_steps, 0.2, self.total_steps)
        if self.warmup + self.final >= self.total_steps:
            raise ValueError(
                f"AdaLoRA: warmup_steps={self.warmup} + final_steps={self.final} leave no pruning phase in "
                f"total_steps={self.total_steps}; lower them or raise total_steps."
            )
        self.start_params = self.current_params()
        if self.start_params <= self.budget_params:
            warnings.warn(
                f"AdaLoRA starts with {self.start_params:,} parameters, within the budget {self.budget_params:,}: "
                "nothing will be pruned. Inject a larger rank (about 1.5x the target) so AdaLoRA has a choice.",
                stacklevel=2,
            )
        self.ema = SensitivityEMA(cfg.beta1, cfg.beta2)
        self.final_done = False
        self.last_step = 0

    def target_params(self, step: int) -> int:
        """b(t): the scheduled budget in parameters."""
        end = min(self.budget_params, self.start_params)
        return int(cubic_schedule(step, self.total_steps, self.start_params, end, self.warmup, self.final))

    # ---- hooks ------------------------------------------------------------------------------------------
    def loss_term(self) -> torch.Tensor | None:
        if self.config.gamma == 0:
            return None
        reg = orthogonality_loss(list(self.modules.values()))
        return None if reg is None else self.config.gamma * reg

    @torch.no_grad()
    def on_backward(self, step: int) -> None:
        if self.final_done:
            return  # the structure is final: scores are no longer needed
        keys, params, grads = [], [], []
        for name, a in self.modules.items():
            for key, p in (("A", a.lora_A), ("B", a.lora_B), ("e", a.rank_vector)):
                if a.r > 0 and p.grad is not None:
                    keys.append(f"{name}.{key}")
                    params.append(p)
                    grads.append(p.grad)
        if not keys:
            return
        sensitivity = torch._foreach_mul(params, grads)
        torch._foreach_abs_(sensitivity)  # I = |w * dL/dw| of every element of every adapter, batched
        self.ema.update_many(keys, sensitivity)

    def on_step(self, step: int) -> None:
        self.last_step = step
        if self.final_done or step <= self.warmup:
            return
        final = step >= self.total_steps - self.final
        if final or (step - self.warmup) % self.config.interval == 0:
            self.prune_to(self.target_params(step), step)
            self.final_done = final

    def finalize(self) -> None:
        """Training stopped before the final phase: prune to the Budget now, so the export respects it."""
        if not self.final_done:
            self.prune_to(min(self.budget_params, self.start_params), self.last_step)
            self.final_done = True

    # ---- scoring and pruning ---------------------------------------------------------------------------
    def triplet_scores(self) -> dict[str, torch.Tensor]:
        """{module: (r,) S_i}, averaged over processes."""
        local = []
        for name, a in self.modules.items():
            dev = a.lora_A.device
            s_e = self.ema.score(f"{name}.e", (a.r,), dev)
            s_q = self.ema.score(f"{name}.A", (a.r, a.in_features), dev).mean(dim=1)  # Q row i: (r,)
            s_p = self.ema.score(f"{name}.B", (a.out_features, a.r), dev).mean(dim=0)  # P column i: (r,)
            local.append((s_e + s_q + s_p).float())
        flat = all_reduce_mean(torch.cat(local)) if local else torch.zeros(0)
        return dict(zip(self.modules, torch.split(flat, [a.r for a in self.modules.values()])))

    def prune_to(self, target: int, step: int) -> None:
        """Keep the best triplets within `target` parameters; physically remove the rest."""
        if self.current_params() <= target:
            return
        scores = self.triplet_scores()
        keep = select_components(scores, self.costs, target, self.budget.min_rank, self.budget.max_rank)
        with self.batch_resizes():
            for name, idx in keep.items():
                if idx.numel() == self.modules[name].r:
                    continue
                mean = float(scores[name].mean()) if scores[name].numel() else 0.0
                self.resize_module(name, idx, step=step, score=mean)
                self.ema.select(f"{name}.A", 0, idx)
                self.ema.select(f"{name}.B", 1, idx)
                self.ema.select(f"{name}.e", 0, idx)

    # ---- state --------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state.update(ema=self.ema.state_dict(), start_params=self.start_params, final_done=self.final_done,
                     last_step=self.last_step, scales={n: a.scale for n, a in self.modules.items()})
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        check_state_ranks(self, state)
        super().load_state_dict(state)
        self.ema.load_state_dict(state["ema"])
        self.start_params = int(state["start_params"])
        self.final_done = bool(state["final_done"])
        self.last_step = int(state["last_step"])
        for name, scale in state["scales"].items():
            self.modules[name].scale = float(scale)
