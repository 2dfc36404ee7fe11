"""The allocator interface every rank-allocation method implements, and its registry.

An allocator owns the ranks of one adapter under a `Budget`. The training loop (rankwise.train.loop or the
transformers callback) calls, in this order:

    alloc = make_allocator("adalora", model, budget, total_steps=T)   # may reshape adapters (no optimizer yet)
    alloc.prepare(batches, loss_fn)       # data-driven methods (GoRA, EVA, Sensitivity) set ranks / init here
    opt = build optimizer over the trainable parameters
    alloc.attach(opt)
    for step in 1..T:
        loss = loss_fn(model, batch) + (alloc.loss_term() or 0)
        loss.backward()
        alloc.on_backward(step)           # gradients are there: accumulate scores
        opt.step()
        alloc.on_step(step)               # after the update: proximal steps, decisions, physical resizes
        opt.zero_grad()
    alloc.finalize()                      # before export: fold / drop what the method drops at the end

Resizes go through `resize_module`, which really removes / adds components (`LoraAdapter.resize`), carries
the optimizer state of survivors over (`remap_optimizer`) and records the decision (step, module, old rank,
new rank, score) in `history`. Scores that depend on data are averaged over processes with `all_reduce_mean`
before deciding, so every process of a distributed run makes the same decision.
"""

from __future__ import annotations

import contextlib
import dataclasses
from abc import ABC
from collections.abc import Callable, Iterable
from typing import Any, ClassVar

import torch
from torch import nn

from rankwise.allocate import update_scale
from rankwise.allocate.budget import Budget, params_of
from rankwise.layers.adapter import LoraAdapter
from rankwise.model import adapter_modules
from rankwise.optim import remap_optimizer

LossFn = Callable[[nn.Module, Any], torch.Tensor]
BatchSource = Callable[[], Iterable[Any]]  # returns a fresh iterator of batches each call


def default_loss(model: nn.Module, batch: Any) -> torch.Tensor:
    """A transformers model called with its batch dict returns `.loss`."""
    out = model(**batch) if isinstance(batch, dict) else model(batch)
    return out.loss if hasattr(out, "loss") else out


def all_reduce_mean(t: torch.Tensor) -> torch.Tensor:
    """Average `t` over the processes of a distributed run (a no-op otherwise). Returns a new tensor on t's
    device. Under a NCCL-only process group a CPU tensor is reduced on this process's GPU (NCCL carries GPU
    tensors only; rankwise.distributed.init_distributed adds gloo for CPU tensors instead)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        out = t.detach().clone()
        nccl_only = "gloo" not in str(torch.distributed.get_backend())
        if out.device.type == "cpu" and nccl_only and torch.cuda.is_available():
            out = out.cuda()
        torch.distributed.all_reduce(out, op=torch.distributed.ReduceOp.SUM)
        return (out / torch.distributed.get_world_size()).to(t.device)
    return t


@dataclasses.dataclass
class AllocatorConfig:
    """Knobs shared by allocators; each method subclasses it with its own (all with defaults).

    match_update: while the adapter holds more parameters than the budget, lower its update by budget / params,
    so that the update per step is fixed-rank LoRA's at the budget (`update_scale`).
    match_update_by: how: "fold" lowers every scale and folds B (or the rank vector) so the function is kept (the
    B path of the update is matched); "lr" lowers the adapter param groups' learning rate instead (every path)."""

    match_update: bool = False
    match_update_by: str = "fold"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> AllocatorConfig:
        data = dict(data or {})
        allowed = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - allowed)
        if unknown:
            raise ValueError(f"{cls.__name__}: unknown option(s) {unknown}; allowed: {sorted(allowed)}.")
        return cls(**data)


