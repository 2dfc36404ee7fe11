"""Combine several LoRA adapters into one new adapter: linear / cat (exact), svd, ties.

Adapter i has, on each module it covers, the delta dW_i = s_i B_i A_i (A_i: (r_i, in), B_i: (out, r_i), its
own rank, alpha and scaling rule), and 0 on modules it does not cover. With weights w_i:

- "linear" / "cat": dW = sum_i w_i dW_i exactly, by concatenating rank components:
      A = [A_1; ...; A_n]  (R, in),   B = [w_1 s_1 B_1 | ... | w_n s_n B_n] / s  (out, R),   R = sum_i r_i.
  (PEFT's "linear" instead averages the factors, sum sqrt(w_i) B_i times sum sqrt(w_i) A_i, which adds
  cross terms and needs equal ranks; its "cat" is this rule. Here both names give the exact sum.)
- "svd": the same sum re-factored to rank k by a truncated SVD (Eckart-Young: the best rank-k
  approximation), computed from thin QRs of the stacked factors and the SVD of an R x R core
  (`compress.lowrank_svd`), never from the dense (out, in) sum.
- "ties": TIES-merging (Yadav et al. 2023, arXiv:2306.01708) of the dense per-module deltas, then a
  truncated SVD to rank k. Trim: keep the top `density` fraction of each dW_i by magnitude (t_i). Elect:
  gamma = sgn(sum_i t_i) per entry ("total"; "frequency" uses sum_i sgn t_i), 0 counted as +. Disjoint
  merge: dW = sum_i w_i t_i [sgn t_i = gamma] / max(1, #{i : sgn t_i = gamma}). As in PEFT, the weights
  enter after the election; a module an adapter lacks counts as t_i = 0 (never in the mean). Memory: the
  n dense deltas of one module at a time.

k (svd, ties): `rank`, or the smallest rank keeping an `energy` share of ||dW||_F^2, or the smaller of the
two; with neither, the largest input rank on that module.

The result has one alpha for every module (`alpha`, default the most common input alpha) and each module's
scale is s = alpha / k (alpha / sqrt(k) with rsLoRA, which the result uses when every input did); the
factors absorb the rest, so different ranks, alphas and rsLoRA mix exactly.

LoRA bias (effective s_i b_i): b = sum_i w_i s_i b_i / s.
DoRA (Liu et al. 2024, arXiv:2402.09353), y = m * (W0 + dW) / ||W0 + dW||_row: the directional deltas are
combined by the method above, and the magnitudes as weighted *changes* from the base row norms:
      m = m0 + sum_i w_i (m_i - m0),      m0 = ||W0||_row,
which is sum_i w_i m_i when the weights sum to 1 (and keeps m = m0 for an all-zero combination). An input
without DoRA on that module counts with the magnitude that reproduces it exactly, m_i = ||W0 + dW_i||_row;
an input lacking the module has m_i = m0. If any input uses DoRA, every module of the result does (PEFT's
use_dora is adapter-wide). DoRA and LoRA bias together are refused, as PEFT refuses them.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from rankwise.inject import freeze_base
from rankwise.io.peft import ExportedModule, save_adapter
from rankwise.layers.scaling import lora_scale
from rankwise.merge.compress import (
    COMPUTE_DTYPE,
    check_criteria,
    dense_truncated,
    lowrank_svd,
    select_rank,
    split_factors,
)
from rankwise.merge.terms import (
    AdapterTerms,
    base_weight,
    check_fits,
    dir_terms,
    install_adapter,
    model_terms,
    most_common,
)
from rankwise.model import adapter_names, lora_layers

Present = list[tuple[float, ExportedModule]]  # (w_i, term of adapter i) for the adapters that have the module
ScaleFor = Callable[[int], float]  # rank k -> the result's scale s at that rank
# A method returns (A (k, in), B (out, k), s) with s * B @ A the combined delta, in COMPUTE_DTYPE.
Method = Callable[[Present, "CombineOptions", ScaleFor, int], tuple[torch.Tensor, torch.Tensor, float]]

TIES_DEFAULT_DENSITY = 0.2  # the top 20% that Yadav et al. (2023) keep by default


@dataclass(frozen=True)
class CombineOptions:
    """How to combine. rank / energy only for "svd" and "ties"; density / majority_sign only for "ties"."""

    method: str = "linear"
    rank: int | None = None
    energy: float | None = None
    density: float | None = None
    majority_sign: str = "total"
    alpha: float | None = None

    def __post_init__(self) -> None:
        if self.method not in _METHODS:
            raise ValueError(f"Unknown combination method {self.method!r}; supported: {sorted(_METHODS)}.")
        refactors = self.method in ("svd", "ties")
        if not refactors and (self.rank is not None or self.energy is not None):
            raise ValueError(
                f"method={self.method!r} is exact and keeps the sum of the input ranks, so rank={self.rank!r} / "
                f"energy={self.energy!r} do not apply; use method='svd' or compress the result afterwards."
            )
        check_criteria(self.rank, self.energy, required=False)
        if self.method != "ties" and self.density is not None:
            raise ValueError(f"density={self.density!r} applies to method='ties' only (got {self.method!r}).")
        if self.density is not None and not 0.0 < float(self.density) <= 1.0:
            raise ValueError(f"density={self.density!r}: must be in (0, 1], the fraction of entries TIES keeps.")
        if self.majority_sign not in _SIGN_RULES:
            raise ValueError(f"majority_sign={self.majority_sign!r}; supported: {sorted(_SIGN_RULES)}.")
        if self.alpha is not None and not self.alpha > 0:
            raise ValueError(f"alpha={self.alpha!r}: must be > 0.")


def supported_methods() -> list[str]:
    return sorted(_METHODS)


# ---- the methods -------------------------------------------------------------------------------------

def _stacked(present: Present) -> tuple[torch.Tensor, torch.Tensor]:
    """A = [A_1; ...] (R, in), B = [w_1 s_1 B_1 | ...] (out, R): B @ A = sum_i w_i dW_i."""
    A = torch.cat([t.A.to(COMPUTE_DTYPE) for _, t in present], dim=0)
    B = torch.cat([t.B.to(COMPUTE_DTYPE) * (w * t.scale) for w, t in present], dim=1)
    return A, B


def _concat(present: Present, options: CombineOptions, scale_for: ScaleFor, floor: int):
    A, B = _stacked(present)
    s = scale_for(A.shape[0])
    return A, B / s, s


def _target_rank(present: Present, options: CombineOptions) -> int | None:
    """The rank cap: `rank`, else none when `energy` decides, else the largest input rank."""
    if options.rank is None and options.energy is None:
        return max(t.r for _, t in present)
    return options.rank


def _svd(present: Present, options: CombineOptions, scale_for: ScaleFor, floor: int):
    U, S, Vh = lowrank_svd(*_stacked(present))  # (out, q), (q,), (q, in)
    k = select_rank(S, _target_rank(present, options), options.energy, floor)
    s = scale_for(k)
    A, B = split_factors(U, S, Vh, k, s)
    return A, B, s


def _ties(present: Present, options: CombineOptions, scale_for: ScaleFor, floor: int):
    deltas = [(t.B.to(COMPUTE_DTYPE) * t.scale) @ t.A.to(COMPUTE_DTYPE) for _, t in present]  # each (out, in)
    density = TIES_DEFAULT_DENSITY if options.density is None else options.density
    merged = ties_merge(deltas, [w for w, _ in present], density, options.majority_sign)  # (out, in)
    del deltas
    A, B, _ = dense_truncated(merged, _target_rank(present, options), options.energy, floor)
    U, S, Vh = lowrank_svd(A, B)  # the rank-k result as an SVD, to split it evenly
    k = A.shape[0]
    s = scale_for(k)
    A, B = split_factors(U, S, Vh, k, s)
    return A, B, s


_METHODS: dict[str, Method] = {"linear": _concat, "cat": _concat, "svd": _svd, "ties": _ties}


# ---- TIES on dense tensors ---------------------------------------------------------------------------

def trim_magnitude(delta: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the int(density * numel) entries of largest magnitude, zero the rest (PEFT's rounding)."""
    if density >= 1.0:
        return delta
    k = int(density * delta.numel())
    flat = delta.reshape(-1)
    out = torch.zeros_like(flat)
    idx = torch.topk(flat.abs(), k=k, largest=True).indices
    out[idx] = flat[idx]
    return out.reshape(delta.shape)


