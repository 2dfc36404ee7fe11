"""The fused adapter path: base GEMM + adapter in one autograd.Function, Triton kernels for the adapter.

    LoRA:  y = x W^T + b + s (B' A (x ⊙ keep / (1 - p)) + b_lora)            (rankwise.kernels.reference)
    DoRA:  y = f ⊙ (x W^T + s (B' A x + b_lora)) + b,   f = m / ||W + s B' A||_row, the norm a constant

Why one Function: with a frozen base, what makes an adapter slow is not its arithmetic (~1% of the FLOPs) but
memory traffic and what autograd keeps. Here
- x is saved once (PEFT-style code also saves an fp32 copy, and a dropped copy with dropout);
- dropout is a mask regenerated from a seed in each kernel (rankwise.kernels.dropout), never stored;
- the adapter's products run in the activation dtype, reading the fp32 factors in registers (no casts of x);
- the backward reuses h = dropout(x) A^T from the forward (M x r fp32, a few hundred KB) and writes the
  adapter's share of dx into the base's dx in place;
- DoRA's norms come from one read of W (rankwise.kernels.dora_norm), and its backward recovers
  z = x W^T + s(...) from the saved output (z = (y - b) / f) instead of keeping a second activation.
Forward: the base GEMM (cuBLAS) + 1 kernel (rankwise.kernels.lora_forward); backward: the base GEMM + 1 memset
+ 2 kernels (rankwise.kernels.lora_backward). Ranks above 128 take the two-pass kernels (shrink / expand /
reduce). No host synchronisation and no Python state between steps, so the layer works under torch.compile
and CUDA graphs; the launchers skip re-checking inputs that `fused_*_linear` checked, to keep the host cost
per adapter low (it matters for small models, where the GPU work per layer is short).
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

from rankwise.kernels.common import check_seed, dot_precision
from rankwise.kernels.dora_norm import launch_dora_row_norm
from rankwise.kernels.expand import lora_expand_
from rankwise.kernels.lora_backward import DH_ATOMIC_MAX_COLUMNS, launch_grad_dy, launch_grad_x
from rankwise.kernels.lora_forward import MAX_RANK, launch_forward
from rankwise.kernels.reduce import lora_reduce
from rankwise.kernels.reference import dora_row_norm_ref
from rankwise.kernels.shrink import lora_shrink

# DoRA: a factor of exactly 0 (m = 0) is replaced by this, so z = (y - b) / f stays recoverable for dm.
_TINY_FACTOR = 1e-12


def _cast(grad: torch.Tensor | None, like: torch.Tensor | None) -> torch.Tensor | None:
    if grad is None or like is None:
        return None
    return grad if grad.dtype == like.dtype else grad.to(like.dtype)


def _adapter_forward(x2, y, A, B, scale, lora_bias, f, post_bias, seed, p):
    """y (M, out) <- ((y + s (dropout(x) A^T B^T + b_lora)) * f) + post_bias in place; returns h (M, r) fp32."""
    if A.shape[0] <= MAX_RANK:
        return launch_forward(x2, A, B, y, scale, lora_bias, f, post_bias, seed, p, dot_precision(x2.dtype))
    h = lora_shrink(x2, A, scale=1.0 / (1.0 - p), seed=seed, p=p)  # ranks > 128: two passes
    lora_expand_(y, h, B, scale=scale, bias=lora_bias, f=f, post_bias=post_bias)
    return h


def _adapter_backward(dy2, x2, h, A, B_f, scale, seed, p, dx, y, *, need_A, need_B, need_lb, need_dot):
    """Gradients of the adapter part: (dA (r, in), dB (out, r) = s dy^T h, colsum (out,) of dy, dotsum (out,) of
    dy ⊙ y); B_f = B diag(e) (times DoRA's f) gives dh = s dy B_f. dx (M, in), if given, gets += dh A in place."""
    (M, N), (R, K) = dy2.shape, A.shape
    need_dh = dx is not None or need_A
    if R > MAX_RANK:  # ranks > 128: one pass per product
        dh = lora_shrink(dy2, B_f.t(), scale=scale) if need_dh else None
        dB = colsum = dotsum = dA = None
        if need_B or need_lb or need_dot:
            dB, colsum, dotsum = lora_reduce(dy2, h, scale=scale, colsum=need_lb, dot_with=y if need_dot else None)
        if need_A:
            dA, _, _ = lora_reduce(x2, dh, scale=1.0 / (1.0 - p), seed=seed, p=p, transpose=True)
        if dx is not None:
            lora_expand_(dx, dh, A.t(), scale=1.0 / (1.0 - p), seed=seed, p=p)
        return dA, dB, colsum, dotsum
    prec = dot_precision(dy2.dtype)
    atomic_dh = need_dh and N <= DH_ATOMIC_MAX_COLUMNS
    # One zeroed fp32 buffer (one memset) for everything accumulated atomically: [dh | dB | dA | colsum | dotsum].
    sizes = [M * R if atomic_dh else 0, N * R if need_B else 0, R * K if need_A else 0, N if need_lb else 0,
             N if need_dot else 0]
    parts = torch.zeros(sum(sizes), dtype=torch.float32, device=dy2.device).split_with_sizes(sizes)
    dh = parts[0].view(M, R) if atomic_dh else (lora_shrink(dy2, B_f.t(), scale=scale) if need_dh else None)
    dB = parts[1].view(N, R) if need_B else None
    dA = parts[2].view(R, K) if need_A else None
    colsum = parts[3] if need_lb else None
    dotsum = parts[4] if need_dot else None
    if atomic_dh or need_B or need_lb or need_dot:
        launch_grad_dy(dy2, h if need_B else None, B_f if atomic_dh else None, scale, dh if atomic_dh else None,
                       dB, colsum, y if need_dot else None, dotsum, prec)
    if need_dh:
        launch_grad_x(x2 if need_A else None, dh, A, dx, dA, seed, p, prec)
    return dA, dB, colsum, dotsum


def _save(ctx, activations: tuple, params: tuple) -> None:
    """Activations go through save_for_backward, so saved-tensor hooks (gradient checkpointing, offloading) see
    them; the weights stay on ctx: under checkpointing each saved tensor costs a Python hook call each way, and
    weights need neither recomputation nor offloading. torch.compile traces save_for_backward only, so under
    compilation everything goes there."""
    if torch.compiler.is_compiling():
        ctx.save_for_backward(*activations, *params)
        ctx.params = None
    else:
        ctx.save_for_backward(*activations)
        ctx.params = params


def _load(ctx) -> tuple:
    """The activations, then the weights, in the order given to _save."""
    saved = ctx.saved_tensors
    return saved if ctx.params is None else saved + ctx.params


class _LoraLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, lora_A, lora_B, lora_bias, scale: float, p: float, seed):
        out_features, in_features = weight.shape
        x2 = x.reshape(-1, in_features)  # (M, in)
        y = F.linear(x2, weight, bias)  # (M, out)
        h = _adapter_forward(x2, y, lora_A, lora_B, scale, lora_bias, None, None, seed, p)  # (M, r) fp32
        _save(ctx, (x2, h), (weight, lora_A, lora_B, lora_bias, seed))
        ctx.scale, ctx.p, ctx.x_shape = scale, p, x.shape
        return y.view(*x.shape[:-1], out_features)

    @staticmethod
    def backward(ctx, dy):
        x2, h, weight, A, B, lora_bias, seed = _load(ctx)
        need_x, _, _, need_A, need_B, need_lb = ctx.needs_input_grad[:6]
        dy2 = dy.reshape(-1, weight.shape[0])  # (M, out)
        dx = dy2 @ weight if need_x else None  # (M, in); the adapter adds its share in place
        dA, dB, colsum, _ = _adapter_backward(dy2, x2, h, A, B, ctx.scale, seed, ctx.p, dx, None,
                                              need_A=need_A, need_B=need_B, need_lb=need_lb, need_dot=False)
        dlb = None if colsum is None else colsum * ctx.scale
        dx = None if dx is None else dx.view(ctx.x_shape)
        return dx, None, None, _cast(dA, A), _cast(dB, B), _cast(dlb, lora_bias), None, None, None


