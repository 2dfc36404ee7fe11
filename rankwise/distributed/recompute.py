"""Gradient (activation) checkpointing for adapter training, safe under DDP and FSDP2.

transformers' `activation_checkpointing_enable` (`gradient_checkpointing_enable` in older versions)
recomputes each block's forward during backward instead of storing its activations. rankwise always asks
for the non-reentrant implementation (`torch.utils.checkpoint(use_reentrant=False)`):
- the reentrant one runs a second backward inside the first, so DDP's hooks fire twice for the same
  parameters ("Expected to mark a variable ready only once", PEFT #663 / #1745 with AdaLoRA under torchrun);
- the reentrant one gives no gradient to the adapters of a block whose input does not require grad, which
  is the case when the embeddings are frozen; transformers' workaround (`enable_input_require_grads`) is
  applied when `use_reentrant=True` is forced in a single process.
"""

from __future__ import annotations

from torch import nn


def enable_gradient_checkpointing(model: nn.Module, *, use_reentrant: bool = False, distributed: bool = False) -> None:
    """Turn on transformers' gradient checkpointing for `model` (mutates it; also sets config.use_cache=False,
    since a KV cache is useless in training and transformers refuses it with checkpointing)."""
    new = getattr(model, "activation_checkpointing_enable", None)
    old = getattr(model, "gradient_checkpointing_enable", None)
    if not callable(new) and not callable(old):
        raise TypeError(
            f"{type(model).__name__} has no activation_checkpointing_enable(); gradient checkpointing is available "
            "for transformers models (PreTrainedModel). For other models wrap blocks with "
            "torch.utils.checkpoint.checkpoint(..., use_reentrant=False) yourself."
        )
    if use_reentrant and distributed:
        raise ValueError(
            "use_reentrant=True gradient checkpointing breaks DDP gradient reduction (parameters marked ready "
            "twice); use the default use_reentrant=False, which needs no workaround."
        )
    if callable(new):
        new(activation_checkpointing_kwargs={"use_reentrant": use_reentrant})
    else:
        old(gradient_checkpointing_kwargs={"use_reentrant": use_reentrant})
    if use_reentrant:
        model.enable_input_require_grads()
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "use_cache"):
        config.use_cache = False
