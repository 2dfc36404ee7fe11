"""Skinny decode GEMMs (kernels/triton_gemm.py) against PyTorch: x @ w^T, and silu(gate) * up fused into the
gate/up GEMM (CPU interpreter at small sizes; Llama-3.2-1B sizes on a GPU)."""

import pytest
import torch

pytest.importorskip("triton")


def _check(device, dtype, M, K, N, I, launches):
    from rankwise.serve.kernels.triton_gemm import gate_up_silu, skinny_matmul

    g = torch.Generator().manual_seed(0)
    r = lambda *s: (torch.randn(*s, generator=g) * 0.5).to(device, dtype)  # noqa: E731
    x, w, w_gu = r(M, K), r(N, K), r(2 * I, K)
    ref = (x.float() @ w.float().t()).to(dtype)
    gu = (x.float() @ w_gu.float().t()).to(dtype)                     # the GEMM's output, rounded
    ref_m = torch.nn.functional.silu(gu[:, :I]) * gu[:, I:]           # eager silu_mul on it
    for launch in launches:
        out = skinny_matmul(x, w, **launch)
        m = gate_up_silu(x, w_gu, **launch)
        if dtype == torch.float32:
            torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
            torch.testing.assert_close(m, ref_m, atol=1e-3, rtol=1e-4)
        else:  # another fp32 summation order flips some bf16 roundings (the interpreter also truncates)
            err = (out.float() - ref.float()).abs()
            assert err.max() <= 0.02 * ref.float().abs().max() and err.mean() <= 5e-3 * ref.float().abs().mean()
            err = (m.float() - ref_m.float()).abs()
            mean_tol = 2e-2 if device == "cpu" else 5e-3  # the interpreter truncates at each of the 4 roundings
            assert err.max() <= 0.03 * ref_m.float().abs().max() and err.mean() <= mean_tol * ref_m.float().abs().mean()


def _check_split(device, dtype, M, K, N, launches):
    """Split-K parts sum to x @ w^T, and through add_rms give what the rounded product gives."""
    from rankwise.serve.kernels.triton_fused import add_rms
    from rankwise.serve.kernels.triton_gemm import skinny_partials

    g = torch.Generator().manual_seed(1)
    r = lambda *s: (torch.randn(*s, generator=g) * 0.5).to(device, dtype)  # noqa: E731
    x, w, res, norm = r(M, K), r(N, K), r(M, N), r(N)
    ref = x.float() @ w.float().t()
    scale = ref.abs().max()
    for launch in launches:
        parts = skinny_partials(x, w, **launch)
        assert parts.shape == (launch["split"], M, N) and parts.dtype == torch.float32
        torch.testing.assert_close(parts.sum(0), ref, atol=1e-4 * scale, rtol=1e-4)
        out, rsum = add_rms(parts, res, norm, 1e-5)
        out_ref, rsum_ref = add_rms(ref.to(dtype), res, norm, 1e-5)
        if dtype == torch.float32:
            torch.testing.assert_close(rsum, rsum_ref, atol=1e-4, rtol=1e-4)
            torch.testing.assert_close(out, out_ref, atol=1e-4, rtol=1e-4)
        else:  # a product that lands near a rounding boundary may round the other way (and the residual sum after)
            for a, b in ((rsum, rsum_ref), (out, out_ref)):
                err = (a.float() - b.float()).abs()
                assert err.max() <= 0.02 * b.float().abs().max() and err.mean() <= 5e-3 * b.float().abs().mean()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_split_k_parts_match_pytorch_interpreter(dtype):
    _check_split("cpu", dtype, M=5, K=128, N=48, launches=[dict(split=1, block_n=16, block_k=32),
                                                           dict(split=2, block_n=16, block_k=32),
                                                           dict(split=4, block_n=16, block_k=32)])


