"""The defaults a user gets without choosing: one place, so a benchmark can change them in one line.

DEFAULT_ALLOCATOR: the rank allocator of `rankwise train` and `rankwise demo` when --method is not given.
AdaLoRA for now; a benchmark across allocators at equal budget will settle it (docs/BENCHMARKS.md).
"""

DEFAULT_ALLOCATOR = "adalora"
DEFAULT_BUDGET = "r8"
