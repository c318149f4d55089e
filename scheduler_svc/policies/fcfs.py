"""vLLM's default policy: first come, first served over both classes."""
from __future__ import annotations

from ..planner import PlanDecision, PlanInput, PlannerConfig, SeqView, StepBudget


def run_then_admit(running: list[SeqView], waiting: list[SeqView], step: StepBudget,
                   max_resident: int) -> PlanDecision:
    """Running sequences in the given order (preempting from the back by recompute when
    the pool is short), then waiting ones in order while the budget, the resident cap
    and the pool allow. Shared by fcfs and priority, which differ only in the order."""
    running = list(running)
    while running:
        seq = running.pop(0)
        n = step.chunk(seq)
        if n == 0 or step.seqs == 0:
            break
        while not step.fits(seq, n) and running:
            victim = running.pop()  # the last in order gives way
            step.out.recompute.append(victim.request_id)
            step.release(victim)
        if not step.fits(seq, n):
            step.out.recompute.append(seq.request_id)
            step.release(seq)
            break
        step.take(seq, n)
    if step.out.recompute:
        return step.out  # under memory pressure nothing new starts this step
    resident = len(running) + len(step.out.scheduled)
    for seq in waiting:
        n = step.chunk(seq)
        if resident >= max_resident or not step.fits(seq, n):
            break  # strict order: a later, smaller request does not jump the queue
        step.take(seq, n, admit=True)
        resident += 1
    return step.out


class FCFS:
    """Running sequences first (decodes and unfinished prefills), then the oldest waiting
    requests, with chunked prefill under the token budget. When the pool runs out, the
    newest running sequence is preempted by recompute."""

    name = "fcfs"

    def plan(self, inp: PlanInput, cfg: PlannerConfig) -> PlanDecision:
        by_arrival = lambda s: s.arrival_ms  # noqa: E731
        return run_then_admit(sorted(inp.running, key=by_arrival), sorted(inp.waiting, key=by_arrival),
                              StepBudget(inp, cfg), cfg.max_num_seqs)
