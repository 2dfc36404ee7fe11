"""The serving engine: schedule a step, run it on the device, read back the tokens of the step before.

    engine = Engine.from_pretrained("path/to/llama", EngineConfig(...), adapter_dir="adapters/")
    outs = engine.generate([Request([1, 2, 3], adapter="a", params=SamplingParams(max_tokens=8)), ...])

One `step()`:
  1. take new requests and aborts from other threads (`add_request` / `abort` are thread-safe);
  2. `Scheduler.schedule()` picks a prefill of admitted requests or a decode of the running rows;
  3. the step is launched without waiting: prefill builds its inputs on the host; decode replays a CUDA graph
     over the persistent batch (`batch.py`), then samples and advances the rows on the device; the sampled
     tokens are copied to pinned host memory behind an event;
  4. the previous step's tokens are read back (its event has usually passed, since the device was busy with it
     while the host scheduled this one), appended, checked for EOS / stop strings / max_tokens, and reported.
So the host's work for step n + 1 overlaps the device's work for step n; a request that stops costs one
discarded token of the step launched meanwhile.
"""

from __future__ import annotations

import dataclasses
import itertools
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import torch

from rankwise.serve.adapter_cache import AdapterCache, AdapterError
from rankwise.serve.batch import BatchState
from rankwise.serve.config import EngineConfig, SamplingParams
from rankwise.serve.kv_cache import BlockAllocator, KVCache, blocks_needed
from rankwise.serve.lora_batch import block_t_for
from rankwise.serve.model import LlamaFamilyModel
from rankwise.serve.prefill import PrefillRunner
from rankwise.serve.sampling import find_stop, sample
from rankwise.serve.scheduler import Plan, Scheduler, Sequence, Status
from rankwise.serve.transfer import to_device

# LoRA site variants whose graphs warmup() captures: none, attention projections only, all four sites
_SITE_VARIANTS = (None, (True, True, False, False), (True, True, True, True))


class QueueFullError(RuntimeError):
    """More requests are waiting or running than `EngineConfig.max_queue` (HTTP 429)."""


@dataclass
class Request:
    prompt: list[int]
    adapter: str | None = None
    params: SamplingParams = dataclasses.field(default_factory=SamplingParams)
    request_id: str | None = None


@dataclass
class RequestOutput:
    request_id: str
    adapter: str | None
    prompt_ids: list[int]
    output_ids: list[int]
    new_ids: list[int]
    finished: bool
    finish_reason: str | None = None
    error: str | None = None
    text: str | None = None
    arrival_time: float = 0.0
    first_token_time: float | None = None
    finish_time: float | None = None


@dataclass
class _InFlight:
    kind: str
    records: list[tuple[Sequence, int, int]]   # (sequence, its epoch at launch, index in host buffer)
    host: torch.Tensor
    event: object


def _resolve(config: EngineConfig, hf_dtype: torch.dtype) -> tuple[torch.device, torch.dtype]:
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if config.device == "auto" else config.device)
    if config.dtype != "auto":
        return device, getattr(torch, config.dtype)
    if device.type == "cpu":
        return device, torch.float32
    return device, hf_dtype if hf_dtype in (torch.bfloat16, torch.float16) else torch.bfloat16


