"""The bidirectional KV block allocator: which slot of the pool holds which token.

Pure Python, no torch: it decides placement and emits the copies the KV cache must make
(`SlotCopy`); `kv_cache.py` moves the bytes.

One block of B slots (B = block_size):

    slot:   0    1    2   ...                 B-3  B-2  B-1
          [ RT0  RT1  RT2  ->   free   <-     BE2  BE1  BE0 ]
            the RT owner fills rightward      the BE owner fills leftward

A block has at most one RT owner and one BE owner; rt_used + be_used <= B always.

A sequence's KV is a list of runs, one per block it uses, in token order. The t-th token
of a run lives at slot t (RT) or B-1-t (BE) of that block. Only the last run of a
sequence grows ("open"); earlier runs are closed. A run usually fills its block, but it
closes early when the other end gets in the way, so runs carry their own token count
(a BE run in a block whose left part an RT sequence took, say).

Sharing rules:
- A sequence may open a run on a block whose other end is empty, or whose other-end run
  is closed, or (RT only) whose BE owner is paused.
- When an RT run grows into slots held by a paused BE sequence and no free block is
  left, that BE run is evicted: its slots are copied to host memory (a checkpoint) and
  the BE sequence keeps a host run in its place, restored before it runs again. If host
  memory is full, the BE sequence is truncated to the tokens before that run instead and
  must recompute the rest (the fallback).
- BE never evicts RT.

Scans: a step reports the pool's occupancy, and a full pool looks for a block to share,
so neither may walk all N blocks (tens of thousands on a GPU). Only three kinds of block
can have room for a new run or for RT to evict into: a sequence's last block (its run
still grows), a block whose BE owner is paused, and a block whose other-end owner left
or that a restore filled part-way (`_gappy`, kept as they happen). Every other block in
use is full. `_candidates()` is those blocks; `check_integrity()` checks that no block
outside it has room.
"""
from __future__ import annotations

import heapq
from dataclasses import dataclass, field
from enum import IntEnum


class SeqClass(IntEnum):
    # Same numbers as bros.v1.ServiceClass.
    RT = 1
    BE = 2


@dataclass
class Run:
    """num_tokens of one sequence in one block (block_id None while it is on host)."""
    block_id: int | None
    num_tokens: int
    host_handle: int | None = None


@dataclass
class SeqAlloc:
    seq_id: str
    seq_class: SeqClass
    runs: list[Run] = field(default_factory=list)
    paused: bool = False
    # Global slot ids of every token, in order; rebuilt lazily after evictions/restores.
    _slots: list[int] | None = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(r.num_tokens for r in self.runs)

    @property
    def num_host_tokens(self) -> int:
        return sum(r.num_tokens for r in self.runs if r.block_id is None)


@dataclass(frozen=True)
class SlotCopy:
    """A copy the KV cache must make, in emission order, before the next forward pass.

    to_host: pool[slots] -> host[handle];  from_host: host[handle] -> pool[slots]
    (host[handle] is dropped after); drop_host: forget host[handle].
    """
    kind: str
    handle: int
    slots: tuple[int, ...] = ()


class AllocationError(Exception):
    pass


