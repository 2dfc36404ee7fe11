"""One `rankwise train` run: build, train with evaluation / checkpoints / logging, save. Read top to bottom.

    task reads the data -> model with its head -> inject LoRA -> allocator (may reshape) -> allocator.prepare
    -> AdamW + warmup schedule -> attach -> [restore a checkpoint] -> loop over steps:
           train_step (rankwise.train.loop) -> log -> evaluate every eval_every -> checkpoint every save_every
    -> allocator.finalize -> final evaluation -> adapter (PEFT format), metrics.json, rank plots

Several processes (`torchrun --nproc-per-node N rankwise train ...` or `accelerate launch`): every process
builds the same run; each step's batch is split by process (rankwise.distributed.shard_batch) and
`ParallelModel` averages the gradients (DDP; FSDP2 for the frozen base with ACCELERATE_USE_FSDP=true or
RANKWISE_STRATEGY=fsdp); process 0 alone writes logs, checkpoints and the adapter. The states are replicated,
so a checkpoint resumes on any number of processes.

Exact resume: the batch of step t is a pure function of (seed, epoch, index) (`DataStream`), and a checkpoint
holds the adapter at its current ranks, optimizer, scheduler, allocator and RNG states, so a resumed run takes
the same steps as an uninterrupted one. Ctrl-C sets a flag; the loop finishes the current step, writes a
checkpoint and stops (a second Ctrl-C stops at once).
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import json
import math
import os
import random
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from rankwise.allocate import Budget, make_allocator
from rankwise.config import LoraConfig
from rankwise.distributed import (
    ParallelConfig,
    ParallelModel,
    bridge_device,
    init_distributed,
    mean_over_processes,
    shard_batch,
    to_device,
)
from rankwise.inject import inject, select_targets
from rankwise.io import checkpoint as ckpt
from rankwise.io.peft import save_adapter
from rankwise.layers.base_kinds import kind_of
from rankwise.model import adapter_param_count
from rankwise.optim_groups import loraplus_param_groups
from rankwise.train.config import TrainConfig
from rankwise.train.logger import RunLog
from rankwise.train.loop import train_step
from rankwise.train.tasks import Example, Task, make_task

CALIBRATION_BATCHES = 8
FREE_ON_RESUME = {  # fields a resumed run may change: they do not affect the training steps
    "resume", "progress", "tensorboard", "plot", "eval_every", "save_every", "keep_checkpoints", "log_every",
    "threads", "eval_generate", "max_new_tokens", "eval_file", "max_eval_samples", "eval_batch_size", "output_dir",
}


class QuietLog:
    """The log of processes other than 0 in a distributed run: they write nothing."""

    def write(self, *args: Any, **kwargs: Any) -> None:
        pass

    message = progress = close = write


@dataclass
class Hooks:
    """Named hooks around the loop; each gets the `Run`. after_step(run, step, loss) runs after logging and
    any checkpoint of that step."""

    after_step: list[Callable[[Run, int, float], None]] = field(default_factory=list)
    after_eval: list[Callable[[Run, int, dict], None]] = field(default_factory=list)


class DataStream:
    """Training batches in a seeded order: epoch e visits a permutation fixed by (seed, e); the position
    (epoch, index) is the whole state, so it resumes exactly."""

    def __init__(self, examples: list[Example], batch_size: int, seed: int) -> None:
        self.examples, self.batch_size, self.seed = examples, batch_size, seed
        self.epoch, self.index = 0, 0
        self._order: list[int] | None = None

    def order(self, epoch: int) -> list[int]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(len(self.examples), generator=g).tolist()

    def next(self) -> list[Example]:
        if self._order is None:
            self._order = self.order(self.epoch)
        picked = self._order[self.index:self.index + self.batch_size]
        self.index += self.batch_size
        if self.index >= len(self.examples):
            self.epoch, self.index, self._order = self.epoch + 1, 0, None
        return [self.examples[i] for i in picked]

    def state(self) -> dict[str, int]:
        return {"epoch": self.epoch, "index": self.index}

    def load(self, state: dict[str, int]) -> None:
        self.epoch, self.index, self._order = int(state["epoch"]), int(state["index"]), None


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def lr_lambda(kind: str, warmup: int, total: int) -> Callable[[int], float]:
    """Linear warmup to 1 over `warmup` steps, then linear / cosine decay to 0 at `total`, or constant."""

    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if kind == "constant":
            return 1.0
        progress = (step - warmup) / max(total - warmup, 1)
        return max(0.0, 1.0 - progress) if kind == "linear" else 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))

    return f


def param_groups(model: torch.nn.Module, lr: float, lr_ratio: float | None, weight_decay: float) -> list[dict]:
    """Trainable parameters in model order; with LoRA+ (`lr_ratio`) rankwise.optim_groups' groups."""
    if lr_ratio is None:
        return [{"params": [p for p in model.parameters() if p.requires_grad]}]
    return loraplus_param_groups(model, lr, ratio=lr_ratio, weight_decay=weight_decay)


