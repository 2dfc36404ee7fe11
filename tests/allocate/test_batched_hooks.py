"""AdaLoRA's and SoRA's per-step hooks (rankwise/allocate/adalora.py, sora.py: batched over modules with
torch._foreach_* ops and bmm) against a straightforward per-module computation of the same math, written out
here. Each check runs on the synthetic task (tests/allocate/synthetic.py) through prunes, so modules end with
different ranks; state is compared after every hook to 1e-6.

- AdaLoRA: the orthogonality term (value and gradients), the sensitivity / uncertainty EMAs after every
  `on_backward`, the triplet scores, and the ranks and EMAs after every prune (the reference chooses the
  triplets itself from its own scores).
- SoRA: a twin run whose proximal step is the per-module soft threshold; gates, ranks, decisions and
  adapters must stay the same as the allocator's.
"""

from __future__ import annotations

import pytest
import torch
from allocate.checks import one_thread
from allocate.synthetic import make_task

from rankwise.allocate import Budget, make_allocator, select_components
from rankwise.allocate.adalora import orthogonality_loss
from rankwise.allocate.sora import Sora
from rankwise.layers.adapter import LoraAdapter

TOL = 1e-6


@pytest.fixture(autouse=True)
def _single_thread():
    with one_thread():
        yield


# ---- the reference: one module, one tensor at a time ----------------------------------------------------------
def reference_orthogonality(adapters: list[LoraAdapter]) -> torch.Tensor:
    """mean over matrices of ||P^T P - I||_F and ||Q Q^T - I||_F, module by module."""
    terms = []
    for a in adapters:
        if a.r == 0:
            continue
        eye = torch.eye(a.r)
        terms.append(torch.linalg.matrix_norm(a.lora_B.t() @ a.lora_B - eye))  # (r, r)
        terms.append(torch.linalg.matrix_norm(a.lora_A @ a.lora_A.t() - eye))  # (r, r)
    return torch.stack(terms).mean()


class ReferenceEMA:
    """AdaLoRA eq. 8-9 per tensor: I = |w * g|; I_bar <- b1 I_bar + (1 - b1) I; U_bar <- b2 U_bar + (1 - b2) |I - I_bar|."""

    def __init__(self, beta1: float, beta2: float) -> None:
        self.beta1, self.beta2 = beta1, beta2
        self.ibar: dict[str, torch.Tensor] = {}
        self.ubar: dict[str, torch.Tensor] = {}

    def update(self, key: str, w: torch.Tensor, g: torch.Tensor) -> None:
        value = (w.detach() * g).abs()
        ibar = self.ibar.get(key, torch.zeros_like(value))
        ubar = self.ubar.get(key, torch.zeros_like(value))
        self.ibar[key] = self.beta1 * ibar + (1 - self.beta1) * value
        self.ubar[key] = self.beta2 * ubar + (1 - self.beta2) * (value - self.ibar[key]).abs()

    def scores(self, modules: dict[str, LoraAdapter]) -> dict[str, torch.Tensor]:
        """S_i = s(lambda_i) + mean_j s(Q_ij) + mean_j s(P_ji), s = I_bar U_bar."""
        s = {k: self.ibar[k] * self.ubar[k] for k in self.ibar}
        return {n: s[f"{n}.e"] + s[f"{n}.A"].mean(dim=1) + s[f"{n}.B"].mean(dim=0) for n in modules}

    def keep(self, name: str, idx: torch.Tensor) -> None:
        for key, dim in ((f"{name}.A", 0), (f"{name}.B", 1), (f"{name}.e", 0)):
            self.ibar[key] = self.ibar[key].index_select(dim, idx)
            self.ubar[key] = self.ubar[key].index_select(dim, idx)


