"""Attention over the bidirectional KV pool: the torch path (CPU and CUDA).

A step's T new tokens come from many sequences; the engine orders them so that the
single-token rows (decodes, or a prefill's last token) come first:

    tokens: [ d0 d1 ... d(Sd-1) | chunk of p0 ........ | chunk of p1 .... ]

Each sequence's context is a list of slots in token order (RT slots read left to right
within a block, BE slots right to left: the allocator already ordered them), so the
direction a block fills in never reaches this code. Keys are stored after RoPE, which
makes the slot order irrelevant to the math: only which slots belong to whom matters.

Decode rows read whole blocks: one row copy of B slots per block is several times faster
on CPU than gathering slot by slot, and a per-slot mask drops what is not the row's own
(the free middle of a block, or the other class's end of a shared block). Prefill chunks
gather their slots in token order, since the causal mask needs positions.

Metadata is built once per step and shared by every layer. The Triton kernels (kernels/)
plug in behind the same `forward(layer_idx, q, k, v, meta)` seam.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .kv_cache import KVCache


@dataclass
class BatchSeq:
    """One sequence's part of a step, as the engine hands it to the attention backend."""
    ctx_slots: list[int]     # every slot of the sequence after this step's writes, in token order
    num_new_tokens: int      # the last num_new_tokens of ctx_slots are this step's tokens
    runs: list[tuple[int, int]]  # (block_id, num_tokens) per block, in token order
    from_right: bool         # BE: each run sits at the right end of its block


@dataclass
class PrefillRow:
    start: int               # first of this chunk's tokens in the step's token order
    num_tokens: int
    ctx_slots: torch.Tensor  # [ctx] long
    mask: torch.Tensor | None  # [num_tokens, ctx] bool (True = attend); None = plain causal


@dataclass
class TorchAttentionMetadata:
    slot_mapping: torch.Tensor           # [T] long: where each new token's K/V is written
    num_decode: int                      # the first num_decode tokens are single-token rows
    decode_blocks: torch.Tensor | None   # [Sd, max_blocks] long, padded with the row's first block
    decode_mask: torch.Tensor | None     # [Sd, 1, 1, max_blocks * B] bool: the slot is the row's
    prefills: list[PrefillRow]


def build_metadata(seqs: list[BatchSeq], block_size: int,
                   device: torch.device | str = "cpu") -> TorchAttentionMetadata:
    """seqs in token order, single-token rows first."""
    slot_mapping = [s for seq in seqs for s in seq.ctx_slots[len(seq.ctx_slots) - seq.num_new_tokens:]]
    num_decode = 0
    while num_decode < len(seqs) and seqs[num_decode].num_new_tokens == 1:
        num_decode += 1
    decode_blocks = decode_mask = None
    if num_decode:
        decode_blocks, decode_mask = _decode_block_tables(seqs[:num_decode], block_size, device)
    prefills, start = [], num_decode
    for seq in seqs[num_decode:]:
        if seq.num_new_tokens < 1:
            raise ValueError("every sequence in a step processes at least one token")
        ctx, n = len(seq.ctx_slots), seq.num_new_tokens
        mask = None
        if ctx != n:  # earlier chunks are visible to all; causal within this chunk
            q_pos = torch.arange(ctx - n, ctx, device=device)
            mask = torch.arange(ctx, device=device)[None, :] <= q_pos[:, None]
        prefills.append(PrefillRow(start, n, torch.tensor(seq.ctx_slots, dtype=torch.long, device=device), mask))
        start += n
    return TorchAttentionMetadata(torch.tensor(slot_mapping, dtype=torch.long, device=device),
                                  num_decode, decode_blocks, decode_mask, prefills)


def build_row_metadata(seqs: list[BatchSeq], block_size: int,
                       device: torch.device | str = "cpu") -> TorchAttentionMetadata:
    """The same step with every new token a single-token row, prompt tokens included: the
    shape the C++ stack runs (cpu_decode.py). A prompt token's row reads its sequence's
    blocks, and its mask keeps the sequence's slots up to its own position, which makes
    causality a matter of the mask:

        chunk of 3 after 2 computed, RT blocks [7, 2], B = 4:
          row (pos 2)  cols  b7: 1 1 1 0   b2: 0 0 0 0
          row (pos 3)        b7: 1 1 1 1   b2: 0 0 0 0
          row (pos 4)        b7: 1 1 1 1   b2: 1 0 0 0

    A step of decodes only is exactly build_metadata's."""
    if all(seq.num_new_tokens == 1 for seq in seqs):
        return build_metadata(seqs, block_size, device)
    B = block_size
    max_blocks = max(len(seq.runs) for seq in seqs)
    num_rows = sum(seq.num_new_tokens for seq in seqs)
    tables = torch.empty(num_rows, max_blocks, dtype=torch.long)
    mask = torch.zeros(num_rows, max_blocks * B, dtype=torch.bool)
    slot_mapping, row = [], 0
    for seq in seqs:
        n, ctx = seq.num_new_tokens, len(seq.ctx_slots)
        if n < 1:
            raise ValueError("every sequence in a step processes at least one token")
        blocks = [b for b, _ in seq.runs]
        tables[row:row + n] = torch.tensor(blocks + blocks[:1] * (max_blocks - len(blocks)))
        slots = torch.tensor(seq.ctx_slots, dtype=torch.long)
        # Each context slot's column among the row's gathered blocks: its run's index, then
        # its offset in the block (either direction: the offset is the slot's own).
        run_index = torch.repeat_interleave(torch.arange(len(blocks)), torch.tensor([k for _, k in seq.runs]))
        visible = torch.arange(ctx)[None, :] <= torch.arange(ctx - n, ctx)[:, None]   # [n, ctx]
        mask[row:row + n, run_index * B + slots % B] = visible
        slot_mapping += seq.ctx_slots[ctx - n:]
        row += n
    return TorchAttentionMetadata(torch.tensor(slot_mapping, dtype=torch.long, device=device), num_rows,
                                  tables.to(device), mask.to(device)[:, None, None, :], [])


