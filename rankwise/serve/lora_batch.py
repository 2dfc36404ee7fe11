"""Batched LoRA for a batch whose requests use different adapters of different ranks.

Each decoder layer has four LoRA *sites*, fused linears that share an input (the model computes them as one
GEMM each): qkv (parts q, k, v), o, gate_up (parts gate, up) and down. For site `i` of layer `l` and an adapter
with per-module ranks r_p (any of them 0), the adapter contributes

    out[:, cols_p] += s_p * (x @ A_p^T) @ B_p^T                    A_p: (r_p, in), B_p: (out_p, r_p)

(DoRA, Liu et al. 2024: out[:, cols_p] = g_p * (W0_p x + s_p B_p A_p x) with g_p = m_p / ||W0_p + s_p B_p A_p||_row,
computed once when the adapter is packed; the bias is added after.)

Packing (`pack_adapter`): one flat buffer per adapter holding, for every (layer, site) it touches,
A_cat = [A_q; A_k; A_v] (R = sum r_p rows), then B_p^T (r_p, out_p) for each part, then g_p for DoRA parts.
Offsets are kept per (layer, site[, part]). Resident adapters are copied whole into one device pool
(`AdapterCache`) and their offsets, shifted by where they landed, go into `LoraTables` at their slot. So ranks
are never padded: an adapter of rank 8 takes and reads rank-8 bytes beside one of rank 64 (S-LoRA's unified
pool, Sheng et al. 2023, with contiguous runs instead of pages). Per step, `build_lora_step` groups the batch's
tokens by slot into blocks of up to `block_t` tokens, which both backends (`kernels/reference.py`, Triton)
consume: a shrink into a float32 buffer y (N, R_cap) and an expand into the site's output.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from rankwise.config import match_pattern
from rankwise.io.peft import parse_state_dict
from rankwise.layers.scaling import lora_scale
from rankwise.serve.kernels import reference
from rankwise.serve.transfer import to_device

SITES = ("qkv", "o", "gate_up", "down")
SITE_MODULES = {
    "qkv": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "o": ("self_attn.o_proj",),
    "gate_up": ("mlp.gate_proj", "mlp.up_proj"),
    "down": ("mlp.down_proj",),
}
MAX_PARTS = 3
ALIGN = 64  # elements: every tensor in a packed buffer starts at a multiple of this (128 B in bf16)
_NAME = re.compile(r"^(?:.*\.)?layers\.(\d+)\.(self_attn\.[qkvo]_proj|mlp\.(?:gate|up|down)_proj)$")
_LOCATE = {mod: (i, p) for i, site in enumerate(SITES) for p, mod in enumerate(SITE_MODULES[site])}


@dataclass(frozen=True)
class LoraLayout:
    """Where adapters can attach in a Llama-family model: per site its input width and output part columns."""

    num_layers: int
    site_in: tuple[int, ...]                 # (4,)
    part_cols: tuple[tuple[int, ...], ...]   # per site: column boundaries of its parts, from 0 to the width

    @classmethod
    def for_model(cls, num_layers: int, hidden: int, q_out: int, kv_out: int, intermediate: int) -> LoraLayout:
        return cls(num_layers, (hidden, q_out, hidden, intermediate),
                   ((0, q_out, q_out + kv_out, q_out + 2 * kv_out), (0, hidden),
                    (0, intermediate, 2 * intermediate), (0, hidden)))

    def locate(self, module: str) -> tuple[int, int, int] | None:
        """(layer, site, part) of a dotted module name such as 'model.layers.3.self_attn.k_proj'."""
        m = _NAME.match(module)
        if m is None or int(m.group(1)) >= self.num_layers:
            return None
        site, part = _LOCATE[m.group(2)]
        return int(m.group(1)), site, part

    def part_shape(self, site: int, part: int) -> tuple[int, int]:
        """(out, in) of one module."""
        cols = self.part_cols[site]
        return cols[part + 1] - cols[part], self.site_in[site]

    def max_site_rank(self, site: int, max_lora_rank: int) -> int:
        return (len(self.part_cols[site]) - 1) * max_lora_rank


@dataclass
class PackedAdapter:
    """One adapter in the pool's layout: `data` (numel,) and offsets relative to its start (-1: absent)."""

    name: str
    data: torch.Tensor     # (numel,) model dtype, on the host
    offA: torch.Tensor     # (L, 4) int64
    rankA: torch.Tensor    # (L, 4) int64, sum of the site's part ranks
    offB: torch.Tensor     # (L, 4, 3) int64
    rankB: torch.Tensor    # (L, 4, 3) int64
    r0: torch.Tensor       # (L, 4, 3) int64 first row of the part within A_cat
    scale: torch.Tensor    # (L, 4, 3) float32
    offG: torch.Tensor     # (L, 4, 3) int64, -1 unless DoRA
    ranks: dict[str, int]  # module -> rank, for reporting
    dora: bool

    @property
    def numel(self) -> int:
        return self.data.numel()

    @property
    def nbytes(self) -> int:
        return self.data.numel() * self.data.element_size()