def assert_close(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    assert actual.shape == expected.shape, (what, actual.shape, expected.shape)
    diff = (actual.detach() - expected.detach()).abs().max().item() if actual.numel() else 0.0
    assert diff <= TOL, f"{what}: max diff {diff:.3g}"


# ---- AdaLoRA --------------------------------------------------------------------------------------------------
def test_adalora_hooks_match_the_per_module_reference():
    steps = 40
    model, batches, loss_fn = make_task(seed=0, r=8, n_batches=8)
    alloc = make_allocator("adalora", model, Budget(avg_rank=4),
                           {"warmup_steps": 6, "final_steps": 10, "interval": 4, "gamma": 0.3}, total_steps=steps)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    alloc.attach(opt)
    ref = ReferenceEMA(alloc.config.beta1, alloc.config.beta2)
    prunes = 0
    for step in range(1, steps + 1):
        model.train()
        loss = loss_fn(model, batches[(step - 1) % len(batches)])
        adapters = list(alloc.modules.values())
        factors = [p for a in adapters if a.r > 0 for p in (a.lora_A, a.lora_B)]
        term = alloc.loss_term()
        expected = alloc.config.gamma * reference_orthogonality(adapters)
        assert_close(term, expected, f"step {step}: orthogonality term")
        for got, want, p in zip(torch.autograd.grad(term, factors, retain_graph=True),
                                torch.autograd.grad(expected, factors), factors, strict=True):
            assert_close(got, want, f"step {step}: orthogonality gradient of a {tuple(p.shape)} factor")
        (loss + term).backward()

        if not alloc.final_done:
            for n, a in alloc.modules.items():
                for key, p in (("A", a.lora_A), ("B", a.lora_B), ("e", a.rank_vector)):
                    ref.update(f"{n}.{key}", p, p.grad)
        alloc.on_backward(step)
        assert alloc.ema.ibar.keys() == ref.ibar.keys() == alloc.ema.ubar.keys()
        for key in ref.ibar:
            assert_close(alloc.ema.ibar[key], ref.ibar[key], f"step {step}: I_bar[{key}]")
            assert_close(alloc.ema.ubar[key], ref.ubar[key], f"step {step}: U_bar[{key}]")
        want_scores = ref.scores(alloc.modules)
        for n, s in alloc.triplet_scores().items():
            assert_close(s, want_scores[n], f"step {step}: triplet scores of {n}")

        opt.step()
        keep = select_components(want_scores, alloc.costs, alloc.target_params(step), alloc.budget.min_rank,
                                 alloc.budget.max_rank)
        before = dict(alloc.ranks)
        alloc.on_step(step)
        opt.zero_grad(set_to_none=True)
        if alloc.ranks != before:  # a prune: the reference's choice of triplets, and its EMAs follow
            prunes += 1
            assert alloc.ranks == {n: idx.numel() for n, idx in keep.items()}, (step, alloc.ranks)
            for n, idx in keep.items():
                if idx.numel() != before[n]:
                    ref.keep(n, idx)
            for key in ref.ibar:
                assert_close(alloc.ema.ibar[key], ref.ibar[key], f"step {step}: I_bar[{key}] after the prune")
    assert prunes >= 3, "the run must prune several times"
    assert len(set(alloc.ranks.values())) > 1, alloc.ranks


def test_orthogonality_term_over_mixed_shapes_matches_per_module():
    """Equal shapes (grouped), different ranks of one shape, rank 0: value and gradients."""
    g = torch.Generator().manual_seed(3)
    adapters = []
    for r, n_in, n_out in ((4, 16, 8), (4, 16, 8), (4, 16, 8), (3, 16, 8), (4, 12, 8), (0, 16, 8), (4, 16, 8)):
        a = LoraAdapter(n_in, n_out, r, alpha=2.0 * max(r, 1))
        with torch.no_grad():
            a.lora_B.copy_(torch.randn(n_out, r, generator=g) * 0.3)
        adapters.append(a)
    factors = [p for a in adapters if a.r > 0 for p in (a.lora_A, a.lora_B)]
    got, want = orthogonality_loss(adapters), reference_orthogonality(adapters)
    assert_close(got, want, "orthogonality term")
    for x, y in zip(torch.autograd.grad(got, factors), torch.autograd.grad(want, factors), strict=True):
        assert_close(x, y, "orthogonality gradient")
    assert orthogonality_loss([LoraAdapter(16, 8, 0, alpha=2.0)]) is None


# ---- SoRA -----------------------------------------------------------------------------------------------------
class ReferenceSora(Sora):
    """SoRA whose proximal step is written per gate: g <- sign(g) max(|g| - tau, 0), tau = xi m lr_t / lr_0 of
    the first parameter group holding the gate."""

    @torch.no_grad()
    def proximal_step(self) -> None:
        for a in self.modules.values():
            if a.r == 0:
                continue
            g = a.rank_vector
            tau = self.config.xi * self.xi_mult
            group = next(grp for grp in self.optimizer.param_groups if any(p is g for p in grp["params"]))
            tau *= group["lr"] / group.get("initial_lr", group["lr"])
            g.copy_(torch.sign(g) * torch.clamp(g.abs() - tau, min=0.0))


def test_sora_hooks_match_the_per_module_reference():
    steps, config = 60, {"xi": 3e-3, "check_every": 4, "warmup_steps": 6, "final_steps": 12}
    runs = []
    for cls in (None, ReferenceSora):
        model, batches, loss_fn = make_task(seed=0, r=8, n_batches=8)
        budget = Budget(avg_rank=4)
        alloc = (make_allocator("sora", model, budget, config, total_steps=steps) if cls is None
                 else cls(model, budget, config, total_steps=steps))
        head = [p for n, p in model.named_parameters() if p.requires_grad and "rank_vector" not in n]
        gates = [p for n, p in model.named_parameters() if "rank_vector" in n]
        opt = torch.optim.Adam([{"params": head}, {"params": gates, "lr": 2e-2}], lr=1e-2)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 1.0 - t / (2 * steps))  # lr_t / lr_0 < 1
        alloc.attach(opt)
        runs.append((model, alloc, opt, sched, batches, loss_fn))
    ours, theirs = runs[0][1], runs[1][1]
    for step in range(1, steps + 1):
        for model, alloc, opt, sched, batches, loss_fn in runs:
            model.train()
            loss_fn(model, batches[(step - 1) % len(batches)]).backward()
            alloc.on_backward(step)
            opt.step()
            sched.step()
            alloc.on_step(step)
            opt.zero_grad(set_to_none=True)
        assert ours.ranks == theirs.ranks, (step, ours.ranks, theirs.ranks)
        assert ours.history == theirs.history
        assert ours.xi_mult == theirs.xi_mult
        for n in ours.modules:
            assert_close(ours.modules[n].rank_vector, theirs.modules[n].rank_vector, f"step {step}: gate of {n}")
            assert_close(ours.modules[n].lora_A, theirs.modules[n].lora_A, f"step {step}: A of {n}")
    ours.finalize()
    theirs.finalize()
    assert ours.ranks == theirs.ranks and ours.history == theirs.history
    assert len(ours.history) >= 2 and len(set(ours.ranks.values())) > 1, ours.history
