"""PiSSA: principal singular values and vectors adaptation (Meng et al., 2024, arXiv:2404.02948).

    W0 = U S V^T;   B = U_r sqrt(S_r / s),  A = sqrt(S_r / s) V_r^T;   W_res = W0 - s B A (frozen)

so the model is unchanged at step 0 and the adapter trains the principal subspace. The fast variant
("pissa_niter_<k>") uses a randomized SVD with k power iterations (Halko et al., 2011) instead of a full SVD.
The base weight moves, so the export writes a rank-2r LoRA on the original weights (rankwise/io/peft.py).
"""

from __future__ import annotations

import torch
from torch import nn

from rankwise.init.registry import register_initializer


def top_svd(w: torch.Tensor, r: int, niter: int | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-r SVD of w (out, in): U (out, r), S (r,), Vh (r, in). Randomized when niter is given."""
    if niter is None:
        u, s, vh = torch.linalg.svd(w, full_matrices=False)
        return u[:, :r], s[:r], vh[:r]
    u, s, v = torch.svd_lowrank(w, q=min(r + 8, min(w.shape)), niter=niter)
    return u[:, :r], s[:r], v[:, :r].t()


def set_base_offset(layer: nn.Module, adapter: nn.Module) -> None:
    """Subtract s * B A from the base weight and remember B, A so the export can undo it. Mutates both."""
    w = layer.weight_out_in()
    delta = adapter.delta_weight().detach()
    w.copy_((w.to(delta.dtype) - delta).to(w.dtype))
    adapter.offset_A = adapter.lora_A.detach().clone()
    adapter.offset_B = (adapter.lora_B.detach() * (adapter.rank_vector.detach() if adapter.rank_vector is not None else 1)).clone()


@register_initializer("pissa")
@torch.no_grad()
def pissa_init(layer: nn.Module, adapter: nn.Module, niter: int | None = None, **_: object) -> None:
    if layer.kind.name == "embedding":
        raise ValueError("PiSSA is not supported on embeddings; exclude them or use init='default'.")
    if adapter.offset_A is not None:
        raise ValueError("This adapter already moved the base weight; PiSSA cannot be applied twice.")
    r = adapter.r
    w = layer.weight_out_in().to(torch.float32)  # (out, in)
    u, s, vh = top_svd(w, r, niter)
    root = (s / adapter.scale).sqrt()  # (r,)
    adapter.lora_B.copy_((u * root).to(adapter.lora_B.dtype))
    adapter.lora_A.copy_((root[:, None] * vh).to(adapter.lora_A.dtype))
    set_base_offset(layer, adapter)
