"""ALoRA: ablation scores per rank on a held-out batch; prune the worst ranks, regrow them where it pays.

Liu et al., "ALoRA: Allocating Low-Rank Adaptation for Fine-tuning Large Language Models", NAACL 2024
(arXiv:2403.16187).

    dW = s * B diag(g) A         g = rank_vector (r,), frozen at 1: a gate used only to switch ranks off

Every module starts at the target average rank r0 = floor(Budget / sum_i (in_i + out_i)) (no over-provisioning).
The score of rank k, on one fixed held-out batch (`set_eval_batch`), with S = - loss:

    score_k = S(only rank k kept, in the whole model) - S(all ranks but k)
            = [S(only k) - S(no adapter)] + [S(all) - S(all but k)] - [S(all) - S(no adapter)]

that is the gain of rank k alone plus its loss when removed from the rest, minus a constant shared by every
rank (so the global ranking is the one of the two contributions). "Only k" must switch off every other
module's ranks too: within one module the subtracted term would be that module's total contribution, which
penalises exactly the modules that matter. 2 forward passes per rank, no gradients. After `warmup_steps`, every `interval`
steps, for up to `n_rounds` rounds: score all ranks (averaged over processes), remove the globally lowest
`n_prune` ranks (default: the number of modules; never below `Budget.min_rank`), then give ranks to the modules
that lost none, one at a time, each to the module with the largest average score / (ranks given so far + 1)
(D'Hondt: more to higher average score), while the parameter budget allows: the freed parameters plus any
budget left unused by r0's rounding. If every module lost a rank, all modules that kept one may receive.
New ranks are function-preserving: A rows Kaiming-uniform (drawn from the allocator's generator), B = 0, g = 1.
The parameter count sum_i r_i (in_i + out_i) never exceeds the Budget, at any step.

Paper schedule: 1 epoch of warm-up, then 8 rounds each followed by 0.25 epoch; the defaults mirror it as
fractions of total_steps (warm-up T / 3, interval T / 12). The eval batch is not part of `state_dict`: after a
resume, call `set_eval_batch` again (a round without one raises).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from rankwise.allocate.adalora import check_state_ranks
from rankwise.allocate.base import Allocator, AllocatorConfig, LossFn, all_reduce_mean, default_loss, register_allocator
from rankwise.layers.adapter import LoraAdapter


@dataclass
class AloraConfig(AllocatorConfig):
    """n_rounds of prune-and-regrow; warmup_steps before the first (None: total_steps // 3); interval between
    rounds (None: total_steps // 12, at least 1); n_prune ranks removed per round (None: number of modules)."""

    n_rounds: int = 8
    warmup_steps: int | None = None
    interval: int | None = None
    n_prune: int | None = None

    def __post_init__(self) -> None:
        if self.n_rounds < 0:
            raise ValueError(f"AloraConfig.n_rounds={self.n_rounds!r} must be >= 0 (paper: 8).")
        if self.warmup_steps is not None and self.warmup_steps < 0:
            raise ValueError(f"AloraConfig.warmup_steps={self.warmup_steps!r} must be >= 0 or None.")
        for key in ("interval", "n_prune"):
            if getattr(self, key) is not None and getattr(self, key) < 1:
                raise ValueError(f"AloraConfig.{key}={getattr(self, key)!r} must be >= 1 or None.")


def kaiming_from(generator: torch.Generator, adapter: LoraAdapter, k: int) -> torch.Tensor:
    """(k, in) rows ~ U(-1/sqrt(in), 1/sqrt(in)) (nn.Linear's / PEFT's A init), from `generator`."""
    bound = 1.0 / math.sqrt(adapter.in_features)
    rows = (torch.rand(k, adapter.in_features, generator=generator) * 2 - 1) * bound
    return rows.to(dtype=adapter.lora_A.dtype, device=adapter.lora_A.device)


@register_allocator
class Alora(Allocator):
    """ALoRA under a parameter budget."""

    name = "alora"
    Config = AloraConfig

    def __init__(self, model, budget, config=None, **kwargs) -> None:
        super().__init__(model, budget, config, **kwargs)
        cfg: AloraConfig = self.config
        r0 = self.budget.clamp("", self.budget_params // sum(self.costs.values()))
        if r0 < 1:
            raise ValueError(
                f"ALoRA: the budget of {self.budget_params:,} parameters does not pay for rank 1 on every module "
                f"({sum(self.costs.values()):,}); raise the budget or target fewer modules."
            )
        for name, adapter in self.modules.items():
            if adapter.r > r0:
                self.resize_module(name, list(range(r0)), step=0)
            elif adapter.r < r0:
                self.grow(name, r0 - adapter.r, step=0)
            adapter.enable_rank_vector(1.0).data.fill_(1.0)
            adapter.rank_vector.requires_grad_(False)
        self.warmup = cfg.warmup_steps if cfg.warmup_steps is not None else self.total_steps // 3
        self.interval = cfg.interval if cfg.interval is not None else max(1, self.total_steps // 12)
        self.n_prune = cfg.n_prune if cfg.n_prune is not None else len(self.modules)
        self.rounds_done = 0
        self.eval_batch: Any = None
        self.eval_loss: LossFn = default_loss

    def set_eval_batch(self, batch: Any, loss_fn: LossFn = default_loss) -> None:
        self.eval_batch, self.eval_loss = batch, loss_fn

    def grow(self, name: str, add: int, step: int, score: float | None = None) -> None:
        """Append `add` function-preserving ranks (A Kaiming, B = 0, g = 1) to module `name`."""
        adapter = self.modules[name]
        self.resize_module(name, None, add, step=step, score=score, new_A=kaiming_from(self.generator, adapter, add),
                           new_e=1.0)

    # ---- hooks ------------------------------------------------------------------------------------------
    def on_step(self, step: int) -> None:
        if self.rounds_done < self.config.n_rounds and step >= self.warmup + self.rounds_done * self.interval:
            self.run_round(step)

    # ---- scoring ----------------------------------------------------------------------------------------
    @torch.no_grad()
    def rank_scores(self) -> dict[str, torch.Tensor]:
        """{module: (r,) S(only k) - S(without k)} on the eval batch, averaged over processes."""
        if self.eval_batch is None:
            raise RuntimeError(
                "ALoRA scores ranks on a held-out batch: call allocator.set_eval_batch(batch, loss_fn) before "
                "training (and again after resuming from a checkpoint)."
            )
        was_training = self.model.training
        self.model.eval()
        gates = [a.rank_vector for a in self.modules.values()]
        saved = [g.detach().clone() for g in gates]
        local = []
        try:
            for gate, full in zip(gates, saved):
                scores = torch.zeros(full.numel())
                for k in range(full.numel()):
                    for g in gates:  # only rank k in the whole model
                        g.zero_()
                    gate[k] = full[k]
                    loss_only = float(self.eval_loss(self.model, self.eval_batch))
                    for g, s in zip(gates, saved):  # everything but rank k
                        g.copy_(s)
                    gate[k] = 0
                    loss_without = float(self.eval_loss(self.model, self.eval_batch))
                    gate[k] = full[k]
                    scores[k] = loss_without - loss_only  # S(only k) - S(without k), S = -loss
                local.append(scores)
        finally:
            for g, s in zip(gates, saved):
                g.copy_(s)
            self.model.train(was_training)
        flat = all_reduce_mean(torch.cat(local))
        return dict(zip(self.modules, torch.split(flat, [a.r for a in self.modules.values()])))

    # ---- one round ----------------------------------------------------------------------------------------
    def run_round(self, step: int) -> None:
        scores = self.rank_scores()
        names = list(self.modules)
        # The n_prune globally lowest ranks, none taking a module below min_rank; ties by module order, index.
        pool = sorted((float(s[k]), names.index(n), k, n) for n, s in scores.items() for k in range(s.numel()))
        removed: dict[str, list[int]] = {n: [] for n in names}
        for _, _, k, n in pool:
            if sum(map(len, removed.values())) == self.n_prune:
                break
            if scores[n].numel() - len(removed[n]) > self.budget.min_rank:
                removed[n].append(k)
        for n, ks in removed.items():
            if ks:
                keep = [k for k in range(scores[n].numel()) if k not in ks]
                self.resize_module(n, keep, step=step, score=float(scores[n].mean()))
        self.regrow(scores, removed, step)
        self.rounds_done += 1

    def regrow(self, scores: dict[str, torch.Tensor], removed: dict[str, list[int]], step: int) -> None:
        """Give ranks to modules that lost none, more to higher average score, within the parameter budget."""
        hi = self.budget.max_rank if self.budget.max_rank is not None else math.inf
        receivers = [n for n, ks in removed.items() if not ks and scores[n].numel() > 0]
        if not receivers:
            receivers = [n for n in removed if self.modules[n].r > 0]
        avg = {n: max(float(scores[n].mean()), 0.0) for n in receivers}
        if not any(avg.values()):
            avg = {n: 1.0 for n in receivers}
        given = {n: 0 for n in receivers}
        left = self.budget_params - self.current_params()
        while True:
            fits = [n for n in receivers if self.costs[n] <= left and self.modules[n].r + given[n] < hi]
            if not fits:
                break
            best = max(fits, key=lambda n: (avg[n] / (given[n] + 1), -receivers.index(n)))
            given[best] += 1
            left -= self.costs[best]
        for n, add in given.items():
            if add:
                self.grow(n, add, step, score=float(scores[n].mean()))

    # ---- state --------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state.update(rounds_done=self.rounds_done)
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        check_state_ranks(self, state)
        super().load_state_dict(state)
        self.rounds_done = int(state["rounds_done"])
