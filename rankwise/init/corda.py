"""CorDA: context-oriented decomposition adaptation (Yang et al., 2024, arXiv:2406.05223).

    C = X^T X / N                          (in, in), X the module's input rows on calibration data
    C_d = C + d * mean(diag C) * I         d = 0.01, doubled until ||C_d C_d^-1 - I||_F < 0.05 (as in PEFT)
    W0 C_d = U S V^T                       (out, in) SVD
    W0 = U S (V^T C_d^-1)                  exactly, so each triplet is a rank-1 piece of W0 "seen through" C
    triplets T: the top r ("ipm", instruction-previewed: the directions the task's inputs excite most) or the
                bottom r ("kpm", knowledge-preserving: keep the principal ones frozen, adapt the least used)
    B = U_T sqrt(S_T / s)                  (out, r)
    A = sqrt(S_T / s) V_T^T C_d^-1         (r, in)
    W0 <- W0 - s B A = W0 - U_T S_T V_T^T C_d^-1   so the model is unchanged at step 0

with s the adapter's scale. The base weight moves, so the export writes a rank-2r LoRA on the ORIGINAL weights
(rankwise/io/peft.py). Usage: inject with init="default", then `apply(model, batches, mode="ipm")`; the
registry entry "corda" takes one module's covariance through `covariance=` and, called at injection time
without it, raises an error that says to use `apply`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from rankwise.init.calibration import Batches, input_covariances
from rankwise.init.pissa import set_base_offset
from rankwise.init.registry import register_initializer

MODES = ("ipm", "kpm")


def damped_inverse(cov: torch.Tensor, damp: float = 0.01, tol: float = 0.05, max_doublings: int = 40):
    """(C_d, C_d^-1) for C (in, in), damping C_d = C + d * mean(diag C) * I until the inverse is accurate."""
    eye = torch.eye(cov.shape[0], dtype=torch.float64)
    cov = cov.double()
    level = cov.diagonal().mean().clamp_min(1e-12)
    for _ in range(max_doublings):
        damped = cov + damp * level * eye
        inv = torch.linalg.inv(damped)
        if torch.dist(damped @ inv, eye).item() < tol:
            return damped, inv
        damp *= 2
    raise ValueError(f"CorDA: the input covariance stays singular even with damping {damp:.3g}; check the inputs.")


@register_initializer("corda")
@torch.no_grad()
def corda_init(
    layer: nn.Module, adapter: nn.Module, covariance: torch.Tensor | None = None, mode: str = "ipm",
    damp: float = 0.01, **_: object,
) -> None:
    """CorDA for one module, given its input covariance (in, in). Mutates the adapter and the base weight."""
    if covariance is None:
        raise ValueError(
            "init='corda' needs input covariances, which injection does not have: inject with init='default', "
            "then call rankwise.init.corda.apply(model, batches, mode='ipm' or 'kpm')."
        )
    if mode not in MODES:
        raise ValueError(f"CorDA mode={mode!r}; allowed: {list(MODES)} (ipm: top-r, kpm: bottom-r triplets).")
    if layer.kind.name == "embedding":
        raise ValueError("CorDA is not supported on embeddings (their input is token ids); exclude them.")
    if adapter.offset_A is not None:
        raise ValueError("This adapter already moved the base weight (PiSSA / LoRA-GA / CorDA); initialise it once.")
    r, in_f = adapter.r, adapter.in_features
    if tuple(covariance.shape) != (in_f, in_f):
        raise ValueError(f"CorDA: covariance has shape {tuple(covariance.shape)}, the module needs ({in_f}, {in_f}).")
    if r > min(in_f, adapter.out_features):
        raise ValueError(f"CorDA: rank {r} exceeds min(out, in) = {min(in_f, adapter.out_features)}; lower r.")
    damped, inv = damped_inverse(covariance, damp)
    w = layer.weight_out_in().detach().double().cpu()  # (out, in); the statistics live on the CPU
    u, s, vh = torch.linalg.svd(w @ damped, full_matrices=False)  # (out, k), (k,), (k, in)
    pick = slice(0, r) if mode == "ipm" else slice(s.shape[0] - r, s.shape[0])
    root = (s[pick] / adapter.scale).sqrt()  # (r,)
    adapter.lora_B.copy_((u[:, pick] * root).to(adapter.lora_B.dtype))
    adapter.lora_A.copy_((root[:, None] * (vh[pick] @ inv)).to(adapter.lora_A.dtype))
    if adapter.rank_vector is not None:
        adapter.rank_vector.fill_(1.0)
    set_base_offset(layer, adapter)


def apply(
    model: nn.Module,
    batches: Batches,
    adapter_name: str = "default",
    *,
    mode: str = "ipm",
    n_batches: int | None = 32,
    damp: float = 0.01,
    forward_fn: Callable[[nn.Module, Any], Any] | None = None,
) -> dict[str, torch.Tensor]:
    """Collect input covariances over up to `n_batches` batches (padding tokens left out) and CorDA-initialise
    every module of `adapter_name`. `forward_fn(model, batch)` defaults to `model(**batch)` for dicts.

    Mutates the model (adapters and base weights). Returns the covariances {module: C (in, in)}."""
    from rankwise.model import adapter_modules

    if mode not in MODES:
        raise ValueError(f"CorDA mode={mode!r}; allowed: {list(MODES)}.")
    forward_fn = forward_fn or (lambda m, b: m(**b) if isinstance(b, dict) else m(b))
    was_training = model.training
    model.eval()
    try:
        covs = input_covariances(model, batches, forward_fn, adapter_name, n_batches=n_batches)
    finally:
        model.train(was_training)
    for name, layer, adapter in adapter_modules(model, adapter_name):
        if adapter.r > 0:
            corda_init(layer, adapter, covariance=covs.get(name), mode=mode, damp=damp)
    return covs
