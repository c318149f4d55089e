"""The KV write kernel against its reference: a step's new K/V land in their slots, in
either direction, and nothing else in the pool changes."""
import os

import pytest
import torch

from kernels.kv_write import write_kv
from kernels.reference import write_kv_ref
from worker_svc.block_allocator import BlockAllocator, SeqClass

ON_GPU = torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1"
DEVICE = "cuda" if ON_GPU else "cpu"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]   # a copy: no tl.dot, bf16 is safe here


def step_slots(block_size: int) -> torch.Tensor:
    """The slots of one step: new tokens of two BE sequences and of an RT sequence whose
    latest run took the free left part of a paused BE block."""
    alloc = BlockAllocator(num_blocks=5, block_size=block_size)
    for sid, cls in (("be", SeqClass.BE), ("be2", SeqClass.BE), ("rt", SeqClass.RT)):
        alloc.add_sequence(sid, cls)
    alloc.allocate("be", block_size + 3)       # block 0, then 3 slots at the right of block 1
    alloc.allocate("be2", 5)                   # 5 slots at the right of block 2
    alloc.pause("be")
    alloc.pause("be2")
    alloc.allocate("rt", 2 * block_size + 2)   # blocks 3 and 4, then the left of block 1
    slots = alloc.slots("be")[-2:] + alloc.slots("rt")[-3:] + alloc.slots("be2")
    assert alloc.occupancy()["shared_blocks"] == 1
    return torch.tensor(slots, device=DEVICE)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("num_kv_heads,head_dim,block_size", [(2, 64, 16), (3, 128, 32), (1, 96, 16)])
def test_matches_reference(dtype, num_kv_heads, head_dim, block_size):
    slots = step_slots(block_size)
    T = slots.numel()
    # k as the model hands it over: a slice of the fused q|k projection, not contiguous.
    qk = torch.randn(T, 4 + num_kv_heads, head_dim, device=DEVICE).to(dtype)
    k, v = qk[:, 4:], torch.randn(T, num_kv_heads, head_dim, device=DEVICE).to(dtype)
    pools = [torch.full((5 * block_size, num_kv_heads, head_dim), 1e4, dtype=dtype, device=DEVICE)
             for _ in range(4)]
    write_kv(pools[0], pools[1], k, v, slots.to(torch.int32))
    write_kv_ref(pools[2], pools[3], k, v, slots)
    assert torch.equal(pools[0], pools[2]) and torch.equal(pools[1], pools[3])
    assert torch.equal(pools[0][slots], k)


def test_offsets_past_int32():
    """Slots whose element offset passes 2^31 (a virtual pool: only the pages written to
    become real)."""
    Hkv, D, dtype = 2, 64, torch.float16
    num_slots = (1 << 31) // (Hkv * D) + 64
    k_pool = torch.empty((num_slots, Hkv, D), dtype=dtype, device=DEVICE)
    v_pool = torch.empty_like(k_pool)
    slots = torch.tensor([num_slots - 1, num_slots - 40, num_slots - 17], device=DEVICE)
    assert int(slots.min()) * Hkv * D >= 1 << 31
    k_pool[num_slots - 64:] = float("nan")
    v_pool[num_slots - 64:] = float("nan")
    k, v = (torch.randn(3, Hkv, D, device=DEVICE).to(dtype) for _ in range(2))
    write_kv(k_pool, v_pool, k, v, slots.to(torch.int32))   # int32, as the metadata carries it
    assert torch.equal(k_pool[slots], k) and torch.equal(v_pool[slots], v)
    assert int(torch.isnan(k_pool[num_slots - 64:]).any(dim=(1, 2)).sum()) == 64 - 3
