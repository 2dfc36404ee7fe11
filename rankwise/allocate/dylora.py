"""DyLoRA: train every truncation of one LoRA at once, choose the exported rank(s) at the end.

Valipour et al., 2023, "DyLoRA: Parameter-Efficient Tuning of Pre-trained Models using Dynamic Search-Free
Low-Rank Adaptation" (arXiv:2210.07558). Every adapter has rank r_max. Before each training step one
truncation b ~ Uniform{1..r_max} is drawn for the whole model (seeded generator, so every process of a
distributed run draws the same b) and the model computes

    dW_b = (alpha / b) * B[:, :b] @ A[:b, :]

With `update="last"` (the authors' default) only component b (A row b-1, B column b-1) receives gradient;
`update="all"` trains all components <= b. ("last" zeroes the other gradients, as the authors' detach does;
with Adam their stale momentum still moves them a little. In 30-step MiniLM / SST-2 runs "last" learned
visibly slower than "all": dev accuracy 0.688 vs 0.754, fixed rank 4: 0.773.) Afterwards every truncation
is a usable adapter (nested ranks):
`rankwise.layers.nested.truncated(model, b)` runs one.

`finalize` chooses the exported ranks without retraining and physically cuts each adapter to its first r_i
components (scale alpha / r_i, exactly the truncation that was trained), so sum_i r_i * (in_i + out_i) <= budget:

- `select="uniform"` (the paper's use): the largest r <= r_max with r * sum_i (in_i + out_i) <= budget.
- `select="greedy_loss"` (our design): greedy descent on the held-out loss L(ranks) of the whole model run
  with per-module truncations, in rounds. Start with every module at r_max. Each round prices every module m
  that can go lower: the loss increase per freed parameter of lowering it alone to its next lower candidate
  rank r' (from `candidate_ranks`, default 0..r_max), [L(ranks with r_m = r') - L(ranks)] / ((r_m - r') *
  (in_m + out_m)); then it applies the cheapest moves, at most one per module, until they free half of the
  parameters still over the budget (at least one move). Rounds repeat until the budget holds. Prices are
  measured again every round, so interactions between modules are seen, and the work stays bounded: about
  n_modules x log2(moves) forward passes on the held-out batch. Every loss is averaged over processes, so all
  processes take the same path. Needs `set_eval_batch(batch, loss_fn)` before `attach`; `path` records each
  move.

Between steps the model runs the truncation drawn for the NEXT step; evaluate inside `truncated(model, b)`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from rankwise.allocate.base import Allocator, AllocatorConfig, default_loss, register_allocator
from rankwise.init.calibration import all_reduce_mean
from rankwise.layers.nested import keep_only_component_grad, set_truncation, truncated, truncation_scale

SELECT = ("uniform", "greedy_loss")
UPDATE = ("last", "all")


@dataclass
class DyLoRAConfig(AllocatorConfig):
    """r_max: rank trained (None: the injected rank); update: "last" | "all"; select: "uniform" |
    "greedy_loss"; candidate_ranks: the ranks greedy_loss may cut to (None: 0..r_max)."""

    r_max: int | None = None
    update: str = "last"
    select: str = "uniform"
    candidate_ranks: list[int] | None = field(default=None)

    def __post_init__(self) -> None:
        if self.r_max is not None and self.r_max < 1:
            raise ValueError(f"DyLoRAConfig.r_max={self.r_max!r} must be >= 1 (or None for the injected rank).")
        if self.update not in UPDATE:
            raise ValueError(f"DyLoRAConfig.update={self.update!r}; allowed: {list(UPDATE)}.")
        if self.select not in SELECT:
            raise ValueError(f"DyLoRAConfig.select={self.select!r}; allowed: {list(SELECT)}.")
        if self.candidate_ranks is not None and (not self.candidate_ranks or min(self.candidate_ranks) < 0):
            raise ValueError(f"DyLoRAConfig.candidate_ranks={self.candidate_ranks!r}: give ranks >= 0.")


@register_allocator
class DyLoRA(Allocator):
    name = "dylora"
    Config = DyLoRAConfig

    def __init__(self, model, budget, config=None, **kwargs) -> None:
        super().__init__(model, budget, config, **kwargs)
        cfg: DyLoRAConfig = self.config
        self.r_max = cfg.r_max if cfg.r_max is not None else max(a.r for a in self.modules.values())
        for name, adapter in self.modules.items():  # every module trains the same nested ranks 1..r_max
            if adapter.r > self.r_max:
                self.resize_module(name, list(range(self.r_max)), step=0)
            elif adapter.r < self.r_max:
                self.resize_module(name, None, self.r_max - adapter.r, step=0)
        self.b: int | None = None  # truncation of the coming step
        self.sampled: list[int] = []  # every b drawn, in order
        self.eval_batch: Any = None
        self.eval_loss_fn = default_loss
        self.path: list[dict[str, Any]] = []  # greedy_loss: every accepted move and the loss after it
        self.evaluations = 0  # held-out forward passes spent by greedy_loss

    # ---- hooks ------------------------------------------------------------------------------------
    def set_eval_batch(self, batch: Any, loss_fn=default_loss) -> None:
        self.eval_batch, self.eval_loss_fn = batch, loss_fn

    def attach(self, optimizer) -> None:
        super().attach(optimizer)
        if self.config.select == "greedy_loss" and self.eval_batch is None:
            raise ValueError(
                "DyLoRA select='greedy_loss' scores ranks on held-out data: call "
                "allocator.set_eval_batch(batch, loss_fn) before attach, or use select='uniform'."
            )
        self._draw()

    def _draw(self) -> None:
        self.b = int(torch.randint(1, self.r_max + 1, (1,), generator=self.generator).item())
        self.sampled.append(self.b)
        set_truncation(self.model, self.b, self.adapter_name)

    def on_backward(self, step: int) -> None:
        if self.config.update == "last" and self.b is not None:
            for adapter in self.modules.values():
                keep_only_component_grad(adapter, self.b)

    def on_step(self, step: int) -> None:
        self._draw()

    def finalize(self) -> None:
        set_truncation(self.model, None, self.adapter_name)
        self.b = None
        ranks = self.uniform_ranks() if self.config.select == "uniform" else self.greedy_ranks()
        self.cut(ranks, step=self.total_steps)

    # ---- choosing ranks ---------------------------------------------------------------------------
    def uniform_ranks(self) -> dict[str, int]:
        r = min(self.r_max, self.budget_params // sum(self.costs.values()))
        r = self.budget.clamp("", r)
        return {n: min(r, self.r_max) for n in self.modules}

    def _candidates(self) -> list[int]:
        ranks = self.config.candidate_ranks or list(range(self.r_max + 1))
        hi = self.r_max if self.budget.max_rank is None else min(self.r_max, self.budget.max_rank)
        ranks = sorted({r for r in ranks if self.budget.min_rank <= r <= hi})
        if not ranks:
            raise ValueError(
                f"DyLoRA: no candidate rank in [{self.budget.min_rank}, {hi}] (candidate_ranks="
                f"{self.config.candidate_ranks}); widen candidate_ranks or the budget's min/max rank."
            )
        return ranks

    @torch.no_grad()
    def held_out_loss(self, ranks: dict[str, int]) -> float:
        """Held-out loss with every module truncated to ranks[m], averaged over processes."""
        was_training = self.model.training
        self.model.eval()
        try:
            with truncated(self.model, ranks, self.adapter_name):
                loss = self.eval_loss_fn(self.model, self.eval_batch).detach().double().reshape(1)
        finally:
            self.model.train(was_training)
        self.evaluations += 1
        return float(all_reduce_mean(loss.cpu())[0])

    def greedy_ranks(self) -> dict[str, int]:
        """Greedy descent from r_max in halving rounds (see the module docstring); every process takes the
        same path because every loss is averaged over processes."""
        levels = self._candidates()
        ranks = {n: levels[-1] for n in self.modules}
        used = sum(ranks[n] * self.costs[n] for n in ranks)

        def lower(name: str) -> int | None:
            below = [r for r in levels if r < ranks[name]]
            return below[-1] if below else None

        current = self.held_out_loss(ranks)
        round_ = 0
        while used > self.budget_params:
            movable = [n for n in self.modules if lower(n) is not None]
            if not movable:
                raise ValueError(
                    f"DyLoRA: even the lowest candidate ranks exceed the budget of {self.budget_params:,} "
                    "parameters; include 0 in candidate_ranks or raise the budget."
                )
            priced = []  # (loss increase per freed parameter, module order, name, loss after the move)
            for i, name in enumerate(movable):
                loss = self.held_out_loss({**ranks, name: lower(name)})
                priced.append(((loss - current) / ((ranks[name] - lower(name)) * self.costs[name]), i, name, loss))
            target = (used - self.budget_params) / 2  # free at least half of the excess this round
            freed = 0
            for cost, _, name, loss in sorted(priced):
                if freed > 0 and freed >= target:
                    break
                r_new = lower(name)
                freed += (ranks[name] - r_new) * self.costs[name]
                self.path.append({"round": round_, "module": name, "old_rank": ranks[name], "new_rank": r_new,
                                  "loss_alone": loss})
                ranks[name] = r_new
            used -= freed
            current = self.held_out_loss(ranks)
            round_ += 1
        return ranks

    def cut(self, ranks: dict[str, int], step: int) -> None:
        """Keep the first ranks[m] components of each module, with the scale of that truncation."""
        for name, r in ranks.items():
            adapter = self.modules[name]
            scale = truncation_scale(adapter, r)
            if r < adapter.r:
                self.resize_module(name, list(range(r)), step=step)
            adapter.scale = scale

    # ---- state ------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state.update(b=self.b, sampled=list(self.sampled), path=list(self.path))
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.b, self.sampled, self.path = state["b"], list(state["sampled"]), list(state["path"])
        if self.b is not None:
            set_truncation(self.model, self.b, self.adapter_name)
