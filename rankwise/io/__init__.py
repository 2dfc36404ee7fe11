"""Reading and writing adapters (PEFT format) and training checkpoints."""

from rankwise.io.peft import load_adapter, read_adapter_files, save_adapter

__all__ = ["load_adapter", "read_adapter_files", "save_adapter"]
