"""`ParallelModel`: PyTorch DDP over the trainable adapters (optionally FSDP2 under it for the frozen base),
rebuilt whenever an allocator changes the adapters' shapes.

Why rebuild: DDP fixes its gradient buckets, and the autograd hooks that fill them, to the Parameter objects
it saw when it was built. A resize (`LoraAdapter.resize`) replaces A, B and e by new, differently shaped
Parameters, so the old DDP would wait forever for gradients of parameters that no longer take part. rankwise
builds a new DDP over the same module instead (cheap: only a few MB of adapters are bucketed); the
optimizer was already remapped by the allocator (`rankwise.optim.remap_optimizer`), so its state carries over.

What one forward does:
    1. signature = (allocator.resize_version, identities and shapes of the trainable parameters);
       one all-reduce of 3 integers checks that every process holds the same shapes (else it raises: the
       allocator decided differently on different processes, e.g. from unreduced scores) and tells every
       process whether any of them saw the signature change; if so, all of them
         build DDP(module, init_sync=True) ignoring frozen parameters, buffers and zero-size adapters:
         DDP broadcasts the trainable parameters from process 0, which also makes newly grown components
         (initialised from each process's own random state) identical everywhere;
    2. return ddp(*args, **kwargs).

DDP options: find_unused_parameters=False (every non-empty adapter takes part in every forward; rank-0
adapters are skipped in forward and so are left out of DDP), static_graph=False (the graph changes on a
resize), buffers never broadcast (they are deterministic: rotary tables, PiSSA offsets).
With FSDP (`ParallelConfig(strategy="fsdp")`) the frozen base is sharded once (rankwise.distributed.fsdp) and
DDP above it sees only the replicated trainable parameters, so resizes never touch a shard.

Gradient accumulation: run the micro-steps inside `no_sync()`; the last backward all-reduces.
"""

from __future__ import annotations

import contextlib
import inspect
import os
import zlib
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from rankwise.distributed.env import DistEnv, current_env
from rankwise.distributed.fsdp import is_sharded, shard_frozen_base
from rankwise.model import lora_layers

STRATEGIES = ("auto", "ddp", "fsdp")
DTYPES = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16,
          "float32": torch.float32, "fp32": torch.float32}


@dataclass
class ParallelConfig:
    """How to spread training over processes.

    strategy: "ddp" (every process holds the whole model), "fsdp" (frozen base weights sharded with FSDP2,
        for models that do not fit one GPU), or "auto": "fsdp" when `accelerate launch` was asked for FSDP
        (ACCELERATE_USE_FSDP=true), else "ddp".
    fsdp_blocks: class names of the FSDP units (default: the model's `_no_split_modules`).
    fsdp_param_dtype: dtype the sharded base weights are gathered and used in ("bfloat16"), or None.
    reshard_after_forward: FSDP frees gathered block weights after forward (ZeRO-3); False keeps them
        until backward (faster, more memory).
    bucket_cap_mb: DDP gradient bucket size (None: DDP's default, 25 MB).
    find_unused_parameters: for models whose forward skips some trainable parameters (costs a graph walk).
    check_structure: before each forward, verify that all processes hold the same adapter shapes (one
        all-reduce of 3 integers); False skips it and trusts the allocator to decide identically everywhere.
    """

    strategy: str = "auto"
    fsdp_blocks: list[str] | None = None
    fsdp_param_dtype: str | None = None
    reshard_after_forward: bool = True
    bucket_cap_mb: float | None = None
    find_unused_parameters: bool = False
    check_structure: bool = True
    extra_ddp_kwargs: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise ValueError(f"ParallelConfig.strategy={self.strategy!r}; allowed: {list(STRATEGIES)}.")
        if self.fsdp_param_dtype is not None and self.fsdp_param_dtype not in DTYPES:
            raise ValueError(
                f"ParallelConfig.fsdp_param_dtype={self.fsdp_param_dtype!r}; allowed: {sorted(DTYPES)} or None."
            )
        if self.bucket_cap_mb is not None and self.bucket_cap_mb <= 0:
            raise ValueError(f"ParallelConfig.bucket_cap_mb={self.bucket_cap_mb!r} must be > 0 (or None).")

    def resolved_strategy(self) -> str:
        if self.strategy != "auto":
            return self.strategy
        return "fsdp" if os.environ.get("ACCELERATE_USE_FSDP", "").lower() in ("1", "true") else "ddp"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _ddp_buffer_kwargs() -> dict[str, bool]:
    """Never broadcast buffers in forward; newer torch renamed broadcast_buffers to forward_sync_buffers."""
    if "forward_sync_buffers" in inspect.signature(DDP.__init__).parameters:
        return {"forward_sync_buffers": False}
    return {"broadcast_buffers": False}


