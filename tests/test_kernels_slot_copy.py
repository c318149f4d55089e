"""The checkpoint copy kernels against their references: a BE run's slots (right to left
in its block) go to a contiguous buffer across all layers and come back, possibly into
another block, leaving every other slot alone."""
import os

import pytest
import torch

from kernels.reference import gather_slots_ref, scatter_slots_ref
from kernels.slot_copy import gather_slots, scatter_slots
from worker_svc.block_allocator import BlockAllocator, SeqClass

ON_GPU = torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1"
DEVICE = "cuda" if ON_GPU else "cpu"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]   # a copy: no tl.dot, bf16 is safe here


def checkpoint_and_restore(block_size: int):
    """The allocator's own to_host / from_host slot lists for one evicted BE run."""
    alloc = BlockAllocator(num_blocks=3, block_size=block_size, max_num_host_slots=64)
    alloc.add_sequence("be", SeqClass.BE)
    alloc.add_sequence("rt", SeqClass.RT)
    alloc.allocate("be", block_size + 5)
    alloc.pause("be")
    alloc.allocate("rt", 2 * block_size - 5)   # block 2, then block 1 up to the BE run
    alloc.allocate("rt", 1)                    # grows into the paused BE run: evicted
    (to_host,) = alloc.drain_copies()
    alloc.free("rt")
    alloc.restore("be")
    (from_host,) = alloc.drain_copies()
    assert to_host.kind == "to_host" and from_host.kind == "from_host" and to_host.handle == from_host.handle
    return (torch.tensor(c.slots, device=DEVICE) for c in (to_host, from_host))


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("num_layers,num_kv_heads,head_dim,block_size", [(3, 2, 64, 16), (2, 3, 128, 32)])
def test_gather_then_scatter_match_reference(dtype, num_layers, num_kv_heads, head_dim, block_size):
    out_slots, in_slots = checkpoint_and_restore(block_size)
    shape = (num_layers, 3 * block_size, num_kv_heads, head_dim)
    k_cache, v_cache = (torch.randn(shape, device=DEVICE).to(dtype) for _ in range(2))
    k_buf, v_buf = gather_slots(k_cache, v_cache, out_slots)
    k_ref, v_ref = gather_slots_ref(k_cache, v_cache, out_slots)
    assert torch.equal(k_buf, k_ref) and torch.equal(v_buf, v_ref)
    assert k_buf.shape == (num_layers, len(out_slots), num_kv_heads, head_dim) and k_buf.is_contiguous()

    host = (k_buf.cpu(), v_buf.cpu())                        # what KVCache keeps on the host
    targets = [c.clone().fill_(float("nan")) for c in (k_cache, v_cache, k_cache, v_cache)]
    scatter_slots(targets[0], targets[1], in_slots, *(h.to(DEVICE) for h in host))
    scatter_slots_ref(targets[2], targets[3], in_slots, *(h.to(DEVICE) for h in host))
    assert torch.equal(targets[0][:, in_slots], k_ref) and torch.equal(targets[1][:, in_slots], v_ref)
    for got, want in ((targets[0], targets[2]), (targets[1], targets[3])):
        assert torch.equal(torch.isnan(got), torch.isnan(want))    # nothing else written
        assert torch.equal(torch.nan_to_num(got), torch.nan_to_num(want))


def test_offsets_past_int32():
    """A 17-layer pool of 2^31+ elements (virtual memory: only the touched pages become
    real): layer * stride_l passes 2^31 in the last layer."""
    L, Hkv, D, dtype = 17, 2, 64, torch.float16
    num_slots = (1 << 27) // (Hkv * D) + 64
    k_cache = torch.empty((L, num_slots, Hkv, D), dtype=dtype, device=DEVICE)
    v_cache = torch.empty_like(k_cache)
    assert (L - 1) * k_cache.stride(0) >= 1 << 31
    slots = torch.tensor([num_slots - 1, num_slots - 2, num_slots - 30], device=DEVICE)
    for c in (k_cache, v_cache):
        c[:, num_slots - 64:] = torch.randn(L, 64, Hkv, D, device=DEVICE).to(dtype)
    k_buf, v_buf = gather_slots(k_cache, v_cache, slots)
    assert torch.equal(k_buf, k_cache[:, slots]) and torch.equal(v_buf, v_cache[:, slots])
    back = torch.tensor([num_slots - 50, num_slots - 51, num_slots - 52], device=DEVICE)
    scatter_slots(k_cache, v_cache, back, k_buf, v_buf)
    assert torch.equal(k_cache[:, back], k_buf) and torch.equal(v_cache[:, back], v_buf)
