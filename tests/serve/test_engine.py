"""The engine end to end on CPU: a mixed batch of adapters equals PEFT per adapter; scheduling under pressure."""

import pytest
import torch
from tiny_models import tiny_llama

from rankwise.serve.adapter_cache import AdapterError
from rankwise.serve.config import EngineConfig, SamplingParams
from rankwise.serve.engine import Engine, QueueFullError, Request

peft = pytest.importorskip("peft")

MIX = [None, "qv4", "all7", "rs", "dora", "all7", "qv4", None, "dora", "rs"]


def _prompts(n, seed=5, lo=2, hi=14):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 96, (int(torch.randint(lo, hi, (1,), generator=g)),), generator=g).tolist()
            for _ in range(n)]


def _peft_greedy(adapter_dir, adapter, prompt, n):
    model = tiny_llama()
    if adapter is not None:
        model = peft.PeftModel.from_pretrained(model, adapter_dir / adapter).eval()
    x = torch.tensor([prompt])
    out = model.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=n, do_sample=False,
                         eos_token_id=None, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def _engine(adapter_dir, **kw):
    cfg = dict(max_num_seqs=6, block_size=4, max_model_len=64, max_num_batched_tokens=40, max_gpu_adapters=8)
    cfg.update(kw)
    return Engine(tiny_llama(), EngineConfig(**cfg), adapter_dir=adapter_dir, eos_token_ids=())


@pytest.fixture(scope="module")
def peft_reference(adapter_dir):
    prompts = _prompts(len(MIX))
    return prompts, [_peft_greedy(adapter_dir, a, p, 8) for a, p in zip(MIX, prompts)]


def test_mixed_batch_greedy_equals_peft_per_adapter(adapter_dir, peft_reference):
    prompts, expected = peft_reference
    engine = _engine(adapter_dir)
    outs = engine.generate([Request(p, a, SamplingParams(max_tokens=8)) for p, a in zip(prompts, MIX)])
    assert [o.output_ids for o in outs] == expected
    base = [e for e, a in zip(expected, MIX) if a is None]
    assert all(e not in base for e, a in zip(expected, MIX) if a), "every adapter must change the greedy output"
    assert engine.scheduler.allocator.num_free == engine.scheduler.allocator.num_blocks - 1
    assert engine.stats()["adapters_on_device"] == 4


def test_triton_lora_kernels_in_the_engine(adapter_dir, peft_reference):
    prompts, expected = peft_reference
    engine = _engine(adapter_dir, lora_backend="triton")
    picks = [1, 2, 4, 0]  # qv4, all7, dora, base
    outs = engine.generate([Request(prompts[i], MIX[i], SamplingParams(max_tokens=3)) for i in picks])
    assert [o.output_ids for o in outs] == [expected[i][:3] for i in picks]


def test_padded_prefill_steps_give_the_same_tokens(adapter_dir, peft_reference):
    # on CUDA prefill steps are padded to a multiple of 64 tokens (bounded GEMM shapes); padding must not leak
    prompts, expected = peft_reference
    engine = _engine(adapter_dir, prefill_token_multiple=16, lora_backend="triton")
    engine._warm_prefill()  # what warmup() runs on CUDA: one prefill per padded size, LoRA kernels on empty tables
    outs = engine.generate([Request(p, a, SamplingParams(max_tokens=8)) for p, a in zip(prompts[:5], MIX[:5])])
    assert [o.output_ids for o in outs] == expected[:5]


def test_triton_attention_path_in_the_engine():
    # what the GPU runs (prefill through the varlen kernel on a padded buffer, decode through the rotary + cache +
    # attention kernel that finds slots in the block table) gives the reference path's greedy tokens (head_dim 16)
    from transformers import LlamaConfig, LlamaForCausalLM

    def run(backend):
        torch.manual_seed(0)
        hf = LlamaForCausalLM(LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=48, num_hidden_layers=2,
                                          num_attention_heads=4, num_key_value_heads=2,
                                          max_position_embeddings=64)).eval()
        cfg = EngineConfig(max_num_seqs=3, block_size=4, max_model_len=64, max_num_batched_tokens=40,
                           attention_backend=backend, prefill_token_multiple=16)
        engine = Engine(hf, cfg, eos_token_ids=())
        return [o.output_ids for o in engine.generate([Request(p, None, SamplingParams(max_tokens=5))
                                                       for p in _prompts(4, lo=3, hi=20)])]

    assert run("triton") == run("reference")


def test_preemption_and_tiny_adapter_pool_keep_outputs_exact(adapter_dir, peft_reference):
    # 10 KV blocks of 4 tokens (9 usable) for 6 rows of up to 22 tokens: rows are preempted and recomputed however
    # the adapter loads interleave with the steps (with 17 blocks a slow load could leave no pressure); 2 device
    # slots for 4 adapters: adapters are evicted and reloaded between requests.
    prompts, expected = peft_reference
    engine = _engine(adapter_dir, num_kv_blocks=10, max_model_len=32, max_gpu_adapters=2, max_host_adapters=2)
    outs = engine.generate([Request(p, a, SamplingParams(max_tokens=8)) for p, a in zip(prompts, MIX)])
    assert [o.output_ids for o in outs] == expected
    stats = engine.stats()
    assert stats["preemptions"] > 0 and stats["adapter_gpu_evictions"] > 0 and stats["adapter_host_evictions"] > 0
    assert engine.scheduler.allocator.num_free == engine.scheduler.allocator.num_blocks - 1


