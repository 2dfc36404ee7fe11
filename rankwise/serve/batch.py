"""The persistent batch: device buffers that hold the running rows between steps, and decode CUDA graphs.

A request keeps its row from admission to the end, so a decode step needs no per-step host-to-device copy:
the next input token is the previous step's sample (written on the device), positions advance on the device,
and the slot each new key/value goes to is computed on the device from the block table. The host uploads only
what changed: a new block for a row (every `block_size` tokens) and, when the set of rows changes, the active
mask, sampling settings and the LoRA grouping of the rows. That makes a decode step a fixed sequence of kernels
on fixed buffers, which is captured once per (padded batch size, LoRA sites in use, greedy or not) as a CUDA graph
and replayed; kernels that depend on lengths (paged attention, LoRA blocks) read them from the device, so one graph
serves any lengths and any adapter mix. When every row is greedy the graph also takes the argmax of the logits
(in the model dtype: the same token as in float32, one pass over the vocabulary fewer; `greedy_advance`) and
advances the rows, so the step is one replay; sampled rows get their logits in float32 and `sample` runs after it.
"""

from __future__ import annotations

import torch

from rankwise.serve.kernels.reference import greedy_advance_ref
from rankwise.serve.lora_batch import LoraStep, lora_workspace, plan_blocks
from rankwise.serve.model import AttnBatch, LlamaFamilyModel, LoraContext
from rankwise.serve.sampling import sample
from rankwise.serve.scheduler import Scheduler
from rankwise.serve.transfer import to_device


