"""vLLM's default policy: first come, first served over both classes."""
from __future__ import annotations

from typing import Callable

from ..planner import PlanDecision, PlanInput, PlannerConfig, SeqView, StepBudget


def run_in_order(running: list[SeqView], step: StepBudget) -> list[SeqView]:
    """Running sequences in the given order, preempting from the back by recompute when
    the pool is short. Returns the ones still resident (scheduled or left for a later
    step by the token or sequence budget), in order."""
    queue = list(running)
    resident: list[SeqView] = []
    while queue:
        seq = queue[0]
        n = step.chunk(seq)
        if n == 0 or step.seqs == 0:
            break
        queue.pop(0)
        while not step.fits(seq, n) and queue:
            victim = queue.pop()  # the last in order gives way
            step.out.recompute.append(victim.request_id)
            step.release(victim)
        if not step.fits(seq, n):
            step.out.recompute.append(seq.request_id)
            step.release(seq)
            break
        step.take(seq, n)
        resident.append(seq)
    return resident + queue


def admit_in_order(waiting: list[SeqView], step: StepBudget, resident: list[SeqView], max_resident: int,
                   make_room: Callable[[SeqView, list[SeqView], StepBudget], int] | None = None) -> None:
    """Waiting requests in order while the budget, the resident cap and the pool allow;
    admitted ones join `resident`. make_room, if given, may free the pool for a request
    it cannot hold yet (by preempting residents) and returns the request's chunk then."""
    for seq in waiting:
        if len(resident) >= max_resident:
            break
        n = step.chunk(seq)
        if make_room is not None and not step.fits(seq, n):
            n = make_room(seq, resident, step)
        if not step.fits(seq, n):
            break  # strict order: a later, smaller request does not jump the queue
        step.take(seq, n, admit=True)
        resident.append(seq)


def run_then_admit(running: list[SeqView], waiting: list[SeqView], step: StepBudget,
                   max_resident: int) -> PlanDecision:
    """Running sequences first, then waiting ones, each in the given order (fcfs and
    partition, which differ only in the order and the budget)."""
    resident = run_in_order(running, step)
    if not step.out.recompute:  # under memory pressure nothing new starts this step
        admit_in_order(waiting, step, resident, max_resident)
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
