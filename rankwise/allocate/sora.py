"""SoRA: a trainable gate per rank, sparsified by a proximal L1 step; zero-gated ranks are removed.

Ding et al., "Sparse Low-rank Adaptation of Pre-trained Language Models", EMNLP 2023 (arXiv:2311.11696).

    dW x = s * B (g * (A x))        A: (r_max, in), B: (out, r_max), gate g = rank_vector (r_max,), init 1

The gate trains with the rest (through the user's optimizer); after every optimizer step

    g <- sign(g) * max(|g| - tau_t, 0),      tau_t = xi * m_t * lr_t / lr_0

is the proximal step of an L1 penalty. xi (~3e-4) is the threshold at the peak learning rate. The reference
code (TsinghuaC3I/SoRA) has two versions: src/sparse_optimizer.py subtracts xi unscaled every step, and
src/sparse_optimizer_multiply_lr.py subtracts xi * lr (the paper's proximal-gradient form). We scale by
lr_t / lr_0 (the gate's param-group learning rate over its `initial_lr`): identical to the first version under
a constant learning rate, and following a warm-up / decay schedule like the second, without xi changing
meaning with the learning rate. `scale_by_lr=False` gives the first version's constant threshold (that code
also zeroes what the shift leaves below xi, up to 2 xi in effect; we apply the plain soft threshold). The
reference trains the gates in their own optimizer without weight decay; here they sit in the user's
optimizer, so give them weight_decay=0 (AdamW's decay would shrink them too).

Making the soft budget hard (our design; the paper's budget is only what xi happens to give). b(t) is a cubic
schedule from the initial parameters down to the Budget (`budget.cubic_schedule`); every `check_every` steps
after the warm-up, while the parameters of the ranks with g != 0 exceed b(t):
- schedule="prune" (default): the ranks with the smallest score beyond b(t) are removed (`select_components`,
  score per parameter), and xi stays the paper's. The L1 step keeps ranking the gates; the budget takes the
  weakest ones.
- score="contribution" (default): a rank's score is |g_i| ||b_i|| ||a_i||, the size of its term of dW. With
  score="gate" (|g_i| alone, as before 2026-11-22) the gates, which all start at 1 and shrink by the same tau,
  stayed within ~0.5 of each other, so score per parameter ranked by cost: every run, whatever the task, kept
  query / key / value / attention output at the maximum rank and cut the 2.5x dearer FFN ranks (MiniLM's FFN
  output to 0-2 of 12; docs/BENCHMARKS.md, Quality). The norms of b_i and a_i carry what the rank learned.
- schedule="xi": m_t, a multiplier on xi, grows m <- m * xi_growth (up to max_xi_mult), and returns to 1 as
  soon as the live parameters are under b(t). Every gate shrinks by the same tau, so this also shrinks the
  gates that stay: on a 300-step MiniLM run m reached ~1.5^20 and held every gate near 0 (the adapter's
  output with it; SST-2 at chance, docs/BENCHMARKS.md), where "prune" trains like LoRA.
- when the final phase starts (the last `final_steps` steps) the ranks with the largest score that fit the Budget
  are kept and the others removed (`select_components`; zero gates go first), m returns to 1, and the last
  steps train the final structure; `finalize` removes every zero gate and caps again, so the exported adapter
  never exceeds the Budget.
- ranks whose gate is exactly 0 are physically removed every `check_every` steps, but never below b(t): the
  zero gates with the largest |dL/dg| stay and may revive (the paper drops zero gates only at export, so they
  can always revive; removal saves compute). `finalize` removes every zero gate.
Decisions use |g| and |dL/dg| averaged over processes: a rank is dropped only where its gate is 0 in every
process.
At export the gates fold into B (B' = B diag(g)), a plain LoRA.

The update size (match_update, on by default since 2026-12-06): injected above the budget, SoRA would take larger
steps than fixed rank at the budget until it is pruned down (every component has the scale alpha / r0). The scales
are lowered to budget / params of their injected value and rise to it as ranks are removed. The fold matches the
B path of the update, not the A path (rankwise.allocate.update_scale), so part of a gain over fixed rank can still
be update size: with every path matched (match_update_by="lr") SoRA lost to fixed rank on GSM8K (docs/BENCHMARKS.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from rankwise.allocate.adalora import check_state_ranks, resolve_steps
from rankwise.allocate.base import Allocator, AllocatorConfig, all_reduce_mean, register_allocator
from rankwise.allocate.budget import cubic_schedule, select_components


@dataclass
class SoraConfig(AllocatorConfig):
    """xi: L1 threshold per step at the peak learning rate; scale_by_lr: tau follows the learning rate;
    check_every: steps between dropping zero gates and applying the schedule; warmup_steps (None: 10% of
    total_steps) and final_steps (None: 20%) shape the parameter schedule; schedule: "prune" or "xi" (see the
    module docstring); score: what the budget ranks ranks by, "contribution" (|g| ||b|| ||a||) or "gate" (|g|);
    xi_growth: factor on m per check and max_xi_mult (schedule="xi"); match_update (default on): scales follow
    budget / params while above the budget, so the B path of the update is fixed rank's (rankwise.allocate.
    update_scale; off: the update is as large as the injected rank's, 1.5x fixed rank's at the start with the CLI's
    set-up)."""

    match_update: bool = True
    xi: float = 3e-4
    scale_by_lr: bool = True
    check_every: int = 10
    warmup_steps: int | None = None
    final_steps: int | None = None
    schedule: str = "prune"
    score: str = "contribution"
    xi_growth: float = 1.5
    max_xi_mult: float = 1e4

    def __post_init__(self) -> None:
        if self.schedule not in ("prune", "xi"):
            raise ValueError(f"SoraConfig.schedule={self.schedule!r}; allowed: 'prune' (default) or 'xi'.")
        if self.score not in ("contribution", "gate"):
            raise ValueError(f"SoraConfig.score={self.score!r}; allowed: 'contribution' (default) or 'gate'.")
        if self.xi < 0:
            raise ValueError(f"SoraConfig.xi={self.xi!r} must be >= 0 (reference: 1e-4 to 1e-3).")
        if self.check_every < 1:
            raise ValueError(f"SoraConfig.check_every={self.check_every!r} must be >= 1 step.")
        for key in ("warmup_steps", "final_steps"):
            if getattr(self, key) is not None and getattr(self, key) < 0:
                raise ValueError(f"SoraConfig.{key}={getattr(self, key)!r} must be >= 0 or None.")
        if self.xi_growth < 1 or self.max_xi_mult < 1:
            raise ValueError(
                f"SoraConfig: xi_growth={self.xi_growth!r} and max_xi_mult={self.max_xi_mult!r} must be >= 1 "
                "(1 turns the budget-driven schedule off)."
            )


@register_allocator
class Sora(Allocator):
    """SoRA with a hard parameter budget; the adapter's injected ranks are r_max."""

    name = "sora"
    Config = SoraConfig

    def __init__(self, model, budget, config=None, **kwargs) -> None:
        super().__init__(model, budget, config, **kwargs)
        cfg: SoraConfig = self.config
        for adapter in self.modules.values():
            adapter.enable_rank_vector(1.0).data.fill_(1.0)
        self.warmup = resolve_steps(cfg.warmup_steps, 0.1, self.total_steps)
        self.final = resolve_steps(cfg.final_steps, 0.2, self.total_steps)
        if self.warmup + self.final >= self.total_steps:
            raise ValueError(
                f"SoRA: warmup_steps={self.warmup} + final_steps={self.final} leave no sparsification phase in "
                f"total_steps={self.total_steps}; lower them or raise total_steps."
            )
        self.start_params = self.current_params()
        self.xi_mult = 1.0
        self.capped = False
        self.last_step = 0

    def target_params(self, step: int) -> int:
        end = min(self.budget_params, self.start_params)
        return int(cubic_schedule(step, self.total_steps, self.start_params, end, self.warmup, self.final))

    def thresholds(self, gates: list[torch.Tensor]) -> list[float]:
        """tau_t = xi * m * lr_t / lr_0 of each gate, lr from the first parameter group that holds it (one
        pass over the groups for all gates)."""
        tau = self.config.xi * self.xi_mult
        if not self.config.scale_by_lr or self.optimizer is None:
            return [tau] * len(gates)
        ratios: dict[int, float] = {}
        for group in self.optimizer.param_groups:
            lr0 = group.get("initial_lr", group["lr"])
            for p in group["params"]:
                ratios.setdefault(id(p), group["lr"] / lr0 if lr0 else 1.0)
        return [tau * ratios[id(g)] if id(g) in ratios else tau for g in gates]

    # ---- hooks ------------------------------------------------------------------------------------------
    def on_step(self, step: int) -> None:
        self.last_step = step
        self.proximal_step()
        if not self.capped and step >= self.total_steps - self.final:
            self.cap_to_budget(step, floor=self.budget_params)
        elif not self.capped and step % self.config.check_every == 0:
            target = self.target_params(step)
            mags, _ = self.gate_stats()
            live = sum(int((m > 0).sum()) * self.costs[n] for n, m in mags.items())
            self.drop_zero_gates(step, floor=target)
            if step <= self.warmup:
                return
            if self.config.schedule == "prune":
                if live > target:
                    self.keep_largest(step, target)
            else:  # raise xi while over the schedule, back to xi as soon as under it
                self.xi_mult = min(self.xi_mult * self.config.xi_growth, self.config.max_xi_mult) if live > target else 1.0

    def finalize(self) -> None:
        """Drop zero gates and keep the largest scores within the Budget: the export never exceeds it."""
        self.cap_to_budget(self.last_step, floor=0)

    # ---- decisions ----------------------------------------------------------------------------------------
    @torch.no_grad()
    def proximal_step(self) -> None:
        """g <- sign(g) max(|g| - tau, 0) on every gate (local: each process shrinks its own parameters). Every
        step, so each operation is one `_foreach` op over all gates rather than several kernels per gate."""
        gates = [a.rank_vector for a in self.modules.values() if a.r > 0]
        if not gates:
            return
        shrunk = torch._foreach_abs(gates)
        torch._foreach_sub_(shrunk, self.thresholds(gates))
        torch._foreach_clamp_min_(shrunk, 0.0)  # max(|g| - tau, 0)
        torch._foreach_mul_(shrunk, torch._foreach_sign(gates))
        torch._foreach_copy_(gates, shrunk)

    def gate_stats(self) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """({module: (r,) |g|}, {module: (r,) |dL/dg|}), averaged over processes."""
        gates = [a.rank_vector for a in self.modules.values()]
        flat = torch.cat([g.detach().abs().float() for g in gates]
                         + [g.grad.detach().abs().float() if g.grad is not None else torch.zeros(g.numel(), device=g.device)
                            for g in gates])
        # on the host: the decisions below index single components (on a GPU tensor each would be a sync)
        mags, grads = torch.split(all_reduce_mean(flat).cpu(), flat.numel() // 2)
        sizes = [a.r for a in self.modules.values()]
        return dict(zip(self.modules, torch.split(mags, sizes))), dict(zip(self.modules, torch.split(grads, sizes)))

    def drop_zero_gates(self, step: int, floor: int = 0) -> None:
        """Physically remove ranks whose gate is 0 in every process (the function does not change), but not
        below `floor` parameters: zero gates with the largest |dL/dg| stay and may revive."""
        mags, grads = self.gate_stats()
        names = list(self.modules)
        zeros = sorted((float(grads[n][k]), names.index(n), k, n) for n in names for k in range(mags[n].numel())
                       if mags[n][k] == 0)
        params = self.current_params()
        drop: dict[str, list[int]] = {n: [] for n in names}
        for _, _, k, n in zeros:
            if params - self.costs[n] < floor or mags[n].numel() - len(drop[n]) <= self.budget.min_rank:
                continue
            drop[n].append(k)
            params -= self.costs[n]
        with self.batch_resizes():
            for n, ks in drop.items():
                if ks:
                    keep = [k for k in range(mags[n].numel()) if k not in ks]
                    self.resize_module(n, keep, step=step, score=float(mags[n].sum()))

    @torch.no_grad()
    def rank_scores(self, mags: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """{module: (r,) score of each rank} that the budget keeps the largest of: |g_i| (score="gate"), or
        |g_i| ||b_i|| ||a_i||, the Frobenius norm of the rank's term s g_i b_i a_i^T of dW over s
        (score="contribution"). Zero gates score 0 either way. Norms averaged over processes, on the host."""
        if self.config.score == "gate":
            return mags
        adapters = list(self.modules.values())
        norms = torch.cat([torch.cat([a.lora_B.detach().float().norm(dim=0), a.lora_A.detach().float().norm(dim=1)])
                           for a in adapters])  # per module: (r,) column norms of B, then (r,) row norms of A
        norms = all_reduce_mean(norms).cpu()  # like the gates: every process must take the same decision
        out, at = {}, 0
        for name, a in zip(self.modules, adapters):
            b_norm, a_norm = norms[at:at + a.r], norms[at + a.r:at + 2 * a.r]
            out[name] = mags[name] * b_norm * a_norm
            at += 2 * a.r
        return out

    def keep_largest(self, step: int, params: int) -> None:
        """Remove the ranks with the smallest score (`rank_scores`; zero gates first) until at most `params`
        parameters remain."""
        if self.current_params() > params:
            scores = self.rank_scores(self.gate_stats()[0])
            keep = select_components(scores, self.costs, params, self.budget.min_rank, self.budget.max_rank)
            with self.batch_resizes():
                for name, idx in keep.items():
                    if idx.numel() < self.modules[name].r:
                        self.resize_module(name, idx, step=step, score=float(scores[name].sum()))

    def cap_to_budget(self, step: int, floor: int) -> None:
        """Drop zero gates (down to `floor` parameters), then keep the largest scores that fit the Budget."""
        self.drop_zero_gates(step, floor=floor)
        self.keep_largest(step, self.budget_params)
        self.capped = True
        self.xi_mult = 1.0  # the structure now fits: back to the plain SoRA threshold

    # ---- state --------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state.update(start_params=self.start_params, xi_mult=self.xi_mult, capped=self.capped, last_step=self.last_step)
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        check_state_ranks(self, state)
        super().load_state_dict(state)
        self.start_params = int(state["start_params"])
        self.xi_mult = float(state["xi_mult"])
        self.capped = bool(state["capped"])
        self.last_step = int(state["last_step"])
