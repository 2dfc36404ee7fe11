"""Typed, validated settings of the serving engine and of one request's sampling.

`EngineConfig` sizes every fixed resource up front (batch rows, KV blocks, the GPU adapter pool), as the
engine allocates them once; `SamplingParams` is what an OpenAI-style request asks for. Both are frozen
dataclasses checked in `__post_init__`: an impossible value is an error naming the field, the value and the fix.
"""

from __future__ import annotations

from dataclasses import dataclass, field


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(msg)


@dataclass(frozen=True)
class EngineConfig:
    """Resources of one engine.

    max_num_seqs: rows of the running batch (requests decoded together).
    max_num_batched_tokens: prompt tokens one prefill step may take (a longer prompt runs alone).
    max_model_len: prompt + generated tokens of one request (0: the model's limit, at most 4096).
    block_size: tokens per KV-cache block; num_kv_blocks: blocks in the cache (0: derive from
        `kv_cache_memory_gb`, or from max_num_seqs * max_model_len when that is 0 too).
    max_gpu_adapters: adapters resident on the device at once (slots); lora_pool_mb: the device buffer that
        holds their packed weights (heterogeneous ranks share it without padding).
    max_host_adapters: packed adapters kept in host memory (LRU); disk holds any number.
    adapter_load_threads: background threads that read and pack adapters from disk.
    max_lora_rank: the largest rank of one module that the kernels accept.
    max_queue: requests waiting or running beyond which `add_request` raises `QueueFullError` (HTTP 429).
    cuda_graphs: capture decode steps as CUDA graphs (GPU only).
    lora_backend: "auto" (Triton on CUDA, the PyTorch reference elsewhere), "triton" or "reference".
    lora_order: where a site's LoRA shrink runs against its base GEMM on CUDA (`model.LoraContext`): "side" (on a side
        stream beside it), "shrink_first" or "gemm_first" (one stream); "auto": "shrink_first" for decode steps
        (their row-form kernels, `kernels/triton_lora_rows.py`, gain nothing from a side stream: 1.679 against 1.706
        ms per batch-32 step of 32 adapters on an H100, bench/decode_profile.py) and "side" for prefill steps.
    prefill_token_multiple: a prefill step's token count is padded up to a multiple of this (0: 64 on CUDA, else 1),
        so that the GEMMs see a bounded set of shapes (cuBLAS picks and caches an algorithm per shape).
    """

    max_num_seqs: int = 32
    max_num_batched_tokens: int = 4096
    max_model_len: int = 0
    block_size: int = 16
    num_kv_blocks: int = 0
    kv_cache_memory_gb: float = 0.0
    max_gpu_adapters: int = 64
    lora_pool_mb: float = 256.0
    max_host_adapters: int = 256
    adapter_load_threads: int = 2
    max_lora_rank: int = 64
    max_queue: int = 1024
    dtype: str = "auto"
    device: str = "auto"
    cuda_graphs: bool = True
    lora_backend: str = "auto"
    lora_order: str = "auto"
    attention_backend: str = "auto"
    seed: int = 0
    prefill_token_multiple: int = 0
    decode_buckets: tuple[int, ...] = field(default=())

    def __post_init__(self) -> None:
        _check(isinstance(self.max_model_len, int) and self.max_model_len >= 0,
               f"EngineConfig.max_model_len={self.max_model_len!r}: must be an integer >= 0 (0 = the model's limit).")
        for name in ("max_num_seqs", "max_num_batched_tokens", "block_size",
                     "max_gpu_adapters", "max_host_adapters", "max_lora_rank", "max_queue", "adapter_load_threads"):
            value = getattr(self, name)
            _check(isinstance(value, int) and value >= 1, f"EngineConfig.{name}={value!r}: must be an integer >= 1.")
        _check(self.prefill_token_multiple >= 0,
               f"EngineConfig.prefill_token_multiple={self.prefill_token_multiple!r}: must be >= 0 (0 = auto).")
        _check(self.num_kv_blocks >= 0, f"EngineConfig.num_kv_blocks={self.num_kv_blocks!r}: must be >= 0 (0 = derive).")
        _check(self.lora_pool_mb > 0, f"EngineConfig.lora_pool_mb={self.lora_pool_mb!r}: must be > 0.")
        _check(self.max_num_batched_tokens >= 16,
               f"EngineConfig.max_num_batched_tokens={self.max_num_batched_tokens}: must be >= 16.")
        _check(self.dtype in ("auto", "float32", "bfloat16", "float16"),
               f"EngineConfig.dtype={self.dtype!r}: use 'auto', 'float32', 'bfloat16' or 'float16'.")
        _check(self.lora_backend in ("auto", "triton", "reference"),
               f"EngineConfig.lora_backend={self.lora_backend!r}: use 'auto', 'triton' or 'reference'.")
        _check(self.lora_order in ("auto", "side", "shrink_first", "gemm_first"),
               f"EngineConfig.lora_order={self.lora_order!r}: use 'auto', 'side', 'shrink_first' or 'gemm_first'.")
        _check(self.attention_backend in ("auto", "triton", "reference"),
               f"EngineConfig.attention_backend={self.attention_backend!r}: use 'auto', 'triton' or 'reference'.")
        for b in self.decode_buckets:
            _check(1 <= b <= self.max_num_seqs,
                   f"EngineConfig.decode_buckets has {b}: each bucket must be in [1, max_num_seqs={self.max_num_seqs}].")

    def buckets(self) -> tuple[int, ...]:
        """Batch sizes that decode steps are padded to (one CUDA graph each), ascending, ending at max_num_seqs."""
        if self.decode_buckets:
            out = sorted(set(self.decode_buckets) | {self.max_num_seqs})
        else:
            out = sorted({b for b in (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256) if b < self.max_num_seqs}
                         | {self.max_num_seqs})
        return tuple(out)


@dataclass(frozen=True)
class SamplingParams:
    """temperature 0 is greedy; top_p in (0, 1] keeps the smallest set of tokens whose mass reaches it.

    max_tokens: tokens to generate; stop: strings that end the output (not included in it);
    ignore_eos: keep generating past the end-of-sequence token (benchmarks).
    """

    max_tokens: int = 16
    temperature: float = 0.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        _check(isinstance(self.max_tokens, int) and self.max_tokens >= 1,
               f"max_tokens={self.max_tokens!r}: must be an integer >= 1.")
        _check(0.0 <= self.temperature <= 100.0, f"temperature={self.temperature!r}: must be in [0, 100].")
        _check(0.0 < self.top_p <= 1.0, f"top_p={self.top_p!r}: must be in (0, 1].")
        _check(all(isinstance(s, str) and s for s in self.stop),
               f"stop={self.stop!r}: stop strings must be non-empty strings.")
        _check(len(self.stop) <= 16, f"stop has {len(self.stop)} strings: at most 16 are accepted.")
