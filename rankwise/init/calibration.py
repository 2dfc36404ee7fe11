"""Statistics of a model on calibration batches, for data-driven initialisers and allocators.

- `weight_gradients`: the full-weight gradient of every adapted module's base weight,
      G = mean_b dL_b/dW0   (out, in)      and optionally the empirical Fisher diagonal   F = mean_b (dL_b/dW0)^2
  averaged over batches b (one gradient per batch: the Fisher of the batch-mean loss; use batches of one example
  for the per-example Fisher). Used by LoRA-GA, GoRA and Sensitivity-LoRA. Adapters stay on, so this is the
  gradient with respect to the effective weight W0 + s B A (the same thing when B = 0).
- `input_covariances`: C = X^T X / N (in, in) of every adapted module's input rows (CorDA).
- `token_rows`: a layer input (..., in) as rows (tokens, in), padding tokens (attention_mask == 0) left out.

Every statistic is averaged over the processes of a distributed run (`all_reduce_mean`) before it is returned,
so every process derives the same decision from it. Each process must see the same number of batches.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

Batches = Iterable[Any] | Callable[[], Iterable[Any]]


def all_reduce_mean(t: torch.Tensor) -> torch.Tensor:
    """`rankwise.allocate.base.all_reduce_mean` for statistics kept on the CPU: under NCCL (which reduces GPU
    tensors only) the tensor takes a round trip through the current GPU."""
    # Imported here: rankwise.allocate imports the model helpers, which import rankwise.init.
    from rankwise.allocate.base import all_reduce_mean as reduce

    dist = torch.distributed
    if dist.is_available() and dist.is_initialized() and dist.get_backend() == "nccl" and not t.is_cuda:
        return reduce(t.cuda()).to(t.device)
    return reduce(t)


def iterate(batches: Batches, limit: int | None) -> Iterable[Any]:
    """Up to `limit` batches of a re-iterable or of a factory of iterables."""
    it = batches() if callable(batches) else batches
    for i, batch in enumerate(it):
        if limit is not None and i >= limit:
            return
        yield batch


def _targets(model: nn.Module, adapter_name: str) -> list[tuple[str, nn.Module]]:
    from rankwise.model import adapter_modules

    targets = [(name, layer) for name, layer, _ in adapter_modules(model, adapter_name)]
    if not targets:
        raise ValueError(f"The model has no adapter {adapter_name!r}; call rankwise.inject first.")
    return targets


def token_rows(x: torch.Tensor, batch: Any) -> torch.Tensor:
    """x: (..., in) -> (tokens, in) float32, dropping positions where batch['attention_mask'] is 0.

    The mask applies when x's leading dimensions are the mask's (batch, seq); other inputs (a pooled
    classifier input (batch, in)) are flattened as they are."""
    mask = batch.get("attention_mask") if isinstance(batch, dict) else None
    if mask is not None and tuple(x.shape[:-1]) == tuple(mask.shape):
        x = x[mask.to(torch.bool)]
    return x.reshape(-1, x.shape[-1]).detach().float()


def _out_in(grad: torch.Tensor, layer: nn.Module) -> torch.Tensor:
    """The gradient of `layer.base_layer.weight` in the (out, in) orientation of `weight_out_in`."""
    if layer.kind.name == "embedding" or layer.kind.fan_in_fan_out:
        return grad.t()
    return grad


def weight_gradients(
    model: nn.Module,
    batches: Batches,
    loss_fn: Callable[[nn.Module, Any], torch.Tensor],
    adapter_name: str = "default",
    *,
    n_batches: int | None = None,
    squares: bool = False,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor] | None]:
    """({module: G (out, in)}, {module: F (out, in)} or None) averaged over up to `n_batches` batches.

    Base weights get requires_grad only for the duration of the call (restored after); gradients are taken
    with `torch.autograd.grad`, so no `.grad` of any parameter is touched. The model's train/eval mode is the
    caller's choice (dropout makes the estimate noisier)."""
    targets = _targets(model, adapter_name)
    weights = [layer.base_layer.weight for _, layer in targets]
    saved = [w.requires_grad for w in weights]
    sums = [torch.zeros(layer.out_features, layer.in_features) for _, layer in targets]  # (out, in) each
    sq_sums = [torch.zeros_like(s) for s in sums] if squares else None
    count = 0
    try:
        for w in weights:
            w.requires_grad_(True)
        for batch in iterate(batches, n_batches):
            loss = loss_fn(model, batch)
            grads = torch.autograd.grad(loss, weights, allow_unused=True)
            for i, (g, (_, layer)) in enumerate(zip(grads, targets)):
                if g is None:  # the module took no part in this loss
                    continue
                g = _out_in(g.detach().float().cpu(), layer)
                sums[i] += g
                if sq_sums is not None:
                    sq_sums[i] += g * g
            count += 1
    finally:
        for w, flag in zip(weights, saved):
            w.requires_grad_(flag)
    if count == 0:
        raise ValueError("The calibration batches yielded nothing; pass at least one batch.")
    names = [n for n, _ in targets]
    grads_out = {n: all_reduce_mean(s / count) for n, s in zip(names, sums)}
    fisher = None if sq_sums is None else {n: all_reduce_mean(s / count) for n, s in zip(names, sq_sums)}
    return grads_out, fisher


@torch.no_grad()
def input_covariances(
    model: nn.Module,
    batches: Batches,
    forward_fn: Callable[[nn.Module, Any], Any],
    adapter_name: str = "default",
    *,
    n_batches: int | None = None,
) -> dict[str, torch.Tensor]:
    """{module: C = X^T X / N (in, in)} over the input rows X (N, in) of every adapted module.

    Embedding modules are left out (their input is token ids). `forward_fn(model, batch)` runs the model."""
    targets = [(n, layer) for n, layer in _targets(model, adapter_name) if layer.kind.name != "embedding"]
    sums = {n: torch.zeros(layer.in_features, layer.in_features, dtype=torch.float64) for n, layer in targets}
    counts = {n: 0 for n, _ in targets}
    current: dict[str, Any] = {}

    def hook_for(name: str):
        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            rows = token_rows(args[0], current["batch"]).double()  # (tokens, in), on the model's device
            sums[name] += (rows.t() @ rows).cpu()
            counts[name] += rows.shape[0]

        return hook

    handles = [layer.register_forward_hook(hook_for(n)) for n, layer in targets]
    try:
        for batch in iterate(batches, n_batches):
            current["batch"] = batch
            forward_fn(model, batch)
    finally:
        for h in handles:
            h.remove()
    out = {}
    for name, _ in targets:
        count = torch.tensor([float(counts[name])], dtype=torch.float64)
        stats = all_reduce_mean(torch.cat([sums[name].flatten(), count]))
        n = stats[-1].item()
        if n == 0:
            raise ValueError(f"Module {name!r} saw no input rows in the calibration batches; is it used by the model?")
        out[name] = (stats[:-1].reshape_as(sums[name]) / n).float()
    return out
