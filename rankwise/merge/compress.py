"""Compress an adapter to a smaller rank by a truncated SVD of each module's delta.

For one module, dW = s B A (B: (out, r), A: (r, in)). Its SVD comes from two thin QRs and the SVD of an
r x r core, never from the dense (out, in) matrix:

    B = Q_B R_B,  A^T = Q_A R_A,   s R_B R_A^T = U_c S V_c^T   =>   dW = (Q_B U_c) S (Q_A V_c)^T

By Eckart-Young the best rank-k approximation (Frobenius and spectral) keeps the k largest singular values.
k is either a fixed rank, or the smallest k whose kept energy sum_{i<k} S_i^2 reaches a fraction `energy`
of ||dW||_F^2 = sum_i S_i^2 (both given: the smaller k). Each module keeps its alpha, so its new scale is
s' = alpha / k (alpha / sqrt(k) with rsLoRA), and the factors take the rest, split evenly:

    A' = sqrt(S_k / s') V_k^T  (k, in),     B' = U_k sqrt(S_k / s')  (out, k)

DoRA magnitudes and LoRA biases are kept unchanged; such modules keep at least rank 1, because a rank-0
module is left out of the file and would lose them. `compress_adapter` works in place on a model's adapter,
`compress_adapter_dir` turns a PEFT-format directory into another one without loading any model.
"""

from __future__ import annotations

import copy
import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from rankwise.io.atomic import atomic_directory
from rankwise.io.peft import CONFIG_NAME, RANKWISE_META, WEIGHTS_NAME, ExportedModule, peft_pattern
from rankwise.layers.scaling import alpha_from_scale, lora_scale
from rankwise.merge.terms import dir_terms, most_common, terms_state_dict
from rankwise.model import adapter_modules

# One-off and small (r x r cores, (out, r) factors): float64 keeps the exactness tests meaningful.
COMPUTE_DTYPE = torch.float64


