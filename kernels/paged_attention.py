"""Paged attention over the bidirectional KV pool: flash attention (online softmax over KV
tiles, tl.dot) reading every sequence's blocks in place, for decode rows and prefill
chunks alike, with grouped-query attention and a split-KV (flash-decoding) variant.

One program owns one tile of query rows of one sequence for one KV head:

    rows r = 0 .. BLOCK_M-1:   token  q_tile_start + r // G,   query head  kv_head * G + r % G

so the G query heads that share a KV head read each K/V tile once. The program walks the
sequence's KV in tiles of TILE_N slots laid end to end over its runs (a tile may span
several blocks, or part of one); per slot it recovers the token position from the run's
start and direction (attention_metadata.py), masks slots that are not the sequence's
(the free middle of a block, the other owner's end of a shared block) and, for prefill,
slots in a row's causal future. Scores stay in registers: m (running max, log2 units),
l (running sum) and acc (unnormalised output) are rescaled as the max grows.

Split-KV: when few decode rows would leave most SMs idle, the grid grows a third axis
that cuts each row's KV tiles into NUM_SPLITS ranges; each program writes its normalised
partial output and log2-sum-exp, and `_split_kv_reduce_kernel` merges them.

Every pool address is `slot * stride` with slot = block_id * BLOCK_SIZE + offset taken
in int64: a pool of a few GB passes 2^31 elements.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .attention_metadata import AttentionTiles, PagedAttentionMetadata

LOG2E = 1.4426950408889634
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@triton.jit
def _paged_attention_kernel(
        out_ptr,              # [T, H, D]  (plain path)
        part_out_ptr,         # [T, H, NUM_SPLITS, D] float32, normalised per split (split path)
        part_lse_ptr,         # [T, H, NUM_SPLITS] float32, log2-sum-exp per split (split path)
        q_ptr,                # [T, H, D]
        k_pool_ptr,           # [num_slots, Hkv, D]  one layer of the pool
        v_pool_ptr,           # [num_slots, Hkv, D]
        block_tables_ptr,     # [S, max_blocks] int32
        block_starts_ptr,     # [S, max_blocks + 1] int32
        seq_q_start_ptr,      # [S] int32
        seq_num_new_ptr,      # [S] int32
        seq_ctx_len_ptr,      # [S] int32
        seq_from_right_ptr,   # [S] int32
        tile_seq_ptr,         # [num_tiles] int32
        tile_q_start_ptr,     # [num_tiles] int32
        tile_num_blocks_ptr,  # [num_tiles] int32
        stride_qt, stride_qh, stride_ot, stride_oh,
        stride_ks, stride_kh, stride_vs, stride_vh,
        stride_pt, stride_ph, stride_ps, stride_lt, stride_lh,
        stride_bt, stride_bs,
        qk_scale,             # softmax scale * log2(e): the kernel works in base 2
        G: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_Q: tl.constexpr,
        HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_SIZE: tl.constexpr,
        TILE_N: tl.constexpr, NUM_SPLITS: tl.constexpr, DOT_PRECISION: tl.constexpr):
    tile = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    seq = tl.load(tile_seq_ptr + tile)
    q_tile_start = tl.load(tile_q_start_ptr + tile)
    num_blocks = tl.load(tile_num_blocks_ptr + tile)
    q_start = tl.load(seq_q_start_ptr + seq)
    num_new = tl.load(seq_num_new_ptr + seq)
    ctx_len = tl.load(seq_ctx_len_ptr + seq)
    from_right = tl.load(seq_from_right_ptr + seq) != 0

    rows = tl.arange(0, BLOCK_M)
    tok = q_tile_start + rows // G                      # new token of the chunk, per row
    head = kv_head * G + rows % G                       # query head, per row
    row_ok = (rows < BLOCK_Q * G) & (tok < num_new)
    q_pos = ctx_len - num_new + tok                     # its position in the sequence
    t_idx = (q_start + tok).to(tl.int64)                # its row in q and out
    d = tl.arange(0, BLOCK_D)
    d_ok = d < HEAD_DIM
    q = tl.load(q_ptr + t_idx[:, None] * stride_qt + head[:, None] * stride_qh + d[None, :],
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)               # [BLOCK_M, BLOCK_D]

    # Finite start for m: a row that sees nothing yet keeps alpha = exp2(0) = 1, never NaN.
    m_i = tl.full([BLOCK_M], -1.0e30, tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)

    num_kv_tiles = (num_blocks * BLOCK_SIZE + TILE_N - 1) // TILE_N
    if NUM_SPLITS > 1:
        per_split = (num_kv_tiles + NUM_SPLITS - 1) // NUM_SPLITS
        kv_lo = split * per_split
        kv_hi = tl.minimum(kv_lo + per_split, num_kv_tiles)
    else:
        kv_lo = 0
        kv_hi = num_kv_tiles

    cols = tl.arange(0, TILE_N)
    table_row = block_tables_ptr + seq * stride_bt
    starts_row = block_starts_ptr + seq * stride_bs
    for kv_tile in range(kv_lo, kv_hi):
        col = kv_tile * TILE_N + cols                   # slot index over the runs laid end to end
        run = col // BLOCK_SIZE
        offset = col - run * BLOCK_SIZE
        col_ok = run < num_blocks
        block = tl.load(table_row + run, mask=col_ok, other=0)
        run_start = tl.load(starts_row + run, mask=col_ok, other=0)
        run_end = tl.load(starts_row + run + 1, mask=col_ok, other=0)
        k_pos = tl.where(from_right, run_start + (BLOCK_SIZE - 1 - offset), run_start + offset)
        kv_ok = col_ok & (k_pos < run_end)              # the slot holds one of this sequence's tokens
        slot = block.to(tl.int64) * BLOCK_SIZE + offset
        k = tl.load(k_pool_ptr + slot[None, :] * stride_ks + kv_head * stride_kh + d[:, None],
                    mask=kv_ok[None, :] & d_ok[:, None], other=0.0)            # [BLOCK_D, TILE_N]
        s = tl.dot(q, k, input_precision=DOT_PRECISION) * qk_scale            # [BLOCK_M, TILE_N]
        visible = kv_ok[None, :] & (k_pos[None, :] <= q_pos[:, None])
        s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_pool_ptr + slot[:, None] * stride_vs + kv_head * stride_vh + d[None, :],
                    mask=kv_ok[:, None] & d_ok[None, :], other=0.0)            # [TILE_N, BLOCK_D]
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=DOT_PRECISION)
        m_i = m_new

    l_safe = tl.where(l_i > 0, l_i, 1.0)               # padded rows and empty splits
    o = acc / l_safe[:, None]
    out_mask = row_ok[:, None] & d_ok[None, :]
    if NUM_SPLITS > 1:
        part = part_out_ptr + t_idx[:, None] * stride_pt + head[:, None] * stride_ph + split * stride_ps
        tl.store(part + d[None, :], o, mask=out_mask)
        lse = tl.where(l_i > 0, m_i + tl.log2(l_safe), float("-inf"))
        tl.store(part_lse_ptr + t_idx * stride_lt + head * stride_lh + split, lse, mask=row_ok)
    else:
        tl.store(out_ptr + t_idx[:, None] * stride_ot + head[:, None] * stride_oh + d[None, :],
                 o.to(out_ptr.dtype.element_ty), mask=out_mask)


@triton.jit
def _split_kv_reduce_kernel(
        out_ptr,              # [T, H, D]
        part_out_ptr,         # [T, H, NUM_SPLITS, D] float32
        part_lse_ptr,         # [T, H, NUM_SPLITS] float32
        tile_seq_ptr,         # [num_tiles] int32 (decode tiles: one token each)
        seq_q_start_ptr,      # [S] int32
        stride_ot, stride_oh, stride_pt, stride_ph, stride_ps, stride_lt, stride_lh,
        HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
        NUM_SPLITS: tl.constexpr, BLOCK_SPLITS: tl.constexpr):
    tile = tl.program_id(0)
    head = tl.program_id(1)
    t_idx = tl.load(seq_q_start_ptr + tl.load(tile_seq_ptr + tile)).to(tl.int64)
    sp = tl.arange(0, BLOCK_SPLITS)
    sp_ok = sp < NUM_SPLITS
    d = tl.arange(0, BLOCK_D)
    d_ok = d < HEAD_DIM
    lse = tl.load(part_lse_ptr + t_idx * stride_lt + head * stride_lh + sp, mask=sp_ok,
                  other=float("-inf"))                                         # [BLOCK_SPLITS]
    # Split 0 always holds the row's first run, so the max is finite.
    w = tl.exp2(lse - tl.max(lse, 0))
    part = tl.load(part_out_ptr + t_idx * stride_pt + head * stride_ph + sp[:, None] * stride_ps + d[None, :],
                   mask=sp_ok[:, None] & d_ok[None, :], other=0.0)             # [BLOCK_SPLITS, BLOCK_D]
    o = tl.sum(part * w[:, None], 0) / tl.sum(w, 0)
    tl.store(out_ptr + t_idx * stride_ot + head * stride_oh + d, o.to(out_ptr.dtype.element_ty), mask=d_ok)


def paged_attention(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor,
                    meta: PagedAttentionMetadata, out: torch.Tensor | None = None,
                    sm_scale: float | None = None) -> torch.Tensor:
    """q [T, H, D]; k_pool, v_pool [num_slots, Hkv, D] (one layer, keys after RoPE)
    -> out [T, H, D]: each new token attends to its sequence's context in the pool."""
    T, H, D = q.shape
    num_slots, Hkv, Dk = k_pool.shape
    assert T == meta.num_tokens, f"q has {T} tokens, the metadata {meta.num_tokens}"
    assert v_pool.shape == k_pool.shape and Dk == D, \
        f"pool {tuple(k_pool.shape)} / {tuple(v_pool.shape)}, q {tuple(q.shape)}"
    assert H == Hkv * meta.num_queries_per_kv, f"{H} query heads, {Hkv} KV heads, metadata G={meta.num_queries_per_kv}"
    assert q.dtype in DTYPES and q.dtype == k_pool.dtype == v_pool.dtype, (q.dtype, k_pool.dtype, v_pool.dtype)
    assert q.stride(-1) == k_pool.stride(-1) == v_pool.stride(-1) == 1, "head_dim must be contiguous"
    assert num_slots % meta.block_size == 0, f"{num_slots} slots is not a whole number of {meta.block_size}-slot blocks"
    if out is None:
        out = torch.empty((T, H, D), dtype=q.dtype, device=q.device)
    assert out.shape == q.shape and out.dtype == q.dtype and out.stride(-1) == 1
    scale = (sm_scale if sm_scale is not None else 1.0 / math.sqrt(D)) * LOG2E
    for tiles in (meta.decode, meta.prefill):
        if tiles is not None:
            _launch(q, k_pool, v_pool, out, meta, tiles, scale)
    return out


