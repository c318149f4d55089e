"""The KV pool's bytes, and the host copies of checkpointed BE slots.

Layout (one tensor for K, one for V; a slot is block_id * block_size + offset):

    k[layer, slot, kv_head, head_dim]

The allocator (block_allocator.py) decides which slots; this module only moves data:
new K/V go in through the attention backend, and SlotCopy ops move checkpointed slots
to and from host memory in emission order.
"""
from __future__ import annotations

import torch

from .block_allocator import SlotCopy


def kv_bytes_per_slot(num_layers: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
    return 2 * num_layers * num_kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()


def num_blocks_for_budget(budget_bytes: int, block_size: int, bytes_per_slot: int) -> int:
    return max(1, budget_bytes // (block_size * bytes_per_slot))


class KVCache:
    def __init__(self, num_layers: int, num_slots: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str = "cpu"):
        shape = (num_layers, num_slots, num_kv_heads, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.device = torch.device(device)
        # handle -> (k, v), each [layer, n, kv_head, head_dim] on the host, tokens in order.
        self.host: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        # CUDA only: checkpoints cross PCIe on a stream of their own (see _apply_cuda);
        # handle -> the event that marks its copy landed in host memory.
        self._copy_stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self._landed: dict[int, torch.cuda.Event] = {}

    def apply(self, copies: list[SlotCopy]) -> None:
        for c in copies:
            if c.kind == "drop_host":
                self.host.pop(c.handle, None)
                self._landed.pop(c.handle, None)  # torch's host allocator keeps the pinned buffer until its copy ends
                continue
            idx = torch.tensor(c.slots, dtype=torch.long, device=self.device)
            if self.device.type == "cuda":
                self._apply_cuda(c, idx)
            elif c.kind == "to_host":
                k = self.k.index_select(1, idx).to("cpu", copy=True)
                v = self.v.index_select(1, idx).to("cpu", copy=True)
                self.host[c.handle] = (k, v)
            elif c.kind == "from_host":
                k, v = self.host.pop(c.handle)
                self.k.index_copy_(1, idx, k.to(self.device, non_blocking=True))
                self.v.index_copy_(1, idx, v.to(self.device, non_blocking=True))
            else:
                raise ValueError(f"unknown copy kind {c.kind!r}")

    def _apply_cuda(self, c: SlotCopy, idx: torch.Tensor) -> None:
        """Checkpoint: one gather kernel into a contiguous device buffer, in the step's
        stream, so the forward pass that reuses the slots runs after it; then the buffer
        crosses PCIe into pinned host memory on the copy stream while the GPU computes
        (the paper's background checkpoint; the sim worker times copies the same way).
        Restore: waits for that copy to land, then one async DMA and a scatter, in the
        step's stream, before the forward pass that reads the slots."""
        from kernels.slot_copy import gather_slots, scatter_slots

        if c.kind == "to_host":
            bufs = gather_slots(self.k, self.v, idx)
            host = tuple(torch.empty(b.shape, dtype=b.dtype, pin_memory=True) for b in bufs)
            stream = self._copy_stream
            stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(stream):
                for h, b in zip(host, bufs):
                    h.copy_(b, non_blocking=True)
                    b.record_stream(stream)  # the allocator must not reuse b before the copy reads it
                landed = torch.cuda.Event()
                landed.record(stream)
            self.host[c.handle] = host
            self._landed[c.handle] = landed
        elif c.kind == "from_host":
            k, v = self.host.pop(c.handle)
            landed = self._landed.pop(c.handle, None)
            if landed is not None:
                torch.cuda.current_stream(self.device).wait_event(landed)
            scatter_slots(self.k, self.v, idx, k.to(self.device, non_blocking=True),
                          v.to(self.device, non_blocking=True))
        else:
            raise ValueError(f"unknown copy kind {c.kind!r}")

    @property
    def host_bytes(self) -> int:
        return sum(k.numel() * k.element_size() * 2 for k, _ in self.host.values())
