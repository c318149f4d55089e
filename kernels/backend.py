"""The Triton attention backend: the worker's attention seam (worker_svc/attention.py)
served by the kernels of this package, reading and writing the pool in place.

    build_metadata(seqs)                   once per step: block tables, run starts, tiles
    forward(layer_idx, q, k, v, meta)      per layer: write_kv, then paged_attention

On CUDA the worker uses it by default; on CPU it runs only under TRITON_INTERPRET=1
(Triton's interpreter, for tests).
"""
from __future__ import annotations

import torch

from .attention_metadata import PagedAttentionMetadata, build_paged_metadata
from .kv_write import write_kv
from .paged_attention import paged_attention

# Stand-in for "programs that fill the device" off-GPU, where it only steers split-KV.
CPU_TARGET_NUM_PROGRAMS = 128


class TritonAttention:
    name = "triton"

    def __init__(self, cache, block_size: int, num_heads: int, **metadata_options):
        """cache: worker_svc.kv_cache.KVCache; metadata_options go to build_paged_metadata
        (tile sizes, split-KV threshold): tests shrink them to reach every path cheaply."""
        self.cache = cache
        self.block_size = block_size
        self.num_heads = num_heads
        self.num_kv_heads = cache.k.shape[2]
        if cache.device.type == "cuda":
            sms = torch.cuda.get_device_properties(cache.device).multi_processor_count
            metadata_options.setdefault("target_num_programs", 2 * sms)
        else:
            metadata_options.setdefault("target_num_programs", CPU_TARGET_NUM_PROGRAMS)
        self.metadata_options = metadata_options

    def build_metadata(self, seqs) -> PagedAttentionMetadata:
        return build_paged_metadata(seqs, self.block_size, self.num_heads, self.num_kv_heads,
                                    self.cache.device, **self.metadata_options)

    def forward(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                meta: PagedAttentionMetadata) -> torch.Tensor:
        """q [T, H, D], k/v [T, Hkv, D] (k after RoPE) -> out [T, H, D]."""
        k_pool, v_pool = self.cache.k[layer_idx], self.cache.v[layer_idx]   # [num_slots, Hkv, D]
        write_kv(k_pool, v_pool, k, v, meta.slot_mapping)
        return paged_attention(q, k_pool, v_pool, meta)