def _launch(q, k_pool, v_pool, out, meta: PagedAttentionMetadata, tiles: AttentionTiles, qk_scale: float) -> None:
    T, H, D = q.shape
    splits = tiles.num_splits
    # Grid: one program per (query tile, KV head[, KV split]). A tile is BLOCK_Q new tokens
    # of one sequence times its G query heads.
    grid = (tiles.num_tiles, k_pool.shape[1], splits)
    if splits > 1:
        part_out = torch.empty((T, H, splits, D), dtype=torch.float32, device=q.device)
        part_lse = torch.empty((T, H, splits), dtype=torch.float32, device=q.device)
    else:
        part_out = part_lse = out.new_empty((1, 1, 1, 1), dtype=torch.float32)
    _paged_attention_kernel[grid](
        out_ptr=out, part_out_ptr=part_out, part_lse_ptr=part_lse, q_ptr=q,
        k_pool_ptr=k_pool, v_pool_ptr=v_pool,
        block_tables_ptr=meta.block_tables, block_starts_ptr=meta.block_starts,
        seq_q_start_ptr=meta.seq_q_start, seq_num_new_ptr=meta.seq_num_new,
        seq_ctx_len_ptr=meta.seq_ctx_len, seq_from_right_ptr=meta.seq_from_right,
        tile_seq_ptr=tiles.tile_seq, tile_q_start_ptr=tiles.tile_q_start,
        tile_num_blocks_ptr=tiles.tile_num_blocks,
        stride_qt=q.stride(0), stride_qh=q.stride(1), stride_ot=out.stride(0), stride_oh=out.stride(1),
        stride_ks=k_pool.stride(0), stride_kh=k_pool.stride(1),
        stride_vs=v_pool.stride(0), stride_vh=v_pool.stride(1),
        stride_pt=part_out.stride(0), stride_ph=part_out.stride(1), stride_ps=part_out.stride(2),
        stride_lt=part_lse.stride(0), stride_lh=part_lse.stride(1),
        stride_bt=meta.block_tables.stride(0), stride_bs=meta.block_starts.stride(0),
        qk_scale=qk_scale,
        G=meta.num_queries_per_kv, BLOCK_M=tiles.block_m, BLOCK_Q=tiles.block_q,
        HEAD_DIM=D, BLOCK_D=max(16, triton.next_power_of_2(D)), BLOCK_SIZE=meta.block_size,
        TILE_N=meta.tile_n, NUM_SPLITS=splits,
        # fp32 must not drop to tf32 (1e-5 parity); 16-bit inputs ignore the setting.
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        num_warps=4, num_stages=2)
    if splits > 1:
        # Grid: one program per (decode row, query head) merges that row's splits.
        _split_kv_reduce_kernel[(tiles.num_tiles, H)](
            out_ptr=out, part_out_ptr=part_out, part_lse_ptr=part_lse,
            tile_seq_ptr=tiles.tile_seq, seq_q_start_ptr=meta.seq_q_start,
            stride_ot=out.stride(0), stride_oh=out.stride(1),
            stride_pt=part_out.stride(0), stride_ph=part_out.stride(1), stride_ps=part_out.stride(2),
            stride_lt=part_lse.stride(0), stride_lh=part_lse.stride(1),
            HEAD_DIM=D, BLOCK_D=triton.next_power_of_2(D),
            NUM_SPLITS=splits, BLOCK_SPLITS=triton.next_power_of_2(splits), num_warps=4)
