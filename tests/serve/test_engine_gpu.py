"""The GPU path (CUDA graphs over the persistent batch, Triton LoRA and attention kernels) on a CUDA device:
the same greedy tokens as eager execution, and in float32 the same as PEFT for each adapter alone."""

import pytest
import torch

from rankwise.serve.config import EngineConfig, SamplingParams
from rankwise.serve.engine import Engine, Request

pytestmark = pytest.mark.gpu
peft = pytest.importorskip("peft")


def _hf(dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    return LlamaForCausalLM(cfg).to("cuda", dtype).eval()


@pytest.fixture(scope="module")
def gpu_adapters(tmp_path_factory):
    root = tmp_path_factory.mktemp("gpu_adapters")
    specs = [dict(r=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]),
             dict(r=64, target_modules="all-linear", rank_pattern={"down_proj": 16, "k_proj": 32}),
             dict(r=16, target_modules=["q_proj", "v_proj"], use_rslora=True),
             dict(r=32, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], use_dora=True)]
    for i, kw in enumerate(specs):
        torch.manual_seed(10 + i)
        pm = peft.get_peft_model(_hf(torch.float32).cpu(), peft.LoraConfig(lora_alpha=16, init_lora_weights=False, **kw))
        with torch.no_grad():
            for n, p in pm.named_parameters():
                if "lora_B" in n:
                    p.mul_(4.0)
        pm.save_pretrained(root / f"a{i}")
    return root


def _requests(n=12, new=24):
    g = torch.Generator().manual_seed(0)
    names = [None, "a0", "a1", "a2", "a3"]
    return [Request(torch.randint(0, 512, (int(torch.randint(3, 40, (1,), generator=g)),), generator=g).tolist(),
                    names[i % len(names)], SamplingParams(max_tokens=new)) for i in range(n)]


def _run(dtype, adapter_dir, **kw):
    cfg = EngineConfig(max_num_seqs=8, max_model_len=256, max_gpu_adapters=8, lora_pool_mb=64,
                       dtype=str(dtype).removeprefix("torch."), **kw)
    engine = Engine(_hf(dtype), cfg, adapter_dir=adapter_dir, eos_token_ids=())
    engine.preload(["a0", "a1", "a2", "a3"], on_device=True)  # the same admissions in every run
    engine.warmup()
    return [o.output_ids for o in engine.generate(_requests())]


def test_cuda_graphs_triton_equal_peft_in_float32(gpu_adapters):
    graphs = _run(torch.float32, gpu_adapters)
    eager = _run(torch.float32, gpu_adapters, cuda_graphs=False)
    assert graphs == eager
    for req, got in zip(_requests(), graphs):
        model = _hf(torch.float32)
        if req.adapter is not None:
            model = peft.PeftModel.from_pretrained(model, gpu_adapters / req.adapter).eval()
        x = torch.tensor([req.prompt], device="cuda")
        ref = model.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=req.params.max_tokens,
                             do_sample=False, eos_token_id=None, pad_token_id=0)[0, x.shape[1]:].tolist()
        assert got == ref, f"adapter {req.adapter}"


def test_cuda_graphs_equal_eager_in_bfloat16(gpu_adapters):
    assert _run(torch.bfloat16, gpu_adapters) == _run(torch.bfloat16, gpu_adapters, cuda_graphs=False)