_SIGN_RULES: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "total": lambda t: t,  # the elected sign is that of the summed values
    "frequency": torch.sign,  # ... or of the count of positive minus negative entries
}


def ties_merge(
    deltas: Sequence[torch.Tensor], weights: Sequence[float], density: float, majority_sign: str = "total"
) -> torch.Tensor:
    """TIES-merging (Yadav et al. 2023, arXiv:2306.01708) of same-shape tensors: trim, elect sign, disjoint
    weighted merge (see the module docstring). Matches `peft.utils.merge_utils.ties`."""
    trimmed = [trim_magnitude(d, density) for d in deltas]
    votes = sum(_SIGN_RULES[majority_sign](t) for t in trimmed)
    gamma = torch.where(votes >= 0, 1.0, -1.0).to(trimmed[0].dtype)  # elected sign per entry
    total = torch.zeros_like(trimmed[0])
    count = torch.zeros_like(trimmed[0])
    for w, t in zip(weights, trimmed):
        agree = (torch.sign(t) == gamma).to(t.dtype)
        total += w * t * agree
        count += agree
    return total / count.clamp(min=1.0)


# ---- per module and per adapter ----------------------------------------------------------------------

def combine_module(
    present: Present,
    options: CombineOptions,
    *,
    alpha: float,
    use_rslora: bool,
    dora: bool = False,
    base: torch.Tensor | None = None,
) -> ExportedModule | None:
    """Combine one module's terms; None when the result has rank 0. `base`: W0 (out, in), needed for DoRA."""
    name, kind = present[0][1].name, present[0][1].kind
    has_bias = any(t.bias is not None for _, t in present)
    floor = 1 if (dora or has_bias) else 0  # a rank-0 module is dropped and would lose m or b
    A, B, s = _METHODS[options.method](present, options, lambda k: lora_scale(alpha, k, use_rslora), floor)
    if A.shape[0] == 0:
        return None
    bias = None
    if has_bias:
        bias = sum(w * t.scale * t.bias.to(COMPUTE_DTYPE) for w, t in present if t.bias is not None) / s
    magnitude = None
    if dora:
        if base is None:
            raise ValueError(f"{name}: combining DoRA adapters needs the base weight; pass the base model.")
        W0 = base.detach().to(device=A.device, dtype=COMPUTE_DTYPE)  # (out, in)
        m0 = torch.linalg.vector_norm(W0, dim=1)  # (out,)
        magnitude = m0.clone()
        for w, t in present:
            if t.magnitude is not None:
                m_i = t.magnitude.to(COMPUTE_DTYPE)
            else:  # plain LoRA as the DoRA adapter with the same function
                m_i = torch.linalg.vector_norm(W0 + t.scale * t.B.to(COMPUTE_DTYPE) @ t.A.to(COMPUTE_DTYPE), dim=1)
            magnitude += w * (m_i - m0)
    return ExportedModule(name, kind, A, B, s, bias, magnitude)


