"""One low-rank adapter whose rank can change in place.

    dW = s * B @ diag(e) @ A        A: (r, in), B: (out, r), e: (r,) optional, s a fixed number

`e` is an optional per-component vector: AdaLoRA's singular values, SoRA's gates, ALoRA's masks. Plain
LoRA has none (e = 1). The scale s is a stored number, not recomputed from r, so that removing a zeroed
component leaves the function unchanged; the PEFT exporter turns it back into a per-module alpha.

`resize(keep, add)` removes every component not in `keep` and appends `add` new ones (new B columns are
zero, so growth does not change the function either). It returns `ParamRemap`s, which
`rankwise.optim.remap_optimizer` uses to carry the optimizer state of surviving components over.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from rankwise.layers.scaling import lora_scale


@dataclass
class ParamRemap:
    """`new` replaced `old`; along `dim`, new index j < len(keep) came from old index keep[j] and the
    last `added` entries are new."""

    old: nn.Parameter
    new: nn.Parameter
    dim: int
    keep: torch.Tensor  # (k,) long
    added: int


def kaiming_rows(rows: int, cols: int, *, dtype: torch.dtype, device: torch.device | str | None) -> torch.Tensor:
    """A's default init: PEFT / nn.Linear's kaiming_uniform_(a=sqrt(5)), i.e. U(-1/sqrt(in), 1/sqrt(in))."""
    out = torch.empty(rows, cols, dtype=dtype, device=device)
    if rows > 0 and cols > 0:
        nn.init.kaiming_uniform_(out, a=math.sqrt(5))
    return out


class LoraAdapter(nn.Module):
    """Parameters and math of one adapter on one module (the wrapping `LoraLayer` owns the base weight)."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        r: int,
        alpha: float,
        *,
        use_rslora: bool = False,
        dropout: float = 0.0,
        bias: bool = False,
        use_dora: bool = False,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.alpha = float(alpha)
        self.use_rslora = use_rslora
        self.use_dora = use_dora
        self.scale = lora_scale(alpha, r, use_rslora)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        # None: all components; DyLoRA sets it to train / run a nested truncation (rankwise.layers.nested).
        self.truncate: int | None = None
        self.lora_A = nn.Parameter(kaiming_rows(r, in_features, dtype=dtype, device=device))  # (r, in)
        self.lora_B = nn.Parameter(torch.zeros(out_features, r, dtype=dtype, device=device))  # (out, r)
        self.rank_vector: nn.Parameter | None = None  # (r,) e, when an allocator enables it
        self.lora_bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device)) if bias else None
        self.magnitude: nn.Parameter | None = None  # (out,) DoRA's m, set by LoraLayer
        # Set by initialisers that move the base weight (PiSSA, LoRA-GA, CorDA): the frozen base holds
        # W0 - s * offset_B @ offset_A, so the export to the original weights is rank 2r (see io/peft.py).
        self.register_buffer("offset_A", None)
        self.register_buffer("offset_B", None)

    # ---- shape and accounting -------------------------------------------------------------------
    @property
    def r(self) -> int:
        return self.lora_A.shape[0]

    @property
    def params_per_rank(self) -> int:
        """Trainable parameters one rank component costs: in + out (+1 with a rank vector)."""
        return self.in_features + self.out_features

    def rank_params(self) -> list[nn.Parameter]:
        """Parameters with a rank dimension (resized together)."""
        params = [self.lora_A, self.lora_B]
        if self.rank_vector is not None:
            params.append(self.rank_vector)
        return params

    # ---- math -------------------------------------------------------------------------------------
    def effective_factors(self) -> tuple[torch.Tensor, torch.Tensor, float]:
        """(A (r', in), B (out, r'), s) with the rank vector folded into B and truncation applied."""
        A, B, s = self.lora_A, self.lora_B, self.scale
        if self.rank_vector is not None:
            B = B * self.rank_vector
        if self.truncate is not None and self.truncate < A.shape[0]:
            A, B = A[: self.truncate], B[:, : self.truncate]
            s = lora_scale(self.alpha, self.truncate, self.use_rslora)
        return A, B, s

    def delta_weight(self) -> torch.Tensor:
        """s * B diag(e) A: (out, in)."""
        A, B, s = self.effective_factors()
        return (B @ A) * s

    def linear_delta(self, x: torch.Tensor) -> torch.Tensor:
        """x: (..., in) -> s * (B diag(e) A x + b): (..., out). Dropout is the caller's business."""
        A, B, s = self.effective_factors()
        h = x.to(A.dtype) @ A.t()  # (..., r)
        out = h @ B.t()  # (..., out)
        if self.lora_bias is not None:
            out = out + self.lora_bias
        return out * s

    def embedding_delta(self, ids: torch.Tensor, padding_idx: int | None) -> torch.Tensor:
        """ids: (...,) -> s * B A[:, ids]: (..., out). A is (r, vocab) here, as in PEFT."""
        A, B, s = self.effective_factors()
        h = nn.functional.embedding(ids, A.t(), padding_idx=padding_idx)  # (..., r)
        return (h @ B.t()) * s

    # ---- resizing ---------------------------------------------------------------------------------
    def enable_rank_vector(self, init: float | torch.Tensor = 1.0) -> nn.Parameter:
        """Give the adapter a per-component vector e (gates, singular values). Returns it."""
        if self.rank_vector is None:
            values = init if isinstance(init, torch.Tensor) else torch.full((self.r,), float(init))
            self.rank_vector = nn.Parameter(values.to(self.lora_A.dtype).to(self.lora_A.device).clone())
        return self.rank_vector

    def resize(
        self,
        keep: torch.Tensor | list[int] | None = None,
        add: int = 0,
        *,
        new_A: torch.Tensor | None = None,
        new_B: torch.Tensor | None = None,
        new_e: torch.Tensor | float = 0.0,
    ) -> list[ParamRemap]:
        """Keep components `keep` (all when None), in that order, then append `add` new ones.

        New components get `new_A` (add, in) or Kaiming rows, `new_B` (out, add) or zeros, and rank-vector
        entries `new_e`. Mutates the adapter: its parameters are replaced by new Parameter objects.
        """
        r = self.r
        device = self.lora_A.device
        keep_t = torch.arange(r) if keep is None else torch.as_tensor(keep, dtype=torch.long).flatten()
        if keep_t.numel() and (keep_t.min() < 0 or keep_t.max() >= r):
            raise ValueError(f"resize: keep indices {keep_t.tolist()} out of range for rank {r}.")
        if keep_t.unique().numel() != keep_t.numel():
            raise ValueError(f"resize: keep indices {keep_t.tolist()} contain duplicates.")
        if add < 0:
            raise ValueError(f"resize: add={add} must be >= 0.")
        keep_dev = keep_t.to(device)
        dtype = self.lora_A.dtype
        if new_A is None:
            new_A = kaiming_rows(add, self.in_features, dtype=dtype, device=device)
        if new_B is None:
            new_B = torch.zeros(self.out_features, add, dtype=dtype, device=device)
        if tuple(new_A.shape) != (add, self.in_features) or tuple(new_B.shape) != (self.out_features, add):
            raise ValueError(
                f"resize: new_A {tuple(new_A.shape)} / new_B {tuple(new_B.shape)} must be "
                f"({add}, {self.in_features}) / ({self.out_features}, {add})."
            )
        remaps: list[ParamRemap] = []

        def replace(attr: str, dim: int, extra: torch.Tensor) -> None:
            old: nn.Parameter = getattr(self, attr)
            data = torch.cat([old.data.index_select(dim, keep_dev), extra.to(old.dtype).to(device)], dim=dim)
            new = nn.Parameter(data, requires_grad=old.requires_grad)
            setattr(self, attr, new)
            remaps.append(ParamRemap(old, new, dim, keep_t, add))

        replace("lora_A", 0, new_A)
        replace("lora_B", 1, new_B)
        if self.rank_vector is not None:
            extra = new_e if isinstance(new_e, torch.Tensor) else torch.full((add,), float(new_e))
            replace("rank_vector", 0, extra.reshape(add))
        return remaps

    def extra_repr(self) -> str:
        return (
            f"in={self.in_features}, out={self.out_features}, r={self.r}, scale={self.scale:.4g}"
            + (", rslora" if self.use_rslora else "")
            + (", dora" if self.use_dora else "")
            + (", rank_vector" if self.rank_vector is not None else "")
        )
