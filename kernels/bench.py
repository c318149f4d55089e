"""`make bench-kernels`: every kernel of this package timed on CUDA against a dense
baseline over the same data, and its achieved memory bandwidth against the device's.

    attention (decode, prefill, mixed)   vs F.scaled_dot_product_attention over the same
                                         keys already gathered contiguous (the gather is
                                         not timed: the baseline's best case)
    kv_write                             vs index_copy_ into the same slots
    checkpoint gather / scatter          vs index_select / index_copy_ over all layers

Bandwidth is the bytes a kernel cannot avoid (every K/V slot of every context read once,
q read, out written; or a copy's read plus write) over its median time, beside the
device's copy bandwidth (a 1 GiB device-to-device copy_: read plus write bytes over
time). Decode is bound by that number: see docs/kernels.md.

Pools hold their sequences' blocks in a random order, half the sequences BE (read right
to left), so the kernels pay for paging as they would in the worker. Prints a table and
writes bench/out/kernels.json. A benchmark, not a test: it asserts nothing. Without CUDA
it says so and exits 0; `--smoke` runs tiny shapes through the interpreter instead
(TRITON_INTERPRET=1), to check this script, not to measure anything.
"""
from __future__ import annotations

import argparse
import json
import platform
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
import triton

from worker_svc.attention import BatchSeq

from .attention_metadata import build_paged_metadata
from .kv_write import write_kv
from .paged_attention import paged_attention
from .slot_copy import gather_slots, scatter_slots

OUT = Path("bench/out/kernels.json")


@dataclass(frozen=True)
class Shape:
    num_heads: int
    num_kv_heads: int
    head_dim: int
    block_size: int
    num_layers: int          # checkpoint copies move every layer
    dtype: torch.dtype


# Llama-3-8B's attention (32 query heads over 8 KV heads of 128) at the pool's default block.
GPU_SHAPE = Shape(32, 8, 128, 16, 32, torch.float16)
SMOKE_SHAPE = Shape(4, 2, 64, 16, 2, torch.float32)
# (case name, [(context, new tokens)] per sequence)
GPU_CASES = [
    ("decode b1 ctx4k", [(4096, 1)]),
    ("decode b1 ctx32k", [(32768, 1)]),
    ("decode b8 ctx8k", [(8192, 1)] * 8),
    ("decode b64 ctx2k", [(2048, 1)] * 64),
    ("decode b256 ctx1k", [(1024, 1)] * 256),
    ("prefill 1x2048", [(2048, 2048)]),
    ("prefill 4x512 after 1536", [(2048, 512)] * 4),
    ("mixed 64 decodes + 512 chunk", [(2048, 1)] * 64 + [(512, 512)]),
]
SMOKE_CASES = [
    ("decode b2 ctx40", [(40, 1)] * 2),
    ("decode b1 ctx600 (split)", [(600, 1)]),
    ("prefill 1x20", [(20, 20)]),
    ("mixed 2 decodes + 9 chunk", [(40, 1)] * 2 + [(30, 9)]),
]
GPU_COPIES = {"kv_write tokens": 4096, "checkpoint slots": 2048}
SMOKE_COPIES = {"kv_write tokens": 8, "checkpoint slots": 8}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m kernels.bench", description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=OUT)
    p.add_argument("--smoke", action="store_true", help="tiny shapes on CPU under TRITON_INTERPRET=1")
    args = p.parse_args(argv)
    if not args.smoke and not torch.cuda.is_available():
        print("make bench-kernels needs a CUDA device and torch sees none: nothing to measure.")
        return 0
    device = "cpu" if args.smoke else "cuda"
    if args.smoke:
        shape, cases, copies = SMOKE_SHAPE, SMOKE_CASES, SMOKE_COPIES
    else:
        shape, cases, copies = GPU_SHAPE, GPU_CASES, GPU_COPIES
    copy_gbs = copy_bandwidth_gbs(device, 1 << 20 if args.smoke else 1 << 30)
    rows = [attention_row(name, spec, shape, device) for name, spec in cases]
    rows += copy_rows(shape, device, copies)
    for r in rows:
        r["pct_of_copy_bw"] = round(100 * r["triton_gbs"] / copy_gbs, 1)
    print_table(rows, copy_gbs)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "device": torch.cuda.get_device_name() if device == "cuda" else platform.processor() or "cpu",
        "smoke": args.smoke, "dtype": str(shape.dtype).removeprefix("torch."),
        "num_heads": shape.num_heads, "num_kv_heads": shape.num_kv_heads, "head_dim": shape.head_dim,
        "block_size": shape.block_size, "copy_bandwidth_gbs": round(copy_gbs, 1), "rows": rows}, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


