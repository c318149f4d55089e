"""Two machines in one box: a fixed share of memory, tokens and sequences per class,
each share run first come, first served. No sharing, no borrowing."""
from __future__ import annotations

from ..planner import RT, BE, PlanDecision, PlanInput, PlannerConfig, StepBudget, blocks_of
from .fcfs import run_then_admit


def split(total: int, rt_fraction: float) -> tuple[int, int]:
    """RT's and BE's parts of `total` seats or step tokens: RT's fraction, rounded, and
    at least one each (the scheduler refuses a total under 2 for this policy: a class
    with none of either would never run)."""
    rt = min(max(1, round(total * rt_fraction)), max(1, total - 1))
    return rt, total - rt


def share_blocks(num_blocks: int, rt_fraction: float, service_class: int) -> int:
    """The class's share of the KV pool, in blocks."""
    return int(num_blocks * (rt_fraction if service_class == RT else 1 - rt_fraction))


class Partition:
    name = "partition"

    @staticmethod
    def max_request_tokens(service_class: int, num_blocks: int, block_size: int, cfg: PlannerConfig) -> int:
        """A request longer than its class's share of the pool could never run: the
        scheduler refuses it at admission (INVALID_ARGUMENT) instead of queueing it forever.
        (cfg: a PlannerConfig, or the SchedulerConfig that carries the same knob.)"""
        return share_blocks(num_blocks, cfg.partition_rt_fraction, service_class) * block_size

    def plan(self, inp: PlanInput, cfg: PlannerConfig) -> PlanDecision:
        total_blocks = inp.num_pool_blocks()
        out = PlanDecision()
        rt_tokens, be_tokens = split(cfg.max_num_batched_tokens, cfg.partition_rt_fraction)
        rt_seqs, be_seqs = split(cfg.max_num_seqs, cfg.partition_rt_fraction)
        for cls, max_tokens, max_seqs in ((RT, rt_tokens, rt_seqs), (BE, be_tokens, be_seqs)):
            running = sorted((s for s in inp.running if s.service_class == cls), key=lambda s: s.arrival_ms)
            waiting = sorted((s for s in inp.waiting if s.service_class == cls), key=lambda s: s.arrival_ms)
            used = sum(blocks_of(s.num_computed_tokens, inp.block_size) for s in running)
            quota_blocks = min(share_blocks(total_blocks, cfg.partition_rt_fraction, cls) - used, inp.free_blocks)
            step = StepBudget(inp, cfg, max_tokens=max_tokens, max_seqs=max_seqs, free_blocks=max(0, quota_blocks))
            part = run_then_admit(running, waiting, step, max_seqs)
            out.admit += part.admit
            out.scheduled += part.scheduled
            out.recompute += part.recompute
        return out