def test_split_k_rejects_a_split_that_does_not_divide_k():
    from rankwise.serve.kernels.triton_gemm import skinny_partials

    x, w = torch.zeros(4, 96), torch.zeros(32, 96)
    with pytest.raises(ValueError, match="divide K=96"):
        skinny_partials(x, w, split=5, block_n=16, block_k=32)
    with pytest.raises(ValueError, match="multiple of block_k"):
        skinny_partials(x, w, split=2, block_n=16, block_k=32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_skinny_gemms_match_pytorch_interpreter(dtype):
    _check("cpu", dtype, M=5, K=64, N=96, I=64, launches=[dict(block_n=16, block_k=32), dict(block_n=32, block_k=64)])


def test_skinny_gemm_rejects_bad_shapes():
    from rankwise.serve.kernels.triton_gemm import gate_up_silu, skinny_matmul

    x, w = torch.zeros(80, 64), torch.zeros(96, 64)
    with pytest.raises(ValueError, match="M <= 64"):
        skinny_matmul(x, w, block_n=16, block_k=32)
    with pytest.raises(ValueError, match="multiples"):
        skinny_matmul(x[:4], w[:90], block_n=16, block_k=32)
    with pytest.raises(ValueError, match="stack gate and up"):
        gate_up_silu(x[:4], w[:95], block_n=16, block_k=32)


@pytest.mark.gpu
def test_skinny_gemms_real_sizes_gpu():
    from rankwise.serve.kernels.triton_gemm import SKINNY_CANDIDATES

    for M in (8, 32):
        _check("cuda", torch.bfloat16, M=M, K=2048, N=3072, I=8192, launches=[vars(c) for c in SKINNY_CANDIDATES])
        _check("cuda", torch.bfloat16, M=M, K=8192, N=2048, I=1024, launches=[vars(SKINNY_CANDIDATES[0])])


@pytest.mark.gpu
def test_split_k_real_sizes_gpu():
    from rankwise.serve.kernels.triton_gemm import SPLIT_CANDIDATES

    for M in (8, 32):  # the o (2048 x 2048) and down (2048 x 8192) projections of Llama-3.2-1B
        for K in (2048, 8192):
            _check_split("cuda", torch.bfloat16, M=M, K=K, N=2048,
                         launches=[vars(c) for c in SPLIT_CANDIDATES if (K // c.split) % c.block_k == 0])


def _chain_layers(device, dtype, n, hidden, q_out, inter):
    g = torch.Generator().manual_seed(2)
    r = lambda *s: (torch.randn(*s, generator=g) * 0.1).to(device, dtype)  # noqa: E731
    return [{"qkv": r(q_out + 2 * hidden // 4, hidden), "o": r(hidden, q_out), "gu": r(2 * inter, hidden),
             "d": r(hidden, inter), "ln2": r(hidden), "ln_next": r(hidden)} for _ in range(n)]


def test_decode_chain_runs_every_launch_interpreter(monkeypatch):
    # the chain the split-K tuner times: unsplit (cuBLAS / skinny / fused gate-up) and split o / down, on CPU
    from rankwise.serve.kernels import triton_gemm as tg

    layers = _chain_layers("cpu", torch.float32, 2, 64, 64, 64)
    calls = []
    partials = tg.skinny_partials
    monkeypatch.setattr(tg, "skinny_partials", lambda *a, **k: calls.append(k["split"]) or partials(*a, **k))
    tg.decode_chain(layers, 3, 1e-5, {}, None)()
    tg.decode_chain(layers, 3, 1e-5, {"o": tg.SkinnyLaunch(16, 32), "gu_silu": tg.SkinnyLaunch(16, 32)}, None)()
    assert calls == []
    tg.decode_chain(layers, 3, 1e-5, {}, tg.SplitLaunch(16, 32, split=2))()
    assert calls == [2, 2] * 2  # o and down of each layer


@pytest.mark.gpu
def test_tune_split_times_the_chain_gpu():
    from rankwise.serve.kernels import triton_gemm as tg

    layers = _chain_layers("cuda", torch.bfloat16, 4, 2048, 2048, 8192)
    c = tg.tune_split(layers, 32, 1e-5, {})
    # this shape's entry (an engine warmed up earlier in the session logs its own model's shapes too)
    log = tg.TIMINGS["decode GEMM chain, split-K o (2048, 2048) / down (2048, 8192), M=32"]
    assert "unsplit" in log and len(log) > 1
    assert c is None or (isinstance(c, tg.SplitLaunch) and log[repr(c)] <= tg.SPLIT_MARGIN * log["unsplit"])


def test_tuners_pick_the_fastest_launch_under_the_margin_interpreter(monkeypatch):
    # the warm-up tuners' choice on CPU: every candidate runs (interpreter), a fake clock decides
    from rankwise.serve.kernels import triton_gemm as tg

    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "cpu")
    monkeypatch.setattr(tg, "_TUNED", {})
    times = iter([10.0, 9.8, 7.0, 9.0, 6.0, 8.0])  # cuBLAS first, then the candidates that fit, in order

    def fake_graph_us(fn, **kw):
        fn()
        return next(times)

    monkeypatch.setattr(tg, "graph_us", fake_graph_us)
    launches = (tg.SkinnyLaunch(16, 32), tg.SkinnyLaunch(32, 32), tg.SkinnyLaunch(64, 32), tg.SkinnyLaunch(16, 64),
                tg.SkinnyLaunch(32, 64), tg.SkinnyLaunch(16, 48))  # the last does not divide K = 64: not timed
    monkeypatch.setattr(tg, "SKINNY_CANDIDATES", launches)
    ws = [torch.randn(64, 64) for _ in range(3)]
    assert tg.tune_skinny(ws, 4, False) == launches[3]           # 6.0 us, the least below 0.95 x 10
    assert tg.tune_skinny(ws, 4, False) == launches[3]           # cached: no more timing
    times = iter([10.0, 9.9, 9.8])                                 # nothing at most 97% of the unsplit chain
    monkeypatch.setattr(tg, "SPLIT_CANDIDATES", (tg.SplitLaunch(16, 32, split=2), tg.SplitLaunch(16, 16, split=4)))
    layers = _chain_layers("cpu", torch.float32, 2, 64, 64, 64)
    assert tg.tune_split(layers, 3, 1e-5, {}) is None
    with pytest.raises(ValueError, match="one shape and dtype"):
        tg.tune_skinny([ws[0], torch.randn(32, 64)], 4, False)
