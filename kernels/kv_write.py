"""KV write: scatter a step's new keys and values into their pool slots.

The slot mapping already encodes the direction (an RT token goes to offset t of its
block, a BE token to offset B - 1 - t), so the kernel is a plain row scatter: one program
per new token copies its [Hkv, D] key and value rows.

Not fused with RoPE: the model rotates q and k together in one complex multiply
(worker_svc/model/llama.py), and q needs that rotation anyway; moving the key half into
this kernel would split one op into two and save only a [T, Hkv, D] read.

The pool address is slot * stride in int64 (a pool of a few GB passes 2^31 elements).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _write_kv_kernel(
        k_pool_ptr,           # [num_slots, Hkv, D]  one layer of the pool
        v_pool_ptr,           # [num_slots, Hkv, D]
        k_ptr,                # [T, Hkv, D]  this step's keys, after RoPE
        v_ptr,                # [T, Hkv, D]
        slot_mapping_ptr,     # [T] int32 or int64
        stride_ps, stride_ph, stride_kt, stride_kh, stride_vt, stride_vh,
        NUM_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr,
        BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_mapping_ptr + t).to(tl.int64)
    h = tl.arange(0, BLOCK_H)[:, None]
    d = tl.arange(0, BLOCK_D)[None, :]
    mask = (h < NUM_KV_HEADS) & (d < HEAD_DIM)
    dst = slot * stride_ps + h * stride_ph + d
    tl.store(k_pool_ptr + dst, tl.load(k_ptr + t * stride_kt + h * stride_kh + d, mask=mask), mask=mask)
    tl.store(v_pool_ptr + dst, tl.load(v_ptr + t * stride_vt + h * stride_vh + d, mask=mask), mask=mask)


def write_kv(k_pool: torch.Tensor, v_pool: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """k_pool, v_pool [num_slots, Hkv, D] (one layer); k, v [T, Hkv, D]; slot_mapping [T]:
    k_pool[slot_mapping[t]] = k[t], same for v."""
    T, Hkv, D = k.shape
    assert v.shape == k.shape, f"k {tuple(k.shape)} != v {tuple(v.shape)}"
    assert k_pool.shape == v_pool.shape and k_pool.shape[1:] == (Hkv, D), \
        f"pool {tuple(k_pool.shape)} / {tuple(v_pool.shape)} does not hold [*, {Hkv}, {D}] rows"
    assert k.dtype == v.dtype == k_pool.dtype == v_pool.dtype, (k.dtype, v.dtype, k_pool.dtype, v_pool.dtype)
    assert slot_mapping.shape == (T,) and slot_mapping.dtype in (torch.int32, torch.int64), \
        f"slot_mapping {tuple(slot_mapping.shape)} {slot_mapping.dtype}"
    assert k_pool.stride() == v_pool.stride() and k_pool.stride(-1) == k.stride(-1) == v.stride(-1) == 1
    if T == 0:
        return
    # Grid: one program per new token; it moves Hkv x D elements of K and of V.
    _write_kv_kernel[(T,)](
        k_pool_ptr=k_pool, v_pool_ptr=v_pool, k_ptr=k, v_ptr=v, slot_mapping_ptr=slot_mapping,
        stride_ps=k_pool.stride(0), stride_ph=k_pool.stride(1),
        stride_kt=k.stride(0), stride_kh=k.stride(1), stride_vt=v.stride(0), stride_vh=v.stride(1),
        NUM_KV_HEADS=Hkv, HEAD_DIM=D,
        BLOCK_H=triton.next_power_of_2(Hkv), BLOCK_D=triton.next_power_of_2(D), num_warps=4)
