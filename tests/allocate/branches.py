"""A task whose important modules are visible to first-order (gradient) statistics, for GoRA / Sensitivity.

In tests/allocate/synthetic.py the residual stack lets every block compensate the others, so at the initial
point the gradient of an unimportant block is as large as that of an important one: methods that score
modules from the gradient before training (GoRA, Sensitivity-LoRA) cannot tell them apart there. Here the
blocks are parallel branches, each writing its own slice of the output; the teacher perturbs branches 0 and 2
strongly (rank 6) and branches 1 and 3 weakly (rank 2), so each branch's gradient measures its own need.
"""

from __future__ import annotations

import torch
from allocate.synthetic import WIDTH, loss_fn  # noqa: F401  (same loss as the residual task)
from torch import nn

import rankwise


class Branches(nn.Module):
    def __init__(self, n: int = 4, width: int = WIDTH) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(nn.Linear(width, width) for _ in range(n))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (batch, width) -> (batch, n * width)
        return torch.cat([torch.tanh(block(x)) for block in self.blocks], dim=-1)


def make_branches(seed: int = 0, r: int = 8, n_batches: int = 8, batch: int = 64, **config_kw):
    """(student with rank-r adapters on every branch, batches, loss_fn)."""
    torch.manual_seed(seed)
    student, teacher = Branches(), Branches()
    teacher.load_state_dict(student.state_dict())
    g = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        perturbations = (("blocks.0", 6, 0.5), ("blocks.1", 2, 0.1), ("blocks.2", 6, 0.5), ("blocks.3", 2, 0.1))
        for name, rank, size in perturbations:
            u, v = torch.randn(WIDTH, rank, generator=g), torch.randn(rank, WIDTH, generator=g)
            teacher.get_submodule(name).weight.add_(size * u @ v / WIDTH**0.5)
    batches = []
    for _ in range(n_batches):
        x = torch.randn(batch, WIDTH, generator=g)
        with torch.no_grad():
            batches.append({"x": x, "y": teacher(x)})
    rankwise.inject(student, rankwise.LoraConfig(r=r, alpha=2 * r, target_modules=[f"blocks.{i}" for i in range(4)],
                                                 **config_kw))
    return student, batches, loss_fn
