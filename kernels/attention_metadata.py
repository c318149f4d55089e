"""What the paged-attention kernel needs to know about a step, built once per step.

The kernel reads each sequence's runs (one per block, in token order) in place. A run of
n tokens that starts at token index c of its sequence covers, in block b:

    RT run (from the left):   offset o holds token c + o            for o in [0, n)
    BE run (from the right):  offset o holds token c + (B - 1 - o)  for o in [B - n, B)

so one rule serves both directions and shared blocks: a slot's token position is
`c + o` or `c + B - 1 - o`, and the slot is the sequence's iff that position is below the
next run's start. The kernel never sees the other owner's slots of a shared block: they
fall outside the run and are masked before they are loaded.

Work is cut into tiles: a tile is up to BLOCK_Q of one sequence's new tokens times the
G = H / Hkv query heads that share a KV head, BLOCK_M rows in all (a power of two >= 16
for tl.dot; BLOCK_Q = BLOCK_M // G). Decode rows (one new token) and prefill chunks are
separate launches so each gets its own BLOCK_M: 16 rows for a decode, 64 for a chunk.

All integer arrays travel in one int32 tensor: one host-to-device copy per step.
"""
from __future__ import annotations

import bisect
from dataclasses import dataclass
from itertools import chain

import torch
import triton

DECODE_BLOCK_M = 16        # query rows per decode program (one token x G heads, padded)
PREFILL_BLOCK_M = 64       # query rows per prefill program
TILE_N = 32                # KV slots per inner-loop iteration (may span several blocks)
# Split-KV (flash decoding): a decode row whose context exceeds SPLIT_KV_MIN_CONTEXT is cut
# into up to MAX_NUM_SPLITS pieces of at least MIN_TOKENS_PER_SPLIT, but only while the
# plain grid (decode rows x KV heads) is too small to fill the device.
SPLIT_KV_MIN_CONTEXT = 512
MIN_TOKENS_PER_SPLIT = 256
MAX_NUM_SPLITS = 16


@dataclass
class AttentionTiles:
    """One launch's work list."""
    tile_seq: torch.Tensor         # [num_tiles] int32: the tile's sequence (index into seq_* arrays)
    tile_q_start: torch.Tensor     # [num_tiles] int32: first new token of the tile, counted within the chunk
    tile_num_blocks: torch.Tensor  # [num_tiles] int32: runs the tile reads (its causal horizon)
    num_tiles: int
    block_m: int                   # query rows per program: block_q tokens x G heads, padded
    block_q: int                   # new tokens per tile
    num_splits: int                # KV splits per tile; 1 = the plain path


@dataclass
class PagedAttentionMetadata:
    slot_mapping: torch.Tensor     # [T] int32: where each new token's K/V goes
    block_tables: torch.Tensor     # [S, max_blocks] int32: each sequence's blocks, in token order
    block_starts: torch.Tensor     # [S, max_blocks + 1] int32: token index where each run starts;
                                   #   entry [s, num_runs] is the context length
    seq_q_start: torch.Tensor      # [S] int32: row in q of the sequence's first new token
    seq_num_new: torch.Tensor      # [S] int32: new tokens this step (the last ones of the context)
    seq_ctx_len: torch.Tensor      # [S] int32: context length after this step's writes
    seq_from_right: torch.Tensor   # [S] int32: 1 = BE (runs at the right end of their blocks)
    decode: AttentionTiles | None  # tiles of the single-token rows
    prefill: AttentionTiles | None  # tiles of the multi-token chunks
    num_tokens: int                # T
    num_decode: int                # leading single-token rows (the torch metadata's meaning)
    num_queries_per_kv: int        # G
    block_size: int
    tile_n: int


