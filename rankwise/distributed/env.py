"""Who am I in a distributed run: read the launcher's environment, start the process group, split batches.

`torchrun --nproc-per-node N` and `accelerate launch` both start one process per GPU and set RANK,
WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT; `init_distributed` reads them, binds the process to
its GPU and starts the default process group. On GPUs the group has two backends, "cpu:gloo,cuda:nccl":
NCCL for model tensors, gloo for the small CPU tensors that allocators reduce (scores moved to the CPU,
eval losses), which NCCL cannot carry. Without those variables it returns a single-process `DistEnv`, so
the same script runs with plain `python`.

Data is split by process inside each global batch (`shard_batch`): process k takes rows
[k * B/N, (k+1) * B/N). With equal shards and a loss that is a mean over the rows of a shard, the average
of the processes' gradients (what DDP computes) is the gradient of the mean loss over the global batch, so
N processes follow the single-process run with the same global batch up to float error. (A token-level
LM loss averages over the tokens of each shard: shards with different numbers of label tokens weigh
tokens slightly differently than one process would.)
"""

from __future__ import annotations

import contextlib
import datetime
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class DistEnv:
    """This process's place in the run. `device` is where its model and batches go."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    backend: str | None = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def launched_distributed() -> bool:
    """True when a launcher (torchrun, accelerate launch) started this process as one of several."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def current_env() -> DistEnv:
    """The DistEnv of an already started process group (or a single process when none is)."""
    if not (dist.is_available() and dist.is_initialized()):
        return DistEnv(device=torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available()
                       else torch.device("cpu"))
    backend = str(dist.get_backend())
    local_rank = int(os.environ.get("LOCAL_RANK", dist.get_rank()))
    device = torch.device("cuda", local_rank) if "nccl" in backend else torch.device("cpu")
    return DistEnv(dist.get_rank(), dist.get_world_size(), local_rank, device, backend)


def init_distributed(backend: str | None = None, timeout_minutes: float = 30.0) -> DistEnv:
    """Start the default process group from the launcher's variables (idempotent) and return this DistEnv.

    backend: None picks "cpu:gloo,cuda:nccl" when CUDA is available, else "gloo". Each process uses GPU
    LOCAL_RANK.
    """
    if dist.is_available() and dist.is_initialized():
        return current_env()
    if not launched_distributed():
        return current_env()
    missing = [v for v in LAUNCH_VARS if v not in os.environ]
    if missing:
        raise RuntimeError(
            f"WORLD_SIZE={os.environ['WORLD_SIZE']} but {missing} are not set. Start the run with "
            "`torchrun --nproc-per-node N ...` or `accelerate launch ...`, which set all of "
            f"{list(LAUNCH_VARS)}."
        )
    local_rank = int(os.environ["LOCAL_RANK"])
    backend = backend or ("cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo")
    if "nccl" in backend:
        if local_rank >= torch.cuda.device_count():
            raise RuntimeError(
                f"LOCAL_RANK={local_rank} but only {torch.cuda.device_count()} GPU(s) are visible; start at most "
                f"{torch.cuda.device_count()} processes per node (--nproc-per-node)."
            )
        torch.cuda.set_device(local_rank)
    kwargs: dict[str, Any] = {"timeout": datetime.timedelta(minutes=timeout_minutes)}
    if "nccl" in backend:
        kwargs["device_id"] = torch.device("cuda", local_rank)  # eager NCCL init, bound to this GPU
    dist.init_process_group(backend, **kwargs)
    return current_env()


def destroy_distributed() -> None:
    """End the process group if one is running (call once at the end of a script)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def is_main_process() -> bool:
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def barrier() -> None:
    """Wait for every process (a no-op in a single process)."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        if "nccl" in str(dist.get_backend()):
            dist.barrier(device_ids=[torch.cuda.current_device()])
        else:
            dist.barrier()


@contextlib.contextmanager
def main_process_first() -> Iterator[None]:
    """Process 0 runs the block first (downloads, tokenisation caches, writing files), then the others."""
    if not is_main_process():
        barrier()
    yield
    if is_main_process():
        barrier()