def lowrank_svd(A: torch.Tensor, B: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD of B @ A without forming it. A: (r, in), B: (out, r) -> U (out, q), S (q,), Vh (q, in),
    q = min(out, in, r), S descending."""
    A, B = A.to(COMPUTE_DTYPE), B.to(COMPUTE_DTYPE)
    Q_B, R_B = torch.linalg.qr(B)  # (out, p), (p, r), p = min(out, r)
    Q_A, R_A = torch.linalg.qr(A.t())  # (in, p'), (p', r)
    U_c, S, Vh_c = torch.linalg.svd(R_B @ R_A.t(), full_matrices=False)  # core (p, p')
    return Q_B @ U_c, S, Vh_c @ Q_A.t()


def dense_truncated(
    D: torch.Tensor, rank: int | None, energy: float | None, floor: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Best rank-k factors of a dense D (out, in): (A (k, in), B (out, k), S (q,)) with B @ A = D_k.

    With p the smaller side, the Gram matrix M M^T (p x p, M = D or D^T) has eigenvectors U and
    eigenvalues S^2; D_k = U_k U_k^T M (transposed back). Far cheaper than a full SVD of D, and the
    projection needs no division by small singular values. k as in `select_rank`."""
    D = D.to(COMPUTE_DTYPE)
    tall = D.shape[0] > D.shape[1]
    M = D.t() if tall else D  # (p, n), p <= n
    evals, vecs = torch.linalg.eigh(M @ M.t())  # ascending
    S = evals.flip(0).clamp(min=0).sqrt()  # (p,)
    k = select_rank(S, rank, energy, floor)
    U_k = vecs.flip(1)[:, :k]  # (p, k)
    left, right = U_k, U_k.t() @ M  # M_k = left @ right
    if tall:
        left, right = right.t(), left.t()
    return right, left, S


def energy_rank(S: torch.Tensor, energy: float) -> int:
    """Smallest k with sum_{i<k} S_i^2 >= energy * sum_i S_i^2 (S descending); 0 when S is all zero."""
    sq = S.to(COMPUTE_DTYPE) ** 2
    if sq.numel() == 0 or sq.sum() == 0:
        return 0
    cum = torch.cumsum(sq, 0)
    k = int(torch.searchsorted(cum, energy * cum[-1]).item()) + 1
    return min(k, S.numel())


def select_rank(S: torch.Tensor, rank: int | None, energy: float | None, floor: int = 0) -> int:
    """k = min(rank, energy_rank(S, energy), len(S)) over the criteria given, and at least `floor`."""
    k = S.numel() if rank is None else min(rank, S.numel())
    if energy is not None:
        k = min(k, energy_rank(S, energy))
    return max(k, floor)


def split_factors(
    U: torch.Tensor, S: torch.Tensor, Vh: torch.Tensor, k: int, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(A' (k, in), B' (out, k)) with scale * B' A' = U_k diag(S_k) Vh_k, the root split evenly.

    k may exceed len(S) (a rank floor on a zero delta): the extra components are zero."""
    pad = k - S.numel()
    if pad > 0:
        U = torch.cat([U, U.new_zeros(U.shape[0], pad)], dim=1)
        S = torch.cat([S, S.new_zeros(pad)])
        Vh = torch.cat([Vh, Vh.new_zeros(pad, Vh.shape[1])], dim=0)
    root = (S[:k] / scale).sqrt() if scale > 0 else S[:k] * 0  # (k,)
    return root[:, None] * Vh[:k], U[:, :k] * root


def check_criteria(rank: int | None, energy: float | None, *, required: bool = True) -> None:
    if required and rank is None and energy is None:
        raise ValueError("Give rank=<int> (a fixed rank), energy=<fraction in (0, 1]> (the smallest rank keeping "
                         "that share of ||dW||_F^2), or both (the smaller of the two).")
    if rank is not None and (not isinstance(rank, int) or isinstance(rank, bool) or rank < 1):
        raise ValueError(f"rank={rank!r}: must be an integer >= 1 (to remove an adapter use delete_adapter).")
    if energy is not None and not 0.0 < float(energy) <= 1.0:
        raise ValueError(f"energy={energy!r}: must be a fraction in (0, 1], e.g. 0.9 to keep 90% of ||dW||_F^2.")


@dataclass
class CompressedModule:
    """A module's new plain term, its SVD spectrum and the share of ||dW||_F^2 kept."""

    term: ExportedModule
    spectrum: torch.Tensor  # (q,) all singular values of the old delta
    kept_energy: float


def compress_term(
    m: ExportedModule, alpha: float, use_rslora: bool, rank: int | None, energy: float | None
) -> CompressedModule:
    """Best rank-k approximation of s B A (k from `rank` / `energy`), keeping alpha, bias and magnitude."""
    U, S, Vh = lowrank_svd(m.A, m.B * m.scale)
    floor = 1 if (m.magnitude is not None or m.bias is not None) else 0
    k = select_rank(S, rank, energy, floor)
    scale = lora_scale(alpha, k, use_rslora)
    A, B = split_factors(U, S, Vh, k, scale)
    total = float((S**2).sum())
    kept = float((S[:k] ** 2).sum()) / total if total > 0 else 1.0
    term = ExportedModule(m.name, m.kind, A, B, scale, m.bias, m.magnitude)
    return CompressedModule(term, S, kept)


@torch.no_grad()
def compress_adapter(
    model: nn.Module, adapter_name: str = "default", *, rank: int | None = None, energy: float | None = None
) -> dict[str, int]:
    """Compress adapter `adapter_name` of `model` in place; returns {module: new rank}.

    Mutates the model: each module whose rank drops gets new A / B Parameters (through
    `LoraAdapter.resize`), so an optimizer built before must be rebuilt. A DyLoRA truncation and a rank
    vector are folded into the new factors; with a rank vector e, the new one holds the singular values
    (A' = V_k^T, B' = U_k, e = S_k / s', AdaLoRA's P diag(E) Q form). Offsets of a moved base weight
    (PiSSA) are kept as they are: the export still adds them."""
    check_criteria(rank, energy)
    ranks: dict[str, int] = {}
    for name, layer, adapter in adapter_modules(model, adapter_name):
        if adapter_name in layer.merged:
            raise ValueError(f"{name}: adapter {adapter_name!r} is merged; call rankwise.unmerge(model) before "
                             "compressing it (unmerge subtracts the factors that were merged).")
        A, B, s = adapter.effective_factors()  # (r, in), (out, r)
        r = A.shape[0]
        if r == 0:
            ranks[name] = 0
            continue
        alpha = alpha_from_scale(s, r, adapter.use_rslora)
        term = ExportedModule(name, layer.kind.name, A, B, s, adapter.lora_bias, adapter.magnitude)
        new = compress_term(term, alpha, adapter.use_rslora, rank, energy).term
        if new.r >= adapter.r and adapter.truncate is None:
            ranks[name] = adapter.r  # nothing to gain: keep the trained factors as they are
            continue
        new_A, new_B, new_e = new.A, new.B, 1.0
        if adapter.rank_vector is not None:
            U, S, Vh = lowrank_svd(A, B * s)
            new_A, new_B, new_e = Vh[: new.r], U[:, : new.r], S[: new.r] / new.scale if new.scale > 0 else 0.0
        adapter.truncate = None
        adapter.resize([], new.r, new_A=new_A.to(adapter.lora_A.dtype), new_B=new_B.to(adapter.lora_A.dtype),
                       new_e=new_e)
        adapter.scale, adapter.alpha = new.scale, alpha
        ranks[name] = new.r
    if not ranks:
        raise KeyError(f"No module holds an adapter named {adapter_name!r}; see rankwise.adapter_names(model).")
    return ranks


def compress_adapter_dir(
    src: str | Path, dst: str | Path, *, rank: int | None = None, energy: float | None = None
) -> dict[str, int]:
    """Read a PEFT-format adapter from `src`, compress every module, write a PEFT-format adapter to `dst`.

    No model is loaded. The config keeps every field of the source (alpha, alpha_pattern, target_modules,
    ...) except r and rank_pattern, which are rewritten for the new per-module ranks; modules that end at
    rank 0 (a zero delta under an energy criterion) are left out and added to exclude_modules. Tensors keep
    the source dtype; modules_to_save tensors are copied unchanged. Returns {module: new rank}."""
    check_criteria(rank, energy)
    terms = dir_terms(src)
    if not terms.modules:
        raise ValueError(f"{src}: the adapter holds no LoRA module; there is nothing to compress.")
    dtype = next(iter(terms.modules.values())).A.dtype
    results = {name: compress_term(m, terms.alphas[name], terms.use_rslora, rank, energy)
               for name, m in terms.modules.items()}
    kept = {name: c.term for name, c in results.items() if c.term.r > 0}
    dropped = sorted(set(results) - set(kept))
    if not kept:
        raise ValueError(f"{src}: every module's delta is zero, so the compressed adapter would be empty.")
    cfg = copy.deepcopy(terms.peft_config)
    ranks = {name: m.r for name, m in kept.items()}
    cfg["r"] = int(most_common(list(ranks.values())))
    cfg["rank_pattern"] = peft_pattern(ranks, cfg["r"])
    if dropped:
        cfg["exclude_modules"] = _extend_exclude(cfg.get("exclude_modules"), dropped)
    meta = {
        "format": "rankwise",
        "compressed_from": str(src),
        "criteria": {"rank": rank, "energy": energy},
        "ranks": {name: c.term.r for name, c in results.items()},
        "old_ranks": {name: m.r for name, m in terms.modules.items()},
        "kept_energy": {name: round(c.kept_energy, 8) for name, c in results.items()},
    }
    sd = terms_state_dict(kept, dtype)
    sd.update(terms.other)
    with atomic_directory(dst) as tmp:
        save_file(sd, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
        (tmp / CONFIG_NAME).write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
        (tmp / RANKWISE_META).write_text(json.dumps(meta, indent=2) + "\n")
    return meta["ranks"]


def _extend_exclude(existing: list[str] | str | None, names: list[str]) -> list[str] | str:
    """PEFT's exclude_modules is a list of name suffixes or one full-match regex; add exact names to either."""
    if isinstance(existing, str):
        return "|".join([f"(?:{existing})"] + [re.escape(n) for n in names])
    return sorted(set(existing or []) | set(names))
