"""Run a function in N CPU processes (torch.distributed, gloo) and collect what each returns."""

from __future__ import annotations

import datetime
import os
import socket
import tempfile

import torch
import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, fn, args, out_dir: str, timeout_s: float = 300.0) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    # A bounded timeout turns a collective that one process never reaches into an error, not a hung test.
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world,
                                         timeout=datetime.timedelta(seconds=timeout_s))
    try:
        result = fn(rank, world, *args)
        torch.save(result, os.path.join(out_dir, f"{rank}.pt"))
    finally:
        torch.distributed.destroy_process_group()


def run_distributed(fn, world: int = 2, args: tuple = (), timeout_s: float = 300.0) -> list:
    """fn(rank, world, *args) must be a module-level function; its return value must be torch.save-able.
    timeout_s bounds each collective (gloo raises instead of waiting forever)."""
    with tempfile.TemporaryDirectory() as d:
        mp.start_processes(_worker, args=(world, _free_port(), fn, args, d, timeout_s), nprocs=world, join=True,
                           start_method="spawn")
        return [torch.load(os.path.join(d, f"{r}.pt"), weights_only=False) for r in range(world)]
