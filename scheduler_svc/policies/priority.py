"""vLLM's priority policy: RT strictly before BE, ties by arrival; BE preempted by
recompute when the pool is short, for a running RT sequence or a waiting one.

Kept faithful, gap included: the resident-sequence cap counts BE sequences too, so a
waiting RT request cannot displace running BE work when the cap (max_num_seqs), not
memory, is what is full (vLLM issue #40004)."""
from __future__ import annotations

from ..planner import PlanDecision, PlanInput, PlannerConfig, SeqView, StepBudget
from .fcfs import admit_in_order, run_in_order


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


def _evict_lower(seq: SeqView, resident: list[SeqView], step: StepBudget) -> int:
    """Evict residents of a lower class than seq, lowest priority first, until the pool
    holds seq's chunk; returns that chunk."""
    n = step.chunk(seq)
    while n > 0 and not step.fits(seq, n) and resident and resident[-1].service_class > seq.service_class:
        _evict(resident.pop(), step)
        n = step.chunk(seq)
    return n


class Priority:
    name = "priority"

    def plan(self, inp: PlanInput, cfg: PlannerConfig) -> PlanDecision:
        step = StepBudget(inp, cfg)
        resident = run_in_order(sorted(inp.running, key=_order), step)
        if not step.out.recompute:  # as vLLM: a step that preempted for running work admits none
            # The known gap stays: admit_in_order stops at a full seat cap before any eviction.
            admit_in_order(sorted(inp.waiting, key=_order), step, resident, cfg.max_num_seqs, make_room=_evict_lower)
        return step.out
