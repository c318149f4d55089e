"""The bidirectional allocator, as a spec: exact slots on tiny pools, then a property test."""
import pytest
from hypothesis import settings, strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from worker_svc.block_allocator import AllocationError, BlockAllocator, SeqClass, SlotCopy

RT, BE = SeqClass.RT, SeqClass.BE


def test_exact_placement_rt_then_be():
    a = BlockAllocator(num_blocks=3, block_size=4)
    a.add_sequence("r", RT)
    a.add_sequence("b", BE)
    assert a.allocate("r", 5) == [0, 1, 2, 3, 4]
    # BE gets the lowest free block, filled from its right end.
    assert a.allocate("b", 3) == [11, 10, 9]
    assert a.slots("b") == [11, 10, 9]
    occ = a.occupancy()
    assert (occ["rt_slots"], occ["be_slots"], occ["free_slots"], occ["free_blocks"]) == (5, 3, 4, 0)
    a.check_integrity()


def test_rt_takes_left_part_of_paused_be_block():
    a = BlockAllocator(num_blocks=2, block_size=4)
    a.add_sequence("b", BE)
    assert a.allocate("b", 6) == [3, 2, 1, 0, 7, 6]  # block 1 holds 2 BE slots on the right
    a.pause("b")
    a.add_sequence("r", RT)
    # No free block: RT shares block 1, filling slots 4 and 5 from the left.
    assert a.allocate("r", 2) == [4, 5]
    occ = a.occupancy()
    assert occ["shared_blocks"] == 1
    assert occ["rt_available_slots"] == 0
    assert occ["rt_available_slots_with_preempt"] == 2 + 4  # block 1's BE slots, block 0's BE run
    assert a.drain_copies() == []  # nothing was overwritten yet
    a.check_integrity()


def test_collision_evicts_only_when_no_free_block():
    a = BlockAllocator(num_blocks=3, block_size=4, max_num_host_slots=16)
    a.add_sequence("b", BE)
    assert a.allocate("b", 6) == [3, 2, 1, 0, 7, 6]
    a.pause("b")
    a.add_sequence("r", RT)
    # A free block (2) exists, so RT does not share yet.
    assert a.allocate("r", 4) == [8, 9, 10, 11]
    # Pool full: RT opens on b's partial block 1 (slots 4, 5 free) ...
    assert a.allocate("r", 2) == [4, 5]
    assert a.drain_copies() == []
    # ... and the next token collides with b's slots 6, 7: b's run moves to host.
    assert a.allocate("r", 1) == [6]
    assert a.drain_copies() == [SlotCopy("to_host", 1, (7, 6))]
    assert a.occupancy()["be_host_slots"] == 2
    assert a.seqs["b"].num_host_tokens == 2
    with pytest.raises(AllocationError):
        a.resume("b")  # must restore first
    a.check_integrity()
    # RT finishes; b restores into a free block and keeps its token order.
    a.free("r")
    a.restore("b")
    assert a.drain_copies() == [SlotCopy("from_host", 1, (7, 6))]  # lowest free block: 1 again
    a.resume("b")
    assert a.slots("b") == [3, 2, 1, 0, 7, 6]
    a.check_integrity()


def test_host_full_falls_back_to_recompute():
    a = BlockAllocator(num_blocks=2, block_size=4, max_num_host_slots=0)
    a.add_sequence("b", BE)
    a.allocate("b", 6)
    a.pause("b")
    a.add_sequence("r", RT)
    a.allocate("r", 3)  # third token collides; no host room: b is cut to its first run
    assert a.drain_truncated() == {"b": 4}
    assert a.seqs["b"].num_tokens == 4
    assert [c.kind for c in a.drain_copies()] == []
    a.check_integrity()


