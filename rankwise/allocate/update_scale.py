"""Keep the size of an adaptive adapter's update equal to fixed-rank LoRA's at the same budget.

Why. With the usual alpha = 2 r the scale s = alpha / r is 2 at any rank, so every component takes steps of the
same size: an adapter of R components moves dW about R times one component's step per optimizer step. Pruning
allocators (SoRA, AdaLoRA) start above the budget (the CLI injects them at 1.5x the budget's rank) and remove
components as they train, so for most of the run they take larger steps than fixed rank at the budget: a higher
effective learning rate, which the quality benchmark measured as the whole of their gain on the LM tasks, and
which scaling alpha down to the budget's rank turns into a loss once pruning leaves them at the budget with
2/3 of fixed rank's scale (docs/BENCHMARKS.md, "The effective learning rate, not the allocation").

What. While the adapter holds P parameters above the budget's Pb, every module's scale is its injected scale
times c = min(1, Pb / P):

    s_i(t) = s_i(0) * c(t)          sum_i s_i(t) r_i(t) (in_i + out_i) <= sum_i s_i(0) rb_i (in_i + out_i)

so the parameter-weighted sum of scales is the budget's. c reaches 1 when the adapter is pruned down to the
budget and stays there. When c changes from c0 to c1 the function is kept: B (and the LoRA bias, which the scale
multiplies too) is multiplied by c0 / c1, and the optimizer's running moments of those tensors follow their
gradients, which scale by c1 / c0 (Adam's exp_avg by c1 / c0, exp_avg_sq by (c1 / c0)^2, SGD's momentum by
c1 / c0), so the next Adam step has the size it would have had, in s * B.

What is matched, exactly. A step changes dW = s B A by s (dB A + B dA) (+ the gate or singular-value term). Adam's
steps dA, dB have a size set by the learning rate, so with s -> c s and B -> B / c the B path s dB A scales by c
and the A path s B dA does not. B starts at zero, so early in training, while the allocator is above its budget,
the B path is nearly all of the update and the match is close; it is not exact once B has grown. With
`into="rank_vector"` (AdaLoRA: dW = s P diag(e) Q; its orthogonality term wants P, Q orthonormal) only the e path
scales, and the P and Q paths, which carry most of the update, do not: there `match_update` changes almost
nothing (GSM8K on CPU, seed 0: 0.9081 with it, 0.9080 without; docs/BENCHMARKS.md), which is why it is off for
AdaLoRA. The `@scale` benchmark controls (alpha itself lowered, no fold) scale every path.

`match_update_by="lr"` matches every path instead: no fold and no scale change, but the learning rate of the
adapter's param groups (those named by `rankwise.optim_groups`: lora_A, lora_B, lora_B_no_decay, embedding) is
multiplied by c before each optimizer step (`scale_adapter_lr`, an optimizer step pre-hook), so Adam's steps on A,
B, gates and singular values all shrink by c while the allocator is above its budget. The scheduler's value is
kept as the base each step; the head ("other" groups) keeps its rate.
"""

from __future__ import annotations

import torch

from rankwise.layers.adapter import LoraAdapter

# Optimizer state entries and the power of the gradient each holds.
_MOMENT_POWERS = {"exp_avg": 1, "momentum_buffer": 1, "exp_avg_sq": 2, "max_exp_avg_sq": 2}


def update_factor(params: int, budget_params: int) -> float:
    """c = min(1, budget / params): the factor on every injected scale (1 at or under the budget)."""
    if budget_params <= 0 or params <= budget_params:
        return 1.0
    return budget_params / params


@torch.no_grad()
def rescale_adapters(adapters: list[LoraAdapter], old: float, new: float,
                     optimizer: torch.optim.Optimizer | None = None, into: str = "B") -> None:
    """Change every adapter's scale by new / old without changing its function. Mutates the adapters and the
    optimizer state of what absorbs the change: B and the LoRA bias (into="B"), or the rank vector e and the
    LoRA bias (into="rank_vector"; adapters without one fall back to B)."""
    if into not in ("B", "rank_vector"):
        raise ValueError(f"rescale_adapters: into={into!r}; allowed: 'B' or 'rank_vector'.")
    if old == new:
        return
    fold = old / new  # s * B diag(e) is kept: B (or e) *= old / new while s *= new / old
    tensors = []
    for a in adapters:
        a.scale = a.scale * new / old
        use_vector = into == "rank_vector" and a.rank_vector is not None
        tensors.append(a.rank_vector if use_vector else a.lora_B)
        if a.lora_bias is not None:
            tensors.append(a.lora_bias)
    tensors = [t for t in tensors if t.numel()]
    if not tensors:
        return
    torch._foreach_mul_([t.data for t in tensors], fold)
    if optimizer is None:
        return
    moments: dict[int, list[torch.Tensor]] = {1: [], 2: []}
    for t in tensors:
        state = optimizer.state.get(t)
        for key, power in _MOMENT_POWERS.items():
            value = state.get(key) if state else None
            if torch.is_tensor(value) and value.shape == t.shape:
                moments[power].append(value)
    for power, values in moments.items():
        if values:
            torch._foreach_mul_(values, fold ** -power)  # the gradient of B scales by new / old


ADAPTER_GROUPS = ("lora_A", "lora_B", "lora_B_no_decay", "embedding")  # rankwise.optim_groups names


def adapter_groups(optimizer: torch.optim.Optimizer) -> list[dict]:
    """The optimizer's param groups that hold adapter parameters (by rankwise.optim_groups' names); raises if the
    optimizer was built without those names."""
    groups = [g for g in optimizer.param_groups if g.get("name") in ADAPTER_GROUPS]
    if not groups:
        raise ValueError("match_update_by='lr' needs an optimizer whose adapter param groups are named (build it from "
                         "rankwise.optim_groups.loraplus_param_groups(model, lr), ratio=1 for plain LoRA); got groups "
                         f"named {[g.get('name') for g in optimizer.param_groups]}.")
    return groups


@torch.no_grad()
def scale_adapter_lr(optimizer: torch.optim.Optimizer, factor: float) -> None:
    """Set each adapter group's lr to its base times `factor`. The base is the group's lr as the scheduler (or the
    user) last set it: if the lr is still the value this function wrote, the stored base is reused (no
    compounding without a scheduler); otherwise the current lr is the new base."""
    for g in adapter_groups(optimizer):
        base = g["rankwise_base_lr"] if g.get("rankwise_scaled_lr") == g["lr"] else g["lr"]
        g["rankwise_base_lr"] = base
        g["lr"] = base * factor
        g["rankwise_scaled_lr"] = g["lr"]
