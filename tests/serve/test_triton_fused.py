"""Fused elementwise kernels against the PyTorch code they replace (CPU interpreter; real sizes on a GPU)."""

import pytest
import torch

pytest.importorskip("triton")

from rankwise.serve.model import _rms, _rotate_half


def _check(device, dtype, T, H, H_kv, D, N, I):
    from rankwise.serve.kernels.triton_fused import add_rms, rope_kv, silu_mul

    g = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g).to(device, dtype)
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=1.6e-2)  # 2 bf16 ulps
    x, res, w = r(T, N), r(T, N), r(N)
    out, rsum = add_rms(x, res, w, 1e-5)
    torch.testing.assert_close(rsum, res + x, **tol)  # the interpreter rounds bf16 by truncation; GPUs to nearest
    torch.testing.assert_close(out, _rms(res + x, w, 1e-5), **tol)
    torch.testing.assert_close(add_rms(x, None, w, 1e-5)[0], _rms(x, w, 1e-5), **tol)
    parts = torch.randn(3, T, N, generator=g).to(device)                  # split-K float32 parts of a GEMM's x
    xs = parts.sum(0).to(dtype)
    out, rsum = add_rms(parts, res, w, 1e-5)
    assert out.dtype == rsum.dtype == dtype
    torch.testing.assert_close(rsum, res + xs, **tol)
    torch.testing.assert_close(out, _rms(res + xs, w, 1e-5), **tol)

    qkv = r(T, (H + 2 * H_kv) * D)
    cos, sin = r(64, D), r(64, D)
    pos = torch.randint(0, 64, (T,), generator=g).to(device)
    slots = torch.randperm(6 * 4, generator=g)[:T].to(device)
    kc = torch.zeros(6, 4, H_kv, D, dtype=dtype, device=device)
    vc = torch.zeros_like(kc)
    q, k = rope_kv(qkv, cos, sin, pos, slots, kc, vc, H)
    qr = qkv[:, : H * D].view(T, H, D)
    kr = qkv[:, H * D: (H + H_kv) * D].view(T, H_kv, D)
    c, s = cos[pos][:, None], sin[pos][:, None]
    torch.testing.assert_close(q, qr * c + _rotate_half(qr) * s, **tol)
    torch.testing.assert_close(k, kr * c + _rotate_half(kr) * s, **tol)
    torch.testing.assert_close(kc.view(-1, H_kv, D)[slots], k, atol=0, rtol=0)  # the cache holds what is returned
    torch.testing.assert_close(vc.view(-1, H_kv, D)[slots], qkv[:, (H + H_kv) * D:].view(T, H_kv, D), atol=0, rtol=0)

    gu = r(T, 2 * I)
    torch.testing.assert_close(silu_mul(gu), torch.nn.functional.silu(gu[:, :I]) * gu[:, I:], **tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_kernels_match_pytorch_interpreter(dtype):
    _check("cpu", dtype, T=5, H=4, H_kv=2, D=16, N=48, I=40)


@pytest.mark.gpu
def test_fused_kernels_match_pytorch_real_sizes_gpu():
    _check("cuda", torch.bfloat16, T=24, H=32, H_kv=8, D=64, N=2048, I=8192)


def test_l2_prefetch_is_off_on_cpu_and_when_disabled(monkeypatch):
    from rankwise.serve.kernels import l2_prefetch

    w = torch.zeros(64, 64, dtype=torch.bfloat16)
    monkeypatch.setattr(l2_prefetch, "ENABLED", True)
    assert l2_prefetch.target(w) == (None, 0), "no prefetch off the GPU (nor in the interpreter)"
    args = l2_prefetch.launch_args(w, w)
    assert args["PREFETCH"] is False and args["pf_bytes"] == 0


@pytest.mark.gpu
def test_l2_prefetch_changes_no_result_gpu(monkeypatch):
    # the decode attention and add + RMSNorm with the prefetch of a 64 MB weight: outputs and cache bit-identical
    from rankwise.serve.kernels import l2_prefetch
    from rankwise.serve.kernels.triton_attention import paged_decode_attention_rope
    from rankwise.serve.kernels.triton_fused import add_rms

    g = torch.Generator(device="cuda").manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g, device="cuda").to(torch.bfloat16)
    B, H, Hkv, D, bs, NB = 32, 32, 8, 64, 16, 600
    weight = r(16384, 2048)
    qkv, cos, sin = r(B, (H + 2 * Hkv) * D), r(1024, D), r(1024, D)
    kc, vc = r(NB, bs, Hkv, D), r(NB, bs, Hkv, D)
    tables = torch.randperm(NB - 1, device="cuda", generator=g)[: B * 16].add(1).view(B, 16).to(torch.int32)
    pos = torch.randint(0, 256, (B,), device="cuda", generator=g)
    active = torch.ones(B, dtype=torch.bool, device="cuda")
    x, res, w = r(B, 2048), r(B, 2048), r(2048)
    outs = {}
    for on in (False, True):
        monkeypatch.setattr(l2_prefetch, "ENABLED", on)
        monkeypatch.setattr(l2_prefetch, "LIMIT_MB", 64.0)
        assert (l2_prefetch.target(weight)[1] == 64 * 2 ** 20) == on
        k, v = kc.clone(), vc.clone()
        o = paged_decode_attention_rope(qkv, cos, sin, pos, active, k, v, tables, D ** -0.5, H, prefetch=weight)
        outs[on] = (o, k, v, *add_rms(x, res, w, 1e-5, prefetch=weight))
    for a, b in zip(outs[False], outs[True]):
        assert torch.equal(a, b)


def test_add_rms_rejects_parts_without_residual_or_not_float32():
    from rankwise.serve.kernels.triton_fused import add_rms

    parts, res, w = torch.zeros(2, 3, 8), torch.zeros(3, 8), torch.ones(8)
    with pytest.raises(ValueError, match="come with a residual"):
        add_rms(parts, None, w, 1e-5)
    with pytest.raises(ValueError, match="float32"):
        add_rms(parts.half(), res.half(), w.half(), 1e-5)
    with pytest.raises(ValueError, match="residual must match"):
        add_rms(parts, torch.zeros(4, 8), w, 1e-5)