def data_initializer(name: str) -> Callable[..., Any] | None:
    """`apply(model, batches, ...)` of a data-driven initialiser (LoRA-GA, CorDA: rankwise.init.<name> has one),
    or None for initialisers that run at injection."""
    try:
        module = importlib.import_module(f"rankwise.init.{name.partition('_niter_')[0]}")
    except ImportError:
        return None
    return getattr(module, "apply", None)


def average_rank_costs(model: torch.nn.Module, lora: LoraConfig) -> dict[str, int]:
    """{target module: in + out}, before injection (what one rank costs in each module)."""
    costs = {}
    for name in select_targets(model, lora):
        base = model.get_submodule(name)
        n_in, n_out = kind_of(base, name).features(base)
        costs[name] = n_in + n_out
    return costs


@contextlib.contextmanager
def interrupt_flag() -> Iterator[dict[str, bool]]:
    """{'stop': bool} set by the first Ctrl-C; the second one raises KeyboardInterrupt as usual."""
    flag = {"stop": False}
    previous = signal.getsignal(signal.SIGINT)

    def handler(signum, frame):
        if flag["stop"]:
            raise KeyboardInterrupt
        flag["stop"] = True

    try:
        signal.signal(signal.SIGINT, handler)
    except ValueError:  # not the main thread: Ctrl-C is not ours to handle
        previous = None
    try:
        yield flag
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)