def _decode_block_tables(seqs: list[BatchSeq], B: int, device) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Each row's blocks and, per slot of those blocks, whether it holds the row's KV."""
    max_blocks = max(len(s.runs) for s in seqs)
    tables, masks, full = [], [], True
    for seq in seqs:
        blocks = [b for b, _ in seq.runs]
        tables.append(blocks + blocks[:1] * (max_blocks - len(blocks)))
        row = []
        for _, n in seq.runs:
            row += [False] * (B - n) + [True] * n if seq.from_right else [True] * n + [False] * (B - n)
            full = full and n == B
        row += [False] * (B * (max_blocks - len(blocks)))
        full = full and len(blocks) == max_blocks
        masks.append(row)
    mask = None if full else torch.tensor(masks, dtype=torch.bool, device=device)[:, None, None, :]
    return torch.tensor(tables, dtype=torch.long, device=device), mask


class TorchAttention:
    """The reference attention backend: gather each sequence's slots, then SDPA."""

    name = "torch"

    def __init__(self, cache: KVCache, block_size: int):
        self.cache = cache
        self.block_size = block_size

    def build_metadata(self, seqs: list[BatchSeq]) -> TorchAttentionMetadata:
        return build_metadata(seqs, self.block_size, self.cache.device)

    def build_row_metadata(self, seqs: list[BatchSeq]) -> TorchAttentionMetadata:
        return build_row_metadata(seqs, self.block_size, self.cache.device)

    def forward(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                meta: TorchAttentionMetadata) -> torch.Tensor:
        kc, vc = self.cache.k[layer_idx], self.cache.v[layer_idx]    # [slots, Hkv, D]
        kc.index_copy_(0, meta.slot_mapping, k)
        vc.index_copy_(0, meta.slot_mapping, v)
        num_heads, head_dim = q.shape[1], q.shape[2]
        num_kv_heads = k.shape[1]
        out = torch.empty_like(q)
        sd = meta.num_decode
        if sd:
            # Group query heads under their KV head: q head h reads KV head h // G, so one
            # batched matmul per KV head serves all G query heads without repeating K/V.
            qd = q[:sd].view(sd, num_kv_heads, num_heads // num_kv_heads, head_dim)
            kd = self._gather_blocks(kc, meta.decode_blocks).transpose(1, 2)   # [Sd, Hkv, nb*B, D]
            vd = self._gather_blocks(vc, meta.decode_blocks).transpose(1, 2)
            od = F.scaled_dot_product_attention(qd, kd, vd, attn_mask=meta.decode_mask)
            out[:sd] = od.reshape(sd, num_heads, head_dim)
        for row in meta.prefills:
            qp = q[row.start:row.start + row.num_tokens].transpose(0, 1)[None]   # [1, H, n, D]
            kp = _gather(kc, row.ctx_slots).transpose(0, 1)[None]                # [1, Hkv, ctx, D]
            vp = _gather(vc, row.ctx_slots).transpose(0, 1)[None]
            op = F.scaled_dot_product_attention(qp, kp, vp, attn_mask=row.mask,
                                                is_causal=row.mask is None, enable_gqa=True)
            out[row.start:row.start + row.num_tokens] = op[0].transpose(0, 1)
        return out

    def _gather_blocks(self, cache: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
        """cache [num_slots, Hkv, D], blocks [Sd, nb] -> [Sd, nb * B, Hkv, D]."""
        B = self.block_size
        rows = cache.view(cache.shape[0] // B, -1).index_select(0, blocks.reshape(-1))
        return rows.view(blocks.shape[0], blocks.shape[1] * B, *cache.shape[1:])


def _gather(cache: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """cache [num_slots, Hkv, D], slots [...] -> [..., Hkv, D]. index_select on whole rows
    of the flattened pool is a plain row copy: ~2x faster than advanced indexing on CPU."""
    rows = cache.view(cache.shape[0], -1).index_select(0, slots.reshape(-1))
    return rows.view(*slots.shape, *cache.shape[1:])