class BatchState:
    def __init__(self, model: LlamaFamilyModel, kv, lora_ctx: dict | None, max_num_seqs: int, max_blocks: int,
                 block_t: int, r_cap: int, use_graphs: bool):
        R, dev = max_num_seqs, model.device
        self.model, self.kv, self.R, self.block_t = model, kv, R, block_t
        self.lora_ctx = lora_ctx  # tables, pool, layout, max_lora_rank, backend, stream (no step)
        self.tokens = torch.zeros(R, dtype=torch.int64, device=dev)        # (R,) next input token of each row
        self.positions = torch.zeros(R, dtype=torch.int64, device=dev)     # (R,) its position
        self.active = torch.zeros(R, dtype=torch.bool, device=dev)
        self.block_tables = torch.zeros((R, max_blocks), dtype=torch.int32, device=dev)
        self.temperature = torch.zeros(R, dtype=torch.float32, device=dev)
        self.top_p = torch.ones(R, dtype=torch.float32, device=dev)
        self.l_meta = torch.zeros((4, R), dtype=torch.int32, device=dev)   # tok_idx, blk_start, blk_end, blk_slot
        self.l_meta[3] = -1
        self.l_rows = torch.full((R,), -1, dtype=torch.int32, device=dev)  # adapter slot per row (row-form kernels)
        self.l_y = None if lora_ctx is None else lora_workspace(lora_ctx["backend"], max(lora_ctx["layout"].site_in),
                                                                  R, R, r_cap, dev, tuned=True)
        self.lora_launch: tuple | None = None  # per site, the RowLaunch tuned for decode steps (Engine.warmup)
        self.version = -1
        self.any_lora = False
        self.all_greedy = True
        self.use_graphs = use_graphs
        self.graphs: dict[tuple, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.site_mask = (False,) * 4  # set by the engine from the adapter cache before each decode
        self.graph_pool = torch.cuda.graph_pool_handle() if use_graphs else None  # shared with the prefill graphs

    # ---- host -> device updates ------------------------------------------------------------------------

    def sync(self, scheduler: Scheduler) -> None:
        """Upload new blocks and, if the set of rows changed, the per-row settings and LoRA grouping."""
        if scheduler.block_updates:
            rows, cols, vals = zip(*scheduler.block_updates)
            upd = to_device(torch.tensor([rows, cols, vals], dtype=torch.int64), self.block_tables.device)
            self.block_tables[upd[0], upd[1]] = upd[2].to(torch.int32)
            scheduler.block_updates.clear()
        if scheduler.version == self.version:
            return
        self.version = scheduler.version
        R = self.R
        active, temp, top_p, slots = [False] * R, [0.0] * R, [1.0] * R, [-1] * R
        for seq in scheduler.running:
            active[seq.row], temp[seq.row], top_p[seq.row], slots[seq.row] = (
                True, seq.params.temperature, seq.params.top_p, seq.slot)
        order, starts, ends, blk_slots = plan_blocks(slots, self.block_t, num_blocks=R)
        dev = self.l_meta.device
        self.l_meta.copy_(to_device(torch.tensor([order, starts, ends, blk_slots], dtype=torch.int32), dev))
        self.l_rows.copy_(to_device(torch.tensor(slots, dtype=torch.int32), dev))
        self.active.copy_(to_device(torch.tensor(active), dev))
        self.temperature.copy_(to_device(torch.tensor(temp, dtype=torch.float32), dev))
        self.top_p.copy_(to_device(torch.tensor(top_p, dtype=torch.float32), dev))
        self.any_lora = any(s >= 0 for s in slots)
        self.all_greedy = all(t == 0.0 for t, a in zip(temp, active) if a)

    def set_rows(self, rows: list[int], blocks: list[list[int]]) -> None:
        """Write the block tables of newly admitted rows."""
        table = torch.zeros((len(rows), self.block_tables.shape[1]), dtype=torch.int32)
        for i, b in enumerate(blocks):
            table[i, : len(b)] = torch.tensor(b, dtype=torch.int32)
        dev = self.block_tables.device
        self.block_tables[to_device(torch.tensor(rows, dtype=torch.int64), dev)] = to_device(table, dev)

    # ---- decode ----------------------------------------------------------------------------------------

    def _decode_forward(self, B: int, sites: tuple[bool, ...] | None, greedy: bool) -> torch.Tensor:
        """Rows [0, B): next tokens (B,) with the rows advanced if `greedy`, else float32 logits (B, vocab); only
        device tensors, no host synchronisation (graph-safe)."""
        bs = self.kv.block_size
        pos = self.positions[:B]
        active = self.active[:B]
        tables = self.block_tables[:B]
        if self.model.use_triton:  # the attention kernel finds each row's slot and length in its block table
            attn = AttnBatch(None, block_tables=tables, active=active)
        else:
            block = tables.gather(1, (pos // bs)[:, None])[:, 0].to(torch.int64)
            slot_mapping = torch.where(active, block * bs + pos % bs, pos % bs)  # idle rows: scratch block 0
            context_lens = torch.where(active, pos + 1, 0).to(torch.int32)
            attn = AttnBatch(slot_mapping, block_tables=tables, context_lens=context_lens)
        ctx = None
        if sites is not None:
            rows = self.l_rows[:B] if self.lora_ctx["backend"] == "triton" else None  # row-form kernels
            step = LoraStep(self.l_meta[0, :B], self.l_meta[1, :B], self.l_meta[2, :B], self.l_meta[3, :B],
                            self.l_y[:, :B], self.block_t, rows)
            ctx = LoraContext(step=step, sites=sites, launch=self.lora_launch, **self.lora_ctx)
        hidden = self.model.forward(self.tokens[:B], pos, self.kv, attn, ctx)
        if not greedy:
            return self.model.logits(hidden)
        logits = hidden @ self.model.w["lm_head"].t()                    # (B, vocab) model dtype
        if self.model.use_triton:
            from rankwise.serve.kernels.triton_sampling import greedy_advance

            return greedy_advance(logits, self.tokens[:B], self.positions[:B], active)
        return greedy_advance_ref(logits, self.tokens[:B], self.positions[:B], active)

    def decode(self, B: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """One decode step of rows [0, B) (replaying the graph of (B, LoRA sites in use, greedy) if graphs are
        on): returns the next tokens (B,) and advances the rows."""
        use = self.any_lora and self.lora_ctx is not None and any(self.site_mask)
        key = (B, self.site_mask if use else None, self.all_greedy)
        if not self.use_graphs:
            out = self._decode_forward(*key)
        else:
            if key not in self.graphs:
                self.capture(*key)
            graph, out = self.graphs[key]
            graph.replay()
        if self.all_greedy:
            return out
        nxt = sample(out, self.temperature[:B], self.top_p[:B], False, generator)
        self.advance(B, nxt)
        return nxt

    def capture(self, B: int, sites: tuple[bool, ...] | None, greedy: bool) -> None:
        """Record the decode step of batch size B (LoRA at `sites`, or none) as a CUDA graph, after warm-up runs
        that compile the kernels. The warm-up writes keys/values only where the step itself will write them (or
        to the scratch block) and the rows' tokens and positions are restored after each, so capturing while
        requests run is safe."""
        saved = self.tokens.clone(), self.positions.clone()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                self._decode_forward(B, sites, greedy)
                self.tokens.copy_(saved[0])
                self.positions.copy_(saved[1])
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.graph_pool):
            out = self._decode_forward(B, sites, greedy)
        self.graphs[(B, sites, greedy)] = (graph, out)

    def advance(self, B: int, next_tokens: torch.Tensor) -> None:
        """After a decode step: each active row's next input is its sample, at the next position."""
        active = self.active[:B]
        self.tokens[:B] = torch.where(active, next_tokens, self.tokens[:B])
        self.positions[:B] += active.to(torch.int64)

    def start_rows(self, rows: torch.Tensor, next_tokens: torch.Tensor, lengths: torch.Tensor) -> None:
        """After a prefill: row r continues from its first sample at position len(prompt)."""
        self.tokens[rows] = next_tokens
        self.positions[rows] = lengths
