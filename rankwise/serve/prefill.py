"""Prefill steps on a fixed device buffer: padded to a few token counts, each replayed as a CUDA graph.

A prefill step runs whole prompts back to back (`LlamaFamilyModel.forward`). Launched eagerly it is ~10 kernels
per layer plus one LoRA kernel per adapted site, each costing Python and driver time, so a step of a few hundred
tokens took as long to issue on the host as to run on the device (12 ms for ~300 tokens on an H100, 16-24 ms with
adapters). Here the host packs the step's inputs into one int64 vector, copies it to a persistent device buffer in
one transfer, and replays the forward from a CUDA graph captured per (padded token count, LoRA sites in use).
Everything that varies between steps of one size is read from that buffer on the device: prompt boundaries
(`seq_start`, for the varlen attention kernel), the adapter grouping of the tokens (LoRA blocks, padded to a fixed
count), cache slots. Steps longer than the largest size (a long prompt runs alone) run the same code eagerly.
Measured (docs/BENCHMARKS.md, Serving): ~290-token steps take 2.1 ms of device time and 1.0 ms to issue, 2.6 ms
with adapters.

Buffer layout for a step of T tokens, NB = T // block_t + R LoRA blocks (each of at most R prompts adds at most
one partial block) and R = max_num_seqs:

    ids (T) | positions (T) | slots (T) | seq_start (T) | tok_idx (T) | blk_start, blk_end, blk_slot (3 NB) | last (R)

last[i] is the index of the last token of prompt i; the graph writes those tokens' final hidden states to
`hidden_last` (R, hidden), which the engine turns into logits and samples.
"""

from __future__ import annotations

import itertools

import torch

from rankwise.serve.lora_batch import LoraStep, lora_workspace, plan_blocks
from rankwise.serve.model import AttnBatch, LlamaFamilyModel, LoraContext, seq_starts


