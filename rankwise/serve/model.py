"""A Llama-family decoder (Llama, Mistral, Qwen2, SmolLM2) over a paged KV cache, with batched LoRA.

The weights come from a transformers model; the math follows its modeling code line for line (RMSNorm in
float32, rotary tables taken from the model's own rotary module so any rope scaling is the same, SDPA scale
head_dim^-0.5), so outputs match transformers up to the order of floating-point sums. Differences that are
ours: q/k/v and gate/up run as one fused GEMM each, on the GPU the elementwise work runs in fused Triton kernels
(`kernels/triton_fused.py`, whose specification is the PyTorch code here), and every step works on a flat list
of tokens:

    prefill: tokens of whole prompts back to back; causal attention within each prompt
    decode:  one token per batch row; paged attention over the row's cached tokens

On the GPU path a decode layer's rotary embedding, cache write and attention are one kernel
(`paged_decode_attention_rope`), and prefill attention is one varlen kernel over the whole step
(`prefill_attention`), so that a step's kernels depend on its token count only (CUDA graphs, `prefill.py`).

Per layer, with x: (T, hidden):
    h = rms(x) ;  qkv = h W_qkv^T (+ LoRA) (+ b) ;  q, k <- rope(q, k) ;  cache <- k, v ;  a = attn(q, cache)
    x = x + a W_o^T (+ LoRA) ;  h = rms(x) ;  g, u = h W_gu^T (+ LoRA) ;  x = x + (act(g) * u) W_d^T (+ LoRA)
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from rankwise.serve.kernels.reference import paged_decode_attention_ref
from rankwise.serve.kv_cache import KVCache
from rankwise.serve.lora_batch import LoraLayout, LoraStep, LoraTables, lora_expand_site, lora_shrink_site

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")
# Not cuDNN's attention: it builds a plan per new sequence length (tens of ms), and every prompt length is new.
_PREFILL_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


@dataclass(frozen=True)
class ModelSpec:
    model_type: str
    num_layers: int
    hidden: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    rms_eps: float
    hidden_act: str
    max_positions: int
    sliding_window: int | None

    @property
    def q_out(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_out(self) -> int:
        return self.num_kv_heads * self.head_dim

    def lora_layout(self) -> LoraLayout:
        return LoraLayout.for_model(self.num_layers, self.hidden, self.q_out, self.kv_out, self.intermediate)


def spec_from_config(cfg) -> ModelSpec:
    model_type = getattr(cfg, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"model_type {model_type!r} is not supported by the serving engine; supported: "
                         f"{list(SUPPORTED_MODEL_TYPES)} (Llama, SmolLM2, Mistral, Qwen2 checkpoints).")
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    window = getattr(cfg, "sliding_window", None) if getattr(cfg, "use_sliding_window", True) else None
    return ModelSpec(model_type, cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads,
                     getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads, head_dim,
                     cfg.intermediate_size, cfg.vocab_size, cfg.rms_norm_eps, cfg.hidden_act,
                     cfg.max_position_embeddings, window)


@dataclass
class AttnBatch:
    """How the step's tokens attend. slot_mapping: (T,) int64 cache slots the new keys/values go to.
    Prefill: prefill_lens (python ints) split the tokens into prompts, tokens past their sum are padding; the GPU
    path reads the same split from seq_start (T,) int32 (`seq_starts`; derived from prefill_lens when absent).
    Decode: block_tables (B, max_blocks) int32 and context_lens (B,) int32 = positions + 1 (0 for a padded row);
    the GPU path reads active (B,) bool instead and computes the slots and lengths from the block table itself
    (slot_mapping and context_lens may then be None)."""

    slot_mapping: torch.Tensor | None
    prefill_lens: list[int] | None = None
    block_tables: torch.Tensor | None = None
    context_lens: torch.Tensor | None = None
    seq_start: torch.Tensor | None = None
    active: torch.Tensor | None = None


def seq_starts(lens: list[int], total: int) -> list[int]:
    """Index of the first token of each token's prompt, for prompts of `lens` back to back and padding up to
    `total` (each padding token a prompt of its own)."""
    out: list[int] = []
    for n in lens:
        out += [len(out)] * n
    return out + list(range(len(out), total))


@dataclass
class LoraContext:
    """Everything the LoRA kernels need besides the activations. stream: on CUDA, a side stream on which each site's
    shrink may run beside the base GEMM (both only read x); order: "side" (the shrink on `stream`, beside the GEMM),
    "shrink_first" or "gemm_first" (one stream: the shrink before or after the base GEMM; with programmatic
    dependent launch, `kernels/pdl.py`, a Triton kernel right after another prefetches its weights while that one
    finishes); launch: per site, a tuned `LoraLaunch` (None: default)."""

    step: LoraStep
    tables: LoraTables
    pool: torch.Tensor
    layout: LoraLayout
    max_lora_rank: int
    backend: str
    sites: tuple[bool, ...] = (True, True, True, True)   # sites some resident adapter uses; others are skipped
    stream: torch.cuda.Stream | None = None
    launch: tuple | None = None
    order: str = "side"


def _rms(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    dtype = x.dtype
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class LlamaFamilyModel:
    """Weights (fused per site) and the forward pass. Build with `from_hf`."""

    def __init__(self, spec: ModelSpec, weights: dict[str, torch.Tensor], cos: torch.Tensor, sin: torch.Tensor,
                 act, attention_backend: str):
        self.spec = spec
        self.w = weights
        self.cos, self.sin = cos, sin  # (max_positions, head_dim) model dtype
        self.act = act
        self.attention_backend = attention_backend
        # "triton": paged decode attention and the fused elementwise kernels (GPU); else the PyTorch reference
        self.use_triton = attention_backend == "triton"
        self.scale = spec.head_dim ** -0.5
        # weight key ("qkv", "o", "gu", "d"; "gu_silu": gate/up GEMM with the SiLU-mul fused) -> `SkinnyLaunch` of
        # the Triton GEMM used for steps of <= decode_gemm_rows tokens (decode); set by `Engine.warmup` where it beat
        # cuBLAS at that many rows (a shape tuned for 32 rows may not fit 64: shared memory)
        self.decode_gemm: dict = {}
        self.decode_gemm_rows = 0

    @property
    def dtype(self) -> torch.dtype:
        return self.w["embed"].dtype

    @property
    def device(self) -> torch.device:
        return self.w["embed"].device

    @classmethod
    def from_hf(cls, hf_model, dtype: torch.dtype, device: torch.device, attention_backend: str = "reference",
                max_positions: int | None = None) -> LlamaFamilyModel:
        """Copy (and fuse) the weights of a transformers *ForCausalLM of the Llama family."""
        from transformers.activations import ACT2FN

        spec = spec_from_config(hf_model.config)
        inner = hf_model.model

        def t(x: torch.Tensor | None) -> torch.Tensor | None:
            return None if x is None else x.detach().to(device=device, dtype=dtype).contiguous()

        w: dict[str, torch.Tensor] = {"embed": t(inner.embed_tokens.weight), "norm": t(inner.norm.weight),
                                      "lm_head": t(hf_model.lm_head.weight)}
        for i, layer in enumerate(inner.layers):
            att, mlp = layer.self_attn, layer.mlp
            w[f"{i}.ln1"] = t(layer.input_layernorm.weight)
            w[f"{i}.ln2"] = t(layer.post_attention_layernorm.weight)
            w[f"{i}.qkv"] = torch.cat([t(att.q_proj.weight), t(att.k_proj.weight), t(att.v_proj.weight)]).contiguous()
            if att.q_proj.bias is not None:
                w[f"{i}.qkv_b"] = torch.cat([t(att.q_proj.bias), t(att.k_proj.bias), t(att.v_proj.bias)])
            w[f"{i}.o"] = t(att.o_proj.weight)
            if att.o_proj.bias is not None:
                w[f"{i}.o_b"] = t(att.o_proj.bias)
            w[f"{i}.gu"] = torch.cat([t(mlp.gate_proj.weight), t(mlp.up_proj.weight)]).contiguous()
            if mlp.gate_proj.bias is not None:
                w[f"{i}.gu_b"] = torch.cat([t(mlp.gate_proj.bias), t(mlp.up_proj.bias)])
            w[f"{i}.d"] = t(mlp.down_proj.weight)
            if mlp.down_proj.bias is not None:
                w[f"{i}.d_b"] = t(mlp.down_proj.bias)
        n = max_positions or spec.max_positions
        rot = inner.rotary_emb
        with torch.no_grad():
            pos = torch.arange(n, device=rot.inv_freq.device)[None]
            cos, sin = rot(torch.zeros(1, dtype=torch.float32, device=rot.inv_freq.device), pos)
        return cls(spec, w, cos[0].to(device, dtype), sin[0].to(device, dtype), ACT2FN[spec.hidden_act],
                   attention_backend)

    def base_weight(self, layer: int, site: int, part: int) -> torch.Tensor:
        """(out, in) weight of one module (for DoRA's norms)."""
        key = ("qkv", "o", "gu", "d")[site]
        cols = self.spec.lora_layout().part_cols[site]
        return self.w[f"{layer}.{key}"][cols[part]: cols[part + 1]]

    # ---- forward ---------------------------------------------------------------------------------------

    def _matmul(self, x: torch.Tensor, key: str, weight: torch.Tensor) -> torch.Tensor:
        """x (T, in) @ weight^T: the tuned skinny Triton GEMM for decode-sized T, else cuBLAS."""
        launch = self.decode_gemm.get(key) if x.shape[0] <= self.decode_gemm_rows else None
        if launch is None:  # also without Triton installed (the CPU path)
            return x @ weight.t()
        from rankwise.serve.kernels.triton_gemm import matmul

        return matmul(x, weight, launch)

    def _linear(self, x: torch.Tensor, layer: int, site: int, key: str, lora: LoraContext | None) -> torch.Tensor:
        weight = self.w[f"{layer}.{key}"]
        if lora is None or not lora.sites[site]:
            out = self._matmul(x, key, weight)
        else:
            args = (lora.step, lora.tables, lora.pool, lora.layout, lora.max_lora_rank, lora.backend,
                    lora.launch[site] if lora.launch else None)
            if lora.stream is not None and lora.order == "side":  # fork: the shrink beside the GEMM; join
                main = torch.cuda.current_stream()
                lora.stream.wait_stream(main)
                with torch.cuda.stream(lora.stream):
                    lora_shrink_site(site, layer, x, *args)
                out = self._matmul(x, key, weight)
                main.wait_stream(lora.stream)
            elif lora.order == "gemm_first":
                out = self._matmul(x, key, weight)
                lora_shrink_site(site, layer, x, *args)
            else:
                lora_shrink_site(site, layer, x, *args)
                out = self._matmul(x, key, weight)
            lora_expand_site(site, layer, x, out, *args)
        bias = self.w.get(f"{layer}.{key}_b")
        return out if bias is None else out + bias

    def _linear_into_norm(self, x: torch.Tensor, layer: int, site: int, key: str, lora: LoraContext | None
                          ) -> torch.Tensor:
        """A projection whose output goes only into the residual add + RMSNorm: for decode-sized steps with a tuned
        split (`decode_gemm[key + "_split"]`), no LoRA at this site and no bias, its float32 split-K parts
        (S, T, out), which `add_rms` sums; otherwise `_linear`'s (T, out)."""
        split = self.decode_gemm.get(f"{key}_split") if x.shape[0] <= self.decode_gemm_rows else None
        if split is None or (lora is not None and lora.sites[site]) or f"{layer}.{key}_b" in self.w:
            return self._linear(x, layer, site, key, lora)
        from rankwise.serve.kernels.triton_gemm import skinny_partials

        return skinny_partials(x, self.w[f"{layer}.{key}"], **vars(split))

    def _attend(self, layer: int, qkv: torch.Tensor, positions: torch.Tensor, kv: KVCache,
                attn: AttnBatch) -> torch.Tensor:
        """Rotary, cache write and attention of the step's new tokens: qkv (T, q_out + 2 kv_out) -> (T, q_out)."""
        if self.use_triton and attn.block_tables is not None:
            from rankwise.serve.kernels.triton_attention import paged_decode_attention_rope

            active = attn.active if attn.active is not None else attn.context_lens > 0
            o = paged_decode_attention_rope(qkv, self.cos, self.sin, positions, active, kv.k[layer], kv.v[layer],
                                            attn.block_tables, self.scale, self.spec.num_heads,
                                            prefetch=self._prefetch(qkv.shape[0], f"{layer}.o"))
            return o.reshape(qkv.shape[0], -1)
        q, k, v = self._rope_and_store(layer, qkv, positions, kv, attn)
        return self._attention(layer, q, k, v, kv, attn)

    def _attention(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv: KVCache,
                   attn: AttnBatch) -> torch.Tensor:
        """q: (T, H, D), k, v: (T, H_kv, D) of the new tokens (already in the cache) -> (T, H * D)."""
        T = q.shape[0]
        if self.use_triton and attn.seq_start is not None:
            from rankwise.serve.kernels.triton_attention import prefill_attention

            return prefill_attention(q, k, v, attn.seq_start, self.scale).reshape(T, -1)
        if attn.prefill_lens is not None:
            outs = []
            start = 0
            for n in attn.prefill_lens:
                qs = q[start: start + n].transpose(0, 1)[None]   # (1, H, n, D)
                ks = k[start: start + n].transpose(0, 1)[None]   # (1, H_kv, n, D)
                vs = v[start: start + n].transpose(0, 1)[None]
                with sdpa_kernel(_PREFILL_BACKENDS):
                    o = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=self.scale,
                                                       enable_gqa=ks.shape[1] != qs.shape[1])
                outs.append(o[0].transpose(0, 1))                # (n, H, D)
                start += n
            if start < T:  # padding tokens (their keys went to the scratch block): zeros, never read
                outs.append(q.new_zeros((T - start,) + q.shape[1:]))
            return torch.cat(outs).reshape(T, -1)
        if self.use_triton:
            from rankwise.serve.kernels.triton_attention import paged_decode_attention

            o = paged_decode_attention(q, kv.k[layer], kv.v[layer], attn.block_tables, attn.context_lens, self.scale)
        else:
            o = paged_decode_attention_ref(q, kv.k[layer], kv.v[layer], attn.block_tables, attn.context_lens,
                                           self.scale)
        return o.reshape(T, -1)

    def _prefetch(self, rows: int, key: str) -> torch.Tensor | None:
        """The weight `key` for a decode-sized step's kernels to bring into L2 ahead of its GEMM
        (`kernels/l2_prefetch.py`, off unless enabled); None for larger steps, whose GEMMs are compute-bound."""
        return self.w.get(key) if self.use_triton and rows <= self.decode_gemm_rows else None

    def _add_norm(self, x: torch.Tensor, residual: torch.Tensor | None, key: str, prefetch: str | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
        """(rms(residual + x) * w, residual + x): transformers' residual add followed by the next RMSNorm.
        prefetch: the key of the weight the next GEMM reads (an L2 prefetch hint for decode steps)."""
        if self.use_triton:
            from rankwise.serve.kernels.triton_fused import add_rms

            pf = self._prefetch(x.shape[-2], prefetch) if prefetch is not None else None  # x may be split-K parts
            return add_rms(x, residual, self.w[key], self.spec.rms_eps, prefetch=pf)
        r = x if residual is None else residual + x
        return _rms(r, self.w[key], self.spec.rms_eps), r

    def _rope_and_store(self, layer: int, qkv: torch.Tensor, positions: torch.Tensor, kv: KVCache,
                        attn: AttnBatch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q, k rotated and k, v stored in the cache: (T, H, D), (T, H_kv, D), (T, H_kv, D)."""
        s, T = self.spec, qkv.shape[0]
        v = qkv[:, s.q_out + s.kv_out:].view(T, s.num_kv_heads, s.head_dim)
        if self.use_triton:
            from rankwise.serve.kernels.triton_fused import rope_kv

            q, k = rope_kv(qkv, self.cos, self.sin, positions, attn.slot_mapping, kv.k[layer], kv.v[layer],
                           s.num_heads)
            return q, k, v
        cos = self.cos[positions][:, None, :]                            # (T, 1, D)
        sin = self.sin[positions][:, None, :]
        q = qkv[:, : s.q_out].view(T, s.num_heads, s.head_dim)
        k = qkv[:, s.q_out: s.q_out + s.kv_out].view(T, s.num_kv_heads, s.head_dim)
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        kv.write(layer, attn.slot_mapping, k, v)
        return q, k, v

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv: KVCache, attn: AttnBatch,
                lora: LoraContext | None = None) -> torch.Tensor:
        """input_ids, positions: (T,) -> hidden states (T, hidden) after the final norm."""
        s = self.spec
        if self.use_triton and attn.prefill_lens is not None and attn.seq_start is None:
            starts = torch.tensor(seq_starts(attn.prefill_lens, input_ids.shape[0]), dtype=torch.int32)
            attn = dataclasses.replace(attn, seq_start=starts.to(input_ids.device))
        h, residual = self._add_norm(self.w["embed"][input_ids], None, "0.ln1", "0.qkv")   # (T, hidden)
        for i in range(s.num_layers):
            qkv = self._linear(h, i, 0, "qkv", lora)                     # (T, q_out + 2 kv_out)
            a = self._attend(i, qkv, positions, kv, attn)                # (T, q_out)
            h, residual = self._add_norm(self._linear_into_norm(a, i, 1, "o", lora), residual, f"{i}.ln2", f"{i}.gu")
            fused = self.decode_gemm.get("gu_silu") if h.shape[0] <= self.decode_gemm_rows else None
            if fused is not None and (lora is None or not lora.sites[2]) and f"{i}.gu_b" not in self.w:
                from rankwise.serve.kernels.triton_gemm import gate_up_silu

                m = gate_up_silu(h, self.w[f"{i}.gu"], **vars(fused))      # (T, intermediate)
            else:
                gu = self._linear(h, i, 2, "gu", lora)                   # (T, 2 intermediate)
                if self.use_triton and s.hidden_act == "silu":
                    from rankwise.serve.kernels.triton_fused import silu_mul

                    m = silu_mul(gu)
                else:
                    m = self.act(gu[:, : s.intermediate]) * gu[:, s.intermediate:]
            nxt = f"{i + 1}.ln1" if i + 1 < s.num_layers else "norm"
            h, residual = self._add_norm(self._linear_into_norm(m, i, 3, "d", lora), residual, nxt,
                                         f"{i + 1}.qkv" if i + 1 < s.num_layers else "lm_head")
        return h

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """(n, hidden) -> (n, vocab) float32."""
        return (hidden @ self.w["lm_head"].t()).float()