class BlockAllocator:
    def __init__(self, num_blocks: int, block_size: int = 16, max_num_host_slots: int = 0):
        if num_blocks <= 0 or block_size <= 0:
            raise ValueError(f"num_blocks and block_size must be > 0, got {num_blocks}, {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.max_num_host_slots = max_num_host_slots
        self.rt_owner: list[str | None] = [None] * num_blocks
        self.be_owner: list[str | None] = [None] * num_blocks
        self.rt_used = [0] * num_blocks
        self.be_used = [0] * num_blocks
        self._free_heap = list(range(num_blocks))  # lowest id first: deterministic placement
        self._num_free_blocks = num_blocks
        self.seqs: dict[str, SeqAlloc] = {}
        self.num_host_slots = 0
        self._next_handle = 1
        self.pending_copies: list[SlotCopy] = []
        # Sequences truncated by the recompute fallback since the last drain: seq_id -> tokens kept.
        self.truncated: dict[str, int] = {}
        self.num_evictions = 0
        self._num_shared = 0                     # blocks with both an RT and a BE owner
        self._gappy: set[int] = set()            # may have room with no growing run (module doc)

    # ---- sequence lifecycle -------------------------------------------------------

    def add_sequence(self, seq_id: str, seq_class: SeqClass) -> None:
        if seq_id in self.seqs:
            raise AllocationError(f"sequence {seq_id!r} already allocated")
        self.seqs[seq_id] = SeqAlloc(seq_id, SeqClass(seq_class))

    def free(self, seq_id: str) -> None:
        """Release every slot and host checkpoint of the sequence and forget it."""
        seq = self.seqs.pop(seq_id)
        self._drop_runs(seq, 0)

    def pause(self, seq_id: str) -> None:
        self.seqs[seq_id].paused = True

    def resume(self, seq_id: str) -> None:
        seq = self.seqs[seq_id]
        if seq.num_host_tokens:
            raise AllocationError(f"sequence {seq_id!r} has {seq.num_host_tokens} tokens on host: restore first")
        seq.paused = False

    def truncate(self, seq_id: str, num_tokens: int) -> None:
        """Keep only the KV of the first num_tokens tokens (the rest will be recomputed)."""
        seq = self.seqs[seq_id]
        kept, idx = 0, 0
        while idx < len(seq.runs) and kept + seq.runs[idx].num_tokens <= num_tokens:
            kept += seq.runs[idx].num_tokens
            idx += 1
        cut = num_tokens - kept  # tokens to keep of run idx, which straddles the cut
        if cut:
            run = seq.runs[idx]
            if run.block_id is None:
                raise AllocationError(f"sequence {seq_id!r}: cannot cut inside a checkpointed run")
            used = self.rt_used if seq.seq_class == SeqClass.RT else self.be_used
            used[run.block_id] -= run.num_tokens - cut
            run.num_tokens = cut
            idx += 1
        self._drop_runs(seq, idx)

    # ---- growth ---------------------------------------------------------------------

    def capacity(self, seq_id: str) -> int:
        """How many more tokens this sequence could take right now (evictions included).

        Mirrors _place_run: the own last run's gap first; then free blocks, as long as
        any is left (a collision with a paused BE then moves on to a free block rather
        than evict); then shareable blocks, evicting paused BE runs.
        """
        seq = self.seqs[seq_id]
        if self._num_free_blocks:
            own = self._last_run_room(seq, evict=False) + self._num_free_blocks * self.block_size
        else:
            own = self._last_run_room(seq, evict=True)
        return own + self._shareable_room(seq)

    def _shareable_room(self, seq: SeqAlloc) -> int:
        evict = seq.seq_class == SeqClass.RT
        return sum(self._room(seq.seq_class, b, evict) for b in self._candidates()
                   if self._may_open(seq, b))

    def allocate(self, seq_id: str, num_new_tokens: int) -> list[int]:
        """Place num_new_tokens more tokens; return their global slot ids in order.

        Raises AllocationError, with nothing changed, when they do not fit.
        """
        seq = self.seqs[seq_id]
        if seq.num_host_tokens:
            raise AllocationError(f"sequence {seq_id!r} has tokens on host: restore before growing")
        # Fast path: the own gap plus free blocks suffice, no scan of the pool.
        easy = self._last_run_room(seq, evict=False) + self._num_free_blocks * self.block_size
        if num_new_tokens > easy and num_new_tokens > (available := self.capacity(seq_id)):
            raise AllocationError(
                f"sequence {seq_id!r} needs {num_new_tokens} slots, only {available} available")
        slots: list[int] = []
        while len(slots) < num_new_tokens:
            slots += self._place_run(seq, num_new_tokens - len(slots))
        if seq._slots is not None:
            seq._slots.extend(slots)
        return slots

    def slots(self, seq_id: str) -> list[int]:
        """Global slot ids (block_id * B + offset) of all the sequence's tokens, in order."""
        seq = self.seqs[seq_id]
        if seq.num_host_tokens:
            raise AllocationError(f"sequence {seq_id!r} has tokens on host: restore first")
        if seq._slots is None:
            seq._slots = [s for run in seq.runs for s in self._run_slots(seq.seq_class, run)]
        return seq._slots

    def _place_run(self, seq: SeqAlloc, num_tokens: int) -> list[int]:
        """Place up to num_tokens (at least one) in the sequence's last run, opening a new
        run first (or evicting the paused BE run in the way) when it has no room; returns
        their slots. Token by token this is the same placement: a run with room takes the
        next token without any other decision."""
        run = seq.runs[-1] if seq.runs else None
        if run is not None and self._last_run_room(seq, evict=False) == 0 and self._collides_with_paused_be(seq):
            if self._num_free_blocks == 0:
                self._evict_be_run(run.block_id)
        if run is None or self._last_run_room(seq, evict=False) == 0:
            run = Run(self._open_block(seq), 0)
            seq.runs.append(run)
        n = min(num_tokens, self._last_run_room(seq, evict=False))
        if n <= 0:
            raise AllocationError(f"sequence {seq.seq_id!r}: no room in a run just opened (allocator bug)")
        b, B = run.block_id, self.block_size
        if seq.seq_class == SeqClass.RT:
            first = b * B + self.rt_used[b]
            self.rt_used[b] += n
            slots = list(range(first, first + n))
        else:
            top = b * B + B - 1 - self.be_used[b]
            self.be_used[b] += n
            slots = list(range(top, top - n, -1))
        run.num_tokens += n
        return slots

    def _open_block(self, seq: SeqAlloc) -> int:
        """Pick the block for a new run: a free block, else the roomiest shareable one,
        else (RT) the paused-BE block cheapest to checkpoint."""
        if self._num_free_blocks:
            b = heapq.heappop(self._free_heap)
            self._num_free_blocks -= 1
        else:
            b = self._best_shared_block(seq)
        self._set_owner(seq.seq_class, b, seq.seq_id)
        return b

    def _best_shared_block(self, seq: SeqAlloc) -> int:
        best, best_key = None, None
        for b in self._candidates():
            if not self._may_open(seq, b):
                continue
            room = self._room(seq.seq_class, b, evict=False)
            if room:
                key = (0, -room, b)
            elif seq.seq_class == SeqClass.RT and self._be_paused(b):
                key = (1, self.be_used[b], b)  # must evict: fewest BE slots to copy
            else:
                continue
            if best_key is None or key < best_key:
                best, best_key = b, key
        if best is None:
            raise AllocationError("no block to open (capacity() said otherwise: allocator bug)")
        if best_key[0] == 1:
            self._evict_be_run(best)
            if self._is_free(best):  # the BE owner left it: take it back off the free list
                self._free_heap.remove(best)
                heapq.heapify(self._free_heap)
                self._num_free_blocks -= 1
        return best

    # ---- eviction, checkpoint, restore --------------------------------------------

    def _evict_be_run(self, b: int) -> None:
        """Move the (paused) BE run on block b to host, or truncate its owner if host is full."""
        seq = self.seqs[self.be_owner[b]]
        idx = next(i for i, r in enumerate(seq.runs) if r.block_id == b)
        self.num_evictions += 1
        self._run_to_host(seq, idx)

    def _run_to_host(self, seq: SeqAlloc, idx: int) -> None:
        run = seq.runs[idx]
        if self.num_host_slots + run.num_tokens > self.max_num_host_slots:
            kept = sum(r.num_tokens for r in seq.runs[:idx])
            self._drop_runs(seq, idx)
            self.truncated[seq.seq_id] = kept
            return
        handle = self._next_handle
        self._next_handle += 1
        self.pending_copies.append(SlotCopy("to_host", handle, tuple(self._run_slots(seq.seq_class, run))))
        self._release_run(seq.seq_class, run)
        self.num_host_slots += run.num_tokens
        seq.runs[idx] = Run(None, run.num_tokens, handle)
        seq._slots = None

    def checkpoint(self, seq_id: str) -> None:
        """Pause the sequence and move all its resident KV to host (recompute fallback
        from the first run that does not fit)."""
        seq = self.seqs[seq_id]
        seq.paused = True
        for idx in range(len(seq.runs)):
            if idx < len(seq.runs) and seq.runs[idx].block_id is not None:
                self._run_to_host(seq, idx)

    def can_restore(self, seq_id: str) -> bool:
        """Checkpointed runs come back into free blocks only: predictable, and a restore
        never evicts anything else."""
        seq = self.seqs[seq_id]
        return sum(r.block_id is None for r in seq.runs) <= self._num_free_blocks

    def restore(self, seq_id: str) -> None:
        """Bring every host run back into the pool (fresh blocks), keeping token order."""
        seq = self.seqs[seq_id]
        if not self.can_restore(seq_id):
            raise AllocationError(f"sequence {seq_id!r}: not enough free blocks to restore "
                                  f"{seq.num_host_tokens} checkpointed tokens")
        for idx, run in enumerate(seq.runs):
            if run.block_id is not None:
                continue
            b = self._restore_block(seq, run.num_tokens)
            self._gappy.add(b)   # a closed run with room, unless it fills the block
            restored = Run(b, run.num_tokens)
            if seq.seq_class == SeqClass.RT:
                self.rt_used[b] += run.num_tokens
            else:
                self.be_used[b] += run.num_tokens
            self.num_host_slots -= run.num_tokens
            self.pending_copies.append(
                SlotCopy("from_host", run.host_handle, tuple(self._run_slots(seq.seq_class, restored))))
            seq.runs[idx] = restored
        seq._slots = None

    def _restore_block(self, seq: SeqAlloc, num_tokens: int) -> int:
        b = heapq.heappop(self._free_heap)
        self._num_free_blocks -= 1
        self._set_owner(seq.seq_class, b, seq.seq_id)
        return b

    def drain_copies(self) -> list[SlotCopy]:
        copies, self.pending_copies = self.pending_copies, []
        return copies

    def drain_truncated(self) -> dict[str, int]:
        out, self.truncated = self.truncated, {}
        return out

    # ---- block-level helpers -------------------------------------------------------

    def _run_slots(self, seq_class: SeqClass, run: Run) -> list[int]:
        base, n = run.block_id * self.block_size, run.num_tokens
        if seq_class == SeqClass.RT:
            return list(range(base, base + n))
        top = base + self.block_size - 1
        return list(range(top, top - n, -1))

    def _is_free(self, b: int) -> bool:
        return self.rt_owner[b] is None and self.be_owner[b] is None

    def _be_paused(self, b: int) -> bool:
        owner = self.be_owner[b]
        return owner is not None and self.seqs[owner].paused

    def _is_open_run(self, owner: str, b: int) -> bool:
        runs = self.seqs[owner].runs
        return bool(runs) and runs[-1].block_id == b

    def _may_open(self, seq: SeqAlloc, b: int) -> bool:
        """Can seq start a new run on block b (b not free)?"""
        if seq.seq_class == SeqClass.RT:
            mine, other = self.rt_owner[b], self.be_owner[b]
            other_ok = other is None or not self._is_open_run(other, b) or self.seqs[other].paused
        else:
            mine, other = self.be_owner[b], self.rt_owner[b]
            other_ok = other is None or not self._is_open_run(other, b)
        return mine is None and other_ok

    def _room(self, seq_class: SeqClass, b: int, evict: bool) -> int:
        """Slots a new run of seq_class on block b could fill (all of B if evicting paused BE)."""
        if seq_class == SeqClass.RT:
            if evict and self._be_paused(b):
                return self.block_size - self.rt_used[b]
            return self.block_size - self.rt_used[b] - self.be_used[b]
        return self.block_size - self.rt_used[b] - self.be_used[b]

    def _last_run_room(self, seq: SeqAlloc, evict: bool) -> int:
        if not seq.runs:
            return 0
        return self._room(seq.seq_class, seq.runs[-1].block_id, evict and seq.seq_class == SeqClass.RT)

    def _collides_with_paused_be(self, seq: SeqAlloc) -> bool:
        b = seq.runs[-1].block_id
        return seq.seq_class == SeqClass.RT and self.be_used[b] > 0 and self._be_paused(b)

    def _set_owner(self, seq_class: SeqClass, b: int, seq_id: str) -> None:
        owners, others = (self.rt_owner, self.be_owner) if seq_class == SeqClass.RT else (self.be_owner, self.rt_owner)
        assert owners[b] is None, f"block {b} already has a {seq_class.name} owner {owners[b]!r}"
        owners[b] = seq_id
        self._num_shared += others[b] is not None

    def _release_run(self, seq_class: SeqClass, run: Run) -> None:
        b = run.block_id
        if seq_class == SeqClass.RT:
            self.rt_owner[b], self.rt_used[b] = None, 0
        else:
            self.be_owner[b], self.be_used[b] = None, 0
        if self._is_free(b):
            heapq.heappush(self._free_heap, b)
            self._num_free_blocks += 1
        else:   # the other end stays, next to the room this run leaves
            self._num_shared -= 1
            self._gappy.add(b)

    def _drop_runs(self, seq: SeqAlloc, start: int) -> None:
        for run in seq.runs[start:]:
            if run.block_id is None:
                self.num_host_slots -= run.num_tokens
                self.pending_copies.append(SlotCopy("drop_host", run.host_handle))
            else:
                self._release_run(seq.seq_class, run)
        del seq.runs[start:]
        seq._slots = None

    # ---- reporting and checking --------------------------------------------------

    def _candidates(self) -> set[int]:
        """The blocks in use that may have room (module doc); forgets gappy blocks that
        have filled up or gone free. Unordered: every caller sums, or breaks ties by id."""
        B = self.block_size
        self._gappy = {b for b in self._gappy if not self._is_free(b) and self.rt_used[b] + self.be_used[b] < B}
        found = set(self._gappy)
        for seq in self.seqs.values():
            if seq.runs and seq.runs[-1].block_id is not None:
                found.add(seq.runs[-1].block_id)
            if seq.paused and seq.seq_class == SeqClass.BE:
                found.update(r.block_id for r in seq.runs if r.block_id is not None)
        return found

    def occupancy(self) -> dict[str, int]:
        B = self.block_size
        rt_slots, be_slots = sum(self.rt_used), sum(self.be_used)
        rt_avail = rt_avail_evict = be_avail = 0
        for b in self._candidates():
            rt, be = self.rt_owner[b], self.be_owner[b]
            gap = B - self.rt_used[b] - self.be_used[b]
            be_paused = self._be_paused(b)
            rt_can = (rt is not None and self._is_open_run(rt, b)) or (
                rt is None and (not self._is_open_run(be, b) or be_paused))
            be_can = (be is not None and self._is_open_run(be, b)) or (
                be is None and not self._is_open_run(rt, b))
            rt_avail += gap if rt_can else 0
            rt_avail_evict += (gap + self.be_used[b]) if rt_can and be_paused else (gap if rt_can else 0)
            be_avail += gap if be_can else 0
        free_block_slots = self._num_free_blocks * B
        return {
            "num_blocks": self.num_blocks,
            "block_size": B,
            "rt_slots": rt_slots,
            "be_slots": be_slots,
            "free_slots": self.num_blocks * B - rt_slots - be_slots,
            "free_blocks": self._num_free_blocks,
            "shared_blocks": self._num_shared,
            "be_host_slots": self.num_host_slots,
            "rt_available_slots": free_block_slots + rt_avail,
            "rt_available_slots_with_preempt": free_block_slots + rt_avail_evict,
            "be_available_slots": free_block_slots + be_avail,
            "host_free_slots": self.max_num_host_slots - self.num_host_slots,
        }

    def check_integrity(self) -> None:
        """Raise AssertionError, with the numbers, on any overlap, leak or stale count."""
        B = self.block_size
        rt_used, be_used = [0] * self.num_blocks, [0] * self.num_blocks
        rt_owner, be_owner = [None] * self.num_blocks, [None] * self.num_blocks
        host = 0
        for seq in self.seqs.values():
            seen_blocks = set()
            for run in seq.runs:
                if run.num_tokens <= 0:
                    raise AssertionError(f"{seq.seq_id}: empty run {run}")
                if run.block_id is None:
                    host += run.num_tokens
                    continue
                b = run.block_id
                if b in seen_blocks:
                    raise AssertionError(f"{seq.seq_id}: two runs on block {b}")
                seen_blocks.add(b)
                owners, used = (rt_owner, rt_used) if seq.seq_class == SeqClass.RT else (be_owner, be_used)
                if owners[b] is not None:
                    raise AssertionError(f"block {b}: two {seq.seq_class.name} owners {owners[b]!r}, {seq.seq_id!r}")
                owners[b], used[b] = seq.seq_id, run.num_tokens
            if seq._slots is not None and not seq.num_host_tokens and seq._slots != [
                    s for r in seq.runs for s in self._run_slots(seq.seq_class, r)]:
                raise AssertionError(f"{seq.seq_id}: stale slot cache")
        for b in range(self.num_blocks):
            if rt_used[b] + be_used[b] > B:
                raise AssertionError(f"block {b}: RT {rt_used[b]} + BE {be_used[b]} slots overlap (B={B})")
        if (rt_used, be_used, rt_owner, be_owner) != (self.rt_used, self.be_used, self.rt_owner, self.be_owner):
            bad = [b for b in range(self.num_blocks) if (rt_used[b], be_used[b], rt_owner[b], be_owner[b])
                   != (self.rt_used[b], self.be_used[b], self.rt_owner[b], self.be_owner[b])]
            raise AssertionError(f"block table out of sync with sequences on blocks {bad[:10]}")
        free = sorted(b for b in range(self.num_blocks) if rt_owner[b] is None and be_owner[b] is None)
        if sorted(self._free_heap) != free or self._num_free_blocks != len(free):
            raise AssertionError(f"free list leak: heap has {len(self._free_heap)}, "
                                 f"count {self._num_free_blocks}, actually free {len(free)}")
        shared = sum(rt_owner[b] is not None and be_owner[b] is not None for b in range(self.num_blocks))
        if shared != self._num_shared:
            raise AssertionError(f"shared blocks: counted {self._num_shared}, actually {shared}")
        candidates = self._candidates()
        roomy = [b for b in range(self.num_blocks) if b not in candidates and not self._is_free(b)
                 and (rt_used[b] + be_used[b] < B or self._be_paused(b))]
        if roomy:
            raise AssertionError(f"blocks with room that scans skip: {roomy[:10]}")
        if host != self.num_host_slots or host > self.max_num_host_slots:
            raise AssertionError(f"host slots: counted {host}, recorded {self.num_host_slots}, "
                                 f"budget {self.max_num_host_slots}")
