"""Training on several processes with PyTorch's own DDP and FSDP2, with ranks that change during training.

    env = init_distributed()                      # torchrun / accelerate launch variables -> process group
    model.to(env.device); rankwise.inject(model, config); alloc = make_allocator(...); alloc.prepare(...)
    opt = AdamW(trainable); alloc.attach(opt)
    pm = ParallelModel(model, ParallelConfig(strategy="ddp"), allocator=alloc, env=env)
    parallel_fit(pm, global_batches, steps, opt, allocator=alloc, accumulation_steps=2)
    if env.is_main: rankwise.save_adapter(model, "out/adapter")      # adapters are replicated: save once

env.py: launcher variables, process group, batch sharding, device bridging. parallel.py: the DDP wrapper
that is rebuilt after each resize. fsdp.py: FSDP2 sharding of the frozen base only. step.py: the
accumulation-aware step. recompute.py: gradient checkpointing that works under DDP / FSDP.
"""

from rankwise.distributed.env import (
    DistEnv,
    barrier,
    bridge_device,
    current_env,
    destroy_distributed,
    init_distributed,
    inputs_on_device,
    is_main_process,
    launched_distributed,
    main_process_first,
    mean_over_processes,
    shard_batch,
    split_micro_batches,
    to_device,
)
from rankwise.distributed.fsdp import is_sharded, shard_frozen_base
from rankwise.distributed.parallel import ParallelConfig, ParallelModel
from rankwise.distributed.recompute import enable_gradient_checkpointing
from rankwise.distributed.step import parallel_fit, parallel_train_step

__all__ = [
    "DistEnv",
    "ParallelConfig",
    "ParallelModel",
    "barrier",
    "bridge_device",
    "current_env",
    "destroy_distributed",
    "enable_gradient_checkpointing",
    "init_distributed",
    "inputs_on_device",
    "is_main_process",
    "is_sharded",
    "launched_distributed",
    "main_process_first",
    "mean_over_processes",
    "parallel_fit",
    "parallel_train_step",
    "shard_batch",
    "shard_frozen_base",
    "split_micro_batches",
    "to_device",
]
