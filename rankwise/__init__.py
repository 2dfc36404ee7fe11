"""rankwise: LoRA with a parameter budget instead of a rank.

    import rankwise
    rankwise.inject(model, rankwise.LoraConfig(r=8, target_modules="all-linear"))
    ... train ...
    rankwise.save_adapter(model, "out/adapter")        # PEFT format: PeftModel.from_pretrained loads it
"""

from rankwise.config import LoraConfig
from rankwise.inject import format_summary, inject, trainable_summary
from rankwise.io.peft import load_adapter, save_adapter
from rankwise.layers import LoraAdapter, LoraLayer

# Before rankwise.model: importing the package rankwise/merge/ binds the name `rankwise.merge` to it, and
# the function `merge` imported below must win (later imports of the loaded package do not rebind it).
from rankwise.merge import combine_adapter_dirs, combine_adapters, compress_adapter, compress_adapter_dir
from rankwise.model import (
    adapter_modules,
    adapter_names,
    adapter_param_count,
    delete_adapter,
    disable_adapters,
    lora_layers,
    merge,
    merge_and_unload,
    rank_map,
    set_adapter,
    unload,
    unmerge,
)
from rankwise.optim import remap_optimizer

__version__ = "0.1.0"

__all__ = [
    "LoraAdapter",
    "LoraConfig",
    "LoraLayer",
    "adapter_modules",
    "adapter_names",
    "adapter_param_count",
    "combine_adapter_dirs",
    "combine_adapters",
    "compress_adapter",
    "compress_adapter_dir",
    "delete_adapter",
    "disable_adapters",
    "format_summary",
    "inject",
    "load_adapter",
    "lora_layers",
    "merge",
    "merge_and_unload",
    "rank_map",
    "remap_optimizer",
    "save_adapter",
    "set_adapter",
    "trainable_summary",
    "unload",
    "unmerge",
]