class Allocator(ABC):
    """Base class: bookkeeping, resizing and history. Methods override the hooks they need."""

    name: ClassVar[str] = ""
    Config: ClassVar[type[AllocatorConfig]] = AllocatorConfig
    fold_scale_into: ClassVar[str] = "B"  # what absorbs a match_update rescale ("rank_vector": AdaLoRA)

    def __init__(
        self,
        model: nn.Module,
        budget: Budget,
        config: AllocatorConfig | dict | None = None,
        *,
        adapter_name: str = "default",
        total_steps: int = 1000,
        seed: int = 0,
    ) -> None:
        self.model = model
        self.budget = budget
        self.config = config if isinstance(config, AllocatorConfig) else self.Config.from_dict(config)
        self.adapter_name = adapter_name
        self.total_steps = int(total_steps)
        self.seed = seed
        self.generator = torch.Generator().manual_seed(seed)
        self.optimizer: torch.optim.Optimizer | None = None
        self.history: list[dict[str, Any]] = []
        # Bumped by every physical resize: wrappers that hold parameter lists (DDP buckets, FSDP shards)
        # compare it with the value they saw to know when to rebuild.
        self.resize_version = 0
        self.modules: dict[str, LoraAdapter] = {n: a for n, _, a in adapter_modules(model, adapter_name)}
        if not self.modules:
            raise ValueError(f"The model has no adapter {adapter_name!r}; call rankwise.inject first.")
        self.layers = {n: layer for n, layer, _ in adapter_modules(model, adapter_name)}
        self.costs = {n: a.params_per_rank for n, a in self.modules.items()}
        self.budget_params = budget.total(self.costs)
        self.update_factor = 1.0  # c of `update_scale`: every scale is its injected value times c
        self.update_synced = False
        self.defer_sync = False  # inside `batch_resizes`: one rescale after the batch, not one per resize
        if self.config.match_update_by not in ("fold", "lr"):
            raise ValueError(f"{type(self.config).__name__}.match_update_by={self.config.match_update_by!r}: use "
                             "'fold' (scales and B) or 'lr' (the adapter groups' learning rate).")
        self._lr_hook = None

    # ---- hooks (override as needed) -------------------------------------------------------------
    def prepare(self, batches: BatchSource | None = None, loss_fn: LossFn = default_loss) -> None:
        """Before training, with data: set initial ranks and initialisation. Default: nothing."""

    def attach(self, optimizer: torch.optim.Optimizer | None) -> None:
        self.optimizer = optimizer
        if self._lr_hook is not None:
            self._lr_hook.remove()
            self._lr_hook = None
        if optimizer is not None and self.config.match_update and self.config.match_update_by == "lr":
            update_scale.adapter_groups(optimizer)  # a clear error now, not at the first step
            self._lr_hook = optimizer.register_step_pre_hook(
                lambda opt, args, kwargs: update_scale.scale_adapter_lr(opt, self.update_factor))
        if not self.update_synced:  # once: a resume attaches again, then loads the factor it saved
            self.sync_update_scale()

    def loss_term(self) -> torch.Tensor | None:
        """A regulariser added to the training loss (e.g. AdaLoRA's orthogonality), or None."""
        return None

    def on_backward(self, step: int) -> None:
        """Gradients of this step are available (before the optimizer step)."""

    def on_step(self, step: int) -> None:
        """After the optimizer step of `step` (1-based): proximal updates, decisions, resizes."""

    def finalize(self) -> None:
        """End of training, before export: fold or drop what the method drops at the end."""

    def set_eval_batch(self, batch: Any, loss_fn: LossFn = default_loss) -> None:
        """Methods that score on held-out data (ALoRA) keep this batch; others ignore it."""

    # ---- shared machinery -----------------------------------------------------------------------
    @property
    def ranks(self) -> dict[str, int]:
        return {n: a.r for n, a in self.modules.items()}

    def current_params(self) -> int:
        return params_of(self.ranks, self.costs)

    def resize_module(
        self, name: str, keep: torch.Tensor | list[int] | None, add: int = 0, *, step: int, score: float | None = None,
        **new: Any,
    ) -> None:
        """Physically keep components `keep` and add `add` new ones in module `name`; record the decision."""
        adapter = self.modules[name]
        old = adapter.r
        remaps = adapter.resize(keep, add, **new)
        remap_optimizer(self.optimizer, remaps)
        self.resize_version += 1
        if not self.defer_sync:
            self.sync_update_scale()
        if adapter.r != old:
            self.record(step, name, old, adapter.r, score)

    @contextlib.contextmanager
    def batch_resizes(self):
        """Resizes inside share one `sync_update_scale` at the end (a decision that resizes many modules would
        otherwise rescale every adapter once per module). Nested batches sync once, at the outermost end."""
        outer = not self.defer_sync
        self.defer_sync = True
        try:
            yield
        finally:
            if outer:
                self.defer_sync = False
                self.sync_update_scale()

    def sync_update_scale(self) -> None:
        """With `match_update`, set every scale to its injected value times min(1, budget / params), keeping
        the function (B and its optimizer moments are folded: rankwise.allocate.update_scale)."""
        if not self.config.match_update:
            return
        factor = update_scale.update_factor(self.current_params(), self.budget_params)
        if self.config.match_update_by == "fold":  # "lr": the pre-step hook applies the factor to the lr
            update_scale.rescale_adapters(list(self.modules.values()), self.update_factor, factor, self.optimizer,
                                          into=self.fold_scale_into)
        self.update_factor = factor
        self.update_synced = True

    def apply_keep(self, keep: dict[str, torch.Tensor], step: int, scores: dict[str, float] | None = None) -> None:
        """Resize every module whose kept set differs from all of its components."""
        with self.batch_resizes():
            for name, idx in keep.items():
                if idx.numel() != self.modules[name].r:
                    self.resize_module(name, idx, step=step, score=None if scores is None else scores.get(name))

    def record(self, step: int, module: str, old_rank: int, new_rank: int, score: float | None = None) -> None:
        self.history.append({
            "step": int(step), "module": module, "old_rank": int(old_rank), "new_rank": int(new_rank),
            "score": None if score is None else float(score), "allocator": self.name,
        })

    # ---- state (checkpoints) --------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue exactly: subclasses add their running statistics."""
        return {
            "name": self.name,
            "config": self.config.to_dict(),
            "budget": self.budget.to_dict(),
            "history": list(self.history),
            "generator": self.generator.get_state(),
            "ranks": self.ranks,
            "update_factor": self.update_factor,
            "update_scales": {n: a.scale for n, a in self.modules.items()} if self.config.match_update else {},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.history = list(state["history"])
        self.generator.set_state(state["generator"])
        self.update_factor = float(state.get("update_factor", 1.0))
        self.update_synced = True
        for name, scale in state.get("update_scales", {}).items():  # the scales that go with that factor
            self.modules[name].scale = float(scale)

    def refresh_modules(self) -> None:
        """Re-read the adapters (after a checkpoint restore replaced parameters)."""
        self.modules = {n: a for n, _, a in adapter_modules(self.model, self.adapter_name)}


_REGISTRY: dict[str, type[Allocator]] = {}


def register_allocator(cls: type[Allocator]) -> type[Allocator]:
    """Class decorator; the class's `name` is its registry key."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} needs a non-empty `name` to be registered.")
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        raise ValueError(f"Allocator {cls.name!r} is already registered by {_REGISTRY[cls.name].__name__}.")
    _REGISTRY[cls.name] = cls
    return cls


def available_allocators() -> list[str]:
    _load_builtin()
    return sorted(_REGISTRY)


def get_allocator_class(name: str) -> type[Allocator]:
    _load_builtin()
    if name not in _REGISTRY:
        raise ValueError(f"Unknown allocator {name!r}; available: {sorted(_REGISTRY)}.")
    return _REGISTRY[name]


def make_allocator(name: str, model: nn.Module, budget: Budget, config: dict | AllocatorConfig | None = None,
                   **kwargs: Any) -> Allocator:
    return get_allocator_class(name)(model, budget, config, **kwargs)


def _load_builtin() -> None:
    import importlib
    import pkgutil

    import rankwise.allocate as pkg

    for info in pkgutil.iter_modules(pkg.__path__):
        if info.name not in ("base", "budget"):
            importlib.import_module(f"rankwise.allocate.{info.name}")
