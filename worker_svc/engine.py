"""The engine step: apply one plan to the pool, run it, report.

    step(plan) = lifecycle ops -> register new -> validate + place -> copies -> run -> postprocess

Backend-agnostic: a Runner (torch_runner.TorchRunner, sim.runner.SimRunner) turns the
placed batch into sampled tokens; the allocator, the sequences and every validation
live here, so both backends behave alike. A bad plan item becomes an ItemError and
changes nothing; the engine never raises on input.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Protocol

from .block_allocator import AllocationError, BlockAllocator, SeqClass, SlotCopy
from .plan import ItemError, NewSeq, Plan, Report, ResidentSeq, SeqOutput, Timings
from .sampler import StopChecker
from .sequence import SeqState, Sequence

log = logging.getLogger(__name__)

_PREEMPTING_OPS = ("recompute", "checkpoint", "preempt")


@dataclass
class StepItem:
    """One sequence's share of the step, placed in the pool."""
    seq: Sequence
    num_new_tokens: int
    ctx_slots: list[int]        # all the sequence's slots after this step, in token order
    runs: list[tuple[int, int]]  # (block_id, num_tokens) per block, in token order
    samples: bool               # this chunk reaches the end of the known tokens: sample one

    @property
    def start_position(self) -> int:
        return self.seq.num_computed_tokens

    @property
    def input_token_ids(self) -> list[int]:
        s = self.seq.num_computed_tokens
        return self.seq.token_ids[s:s + self.num_new_tokens]


@dataclass
class RunResult:
    token_ids: list[int]        # one per sampling item, in item order
    forward_ms: float
    sample_ms: float


class Runner(Protocol):
    name: str
    model_name: str
    vocab_size: int
    max_model_len: int
    eos_token_ids: tuple[int, ...]
    # Steps of up to this many tokens run a fused path of their own (0: none); see
    # WorkerInfo.max_num_fused_tokens.
    max_num_fused_tokens: int

    def apply_copies(self, copies: list[SlotCopy]) -> float: ...        # returns ms spent
    def execute(self, items: list[StepItem]) -> RunResult: ...
    def new_detokenizer(self) -> object: ...
    def now_ms(self) -> float: ...


@dataclass(frozen=True)
class EngineLimits:
    num_blocks: int
    block_size: int
    max_num_host_slots: int
    max_num_seqs: int
    max_num_batched_tokens: int