def test_checkpoint_whole_sequence_and_restore():
    a = BlockAllocator(num_blocks=4, block_size=4, max_num_host_slots=64)
    a.add_sequence("b", BE)
    a.allocate("b", 9)  # blocks 0, 1 full, block 2 one slot
    a.checkpoint("b")
    copies = a.drain_copies()
    assert [c.slots for c in copies] == [(3, 2, 1, 0), (7, 6, 5, 4), (11,)]
    occ = a.occupancy()
    assert occ["free_blocks"] == 4 and occ["be_host_slots"] == 9
    a.restore("b")
    assert [c.kind for c in a.drain_copies()] == ["from_host"] * 3
    a.resume("b")
    assert a.allocate("b", 1) == [10]
    a.check_integrity()


def test_be_never_evicts_rt_and_allocation_is_atomic():
    a = BlockAllocator(num_blocks=2, block_size=4)
    a.add_sequence("r", RT)
    a.allocate("r", 7)
    a.add_sequence("b", BE)
    before = a.occupancy()
    # r's open run on block 1 is not shareable; nothing fits.
    with pytest.raises(AllocationError, match="needs 2 slots, only 0"):
        a.allocate("b", 2)
    assert a.occupancy() == before
    a.check_integrity()


def test_be_shares_closed_rt_run():
    a = BlockAllocator(num_blocks=2, block_size=4)
    a.add_sequence("r", RT)
    a.allocate("r", 2)          # block 0: RT slots 0, 1
    a.add_sequence("r2", RT)
    a.allocate("r2", 4)         # block 1 full
    a.add_sequence("b", BE)
    # r's run on block 0 is r's open run: BE may not take its right part.
    assert a.capacity("b") == 0
    a.allocate("r", 2)          # block 0 full now; still open but no room
    assert a.capacity("b") == 0
    a.check_integrity()


def test_truncate_cuts_inside_a_run():
    a = BlockAllocator(num_blocks=2, block_size=4)
    a.add_sequence("r", RT)
    a.allocate("r", 6)
    a.truncate("r", 3)
    assert a.slots("r") == [0, 1, 2]
    assert a.occupancy()["free_blocks"] == 1
    assert a.allocate("r", 2) == [3, 4]
    a.check_integrity()


