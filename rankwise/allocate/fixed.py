"""Fixed-rank LoRA under a budget: the uniform rank the budget pays for, never changed.

The reference every adaptive allocator is compared with at equal budget: r = floor(budget / sum_i (in_i + out_i)),
clamped to [min_rank, max_rank].
"""

from __future__ import annotations

from dataclasses import dataclass

from rankwise.allocate.base import Allocator, AllocatorConfig, register_allocator


@dataclass
class FixedConfig(AllocatorConfig):
    pass


@register_allocator
class FixedRank(Allocator):
    name = "fixed"
    Config = FixedConfig

    def __init__(self, model, budget, config=None, **kwargs) -> None:
        super().__init__(model, budget, config, **kwargs)
        r = self.budget.clamp("", self.budget_params // sum(self.costs.values()))
        for name, adapter in self.modules.items():
            if adapter.r > r:
                self.resize_module(name, list(range(r)), step=0)
            elif adapter.r < r:
                self.resize_module(name, None, r - adapter.r, step=0)