class ParallelModel:
    """Callable stand-in for `model` in a distributed run. `module` is the model itself (adapters, allocator
    and saving all use it); calls go through the current DDP wrapper. In a single process it calls `model`.

    allocator: its `resize_version` is part of the structure signature (any replaced trainable parameter is
    noticed too, so resizes done without an allocator are handled the same way).
    """

    def __init__(self, model: nn.Module, config: ParallelConfig | None = None, *, allocator: Any = None,
                 env: DistEnv | None = None) -> None:
        self.module = model
        self.config = config or ParallelConfig()
        self.allocator = allocator
        self.env = env or current_env()
        self.strategy = self.config.resolved_strategy() if self.env.distributed else "none"
        self.rewraps = 0  # how many times DDP was (re)built: 1 + number of shape changes seen
        self._ddp: DDP | None = None
        self._signature: tuple | None = None
        self._checked = False  # structure already synchronised for the next forward (set by no_sync)
        self.sharded_blocks: list[str] = []
        if self.strategy == "fsdp" and not is_sharded(model):  # a model may come sharded (meta-device init)
            dtype = DTYPES[self.config.fsdp_param_dtype] if self.config.fsdp_param_dtype else None
            self.sharded_blocks = shard_frozen_base(
                model, device=self.env.device, world_size=self.env.world_size, blocks=self.config.fsdp_blocks,
                param_dtype=dtype, reshard_after_forward=self.config.reshard_after_forward,
            )
        elif self.strategy == "ddp":
            self._check_device()
        if self.env.distributed:
            self.rewrap()

    # ---- calls -----------------------------------------------------------------------------------
    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.env.distributed and not self._checked:
            self._sync_structure()
        self._checked = False
        return (self._ddp or self.module)(*args, **kwargs)

    @contextlib.contextmanager
    def no_sync(self) -> Iterator[None]:
        """Accumulate gradients locally (micro-steps of gradient accumulation); the next backward outside
        the block all-reduces the sum. Shape changes must not happen inside the block."""
        if self.env.distributed:
            self._sync_structure()
            self._checked = True  # the forward inside the block need not check again
        try:
            if self._ddp is None:
                yield
            else:
                with self._ddp.no_sync():
                    yield
        finally:
            self._checked = False

    def train(self, mode: bool = True) -> ParallelModel:
        self.module.train(mode)
        return self

    def eval(self) -> ParallelModel:
        return self.train(False)

    # ---- (re)wrapping ----------------------------------------------------------------------------
    def _trainable(self) -> list[tuple[str, nn.Parameter]]:
        return [(n, p) for n, p in self.module.named_parameters() if p.requires_grad]

    def _current_signature(self) -> tuple:
        version = getattr(self.allocator, "resize_version", None)
        return (version, tuple((id(p), tuple(p.shape)) for _, p in self._trainable()))

    def _check_device(self) -> None:
        wrong = [n for n, p in self.module.named_parameters() if p.device.type != self.env.device.type]
        if wrong:
            raise ValueError(
                f"With DDP every process holds the whole model on its device ({self.env.device}), but "
                f"{len(wrong)} parameter(s) are elsewhere, e.g. {wrong[0]!r}; call model.to({str(self.env.device)!r}) "
                "first, or use strategy='fsdp' for a model that does not fit one device."
            )

    def _sync_structure(self) -> None:
        """Rebuild DDP when the trainable parameters changed on any process; with `check_structure`, first
        make sure every process holds the same shapes (one all-reduce of 3 integers), so that a process
        that resized alone fails with an explanation instead of hanging in mismatched collectives."""
        changed = self._current_signature() != self._signature
        if self.config.check_structure:
            shapes = repr([(n, tuple(p.shape)) for n, p in self._trainable()]).encode()
            h = zlib.crc32(shapes)
            t = torch.tensor([h, -h, int(changed)], dtype=torch.int64, device=self.env.device)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            if int(t[0]) != -int(t[1]):
                ranks = {f"{n}[{a}]": ad.r for n, layer in lora_layers(self.module) for a, ad in layer.adapters.items()}
                raise RuntimeError(
                    f"Process {self.env.rank} holds adapter shapes that differ from another process's (this "
                    f"process's ranks: {ranks}). The allocator made different decisions on different processes: "
                    "its scores must be averaged with rankwise.allocate.all_reduce_mean before deciding, and any "
                    "randomness must come from its seeded generator."
                )
            changed = bool(t[2])
        if changed:
            self.rewrap()

    def rewrap(self) -> None:
        """Build a fresh DDP over `module` for the current trainable parameters (see the module docstring).
        Collective: every process must call it at the same point."""
        self._ddp = None  # drop the old wrapper first: its reducer holds the old buckets and hooks
        trainable = self._trainable()
        ignore = [n for n, p in self.module.named_parameters() if not p.requires_grad or p.numel() == 0]
        ignore += [n for n, _ in self.module.named_buffers()]
        if any(p.numel() > 0 for _, p in trainable):
            DDP._set_params_and_buffers_to_ignore_for_model(self.module, ignore)
            kwargs: dict[str, Any] = dict(
                init_sync=True, find_unused_parameters=self.config.find_unused_parameters, static_graph=False,
                **_ddp_buffer_kwargs(), **self.config.extra_ddp_kwargs,
            )
            if self.config.bucket_cap_mb is not None:
                kwargs["bucket_cap_mb"] = self.config.bucket_cap_mb
            if self.env.device.type == "cuda":
                kwargs["device_ids"] = [self.env.device.index]
            self._ddp = DDP(self.module, **kwargs)
        self._signature = self._current_signature()
        self.rewraps += 1

    # ---- checks ----------------------------------------------------------------------------------
    def assert_in_sync(self, atol: float = 0.0) -> None:
        """Raise if any trainable parameter differs between processes by more than `atol` (a debugging aid:
        one all-reduce of per-parameter sums and sums of squares)."""
        if not self.env.distributed:
            return
        trainable = self._trainable()
        if not trainable:
            return
        stats = torch.stack([torch.stack([p.detach().double().sum(), p.detach().double().square().sum()])
                             for _, p in trainable]).to(self.env.device)  # (P, 2)
        hi, lo = stats.clone(), -stats.clone()
        dist.all_reduce(hi, op=dist.ReduceOp.MAX)
        dist.all_reduce(lo, op=dist.ReduceOp.MAX)
        spread = (hi + lo).abs().max(dim=1).values  # max - min per parameter
        worst = int(spread.argmax())
        if float(spread[worst]) > atol:
            raise RuntimeError(
                f"Trainable parameter {trainable[worst][0]!r} differs between processes (spread "
                f"{float(spread[worst]):.3g} > atol={atol}); the processes are no longer replicas."
            )