class AllocatorMachine(RuleBasedStateMachine):
    """Random allocate / grow / free / pause / resume / checkpoint / restore keeps integrity,
    and every token's slot is stable unless it was moved to host and back."""

    def __init__(self):
        super().__init__()
        self.a = BlockAllocator(num_blocks=5, block_size=4, max_num_host_slots=6)
        self.next_id = 0
        self.host = {}      # handle -> tuple of (seq_id, token index) it holds
        self.where = {}     # slot -> (seq_id, token index)

    def _apply_copies(self):
        for c in self.a.drain_copies():
            if c.kind == "to_host":
                self.host[c.handle] = tuple(self.where.pop(s) for s in c.slots)
            elif c.kind == "from_host":
                for s, tok in zip(c.slots, self.host.pop(c.handle)):
                    assert s not in self.where, f"restore onto live slot {s}"
                    self.where[s] = tok
            else:
                self.host.pop(c.handle)
        for seq_id, kept in self.a.drain_truncated().items():
            self._forget(seq_id, from_index=kept)

    def _forget(self, seq_id, from_index=0):
        for s in [s for s, (q, i) in self.where.items() if q == seq_id and i >= from_index]:
            del self.where[s]

    @rule(cls=st.sampled_from([RT, BE]))
    def add(self, cls):
        seq_id = f"s{self.next_id}"
        self.next_id += 1
        self.a.add_sequence(seq_id, cls)

    @precondition(lambda self: self.a.seqs)
    @rule(data=st.data(), n=st.integers(1, 9))
    def grow(self, data, n):
        seq_id = data.draw(st.sampled_from(sorted(self.a.seqs)))
        seq = self.a.seqs[seq_id]
        if seq.num_host_tokens or seq.paused:
            return
        start = seq.num_tokens
        try:
            slots = self.a.allocate(seq_id, n)
        except AllocationError:
            self._apply_copies()
            return
        self._apply_copies()
        for i, s in enumerate(slots):
            assert s not in self.where, f"slot {s} handed out twice"
            self.where[s] = (seq_id, start + i)

    @rule(n=st.integers(1, 7))
    def paused_be(self, n):
        """A BE sequence that grows and is paused: the shape RT sharing feeds on."""
        seq_id = f"s{self.next_id}"
        self.next_id += 1
        self.a.add_sequence(seq_id, BE)
        if n <= self.a.capacity(seq_id):
            for i, s in enumerate(self.a.allocate(seq_id, n)):
                self.where[s] = (seq_id, i)
        self.a.pause(seq_id)

    @precondition(lambda self: self.a.seqs)
    @rule(data=st.data())
    def free(self, data):
        seq_id = data.draw(st.sampled_from(sorted(self.a.seqs)))
        self.a.free(seq_id)
        self._apply_copies()
        self._forget(seq_id)

    @precondition(lambda self: self.a.seqs)
    @rule(data=st.data())
    def pause(self, data):
        self.a.pause(data.draw(st.sampled_from(sorted(self.a.seqs))))

    @precondition(lambda self: self.a.seqs)
    @rule(data=st.data())
    def checkpoint(self, data):
        seq_id = data.draw(st.sampled_from(sorted(self.a.seqs)))
        self.a.checkpoint(seq_id)
        self._apply_copies()

    @precondition(lambda self: self.a.seqs)
    @rule(data=st.data())
    def resume(self, data):
        seq_id = data.draw(st.sampled_from(sorted(self.a.seqs)))
        if self.a.seqs[seq_id].num_host_tokens:
            if not self.a.can_restore(seq_id):
                return
            self.a.restore(seq_id)
            self._apply_copies()
        self.a.resume(seq_id)

    @invariant()
    def consistent(self):
        self.a.check_integrity()
        occ = self.a.occupancy()
        assert occ["rt_slots"] + occ["be_slots"] + occ["free_slots"] == 20
        assert occ["rt_available_slots"] <= occ["rt_available_slots_with_preempt"]
        for seq_id, seq in self.a.seqs.items():
            if seq.num_host_tokens:
                continue
            # Every resident token is exactly where we last saw it.
            slots = self.a.slots(seq_id)
            assert [self.where.get(s) for s in slots] == [(seq_id, i) for i in range(len(slots))]
        resident = sum(s.num_tokens - s.num_host_tokens for s in self.a.seqs.values())
        assert resident == len(self.where) == occ["rt_slots"] + occ["be_slots"]


TestAllocatorMachine = AllocatorMachine.TestCase
TestAllocatorMachine.settings = settings(max_examples=300, stateful_step_count=40, deadline=None)


def test_room_left_by_the_other_end_is_found_without_a_scan():
    """A closed run's block gets room when its other-end owner leaves; occupancy and
    growth see it although no growing run or paused BE sits there (module doc, Scans)."""
    a = BlockAllocator(num_blocks=3, block_size=4)
    a.add_sequence("b", BE)
    assert a.allocate("b", 2) == [3, 2]              # block 0, right half
    a.pause("b")
    a.add_sequence("r1", RT)
    assert a.allocate("r1", 8) == list(range(4, 12))  # blocks 1 and 2
    a.add_sequence("r2", RT)
    assert a.allocate("r2", 2) == [0, 1]              # the left of paused b's block 0
    a.resume("b")
    a.free("r1")
    assert a.allocate("b", 1) == [7]                  # block 0 is full: b's run there closes
    a.free("r2")                                      # ... and now has room again
    assert a.occupancy()["rt_available_slots"] == 4 + 2   # free block 2, and block 0's left
    a.add_sequence("r3", RT)
    assert a.allocate("r3", 6) == [8, 9, 10, 11, 0, 1]
    assert a.occupancy()["shared_blocks"] == 1
    a.check_integrity()