def combine_terms(
    inputs: Sequence[AdapterTerms],
    weights: Sequence[float],
    options: CombineOptions,
    base_of: Callable[[str], torch.Tensor],
) -> tuple[dict[str, ExportedModule], bool]:
    """Combine adapters given as terms; returns ({module: combined term}, use_rslora of the result).

    `base_of(name)` gives W0 (out, in) for a module (only called when some input uses DoRA)."""
    weights = [float(w) for w in weights]
    if len(weights) != len(inputs) or not inputs:
        raise ValueError(f"Got {len(inputs)} adapters and {len(weights)} weights; give one weight per adapter "
                         "(and at least one adapter).")
    if not all(math.isfinite(w) for w in weights):
        raise ValueError(f"weights={weights}: every weight must be a finite number.")
    dora = any(t.use_dora for t in inputs)
    if dora and any(t.has_bias for t in inputs):
        raise ValueError(
            f"Cannot combine DoRA adapters ({[t.source for t in inputs if t.use_dora]}) with LoRA-bias adapters "
            f"({[t.source for t in inputs if t.has_bias]}): the result would need both, which PEFT refuses."
        )
    use_rslora = all(t.use_rslora for t in inputs)
    alpha = options.alpha or most_common([round(a, 10) for t in inputs for a in t.alphas.values()])
    names = list(dict.fromkeys(n for t in inputs for n in t.modules))
    result: dict[str, ExportedModule] = {}
    for name in names:
        present = [(w, t.modules[name]) for w, t in zip(weights, inputs) if name in t.modules]
        shapes = {(t.kind == "embedding", t.A.shape[1], t.B.shape[0]) for _, t in present}
        if len(shapes) > 1:
            raise ValueError(f"Module {name!r} has different kinds or shapes across the adapters ({shapes}); "
                             "they were trained on different base models.")
        combined = combine_module(present, options, alpha=alpha, use_rslora=use_rslora, dora=dora,
                                  base=base_of(name) if dora else None)
        if combined is not None:
            result[name] = combined
    return result, use_rslora


