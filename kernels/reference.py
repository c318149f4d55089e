"""Plain-torch references for every kernel in this package, written for obviousness, not
speed: the tests compare each kernel against its reference on random inputs.

The attention reference deliberately ignores blocks, runs and directions: it gathers each
sequence's slots in token order (the allocator's `ctx_slots`) and runs dense causal
attention in float64. The kernel derives the same positions from (block, run start,
direction) on its own, so agreement checks that derivation too.
"""
from __future__ import annotations

import torch


def paged_attention_ref(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, seqs) -> torch.Tensor:
    """q [T, H, D]; k_pool, v_pool [num_slots, Hkv, D]; seqs with ctx_slots and
    num_new_tokens, in q's token order -> out [T, H, D] float64."""
    T, H, D = q.shape
    G = H // k_pool.shape[1]
    out = torch.empty((T, H, D), dtype=torch.float64, device=q.device)
    row = 0
    for seq in seqs:
        n, slots = seq.num_new_tokens, torch.as_tensor(seq.ctx_slots, dtype=torch.long, device=q.device)
        ctx = slots.numel()
        k = k_pool[slots].double().repeat_interleave(G, dim=1).transpose(0, 1)   # [H, ctx, D]
        v = v_pool[slots].double().repeat_interleave(G, dim=1).transpose(0, 1)
        qs = q[row:row + n].double().transpose(0, 1)                               # [H, n, D]
        scores = qs @ k.transpose(1, 2) / D ** 0.5                                 # [H, n, ctx]
        q_pos = torch.arange(ctx - n, ctx, device=q.device)
        future = torch.arange(ctx, device=q.device)[None, :] > q_pos[:, None]
        scores = scores.masked_fill(future, float("-inf"))
        out[row:row + n] = (scores.softmax(-1) @ v).transpose(0, 1)
        row += n
    return out


def write_kv_ref(k_pool: torch.Tensor, v_pool: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 slot_mapping: torch.Tensor) -> None:
    """k_pool, v_pool [num_slots, Hkv, D]; k, v [T, Hkv, D]; slot_mapping [T]."""
    k_pool[slot_mapping.long()] = k
    v_pool[slot_mapping.long()] = v


def gather_slots_ref(k_cache: torch.Tensor, v_cache: torch.Tensor,
                     slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """k_cache, v_cache [L, num_slots, Hkv, D]; slots [n] -> two [L, n, Hkv, D] copies."""
    return k_cache[:, slots.long()].clone(), v_cache[:, slots.long()].clone()


def scatter_slots_ref(k_cache: torch.Tensor, v_cache: torch.Tensor, slots: torch.Tensor,
                      k_buf: torch.Tensor, v_buf: torch.Tensor) -> None:
    """The inverse of gather_slots_ref: k_cache[:, slots] = k_buf."""
    k_cache[:, slots.long()] = k_buf
    v_cache[:, slots.long()] = v_buf
