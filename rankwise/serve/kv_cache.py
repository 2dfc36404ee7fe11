"""The paged KV cache: fixed-size blocks of token slots, handed out by a free-list allocator.

Kwon et al. 2023 (vLLM, PagedAttention): a sequence's keys and values live in blocks of `block_size` tokens
found through its block table, so memory is allocated as the sequence grows and freed whole when it ends,
without fragmentation. Token t of a sequence is stored at slot block_table[t // block_size] * block_size +
t % block_size. Block 0 is reserved as a scratch block: rows of a padded decode batch write there.
"""

from __future__ import annotations

import torch


class OutOfBlocksError(RuntimeError):
    pass


class BlockAllocator:
    """Free list of block ids 1..num_blocks-1 (block 0 is the scratch block)."""

    def __init__(self, num_blocks: int):
        if num_blocks < 2:
            raise ValueError(f"num_blocks={num_blocks}: the cache needs at least 2 blocks (one is scratch).")
        self.num_blocks = num_blocks
        self._free = list(range(num_blocks - 1, 0, -1))

    @property
    def num_free(self) -> int:
        return len(self._free)

    def can_allocate(self, n: int) -> bool:
        return n <= len(self._free)

    def allocate(self, n: int) -> list[int]:
        if n > len(self._free):
            raise OutOfBlocksError(f"asked for {n} KV blocks, {len(self._free)} free; raise num_kv_blocks.")
        out = self._free[len(self._free) - n:][::-1]
        del self._free[len(self._free) - n:]
        return out

    def free(self, blocks: list[int]) -> None:
        self._free.extend(reversed(blocks))


def blocks_needed(num_tokens: int, block_size: int) -> int:
    return (num_tokens + block_size - 1) // block_size


class KVCache:
    """k, v: (num_layers, num_blocks, block_size, num_kv_heads, head_dim) each."""

    def __init__(self, num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device):
        shape = (num_layers, num_blocks, block_size, num_kv_heads, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.block_size = block_size
        self.num_blocks = num_blocks

    @staticmethod
    def bytes_per_block(num_layers: int, block_size: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
        return 2 * num_layers * block_size * num_kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()

    def write(self, layer: int, slot_mapping: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store k, v (T, H_kv, D) at flat slots `slot_mapping` (T,) int64 of `layer`."""
        kl = self.k[layer].view(-1, *self.k.shape[3:])
        vl = self.v[layer].view(-1, *self.v.shape[3:])
        kl.index_copy_(0, slot_mapping, k)
        vl.index_copy_(0, slot_mapping, v)
