"""The planner: a pure function from (queues, worker state, clock, config) to a plan.

No Redis, gRPC or torch here: policies are unit-tested with plain dataclasses. The worker
loop (worker_loop.py) gathers the inputs, calls `Policy.plan`, and does the I/O.

Vocabulary follows vLLM: a sequence's `num_computed_tokens` are in the KV pool; a step
gives each scheduled sequence `num_tokens` more (a prefill chunk, or 1 to decode).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

RT, BE = 1, 2


@dataclass
class SeqView:
    """What the planner knows about one request."""
    request_id: str
    service_class: int             # RT or BE
    arrival_ms: float
    num_prompt_tokens: int
    num_tokens: int                # prompt + carried/produced output known to the worker
    num_computed_tokens: int = 0   # in the worker's KV pool
    ttft_deadline_ms: float = 0.0  # RT: arrival + TTFT target
    tpot_ms: float = 0.0           # RT: target time per output token
    first_token_ms: float | None = None
    last_token_ms: float | None = None
    num_output_tokens: int = 0     # produced so far (delivered)
    max_tokens: int = 0
    preempted: bool = False        # paused on the worker (KV kept or checkpointed)

    @property
    def num_uncomputed_tokens(self) -> int:
        return self.num_tokens - self.num_computed_tokens

    def next_deadline_ms(self) -> float:
        """When this request's next token is due: its TTFT deadline until the first token,
        then first token + n * TPOT target (the average-TPOT target, so a request that ran
        ahead has banked slack)."""
        if self.first_token_ms is None:
            return self.ttft_deadline_ms
        return self.first_token_ms + self.num_output_tokens * self.tpot_ms


@dataclass
class PlanInput:
    now_ms: float
    running: list[SeqView]         # resident on this worker, not finished (incl. preempted)
    waiting: list[SeqView]         # queued candidates (both classes), best first per class
    free_blocks: int               # from the worker's last report
    block_size: int
    # The worker's last PoolOccupancy as a dict (rt_available_slots, be_slots, ...).
    occupancy: dict = field(default_factory=dict)
    # Recent RT outcomes seen by this loop, newest last: (ttft_met, tpot_met) (AIMD input).
    recent_rt: list = field(default_factory=list)


@dataclass
class PlanDecision:
    admit: list[str] = field(default_factory=list)                    # send as NewSequence
    scheduled: list[tuple[str, int]] = field(default_factory=list)    # (request_id, num_tokens)
    preempt: list[str] = field(default_factory=list)      # pause; KV stays (BE: shareable by RT)
    checkpoint: list[str] = field(default_factory=list)   # pause and move KV to host
    recompute: list[str] = field(default_factory=list)    # drop KV; re-prefill later


@dataclass(frozen=True)
class PlannerConfig:
    max_num_seqs: int = 64              # running sequences per worker
    max_num_batched_tokens: int = 512   # tokens per step (the chunked-prefill budget)

    def __post_init__(self) -> None:
        if self.max_num_seqs <= 0 or self.max_num_batched_tokens <= 0:
            raise ValueError("max_num_seqs and max_num_batched_tokens must be > 0")


class Policy(Protocol):
    """Contract: plan() is pure and deterministic for equal inputs; it never schedules more
    than max_num_batched_tokens tokens or max_num_seqs sequences, never a sequence twice,
    and only admits ids from `waiting`."""
    name: str

    def plan(self, inp: PlanInput, cfg: PlannerConfig) -> PlanDecision: ...


def new_blocks_needed(seq: SeqView, num_tokens: int, block_size: int) -> int:
    """Blocks a sequence opens to grow by num_tokens, assuming it fills its blocks."""
    before = -(-seq.num_computed_tokens // block_size)
    after = -(-(seq.num_computed_tokens + num_tokens) // block_size)
    return after - before


class FCFS:
    """vLLM's default: first come, first served over both classes, running sequences
    first (decodes and unfinished prefills), then the oldest waiting requests, with
    chunked prefill under the token budget. When the pool runs out, the newest running
    sequence is preempted by recompute."""

    name = "fcfs"

    def plan(self, inp: PlanInput, cfg: PlannerConfig) -> PlanDecision:
        out = PlanDecision()
        budget, free_blocks = cfg.max_num_batched_tokens, inp.free_blocks
        running = sorted(inp.running, key=lambda s: s.arrival_ms)
        num_seqs = 0
        while running:
            seq = running.pop(0)
            if budget == 0 or num_seqs == cfg.max_num_seqs:
                break
            n = min(seq.num_uncomputed_tokens, budget)
            need = new_blocks_needed(seq, n, inp.block_size)
            while need > free_blocks and running:
                victim = running.pop()  # newest arrival gives way
                out.recompute.append(victim.request_id)
                free_blocks += -(-victim.num_computed_tokens // inp.block_size)
            if need > free_blocks:
                out.recompute.append(seq.request_id)
                break
            out.scheduled.append((seq.request_id, n))
            budget, free_blocks, num_seqs = budget - n, free_blocks - need, num_seqs + 1
        if out.recompute:
            return out  # under memory pressure nothing new starts this step
        for seq in sorted(inp.waiting, key=lambda s: s.arrival_ms):
            if budget == 0 or num_seqs == cfg.max_num_seqs:
                break
            n = min(seq.num_uncomputed_tokens, budget)
            need = new_blocks_needed(seq, n, inp.block_size)
            if need > free_blocks:
                break  # strict FCFS: a later, smaller request does not jump the queue
            out.admit.append(seq.request_id)
            out.scheduled.append((seq.request_id, n))
            budget, free_blocks, num_seqs = budget - n, free_blocks - need, num_seqs + 1
        return out


POLICIES: dict[str, type] = {"fcfs": FCFS}


def make_policy(name: str) -> Policy:
    try:
        return POLICIES[name]()
    except KeyError:
        raise ValueError(f"unknown policy {name!r}; choose from {sorted(POLICIES)}") from None