def prefill_sizes(max_tokens: int, multiple: int) -> list[int]:
    """Token counts prefill steps are padded to: multiples of `multiple` up to 16 of them, then multiples of
    4 x `multiple` (a step beyond that wastes at most a fifth on padding), up to max_tokens rounded up."""
    top = -(-max_tokens // multiple) * multiple
    out, T = [], multiple
    while T < top:
        out.append(T)
        T += multiple if T < 16 * multiple else 4 * multiple
    return out + [top]


class PrefillRunner:
    def __init__(self, model: LlamaFamilyModel, kv, lora_ctx: dict, max_num_seqs: int, max_tokens: int,
                 multiple: int, block_t: int, use_graphs: bool, graph_pool=None):
        self.model, self.kv, self.lora_ctx = model, kv, lora_ctx
        self.R, self.block_t, self.multiple = max_num_seqs, block_t, multiple
        self.sizes = prefill_sizes(max_tokens, multiple)
        self.use_graphs = use_graphs
        dev = model.device
        self.buf = torch.zeros(self._length(self.sizes[-1]), dtype=torch.int64, device=dev)
        self.hidden_last = torch.zeros((max_num_seqs, model.spec.hidden), dtype=model.dtype, device=dev)
        self.graphs: dict[tuple, torch.cuda.CUDAGraph] = {}
        self._graph_pool = graph_pool
        # per site, a `triton_lora.LoraLaunch` for the Triton LoRA kernels of prefill steps; None: the defaults for
        # the step's size. An experiment knob (bench/decode_profile.py compares shapes); graphs captured before a
        # change keep the launch they were captured with, so clear `graphs` after setting it (block_t likewise)
        self.lora_launch: tuple | None = None

    def num_blocks(self, T: int) -> int:
        return T // self.block_t + self.R

    def _length(self, T: int) -> int:
        return 5 * T + 3 * self.num_blocks(T) + self.R

    def padded(self, n: int) -> int:
        """The token count a step of n tokens runs at: the next size, or (beyond the sizes) the next multiple."""
        if self.multiple == 1 or n > self.sizes[-1]:
            return -(-n // self.multiple) * self.multiple
        return next(T for T in self.sizes if T >= n)

    # ---- one step ---------------------------------------------------------------------------------------

    def run(self, ids: list[int], positions: list[int], slots: list[int], lens: list[int], token_slots: list[int],
            sites: tuple[bool, ...] | None) -> torch.Tensor:
        """Hidden states (len(lens), hidden) of each prompt's last token; prompts back to back in ids / positions /
        slots (cache slots) / token_slots (adapter slot of each token, -1: none); sites: LoRA sites in use."""
        T = self.padded(len(ids))
        pad, NB = T - len(ids), self.num_blocks(T)
        if sites is None or not any(sites) or all(s < 0 for s in token_slots):
            sites = None
            order, blocks = list(range(T)), [0] * (2 * NB) + [-1] * NB
        else:
            order, starts, ends, blk_slots = plan_blocks(token_slots + [-1] * pad, self.block_t, num_blocks=NB)
            blocks = starts + ends + blk_slots
        last = [n - 1 for n in itertools.accumulate(lens)] + [0] * (self.R - len(lens))
        host = torch.tensor(ids + [0] * pad + positions + [0] * pad + slots + [0] * pad + seq_starts(lens, T)
                            + order + blocks + last, dtype=torch.int64)
        graph = self.use_graphs and T <= self.sizes[-1]
        if graph and (T, sites) not in self.graphs:
            self.capture(T, sites)
        buf = self.buf if T <= self.sizes[-1] else torch.empty(host.numel(), dtype=torch.int64, device=self.buf.device)
        buf[: host.numel()].copy_(host.pin_memory() if buf.is_cuda else host, non_blocking=True)
        if graph:
            self.graphs[(T, sites)].replay()
        else:
            self._forward(buf, T, sites, lens)
        return self.hidden_last[: len(lens)]

    def _forward(self, buf: torch.Tensor, T: int, sites: tuple[bool, ...] | None, lens: list[int] | None) -> None:
        """The step over buf's layout for T tokens; no host synchronisation (graph-safe when lens is None)."""
        NB, m = self.num_blocks(T), self.model
        ids, positions, slots = buf[:T], buf[T: 2 * T], buf[2 * T: 3 * T]
        meta = buf[3 * T: 5 * T + 3 * NB].to(torch.int32)
        blocks = meta[2 * T:].view(3, NB)
        last = buf[5 * T + 3 * NB: 5 * T + 3 * NB + self.R]
        lora = None
        if sites is not None:
            c = self.lora_ctx
            y = lora_workspace(c["backend"], max(c["layout"].site_in), NB, T, 3 * c["max_lora_rank"], buf.device,
                               launch=self.lora_launch)
            step = LoraStep(meta[T: 2 * T], blocks[0], blocks[1], blocks[2], y, self.block_t)
            lora = LoraContext(step=step, sites=sites, launch=self.lora_launch, **c)
        seq_start = meta[:T] if m.use_triton else None
        hidden = m.forward(ids, positions, self.kv, AttnBatch(slots, prefill_lens=lens, seq_start=seq_start), lora)
        self.hidden_last.copy_(hidden.index_select(0, last))

    # ---- warm-up and graphs -----------------------------------------------------------------------------

    def _fill_scratch(self, T: int) -> None:
        """Inputs that are safe to run at any time: token 0 at position 0 written to the scratch slot, no LoRA."""
        NB = self.num_blocks(T)
        self.buf.zero_()
        self.buf[5 * T + 2 * NB: 5 * T + 3 * NB] = -1

    def capture(self, T: int, sites: tuple[bool, ...] | None) -> None:
        """Record the prefill of T tokens (LoRA at `sites`, or none) after one eager run (Triton compiles, cuBLAS
        settles its algorithm) on scratch inputs; safe while requests run."""
        self._fill_scratch(T)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            self._forward(self.buf, T, sites, None)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._graph_pool):
            self._forward(self.buf, T, sites, None)
        self.graphs[(T, sites)] = graph

    def warm(self, site_variants: list[tuple[bool, ...] | None]) -> None:
        """Before serving: every size with every LoRA variant, as graphs (or, without graphs, one eager run per
        size, with LoRA at the smallest and largest: the kernels compile and return at once on scratch inputs)."""
        for T in self.sizes:
            for sites in site_variants:
                if self.use_graphs:
                    if (T, sites) not in self.graphs:
                        self.capture(T, sites)
                elif sites is None or T in (self.sizes[0], self.sizes[-1]):
                    self._fill_scratch(T)
                    self._forward(self.buf, T, sites, [T])
