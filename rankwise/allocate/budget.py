"""Parameter budgets: what a rank costs, how a budget resolves, schedules, and budgeted selection.

The budget measure is the number of trainable adapter parameters, sum_i r_i * (in_i + out_i); "average rank
k" means the parameters of uniform rank k, sum_i k * (in_i + out_i). Rank vectors (gates, singular values) are not counted: they fold into B at
export, and the exported adapter has exactly sum_i r_i * (in_i + out_i) parameters.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass
class Budget:
    """Trainable-parameter budget. Give `params` or `avg_rank` (not both); ranks stay in [min_rank, max_rank]."""

    params: int | None = None
    avg_rank: float | None = None
    min_rank: int = 0
    max_rank: int | None = None

    def __post_init__(self) -> None:
        if (self.params is None) == (self.avg_rank is None):
            raise ValueError(
                f"Budget(params={self.params!r}, avg_rank={self.avg_rank!r}): give exactly one, e.g. "
                "Budget(params=1_200_000) or Budget(avg_rank=8)."
            )
        if self.params is not None and self.params <= 0:
            raise ValueError(f"Budget.params={self.params!r} must be > 0.")
        if self.avg_rank is not None and self.avg_rank <= 0:
            raise ValueError(f"Budget.avg_rank={self.avg_rank!r} must be > 0.")
        if self.min_rank < 0 or (self.max_rank is not None and self.max_rank < max(self.min_rank, 1)):
            raise ValueError(
                f"Budget min_rank={self.min_rank!r} / max_rank={self.max_rank!r}: need 0 <= min_rank <= max_rank."
            )

    def total(self, costs: dict[str, int]) -> int:
        """The budget in parameters, for modules whose per-rank cost (in + out) is `costs`."""
        if self.params is not None:
            total = int(self.params)
        else:
            total = int(math.floor(self.avg_rank * sum(costs.values())))
        floor = self.min_rank * sum(costs.values())
        if total < floor:
            raise ValueError(
                f"Budget of {total:,} parameters is below what min_rank={self.min_rank} needs ({floor:,}); "
                "raise the budget or lower min_rank."
            )
        return total

    def clamp(self, name: str, r: int) -> int:
        hi = self.max_rank if self.max_rank is not None else r
        return max(self.min_rank, min(r, hi))

    def to_dict(self) -> dict:
        return {"params": self.params, "avg_rank": self.avg_rank, "min_rank": self.min_rank, "max_rank": self.max_rank}

    @classmethod
    def parse(cls, text: str | int | float, **kw) -> Budget:
        """'1.2M' / '300k' / 120000 -> params; 'r8' / 'avg8' / 8.0 with avg -> avg_rank."""
        if isinstance(text, (int, float)) and not isinstance(text, bool):
            return cls(params=int(text), **kw)
        s = str(text).strip().lower().replace("_", "").replace(",", "")
        for prefix in ("avg", "r"):
            if s.startswith(prefix):
                return cls(avg_rank=float(s[len(prefix):].lstrip("=:")), **kw)
        mult = {"k": 1e3, "m": 1e6, "b": 1e9}.get(s[-1:], 1)
        try:
            return cls(params=int(float(s[:-1] if mult != 1 else s) * mult), **kw)
        except ValueError as err:
            raise ValueError(
                f"Budget {text!r} not understood; use a parameter count ('1.2M', '300k', 120000) or an "
                "average rank ('r8', 'avg8')."
            ) from err


def params_of(ranks: dict[str, int], costs: dict[str, int]) -> int:
    return sum(ranks[n] * costs[n] for n in ranks)


def cubic_schedule(step: int, total_steps: int, start: float, end: float, warmup: int, final: int) -> float:
    """AdaLoRA's budget schedule b(t) (Zhang et al., 2023, eq. 10): `start` for t <= warmup, then
    end + (start - end) * (1 - (t - warmup) / (T - warmup - final))^3, and `end` for the last `final` steps."""
    if step <= warmup:
        return start
    span = max(total_steps - warmup - final, 1)
    if step >= total_steps - final:
        return end
    frac = 1.0 - (step - warmup) / span
    return end + (start - end) * frac**3


def select_components(
    scores: dict[str, torch.Tensor],
    costs: dict[str, int],
    budget_params: int,
    min_rank: int = 0,
    max_rank: int | None = None,
    per_param: bool = True,
) -> dict[str, torch.Tensor]:
    """Keep the highest-scoring rank components under a parameter budget.

    scores: {module: (r_i,) score of each component}; costs: {module: in + out}. Each module first keeps its
    `min_rank` best components; then components are taken by descending score per parameter, score / cost
    (per_param=False: by score), while the budget allows and the module is below `max_rank`. Ties break by
    module order then index, so the choice is deterministic. Returns {module: sorted indices to keep}.

    Per parameter is the greedy answer to "most total score for the budget" (a knapsack): a component of a
    (384 -> 1536) FFN matrix costs 2.5x one of a (384 -> 384) attention matrix, so ranking by raw score, as
    AdaLoRA does with its budget in ranks, spends a parameter budget on fewer, larger components.
    """
    keep: dict[str, list[int]] = {n: [] for n in scores}
    used = 0
    pool: list[tuple[float, int, int, str]] = []
    for mi, (name, s) in enumerate(scores.items()):
        s = s.detach().float().cpu()  # one copy per module: float(s[i]) on a GPU tensor would sync per component
        order = torch.argsort(s, descending=True, stable=True).tolist()
        floor = order[: min(min_rank, len(order))]
        keep[name].extend(floor)
        used += len(floor) * costs[name]
        unit = costs[name] if per_param else 1
        pool.extend((-float(s[i]) / unit, mi, i, name) for i in order[len(floor):])
    if used > budget_params:
        raise ValueError(f"min_rank={min_rank} alone needs {used:,} parameters, more than the budget {budget_params:,}.")
    for neg_score, _, idx, name in sorted(pool):
        if max_rank is not None and len(keep[name]) >= max_rank:
            continue
        if used + costs[name] > budget_params:
            continue
        keep[name].append(idx)
        used += costs[name]
    return {n: torch.tensor(sorted(k), dtype=torch.long) for n, k in keep.items()}


def proportional_ranks(
    weights: dict[str, float], costs: dict[str, int], budget_params: int, min_rank: int = 0, max_rank: int | None = None
) -> dict[str, int]:
    """Ranks proportional to `weights` (importance) under a parameter budget, exactly within it.

    r_i ~ budget * w_i / cost_i (each module gets parameters in proportion to its weight), clamped to
    [min_rank, max_rank], rounded down, then the leftover parameters go one rank at a time to the modules
    with the largest rounding remainder that still fit. Deterministic."""
    total_w = sum(max(w, 0.0) for w in weights.values()) or 1.0
    ideal = {n: budget_params * max(weights[n], 0.0) / total_w / costs[n] for n in weights}
    hi = max_rank if max_rank is not None else 10**9
    ranks = {n: max(min_rank, min(hi, int(math.floor(v)))) for n, v in ideal.items()}
    used = params_of(ranks, costs)
    while used > budget_params:  # clamping up to min_rank can overshoot: take from the largest surplus
        over = [n for n in ranks if ranks[n] > min_rank]
        if not over:
            raise ValueError(f"min_rank={min_rank} alone exceeds the budget {budget_params:,}.")
        n = max(over, key=lambda k: (ranks[k] - ideal[k], costs[k]))
        ranks[n] -= 1
        used -= costs[n]
    order = sorted(weights, key=lambda n: (-(ideal[n] - ranks[n]), list(weights).index(n)))
    changed = True
    while changed:
        changed = False
        for n in order:
            if ranks[n] < hi and used + costs[n] <= budget_params and ideal[n] > ranks[n]:
                ranks[n] += 1
                used += costs[n]
                changed = True
    return ranks