class _DoraLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, lora_A, lora_B, lora_bias, factor, scale: float):
        out_features, in_features = weight.shape
        f = factor.detach()
        f = torch.where(f == 0, _TINY_FACTOR, f)  # (out,)
        x2 = x.reshape(-1, in_features)  # (M, in)
        y = F.linear(x2, weight)  # (M, out) = x W^T, the base bias is added by the kernel after the factor
        h = _adapter_forward(x2, y, lora_A, lora_B, scale, lora_bias, f, bias, None, 0.0)
        out = y.view(*x.shape[:-1], out_features)
        # Save the output itself (not y, which the kernel wrote in place): under torch.compile a saved tensor that
        # was mutated after its creation is not guaranteed to be the mutated value.
        _save(ctx, (x2, h, out), (weight, bias, lora_A, lora_B, lora_bias, f))
        ctx.scale, ctx.x_shape = scale, x.shape
        return out

    @staticmethod
    def backward(ctx, dy):
        x2, h, out, weight, bias, A, B, lora_bias, f = _load(ctx)
        s = ctx.scale
        need_x, _, _, need_A, need_B, need_lb, need_f = ctx.needs_input_grad[:7]
        dy2 = dy.reshape(-1, weight.shape[0])  # (M, out); dz = dy ⊙ f is never materialised
        y = out.reshape(-1, weight.shape[0])  # (M, out)
        dx = None
        if need_x:  # (dy ⊙ f) W, scaling whichever of dy (M, out) and W (out, in) is smaller; computed in fp32
            if x2.shape[0] >= weight.shape[1]:
                dx = dy2 @ torch.mul(weight, f[:, None], out=torch.empty_like(weight))
            else:
                dx = torch.mul(dy2, f, out=torch.empty_like(dy2)) @ weight
        f_col = f[:, None]
        dA, P, colsum, dotsum = _adapter_backward(
            dy2, x2, h, A, B * f_col, s, None, 0.0, dx, y, need_A=need_A, need_B=need_B,
            need_lb=need_lb or (need_f and bias is not None), need_dot=need_f)
        dB = P * f_col if need_B else None  # s (dy ⊙ f)^T h
        dlb = colsum * f * s if need_lb else None
        df = None
        if need_f:  # sum_t dy z with z = (y - b) / f
            df = (dotsum if bias is None else dotsum - bias.float() * colsum) / f
        dx = None if dx is None else dx.view(ctx.x_shape)
        return dx, None, None, _cast(dA, A), _cast(dB, B), _cast(dlb, lora_bias), df, None


