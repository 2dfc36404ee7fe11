"""`LoraLayer`: a frozen base module plus named, rank-resizable adapters.

    y = base(x) + s * (B diag(e) A dropout(x) + b)            (LoRA, Hu et al. 2021, arXiv:2106.09685)

with the DoRA variant in `rankwise/layers/dora.py`. One adapter is active at a time; `disabled` turns them
all off. `merge()` folds the active adapter into the base weight and `unmerge()` takes it out again (exact
up to float error): both are explicit calls, never side effects of `train()` / `eval()`.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from rankwise.kernels.dispatch import fused_forward
from rankwise.layers.adapter import LoraAdapter
from rankwise.layers.base_kinds import BaseKind, kind_of, weight_out_in
from rankwise.layers.dora import dora_combine, row_norm


class LoraLayer(nn.Module):
    """Wraps `base_layer` (nn.Linear, transformers Conv1D or nn.Embedding) with adapters."""

    def __init__(self, base_layer: nn.Module, name: str = "") -> None:
        super().__init__()
        self.kind: BaseKind = kind_of(base_layer, name)
        self.base_layer = base_layer
        self.in_features, self.out_features = self.kind.features(base_layer)
        self.adapters = nn.ModuleDict()
        self.active_adapter: str | None = None
        self.disabled = False
        self.merged: list[str] = []
        self._dora_norms: dict[str, torch.Tensor] = {}

    # ---- adapters ----------------------------------------------------------------------------------
    def add_adapter(
        self,
        name: str,
        r: int,
        alpha: float,
        *,
        use_rslora: bool = False,
        dropout: float = 0.0,
        bias: bool = False,
        use_dora: bool = False,
    ) -> LoraAdapter:
        if name in self.adapters:
            raise ValueError(f"Adapter {name!r} already exists on this layer; delete it first or pick a new name.")
        if self.kind.name == "embedding" and (use_dora or bias or dropout > 0):
            raise ValueError(
                "Embedding adapters support neither DoRA, bias nor dropout (as in PEFT); "
                "exclude the embedding from target_modules or turn those options off."
            )
        w = self.base_layer.weight
        # Half-precision bases keep fp32 adapters (PEFT's autocast_adapter_dtype default).
        dtype = torch.float32 if w.dtype in (torch.float16, torch.bfloat16) else w.dtype
        adapter = LoraAdapter(
            self.in_features, self.out_features, r, alpha, use_rslora=use_rslora, dropout=dropout,
            bias=bias, use_dora=use_dora, dtype=dtype, device=w.device,
        )
        if use_dora:
            with torch.no_grad():
                norm = torch.linalg.vector_norm(self.weight_out_in().to(dtype), dim=1)  # (out,)
            adapter.magnitude = nn.Parameter(norm.clone())
        self.adapters[name] = adapter
        if self.active_adapter is None:
            self.active_adapter = name
        return adapter

    def delete_adapter(self, name: str) -> None:
        if name in self.merged:
            raise ValueError(f"Adapter {name!r} is merged; unmerge() it before deleting.")
        del self.adapters[self._check_name(name)]
        if self.active_adapter == name:
            self.active_adapter = next(iter(self.adapters), None)

    def set_adapter(self, name: str | None) -> None:
        self.active_adapter = None if name is None else self._check_name(name)

    def _check_name(self, name: str) -> str:
        if name not in self.adapters:
            raise KeyError(f"No adapter {name!r} on this layer; available: {list(self.adapters)}.")
        return name

    def weight_out_in(self) -> torch.Tensor:
        return weight_out_in(self.base_layer, self.kind)

    @property
    def weight(self) -> torch.Tensor:
        """The base weight, so code that reads `module.weight` (e.g. tied heads) keeps working."""
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return getattr(self.base_layer, "bias", None)

    # ---- forward -----------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        fused = fused_forward(self, x, args, kwargs)  # CUDA fast path (rankwise/kernels); None: reference below
        if fused is not None:
            return fused
        result = self.base_layer(x, *args, **kwargs)
        name = self.active_adapter
        if self.disabled or name is None or name in self.merged:
            return result
        adapter: LoraAdapter = self.adapters[name]
        if (adapter.r == 0 or adapter.truncate == 0) and adapter.magnitude is None and adapter.lora_bias is None:
            return result  # nothing to add (a DoRA magnitude or a LoRA bias still acts at rank 0)
        if self.kind.name == "embedding":
            return result + adapter.embedding_delta(x, self.base_layer.padding_idx).to(result.dtype)
        x_drop = adapter.dropout(x)
        delta = adapter.linear_delta(x_drop)  # (..., out)
        if adapter.use_dora:
            delta = self._dora_delta(adapter, x, x_drop, result, delta)
        return result + delta.to(result.dtype)

    def _dora_delta(self, adapter, x, x_drop, result, lora_out):
        w = self.weight_out_in()
        with torch.no_grad():
            norm = row_norm(w, adapter.delta_weight())  # (out,), constant in backward
        if isinstance(adapter.dropout, nn.Identity) or not self.training:
            base_no_bias = result if self.bias is None else result - self.bias
        else:
            base_no_bias = F.linear(x_drop.to(w.dtype), w)
        return dora_combine(base_no_bias, lora_out, adapter.magnitude, norm)

    # ---- merge -------------------------------------------------------------------------------------
    @torch.no_grad()
    def merged_weights(self, name: str) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """What merging adapter `name` would write, in fp32: (weight (out, in), bias (out,) or None,
        DoRA norm (out,) or None). Changes nothing."""
        adapter: LoraAdapter = self.adapters[self._check_name(name)]
        new_w = self.weight_out_in().to(torch.float32) + adapter.delta_weight().to(torch.float32)
        norm = None
        if adapter.use_dora:
            norm = torch.linalg.vector_norm(new_w, dim=1)
            new_w = new_w * (adapter.magnitude.to(torch.float32) / norm)[:, None]
        new_bias = None
        if adapter.lora_bias is not None:
            if self.bias is None:
                raise ValueError("Cannot merge a LoRA bias into a base layer without a bias; keep it unmerged.")
            new_bias = self.bias.to(torch.float32) + adapter.scale * adapter.lora_bias.to(torch.float32)
        return new_w, new_bias, norm

    def merge_is_finite(self, name: str) -> bool:
        new_w, new_bias, _ = self.merged_weights(name)
        return bool(torch.isfinite(new_w).all()) and (new_bias is None or bool(torch.isfinite(new_bias).all()))

    @torch.no_grad()
    def merge(self, name: str | None = None, *, safe: bool = True) -> None:
        """Add adapter `name` (default: the active one) into the base weight. Mutates the base layer.

        With `safe`, a merge that would write NaN/Inf raises and changes nothing (see also model.merge,
        which checks every layer before changing any)."""
        name = self._check_name(name or self.active_adapter or "")
        if name in self.merged:
            return
        new_w, new_bias, norm = self.merged_weights(name)
        if safe and not (torch.isfinite(new_w).all() and (new_bias is None or torch.isfinite(new_bias).all())):
            raise ValueError(f"Merging adapter {name!r} would put NaN/Inf into the base weight; nothing was changed.")
        w = self.weight_out_in()
        w.copy_(new_w.to(w.dtype))
        if norm is not None:
            self._dora_norms[name] = norm
        if new_bias is not None:
            self.bias.copy_(new_bias.to(self.bias.dtype))
        self.merged.append(name)

    @torch.no_grad()
    def unmerge(self) -> None:
        """Take every merged adapter out of the base weight, newest first."""
        while self.merged:
            name = self.merged.pop()
            adapter: LoraAdapter = self.adapters[name]
            w = self.weight_out_in()
            w32 = w.to(torch.float32)
            if adapter.use_dora:
                norm = self._dora_norms.pop(name)
                w32 = w32 / (adapter.magnitude.to(torch.float32) / norm)[:, None]
            w.copy_((w32 - adapter.delta_weight().to(torch.float32)).to(w.dtype))
            if adapter.lora_bias is not None:
                self.bias.sub_((adapter.scale * adapter.lora_bias).to(self.bias.dtype))

    def extra_repr(self) -> str:
        return f"kind={self.kind.name}, active={self.active_adapter!r}, merged={self.merged}"
