"""Continuous batching: a state machine over a waiting queue and the running rows.

    WAITING --admit (row, KV blocks, adapter resident)--> RUNNING --stop / length / abort--> FINISHED
       ^                                                     |
       +------------- preempt (out of KV blocks: recompute) -+

Each call of `schedule()` returns one step: a *prefill* of newly admitted requests when any can be admitted
(first come, first served; a request whose adapter is still on its way to the device is passed over, not waited
for), otherwise a *decode* of every running row. A decode that needs a new KV block when none is free preempts
the most recently admitted request (its blocks are freed; it is recomputed from prompt + generated tokens when
admitted again), as vLLM does. Each running request keeps one row of the batch (its place in the persistent
device buffers) from admission to the end; `version` changes whenever the set of rows does.

Tokens are counted two ways because the engine launches step n + 1 before reading the tokens of step n:
`num_cached` / `num_launched` count what launched steps will have written / generated, `output_ids` what has
been read back. A request preempted or finished meanwhile bumps `epoch`, so late results are dropped.
"""

from __future__ import annotations

import enum
import heapq
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from rankwise.serve.adapter_cache import AdapterCache, AdapterError
from rankwise.serve.config import EngineConfig, SamplingParams
from rankwise.serve.kv_cache import BlockAllocator, blocks_needed


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    request_id: str
    prompt_ids: list[int]
    adapter: str | None
    params: SamplingParams
    arrival_time: float = field(default_factory=time.perf_counter)
    on_output: Callable | None = None
    output_ids: list[int] = field(default_factory=list)
    status: Status = Status.WAITING
    row: int = -1
    slot: int = -1              # adapter slot on the device while running (-1: base model)
    blocks: list[int] = field(default_factory=list)
    num_cached: int = 0
    num_launched: int = 0
    epoch: int = 0
    finish_reason: str | None = None
    error: str | None = None
    text: str | None = None
    first_token_time: float | None = None
    finish_time: float | None = None
    num_preemptions: int = 0

    def tokens_to_prefill(self) -> list[int]:
        return self.prompt_ids + self.output_ids


@dataclass
class Plan:
    kind: str                   # "prefill" | "decode"
    seqs: list[Sequence]


class Scheduler:
    def __init__(self, config: EngineConfig, allocator: BlockAllocator, adapters: AdapterCache | None):
        self.config = config
        self.allocator = allocator
        self.adapters = adapters
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []          # in admission order
        self._free_rows = list(range(config.max_num_seqs))
        self.version = 0
        self.block_updates: list[tuple[int, int, int]] = []   # (row, index, block) for the device block table
        self.finished_now: list[Sequence] = []                # finished by the scheduler itself (adapter errors)
        self.num_preemptions = 0

    def __len__(self) -> int:
        return len(self.waiting) + len(self.running)

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def max_row(self) -> int:
        return max((s.row for s in self.running), default=-1)

    # ---- one step ---------------------------------------------------------------------------------------

    def schedule(self) -> Plan | None:
        admitted = self._admit()
        if admitted:
            return Plan("prefill", admitted)
        seqs = self._grow([s for s in self.running if s.num_launched < s.params.max_tokens])
        return Plan("decode", seqs) if seqs else None

    def _admit(self) -> list[Sequence]:
        cfg, bs = self.config, self.config.block_size
        admitted: list[Sequence] = []
        tokens = 0
        for seq in list(self.waiting):
            if not self._free_rows:
                break
            n = len(seq.prompt_ids) + len(seq.output_ids)
            if admitted and tokens + n > cfg.max_num_batched_tokens:
                break
            need = blocks_needed(n, bs)
            if not self.allocator.can_allocate(need + len(self.running)):  # keep a block per running row
                break
            if seq.adapter is not None:
                try:
                    slot = self.adapters.acquire(seq.adapter)
                except AdapterError as exc:
                    self.waiting.remove(seq)
                    self._finish(seq, "error", error=str(exc))
                    self.finished_now.append(seq)
                    continue
                if slot is None:
                    continue  # still loading or no free device slot: let later requests go first
                seq.slot = slot
            else:
                seq.slot = -1
            self.waiting.remove(seq)
            seq.row = heapq.heappop(self._free_rows)
            seq.blocks = self.allocator.allocate(need)
            seq.status = Status.RUNNING
            self.running.append(seq)
            admitted.append(seq)
            tokens += n
        if admitted:
            self.version += 1
        return admitted

    def _grow(self, seqs: list[Sequence]) -> list[Sequence]:
        """Give every decoding row a block for its next token, preempting the newest requests if needed."""
        bs = self.config.block_size
        for seq in seqs:
            if seq.status is not Status.RUNNING or seq.num_cached // bs < len(seq.blocks):
                continue
            while not self.allocator.can_allocate(1):
                victim = self.running[-1]
                self.preempt(victim)
                if victim is seq:
                    break
            if seq.status is Status.RUNNING:
                block = self.allocator.allocate(1)[0]
                self.block_updates.append((seq.row, len(seq.blocks), block))
                seq.blocks.append(block)
        return [s for s in seqs if s.status is Status.RUNNING]

    # ---- transitions ------------------------------------------------------------------------------------

    def _release(self, seq: Sequence) -> None:
        self.allocator.free(seq.blocks)
        seq.blocks = []
        if seq.adapter is not None and seq.slot >= 0:
            self.adapters.release(seq.adapter)
        seq.slot = -1
        heapq.heappush(self._free_rows, seq.row)
        seq.row = -1
        self.running.remove(seq)
        seq.epoch += 1
        self.version += 1

    def preempt(self, seq: Sequence) -> None:
        """Free `seq`'s row and blocks and put it first in line; it is recomputed when admitted again."""
        self._release(seq)
        seq.status = Status.WAITING
        seq.num_cached, seq.num_launched = 0, len(seq.output_ids)
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)

    def finish(self, seq: Sequence, reason: str, error: str | None = None) -> None:
        if seq.status is Status.RUNNING:
            self._release(seq)
        elif seq.status is Status.WAITING and seq in self.waiting:
            self.waiting.remove(seq)
        self._finish(seq, reason, error)

    def _finish(self, seq: Sequence, reason: str, error: str | None = None) -> None:
        seq.status = Status.FINISHED
        seq.finish_reason, seq.error = reason, error
        seq.finish_time = time.perf_counter()
        seq.epoch += 1