def _check(x: torch.Tensor, weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor) -> None:
    out_features, in_features = weight.shape
    if x.shape[-1] != in_features:
        raise ValueError(f"x has {x.shape[-1]} features; the weight (out, in) = {tuple(weight.shape)} expects "
                         f"{in_features}.")
    if x.dtype != weight.dtype:
        raise ValueError(f"x is {x.dtype} but the base weight is {weight.dtype}; cast one of them (or use autocast "
                         "with the reference path).")
    if lora_A.shape[1] != in_features or lora_B.shape[0] != out_features or lora_B.shape[1] != lora_A.shape[0]:
        raise ValueError(f"lora_A {tuple(lora_A.shape)} / lora_B {tuple(lora_B.shape)} do not fit a "
                         f"({out_features}, {in_features}) weight: need (r, {in_features}) / ({out_features}, r).")


def fused_lora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scale: float,
    lora_bias: torch.Tensor | None = None,
    p: float = 0.0,
    seed: torch.Tensor | None = None,
) -> torch.Tensor:
    """x: (..., in), weight: (out, in) frozen, lora_A: (r, in), lora_B: (out, r) with diag(e) folded in,
    seed: (1,) int64 on x's device when p > 0. Returns (..., out); see the module docstring."""
    _check(x, weight, lora_A, lora_B)
    check_seed(seed, p, x.device)
    return _LoraLinear.apply(x, weight, bias, lora_A, lora_B, lora_bias, float(scale), float(p), seed)


def fused_dora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scale: float,
    magnitude: torch.Tensor,
    lora_bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """DoRA without dropout; magnitude: (out,). Gradients reach magnitude through f = m / norm."""
    _check(x, weight, lora_A, lora_B)
    with torch.no_grad():  # (out,) fp32, a constant in backward
        if lora_A.shape[0] <= MAX_RANK:
            norm = launch_dora_row_norm(weight, lora_A, lora_B, float(scale), dot_precision(weight.dtype))
        else:
            norm = dora_row_norm_ref(weight, lora_A, lora_B, scale)
    factor = magnitude / norm
    return _DoraLinear.apply(x, weight, bias, lora_A, lora_B, lora_bias, factor, float(scale))