def combine_adapters(
    model: nn.Module,
    adapters: Sequence[str],
    weights: Sequence[float],
    method: str = "linear",
    *,
    new_name: str = "combined",
    rank: int | None = None,
    energy: float | None = None,
    density: float | None = None,
    majority_sign: str = "total",
    alpha: float | None = None,
) -> dict[str, int]:
    """Add adapter `new_name` to `model`: the combination of its adapters `adapters` with `weights`.

    Mutates `model` (the inputs stay; the new adapter is not activated: call `rankwise.set_adapter`).
    Save it with `rankwise.save_adapter(model, path, new_name)`. Returns {module: rank of the result}."""
    options = CombineOptions(method, rank, energy, density, majority_sign, alpha)
    if new_name in adapter_names(model):
        raise ValueError(f"The model already has an adapter named {new_name!r}; pass another new_name.")
    inputs = [model_terms(model, name) for name in adapters]
    modules, use_rslora = combine_terms(inputs, weights, options, lambda n: base_weight(model, n))
    to_save = sorted({m for t in inputs for m in (t.modules_to_save or [])}) or None
    install_adapter(model, new_name, modules, use_rslora=use_rslora, modules_to_save=to_save)
    return {name: m.r for name, m in modules.items()}


def combine_adapter_dirs(
    base_model: nn.Module,
    dirs: Sequence[str | Path],
    weights: Sequence[float],
    method: str,
    out_dir: str | Path,
    *,
    new_name: str = "combined",
    rank: int | None = None,
    energy: float | None = None,
    density: float | None = None,
    majority_sign: str = "total",
    alpha: float | None = None,
    **config_extra: Any,
) -> dict[str, int]:
    """Combine PEFT-format adapter directories and write the result to `out_dir` in the PEFT format.

    `base_model` is the model the adapters were trained on (its weights are needed for DoRA and for the
    exported config); it gains the result as adapter `new_name`, so it can be evaluated at once.
    `config_extra` goes to adapter_config.json (task_type and base_model_name_or_path default to the first
    directory's). Adapters carrying modules_to_save weights are refused: a full module has no low-rank
    combination. Returns {module: rank of the result}."""
    options = CombineOptions(method, rank, energy, density, majority_sign, alpha)
    if new_name in adapter_names(base_model):
        raise ValueError(f"base_model already has an adapter named {new_name!r}; pass another new_name.")
    merged = [name for name, layer in lora_layers(base_model) if layer.merged]
    if merged:
        raise ValueError(f"base_model has merged adapters (e.g. at {merged[0]}); pass an unmerged base model.")
    inputs = [dir_terms(d) for d in dirs]
    for terms in inputs:
        full = [k for k in terms.other if ".base_layer." not in k]
        if full:
            raise ValueError(
                f"{terms.source} carries full modules_to_save weights ({full[:3]}); a weighted combination of "
                "full modules is not defined here. Load the adapters with rankwise.load_adapter and use "
                "combine_adapters on the model (modules_to_save are then shared), or drop them."
            )
        check_fits(base_model, terms)
    modules, use_rslora = combine_terms(inputs, weights, options, lambda n: base_weight(base_model, n))
    install_adapter(base_model, new_name, modules, use_rslora=use_rslora)
    freeze_base(base_model)
    first = inputs[0].peft_config
    for key in ("task_type", "base_model_name_or_path"):
        if first.get(key) is not None:
            config_extra.setdefault(key, first[key])
    meta = {"combined_from": [str(d) for d in dirs], "weights": [float(w) for w in weights],
            "options": dataclasses.asdict(options)}
    save_adapter(base_model, out_dir, new_name, metadata=meta, **config_extra)
    return {name: m.r for name, m in modules.items()}
