"""Adapters on disk, in host memory and in device slots: LRU eviction, pinning, asynchronous copies.

Tiers (an adapter moves up when a request needs it and down when space is needed):
    disk  any number of PEFT-format directories under `adapter_dir/<name>/` (found on first use; a name must
          match NAME_RE and resolve inside `adapter_dir`, so no name reaches outside it)
    host  up to `max_host_adapters` packed adapters (`lora_batch.pack_adapter`), pinned memory on CUDA, LRU;
          read and packed by a worker thread so the engine loop never waits on disk
    gpu   up to `max_gpu_adapters` slots whose packed weights share one pool of `lora_pool_mb`; each adapter
          takes a contiguous run of exactly its size (first fit), LRU among the unpinned ones that no running
          request holds. The host-to-device copy runs on a side CUDA stream, overlapped with the model's steps;
          the slot's offsets are published in `LoraTables` only once the copy's event has completed.

`acquire(name)` (engine thread) returns the slot when resident and holds a reference until `release`; while the
adapter is still on its way up it returns None and the scheduler tries other requests.
"""

from __future__ import annotations

import re
import threading
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch

from rankwise.io.peft import CONFIG_NAME, read_adapter_files
from rankwise.serve.lora_batch import ALIGN, LoraLayout, LoraTables, PackedAdapter, pack_adapter, pool_elements

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


class AdapterError(Exception):
    """A request-level adapter problem; `status` is the HTTP status the API answers with."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


class RangeAllocator:
    """First-fit allocator of element ranges in [0, capacity), coalescing freed neighbours."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self._free: list[list[int]] = [[0, capacity]]  # sorted [start, length]

    def allocate(self, n: int) -> int | None:
        n = (n + ALIGN - 1) // ALIGN * ALIGN
        for i, (start, length) in enumerate(self._free):
            if length >= n:
                if length == n:
                    del self._free[i]
                else:
                    self._free[i] = [start + n, length - n]
                return start
        return None

    def free(self, start: int, n: int) -> None:
        n = (n + ALIGN - 1) // ALIGN * ALIGN
        i = 0
        while i < len(self._free) and self._free[i][0] < start:
            i += 1
        self._free.insert(i, [start, n])
        if i + 1 < len(self._free) and start + n == self._free[i + 1][0]:
            self._free[i][1] += self._free.pop(i + 1)[1]
        if i > 0 and self._free[i - 1][0] + self._free[i - 1][1] == start:
            self._free[i - 1][1] += self._free.pop(i)[1]

    @property
    def free_elements(self) -> int:
        return sum(length for _, length in self._free)


@dataclass(eq=False)
class _Entry:
    name: str
    path: Path
    pinned: bool = False
    refs: int = 0
    packed: PackedAdapter | None = None      # host copy
    future: Future | None = None             # disk -> host in flight
    error: str | None = None
    slot: int = -1                           # >= 0 once copied or being copied
    base: int = 0
    numel: int = 0
    event: object = None                     # CUDA event of the copy; None once installed
    resident: bool = False                   # tables point at it
    meta: dict = field(default_factory=dict)


