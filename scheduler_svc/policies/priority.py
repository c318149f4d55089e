"""vLLM's priority policy: RT strictly before BE, ties by arrival; BE preempted by
recompute when the pool is short, for a running RT sequence or a waiting one.

Kept faithful, gap included: the resident-sequence cap counts BE sequences too, so a
waiting RT request cannot displace running BE work when the cap (max_num_seqs), not
memory, is what is full (vLLM issue #40004)."""
from __future__ import annotations

from ..planner import PlanDecision, PlanInput, PlannerConfig, SeqView, StepBudget
from .fcfs import run_in_order


def _order(seq: SeqView) -> tuple[int, float]:
    return seq.service_class, seq.arrival_ms  # RT = 1 sorts first


def _evict(victim: SeqView, step: StepBudget) -> None:
    """Preempt a running sequence by recompute, undoing what this step gave it."""
    for i, (rid, n) in enumerate(step.out.scheduled):
        if rid == victim.request_id:
            del step.out.scheduled[i]
            step.untake(victim, n)
            break
    step.out.recompute.append(victim.request_id)
    step.release(victim)


def admit_preempting(waiting: list[SeqView], resident: list[SeqView], step: StepBudget,
                     max_resident: int) -> None:
    """Waiting requests in priority order; one the pool cannot hold evicts resident
    sequences of a lower class, lowest priority first, until it fits."""
    for seq in waiting:
        if len(resident) >= max_resident:
            break  # the known gap: a full seat cap is never a reason to preempt
        n = step.chunk(seq)
        while n > 0 and not step.fits(seq, n) and resident and _order(resident[-1])[0] > seq.service_class:
            _evict(resident.pop(), step)
            n = step.chunk(seq)
        if not step.fits(seq, n):
            break
        step.take(seq, n, admit=True)
        resident.append(seq)


class Priority:
    name = "priority"

    def plan(self, inp: PlanInput, cfg: PlannerConfig) -> PlanDecision:
        step = StepBudget(inp, cfg)
        resident = run_in_order(sorted(inp.running, key=_order), step)
        if not step.out.recompute:  # as vLLM: a step that preempted for running work admits none
            admit_preempting(sorted(inp.waiting, key=_order), resident, step, cfg.max_num_seqs)
        return step.out
