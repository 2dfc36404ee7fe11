"""Combine adapters (linear, cat, svd, ties) and compress them to smaller ranks.

Merging an adapter into the base weights (`merge`, `unmerge`, `merge_and_unload`) lives in
`rankwise/model.py` and `rankwise/layers/lora.py`.
"""

from rankwise.merge.combine import (
    CombineOptions,
    combine_adapter_dirs,
    combine_adapters,
    supported_methods,
    ties_merge,
)
from rankwise.merge.compress import compress_adapter, compress_adapter_dir, energy_rank, lowrank_svd

__all__ = [
    "CombineOptions",
    "combine_adapter_dirs",
    "combine_adapters",
    "compress_adapter",
    "compress_adapter_dir",
    "energy_rank",
    "lowrank_svd",
    "supported_methods",
    "ties_merge",
]
