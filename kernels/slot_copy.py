"""The checkpoint copy: gather the BE slots a preemption must give up into one contiguous
buffer (then one DMA to pinned host memory), and scatter a restored buffer back.

Only the listed slots move, in the order given (the allocator lists a BE run's slots in
token order, i.e. right to left in its block), across every layer of K and V:

    k_buf[l, i] = k_cache[l, slots[i]]      (gather; scatter is the inverse)

One program per (slot, layer) moves one Hkv x D row of K and one of V. The pool offset
layer * stride_l + slot * stride_s is taken in int64: a whole multi-layer pool passes
2^31 elements long before a single layer does.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _slot_copy_kernel(
        k_cache_ptr,          # [L, num_slots, Hkv, D]
        v_cache_ptr,          # [L, num_slots, Hkv, D]
        k_buf_ptr,            # [L, n, Hkv, D] contiguous
        v_buf_ptr,            # [L, n, Hkv, D] contiguous
        slots_ptr,            # [n] int32 or int64
        num_copies,           # n
        stride_cl, stride_cs,
        ROW: tl.constexpr,    # Hkv * D: one slot's row, contiguous in pool and buffer
        BLOCK: tl.constexpr, TO_BUFFER: tl.constexpr):
    i = tl.program_id(0).to(tl.int64)
    layer = tl.program_id(1).to(tl.int64)
    slot = tl.load(slots_ptr + i).to(tl.int64)
    e = tl.arange(0, BLOCK)
    cache_off = layer * stride_cl + slot * stride_cs
    buf_off = (layer * num_copies + i) * ROW
    if TO_BUFFER:
        src_k = k_cache_ptr + cache_off
        src_v = v_cache_ptr + cache_off
        dst_k = k_buf_ptr + buf_off
        dst_v = v_buf_ptr + buf_off
    else:
        src_k = k_buf_ptr + buf_off
        src_v = v_buf_ptr + buf_off
        dst_k = k_cache_ptr + cache_off
        dst_v = v_cache_ptr + cache_off
    for start in range(0, ROW, BLOCK):
        mask = start + e < ROW
        tl.store(dst_k + start + e, tl.load(src_k + start + e, mask=mask), mask=mask)
        tl.store(dst_v + start + e, tl.load(src_v + start + e, mask=mask), mask=mask)


def gather_slots(k_cache: torch.Tensor, v_cache: torch.Tensor,
                 slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """k_cache, v_cache [L, num_slots, Hkv, D]; slots [n] -> (k_buf, v_buf), each
    [L, n, Hkv, D] contiguous on the cache's device."""
    _check(k_cache, v_cache, slots)
    L, _, Hkv, D = k_cache.shape
    n = slots.shape[0]
    k_buf = torch.empty((L, n, Hkv, D), dtype=k_cache.dtype, device=k_cache.device)
    v_buf = torch.empty_like(k_buf)
    _launch(k_cache, v_cache, k_buf, v_buf, slots, to_buffer=True)
    return k_buf, v_buf


def scatter_slots(k_cache: torch.Tensor, v_cache: torch.Tensor, slots: torch.Tensor,
                  k_buf: torch.Tensor, v_buf: torch.Tensor) -> None:
    """The inverse of gather_slots: k_cache[:, slots] = k_buf, v_cache[:, slots] = v_buf."""
    _check(k_cache, v_cache, slots)
    L, _, Hkv, D = k_cache.shape
    want = (L, slots.shape[0], Hkv, D)
    for name, buf in (("k_buf", k_buf), ("v_buf", v_buf)):
        assert buf.shape == want and buf.dtype == k_cache.dtype and buf.is_contiguous(), \
            f"{name} {tuple(buf.shape)} {buf.dtype} must be a contiguous {want} {k_cache.dtype}"
        assert buf.device == k_cache.device, f"{name} on {buf.device}, cache on {k_cache.device}"
    _launch(k_cache, v_cache, k_buf, v_buf, slots, to_buffer=False)


def _check(k_cache: torch.Tensor, v_cache: torch.Tensor, slots: torch.Tensor) -> None:
    assert k_cache.dim() == 4 and k_cache.shape == v_cache.shape and k_cache.dtype == v_cache.dtype, \
        f"k_cache {tuple(k_cache.shape)} {k_cache.dtype}, v_cache {tuple(v_cache.shape)} {v_cache.dtype}"
    assert k_cache.stride() == v_cache.stride()
    # A slot's [Hkv, D] row must be contiguous for the 1-D copy.
    assert k_cache.stride(3) == 1 and k_cache.stride(2) == k_cache.shape[3], "rows must be contiguous"
    assert slots.dim() == 1 and slots.dtype in (torch.int32, torch.int64), f"slots {tuple(slots.shape)} {slots.dtype}"
    assert slots.device == k_cache.device, f"slots on {slots.device}, cache on {k_cache.device}"


def _launch(k_cache, v_cache, k_buf, v_buf, slots, to_buffer: bool) -> None:
    L, _, Hkv, D = k_cache.shape
    n = slots.shape[0]
    if n == 0:
        return
    row = Hkv * D
    # Grid: one program per (slot, layer); it moves one [Hkv, D] row of K and of V.
    _slot_copy_kernel[(n, L)](
        k_cache_ptr=k_cache, v_cache_ptr=v_cache, k_buf_ptr=k_buf, v_buf_ptr=v_buf, slots_ptr=slots,
        num_copies=n, stride_cl=k_cache.stride(0), stride_cs=k_cache.stride(1),
        ROW=row, BLOCK=min(triton.next_power_of_2(row), 4096), TO_BUFFER=to_buffer, num_warps=4)
