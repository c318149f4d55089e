"""The paged-attention kernel against its plain-torch reference (kernels/reference.py).

Batches come from the real BlockAllocator, grown in random interleaved chunks with BE
sequences paused in between, so RT runs take the free left parts of BE blocks: both
directions, shared blocks and short runs are in every batch (asserted). Unwritten pool
slots and the output are NaN beforehand: reading a slot that is not the sequence's, or
leaving a row unwritten, fails the comparison.

Off-GPU this runs in Triton's interpreter (conftest sets TRITON_INTERPRET=1), which costs
tens of ms per program per KV tile: shapes stay small.
"""
import itertools
import os
import random

import pytest
import torch

from kernels.attention_metadata import build_paged_metadata
from kernels.backend import TritonAttention
from kernels.paged_attention import paged_attention
from kernels.reference import paged_attention_ref
from worker_svc.attention import BatchSeq, TorchAttention
from worker_svc.block_allocator import BlockAllocator, SeqClass
from worker_svc.kv_cache import KVCache

ON_GPU = torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1"
DEVICE = "cuda" if ON_GPU else "cpu"
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}
GQA = {1: (2, 2), 3: (6, 2), 4: (4, 1)}          # G -> (num_heads, num_kv_heads)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref).abs().max() / ref.abs().max()).item()


# ---- batches from the real allocator -----------------------------------------------

def random_batch(seed: int, block_size: int, kind: str, num_seqs: int = 5, max_ctx: int | None = None):
    """(seqs in engine order: single-token rows first, num_blocks). kind: decode | prefill | mixed."""
    rng = random.Random(seed)
    for _ in range(100):
        found = _try_batch(rng, block_size, kind, num_seqs, max_ctx or 2 * block_size + 4)
        if found is not None:
            return found
    raise AssertionError(f"no batch with shared blocks in both directions (seed {seed})")


