"""Fused LoRA / DoRA kernels vs the pure-PyTorch specification (rankwise/kernels/reference.py).

Without a GPU the Triton kernels run in the interpreter (TRITON_INTERPRET=1, set before they are imported) on
small odd shapes; with one, the same tests run compiled on CUDA, and the `gpu` tests add real model sizes.
Errors are ||fused - ref|| / ||ref|| against the reference in float64. The interpreter rounds fp32 -> bf16 by
truncation (the GPU rounds to nearest), hence the looser bf16 bound on CPU.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"
pytest.importorskip("triton")

from torch import nn

import rankwise
from rankwise.kernels import use_fused
from rankwise.kernels.dispatch import fused_forward
from rankwise.kernels.dora_norm import dora_row_norm
from rankwise.kernels.dropout import dropout_keep_mask
from rankwise.kernels.expand import lora_expand_
from rankwise.kernels.lora_fused import fused_dora_linear, fused_lora_linear
from rankwise.kernels.reduce import lora_reduce
from rankwise.kernels.reference import dora_linear_ref, dora_row_norm_ref, lora_linear_ref
from rankwise.kernels.shrink import lora_shrink

DEV = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2 if DEV == "cuda" else 3e-2}


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    assert torch.isfinite(a).all()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def fused_on():
    return use_fused(True, on_cpu=DEV == "cpu")


def seed_tensor(value: int) -> torch.Tensor:
    return torch.tensor([value], dtype=torch.int64, device=DEV)


def lora_inputs(M, K, N, r, dtype, bias=True, lora_bias=True, shape=None):
    x = torch.randn(*(shape or (M,)), K, dtype=dtype, device=DEV, requires_grad=True)
    W = (torch.randn(N, K, device=DEV) / K**0.5).to(dtype)
    b = torch.randn(N, device=DEV).to(dtype) if bias else None
    A = torch.randn(r, K, device=DEV, requires_grad=True)
    B = torch.randn(N, r, device=DEV, requires_grad=True)
    lb = torch.randn(N, device=DEV, requires_grad=True) if lora_bias else None
    return x, W, b, A, B, lb


def f64(*tensors):
    return [None if t is None else t.detach().double().requires_grad_(t.requires_grad) for t in tensors]


def grads(y, inputs, dy):
    wanted = [t for t in inputs if t is not None and t.requires_grad]
    return torch.autograd.grad(y, wanted, dy)


# ---- building blocks --------------------------------------------------------------------------------------
def test_dropout_mask_rate_independence_and_seeds():
    keep = dropout_keep_mask(seed_tensor(7), 64, 250, 0.3).float()
    assert abs(keep.mean().item() - 0.7) < 0.01
    centred = keep - keep.mean()
    for a, b in ((centred[:, 1:], centred[:, :-1]), (centred[1:], centred[:-1])):  # neighbours uncorrelated
        assert abs((a * b).mean().item()) / centred.var().item() < 0.05
    other = dropout_keep_mask(seed_tensor(8), 64, 250, 0.3).float()
    assert (keep != other).float().mean().item() > 0.3
    assert torch.equal(keep, dropout_keep_mask(seed_tensor(7), 64, 250, 0.3).float())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_shrink_expand_reduce_match_torch(dtype):
    torch.manual_seed(0)
    M, K, r, p = 45, 70, 19, 0.25
    x = torch.randn(K, M, device=DEV).to(dtype).t()  # non-contiguous (M, K)
    a = torch.randn(r, K, device=DEV)
    seed = seed_tensor(3)
    keep = dropout_keep_mask(seed, M, K, p).double()
    h = lora_shrink(x, a, scale=2.0, seed=seed, p=p)
    assert rel(h, 2.0 * (x.double() * keep) @ a.double().t()) < TOL[dtype]
    # the mask does not depend on block sizes
    assert rel(lora_shrink(x, a, scale=2.0, seed=seed, p=p, block_k=64, block_m=32), h) < TOL[dtype]

    y = torch.randn(M, K, device=DEV).to(dtype)
    g, bias, f, post = (torch.randn(M, r, device=DEV), torch.randn(K, device=DEV), torch.rand(K, device=DEV),
                        torch.randn(K, device=DEV))
    expect = ((y.double() + 0.5 * ((g.double() @ a.double()) * keep + bias.double())) * f.double()) + post.double()
    lora_expand_(y, g, a.t(), scale=0.5, bias=bias, f=f, post_bias=post, seed=seed, p=p)
    assert rel(y, expect) < TOL[dtype]

    gm = torch.randn(M, r, device=DEV)
    yy = torch.randn(M, K, device=DEV).to(dtype)
    out, colsum, dotsum = lora_reduce(x, gm, scale=3.0, seed=seed, p=p, transpose=True, colsum=True, dot_with=yy)
    xd = x.double() * keep
    assert out.shape == (r, K) and out.is_contiguous()
    assert rel(out, 3.0 * gm.double().t() @ xd) < TOL[dtype]
    assert rel(colsum, xd.sum(0)) < TOL[dtype] and rel(dotsum, (xd * yy.double()).sum(0)) < TOL[dtype]
    out1, _, _ = lora_reduce(x, gm, seed=seed, p=p, chunks=1)
    assert rel(out1, gm.double().t().mm(xd).t()) < TOL[dtype]


def test_rank_above_one_block():
    torch.manual_seed(1)
    x = torch.randn(20, 40, device=DEV)
    a = torch.randn(130, 40, device=DEV)  # two rank blocks of 128
    h = lora_shrink(x, a)
    assert rel(h, x.double() @ a.double().t()) < 1e-5
    y = torch.zeros(20, 33, device=DEV)
    b = torch.randn(33, 130, device=DEV)
    assert rel(lora_expand_(y, h, b), h.double() @ b.double().t()) < 1e-5
    out, _, _ = lora_reduce(x, h)
    assert rel(out, x.double().t() @ h.double()) < 1e-5


def test_launchers_reject_bad_inputs():
    x = torch.randn(8, 16, device=DEV)
    with pytest.raises(ValueError, match=r"a has shape \(4, 15\), expected \(None, 16\)"):
        lora_shrink(x, torch.randn(4, 15, device=DEV))
    with pytest.raises(ValueError, match="needs `seed`"):
        lora_shrink(x, torch.randn(4, 16, device=DEV), p=0.1)
    with pytest.raises(ValueError, match=r"must be in \[0, 1\)"):
        lora_shrink(x, torch.randn(4, 16, device=DEV), p=1.0, seed=seed_tensor(0))
    with pytest.raises(ValueError, match="f must have shape"):
        lora_expand_(x, torch.randn(8, 4, device=DEV), torch.randn(16, 4, device=DEV), f=torch.ones(3, device=DEV))


# ---- the autograd Functions -------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("p", [0.0, 0.2])
@pytest.mark.parametrize("path", ["fused", "dh_by_shrink", "rank_above_128"])
def test_lora_linear_values_and_grads(dtype, p, path, monkeypatch):
    if path == "dh_by_shrink":  # the wide-output route: dh from its own pass over dy instead of atomics
        monkeypatch.setattr("rankwise.kernels.lora_fused.DH_ATOMIC_MAX_COLUMNS", 0)
    torch.manual_seed(2)
    r = 130 if path == "rank_above_128" else 5
    x, W, b, A, B, lb = lora_inputs(None, 45, 29, r, dtype, shape=(3, 13))
    seed = seed_tensor(11) if p else None
    y = fused_lora_linear(x, W, b, A, B, 0.7, lb, p, seed)
    dy = torch.randn_like(y)
    got = grads(y, (x, A, B, lb), dy)
    keep = dropout_keep_mask(seed, 39, 45, p) if p else None
    x6, A6, B6, lb6 = f64(x, A, B, lb)
    ref = lora_linear_ref(x6, W.double(), b.double(), A6, B6, 0.7, lb6, keep, p)
    assert y.dtype == dtype and y.shape == (3, 13, 29)
    assert rel(y, ref) < TOL[dtype]
    for name, g, r in zip(["x", "A", "B", "b_lora"], got, grads(ref, (x6, A6, B6, lb6), dy.double())):
        assert rel(g, r) < TOL[dtype], name


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("base_bias", [False, True])
@pytest.mark.parametrize("r", [6, 130])
def test_dora_linear_values_and_grads(dtype, base_bias, r):
    torch.manual_seed(3)
    x, W, b, A, B, _ = lora_inputs(37, 45, 29, r, dtype, bias=base_bias, lora_bias=False)
    m = (torch.rand(29, device=DEV) + 0.5).requires_grad_()
    y = fused_dora_linear(x, W, b, A, B, 0.3, m)
    dy = torch.randn_like(y)
    got = grads(y, (x, A, B, m), dy)
    x6, A6, B6, m6 = f64(x, A, B, m)
    ref = dora_linear_ref(x6, W.double(), None if b is None else b.double(), A6, B6, 0.3, m6)
    assert rel(y, ref) < TOL[dtype]
    for name, g, g_ref in zip(["x", "A", "B", "m"], got, grads(ref, (x6, A6, B6, m6), dy.double())):
        assert rel(g, g_ref) < TOL[dtype], name


def test_dora_zero_magnitude_keeps_its_gradient():
    torch.manual_seed(4)
    x, W, _, A, B, _ = lora_inputs(21, 32, 17, 4, torch.float32, bias=False, lora_bias=False)
    m = torch.rand(17, device=DEV) + 0.5
    m[3] = 0.0
    m.requires_grad_()
    y = fused_dora_linear(x, W, None, A, B, 0.5, m)
    dy = torch.randn_like(y)
    (gm,) = torch.autograd.grad(y, m, dy)
    x6, A6, B6, m6 = f64(x, A, B, m)
    (gr,) = torch.autograd.grad(dora_linear_ref(x6, W.double(), None, A6, B6, 0.5, m6), m6, dy.double())
    assert rel(gm, gr) < 1e-5 and gm[3].abs() > 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dora_row_norm_without_merged_weight(dtype):
    torch.manual_seed(5)
    W = torch.randn(33, 170, device=DEV).to(dtype)  # in = 170: several chunks of the in dimension
    A, B = torch.randn(7, 170, device=DEV), torch.randn(33, 7, device=DEV) * 0.1
    got = dora_row_norm(W.t().contiguous().t(), A, B, 0.5)  # a transposed (Conv1D-style) weight view
    tol = 1e-5 if dtype == torch.float32 else 2e-3
    assert rel(got, dora_row_norm_ref(W.double(), A.double(), B.double(), 0.5)) < tol


# ---- LoraLayer dispatch ------------------------------------------------------------------------------------
def _layer(dtype=torch.float32, in_f=24, out_f=19, r=6, **kw):
    torch.manual_seed(6)
    base = nn.Linear(in_f, out_f, bias=True).to(DEV, dtype)
    base.requires_grad_(False)
    layer = rankwise.LoraLayer(base)
    adapter = layer.add_adapter("default", r, 2.0 * r, **kw)
    with torch.no_grad():
        adapter.lora_B.normal_()
        if adapter.lora_bias is not None:
            adapter.lora_bias.normal_()
        if adapter.magnitude is not None:
            adapter.magnitude.mul_(torch.rand_like(adapter.magnitude) + 0.5)
    return layer, adapter


def _both_paths(layer, x):
    """(output, grads of x and of every trainable parameter) on the fused and on the reference path."""
    results = []
    for fused in (True, False):
        layer.zero_grad(set_to_none=True)
        xx = x.detach().clone().requires_grad_()
        with fused_on() if fused else use_fused(False):
            y = layer(xx)
        y.backward(torch.ones_like(y) * torch.linspace(-1, 1, y.shape[-1], device=DEV, dtype=y.dtype))
        params = [p.grad.clone() for p in layer.parameters() if p.requires_grad]
        results.append((y.detach(), [xx.grad] + params))
    return results


@pytest.mark.parametrize("variant", ["lora", "bias", "dora", "rank_vector", "truncate", "resized"])
def test_layer_fused_matches_reference(variant):
    kw = {"bias": True} if variant == "bias" else {"use_dora": True} if variant == "dora" else {}
    layer, adapter = _layer(**kw)
    if variant == "rank_vector":
        with torch.no_grad():
            adapter.enable_rank_vector(0.0).normal_()
    if variant == "truncate":
        adapter.truncate = 4
    x = torch.randn(2, 5, 24, device=DEV)
    if variant == "resized":  # parameters replaced between calls are picked up
        with fused_on():
            layer(x)
        adapter.resize([0, 2, 5], add=2)
        with torch.no_grad():
            adapter.lora_B.normal_()
    (y_f, g_f), (y_r, g_r) = _both_paths(layer, x)
    assert rel(y_f, y_r) < 1e-5
    assert len(g_f) == len(g_r)
    for a, b in zip(g_f, g_r):
        assert rel(a, b) < 1e-5


def test_layer_dropout_uses_the_seeded_mask():
    layer, adapter = _layer(dropout=0.3)
    layer.train()
    x = torch.randn(13, 24, device=DEV)
    torch.manual_seed(9)
    with fused_on():
        y = layer(x)
    torch.manual_seed(9)
    seed = torch.randint(0, 2**31 - 1, (1,), device=DEV)  # what the dispatcher drew
    keep = dropout_keep_mask(seed, 13, 24, 0.3)
    A, B, s = adapter.effective_factors()
    ref = lora_linear_ref(x, layer.weight, layer.bias, A, B, s, None, keep, 0.3)
    assert rel(y, ref) < 1e-5
    layer.eval()
    with fused_on():
        assert torch.equal(layer(x), layer(x))


def test_layer_rank_zero_and_fallbacks():
    layer, _ = _layer(r=0)
    x = torch.randn(4, 24, device=DEV)
    with fused_on():
        assert fused_forward(layer, x, (), {}) is None
        assert torch.equal(layer(x), layer.base_layer(x))
    dora, _ = _layer(use_dora=True, dropout=0.1)
    dora.train()
    emb = rankwise.LoraLayer(nn.Embedding(10, 8).to(DEV))
    emb.add_adapter("default", 2, 4.0)
    with fused_on():
        assert fused_forward(dora, x, (), {}) is None  # DoRA + active dropout: reference
        assert fused_forward(emb, torch.arange(3, device=DEV), (), {}) is None
        assert fused_forward(layer, x, (x,), {}) is None
    with use_fused(False):
        lora, _ = _layer()
        assert fused_forward(lora, x, (), {}) is None


def test_conv1d_base_through_fused_path():
    transformers = pytest.importorskip("transformers")
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(7)
    base = Conv1D(19, 24).to(DEV)
    base.requires_grad_(False)
    layer = rankwise.LoraLayer(base)
    adapter = layer.add_adapter("default", 4, 8.0)
    with torch.no_grad():
        adapter.lora_B.normal_()
    with fused_on():
        assert fused_forward(layer, torch.randn(3, 24, device=DEV), (), {}) is not None
    (y_f, g_f), (y_r, g_r) = _both_paths(layer, torch.randn(3, 24, device=DEV))
    assert rel(y_f, y_r) < 1e-5 and all(rel(a, b) < 1e-5 for a, b in zip(g_f, g_r))
    assert transformers is not None


# ---- real sizes, torch.compile and CUDA graphs (GPU machine) ----------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("K,N,r,p", [(2048, 8192, 16, 0.0), (8192, 2048, 64, 0.05), (2048, 512, 128, 0.0)])
def test_real_sizes_bf16(K, N, r, p):
    torch.manual_seed(10)
    M = 4096
    x, W, _, A, B, _ = lora_inputs(M, K, N, r, torch.bfloat16, bias=False, lora_bias=False)
    with torch.no_grad():
        B.mul_(0.02)
    seed = seed_tensor(5) if p else None
    y = fused_lora_linear(x, W, None, A, B, 2.0, None, p, seed)
    dy = torch.randn_like(y)
    got = grads(y, (x, A, B), dy)
    keep = dropout_keep_mask(seed, M, K, p) if p else None
    x6, A6, B6 = f64(x, A, B)
    ref = lora_linear_ref(x6, W.double(), None, A6, B6, 2.0, None, keep, p)
    assert rel(y, ref) < 1e-2
    for name, g, r_ in zip(["x", "A", "B"], got, grads(ref, (x6, A6, B6), dy.double())):
        assert rel(g, r_) < 1e-2, name


@pytest.mark.gpu
def test_real_size_dora_bf16():
    torch.manual_seed(11)
    x, W, _, A, B, _ = lora_inputs(4096, 2048, 2048, 16, torch.bfloat16, bias=False, lora_bias=False)
    with torch.no_grad():
        B.mul_(0.02)
    m = (torch.linalg.vector_norm(W.float(), dim=1) * (1 + 0.1 * torch.rand(2048, device=DEV))).requires_grad_()
    y = fused_dora_linear(x, W, None, A, B, 2.0, m)
    dy = torch.randn_like(y)
    got = grads(y, (x, A, B, m), dy)
    x6, A6, B6, m6 = f64(x, A, B, m)
    ref = dora_linear_ref(x6, W.double(), None, A6, B6, 2.0, m6)
    assert rel(y, ref) < 1e-2
    for name, g, r_ in zip(["x", "A", "B", "m"], got, grads(ref, (x6, A6, B6, m6), dy.double())):
        assert rel(g, r_) < 1e-2, name


def _gpu_layer(use_dora=False, dropout=0.0):
    torch.manual_seed(12)
    base = nn.Linear(1024, 1536, bias=False).to(DEV, torch.bfloat16).requires_grad_(False)
    layer = rankwise.LoraLayer(base)
    adapter = layer.add_adapter("default", 16, 32.0, use_dora=use_dora, dropout=dropout)
    with torch.no_grad():
        adapter.lora_B.normal_(std=0.02)
    return layer.train()


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["lora", "dropout", "dora"])
def test_compiles_without_graph_breaks(kind, monkeypatch):
    import torch._inductor.config

    monkeypatch.setattr(torch._inductor.config, "fallback_random", True)  # the same dropout seed as eager
    layer = _gpu_layer(use_dora=kind == "dora", dropout=0.1 if kind == "dropout" else 0.0)
    x = torch.randn(4, 256, 1024, device=DEV, dtype=torch.bfloat16)
    compiled = torch.compile(layer, fullgraph=True)
    torch.manual_seed(0)
    y_c = compiled(x)
    y_c.float().square().mean().backward()
    g_c = [p.grad.clone() for p in layer.parameters() if p.requires_grad]
    layer.zero_grad(set_to_none=True)
    torch.manual_seed(0)
    with use_fused(kind != "dora"):  # compiled DoRA runs the reference path (rankwise/kernels/dispatch.py)
        y_e = layer(x)
    y_e.float().square().mean().backward()
    g_e = [p.grad for p in layer.parameters() if p.requires_grad]
    assert rel(y_c, y_e) < 1e-2 and all(rel(a, b) < 1e-2 for a, b in zip(g_c, g_e))


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["lora", "dropout", "dora"])
def test_cuda_graph_capture_of_a_training_step(kind):
    layer = _gpu_layer(use_dora=kind == "dora", dropout=0.1 if kind == "dropout" else 0.0)
    x = torch.randn(2048, 1024, device=DEV, dtype=torch.bfloat16, requires_grad=True)
    params = [p for p in layer.parameters() if p.requires_grad]

    def step():
        for p in params:
            p.grad = None
        x.grad = None
        layer(x).float().square().mean().backward()

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    graph.replay()
    replayed = [p.grad.clone() for p in params] + [x.grad.clone()]
    if kind == "dropout":  # each replay draws a new seed on the device: a new mask, no host involved
        graph.replay()
        again = [p.grad.clone() for p in params] + [x.grad.clone()]
        assert all(torch.isfinite(a).all() for a in again)
        assert all(rel(a, b) > 1e-3 for a, b in zip(replayed[:-1], again[:-1]))  # the adapter's gradients
        return
    step()
    eager = [p.grad for p in params] + [x.grad]
    assert all(rel(a, b) < 1e-2 for a, b in zip(replayed, eager))