class Run:
    """The state of one training run (see the module docstring for the order of things)."""

    def __init__(self, config: TrainConfig, hooks: Hooks | None = None) -> None:
        self.cfg = config
        self.hooks = hooks or Hooks()
        self.out = Path(config.output_dir)
        self.ckpt_dir = self.out / "checkpoints"
        self.step = 0
        self.metrics: dict[str, Any] = {}
        self.train_seconds = 0.0

    # ---- building -----------------------------------------------------------------------------------
    def build(self) -> None:
        cfg = self.cfg
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        seed_everything(cfg.seed)
        self.env = init_distributed()  # launched by torchrun / accelerate: one process per GPU
        self.parallel = ParallelConfig(strategy=os.environ.get("RANKWISE_STRATEGY", "auto"))
        self.task: Task = make_task(cfg)
        self.train_examples = self.task.read(cfg.train_file, cfg.max_train_samples, train=True)
        self.eval_examples = (self.task.read(cfg.eval_file, cfg.max_eval_samples, train=False)
                              if cfg.eval_file else [])
        self.model = self.task.load_model()
        self.budget = Budget.parse(cfg.budget, min_rank=cfg.min_rank, max_rank=cfg.max_rank)
        costs = average_rank_costs(self.model, LoraConfig(r=1, target_modules=cfg.target_modules))
        budget_rank = self.budget.total(costs) / sum(costs.values())  # the uniform rank the budget pays for
        init_rank = cfg.init_rank or max(1, math.ceil(budget_rank * (1.5 if cfg.is_adaptive() else 1.0)))
        data_init = data_initializer(cfg.init)
        self.lora = LoraConfig(
            r=init_rank, alpha=cfg.alpha or 2.0 * init_rank, dropout=cfg.dropout, target_modules=cfg.target_modules,
            use_rslora=cfg.use_rslora, use_dora=cfg.use_dora, init="default" if data_init else cfg.init,
            init_kwargs={} if data_init else dict(cfg.init_options),
            modules_to_save=self.task.modules_to_save(self.model),
        )
        inject(self.model, self.lora)
        if data_init is not None:  # LoRA-GA / CorDA: statistics of calibration batches set A, B and the base
            kwargs = dict(cfg.init_options)
            if "loss_fn" in inspect.signature(data_init).parameters:
                kwargs["loss_fn"] = self.loss_fn
            data_init(self.model, self.calibration_batches, **kwargs)
        if self.env.distributed:  # DDP: a replica per GPU; FSDP moves its shards there itself
            if self.parallel.resolved_strategy() == "ddp":
                self.model.to(self.env.device)
            bridge_device(self.model)  # calibration / evaluation batches follow the model to its device
        self.stream = DataStream(self.train_examples, cfg.batch_size, cfg.seed)
        per_epoch = math.ceil(len(self.train_examples) / cfg.batch_size)
        self.total_steps = cfg.steps or max(1, math.ceil(cfg.epochs * per_epoch))
        self.allocator = make_allocator(cfg.method, self.model, self.budget, dict(cfg.allocator_options),
                                        total_steps=self.total_steps, seed=cfg.seed)
        self.allocator.prepare(self.calibration_batches, self.loss_fn)
        # Methods that score on a held-out batch (ALoRA, DyLoRA's greedy choice) get a batch of training rows:
        # never the evaluation set, whose metrics would otherwise be chosen on.
        self.allocator.set_eval_batch(next(self.calibration_batches()), self.loss_fn)
        self.optimizer = torch.optim.AdamW(param_groups(self.model, cfg.lr, cfg.lr_ratio, cfg.weight_decay),
                                           lr=cfg.lr, weight_decay=cfg.weight_decay)
        warmup = int(cfg.warmup_ratio * self.total_steps)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lr_lambda(cfg.scheduler, warmup, self.total_steps))
        self.allocator.attach(self.optimizer)
        self.pm = ParallelModel(self.model, self.parallel, allocator=self.allocator, env=self.env)

    @staticmethod
    def loss_fn(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return model(**batch).loss

    def calibration_batches(self) -> Iterator[dict[str, torch.Tensor]]:
        """A fixed sample of training batches for data-driven methods (independent of the training order)."""
        g = torch.Generator().manual_seed(self.cfg.seed + 7919)
        order = torch.randperm(len(self.train_examples), generator=g).tolist()
        size = self.cfg.batch_size
        for i in range(0, min(len(order), CALIBRATION_BATCHES * size), size):
            yield self.task.collate([self.train_examples[j] for j in order[i:i + size]])

    # ---- checkpoints ---------------------------------------------------------------------------------
    def checkpoint(self) -> Path:
        if not self.env.is_main:  # the processes hold the same state: process 0 writes it
            return self.ckpt_dir
        path = ckpt.save_checkpoint(
            self.ckpt_dir, self.step, model=self.model, optimizer=self.optimizer, scheduler=self.scheduler,
            allocator=self.allocator, data_state=self.stream.state(), keep=self.cfg.keep_checkpoints,
            extra={"config": self.cfg.to_dict(), "train_seconds": self.train_seconds},
        )
        return path

    def resume_path(self) -> Path:
        if self.cfg.resume == "latest":
            found = ckpt.latest_checkpoint(self.ckpt_dir)
            if found is None:
                raise FileNotFoundError(f"--resume latest: no checkpoint in {self.ckpt_dir}. Run without --resume, "
                                        "or pass a checkpoint folder.")
            return found
        return Path(self.cfg.resume)

    def restore(self, path: Path) -> None:
        state = ckpt.load_checkpoint(path)
        saved = state["extra"].get("config", {})
        changed = sorted(k for k, v in saved.items() if k not in FREE_ON_RESUME and self.cfg.to_dict().get(k) != v)
        if changed:
            details = ", ".join(f"{k}: {saved[k]!r} -> {self.cfg.to_dict()[k]!r}" for k in changed)
            raise ValueError(f"Cannot resume from {path}: these settings differ from the interrupted run ({details}). "
                             "Resume with the same settings, or start a new run in another --output-dir.")
        ckpt.restore_model(self.model, state)
        groups = ckpt.build_param_groups(self.model, state["param_names"])
        self.optimizer = torch.optim.AdamW(groups, lr=self.cfg.lr, weight_decay=self.cfg.weight_decay)
        warmup = int(self.cfg.warmup_ratio * self.total_steps)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lr_lambda(self.cfg.scheduler, warmup, self.total_steps))
        self.optimizer.load_state_dict(state["optimizer"])  # after the scheduler, which overwrites lr
        self.scheduler.load_state_dict(state["scheduler"])
        self.allocator.refresh_modules()
        self.allocator.attach(self.optimizer)
        self.allocator.load_state_dict(state["allocator"])
        self.stream.load(state["data"])
        self.step = int(state["step"])
        self.train_seconds = float(state["extra"].get("train_seconds", 0.0))
        ckpt.restore_rng(state["rng"])  # last: building the model above consumed random numbers

    # ---- the loop ------------------------------------------------------------------------------------
    def evaluate(self, log: RunLog) -> dict[str, float]:
        metrics = self.task.evaluate(self.model, self.eval_examples)
        log.write("eval", step=self.step, **metrics)
        for hook in self.hooks.after_eval:
            hook(self, self.step, metrics)
        return metrics

    def train(self) -> dict[str, Any]:
        cfg = self.cfg
        self.out.mkdir(parents=True, exist_ok=True)
        main = self.env.is_main
        if cfg.resume:
            path = self.resume_path()
            self.restore(path)
            if main:
                RunLog.truncate(self.out, self.step)
        elif main:
            (self.out / "log.jsonl").unlink(missing_ok=True)
        if main:
            (self.out / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        log = RunLog(self.out, tensorboard=cfg.tensorboard, progress=cfg.progress, total_steps=self.total_steps,
                     start_step=self.step) if main else QuietLog()
        if cfg.resume:
            log.message(f"resumed from {path} at step {self.step}")
        seen = len(self.allocator.history)
        interrupted = False
        try:
            with interrupt_flag() as flag:
                while self.step < self.total_steps:
                    start = time.perf_counter()
                    self.step += 1
                    batch = self.task.collate(self.stream.next())
                    if self.env.distributed:  # this process's rows of the step's batch
                        batch = to_device(shard_batch(batch, self.env.rank, self.env.world_size, uneven=True),
                                          self.env.device)
                    loss = train_step(self.pm, batch, self.step, self.optimizer, allocator=self.allocator,
                                      loss_fn=self.loss_fn, scheduler=self.scheduler, grad_clip=cfg.grad_clip)
                    loss = mean_over_processes(loss)
                    self.train_seconds += time.perf_counter() - start
                    seen = self._after_step(log, loss, seen)
                    if flag["stop"] and self.step < self.total_steps:
                        log.write("checkpoint", step=self.step, path=str(self.checkpoint()), reason="interrupt")
                        log.message(f"interrupted: checkpoint at step {self.step}; continue with --resume")
                        interrupted = True
                        break
        finally:
            log.close()
        if interrupted:
            return {"interrupted": True, "step": self.step}
        return self.finish()

    def _after_step(self, log: RunLog, loss: float, seen: int) -> int:
        cfg, step = self.cfg, self.step
        params = adapter_param_count(self.model)
        lr = self.scheduler.get_last_lr()[0]
        if step % cfg.log_every == 0 or step in (1, self.total_steps):
            log.write("train", step=step, loss=loss, lr=lr, trainable_params=params)
        for decision in self.allocator.history[seen:]:
            log.write("allocation", **decision)
        log.progress(step, loss=f"{loss:.4f}", lr=f"{lr:.2e}", params=f"{params:,}")
        if cfg.eval_every and step % cfg.eval_every == 0 and self.eval_examples and step < self.total_steps:
            self.evaluate(log)
        if cfg.save_every and step % cfg.save_every == 0 and step < self.total_steps:
            log.write("checkpoint", step=step, path=str(self.checkpoint()))
        for hook in self.hooks.after_step:
            hook(self, step, loss)
        return len(self.allocator.history)

    # ---- the end -------------------------------------------------------------------------------------
    def finish(self) -> dict[str, Any]:
        cfg = self.cfg
        self.allocator.finalize()
        main = self.env.is_main
        log = RunLog(self.out, tensorboard=cfg.tensorboard, progress=False, total_steps=self.total_steps) if main \
            else QuietLog()
        try:
            metrics = self.evaluate(log) if self.eval_examples else {}
            params = adapter_param_count(self.model)
            summary = {
                "method": cfg.method, "init": cfg.init, "budget": cfg.budget,
                "budget_params": self.allocator.budget_params, "trainable_params": params,
                "steps": self.step, "train_seconds": round(self.train_seconds, 2), "eval": metrics,
            }
            log.write("final", step=self.step, **{k: v for k, v in summary.items() if k != "eval"}, **metrics)
        finally:
            log.close()
        if not main:  # every process evaluated (FSDP needs all of them); process 0 writes
            return summary
        meta = {**self.task.metadata(), "method": cfg.method, "budget": cfg.budget, "steps": self.step,
                "eval": metrics, "base_model": str(Path(cfg.model).resolve())}
        save_adapter(self.model, self.out / "adapter", history=self.allocator.history, metadata=meta,
                     task_type=self.task.peft_task_type, base_model_name_or_path=str(Path(cfg.model).resolve()))
        (self.out / "metrics.json").write_text(json.dumps(summary, indent=2) + "\n")
        picture = self._plot() if cfg.plot else None
        if picture is not None:
            summary["plot"] = str(picture)
        summary["adapter"] = str(self.out / "adapter")
        return summary

    def _plot(self) -> Path | None:
        try:
            from rankwise.plot import plot_adapter
        except ImportError:  # matplotlib is optional
            return None
        return plot_adapter(self.out / "adapter", self.out / "ranks.png")


def train(config: TrainConfig, hooks: Hooks | None = None) -> dict[str, Any]:
    """Build and run a training run; returns the summary (also written to <output_dir>/metrics.json)."""
    run = Run(config, hooks)
    run.build()
    return run.train()
