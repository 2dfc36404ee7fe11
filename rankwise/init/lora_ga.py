"""LoRA-GA: initialise A and B from the SVD of the full-weight gradient (Wang et al., 2024, arXiv:2407.05000).

    G = mean over n batches of dL/dW0                      (out, in), averaged over processes
    G ~ U S V^T  (randomized SVD, Halko et al. 2011, of rank 2r)
    A0 = c V[:, :r]^T          (r, in)       first r right singular vectors
    B0 = c U[:, r:2r]          (out, r)      left singular vectors r..2r
    W0 <- W0 - s B0 A0                       so the model is unchanged at step 0

Then the first LoRA step's update of the effective weight, -lr s^2 (G A0^T A0 + B0 B0^T G) (SGD), is the best
rank-2r approximation of the full step's direction (the paper's "gradient approximation").

Scaling (our choice, the authors' code's "stable" scale): c = out^(1/4) / sqrt(gamma), gamma = 16 by default,
with the adapter's own scale s (alpha / r, or alpha / sqrt(r) with use_rslora, which the paper uses). PEFT's
port differs: it multiplies B0 by the singular values S[r:2r] and only B0 by c.

The base weight moves, so the export writes a rank-2r LoRA on the ORIGINAL weights (rankwise/io/peft.py):
dW = s B A - s B0 A0 = s [B | -B0] [A ; A0].

Usage: inject with init="default", then `apply(model, batches, loss_fn)` (it needs data). The registry entry
"lora_ga" takes one module's gradient through `grad=`; called at injection time without it, it raises an error
that says to use `apply`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from rankwise.init.calibration import Batches, weight_gradients
from rankwise.init.pissa import set_base_offset
from rankwise.init.registry import register_initializer


def gradient_svd(grad: torch.Tensor, k: int, niter: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k singular vectors of grad (out, in): U (out, k), V (in, k). Randomized when niter is given."""
    if niter is None:
        u, _, vh = torch.linalg.svd(grad, full_matrices=False)
        return u[:, :k], vh[:k].t()
    with torch.random.fork_rng(devices=[]):  # a fixed sketch: every process of a run gets the same vectors
        torch.manual_seed(0)
        u, _, v = torch.svd_lowrank(grad, q=min(k + 8, min(grad.shape)), niter=niter)
    return u[:, :k], v[:, :k]


@register_initializer("lora_ga")
@torch.no_grad()
def lora_ga_init(
    layer: nn.Module, adapter: nn.Module, grad: torch.Tensor | None = None, gamma: float = 16.0,
    niter: int | None = 4, **_: object,
) -> None:
    """LoRA-GA for one module, given its averaged base-weight gradient `grad` (out, in). Mutates the adapter
    and the base weight."""
    if grad is None:
        raise ValueError(
            "init='lora_ga' needs gradients, which injection does not have: inject with init='default', then call "
            "rankwise.init.lora_ga.apply(model, batches, loss_fn) to compute them and initialise every module."
        )
    if layer.kind.name == "embedding":
        raise ValueError("LoRA-GA is not supported on embeddings (as in PEFT); exclude them from target_modules.")
    if adapter.offset_A is not None:
        raise ValueError("This adapter already moved the base weight (PiSSA / LoRA-GA / CorDA); initialise it once.")
    r = adapter.r
    out_f, in_f = adapter.out_features, adapter.in_features
    if tuple(grad.shape) != (out_f, in_f):
        raise ValueError(f"LoRA-GA: grad has shape {tuple(grad.shape)}, the module needs ({out_f}, {in_f}).")
    if 2 * r > min(out_f, in_f):
        raise ValueError(
            f"LoRA-GA needs 2r = {2 * r} singular vectors but the module is {out_f} x {in_f}; use r <= "
            f"{min(out_f, in_f) // 2} for it (rank_pattern) or exclude it."
        )
    if gamma <= 0:
        raise ValueError(f"LoRA-GA gamma={gamma!r} must be > 0 (16 in the paper).")
    u, v = gradient_svd(grad.float(), 2 * r, niter)  # (out, 2r), (in, 2r)
    c = out_f**0.25 / gamma**0.5
    adapter.lora_A.copy_((c * v[:, :r].t()).to(adapter.lora_A.dtype))  # (r, in)
    adapter.lora_B.copy_((c * u[:, r : 2 * r]).to(adapter.lora_B.dtype))  # (out, r)
    if adapter.rank_vector is not None:
        adapter.rank_vector.fill_(1.0)
    set_base_offset(layer, adapter)


def apply(
    model: nn.Module,
    batches: Batches,
    loss_fn: Callable[[nn.Module, Any], torch.Tensor] | None = None,
    adapter_name: str = "default",
    *,
    n_batches: int | None = 32,
    gamma: float = 16.0,
    niter: int | None = 4,
) -> dict[str, torch.Tensor]:
    """Compute G over up to `n_batches` batches and LoRA-GA-initialise every module of `adapter_name`.

    `loss_fn(model, batch)` defaults to `model(**batch).loss`. Mutates the model (adapters and base weights).
    Returns the gradients {module: G (out, in)}."""
    from rankwise.allocate.base import default_loss  # local: rankwise.allocate imports rankwise.init
    from rankwise.model import adapter_modules

    loss_fn = loss_fn or default_loss
    grads, _ = weight_gradients(model, batches, loss_fn, adapter_name, n_batches=n_batches)
    for name, layer, adapter in adapter_modules(model, adapter_name):
        if adapter.r > 0:
            lora_ga_init(layer, adapter, grad=grads[name], gamma=gamma, niter=niter)
    return grads
