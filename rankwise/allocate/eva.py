"""EVA: explained-variance adaptation. A from the principal directions of each layer's inputs, ranks from a
global ranking of explained-variance ratios, decided once before training.

Paischer et al., 2024, "One Initialization to Rule them All: Fine-tuning via Explained Variance Adaptation"
(arXiv:2410.07170). In `prepare`, for each adapted layer i with input rows X_i (tokens, in_i) (padding
tokens, where the batch's attention_mask is 0, left out):

1. Incremental PCA over batches: running sums give the mean mu_i and covariance
   C_i = sum_t (x_t - mu_i)(x_t - mu_i)^T / N_i   (in_i, in_i), exact over all rows seen so far (the sums are
   averaged over processes every batch, so every process holds the same C_i). Its top k_i = min(ceil(rho *
   r_ref), in_i) eigenpairs (lambda_j, v_j), with explained-variance ratios lambda_j / trace(C_i);
   r_ref = budget / sum_i (in_i + out_i). The eigenpairs are exact (eigh) for in_i <= 1024; wider layers use
   a block power iteration warm-started from the previous batch (`RunningPCA.top_eigen`).
2. Convergence: a layer stops collecting once |cos(v_j^t, v_j^(t-1))| >= tau between consecutive batches for
   each of its top components that the current allocation gives it (as the reference does, it collects again
   if a later allocation gives it more). Collection ends when every layer converged or after `max_batches`.
3. Allocation: all layers' ratios are ranked globally and components taken in that order while the parameter
   budget allows (`budget.select_components`), so r_i is the number of layer i's components in the top;
   r_i = 0 leaves layer i with an empty adapter (and out of the export).
4. Init: A_i = top r_i eigenvectors (r_i, in_i) (unit rows), B_i = 0, so the model is unchanged at step 0.
   Scale: alpha_i = alpha * r_i / r0 with r0 the adapter's rank before EVA, s_i = lora_scale(alpha_i, r_i):
   under alpha / r scaling s_i = alpha / r0, the scale the user configured, whatever the new rank.

Layers whose inputs are identical on the first batch (q, k, v of one attention block) share one
decomposition, as in the reference code; they still get their own rank from the global ranking.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from rankwise.allocate.base import Allocator, AllocatorConfig, default_loss, register_allocator
from rankwise.allocate.budget import select_components
from rankwise.init.calibration import all_reduce_mean, iterate, token_rows
from rankwise.layers.scaling import lora_scale


@dataclass
class EVAConfig(AllocatorConfig):
    """rho: components kept per layer = ceil(rho * r_ref); tau: cosine threshold for convergence;
    max_batches: stop collecting after this many batches even if some layer has not converged."""

    rho: float = 2.0
    tau: float = 0.99
    max_batches: int = 64

    def __post_init__(self) -> None:
        if self.rho < 1:
            raise ValueError(f"EVAConfig.rho={self.rho!r} must be >= 1 (components per layer = ceil(rho * r)).")
        if not 0 < self.tau <= 1:
            raise ValueError(f"EVAConfig.tau={self.tau!r} must be in (0, 1].")
        if self.max_batches < 1:
            raise ValueError(f"EVAConfig.max_batches={self.max_batches!r} must be >= 1.")


class RunningPCA:
    """Mean and covariance of the rows seen so far, from running sums (float64)."""

    def __init__(self, dim: int, k: int) -> None:
        self.k = k
        self.n = 0.0
        self.sum = torch.zeros(dim, dtype=torch.float64)  # (in,)
        self.outer = torch.zeros(dim, dim, dtype=torch.float64)  # (in, in)
        self.components: torch.Tensor | None = None  # (k, in) rows, descending variance
        self.ratios: torch.Tensor | None = None  # (k,)
        self.similarity = torch.zeros(k)  # |cos| with the previous batch's components
        self.batches = 0
        self.exact_max_dim = 1024  # full eigendecomposition up to this many inputs
        self.basis: torch.Tensor | None = None  # (in, k + 8) warm start of the power iteration above it

    def update(self, rows: torch.Tensor) -> None:
        """rows: (tokens, in) of one batch on this process; statistics are averaged over processes."""
        rows = rows.double()  # on the model's device; the running sums live on the CPU
        local = torch.cat([rows.sum(0), (rows.t() @ rows).flatten(), rows.new_tensor([float(rows.shape[0])])]).cpu()
        merged = all_reduce_mean(local)
        dim = self.sum.shape[0]
        self.sum += merged[:dim]
        self.outer += merged[dim:-1].reshape(dim, dim)
        self.n += merged[-1].item()
        self.batches += 1
        previous = self.components
        mean = self.sum / self.n
        cov = self.outer / self.n - torch.outer(mean, mean)  # (in, in)
        vals, vecs = self.top_eigen(cov)  # (k,), (in, k), descending
        total = cov.diagonal().sum().clamp_min(1e-30)  # the sum of all eigenvalues
        self.components = vecs.t().float().contiguous()  # (k, in)
        self.ratios = (vals.clamp_min(0) / total).float()
        if previous is not None:
            self.similarity = (self.components * previous).sum(1).abs()

    def top_eigen(self, cov: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-k eigenpairs of cov (in, in): exact up to `exact_max_dim` inputs; above, block power iteration
        on k + 8 vectors warm-started from the previous batch's basis, then Rayleigh-Ritz (the incremental
        SVD: the covariance moves little between batches, so a few iterations per batch track it)."""
        dim = cov.shape[0]
        if dim <= self.exact_max_dim:
            vals, vecs = torch.linalg.eigh(cov)  # ascending
            return vals.flip(0)[: self.k], vecs.flip(1)[:, : self.k]
        width = min(dim, self.k + 8)
        if self.basis is None:  # a fixed start, so every process of a run computes the same vectors
            start = torch.randn(dim, width, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
            self.basis, iterations = torch.linalg.qr(start)[0], 30
        else:
            iterations = 8
        for _ in range(iterations):
            self.basis = torch.linalg.qr(cov @ self.basis)[0]  # (in, width)
        vals, small = torch.linalg.eigh(self.basis.t() @ cov @ self.basis)  # (width,), (width, width)
        self.basis = self.basis @ small.flip(1)
        return vals.flip(0)[: self.k], self.basis[:, : self.k]

    def converged(self, needed: int, tau: float) -> bool:
        return self.batches >= 2 and bool((self.similarity[:needed] >= tau).all())


@register_allocator
class EVA(Allocator):
    name = "eva"
    Config = EVAConfig

    def __init__(self, model, budget, config=None, **kwargs) -> None:
        super().__init__(model, budget, config, **kwargs)
        for name, layer in self.layers.items():
            if layer.kind.name == "embedding":
                raise ValueError(
                    f"EVA decomposes layer inputs, but {name!r} is an embedding (its input is token ids); "
                    "exclude it from target_modules."
                )
        self.r_ref = self.budget_params / sum(self.costs.values())
        self.pca: dict[str, RunningPCA] = {}  # one per group of layers with identical inputs
        self.group_of: dict[str, str] = {}  # layer -> the layer whose decomposition it uses
        self.batches_used = 0
        self.all_converged = False

    def n_components(self, name: str) -> int:
        k = min(math.ceil(self.config.rho * self.r_ref), self.modules[name].in_features)
        if self.budget.max_rank is not None:
            k = min(k, self.budget.max_rank)
        return max(k, 0)

    def _group(self, inputs: dict[str, torch.Tensor]) -> None:
        """Layers whose first-batch inputs are equal share the first one's decomposition (k: the most any
        member needs). Every process must find the same groups, which is checked."""
        for name in self.modules:
            if name not in inputs:
                continue
            x = inputs[name]
            rep = next((r for r in self.pca if inputs[r].shape == x.shape and torch.equal(inputs[r], x)), None)
            self.group_of[name] = rep or name
            if rep is None:
                self.pca[name] = RunningPCA(self.modules[name].in_features, 0)
        for rep, pca in self.pca.items():
            pca.k = max(self.n_components(n) for n, g in self.group_of.items() if g == rep)
            pca.similarity = torch.zeros(pca.k)
        order = list(self.modules)
        local = torch.tensor([float(order.index(self.group_of.get(n, n))) for n in order], dtype=torch.float64)
        if not torch.equal(all_reduce_mean(local), local):
            raise RuntimeError(
                "EVA: processes found different groups of layers with identical inputs; give every process "
                "batches of the same structure (the grouping must agree before statistics are shared)."
            )

    def allocation(self) -> dict[str, int]:
        scores = {}
        for name in self.modules:
            pca = self.pca.get(self.group_of.get(name, ""))
            k = self.n_components(name)
            scores[name] = pca.ratios[:k] if pca is not None and pca.ratios is not None else torch.zeros(0)
        keep = select_components(scores, self.costs, self.budget_params, self.budget.min_rank, self.budget.max_rank)
        return {n: int(idx.numel()) for n, idx in keep.items()}

    @torch.no_grad()
    def prepare(self, batches=None, loss_fn=default_loss) -> None:
        """Collect input statistics and set ranks and A. `loss_fn(model, batch)` only serves to run the
        forward pass (under no_grad; nothing is differentiated)."""
        if batches is None:
            raise ValueError("EVA decomposes layer inputs: pass calibration batches to prepare(batches, loss_fn).")
        captured: dict[str, torch.Tensor] = {}
        active = set(self.modules)

        def hook_for(name: str):
            def hook(module, args, output) -> None:
                if name in active:
                    captured[name] = token_rows(args[0], current["batch"])
            return hook

        current: dict[str, Any] = {}
        handles = [self.layers[n].register_forward_hook(hook_for(n)) for n in self.modules]
        was_training = self.model.training
        self.model.eval()
        ranks: dict[str, int] = {}
        try:
            for batch in iterate(batches, self.config.max_batches):
                current["batch"], captured = batch, {}
                loss_fn(self.model, batch)
                if not self.pca:
                    self._group(captured)
                    active = set(self.pca)
                for rep, pca in self.pca.items():
                    if rep in active:
                        if rep not in captured:
                            raise ValueError(f"EVA: module {rep!r} took no part in a calibration batch; exclude it "
                                             "from target_modules or give batches that use it.")
                        pca.update(captured[rep])
                self.batches_used += 1
                ranks = self.allocation()
                needed = {rep: max(ranks[n] for n, g in self.group_of.items() if g == rep) for rep in self.pca}
                active = {rep for rep, pca in self.pca.items() if not pca.converged(needed[rep], self.config.tau)}
                if not active:
                    break
        finally:
            for h in handles:
                h.remove()
            self.model.train(was_training)
        if not self.pca:
            raise ValueError("EVA saw no batches; pass at least one calibration batch.")
        self.all_converged = not active
        self.apply(ranks)

    def apply(self, ranks: dict[str, int]) -> None:
        for name, r in ranks.items():
            adapter = self.modules[name]
            r0 = adapter.r
            pca = self.pca.get(self.group_of.get(name, ""))
            A = pca.components[:r] if pca is not None else torch.zeros(0, adapter.in_features)  # (r, in)
            dtype, device = adapter.lora_A.dtype, adapter.lora_A.device
            self.resize_module(name, [], r, step=0, score=float(pca.ratios[:r].sum()) if pca is not None else 0.0,
                               new_A=A.to(dtype=dtype, device=device),
                               new_B=torch.zeros(adapter.out_features, r, dtype=dtype, device=device))
            if r > 0:  # a rank-0 adapter keeps its scale, should anything grow it later
                adapter.scale = lora_scale(adapter.alpha * r / max(r0, 1), r, adapter.use_rslora)

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["batches_used"] = self.batches_used
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.batches_used = state["batches_used"]