# ---- timing ---------------------------------------------------------------------------

def time_ms(fn, device: str) -> float:
    if device == "cuda":
        from triton.testing import do_bench
        return do_bench(fn, warmup=25, rep=100, return_mode="median")
    fn()
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def copy_bandwidth_gbs(device: str, num_bytes: int) -> float:
    src = torch.ones(num_bytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    return 2 * num_bytes / time_ms(lambda: dst.copy_(src), device) / 1e6


# ---- attention ------------------------------------------------------------------------

def scattered_batch(spec: list[tuple[int, int]], B: int, rng: random.Random) -> tuple[list[BatchSeq], int]:
    """Each sequence's blocks drawn at random from the pool; odd sequences are BE."""
    need = [triton.cdiv(ctx, B) for ctx, _ in spec]
    order = list(range(sum(need)))
    rng.shuffle(order)
    seqs, next_block = [], iter(order)
    for i, ((ctx, n), nb) in enumerate(zip(spec, need)):
        be = i % 2 == 1
        runs = [(next(next_block), min(B, ctx - j * B)) for j in range(nb)]
        slots = [b * B + (B - 1 - t if be else t) for b, k in runs for t in range(k)]
        seqs.append(BatchSeq(slots, n, runs, be))
    seqs.sort(key=lambda s: s.num_new_tokens != 1)
    return seqs, sum(need)


def attention_row(name: str, spec, shape: Shape, device: str) -> dict:
    H, Hkv, D, B = shape.num_heads, shape.num_kv_heads, shape.head_dim, shape.block_size
    seqs, num_blocks = scattered_batch(spec, B, random.Random(0))
    k_pool = torch.randn(num_blocks * B, Hkv, D, device=device).to(shape.dtype)
    v_pool = torch.randn_like(k_pool)
    T = sum(s.num_new_tokens for s in seqs)
    q = torch.randn(T, H, D, device=device).to(shape.dtype)
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device == "cuda" else 64
    meta = build_paged_metadata(seqs, B, H, Hkv, device, target_num_programs=2 * sms)
    out = torch.empty_like(q)
    triton_ms = time_ms(lambda: paged_attention(q, k_pool, v_pool, meta, out=out), device)
    dense_ms = time_ms(dense_baseline(q, k_pool, v_pool, seqs), device)
    es = k_pool.element_size()
    num_bytes = sum(len(s.ctx_slots) for s in seqs) * Hkv * D * 2 * es + 2 * q.numel() * es
    return {"kernel": "paged_attention", "case": name, "triton_ms": round(triton_ms, 4),
            "baseline": "sdpa", "baseline_ms": round(dense_ms, 4), "bytes": num_bytes,
            "triton_gbs": round(num_bytes / triton_ms / 1e6, 1), "baseline_gbs": round(num_bytes / dense_ms / 1e6, 1),
            "num_splits": meta.decode.num_splits if meta.decode else 1}


def dense_baseline(q, k_pool, v_pool, seqs):
    """SDPA over the same keys, gathered contiguous beforehand: one batched call per group
    of sequences with the same (context, new tokens), as a dense server would run them."""
    groups: dict[tuple[int, int], list[int]] = {}
    for i, s in enumerate(seqs):
        groups.setdefault((len(s.ctx_slots), s.num_new_tokens), []).append(i)
    starts = [0]
    for s in seqs:
        starts.append(starts[-1] + s.num_new_tokens)
    calls = []
    for (ctx, n), ids in groups.items():
        slots = torch.tensor([seqs[i].ctx_slots for i in ids], device=q.device)        # [S, ctx]
        k = k_pool[slots].transpose(1, 2).contiguous()                                 # [S, Hkv, ctx, D]
        v = v_pool[slots].transpose(1, 2).contiguous()
        qg = torch.stack([q[starts[i]:starts[i] + n] for i in ids]).transpose(1, 2).contiguous()  # [S, H, n, D]
        mask = None
        if n not in (1, ctx):   # a later chunk: causal, shifted by the context before it
            mask = torch.arange(ctx, device=q.device)[None, :] <= torch.arange(ctx - n, ctx, device=q.device)[:, None]
        calls.append((qg, k, v, mask, n == ctx and n > 1))

    def run():
        for qg, k, v, mask, causal in calls:
            F.scaled_dot_product_attention(qg, k, v, attn_mask=mask, is_causal=causal, enable_gqa=True)
    return run


# ---- copies ---------------------------------------------------------------------------

def copy_rows(shape: Shape, device: str, sizes: dict[str, int]) -> list[dict]:
    Hkv, D, B, L = shape.num_kv_heads, shape.head_dim, shape.block_size, shape.num_layers
    rng = torch.Generator().manual_seed(0)
    T = sizes["kv_write tokens"]
    pool = [torch.zeros(4 * T, Hkv, D, device=device, dtype=shape.dtype) for _ in range(2)]
    slots = torch.randperm(4 * T, generator=rng)[:T].to(device)
    k, v = (torch.randn(T, Hkv, D, device=device).to(shape.dtype) for _ in range(2))
    es = k.element_size()
    rows = [_copy_row("kv_write", f"{T} tokens", 2 * 2 * T * Hkv * D * es,
                      lambda: write_kv(pool[0], pool[1], k, v, slots),
                      "index_copy_", lambda: (pool[0].index_copy_(0, slots, k), pool[1].index_copy_(0, slots, v)),
                      device)]
    n = sizes["checkpoint slots"]
    caches = [torch.randn(L, 4 * n, Hkv, D, device=device).to(shape.dtype) for _ in range(2)]
    # A BE run's slots: whole blocks, each read right to left, blocks scattered.
    blocks = torch.randperm(4 * n // B, generator=rng)[:triton.cdiv(n, B)]
    idx = torch.cat([b * B + torch.arange(B - 1, -1, -1) for b in blocks.tolist()])[:n].to(device)
    bufs = gather_slots(caches[0], caches[1], idx)
    num_bytes = 2 * 2 * L * n * Hkv * D * es
    rows.append(_copy_row("checkpoint_gather", f"{L} layers x {n} slots", num_bytes,
                          lambda: gather_slots(caches[0], caches[1], idx),
                          "index_select", lambda: (caches[0].index_select(1, idx), caches[1].index_select(1, idx)),
                          device))
    rows.append(_copy_row("checkpoint_scatter", f"{L} layers x {n} slots", num_bytes,
                          lambda: scatter_slots(caches[0], caches[1], idx, *bufs),
                          "index_copy_", lambda: (caches[0].index_copy_(1, idx, bufs[0]),
                                                  caches[1].index_copy_(1, idx, bufs[1])),
                          device))
    return rows


def _copy_row(kernel, case, num_bytes, fn, baseline, baseline_fn, device) -> dict:
    t, b = time_ms(fn, device), time_ms(baseline_fn, device)
    return {"kernel": kernel, "case": case, "triton_ms": round(t, 4), "baseline": baseline,
            "baseline_ms": round(b, 4), "bytes": num_bytes, "triton_gbs": round(num_bytes / t / 1e6, 1),
            "baseline_gbs": round(num_bytes / b / 1e6, 1), "num_splits": 1}


def print_table(rows: list[dict], copy_gbs: float) -> None:
    print(f"device copy bandwidth: {copy_gbs:.0f} GB/s (read + write)")
    head = (f"{'kernel':<20}{'case':<32}{'triton ms':>10}{'GB/s':>9}{'% copy':>8}{'splits':>7}   "
            f"{'baseline':<12}{'ms':>9}{'GB/s':>9}")
    print(head)
    print("-" * len(head))
    for r in rows:
        print(f"{r['kernel']:<20}{r['case']:<32}{r['triton_ms']:>10.3f}{r['triton_gbs']:>9.0f}"
              f"{r['pct_of_copy_bw']:>8.1f}{r['num_splits']:>7}   {r['baseline']:<12}{r['baseline_ms']:>9.3f}"
              f"{r['baseline_gbs']:>9.0f}")


if __name__ == "__main__":
    raise SystemExit(main())