def _align(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


def pack_adapter(name: str, config: dict, state_dict: dict[str, torch.Tensor], layout: LoraLayout,
                 dtype: torch.dtype, max_rank: int, base_weight=None) -> PackedAdapter:
    """Pack a PEFT LoRA adapter (`read_adapter_files` output) for serving.

    base_weight(layer, site, part) -> (out, in) tensor is needed for DoRA adapters only (g is computed here)."""
    peft_type = config.get("peft_type", "LORA")
    if peft_type != "LORA":
        raise ValueError(f"Adapter {name!r}: peft_type {peft_type!r} cannot be served; export it as peft_type LORA.")
    modules, other = parse_state_dict(state_dict)
    extra = [k for k in other if ".base_layer." not in k]
    if extra:
        raise ValueError(f"Adapter {name!r} has tensors the server cannot apply ({extra[:3]}: modules_to_save or "
                         "embedding adapters); serve adapters on the attention and MLP projections only.")
    use_rslora = bool(config.get("use_rslora", False))
    alpha_default = float(config.get("lora_alpha", 8))
    alpha_pattern = config.get("alpha_pattern") or {}
    L = layout.num_layers
    found: dict[tuple[int, int, int], tuple[str, dict]] = {}
    for mod, parts in modules.items():
        loc = layout.locate(mod)
        if loc is None:
            raise ValueError(f"Adapter {name!r}: module {mod!r} is not a projection the server adapts (q, k, v, o, "
                             f"gate, up, down of layers 0..{L - 1}); it was trained for another model or module set.")
        if "bias" in parts:
            raise ValueError(f"Adapter {name!r}: module {mod!r} has a LoRA bias (lora_bias=True), which the server "
                             "does not apply; merge it into the base model instead.")
        if "A" not in parts or "B" not in parts:
            raise ValueError(f"Adapter {name!r}: module {mod!r} lacks lora_A or lora_B; the file is incomplete.")
        out_f, in_f = layout.part_shape(loc[1], loc[2])
        r = parts["A"].shape[0]
        if tuple(parts["A"].shape) != (r, in_f) or tuple(parts["B"].shape) != (out_f, r):
            raise ValueError(f"Adapter {name!r}: module {mod!r} has A {tuple(parts['A'].shape)} and B "
                             f"{tuple(parts['B'].shape)}; this base model needs ({r}, {in_f}) and ({out_f}, {r}). "
                             "The adapter belongs to another base model.")
        if r > max_rank:
            raise ValueError(f"Adapter {name!r}: module {mod!r} has rank {r} > max_lora_rank={max_rank}; start the "
                             f"server with --max-lora-rank {r} or more.")
        if "magnitude" in parts and tuple(parts["magnitude"].shape) != (out_f,):
            raise ValueError(f"Adapter {name!r}: DoRA magnitude of {mod!r} has shape "
                             f"{tuple(parts['magnitude'].shape)}, expected ({out_f},).")
        found[loc] = (mod, parts)
    if not found:
        raise ValueError(f"Adapter {name!r} has no LoRA weights on any projection of this model.")

    offA = torch.full((L, 4), -1, dtype=torch.int64)
    rankA = torch.zeros((L, 4), dtype=torch.int64)
    offB = torch.full((L, 4, MAX_PARTS), -1, dtype=torch.int64)
    rankB = torch.zeros((L, 4, MAX_PARTS), dtype=torch.int64)
    r0 = torch.zeros((L, 4, MAX_PARTS), dtype=torch.int64)
    scale = torch.zeros((L, 4, MAX_PARTS), dtype=torch.float32)
    offG = torch.full((L, 4, MAX_PARTS), -1, dtype=torch.int64)
    chunks: list[tuple[int, torch.Tensor]] = []
    cursor = 0

    def put(t: torch.Tensor) -> int:
        nonlocal cursor
        off = cursor
        chunks.append((off, t.reshape(-1)))
        cursor = _align(off + t.numel())
        return off

    ranks: dict[str, int] = {}
    dora = False
    for layer in range(L):
        for site in range(4):
            n_parts = len(layout.part_cols[site]) - 1
            present = [(p, found[(layer, site, p)]) for p in range(n_parts) if (layer, site, p) in found]
            if not present:
                continue
            a_rows = torch.cat([parts["A"].to(dtype) for _, (_, parts) in present], dim=0)  # (R, in)
            offA[layer, site] = put(a_rows)
            rankA[layer, site] = a_rows.shape[0]
            row = 0
            for p, (mod, parts) in present:
                r = parts["A"].shape[0]
                s = lora_scale(float(match_pattern(alpha_pattern, mod, alpha_default)), r, use_rslora)
                ranks[mod] = r
                rankB[layer, site, p], r0[layer, site, p], scale[layer, site, p] = r, row, s
                offB[layer, site, p] = put(parts["B"].to(dtype).t())
                row += r
                if "magnitude" in parts and config.get("use_dora", False):
                    if base_weight is None:
                        raise ValueError(f"Adapter {name!r} is a DoRA adapter; packing it needs the base weights.")
                    w0 = base_weight(layer, site, p)
                    with torch.no_grad():
                        delta = s * (parts["B"].to(w0.device, torch.float32) @ parts["A"].to(w0.device, torch.float32))
                        norm = torch.linalg.vector_norm(w0.float() + delta, dim=1)
                        g = parts["magnitude"].to(w0.device, torch.float32) / norm
                    offG[layer, site, p] = put(g.cpu())
                    dora = True
    data = torch.zeros(max(cursor, ALIGN), dtype=dtype)
    for off, flat in chunks:
        data[off: off + flat.numel()] = flat
    return PackedAdapter(name, data, offA, rankA, offB, rankB, r0, scale, offG, ranks, dora)


class LoraTables:
    """Device-side offsets of the resident adapters, indexed [layer, site(, part), slot]; an empty slot has rank 0."""

    def __init__(self, layout: LoraLayout, num_slots: int, device: torch.device):
        L, S = layout.num_layers, num_slots
        self.num_slots = S
        self.offA = torch.zeros((L, 4, S), dtype=torch.int64, device=device)
        self.rankA = torch.zeros((L, 4, S), dtype=torch.int64, device=device)
        self.offB = torch.zeros((L, 4, MAX_PARTS, S), dtype=torch.int64, device=device)
        self.rankB = torch.zeros((L, 4, MAX_PARTS, S), dtype=torch.int64, device=device)
        self.r0 = torch.zeros((L, 4, MAX_PARTS, S), dtype=torch.int64, device=device)
        self.scale = torch.zeros((L, 4, MAX_PARTS, S), dtype=torch.float32, device=device)
        self.offG = torch.full((L, 4, MAX_PARTS, S), -1, dtype=torch.int64, device=device)

    def install(self, slot: int, packed: PackedAdapter, base: int) -> None:
        """Point `slot` at `packed`, whose data starts at element `base` of the pool (enqueued on the current stream)."""
        def shift(off: torch.Tensor) -> torch.Tensor:
            return torch.where(off >= 0, off + base, off)

        dev = self.offA.device
        self.offA[..., slot] = to_device(shift(packed.offA).clamp_min(0), dev)
        self.rankA[..., slot] = to_device(packed.rankA, dev)
        self.offB[..., slot] = to_device(shift(packed.offB).clamp_min(0), dev)
        self.rankB[..., slot] = to_device(packed.rankB, dev)
        self.r0[..., slot] = to_device(packed.r0, dev)
        self.scale[..., slot] = to_device(packed.scale, dev)
        self.offG[..., slot] = to_device(shift(packed.offG), dev)

    def clear(self, slot: int) -> None:
        self.rankA[..., slot] = 0
        self.rankB[..., slot] = 0
        self.offG[..., slot] = -1


@dataclass
class LoraStep:
    """Per-step token grouping: positions in adapter-grouped order and blocks over them (see module docstring)."""

    tok_idx: torch.Tensor    # (N,) int32
    blk_start: torch.Tensor  # (NB,) int32
    blk_end: torch.Tensor    # (NB,) int32
    blk_slot: torch.Tensor   # (NB,) int32, -1: no adapter
    y: torch.Tensor          # (SPLIT, N, R_cap) float32 workspace (the Triton shrink's partial sums over K)
    block_t: int
    row_slot: torch.Tensor | None = None  # (N,) int32 per row, a decode step: the Triton backend's row-form kernels


def plan_blocks(token_slots: list[int], block_t: int, num_blocks: int | None = None
                ) -> tuple[list[int], list[int], list[int], list[int]]:
    """Group tokens by adapter slot: (tok_idx, blk_start, blk_end, blk_slot) as lists. Tokens of slot -1 (no
    adapter) go last and get no block. `num_blocks` pads the block lists with empty blocks (slot -1)."""
    order = sorted(range(len(token_slots)), key=lambda t: (token_slots[t] < 0, token_slots[t]))
    starts, ends, slots = [], [], []
    i = 0
    while i < len(order) and token_slots[order[i]] >= 0:
        s = token_slots[order[i]]
        j = i
        while j < len(order) and token_slots[order[j]] == s:
            j += 1
        for b in range(i, j, block_t):
            starts.append(b)
            ends.append(min(b + block_t, j))
            slots.append(s)
        i = j
    if num_blocks is not None:
        if len(slots) > num_blocks:
            raise ValueError(f"{len(slots)} LoRA blocks do not fit the {num_blocks} reserved; raise num_blocks.")
        pad = num_blocks - len(slots)
        starts, ends, slots = starts + [0] * pad, ends + [0] * pad, slots + [-1] * pad
    return order, starts, ends, slots


def lora_workspace(backend: str, max_k: int, num_blocks: int, num_tokens: int, r_cap: int,
                   device: torch.device, tuned: bool = False, launch: tuple | None = None) -> torch.Tensor:
    """The float32 y buffer (SPLIT, num_tokens, r_cap) of a step of `num_blocks` blocks: one slice for the reference,
    the Triton shrink's split-K partial sums otherwise (max_k: the widest site input; tuned: a decode step's, room
    for any split `tune_rows` may pick; launch: per-site `LoraLaunch`es the step will run with, room for their
    largest split)."""
    splits = 1
    if launch is not None:
        splits = max(x.split for x in launch)
    elif backend == "triton":
        from rankwise.serve.kernels.triton_lora import split_k
        from rankwise.serve.kernels.triton_lora_rows import max_row_split

        splits = max_row_split(max_k) if tuned else split_k(max_k, num_blocks)
    return torch.empty((splits, num_tokens, r_cap), dtype=torch.float32, device=device)


def build_lora_step(token_slots: list[int], block_t: int, r_cap: int, device: torch.device,
                    max_k: int | None = None) -> LoraStep | None:
    """A LoraStep for tokens with these adapter slots, or None when no token uses an adapter. max_k: the widest
    site input, for the Triton backend's split-K workspace (None: the reference, one slice)."""
    if all(s < 0 for s in token_slots):
        return None
    order, starts, ends, slots = plan_blocks(token_slots, block_t)
    tok_idx = to_device(torch.tensor(order, dtype=torch.int32), device)
    blocks = to_device(torch.tensor([starts, ends, slots], dtype=torch.int32), device)
    y = lora_workspace("reference" if max_k is None else "triton", max_k or 0, len(slots), len(token_slots), r_cap,
                       device)
    return LoraStep(tok_idx, blocks[0], blocks[1], blocks[2], y, block_t)


def block_t_for(backend: str) -> int:
    """Tokens per block: 16 for Triton (tl.dot's minimum tile); one block per segment for the reference."""
    return 16 if backend == "triton" else 1 << 30


def lora_shrink_site(site: int, layer: int, x: torch.Tensor, step: LoraStep, tables: LoraTables, pool: torch.Tensor,
                     layout: LoraLayout, max_lora_rank: int, backend: str, launch=None) -> None:
    """step.y = x @ A^T of every token's adapter at (layer, site). x: (T, in_site). launch: a tuned `LoraLaunch`
    (Triton; None: the default for this step's size), or a `RowLaunch` for a step with `row_slot`."""
    blocks = (step.tok_idx, step.blk_start, step.blk_end, step.blk_slot)
    offA, rankA = tables.offA[layer, site], tables.rankA[layer, site]
    if backend == "triton" and step.row_slot is not None:
        from rankwise.serve.kernels.triton_lora_rows import default_row_launch, lora_shrink_rows

        lora_shrink_rows(x, pool, step.y, step.row_slot, offA, rankA, max_rank=layout.max_site_rank(site, max_lora_rank),
                         launch=launch or default_row_launch(x.shape[1]))
    elif backend == "triton":
        from rankwise.serve.kernels.triton_lora import default_launch, lora_shrink

        launch = launch or default_launch(x.shape[1], step.blk_slot.shape[0])
        lora_shrink(x, pool, step.y, *blocks, offA, rankA, max_rank=layout.max_site_rank(site, max_lora_rank),
                    split=launch.split, block_t=step.block_t, block_r=launch.shrink_block_r)
    else:
        reference.lora_shrink_ref(x, pool, step.y[0], *blocks, offA, rankA)


def lora_expand_site(site: int, layer: int, x: torch.Tensor, out: torch.Tensor, step: LoraStep, tables: LoraTables,
                     pool: torch.Tensor, layout: LoraLayout, max_lora_rank: int, backend: str, launch=None) -> None:
    """out (T, N_site) += every token's adapter delta from step.y (written by `lora_shrink_site` for this x)."""
    cols = layout.part_cols[site]
    P = len(cols) - 1
    offB, rankB = tables.offB[layer, site, :P], tables.rankB[layer, site, :P]
    r0, scale, offG = tables.r0[layer, site, :P], tables.scale[layer, site, :P], tables.offG[layer, site, :P]
    blocks = (step.tok_idx, step.blk_start, step.blk_end, step.blk_slot)
    if backend == "triton" and step.row_slot is not None:
        from rankwise.serve.kernels.triton_lora_rows import default_row_launch, lora_expand_rows

        lora_expand_rows(step.y, out, pool, step.row_slot, cols, offB, rankB, r0, scale, offG,
                         launch=launch or default_row_launch(x.shape[1]))
    elif backend == "triton":
        from rankwise.serve.kernels.triton_lora import default_launch, lora_expand

        launch = launch or default_launch(x.shape[1], step.blk_slot.shape[0])
        lora_expand(step.y, out, pool, *blocks, cols, offB, rankB, r0, scale, offG, split=launch.split,
                    block_t=step.block_t, block_r=launch.expand_block_r, block_n=launch.expand_block_n)
    else:
        reference.lora_expand_ref(step.y[0], out, pool, *blocks, cols, offB, rankB, r0, scale, offG)


def apply_lora(site: int, layer: int, x: torch.Tensor, out: torch.Tensor, step: LoraStep, tables: LoraTables,
               pool: torch.Tensor, layout: LoraLayout, max_lora_rank: int, backend: str, launch=None) -> None:
    """out (T, N_site) += every token's adapter delta at (layer, site), in place. x: (T, in_site)."""
    args = (step, tables, pool, layout, max_lora_rank, backend, launch)
    lora_shrink_site(site, layer, x, *args)
    lora_expand_site(site, layer, x, out, *args)


def dense_delta(packed: PackedAdapter, layout: LoraLayout, layer: int, site: int) -> list[torch.Tensor | None]:
    """Per part, s B A as a dense (out, in) float32 matrix (None where the adapter has no module): for tests."""
    cols = layout.part_cols[site]
    K = layout.site_in[site]
    out = []
    for p in range(len(cols) - 1):
        r = int(packed.rankB[layer, site, p])
        if r == 0:
            out.append(None)
            continue
        a0 = int(packed.offA[layer, site]) + int(packed.r0[layer, site, p]) * K
        A = packed.data[a0: a0 + r * K].view(r, K).float()
        width = cols[p + 1] - cols[p]
        b0 = int(packed.offB[layer, site, p])
        Bt = packed.data[b0: b0 + r * width].view(r, width).float()
        out.append(float(packed.scale[layer, site, p]) * Bt.t() @ A)
    return out


def pool_elements(mb: float, dtype: torch.dtype) -> int:
    """Elements of `dtype` in `mb` megabytes, rounded down to the alignment."""
    n = int(mb * 2 ** 20) // torch.empty((), dtype=dtype).element_size()
    return max(ALIGN, n // ALIGN * ALIGN)


__all__ = [
    "SITES",
    "LoraLayout",
    "LoraStep",
    "LoraTables",
    "PackedAdapter",
    "apply_lora",
    "block_t_for",
    "build_lora_step",
    "dense_delta",
    "lora_expand_site",
    "lora_shrink_site",
    "lora_workspace",
    "pack_adapter",
    "plan_blocks",
    "pool_elements",
]
