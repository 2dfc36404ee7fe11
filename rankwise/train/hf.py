"""Run any rankwise allocator inside `transformers.Trainer` with a callback: no update calls to write.

    rankwise.inject(model, rankwise.LoraConfig(r=12, alpha=24, modules_to_save=["classifier"]))
    callback = RankwiseCallback(model, "adalora", Budget(avg_rank=8), total_steps=500)   # before the Trainer
    trainer = Trainer(model=model, args=args, train_dataset=ds, callbacks=[callback])
    trainer.train()
    callback.save_adapter("out/adapter")                                                  # PEFT format

How the allocator's hooks map onto the Trainer's events (transformers 5 passes the optimizer to callbacks):

    on_train_begin          create the allocator (when total_steps was left None), prepare() it with
                            training batches if it is data-driven, attach() the Trainer's optimizer
    on_pre_optimizer_step   (gradients are accumulated and clipped) add the gradient of the allocator's
                            regulariser loss_term() to .grad, then on_backward(step)
    on_optimizer_step       on_step(step): decisions and physical resizes; resizes swap the parameters
                            inside the Trainer's optimizer and carry their Adam state (remap_optimizer)
    on_save                 write rankwise_state.pt (allocator state, adapter ranks) into checkpoint-N
    on_train_end            finalize()

The regulariser is added as a gradient (d loss_term / d params, by torch.autograd.grad) instead of to the
loss, so no Trainer subclass is needed: the sum of gradients is the gradient of the sum. Unlike the plain loop
it is added after gradient clipping. Tested in a single process.

Resuming a Trainer checkpoint: the Trainer loads weights before any callback runs, so the adapters must have
the checkpoint's ranks first: call `callback.prepare_resume(checkpoint_dir)`, then
`trainer.train(resume_from_checkpoint=checkpoint_dir)`.
"""

from __future__ import annotations

import io
import itertools
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import TrainerCallback

from rankwise.allocate import Allocator, Budget, make_allocator
from rankwise.io.atomic import atomic_write_bytes
from rankwise.io.checkpoint import adapter_attributes, model_state, param_names, restore_model

STATE_FILE = "rankwise_state.pt"
CALIBRATION_BATCHES = 8


def _unwrap(optimizer: Any) -> torch.optim.Optimizer | None:
    """accelerate wraps the optimizer (AcceleratedOptimizer); the torch optimizer is inside."""
    return getattr(optimizer, "optimizer", optimizer)


