"""What a training task provides to the run, and the registry of tasks.

A task reads its data files into encoded examples (token ids and labels, plain lists), loads the model with
the right head, batches examples, and evaluates. The run (`rankwise.train.runner`) knows nothing else about
the task. Tasks: `classification` (rankwise/train/classification.py) and `causal-lm` (causal_lm.py).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

if TYPE_CHECKING:
    from rankwise.train.config import TrainConfig

Example = dict[str, Any]  # {"input_ids": [...], "attention_mask": [...], "labels": int | [...], ...}


class Task(ABC):
    name: ClassVar[str] = ""
    peft_task_type: ClassVar[str] = ""
    primary_metric: ClassVar[str] = ""
    higher_is_better: ClassVar[bool] = True

    def __init__(self, config: TrainConfig) -> None:
        self.config = config
        self.tokenizer = None

    @abstractmethod
    def read(self, path: str, limit: int | None, *, train: bool) -> list[Example]:
        """Encoded examples of a data file. The training file is read first (it may fix the label set)."""

    @abstractmethod
    def load_model(self) -> nn.Module:
        """The base model with this task's head (call after `read` of the training file)."""

    @abstractmethod
    def evaluate(self, model: nn.Module, examples: list[Example]) -> dict[str, float]:
        """Metrics on `examples` (model in eval mode, no gradients)."""

    def modules_to_save(self, model: nn.Module) -> list[str] | None:
        """Modules trained in full and saved with the adapter (a new classification head)."""
        return None

    def metadata(self) -> dict[str, Any]:
        """What a later run or `rankwise merge` needs to rebuild the model (e.g. the label names)."""
        return {"task": self.name}

    def collate(self, examples: list[Example]) -> dict[str, torch.Tensor]:
        """Right-pad to the longest example: ids with the pad id, masks with 0, label lists with -100."""
        pad_id = self.tokenizer.pad_token_id if self.tokenizer is not None else 0
        width = max(len(e["input_ids"]) for e in examples)
        batch: dict[str, torch.Tensor] = {}
        for key in examples[0]:
            values = [e[key] for e in examples]
            if isinstance(values[0], list):
                fill = {"input_ids": pad_id, "labels": -100}.get(key, 0)
                batch[key] = torch.tensor([v + [fill] * (width - len(v)) for v in values], dtype=torch.long)
            else:
                batch[key] = torch.tensor(values, dtype=torch.long)
        return batch

    def batches(self, examples: list[Example], batch_size: int):
        for i in range(0, len(examples), batch_size):
            yield self.collate(examples[i:i + batch_size])


_TASKS: dict[str, type[Task]] = {}


def register_task(cls: type[Task]) -> type[Task]:
    if not cls.name or cls.name in _TASKS:
        raise ValueError(f"Task {cls.__name__} needs a unique non-empty name (got {cls.name!r}).")
    _TASKS[cls.name] = cls
    return cls


def _load_builtin() -> None:
    import rankwise.train.causal_lm
    import rankwise.train.classification  # noqa: F401


def available_tasks() -> list[str]:
    _load_builtin()
    return sorted(_TASKS)


def make_task(config: TrainConfig) -> Task:
    _load_builtin()
    if config.task not in _TASKS:
        raise ValueError(f"Unknown task {config.task!r}; available: {sorted(_TASKS)}.")
    return _TASKS[config.task](config)