def test_sampling_is_seeded_and_respects_top_p(adapter_dir):
    prompt = _prompts(1)[0]
    hot = SamplingParams(max_tokens=12, temperature=5.0)
    a = _engine(adapter_dir, seed=1).generate([Request(prompt, "all7", hot)])[0].output_ids
    b = _engine(adapter_dir, seed=1).generate([Request(prompt, "all7", hot)])[0].output_ids
    c = _engine(adapter_dir, seed=2).generate([Request(prompt, "all7", hot)])[0].output_ids
    assert a == b and a != c
    tiny_p = SamplingParams(max_tokens=8, temperature=5.0, top_p=1e-6)  # only the top token survives: greedy
    greedy = _engine(adapter_dir).generate([Request(prompt, "all7", SamplingParams(max_tokens=8))])[0].output_ids
    assert _engine(adapter_dir, seed=3).generate([Request(prompt, "all7", tiny_p)])[0].output_ids == greedy


def test_eos_and_stop_strings(adapter_dir):
    prompt = _prompts(1)[0]
    engine = _engine(adapter_dir)
    free = engine.generate([Request(prompt, None, SamplingParams(max_tokens=10))])[0].output_ids
    eos = free[3]
    engine.eos_token_ids = frozenset({eos})
    out = engine.generate([Request(prompt, None, SamplingParams(max_tokens=10))])[0]
    assert out.finish_reason == "stop" and out.output_ids == free[: free.index(eos) + 1]
    out = engine.generate([Request(prompt, None, SamplingParams(max_tokens=10, ignore_eos=True))])[0]
    assert out.finish_reason == "length" and out.output_ids == free

    class Chars:  # a tokenizer whose text is one letter per token
        def decode(self, ids):
            return "".join(chr(97 + i % 26) for i in ids)

    engine.eos_token_ids = frozenset()
    engine.tokenizer = Chars()
    text = Chars().decode(free)
    stop = text[4:6]
    out = engine.generate([Request(prompt, None, SamplingParams(max_tokens=10, stop=(stop,)))])[0]
    assert out.finish_reason == "stop" and out.text == text[: text.index(stop)]


def test_bad_requests_are_refused_with_the_fix(adapter_dir):
    engine = _engine(adapter_dir, max_queue=2)
    with pytest.raises(ValueError, match="max_model_len=64"):
        engine.add_request(Request(list(range(60)), None, SamplingParams(max_tokens=8)))
    with pytest.raises(ValueError, match="empty"):
        engine.add_request(Request([], None))
    with pytest.raises(ValueError, match=r"\[0, 96\)"):
        engine.add_request(Request([5, 96], None))
    with pytest.raises(AdapterError, match="not found") as exc:
        engine.add_request(Request([1, 2], "missing"))
    assert exc.value.status == 404
    for name in ("../qv4", "qv4/../../etc", "/etc/passwd", ".."):
        with pytest.raises(AdapterError, match="not valid") as exc:
            engine.add_request(Request([1, 2], name))
        assert exc.value.status == 400
    engine.add_request(Request([1, 2], None))
    engine.add_request(Request([1, 2], "qv4"))
    with pytest.raises(QueueFullError, match="max_queue=2"):
        engine.add_request(Request([1, 2], None))


def test_abort_frees_the_row_blocks_and_adapter(adapter_dir):
    engine = _engine(adapter_dir)
    rid = engine.add_request(Request([1, 2, 3], "qv4", SamplingParams(max_tokens=50)))
    waiting = engine.add_request(Request([1, 2, 3], "all7", SamplingParams(max_tokens=50)))
    engine.abort(waiting)  # aborted while still waiting (its adapter is loaded from disk in the background)
    import time

    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        engine.step()
        if engine.scheduler.running and engine.scheduler.running[0].output_ids:
            break
    assert len(engine.scheduler.running) == 1
    engine.abort(rid)
    outs = engine.step()
    assert any(o.request_id == rid and o.finish_reason == "abort" for o in outs)
    while engine.has_work():
        engine.step()
    assert not engine.scheduler.running and engine.num_requests() == 0
    assert engine.scheduler.allocator.num_free == engine.scheduler.allocator.num_blocks - 1
    assert engine.adapters.describe("qv4")["in_use"] == 0


def test_broken_adapter_fails_only_its_request(adapter_dir, tmp_path):
    import shutil

    root = tmp_path / "a"
    shutil.copytree(adapter_dir / "qv4", root / "good")
    (root / "broken").mkdir()
    (root / "broken" / "adapter_config.json").write_text('{"peft_type": "LORA"}')
    engine = _engine(root)
    outs = engine.generate([Request([1, 2, 3], "broken", SamplingParams(max_tokens=2)),
                            Request([1, 2, 3], "good", SamplingParams(max_tokens=2))])
    assert outs[0].finish_reason == "error" and "cannot be served" in outs[0].error
    assert outs[1].finish_reason == "length" and len(outs[1].output_ids) == 2


def test_prefill_lora_launch_and_block_override_keep_outputs(adapter_dir, peft_reference):
    # the prefill experiment knobs (bench/decode_profile.py): another K split, tiles and tokens per LoRA block
    # change the order of float32 sums at most, never the greedy tokens
    from rankwise.serve.kernels.triton_lora import LoraLaunch

    prompts, expected = peft_reference
    engine = _engine(adapter_dir, lora_backend="triton")
    engine.prefill.lora_launch = (LoraLaunch(2, 32, 32, 64),) * 4
    engine.prefill.block_t = 32
    picks = [1, 2, 4, 0]
    outs = engine.generate([Request(prompts[i], MIX[i], SamplingParams(max_tokens=3)) for i in picks])
    assert [o.output_ids for o in outs] == [expected[i][:3] for i in picks]
