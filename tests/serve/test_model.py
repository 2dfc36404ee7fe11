"""The engine's own forward equals transformers' for each supported family (prefill then paged decode)."""

import pytest
import torch

from rankwise.serve.kv_cache import KVCache
from rankwise.serve.model import AttnBatch, LlamaFamilyModel, spec_from_config


def _tiny(family: str, hidden: int = 32):
    import transformers as tf

    common = dict(vocab_size=96, hidden_size=hidden, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    if family == "llama":
        return tf.LlamaForCausalLM(tf.LlamaConfig(**common, rope_scaling={"rope_type": "llama3", "factor": 8.0,
                                                  "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                  "original_max_position_embeddings": 16})).eval()
    if family == "qwen2":  # q/k/v biases
        return tf.Qwen2ForCausalLM(tf.Qwen2Config(**common, tie_word_embeddings=True)).eval()
    return tf.MistralForCausalLM(tf.MistralConfig(**common, sliding_window=None)).eval()


@pytest.mark.parametrize("family,backend", [("llama", "reference"), ("qwen2", "reference"), ("mistral", "reference"),
                                            ("llama", "triton"), ("llama", "triton-split")])
def test_prefill_and_decode_logits_equal_transformers(family, backend, monkeypatch):
    # backend "triton": fused norm / rotary+cache / silu kernels and paged attention (CPU interpreter here);
    # "triton-split": also the decode steps' o and down projections as split-K parts reduced in add + RMSNorm
    split = backend == "triton-split"
    backend = "triton" if split else backend
    hf = _tiny(family, hidden=32 if backend == "reference" else 64)
    if family == "qwen2":
        with torch.no_grad():
            for layer in hf.model.layers:
                layer.self_attn.q_proj.bias.normal_()
    model = LlamaFamilyModel.from_hf(hf, torch.float32, torch.device("cpu"), attention_backend=backend)
    if split:  # o: K = 64 in 2 parts; down: K = 48 in 3 parts; only for steps of <= 2 rows (the decode steps)
        from rankwise.serve.kernels.triton_gemm import SplitLaunch

        from rankwise.serve.kernels import triton_gemm

        model.decode_gemm = {"o_split": SplitLaunch(16, 32, split=2), "d_split": SplitLaunch(16, 16, split=3)}
        model.decode_gemm_rows = 2
        calls, partials = [], triton_gemm.skinny_partials
        monkeypatch.setattr(triton_gemm, "skinny_partials",
                            lambda *a, **k: calls.append(k["split"]) or partials(*a, **k))
    s = model.spec
    kv = KVCache(s.num_layers, 12, 4, s.num_kv_heads, s.head_dim, torch.float32, torch.device("cpu"))
    ids = torch.randint(0, 96, (2, 11), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf(ids).logits
    tables = torch.tensor([[3, 1, 7], [2, 9, 4]], dtype=torch.int32)
    slot = lambda b, p: int(tables[b, p // 4]) * 4 + p % 4
    n = 7
    hidden = model.forward(torch.cat([ids[0, :n], ids[1, :n]]), torch.arange(n).repeat(2), kv,
                           AttnBatch(torch.tensor([slot(b, p) for b in range(2) for p in range(n)]), [n, n]))
    torch.testing.assert_close(model.logits(hidden).view(2, n, -1), ref[:, :n], atol=1e-5, rtol=1e-5)
    for p in range(n, 11):
        hidden = model.forward(ids[:, p], torch.tensor([p, p]), kv,
                               AttnBatch(torch.tensor([slot(0, p), slot(1, p)]), block_tables=tables,
                                         context_lens=torch.tensor([p + 1, p + 1], dtype=torch.int32)))
        torch.testing.assert_close(model.logits(hidden), ref[:, p], atol=1e-5, rtol=1e-5)
    if split:  # 4 decode steps x 2 layers x (o, down); the prefill (14 rows) does not split
        assert calls == [2, 3] * 2 * 4


def test_unsupported_family_names_the_supported_ones():
    from transformers import GPT2Config

    with pytest.raises(ValueError, match=r"'gpt2' is not supported.*'llama', 'mistral', 'qwen2'"):
        spec_from_config(GPT2Config())
