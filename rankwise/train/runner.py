"""One `rankwise train` run: build, train with evaluation / checkpoints / logging, save. Read top to bottom.

    task reads the data -> model with its head -> inject LoRA -> allocator (may reshape) -> allocator.prepare
    -> [gradient checkpointing] -> AdamW + warmup schedule -> attach -> [restore a checkpoint] -> loop over steps:
           parallel_train_step (rankwise.distributed.step) -> log -> evaluate every eval_every -> checkpoint
           every save_every
    -> allocator.finalize -> final evaluation -> adapter (PEFT format), metrics.json, rank plots

Batches: one optimizer step takes the next batch_size x grad_accum x processes examples (the effective batch)
from `DataStream`; each process takes its contiguous share (rankwise.distributed.shard_batch) and splits it
into grad_accum micro-batches of batch_size. `parallel_train_step` runs forward and backward per micro-batch
with the loss divided by grad_accum, inside DDP's no_sync() for all but the last, then calls the allocator's
on_backward once (scores from the accumulated gradient, the gradient of the mean loss over the effective
batch), the optimizer and on_step. So with the same effective batch, 1 process x grad_accum 4, 2 processes x
grad_accum 2 and 4 processes train the same adapter up to float error. precision=bf16 runs the forward of
training and evaluation under bfloat16 autocast (weights, adapters, optimizer state stay fp32).

Several processes (`torchrun --nproc-per-node N rankwise train ...` or `accelerate launch`): every process
builds the same run; `ParallelModel` averages the gradients (DDP; FSDP2 for the frozen base with
ACCELERATE_USE_FSDP=true or RANKWISE_STRATEGY=fsdp); process 0 alone writes logs, checkpoints and the adapter.
The states are replicated, so a checkpoint resumes on any number of processes, with batch_size and grad_accum
chosen to keep the effective batch.

Exact resume: the examples of step t are a pure function of (seed, epoch, index) (`DataStream`; steps count
optimizer steps), and a checkpoint holds the adapter at its current ranks, optimizer, scheduler, allocator and
RNG states, so a resumed run takes the same steps as an uninterrupted one. Ctrl-C sets a flag; the loop
finishes the current step, writes a checkpoint and stops (a second Ctrl-C stops at once).
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
    enable_gradient_checkpointing,
    init_distributed,
    parallel_train_step,
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
from rankwise.train.tasks import Example, Task, make_task

CALIBRATION_BATCHES = 8
FREE_ON_RESUME = {  # fields a resumed run may change: they do not affect the training steps
    "resume", "progress", "tensorboard", "plot", "eval_every", "save_every", "keep_checkpoints", "log_every",
    "threads", "eval_generate", "max_new_tokens", "eval_file", "max_eval_samples", "eval_batch_size", "output_dir",
    "gradient_checkpointing",  # recomputes the same activations
}
LAYOUT_ON_RESUME = {"batch_size", "grad_accum"}  # may change on resume if the effective batch stays the same


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
    """Training batches (of the effective batch size) in a seeded order: epoch e visits a permutation fixed by
    (seed, e); the position (epoch, index) is the whole state, so it resumes exactly."""

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


def resolve_device(name: str) -> torch.device:
    """`TrainConfig.device` of a one-process run: auto is the current GPU when there is one, else the CPU."""
    if name == "auto":
        return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device={name!r} but torch sees no GPU (torch {torch.__version__}); use device=cpu or auto.")
    return torch.device(name)


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
        self.device = self.env.device if self.env.distributed else resolve_device(cfg.device)
        self.effective_batch = cfg.batch_size * cfg.grad_accum * self.env.world_size  # examples per optimizer step
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
        else:
            self.model.to(self.device)
        bridge_device(self.model)  # calibration / evaluation batches follow the model to its device
        self.stream = DataStream(self.train_examples, self.effective_batch, cfg.seed)
        per_epoch = math.ceil(len(self.train_examples) / self.effective_batch)
        self.total_steps = cfg.steps or max(1, math.ceil(cfg.epochs * per_epoch))
        self.allocator = make_allocator(cfg.method, self.model, self.budget, dict(cfg.allocator_options),
                                        total_steps=self.total_steps, seed=cfg.seed)
        self.allocator.prepare(self.calibration_batches, self.loss_fn)
        # Methods that score on a held-out batch (ALoRA, DyLoRA's greedy choice) get a batch of training rows:
        # never the evaluation set, whose metrics would otherwise be chosen on.
        self.allocator.set_eval_batch(next(self.calibration_batches()), self.loss_fn)
        if cfg.gradient_checkpointing:  # after the data-driven steps above: their hooks must see one forward each
            try:
                enable_gradient_checkpointing(self.model, distributed=self.env.distributed)
            except (TypeError, ValueError) as err:
                raise ValueError(f"gradient_checkpointing=true: {err} Set gradient_checkpointing to false for this "
                                 "model.") from err
        self.optimizer = torch.optim.AdamW(param_groups(self.model, cfg.lr, cfg.lr_ratio, cfg.weight_decay),
                                           lr=cfg.lr, weight_decay=cfg.weight_decay)
        warmup = int(cfg.warmup_ratio * self.total_steps)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lr_lambda(cfg.scheduler, warmup, self.total_steps))
        self.allocator.attach(self.optimizer)
        self.pm = ParallelModel(self.model, self.parallel, allocator=self.allocator, env=self.env)
        self.device_type = next(self.model.parameters()).device.type  # after FSDP placed its shards
        if cfg.precision == "bf16" and self.device_type == "cuda" and not torch.cuda.is_bf16_supported():
            raise ValueError(f"precision='bf16': {torch.cuda.get_device_name()} has no bfloat16 support; use "
                             "precision fp32 on this GPU.")

    @staticmethod
    def loss_fn(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return model(**batch).loss

    def autocast(self) -> contextlib.AbstractContextManager:
        """bfloat16 autocast on the model's device for precision=bf16 (weights stay fp32), else nothing."""
        if self.cfg.precision == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device_type, dtype=torch.bfloat16)

    def train_loss(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The task loss of one training micro-batch, forward in the run's precision (backward runs outside)."""
        with self.autocast():
            return self.loss_fn(model, batch)

    def micro_batches(self, examples: list[Example]) -> list[dict[str, torch.Tensor]]:
        """This process's share of one step's examples as grad_accum collated micro-batches (on its device).
        Shares and micro-batches are contiguous rows, equal in size except in the short last batch of an epoch:
        there sizes differ by at most one, a share smaller than the number of processes goes whole to every
        process, and fewer rows than grad_accum give fewer micro-batches. Each is padded to its own longest row."""
        mine = shard_batch(examples, self.env.rank, self.env.world_size, uneven=True)
        parts = min(self.cfg.grad_accum, len(mine))
        batches = [self.task.collate(shard_batch(mine, i, parts, uneven=True, parts="micro-batches"))
                   for i in range(parts)]
        return [to_device(b, self.device) for b in batches]

    def calibration_batches(self) -> Iterator[dict[str, torch.Tensor]]:
        """A fixed sample of training batches for data-driven methods (independent of the training order):
        CALIBRATION_BATCHES effective batches of rows, in batches of batch_size (what one forward holds)."""
        g = torch.Generator().manual_seed(self.cfg.seed + 7919)
        order = torch.randperm(len(self.train_examples), generator=g).tolist()
        size = self.cfg.batch_size
        for i in range(0, min(len(order), CALIBRATION_BATCHES * self.effective_batch), size):
            yield self.task.collate([self.train_examples[j] for j in order[i:i + size]])

    # ---- checkpoints ---------------------------------------------------------------------------------
    def checkpoint(self) -> Path:
        if not self.env.is_main:  # the processes hold the same state: process 0 writes it
            return self.ckpt_dir
        path = ckpt.save_checkpoint(
            self.ckpt_dir, self.step, model=self.model, optimizer=self.optimizer, scheduler=self.scheduler,
            allocator=self.allocator, data_state=self.stream.state(), keep=self.cfg.keep_checkpoints,
            extra={"config": self.cfg.to_dict(), "train_seconds": self.train_seconds,
                   "effective_batch": self.effective_batch},
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
        saved, now = state["extra"].get("config", {}), self.cfg.to_dict()
        changed = [f"{k}: {v!r} -> {now.get(k)!r}" for k, v in sorted(saved.items())
                   if k not in FREE_ON_RESUME | LAYOUT_ON_RESUME and now.get(k) != v]
        # checkpoints written before grad_accum existed: batch_size was the whole step's batch
        saved_batch = int(state["extra"].get("effective_batch", saved.get("batch_size", self.effective_batch)))
        if saved_batch != self.effective_batch:
            changed.append(f"effective batch (batch_size x grad_accum x processes): {saved_batch} -> "
                           f"{self.cfg.batch_size} x {self.cfg.grad_accum} x {self.env.world_size} = "
                           f"{self.effective_batch}")
        if changed:
            raise ValueError(f"Cannot resume from {path}: these settings differ from the interrupted run "
                             f"({', '.join(changed)}). Resume with the same settings (batch_size and grad_accum "
                             f"may change if batch_size x grad_accum x processes stays {saved_batch}), or start "
                             "a new run in another --output-dir.")
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
        with self.autocast():
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
        log.message(f"effective batch {self.effective_batch} = batch_size {cfg.batch_size} x grad_accum "
                    f"{cfg.grad_accum} x {self.env.world_size} process(es); precision {cfg.precision}")
        if cfg.resume:
            log.message(f"resumed from {path} at step {self.step}")
        seen = len(self.allocator.history)
        interrupted = False
        try:
            with interrupt_flag() as flag:
                while self.step < self.total_steps:
                    start = time.perf_counter()
                    self.step += 1
                    micro = self.micro_batches(self.stream.next())
                    # the mean task loss over micro-batches and processes
                    loss = parallel_train_step(self.pm, micro, self.step, self.optimizer, allocator=self.allocator,
                                               loss_fn=self.train_loss, scheduler=self.scheduler,
                                               grad_clip=cfg.grad_clip)
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
                "steps": self.step, "effective_batch": self.effective_batch, "precision": cfg.precision,
                "train_seconds": round(self.train_seconds, 2), "eval": metrics,
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
