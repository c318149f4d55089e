"""vLLM's priority policy: RT strictly before BE, ties by arrival; BE preempted by
recompute when the pool is short.

Kept faithful, gap included: the resident-sequence cap counts BE sequences too, so a
waiting RT request cannot displace running BE work when the cap (max_num_seqs), not
memory, is what is full."""
from __future__ import annotations

from ..planner import PlanDecision, PlanInput, PlannerConfig, StepBudget
from .fcfs import run_then_admit


class Priority:
    name = "priority"

    def plan(self, inp: PlanInput, cfg: PlannerConfig) -> PlanDecision:
        order = lambda s: (s.service_class, s.arrival_ms)  # noqa: E731  RT = 1 sorts first
        return run_then_admit(sorted(inp.running, key=order), sorted(inp.waiting, key=order),
                              StepBudget(inp, cfg), cfg.max_num_seqs)