def _try_batch(rng, B, kind, num_seqs, max_ctx):
    target = {f"s{i}": rng.randint(2, max_ctx) for i in range(num_seqs)}
    # A pool a little short of the demand: free blocks run out, so runs start sharing.
    alloc = BlockAllocator(num_blocks=max(3, sum(target.values()) // B), block_size=B, max_num_host_slots=1 << 20)
    for i, sid in enumerate(target):
        alloc.add_sequence(sid, (SeqClass.RT, SeqClass.BE)[(i + rng.randint(0, 1)) % 2])
    while target:
        sid = rng.choice(sorted(target))
        seq = alloc.seqs[sid]
        n = min(target[sid], rng.randint(1, B // 2))
        if seq.num_host_tokens or alloc.capacity(sid) < n:   # evicted by RT growth, or full
            del target[sid]
            continue
        be = seq.seq_class == SeqClass.BE
        if be:
            alloc.resume(sid)
        alloc.allocate(sid, n)
        if be:
            alloc.pause(sid)    # a paused BE lets RT take the free left part of its block
        target[sid] -= n
        if not target[sid]:
            del target[sid]
    alloc.check_integrity()
    members = [s for s in sorted(alloc.seqs) if alloc.seqs[s].num_tokens >= 2 and not alloc.seqs[s].num_host_tokens]
    runs = {s: [(r.block_id, r.num_tokens) for r in alloc.seqs[s].runs] for s in members}
    cls = {s: alloc.seqs[s].seq_class for s in members}
    rt_blocks = {b for s in members if cls[s] == SeqClass.RT for b, _ in runs[s]}
    be_blocks = {b for s in members if cls[s] == SeqClass.BE for b, _ in runs[s]}
    if not (rt_blocks & be_blocks) or not any(len(r) > 1 for r in runs.values()):
        return None
    new = {s: _num_new(rng, kind, i, alloc.seqs[s].num_tokens) for i, s in enumerate(members)}
    if kind == "mixed" and len({n == 1 for n in new.values()}) < 2:
        return None
    members.sort(key=lambda s: new[s] != 1)
    seqs = [BatchSeq(list(alloc.slots(s)), new[s], runs[s], cls[s] == SeqClass.BE) for s in members]
    return seqs, alloc.num_blocks


def _num_new(rng, kind, i, ctx):
    if kind == "decode" or (kind == "mixed" and i % 2 == 0):
        return 1
    # A whole prompt, or a later chunk that also sees the context before it.
    return ctx if rng.random() < 0.5 else rng.randint(2, ctx)


def fill_pool(seqs, num_slots, num_kv_heads, head_dim, dtype):
    """NaN everywhere but the batch's slots, which get random K/V."""
    k_pool = torch.full((num_slots, num_kv_heads, head_dim), float("nan"), dtype=dtype, device=DEVICE)
    v_pool = k_pool.clone()
    for s in seqs:
        idx = torch.tensor(s.ctx_slots, device=DEVICE)
        k_pool[idx] = torch.randn(len(idx), num_kv_heads, head_dim, device=DEVICE).to(dtype)
        v_pool[idx] = torch.randn(len(idx), num_kv_heads, head_dim, device=DEVICE).to(dtype)
    return k_pool, v_pool


def run_and_compare(seqs, num_slots, B, G, D, dtype, **options):
    H, Hkv = GQA[G]
    k_pool, v_pool = fill_pool(seqs, num_slots, Hkv, D, dtype)
    T = sum(s.num_new_tokens for s in seqs)
    q = torch.randn(T, H, D, device=DEVICE).to(dtype)
    meta = build_paged_metadata(seqs, B, H, Hkv, DEVICE, **options)
    out = paged_attention(q, k_pool, v_pool, meta, out=torch.full_like(q, float("nan")))
    err = rel_err(out, paged_attention_ref(q, k_pool, v_pool, seqs))
    assert err < TOL[dtype], f"relative error {err:.2e} (G={G}, D={D}, B={B}, {dtype})"
    return meta


# ---- the matrix ----------------------------------------------------------------------

CASES = [(dtype, G, kind) for dtype, G, kind in itertools.product(
    (torch.float32, torch.float16), (1, 3, 4), ("decode", "prefill", "mixed"))]


@pytest.mark.parametrize("dtype,G,kind", CASES, ids=[f"{str(d)[6:]}-G{g}-{k}" for d, g, k in CASES])
def test_matches_reference_in_both_directions_with_shared_blocks(dtype, G, kind):
    i = CASES.index((dtype, G, kind))
    D, B = (64, 128)[i % 2], (16, 32)[(i // 2) % 2]     # every pairing of head and block size occurs
    seqs, num_blocks = random_batch(seed=100 + i, block_size=B, kind=kind)
    # Small prefill tiles (16 or 32 rows: 16, 10 or 8 tokens) so chunks span several.
    meta = run_and_compare(seqs, num_blocks * B, B, G, D, dtype, prefill_block_m=16 * min(G, 2))
    assert (meta.decode is None) == (kind == "prefill") and (meta.prefill is None) == (kind == "decode")
    if meta.prefill is not None:
        assert meta.prefill.num_tiles > sum(s.num_new_tokens > 1 for s in seqs), "no chunk spans two tiles"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["float32", "float16"])
def test_split_kv_past_the_threshold(dtype):
    """A decode row with a context over SPLIT_KV_MIN_CONTEXT, next to a short one, takes
    the split path (with some splits empty for the short row) and still matches."""
    from kernels.attention_metadata import SPLIT_KV_MIN_CONTEXT
    B, G, D = 32, 4, 64
    alloc = BlockAllocator(num_blocks=24, block_size=B)
    alloc.add_sequence("long", SeqClass.BE)
    alloc.add_sequence("short", SeqClass.RT)
    alloc.allocate("long", SPLIT_KV_MIN_CONTEXT + 40)
    alloc.allocate("short", 7)
    seqs = [BatchSeq(list(alloc.slots(s)), 1, [(r.block_id, r.num_tokens) for r in alloc.seqs[s].runs],
                     s == "long") for s in ("long", "short")]
    meta = run_and_compare(seqs, alloc.num_blocks * B, B, G, D, dtype)
    assert meta.decode.num_splits > 1


def test_offsets_past_int32():
    """Blocks at the far end of a pool of more than 2^31 elements per layer: slot * stride
    only fits in 64 bits. The pool is virtual memory; only the touched pages get real."""
    B, G, D, dtype = 16, 4, 64, torch.float16
    H, Hkv = GQA[G]
    seqs, num_blocks = random_batch(seed=7, block_size=B, kind="mixed")
    base_block = (1 << 31) // (B * Hkv * D) + 1
    shifted = [BatchSeq([base_block * B + s for s in seq.ctx_slots], seq.num_new_tokens,
                        [(base_block + b, n) for b, n in seq.runs], seq.from_right) for seq in seqs]
    num_slots = (base_block + num_blocks) * B
    assert min(min(s.ctx_slots) for s in shifted) * Hkv * D >= 1 << 31
    k_pool = torch.empty((num_slots, Hkv, D), dtype=dtype, device=DEVICE)
    v_pool = torch.empty_like(k_pool)
    span = slice(base_block * B, num_slots)
    k_pool[span], v_pool[span] = fill_pool(seqs, num_blocks * B, Hkv, D, dtype)
    T = sum(s.num_new_tokens for s in seqs)
    q = torch.randn(T, H, D, device=DEVICE).to(dtype)
    meta = build_paged_metadata(shifted, B, H, Hkv, DEVICE)
    out = paged_attention(q, k_pool, v_pool, meta, out=torch.full_like(q, float("nan")))
    ref = paged_attention_ref(q, k_pool[span], v_pool[span], seqs)
    assert rel_err(out, ref) < TOL[dtype]


@pytest.mark.skipif(not ON_GPU, reason="the Triton interpreter's bf16 tl.dot is wrong: bf16 runs on a GPU only")
@pytest.mark.parametrize("kind", ["decode", "prefill", "mixed"])
def test_bfloat16_on_gpu(kind):
    seqs, num_blocks = random_batch(seed=300, block_size=16, kind=kind)
    run_and_compare(seqs, num_blocks * 16, 16, 4, 128, torch.bfloat16)


# ---- the backend, as the worker drives it --------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["float32", "float16"])
def test_backend_writes_then_attends_like_the_torch_path(dtype):
    """TritonAttention.forward (KV write, then attention): it leaves the pool exactly as the
    torch path does, and its output matches the reference over that pool."""
    from conftest import poison
    B, G, D = 16, 3, 64
    H, Hkv = GQA[G]
    seqs, num_blocks = random_batch(seed=11, block_size=B, kind="mixed")
    caches = [KVCache(2, num_blocks * B, Hkv, D, dtype, DEVICE) for _ in range(2)]
    for cache in caches:
        poison(cache)
    for s in seqs:                       # the context before this step, identical in both
        old = torch.tensor(s.ctx_slots[:len(s.ctx_slots) - s.num_new_tokens], dtype=torch.long, device=DEVICE)
        kv = torch.randn(2, len(old), Hkv, D, device=DEVICE).to(dtype)
        for cache in caches:
            cache.k[1, old], cache.v[1, old] = kv[0], kv[1]
    T = sum(s.num_new_tokens for s in seqs)
    q, k, v = (torch.randn(T, h, D, device=DEVICE).to(dtype) for h in (H, Hkv, Hkv))
    torch_attn, triton_attn = TorchAttention(caches[0], B), TritonAttention(caches[1], B, H)
    torch_attn.forward(1, q, k, v, torch_attn.build_metadata(seqs))
    out = triton_attn.forward(1, q, k, v, triton_attn.build_metadata(seqs))
    assert torch.equal(caches[0].k, caches[1].k) and torch.equal(caches[0].v, caches[1].v)
    assert rel_err(out, paged_attention_ref(q, caches[1].k[1], caches[1].v[1], seqs)) < TOL[dtype]
