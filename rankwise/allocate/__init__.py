"""Adaptive rank allocation: one interface (base.py), a parameter budget (budget.py), one file per method."""

from rankwise.allocate.base import (
    Allocator,
    AllocatorConfig,
    all_reduce_mean,
    available_allocators,
    default_loss,
    get_allocator_class,
    make_allocator,
    register_allocator,
)
from rankwise.allocate.budget import Budget, cubic_schedule, proportional_ranks, select_components

__all__ = [
    "Allocator",
    "AllocatorConfig",
    "Budget",
    "all_reduce_mean",
    "available_allocators",
    "cubic_schedule",
    "default_loss",
    "get_allocator_class",
    "make_allocator",
    "proportional_ranks",
    "register_allocator",
    "select_components",
]
