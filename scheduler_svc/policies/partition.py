"""Two machines in one box: a fixed share of memory, tokens and sequences per class,
each share run first come, first served. No sharing, no borrowing."""
from __future__ import annotations

from ..planner import RT, BE, PlanDecision, PlanInput, PlannerConfig, StepBudget, blocks_of
from .fcfs import run_then_admit


class Partition:
    name = "partition"

    def plan(self, inp: PlanInput, cfg: PlannerConfig) -> PlanDecision:
        total_blocks = inp.num_pool_blocks()
        out = PlanDecision()
        rt_tokens = min(cfg.max_num_batched_tokens, max(1, round(cfg.max_num_batched_tokens * cfg.partition_rt_fraction)))
        rt_seqs = min(cfg.max_num_seqs, max(1, round(cfg.max_num_seqs * cfg.partition_rt_fraction)))
        shares = {RT: (cfg.partition_rt_fraction, rt_tokens, rt_seqs),
                  BE: (1 - cfg.partition_rt_fraction, cfg.max_num_batched_tokens - rt_tokens,
                       cfg.max_num_seqs - rt_seqs)}
        for cls, (share, max_tokens, max_seqs) in shares.items():
            running = sorted((s for s in inp.running if s.service_class == cls), key=lambda s: s.arrival_ms)
            waiting = sorted((s for s in inp.waiting if s.service_class == cls), key=lambda s: s.arrival_ms)
            used = sum(blocks_of(s.num_computed_tokens, inp.block_size) for s in running)
            quota_blocks = min(int(total_blocks * share) - used, inp.free_blocks)
            step = StepBudget(inp, cfg, max_tokens=max_tokens, max_seqs=max_seqs, free_blocks=max(0, quota_blocks))
            part = run_then_admit(running, waiting, step, max_seqs)
            out.admit += part.admit
            out.scheduled += part.scheduled
            out.recompute += part.recompute
        return out