class Engine:
    def __init__(self, runner: Runner, limits: EngineLimits):
        self.runner = runner
        self.limits = limits
        self.allocator = BlockAllocator(limits.num_blocks, limits.block_size, limits.max_num_host_slots)
        self.seqs: dict[str, Sequence] = {}
        self.integrity_error = ""  # the first violation audit() found; "" while none
        # Running totals for metrics (worker_svc/metrics.py reads them after each step).
        self.num_preemptions = 0          # preempt, checkpoint and recompute items applied
        self.num_checkpointed_slots = 0   # slots copied from the pool to host memory

    @property
    def max_model_len(self) -> int:
        """Longest sequence this worker can run: the model's context, or the pool if that
        is smaller (one sequence alone can fill every slot, never more). What Describe
        reports, so the scheduler refuses at admission what could never finish here."""
        return min(self.runner.max_model_len, self.limits.num_blocks * self.limits.block_size)

    # ---- the step ----------------------------------------------------------------

    def step(self, plan: Plan) -> Report:
        t0 = time.perf_counter()
        report = Report(plan_id=plan.plan_id)
        self._apply_lifecycle(plan, report.errors)
        for new in plan.new_sequences:
            self._register(new, report.errors)
        items = self._place(plan.scheduled, report.errors)
        copy_ms = self._apply_copies(self.allocator.drain_copies())
        report.recompute_needed = self._apply_truncations()
        result = self.runner.execute(items) if items else RunResult([], 0.0, 0.0)
        report.outputs = self._postprocess(items, result.token_ids)
        self._apply_copies(self.allocator.drain_copies())  # frees of finished seqs
        report.occupancy = self.allocator.occupancy()
        report.timings = Timings(
            step_ms=(time.perf_counter() - t0) * 1e3, forward_ms=result.forward_ms,
            sample_ms=result.sample_ms, copy_ms=copy_ms,
            num_prefill_tokens=sum(i.num_new_tokens for i in items if not self._is_decode(i)),
            num_decode_tokens=sum(1 for i in items if self._is_decode(i)),
            clock_ms=self.runner.now_ms())
        if plan.list_resident:
            report.resident = self.resident()
        return report

    @staticmethod
    def _is_decode(item: StepItem) -> bool:
        return item.num_new_tokens == 1 and item.seq.num_computed_tokens >= len(item.seq.prompt_token_ids)

    def _apply_copies(self, copies: list) -> float:
        self.num_checkpointed_slots += sum(len(c.slots) for c in copies if c.kind == "to_host")
        return self.runner.apply_copies(copies)

    # ---- lifecycle ops -----------------------------------------------------------

    def _apply_lifecycle(self, plan: Plan, errors: list[ItemError]) -> None:
        ops = (("free", plan.free, self._free), ("recompute", plan.recompute, self._recompute),
               ("checkpoint", plan.checkpoint, self._checkpoint), ("preempt", plan.preempt, self._preempt),
               ("restore", plan.restore, self._restore))
        for field_name, seq_ids, op in ops:
            for seq_id in seq_ids:
                seq = self.seqs.get(seq_id)
                if seq is None:
                    errors.append(ItemError(seq_id, field_name, f"unknown sequence {seq_id!r}"))
                    continue
                problem = op(seq)
                if problem:
                    errors.append(ItemError(seq_id, field_name, problem))
                elif field_name in _PREEMPTING_OPS:
                    self.num_preemptions += 1

    def _free(self, seq: Sequence) -> str | None:
        if seq.seq_id in self.allocator.seqs:
            self.allocator.free(seq.seq_id)
        del self.seqs[seq.seq_id]
        return None

    def _recompute(self, seq: Sequence) -> str | None:
        if seq.is_finished:
            return "sequence is finished"
        self.allocator.truncate(seq.seq_id, 0)
        self.allocator.resume(seq.seq_id)
        seq.num_computed_tokens = 0
        seq.state = SeqState.WAITING
        return None

    def _checkpoint(self, seq: Sequence) -> str | None:
        if seq.is_finished:
            return "sequence is finished"
        self.allocator.checkpoint(seq.seq_id)
        seq.state = SeqState.CHECKPOINTED
        return None

    def _preempt(self, seq: Sequence) -> str | None:
        if seq.is_finished:
            return "sequence is finished"
        self.allocator.pause(seq.seq_id)
        if seq.state != SeqState.CHECKPOINTED:
            seq.state = SeqState.PREEMPTED
        return None

    def _restore(self, seq: Sequence) -> str | None:
        if seq.is_finished:
            return "sequence is finished"
        if not self.allocator.seqs[seq.seq_id].num_host_tokens:
            return None
        if not self.allocator.can_restore(seq.seq_id):
            return (f"not enough free blocks to restore {self.allocator.seqs[seq.seq_id].num_host_tokens} "
                    f"checkpointed tokens")
        self.allocator.restore(seq.seq_id)
        seq.state = SeqState.PREEMPTED
        return None

    def _apply_truncations(self) -> list[str]:
        """Sequences the recompute fallback cut short: their KV stops at kept tokens."""
        cut = self.allocator.drain_truncated()
        for seq_id, kept in cut.items():
            seq = self.seqs[seq_id]
            seq.num_computed_tokens = min(seq.num_computed_tokens, kept)
            if seq.state == SeqState.CHECKPOINTED and not self.allocator.seqs[seq_id].num_host_tokens:
                seq.state = SeqState.PREEMPTED
        return sorted(cut)

    # ---- new sequences -----------------------------------------------------------

    def _register(self, new: NewSeq, errors: list[ItemError]) -> None:
        problem = self._validate_new(new)
        if problem:
            errors.append(ItemError(new.seq_id, *problem))
            return
        seq = Sequence(new.seq_id, SeqClass(new.seq_class), list(new.prompt_token_ids), new.sampling,
                       StopChecker(new.sampling, self.runner.eos_token_ids), self.runner.new_detokenizer(),
                       output_token_ids=list(new.output_token_ids))
        for t in new.output_token_ids:  # carried output: its text is already known to the client
            seq.text += seq.detokenizer.push(t)
        seq.num_text_sent = len(seq.text)
        self.seqs[new.seq_id] = seq
        self.allocator.add_sequence(new.seq_id, seq.seq_class)

    def _validate_new(self, new: NewSeq) -> tuple[str, str] | None:
        f = "new_sequences"
        if not new.seq_id:
            return f"{f}.seq_id", "must not be empty"
        if new.seq_id in self.seqs:
            return f"{f}.seq_id", f"sequence {new.seq_id!r} is already resident"
        if new.seq_class not in (SeqClass.RT, SeqClass.BE):
            return f"{f}.service_class", f"must be REALTIME or BEST_EFFORT, got {int(new.seq_class)}"
        if not new.prompt_token_ids:
            return f"{f}.prompt_token_ids", "must not be empty"
        bad = next((t for t in list(new.prompt_token_ids) + list(new.output_token_ids)
                    if not 0 <= t < self.runner.vocab_size), None)
        if bad is not None:
            return f"{f}.prompt_token_ids", f"token id {bad} outside the vocabulary [0, {self.runner.vocab_size})"
        n = len(new.prompt_token_ids) + len(new.output_token_ids)
        if n >= self.runner.max_model_len:
            return f"{f}.prompt_token_ids", f"{n} tokens leave no room in max_model_len {self.runner.max_model_len}"
        pool = self.limits.num_blocks * self.limits.block_size
        if n >= pool:
            return f"{f}.prompt_token_ids", f"{n} tokens exceed the KV pool's {pool} slots"
        try:
            new.sampling.validate()
        except ValueError as e:
            return f"{f}.sampling", str(e)
        # After the sampling checks: with max_tokens 0 the fault is max_tokens, not the carried tokens.
        if len(new.output_token_ids) >= new.sampling.max_tokens:
            return f"{f}.output_token_ids", f"{len(new.output_token_ids)} carried tokens reach max_tokens"
        return None

    # ---- placement ---------------------------------------------------------------

    def _place(self, scheduled: list[tuple[str, int]], errors: list[ItemError]) -> list[StepItem]:
        """Validate the scheduled items, resume them, then allocate their slots in order."""
        accepted: list[tuple[Sequence, int, bool]] = []
        seen: set[str] = set()
        budget = self.limits.max_num_batched_tokens
        for seq_id, n in scheduled:
            problem = self._validate_scheduled(seq_id, n, seen, len(accepted), budget)
            if problem:
                errors.append(ItemError(seq_id, *problem))
                continue
            seq = self.seqs[seq_id]
            was_paused = self.allocator.seqs[seq_id].paused
            problem = self._resume(seq)
            if problem:
                errors.append(ItemError(seq_id, "scheduled.seq_id", problem))
                continue
            seen.add(seq_id)
            budget -= n
            accepted.append((seq, n, was_paused))
        items = []
        # Every scheduled sequence is resumed before any allocation, so RT growth in this
        # step can only evict BE sequences that sit this step out.
        for seq, n, was_paused in accepted:
            try:
                self.allocator.allocate(seq.seq_id, n)
            except AllocationError as e:
                errors.append(ItemError(seq.seq_id, "scheduled.num_tokens", f"KV pool full: {e}"))
                if was_paused:
                    self.allocator.pause(seq.seq_id)
                continue
            seq.state = SeqState.RUNNING
            samples = seq.num_computed_tokens + n == seq.num_tokens
            runs = [(r.block_id, r.num_tokens) for r in self.allocator.seqs[seq.seq_id].runs]
            items.append(StepItem(seq, n, self.allocator.slots(seq.seq_id), runs, samples))
        items.sort(key=lambda i: i.num_new_tokens != 1)  # single-token rows first (attention.py)
        return items

    def _validate_scheduled(self, seq_id: str, n: int, seen: set[str], num_accepted: int,
                            budget: int) -> tuple[str, str] | None:
        seq = self.seqs.get(seq_id)
        if seq is None:
            return "scheduled.seq_id", f"unknown sequence {seq_id!r}"
        if seq_id in seen:
            return "scheduled.seq_id", f"sequence {seq_id!r} scheduled twice in one plan"
        if seq.is_finished:
            return "scheduled.seq_id", f"sequence {seq_id!r} is finished ({seq.finish_reason})"
        if n < 1:
            return "scheduled.num_tokens", f"must be >= 1, got {n}"
        if n > seq.num_uncomputed_tokens:
            return "scheduled.num_tokens", f"{n} exceeds the {seq.num_uncomputed_tokens} uncomputed tokens"
        if n > budget:
            return "scheduled.num_tokens", (f"{n} tokens exceed what is left of max_num_batched_tokens "
                                            f"{self.limits.max_num_batched_tokens} ({budget})")
        if num_accepted >= self.limits.max_num_seqs:
            return "scheduled", f"more than max_num_seqs {self.limits.max_num_seqs} sequences"
        return None

    def _resume(self, seq: Sequence) -> str | None:
        alloc = self.allocator.seqs[seq.seq_id]
        if alloc.num_host_tokens:
            if not self.allocator.can_restore(seq.seq_id):
                return f"{alloc.num_host_tokens} checkpointed tokens do not fit in the free blocks"
            self.allocator.restore(seq.seq_id)
        self.allocator.resume(seq.seq_id)
        return None

    # ---- after the forward pass ----------------------------------------------------

    def _postprocess(self, items: list[StepItem], token_ids: list[int]) -> list[SeqOutput]:
        outputs, sampled = [], iter(token_ids)
        for item in items:
            seq = item.seq
            seq.num_computed_tokens += item.num_new_tokens
            new_tokens: list[int] = []
            if item.samples:
                token = next(sampled)
                new_tokens.append(token)
                self._accept_token(seq, token)
            outputs.append(SeqOutput(seq.seq_id, new_tokens, self._take_text(seq), seq.is_finished,
                                     seq.finish_reason, seq.num_computed_tokens, len(seq.output_token_ids)))
        return outputs

    def _accept_token(self, seq: Sequence, token: int) -> None:
        seq.append_token(token)
        seq.text += seq.detokenizer.push(token)
        decision = seq.stop_checker.check(token, seq.text, len(seq.output_token_ids))
        if decision.truncate_text_at is not None:
            seq.text = seq.text[:decision.truncate_text_at]
        if not decision.finished and seq.num_tokens >= self.max_model_len:
            decision = decision._replace(finished=True, reason="length")
        if decision.finished:
            self._finish(seq, decision.reason)

    def _finish(self, seq: Sequence, reason: str) -> None:
        seq.state, seq.finish_reason = SeqState.FINISHED, reason
        self.allocator.free(seq.seq_id)  # KV goes at once; the record stays until `free`

    def _take_text(self, seq: Sequence) -> str:
        """Text not reported yet. While stop strings are set and the sequence runs, hold
        back the tail that could still turn out to be the start of a stop string."""
        end = len(seq.text)
        if seq.sampling.stop and not seq.is_finished:
            end -= max(map(len, seq.sampling.stop)) - 1
        if end <= seq.num_text_sent:
            return ""
        delta = seq.text[seq.num_text_sent:end]
        seq.num_text_sent = end
        return delta

    # ---- reconciliation ------------------------------------------------------------

    def resident(self) -> list[ResidentSeq]:
        return [ResidentSeq(s.seq_id, s.seq_class, s.state.name.lower(), len(s.prompt_token_ids),
                            s.num_computed_tokens, list(s.output_token_ids), s.is_finished, s.finish_reason)
                for s in self.seqs.values()]

    def audit(self) -> str:
        """check_integrity() as a value: the violation's message, "" if none. The first
        violation is kept in integrity_error (a later step may hide the cause)."""
        try:
            self.check_integrity()
        except AssertionError as e:
            self.integrity_error = self.integrity_error or str(e)
            return str(e)
        return ""

    def check_integrity(self) -> None:
        self.allocator.check_integrity()
        live = {k for k, s in self.seqs.items() if not s.is_finished}
        if live != set(self.allocator.seqs):
            raise AssertionError(f"engine and allocator disagree: {sorted(live ^ set(self.allocator.seqs))}")
        for seq_id in live:
            a = self.allocator.seqs[seq_id]
            if a.num_tokens != self.seqs[seq_id].num_computed_tokens:
                raise AssertionError(f"{seq_id}: {a.num_tokens} slots for "
                                     f"{self.seqs[seq_id].num_computed_tokens} computed tokens")