def shard_batch(batch: Any, rank: int, world_size: int, *, uneven: bool = False, parts: str = "processes") -> Any:
    """This process's rows of a global batch: tensors (and lists) split along dim 0 into `world_size` equal
    contiguous parts, part `rank` returned. Dicts and tuples are split entry by entry; other values are
    passed through. Raises when the batch size does not divide evenly (unequal shards would weigh rows
    differently from a single process), unless `uneven`: then parts differ by at most one row, and a batch
    with fewer rows than processes goes whole to every process (the average of identical gradients is the
    batch's gradient), e.g. the short last batch of an epoch."""
    if world_size == 1:
        return batch
    if isinstance(batch, dict):
        return {k: shard_batch(v, rank, world_size, uneven=uneven, parts=parts) for k, v in batch.items()}
    if isinstance(batch, tuple):
        return tuple(shard_batch(v, rank, world_size, uneven=uneven, parts=parts) for v in batch)
    if isinstance(batch, (torch.Tensor, list)):
        n = len(batch)
        if n % world_size and uneven:
            if n < world_size:
                return batch
            base, extra = divmod(n, world_size)
            start = rank * base + min(rank, extra)
            return batch[start: start + base + (1 if rank < extra else 0)]
        if n % world_size:
            raise ValueError(
                f"A batch of {n} rows cannot be split evenly into {world_size} {parts}; use a batch size that "
                f"is a multiple of {world_size} (e.g. {max(world_size, n - n % world_size)})."
            )
        per = n // world_size
        return batch[rank * per: (rank + 1) * per]
    return batch


def split_micro_batches(batch: Any, n: int) -> list[Any]:
    """Split one (per-process) batch into `n` equal micro-batches for gradient accumulation."""
    return [shard_batch(batch, i, n, parts="micro-batches") for i in range(n)]


def _first_tensor(value: Any) -> torch.Tensor | None:
    if isinstance(value, torch.Tensor):
        return value
    items = value.values() if isinstance(value, dict) else value if isinstance(value, (tuple, list)) else ()
    for item in items:
        found = _first_tensor(item)
        if found is not None:
            return found
    return None


def _outputs_to(output: Any, device: torch.device) -> Any:
    """Tensors of a model output moved to `device`; ModelOutput-like dicts are updated in place (they keep
    their class and attribute access)."""
    if isinstance(output, torch.Tensor):
        return output.to(device)
    if isinstance(output, dict):
        for key in list(output.keys()):
            if isinstance(output[key], torch.Tensor):
                output[key] = output[key].to(device)
        return output
    if isinstance(output, tuple):
        return type(output)(_outputs_to(v, device) for v in output) if type(output) is tuple else output
    return output


def bridge_device(model: torch.nn.Module, device: torch.device | None = None) -> Callable[[], None]:
    """From now on, calls of `model` get their tensor arguments moved to `device` (None: the device of the
    model's first parameter at call time) and give their tensor outputs back on the device the inputs came
    from (as accelerate's io_same_device does), so code written for a CPU model (evaluation loops,
    `generate`, allocators' calibration) runs unchanged on a GPU model. Inputs already on the device cost
    nothing. Mutates `model` (two hooks); returns a function that removes them."""
    origins: list[torch.device | None] = []

    def pre(module, args, kwargs):
        first = _first_tensor((args, kwargs))
        origins.append(first.device if first is not None else None)
        target = device if device is not None else next(module.parameters()).device
        return to_device(args, target), to_device(kwargs, target)

    def post(module, args, kwargs, output):
        origin = origins.pop()
        moved = _first_tensor(output)
        if origin is None or moved is None or moved.device == origin:
            return output
        return _outputs_to(output, origin)

    handles = [model.register_forward_pre_hook(pre, with_kwargs=True),
               model.register_forward_hook(post, with_kwargs=True)]

    def remove() -> None:
        for h in handles:
            h.remove()

    return remove


@contextlib.contextmanager
def inputs_on_device(model: torch.nn.Module, device: torch.device | None = None) -> Iterator[None]:
    """`bridge_device` for the duration of the block."""
    remove = bridge_device(model, device)
    try:
        yield
    finally:
        remove()


def mean_over_processes(value: float) -> float:
    """The average of a number over the processes (itself in a single process); a collective."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return value
    env = current_env()
    t = torch.tensor([float(value)], dtype=torch.float64, device=env.device)
    dist.all_reduce(t)
    return float(t) / dist.get_world_size()


def to_device(batch: Any, device: torch.device) -> Any:
    """Move the tensors of a (nested dict / tuple / list) batch to `device`."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(to_device(v, device) for v in batch)
    return batch