class Engine:
    def __init__(self, hf_model, config: EngineConfig | None = None, adapter_dir: str | Path | None = None,
                 tokenizer=None, eos_token_ids: tuple[int, ...] | None = None):
        config = config or EngineConfig()
        device, dtype = _resolve(config, next(hf_model.parameters()).dtype)
        spec_limit = getattr(hf_model.config, "max_position_embeddings", 4096)
        if config.max_model_len == 0:
            config = dataclasses.replace(config, max_model_len=min(spec_limit, 4096))
        if config.max_model_len > spec_limit:
            raise ValueError(f"max_model_len={config.max_model_len} exceeds the model's max_position_embeddings="
                             f"{spec_limit}; lower --max-model-len.")
        window = getattr(hf_model.config, "sliding_window", None)
        if window and getattr(hf_model.config, "use_sliding_window", True) and config.max_model_len > window:
            raise ValueError(f"max_model_len={config.max_model_len} exceeds the model's sliding_window={window}, which "
                             f"the engine does not implement; use --max-model-len {window} or less.")
        cuda = device.type == "cuda"
        lora_backend = config.lora_backend if config.lora_backend != "auto" else ("triton" if cuda else "reference")
        head_dim = getattr(hf_model.config, "head_dim", None) or (
            hf_model.config.hidden_size // hf_model.config.num_attention_heads)
        pow2 = head_dim >= 16 and head_dim & (head_dim - 1) == 0
        attn_backend = config.attention_backend if config.attention_backend != "auto" else (
            "triton" if cuda and pow2 else "reference")
        self.config, self.device, self.dtype = config, device, dtype
        self.lora_backend, self.attention_backend = lora_backend, attn_backend
        self.model = LlamaFamilyModel.from_hf(hf_model, dtype, device, attn_backend, config.max_model_len)
        spec = self.model.spec
        bs = config.block_size
        per_block = KVCache.bytes_per_block(spec.num_layers, bs, spec.num_kv_heads, spec.head_dim, dtype)
        if config.num_kv_blocks:
            num_blocks = config.num_kv_blocks
        elif config.kv_cache_memory_gb:
            num_blocks = int(config.kv_cache_memory_gb * 2 ** 30 // per_block)
        else:
            num_blocks = config.max_num_seqs * blocks_needed(config.max_model_len, bs) + 1
        if num_blocks - 1 < blocks_needed(config.max_model_len, bs):
            raise ValueError(f"{num_blocks} KV blocks of {bs} tokens cannot hold one request of max_model_len="
                             f"{config.max_model_len}; raise num_kv_blocks / kv_cache_memory_gb or lower max_model_len.")
        self.kv = KVCache(spec.num_layers, num_blocks, bs, spec.num_kv_heads, spec.head_dim, dtype, device)
        self.layout = spec.lora_layout()
        self.adapters = AdapterCache(adapter_dir, self.layout, dtype, device, max_gpu_adapters=config.max_gpu_adapters,
                                     lora_pool_mb=config.lora_pool_mb, max_host_adapters=config.max_host_adapters,
                                     max_lora_rank=config.max_lora_rank, base_weight=self.model.base_weight,
                                     load_threads=config.adapter_load_threads)
        self.scheduler = Scheduler(config, BlockAllocator(num_blocks), self.adapters)
        self.block_t = block_t_for(lora_backend)
        self.r_cap = 3 * config.max_lora_rank
        # on CUDA each site's LoRA shrink runs on a side stream beside the base GEMM, or before / after it on one
        # stream (EngineConfig.lora_order; model.py, `_linear`)
        order = "side" if config.lora_order == "auto" else config.lora_order
        side = torch.cuda.Stream(device) if cuda and lora_backend == "triton" and order == "side" else None
        self._lora_common = dict(tables=self.adapters.tables, pool=self.adapters.pool, layout=self.layout,
                                 max_lora_rank=config.max_lora_rank, backend=lora_backend, stream=side,
                                 order=order if side is not None or order != "side" else "shrink_first")
        use_graphs = cuda and config.cuda_graphs and attn_backend == "triton" and lora_backend == "triton"
        decode_ctx = dict(self._lora_common, order="shrink_first") if config.lora_order == "auto" else self._lora_common
        self.batch = BatchState(self.model, self.kv, decode_ctx, config.max_num_seqs,
                                blocks_needed(config.max_model_len, bs), self.block_t, self.r_cap, use_graphs)
        self.prefill_multiple = config.prefill_token_multiple or (64 if cuda else 1)
        self.prefill = PrefillRunner(self.model, self.kv, self._lora_common, config.max_num_seqs,
                                     config.max_num_batched_tokens, self.prefill_multiple, self.block_t, use_graphs,
                                     self.batch.graph_pool)
        self.tokenizer = tokenizer
        if eos_token_ids is None:
            eos = getattr(hf_model.generation_config, "eos_token_id", None) if getattr(
                hf_model, "generation_config", None) is not None else None
            eos = eos if eos is not None else getattr(hf_model.config, "eos_token_id", None)
            eos_token_ids = tuple(eos) if isinstance(eos, (list, tuple)) else ((eos,) if eos is not None else ())
        self.eos_token_ids = frozenset(eos_token_ids)
        self.generator = torch.Generator(device=device).manual_seed(config.seed)
        self._inflight: deque[_InFlight] = deque()
        self._intake: deque[Sequence] = deque()
        self._aborts: deque[str] = deque()
        self._by_id: dict[str, Sequence] = {}
        self._lock = threading.Lock()
        self._ids = itertools.count()
        self.counters = {"requests_finished": 0, "requests_failed": 0, "requests_aborted": 0, "generated_tokens": 0, "prompt_tokens": 0,
                         "steps_prefill": 0, "steps_decode": 0}

    @classmethod
    def from_pretrained(cls, model: str | Path, config: EngineConfig | None = None, adapter_dir=None,
                        tokenizer=None) -> Engine:
        """Load a local transformers checkpoint (and its tokenizer, when it has one)."""
        from transformers import AutoModelForCausalLM

        hf = AutoModelForCausalLM.from_pretrained(str(model), dtype="auto")
        if tokenizer is None:
            from rankwise.serve.tokenizer import load_tokenizer

            tokenizer = load_tokenizer(model)
        return cls(hf.eval(), config, adapter_dir, tokenizer)

    # ---- requests (any thread) --------------------------------------------------------------------------

    def add_request(self, request: Request, on_output=None) -> str:
        """Queue a request; raises ValueError (bad request), AdapterError (unknown adapter), QueueFullError."""
        prompt = list(request.prompt)
        if not prompt:
            raise ValueError("The prompt is empty; send at least one token.")
        vocab = self.model.spec.vocab
        if any(not isinstance(t, int) or not 0 <= t < vocab for t in prompt):
            raise ValueError(f"Prompt token ids must be integers in [0, {vocab}).")
        total = len(prompt) + request.params.max_tokens
        if total > self.config.max_model_len:
            raise ValueError(f"The prompt has {len(prompt)} tokens and max_tokens is {request.params.max_tokens}: "
                             f"{total} > max_model_len={self.config.max_model_len}. Shorten the prompt or lower "
                             "max_tokens.")
        if request.adapter is not None:
            self.adapters.resolve(request.adapter)
        rid = request.request_id or f"req-{next(self._ids)}"
        seq = Sequence(rid, prompt, request.adapter, request.params, on_output=on_output)
        with self._lock:
            if len(self._by_id) >= self.config.max_queue:
                raise QueueFullError(f"{len(self._by_id)} requests are queued or running (max_queue="
                                     f"{self.config.max_queue}); retry later.")
            if rid in self._by_id:
                raise ValueError(f"request_id {rid!r} is already in use.")
            self._by_id[rid] = seq
            self._intake.append(seq)
        return rid

    def abort(self, request_id: str) -> None:
        with self._lock:
            self._aborts.append(request_id)

    def num_requests(self) -> int:
        with self._lock:
            return len(self._by_id)

    def has_work(self) -> bool:
        return bool(self._intake or self._aborts or len(self.scheduler) or self._inflight)

    # ---- the step ---------------------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        outputs: list[RequestOutput] = []
        with self._lock:
            while self._intake:
                self.scheduler.add(self._intake.popleft())
            aborts = list(self._aborts)
            self._aborts.clear()
        for rid in aborts:
            seq = self._by_id.get(rid)
            if seq is not None and seq.status is not Status.FINISHED:
                self.scheduler.finish(seq, "abort")
                outputs.append(self._report(seq, []))
        self.adapters.poll()
        plan = self.scheduler.schedule()
        for seq in self.scheduler.finished_now:
            outputs.append(self._report(seq, []))
        self.scheduler.finished_now.clear()
        launched = self._launch(plan) if plan is not None else None
        if launched is None and not self._inflight and self.scheduler.waiting:
            time.sleep(0.001)  # waiting only for adapters on their way up: let the loader threads run
        if self._inflight:
            outputs += self._process(self._inflight.popleft())
        if launched is not None:
            self._inflight.append(launched)
        return outputs

    def _launch(self, plan: Plan) -> _InFlight:
        if plan.kind == "prefill":
            self.counters["steps_prefill"] += 1
            return self._launch_prefill(plan.seqs)
        self.counters["steps_decode"] += 1
        return self._launch_decode(plan.seqs)

    def _launch_prefill(self, seqs: list[Sequence]) -> _InFlight:
        dev, bs = self.device, self.config.block_size
        seqs = sorted(seqs, key=lambda s: s.slot)
        ids, pos, slots, token_slots, lens = [], [], [], [], []
        for seq in seqs:
            toks = seq.tokens_to_prefill()
            n = len(toks)
            ids += toks
            pos += range(n)
            slots += [seq.blocks[p // bs] * bs + p % bs for p in range(n)]
            token_slots += [seq.slot] * n
            lens.append(n)
            seq.num_cached, seq.num_launched = n, len(seq.output_ids) + 1
            self.counters["prompt_tokens"] += n
        self.batch.set_rows([s.row for s in seqs], [s.blocks for s in seqs])
        sites = self.adapters.site_mask() if any(s.slot >= 0 for s in seqs) else None
        hidden = self.prefill.run(ids, pos, slots, lens, token_slots, sites)    # (len(seqs), hidden)
        logits = self.model.logits(hidden)
        meta = to_device(torch.tensor([[s.row for s in seqs], lens], dtype=torch.int64), dev)
        greedy = all(s.params.temperature == 0 for s in seqs)
        if greedy:
            nxt = logits.argmax(dim=-1)
        else:
            params = to_device(torch.tensor([[s.params.temperature for s in seqs], [s.params.top_p for s in seqs]],
                                            dtype=torch.float32), dev)
            nxt = sample(logits, params[0], params[1], False, self.generator)
        self.batch.start_rows(meta[0], nxt, meta[1])
        return self._finish_launch("prefill", [(s, s.epoch, i) for i, s in enumerate(seqs)], nxt)

    def _launch_decode(self, seqs: list[Sequence]) -> _InFlight:
        self.batch.sync(self.scheduler)
        self.batch.site_mask = self.adapters.site_mask()
        B = next(b for b in self.config.buckets() if b > self.scheduler.max_row())
        nxt = self.batch.decode(B, self.generator)   # (B,) next tokens; the rows advanced on the device
        for seq in seqs:
            seq.num_cached += 1
            seq.num_launched += 1
        return self._finish_launch("decode", [(s, s.epoch, s.row) for s in seqs], nxt)

    def _finish_launch(self, kind: str, records, nxt: torch.Tensor) -> _InFlight:
        if self.device.type == "cuda":
            host = torch.empty(nxt.shape, dtype=torch.int64, pin_memory=True)
            host.copy_(nxt, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
        else:
            host, event = nxt.clone(), None
        return _InFlight(kind, records, host, event)

    def _process(self, done: _InFlight) -> list[RequestOutput]:
        if done.event is not None:
            done.event.synchronize()
        tokens = done.host.tolist()
        now = time.perf_counter()
        outputs = []
        for seq, epoch, index in done.records:
            if seq.status is not Status.RUNNING or seq.epoch != epoch:
                continue
            tok = tokens[index]
            seq.output_ids.append(tok)
            self.counters["generated_tokens"] += 1
            if seq.first_token_time is None:
                seq.first_token_time = now
            reason = None
            if tok in self.eos_token_ids and not seq.params.ignore_eos:
                reason = "stop"
            elif seq.params.stop and self.tokenizer is not None:
                text = self.tokenizer.decode(seq.output_ids)
                cut = find_stop(text, seq.params.stop)
                if cut >= 0:
                    reason, seq.text = "stop", text[:cut]
            if reason is None and (len(seq.output_ids) >= seq.params.max_tokens
                                   or len(seq.prompt_ids) + len(seq.output_ids) >= self.config.max_model_len):
                reason = "length"
            if reason is not None:
                self.scheduler.finish(seq, reason)
            outputs.append(self._report(seq, [tok]))
        return outputs

    def _report(self, seq: Sequence, new_ids: list[int]) -> RequestOutput:
        finished = seq.status is Status.FINISHED
        if finished:
            with self._lock:
                self._by_id.pop(seq.request_id, None)
            key = {"error": "requests_failed", "abort": "requests_aborted"}.get(seq.finish_reason, "requests_finished")
            self.counters[key] += 1
            if seq.text is None and self.tokenizer is not None and seq.output_ids:
                ids = seq.output_ids
                if seq.finish_reason == "stop" and ids[-1] in self.eos_token_ids:
                    ids = ids[:-1]
                seq.text = self.tokenizer.decode(ids)
        out = RequestOutput(seq.request_id, seq.adapter, seq.prompt_ids, list(seq.output_ids), new_ids, finished,
                            seq.finish_reason, seq.error, seq.text if finished else None, seq.arrival_time,
                            seq.first_token_time, seq.finish_time)
        if seq.on_output is not None:
            seq.on_output(out)
        return out

    def fail_all(self, message: str) -> list[RequestOutput]:
        """End every request with an error (after the device step raised); the engine can take new ones."""
        self._inflight.clear()
        with self._lock:
            seqs = list(self._by_id.values())
            self._intake.clear()
        outputs = []
        for seq in seqs:
            if seq.status is not Status.FINISHED:
                self.scheduler.finish(seq, "error", error=message)
                outputs.append(self._report(seq, []))
        return outputs

    # ---- convenience ------------------------------------------------------------------------------------

    def generate(self, requests: list[Request]) -> list[RequestOutput]:
        """Run `requests` to completion (continuous batching) and return their final outputs in order."""
        ids = [self.add_request(r) for r in requests]
        final: dict[str, RequestOutput] = {}
        while len(final) < len(ids):
            for out in self.step():
                if out.finished:
                    final[out.request_id] = out
        while self._inflight:
            self._process(self._inflight.popleft())
        return [final[i] for i in ids]

    def preload(self, names: list[str], on_device: bool = False) -> None:
        """Read and pack adapters into host memory now (in parallel); with `on_device`, also copy them into
        device slots (as many as fit) and wait. Call before serving, not while a runner steps the engine."""
        self.adapters.prefetch(names)
        if on_device:
            for name in names[: self.config.max_gpu_adapters]:
                while self.adapters.acquire(name) is None:
                    time.sleep(0.0005)
                self.adapters.release(name)

    def warmup(self) -> None:
        """Before serving: capture the CUDA graphs of every prefill size and decode batch size, with no LoRA, LoRA
        on q/k/v/o and LoRA on all sites, greedy and sampled decode (Triton compiles its kernels, cuBLAS settles
        its algorithms), so that no request pays for it."""
        if self.device.type != "cuda":
            return
        if self.lora_backend == "triton":  # the decode steps' LoRA launch shapes, timed once per process
            from rankwise.serve.kernels.triton_lora_rows import tune_rows

            L = self.layout
            self.batch.lora_launch = tuple(
                tune_rows(L.site_in[s], tuple(b - a for a, b in zip(L.part_cols[s], L.part_cols[s][1:])),
                          self.config.max_num_seqs, self.config.max_lora_rank, self.dtype, self.device)
                for s in range(4))
        self._tune_decode_gemms()
        self._warm_prefill()
        if self.batch.use_graphs:
            for b in self.config.buckets():
                for sites in _SITE_VARIANTS:
                    for greedy in (True, False):
                        self.batch.capture(b, sites, greedy)
        torch.cuda.synchronize()

    def _tune_decode_gemms(self) -> None:
        """Per weight, the skinny Triton GEMM (`kernels/triton_gemm.py`) for decode steps where it beats cuBLAS at
        max_num_seqs rows, the gate/up GEMM with the SiLU-mul fused, and split-K o / down projections reduced in the
        add + RMSNorm after them, each where it is faster (bf16 / fp16 models with Triton attention)."""
        M = self.config.max_num_seqs
        if self.attention_backend != "triton" or self.dtype not in (torch.bfloat16, torch.float16) or M > 64:
            return
        from rankwise.serve.kernels.triton_gemm import tune_skinny, tune_split

        w, spec = self.model.w, self.model.spec
        layers = lambda k: [w[f"{i}.{k}"] for i in range(spec.num_layers)]  # noqa: E731
        choice = {k: tune_skinny(layers(k), M, False) for k in ("qkv", "o", "gu", "d")}
        if spec.hidden_act == "silu":
            choice["gu_silu"] = tune_skinny(layers("gu"), M, True)
        # o and down feed the residual add + RMSNorm, which can take their split-K parts (no reduce kernel); chosen
        # by timing the layers' whole GEMM chain with the launches chosen above
        if "0.o_b" not in w and "0.d_b" not in w:
            chain = [{**{k: w[f"{i}.{k}"] for k in ("qkv", "o", "gu", "d", "ln2")},
                      "ln_next": w[f"{i + 1}.ln1" if i + 1 < spec.num_layers else "norm"]}
                     for i in range(spec.num_layers)]
            split = tune_split(chain, M, spec.rms_eps, {k: v for k, v in choice.items() if v is not None})
            choice["o_split"] = choice["d_split"] = split
        self.model.decode_gemm = {k: v for k, v in choice.items() if v is not None}
        self.model.decode_gemm_rows = M

    def _warm_prefill(self) -> None:
        # scratch inputs name no adapter (every LoRA block has slot -1), so this is safe with adapters resident
        self.prefill.warm(list(_SITE_VARIANTS) if self.lora_backend == "triton" else [None])

    def stats(self) -> dict:
        s = self.scheduler
        return {"running": len(s.running), "waiting": len(s.waiting) + len(self._intake),
                "kv_blocks_free": s.allocator.num_free, "kv_blocks_total": s.allocator.num_blocks - 1,
                "adapters_on_device": self.adapters.resident_count(), "preemptions": s.num_preemptions,
                **self.counters, **{f"adapter_{k}": v for k, v in self.adapters.stats.items()}}

    def close(self) -> None:
        self.adapters.close()


__all__ = ["AdapterError", "Engine", "EngineConfig", "QueueFullError", "Request", "RequestOutput", "SamplingParams"]