class RankwiseCallback(TrainerCallback):
    """Runs allocator `method` on `model`'s adapter `adapter_name` under `budget` during Trainer.train().

    Create it before the Trainer (the allocator may reshape adapters before the optimizer exists). With
    `total_steps=None` the allocator is made at on_train_begin from the Trainer's max_steps."""

    def __init__(self, model: nn.Module, method: str, budget: Budget | str, *, total_steps: int | None = None,
                 config: dict[str, Any] | None = None, adapter_name: str = "default", seed: int = 0) -> None:
        self.model = model
        self.method = method
        self.budget = Budget.parse(budget) if isinstance(budget, str) else budget
        self.config = dict(config or {})
        self.adapter_name = adapter_name
        self.seed = seed
        self.total_steps = total_steps
        self.allocator: Allocator | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        self.resumed = False
        self._saved_param_names: list[list[str]] | None = None
        if total_steps is not None:
            self.allocator = self._make(total_steps)

    def _make(self, total_steps: int) -> Allocator:
        self.total_steps = int(total_steps)
        return make_allocator(self.method, self.model, self.budget, self.config, adapter_name=self.adapter_name,
                              total_steps=self.total_steps, seed=self.seed)

    # ---- Trainer events ----------------------------------------------------------------------------------
    def on_train_begin(self, args, state, control, optimizer=None, train_dataloader=None, **kwargs):
        opt = _unwrap(optimizer)
        before = dict(self.model.named_parameters())
        if self.allocator is None:
            self.allocator = self._make(state.max_steps)
        if not self.resumed and type(self.allocator).prepare is not Allocator.prepare and train_dataloader is not None:
            device = next(self.model.parameters()).device

            def batches():
                for batch in itertools.islice(train_dataloader, CALIBRATION_BATCHES):
                    yield {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}

            self.allocator.prepare(batches)
        if opt is not None and self.resumed:
            realign_optimizer(opt, self._saved_param_names, self.model)
        elif opt is not None:
            sync_optimizer(opt, before, self.model)
        self.optimizer = opt
        self.allocator.attach(opt)

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        term = self.allocator.loss_term()
        if term is not None:
            params = [p for p in self.model.parameters() if p.requires_grad]
            grads = torch.autograd.grad(term, params, allow_unused=True)
            for p, g in zip(params, grads):
                if g is not None:
                    p.grad = g if p.grad is None else p.grad + g
        self.allocator.on_backward(state.global_step + 1)

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.allocator.on_step(state.global_step + 1)  # the Trainer increments global_step after this event

    def on_save(self, args, state, control, **kwargs):
        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if folder.is_dir() and args.process_index == 0:
            buffer = io.BytesIO()
            torch.save({"allocator": self.allocator.state_dict(), "total_steps": self.total_steps,
                        "method": self.method, "model": model_state(self.model),
                        "param_names": param_names(self.model, self.optimizer),
                        "adapter_attributes": adapter_attributes(self.model)}, buffer)
            atomic_write_bytes(folder / STATE_FILE, buffer.getvalue())

    def on_train_end(self, args, state, control, **kwargs):
        self.allocator.finalize()

    # ---- resume and export --------------------------------------------------------------------------------
    def prepare_resume(self, checkpoint_dir: str | Path) -> None:
        """Give the adapters the checkpoint's ranks and the allocator its state (before trainer.train)."""
        file = Path(checkpoint_dir) / STATE_FILE
        if not file.is_file():
            raise FileNotFoundError(f"{checkpoint_dir} has no {STATE_FILE}: it was not written by a Trainer with "
                                    "RankwiseCallback. Pass a checkpoint-N folder of such a run.")
        state = torch.load(file, map_location="cpu", weights_only=True)
        if state["method"] != self.method:
            raise ValueError(f"{checkpoint_dir} was trained with {state['method']!r}, this callback runs "
                             f"{self.method!r}; create the callback with the checkpoint's method.")
        if self.allocator is None:
            self.allocator = self._make(state["total_steps"])
        restore_model(self.model, state)
        self.allocator.refresh_modules()
        self.allocator.load_state_dict(state["allocator"])
        self._saved_param_names = state["param_names"]
        self.resumed = True

    def save_adapter(self, path: str | Path, **config_extra: Any) -> Path:
        """The trained adapter in the PEFT format, with the rank history."""
        from rankwise.io.peft import save_adapter

        history = self.allocator.history if self.allocator is not None else None
        return save_adapter(self.model, path, self.adapter_name, history=history,
                            metadata={"method": self.method}, **config_extra)


def sync_optimizer(optimizer: torch.optim.Optimizer, before: dict[str, nn.Parameter], model: nn.Module) -> None:
    """Make `optimizer` (with no state yet) hold the model's current trainable parameters after changes made
    before step 1 (an allocator replaced some or added rank vectors). Replaced ones take their predecessor's
    place; a new one joins the group of the trainable parameter before it in the model (a rank vector goes
    with its adapter's lora_B); each group is then in model order, as the Trainer builds them. Mutates it."""
    now = {n: p for n, p in model.named_parameters() if p.requires_grad}
    name_of = {id(p): n for n, p in before.items()}
    groups = optimizer.param_groups
    for group in groups:
        for i, p in enumerate(group["params"]):
            name = name_of.get(id(p))
            if name in now and now[name] is not p:
                optimizer.state.pop(p, None)
                group["params"][i] = now[name]
    group_of = {id(p): gi for gi, g in enumerate(groups) for p in g["params"]}
    previous = 0
    for p in now.values():
        if id(p) not in group_of:
            groups[previous]["params"].append(p)
            group_of[id(p)] = previous
        previous = group_of[id(p)]
    order = {id(p): i for i, p in enumerate(now.values())}
    for group in groups:
        group["params"].sort(key=lambda p: order.get(id(p), len(order)))


def realign_optimizer(optimizer: torch.optim.Optimizer, names: list[list[str]] | None, model: nn.Module) -> None:
    """After the Trainer loaded a checkpoint's optimizer state by position, give each state to the parameter
    it was saved for (the checkpoint's `param_names`), in case the two orders differ. Mutates `optimizer`."""
    if names is None:
        return
    named = dict(model.named_parameters())
    if [len(g["params"]) for g in optimizer.param_groups] != [len(n) for n in names]:
        raise ValueError(
            f"The Trainer's optimizer groups have {[len(g['params']) for g in optimizer.param_groups]} parameters, "
            f"the checkpoint's {[len(n) for n in names]}: build the Trainer as for the interrupted run.")
    for group, group_names in zip(optimizer.param_groups, names):
        states = [optimizer.state.pop(p, None) for p in group["params"]]  # state i was saved for group_names[i]
        group["params"] = [named[n] for n in group_names]
        for p, st in zip(group["params"], states):
            if st is not None:
                optimizer.state[p] = st