def build_paged_metadata(seqs, block_size: int, num_heads: int, num_kv_heads: int,
                         device: torch.device | str = "cpu", *, target_num_programs: int = 128,
                         prefill_block_m: int = PREFILL_BLOCK_M, tile_n: int = TILE_N,
                         split_kv_min_context: int = SPLIT_KV_MIN_CONTEXT,
                         min_tokens_per_split: int = MIN_TOKENS_PER_SPLIT) -> PagedAttentionMetadata:
    """seqs: BatchSeq-like (ctx_slots, num_new_tokens, runs, from_right), in q's token order.

    target_num_programs: how many programs fill the device (about 2 per SM); split-KV only
    kicks in while decode rows x KV heads stays below it.
    """
    if num_heads % num_kv_heads:
        raise ValueError(f"num_heads {num_heads} is not a multiple of num_kv_heads {num_kv_heads}")
    if tile_n < 16 or tile_n & (tile_n - 1):
        raise ValueError(f"tile_n must be a power of two >= 16 (tl.dot), got {tile_n}")
    G = num_heads // num_kv_heads
    max_blocks = max((len(s.runs) for s in seqs), default=1)
    slot_mapping, tables, starts = [], [], []
    q_start, num_new, ctx_len, from_right, num_runs = [], [], [], [], []
    row = 0
    for s in seqs:
        n, ctx = s.num_new_tokens, len(s.ctx_slots)
        if not 1 <= n <= ctx:
            raise ValueError(f"num_new_tokens must be in [1, {ctx}], got {n}")
        run_starts = _run_starts(s.runs, ctx)
        slot_mapping += s.ctx_slots[ctx - n:]
        tables.append([b for b, _ in s.runs] + [0] * (max_blocks - len(s.runs)))
        starts.append(run_starts + [ctx] * (max_blocks - len(s.runs)))
        q_start.append(row)
        num_new.append(n)
        ctx_len.append(ctx)
        from_right.append(int(s.from_right))
        num_runs.append(len(s.runs))
        row += n
    decode_ids = [i for i, n in enumerate(num_new) if n == 1]
    prefill_ids = [i for i, n in enumerate(num_new) if n > 1]
    decode_bm = max(DECODE_BLOCK_M, triton.next_power_of_2(G))
    prefill_bm = max(prefill_block_m, triton.next_power_of_2(G))
    num_splits = choose_num_splits(max((ctx_len[i] for i in decode_ids), default=0),
                                   len(decode_ids) * num_kv_heads, target_num_programs,
                                   split_kv_min_context, min_tokens_per_split)
    decode = _tiles(decode_ids, num_new, ctx_len, starts, num_runs, decode_bm // G)
    prefill = _tiles(prefill_ids, num_new, ctx_len, starts, num_runs, prefill_bm // G)

    # One int32 buffer, one copy to the device; every field is a view into it.
    parts = [slot_mapping, list(chain.from_iterable(tables)), list(chain.from_iterable(starts)),
             q_start, num_new, ctx_len, from_right, *decode, *prefill]
    flat = torch.tensor(list(chain.from_iterable(parts)), dtype=torch.int32).to(device, non_blocking=True)
    views = flat.split([len(p) for p in parts])
    S = len(seqs)

    def tiles(t: tuple[torch.Tensor, ...], block_m: int, splits: int) -> AttentionTiles | None:
        if not t[0].numel():
            return None
        return AttentionTiles(*t, num_tiles=t[0].numel(), block_m=block_m, block_q=block_m // G, num_splits=splits)

    return PagedAttentionMetadata(
        slot_mapping=views[0], block_tables=views[1].view(S, max_blocks),
        block_starts=views[2].view(S, max_blocks + 1), seq_q_start=views[3], seq_num_new=views[4],
        seq_ctx_len=views[5], seq_from_right=views[6],
        decode=tiles(views[7:10], decode_bm, num_splits), prefill=tiles(views[10:13], prefill_bm, 1),
        num_tokens=row, num_decode=_num_leading_decodes(num_new), num_queries_per_kv=G,
        block_size=block_size, tile_n=tile_n)


def choose_num_splits(max_ctx: int, num_programs: int, target_num_programs: int,
                      min_context: int = SPLIT_KV_MIN_CONTEXT,
                      min_tokens_per_split: int = MIN_TOKENS_PER_SPLIT) -> int:
    """KV splits for the decode launch: more programs only pay while the grid is small and
    each split still streams a few hundred tokens (the reduce pass costs one more launch)."""
    if max_ctx <= min_context or num_programs == 0 or num_programs >= target_num_programs:
        return 1
    return max(1, min(MAX_NUM_SPLITS, target_num_programs // num_programs,
                      triton.cdiv(max_ctx, min_tokens_per_split)))


def _run_starts(runs, ctx: int) -> list[int]:
    """[c_0, c_1, ..., c_n = ctx]: the token index where each run starts."""
    starts, c = [], 0
    for _, n in runs:
        starts.append(c)
        c += n
    if c != ctx:
        raise ValueError(f"runs hold {c} tokens but ctx_slots has {ctx}")
    return starts + [c]


def _tiles(ids: list[int], num_new: list[int], ctx_len: list[int], starts: list[list[int]],
           num_runs: list[int], block_q: int) -> tuple[list[int], list[int], list[int]]:
    """(tile_seq, tile_q_start, tile_num_blocks) covering these sequences' new tokens."""
    tile_seq, tile_q, tile_nb = [], [], []
    for i in ids:
        n, ctx = num_new[i], ctx_len[i]
        for q0 in range(0, n, block_q):
            last_pos = ctx - n + min(q0 + block_q, n) - 1
            tile_seq.append(i)
            tile_q.append(q0)
            # Only runs that start at or before the tile's last query position: the rest
            # lie wholly in its causal future, so the tile never loads them.
            tile_nb.append(bisect.bisect_right(starts[i], last_pos, 0, num_runs[i]))
    return tile_seq, tile_q, tile_nb


def _num_leading_decodes(num_new: list[int]) -> int:
    k = 0
    while k < len(num_new) and num_new[k] == 1:
        k += 1
    return k