class AdapterCache:
    def __init__(self, adapter_dir: str | Path | None, layout: LoraLayout, dtype: torch.dtype, device: torch.device,
                 *, max_gpu_adapters: int, lora_pool_mb: float, max_host_adapters: int, max_lora_rank: int,
                 base_weight=None, load_threads: int = 2):
        self.adapter_dir = Path(adapter_dir).resolve() if adapter_dir is not None else None
        self.layout, self.dtype, self.device = layout, dtype, device
        self.max_lora_rank, self.max_host = max_lora_rank, max_host_adapters
        self.base_weight = base_weight
        self.pool = torch.zeros(pool_elements(lora_pool_mb, dtype), dtype=dtype, device=device)
        self.tables = LoraTables(layout, max_gpu_adapters, device)
        self._ranges = RangeAllocator(self.pool.numel())
        self._free_slots = list(range(max_gpu_adapters - 1, -1, -1))
        self._entries: dict[str, _Entry] = {}
        self._host_lru: OrderedDict[str, None] = OrderedDict()
        self._gpu_lru: OrderedDict[str, None] = OrderedDict()
        self._lock = threading.RLock()
        self._pool_exec = ThreadPoolExecutor(max_workers=load_threads, thread_name_prefix="adapter-load")
        self.cuda = device.type == "cuda"
        self._copy_stream = torch.cuda.Stream(device) if self.cuda else None
        self._site_counts = [0, 0, 0, 0]  # resident adapters with weights at each site
        self.stats = {"disk_loads": 0, "gpu_loads": 0, "gpu_evictions": 0, "host_evictions": 0, "gpu_hits": 0}

    # ---- names and files --------------------------------------------------------------------------------

    def resolve(self, name: str) -> Path:
        """The adapter directory of `name`; AdapterError(404) when it does not exist, (400) when not a plain name."""
        if not isinstance(name, str) or not NAME_RE.match(name) or name in (".", ".."):
            raise AdapterError(f"Adapter name {name!r} is not valid: use letters, digits, '.', '_' and '-' (at most "
                               "128, not starting with '.'); names refer to folders directly inside the adapter "
                               "directory.", 400)
        if self.adapter_dir is None:
            raise AdapterError(f"Adapter {name!r} not found: the server was started without --adapters.", 404)
        path = (self.adapter_dir / name).resolve()
        if path.parent != self.adapter_dir or not (path / CONFIG_NAME).is_file():
            raise AdapterError(f"Adapter {name!r} not found in the adapter directory; GET /v1/models lists the "
                               "available ones.", 404)
        return path

    def available(self) -> list[str]:
        """Names on disk plus any registered ones, sorted."""
        names = set(self._entries)
        if self.adapter_dir is not None and self.adapter_dir.is_dir():
            for p in self.adapter_dir.iterdir():
                if NAME_RE.match(p.name) and p.resolve().parent == self.adapter_dir and (p / CONFIG_NAME).is_file():
                    names.add(p.name)
        return sorted(names)

    def _entry(self, name: str) -> _Entry:
        with self._lock:
            e = self._entries.get(name)
            if e is None:
                e = _Entry(name, self.resolve(name))
                self._entries[name] = e
            return e

    def _read_and_pack(self, name: str, path: Path) -> PackedAdapter:
        try:
            cfg, sd = read_adapter_files(path)
            packed = pack_adapter(name, cfg, sd, self.layout, self.dtype, self.max_lora_rank, self.base_weight)
        except (ValueError, FileNotFoundError, OSError, KeyError) as exc:
            raise AdapterError(f"Adapter {name!r} cannot be served: {exc}", 400) from exc
        if self.cuda:
            packed.data = packed.data.pin_memory()
        return packed

    # ---- API-thread operations -------------------------------------------------------------------------

    def load(self, name: str, pin: bool = False) -> dict:
        """Read and pack `name` now (errors surface to the caller), keep it in host memory, optionally pinned on
        the device. Returns its description."""
        e = self._entry(name)
        packed = e.packed or self._read_and_pack(name, e.path)
        with self._lock:
            e.packed, e.error = packed, None
            e.pinned = e.pinned or pin
            self._touch_host(name)
        return self.describe(name)

    def unload(self, name: str) -> None:
        """Drop `name` from host and device memory (at once, or when its running requests end); it stays on disk."""
        with self._lock:
            e = self._entries.get(name)
            if e is None:
                self.resolve(name)  # 404 / 400 for names that do not exist
                return
            e.pinned = False
            e.meta["unload"] = True
            if e.refs == 0:
                self._drop(e)

    def describe(self, name: str) -> dict:
        e = self._entries.get(name)
        if e is None:
            return {"id": name, "state": "disk"}
        state = "gpu" if e.resident else "copying" if e.slot >= 0 else "host" if e.packed is not None else "disk"
        out = {"id": name, "state": state, "pinned": e.pinned, "in_use": e.refs}
        if e.packed is not None:
            out.update(bytes=e.packed.nbytes, dora=e.packed.dora, ranks=sorted(set(e.packed.ranks.values())))
        return out

    # ---- engine-thread operations ----------------------------------------------------------------------

    def acquire(self, name: str) -> int | None:
        """The device slot of `name` with one more reference, or None while it is being loaded or no room is free.
        Raises AdapterError for names that do not exist or files that cannot be served."""
        with self._lock:
            e = self._entry(name)
            e.meta.pop("unload", None)
            if not self._progress(e):
                return None
            e.refs += 1
            self._gpu_lru.move_to_end(name)
            self.stats["gpu_hits"] += 1
            return e.slot

    def release(self, name: str) -> None:
        with self._lock:
            e = self._entries.get(name)
            if e is None:
                return
            e.refs -= 1
            assert e.refs >= 0, f"adapter {name} released more often than acquired"
            if e.refs == 0 and e.meta.get("unload"):
                self._drop(e)

    def poll(self) -> None:
        """Move pinned adapters up to the device; called by the engine loop every step."""
        with self._lock:
            for e in list(self._entries.values()):
                if e.pinned and not e.resident and e.error is None:
                    self._progress(e)

    def prefetch(self, names: list[str]) -> None:
        """Read and pack `names` into host memory now, in the loader threads (warm start, as S-LoRA keeps every
        adapter in host memory); waits for them. Host capacity still applies."""
        with self._lock:
            entries = [self._entry(n) for n in names]
            futures = [(e, self._pool_exec.submit(self._read_and_pack, e.name, e.path)) for e in entries
                       if e.packed is None]
        for e, f in futures:
            packed = f.result()
            with self._lock:
                e.packed = packed
                self._touch_host(e.name)

    def site_mask(self) -> tuple[bool, ...]:
        """Which of the 4 sites (qkv, o, gate_up, down) any resident adapter has weights at."""
        with self._lock:
            return tuple(c > 0 for c in self._site_counts)

    def resident_count(self) -> int:
        return len(self._gpu_lru)

    def close(self) -> None:
        self._pool_exec.shutdown(wait=False, cancel_futures=True)

    # ---- internals (lock held) -------------------------------------------------------------------------

    def _progress(self, e: _Entry) -> bool:
        """Advance `e` one tier towards the device; True once it is resident."""
        if e.resident:
            return True
        if e.error is not None:
            raise AdapterError(e.error, 400)
        if e.slot >= 0:  # copy in flight
            if e.event is not None and not e.event.query():
                return False
            self.tables.install(e.slot, e.packed, e.base)
            e.meta["sites"] = [bool(e.packed.rankA[:, i].any()) for i in range(4)]
            for i, used in enumerate(e.meta["sites"]):
                self._site_counts[i] += used
            e.event, e.resident = None, True
            self._gpu_lru[e.name] = None
            return True
        if e.packed is None:
            if e.future is None:
                e.future = self._pool_exec.submit(self._read_and_pack, e.name, e.path)
                self.stats["disk_loads"] += 1
            if not e.future.done():
                return False
            try:
                e.packed = e.future.result()
            except AdapterError as exc:
                e.error = str(exc)
                raise
            finally:
                e.future = None
            self._touch_host(e.name)
        if not self._reserve(e):
            return False
        self._start_copy(e)
        return self._progress(e)

    def _reserve(self, e: _Entry) -> bool:
        """Find a slot and a pool range for `e`, evicting idle unpinned adapters (LRU first)."""
        need = e.packed.numel
        if need > self.pool.numel():
            e.error = (f"Adapter {e.name!r} needs {need * e.packed.data.element_size() / 2**20:.1f} MiB, more than "
                       f"the whole LoRA pool ({self.pool.numel() * self.pool.element_size() / 2**20:.1f} MiB); "
                       "raise --lora-pool-mb.")
            raise AdapterError(e.error, 400)
        base = self._ranges.allocate(need) if self._free_slots else None
        victims = [n for n in self._gpu_lru if self._entries[n].refs == 0 and not self._entries[n].pinned]
        while base is None and victims:
            self._evict_gpu(self._entries[victims.pop(0)])
            base = self._ranges.allocate(need) if self._free_slots else None
        if base is None:
            return False
        e.slot, e.base, e.numel = self._free_slots.pop(), base, need
        return True

    def _start_copy(self, e: _Entry) -> None:
        dst = self.pool[e.base: e.base + e.numel]
        if self.cuda:
            # The region may have held an adapter that steps already enqueued still read: wait for them.
            self._copy_stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(self._copy_stream):
                dst.copy_(e.packed.data, non_blocking=True)
                e.event = torch.cuda.Event()
                e.event.record(self._copy_stream)
        else:
            dst.copy_(e.packed.data)
            e.event = None
        self.stats["gpu_loads"] += 1

    def _evict_gpu(self, e: _Entry) -> None:
        if e.slot < 0:
            return
        if e.resident:
            self.tables.clear(e.slot)
            for i, used in enumerate(e.meta.pop("sites")):
                self._site_counts[i] -= used
        elif e.event is not None:
            e.event.synchronize()
        self._ranges.free(e.base, e.numel)
        self._free_slots.append(e.slot)
        self._gpu_lru.pop(e.name, None)
        e.slot, e.resident, e.event = -1, False, None
        self.stats["gpu_evictions"] += 1

    def _touch_host(self, name: str) -> None:
        self._host_lru[name] = None
        self._host_lru.move_to_end(name)
        while len(self._host_lru) > self.max_host:
            victim = next(iter(self._host_lru))
            if victim == name:
                break
            self._host_lru.pop(victim)
            v = self._entries[victim]
            if v.slot >= 0 and not v.resident:  # a copy from this host buffer may be in flight: finish it first
                if v.event is not None:
                    v.event.synchronize()
                self._progress(v)
            v.packed = None
            self.stats["host_evictions"] += 1

    def _drop(self, e: _Entry) -> None:
        self._evict_gpu(e)
        self._host_lru.pop(e.name, None)
        self._entries.pop(e.name, None)
