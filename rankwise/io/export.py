"""`rankwise export`: a standalone PEFT adapter from a run, a checkpoint or an adapter, in a chosen dtype.

A run folder gives its final adapter (`<run>/adapter`) or, for a run that has not finished, the adapter of its
latest checkpoint; a checkpoint folder gives its `adapter/`. Floating tensors are cast to `dtype` (PEFT and
vLLM load float16 / bfloat16 adapters as they are); the config, rankwise.json and the rank history are copied.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from rankwise.io.atomic import atomic_directory
from rankwise.io.checkpoint import ADAPTER_DIR, STATE_NAME, latest_checkpoint
from rankwise.io.peft import CONFIG_NAME, HISTORY_NAME, RANKWISE_META, WEIGHTS_NAME, read_adapter_files

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def find_adapter(source: str | Path) -> Path:
    """The adapter folder that `source` (adapter, checkpoint or run folder) stands for."""
    source = Path(source)
    if (source / CONFIG_NAME).is_file():
        return source
    if (source / STATE_NAME).is_file():
        return source / ADAPTER_DIR
    if (source / ADAPTER_DIR / CONFIG_NAME).is_file():
        return source / ADAPTER_DIR
    latest = latest_checkpoint(source / "checkpoints")
    if latest is not None:
        return latest / ADAPTER_DIR
    raise FileNotFoundError(f"{source} is not an adapter, a checkpoint or a run folder with an adapter or "
                            "checkpoints; pass e.g. runs/x/adapter or runs/x/checkpoints/step-00000100.")


def export_adapter(source: str | Path, out: str | Path, *, dtype: str = "float32") -> Path:
    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r}; supported: {sorted(DTYPES)}.")
    adapter = find_adapter(source)
    _, sd = read_adapter_files(adapter)
    cast = {k: (t.to(DTYPES[dtype]) if t.is_floating_point() else t).contiguous() for k, t in sd.items()}
    with atomic_directory(out) as tmp:
        save_file(cast, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
        for name in (CONFIG_NAME, RANKWISE_META, HISTORY_NAME):
            if (adapter / name).is_file():
                shutil.copy2(adapter / name, tmp / name)
    return Path(out)
