"""Block allocator and cache writes."""

import pytest
import torch

from rankwise.serve.kv_cache import BlockAllocator, KVCache, OutOfBlocksError, blocks_needed


def test_allocator_never_hands_out_the_scratch_block_and_reuses_freed_ones():
    a = BlockAllocator(5)
    got = a.allocate(4)
    assert sorted(got) == [1, 2, 3, 4] and a.num_free == 0 and not a.can_allocate(1)
    with pytest.raises(OutOfBlocksError, match="raise num_kv_blocks"):
        a.allocate(1)
    a.free(got[:2])
    assert sorted(a.allocate(2)) == sorted(got[:2])
    with pytest.raises(ValueError, match="at least 2"):
        BlockAllocator(1)
    assert [blocks_needed(n, 4) for n in (0, 1, 4, 5)] == [0, 1, 1, 2]


def test_write_puts_tokens_at_their_slots():
    kv = KVCache(2, 4, 2, 1, 3, torch.float32, torch.device("cpu"))
    k = torch.arange(9.0).view(3, 1, 3)
    kv.write(1, torch.tensor([5, 0, 2]), k, -k)
    assert torch.equal(kv.k[1, 2, 1], k[0]) and torch.equal(kv.k[1, 0, 0], k[1]) and torch.equal(kv.v[1, 1, 0], -k[2])
    assert kv.k[0].abs().sum() == 0
