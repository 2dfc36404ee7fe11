"""A task where only some modules matter, by construction, for allocator tests.

Student: a residual MLP of `depth` Linear layers (width 32). Teacher: the same base weights with a rank-6
perturbation added to the IMPORTANT layers only. Regressing the teacher's output, a good allocator gives the
important layers more rank than the others (whose ideal update is zero).
"""

from __future__ import annotations

import torch
from torch import nn

import rankwise

WIDTH = 32
IMPORTANT = ("blocks.0", "blocks.2")


class ResMLP(nn.Module):
    def __init__(self, depth: int = 4, width: int = WIDTH) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(nn.Linear(width, width) for _ in range(depth))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (batch, width)
        for block in self.blocks:
            x = x + torch.tanh(block(x))
        return x


def make_task(seed: int = 0, depth: int = 4, r: int = 8, n_batches: int = 8, batch: int = 64,
              **config_kw) -> tuple[nn.Module, list[dict], callable]:
    """(student with rank-r adapters on every block, batches, loss_fn)."""
    torch.manual_seed(seed)
    student = ResMLP(depth)
    teacher = ResMLP(depth)
    teacher.load_state_dict(student.state_dict())
    g = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for name in IMPORTANT:
            layer = teacher.get_submodule(name)
            u = torch.randn(WIDTH, 6, generator=g)
            v = torch.randn(6, WIDTH, generator=g)
            layer.weight.add_(0.5 * u @ v / WIDTH**0.5)
    batches = []
    for _ in range(n_batches):
        x = torch.randn(batch, WIDTH, generator=g)
        with torch.no_grad():
            y = teacher(x)
        batches.append({"x": x, "y": y})
    rankwise.inject(student, rankwise.LoraConfig(r=r, alpha=2 * r, target_modules=["blocks.0", "blocks.1", "blocks.2", "blocks.3"][:depth], **config_kw))
    return student, batches, loss_fn


def loss_fn(model: nn.Module, batch: dict) -> torch.Tensor:
    return nn.functional.mse_loss(model(batch["x"]), batch["y"]) * 100


def important_share(ranks: dict[str, int]) -> float:
    """Fraction of the total rank held by the important modules."""
    total = sum(ranks.values()) or 1
    return sum(r for n, r in ranks.items() if n in IMPORTANT) / total
