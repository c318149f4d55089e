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


@dataclass(frozen=True)
class StepSample:
    """A step the worker ran: its plan's shape, and the wall time from when the worker
    could start it to its report."""
    num_seqs: int
    num_tokens: int
    prefill: bool                  # any prompt work in it (holds_prefill)
    ms: float


@dataclass
class PlanInput:
    now_ms: float
    running: list[SeqView]         # resident on this worker, not finished (incl. preempted)
    waiting: list[SeqView]         # queued candidates (both classes), best first per class
    free_blocks: int               # from the worker's last report
    block_size: int
    # The worker's last PoolOccupancy as a dict (rt_available_slots, be_slots, ...).
    occupancy: dict = field(default_factory=dict)
    # Running sequences whose growth the worker's pool refused in its last report although
    # the block arithmetic said it fit (their last block shares room with another end).
    refused: frozenset[str] = frozenset()
    # Serially None: the gaps between plans are the steps. When the loop plans a step
    # ahead (each plan is made before the last one's report is in), the gaps are not: the
    # steps reported since the last plan, oldest first.
    steps: tuple[StepSample, ...] | None = None
    # The worker's WorkerInfo.max_num_fused_tokens: steps of up to this many tokens run
    # its fused path, prompt tokens or not (0: it has none). bros' step-time model keys a
    # regime on it (policies/step_cost.py).
    max_num_fused_tokens: int = 0

    def num_pool_blocks(self) -> int:
        """The worker's KV pool in blocks: as its last report gave it, else (no report
        yet) what is free plus what the running sequences hold."""
        return self.occupancy.get("num_blocks") or self.free_blocks + sum(
            blocks_of(s.num_computed_tokens, self.block_size) for s in self.running)


@dataclass
class PlanDecision:
    admit: list[str] = field(default_factory=list)                    # send as NewSequence
    scheduled: list[tuple[str, int]] = field(default_factory=list)    # (request_id, num_tokens)
    preempt: list[str] = field(default_factory=list)      # pause; KV stays (BE: shareable by RT)
    checkpoint: list[str] = field(default_factory=list)   # pause and move KV to host
    recompute: list[str] = field(default_factory=list)    # drop KV; re-prefill later


@dataclass(frozen=True)
class PlannerConfig:
    max_num_seqs: int = 64              # resident (running, not paused) sequences per worker
    max_num_batched_tokens: int = 512   # tokens per step (the chunked-prefill budget)
    # partition: the share of memory, tokens and sequences reserved for RT (BE gets the rest).
    partition_rt_fraction: float = 0.5
    # bros: an RT request whose slack (ms to its next deadline) is below this runs before
    # any BE work; above it, it may yield its place to BE this iteration.
    bros_urgent_slack_ms: float = 150.0
    # bros: ... or below this many of the longest recent iterations, if that is more (a
    # yielding RT request must survive a step that BE fills; on a CPU steps are long).
    bros_urgent_iterations: float = 2.0
    # bros: the first guess of prefill cost per token until measured (ms); slack counts the
    # prompt still to compute, so a long prompt becomes urgent early enough.
    bros_prefill_ms_per_token: float = 0.15
    # bros, adaptive token budget (AIMD, like TCP's window): +step per on-time iteration,
    # x factor on an iteration where an RT request is past its deadline; never below min.
    bros_aimd_step_tokens: int = 16
    bros_aimd_decrease: float = 0.7
    bros_min_batched_tokens: int = 64
    # bros: hold the allowance's growth while the share of on-time RT outcomes in the
    # last bros_attainment_window is below this. 0 (default): classic AIMD, grow on every
    # iteration without a new miss. Holding at 0.95 gains 0.3-2.7 points of attainment on
    # sim-paper but costs BE at high load (at 0.6 of capacity: 99.0% of priority's BE and
    # 94.8% of fcfs's total, against 101.0% and 96.7%); docs/benchmarks.md, KV-pool section.
    bros_target_attainment: float = 0.0
    bros_attainment_window: int = 32    # RT outcomes in that window
    # bros: a new BE request is admitted only if, after its first chunk, the free blocks
    # still hold this many tokens of growth for every running sequence (else it would be
    # recomputed a few steps later, wasting its prefill).
    bros_admit_headroom_tokens: int = 64
    # bros: if > 0, that headroom per growing sequence is instead this many standard
    # deviations of the output lengths of recently finished BE requests (once 32 have
    # finished; until then the fixed headroom above; never under one block): the room
    # that pays grows with how unpredictable BE growth is (48-64 tokens suit outputs of
    # 80 +- 28, ~256 suit 215 +- 187; docs/benchmarks.md, sim-arxiv). 0: always fixed.
    bros_admit_headroom_sd: float = 1.5
    # bros: a BE prompt chunk that would turn a decode-only step serving RT into a step with
    # prefill must hold at least this many times the tokens whose time equals that regime's
    # overhead (as learned; on a CPU worker ~7 ms, ~7 tokens), or the rest of the prompt, or
    # all the step budget holds, if less; a smaller chunk (cut by RT's slack or BE's allowance)
    # waits. RT banks slack between such steps, so fewer, larger chunks pay the overhead
    # less often for the same RT deadlines (cpu-hybrid-virtual, 24 seeds: 1 -> 4 raised RT
    # attainment and BE throughput, docs/benchmarks.md). 0: no minimum. No effect where the
    # two regimes cost the same (a GPU).
    bros_prefill_switch_overheads: float = 4.0
    # bros: while the RT sequences on a worker hold (or, still prefilling, will hold) more
    # than this share of its KV pool, BE gets no prompt work there (no admission, no
    # prefill chunk, no resume), only decodes of running BE. RT KV stays resident as long
    # as RT decodes, and every BE prompt chunk lengthens RT's steps: past this share the
    # pool fills with RT KV and new RT requests wait for memory. (Five seeds, 0.6 of
    # capacity: RT both 0.803 -> 0.845 on sim-paper, 0.822 -> 0.847 on sim-arxiv, BE
    # still 100.5% and 101.7% of priority's; 0.1-0.3 within 0.4 points; 0.5 and 0.3
    # gain more RT for 2-7% of BE; docs/benchmarks.md, "RT's share of the pool".) >= 1: off.
    bros_rt_kv_pressure: float = 0.6
    # bros: the slack gate lets BE spend an RT request's slack only beyond a reserve of this
    # many times what one full step with prompt work (the step budget, as the step-time
    # model prices it) overruns the request's TPOT target. RT cannot refuse such a step
    # (another RT request's urgent prompt chunk fills one): spent to its deadline, a decoding
    # RT request goes late on the next one and may end late, and each miss cuts BE's
    # allowance too. (cpu-hybrid-virtual, 24 seeds, where a 64-token step is ~90 ms against
    # a ~41 ms TPOT target: RT both 0.572 -> 0.652, BE unchanged; docs/benchmarks.md, "The
    # slack reserve".) 0: off (BE may spend all of it).
    bros_slack_reserve_steps: float = 1.0
    # bros: a running RT sequence that cannot grow (no free block, no BE left to give way)
    # recomputes newer RT sequences, newest first, as vLLM does, but only in a step that
    # would otherwise leave at least this share of its token budget unused. Waiting for
    # blocks kept the decodes of a full RT-only pool at their block boundaries, steps of
    # 1-3 of 32 tokens for seconds (tests/test_liveness.py seeds 1000-1399: bros' makespan
    # 1.012x the faster of fcfs and priority on the mean, 1.58x at worst -> 1.002x,
    # 1.35x); recomputing whenever one is short threw away RT work under overload, where
    # steps are full anyway (sim-paper at 0.6 of capacity, seed 2: both 0.742 -> 0.643;
    # with this share 0.771; docs/scheduler.md). > 1: never.
    bros_rt_recompute_underfill: float = 0.5
    # bros: cap each step at the worker's fused-path size (PlanInput.max_num_fused_tokens)
    # while the step-time model says a step of that size costs less per token than one of
    # max_num_batched_tokens: on a CPU worker a 64-token step runs the C++ stack (~26 ms
    # + 1.0 ms per prompt token in the live loop) and a 256-token one the eager model
    # (~25 + 1.5), so BE prompts go through ~12% cheaper in 64-token chunks
    # (docs/benchmarks.md, cpu-hybrid). No effect on a worker without a fused path (a GPU,
    # the A100 sim), or where a full step is the cheaper one per token.
    bros_fused_steps: bool = True
    # bros' estimators, learned online from the gaps between plans (no I/O):
    # the step time assumed until one is measured (ms);
    bros_first_step_ms: float = 50.0
    # the weight of each new gap in the running means of ms per token and per step;
    bros_step_time_smoothing: float = 0.1
    # the longest recent step decays by 1/this per step (halves in ~0.7x as many), so an
    # RT request yields its place only if it survives a step as long as recent ones;
    bros_long_step_memory: float = 64.0
    # the step-time model (per regime: decode-only, with prefill; a weighted least-squares
    # line): the weight kept by older gaps per new one (0.97: ~30 steps of memory), and
    # the weight a regime needs before its own line is used instead of a prior;
    bros_step_cost_decay: float = 0.97
    bros_step_cost_min_weight: float = 4.0
    # the spread of finished BE output lengths (bros_admit_headroom_sd): over the last
    # this many, once at least min_samples have finished.
    bros_output_length_window: int = 256
    bros_output_length_min_samples: int = 32

    def __post_init__(self) -> None:
        if self.max_num_seqs <= 0 or self.max_num_batched_tokens <= 0:
            raise ValueError("max_num_seqs and max_num_batched_tokens must be > 0")
        if not 0 < self.partition_rt_fraction < 1:
            raise ValueError("partition_rt_fraction must be in (0, 1)")
        if not 0 < self.bros_aimd_decrease < 1 or self.bros_aimd_step_tokens <= 0:
            raise ValueError("bros_aimd_decrease must be in (0, 1) and bros_aimd_step_tokens > 0")
        if not 0 <= self.bros_target_attainment <= 1:
            raise ValueError("bros_target_attainment must be in [0, 1]")
        if self.bros_urgent_iterations < 0:
            raise ValueError("bros_urgent_iterations must be >= 0")
        if self.bros_attainment_window <= 0:
            raise ValueError("bros_attainment_window must be > 0")
        if self.bros_admit_headroom_tokens < 0 or self.bros_min_batched_tokens <= 0:
            raise ValueError("bros_admit_headroom_tokens must be >= 0 and bros_min_batched_tokens > 0")
        if self.bros_admit_headroom_sd < 0:
            raise ValueError("bros_admit_headroom_sd must be >= 0")
        if self.bros_rt_kv_pressure <= 0:
            raise ValueError("bros_rt_kv_pressure must be > 0")
        if self.bros_slack_reserve_steps < 0:
            raise ValueError("bros_slack_reserve_steps must be >= 0")
        if self.bros_rt_recompute_underfill < 0:
            raise ValueError("bros_rt_recompute_underfill must be >= 0")
        if self.bros_prefill_switch_overheads < 0:
            raise ValueError("bros_prefill_switch_overheads must be >= 0")
        if self.bros_first_step_ms <= 0 or not 0 < self.bros_step_time_smoothing <= 1:
            raise ValueError("bros_first_step_ms must be > 0 and bros_step_time_smoothing in (0, 1]")
        if self.bros_long_step_memory < 1 or not 0 < self.bros_step_cost_decay < 1:
            raise ValueError("bros_long_step_memory must be >= 1 and bros_step_cost_decay in (0, 1)")
        if self.bros_step_cost_min_weight <= 0:
            raise ValueError("bros_step_cost_min_weight must be > 0")
        if not 0 < self.bros_output_length_min_samples <= self.bros_output_length_window:
            raise ValueError("bros_output_length_min_samples must be in [1, bros_output_length_window]")


class Policy(Protocol):
    """Contract: plan() does no I/O and is deterministic for equal inputs and history; it
    never schedules more than max_num_batched_tokens tokens or max_num_seqs sequences,
    never a sequence twice, and only admits ids from `waiting`."""
    name: str

    def plan(self, inp: PlanInput, cfg: PlannerConfig) -> PlanDecision: ...


def is_prompt_work(n: int, is_new: bool, seq: SeqView | None) -> bool:
    """Whether n tokens of a sequence are prompt tokens (a worker's slower regime): a
    chunk of more than one token, a new sequence, or a last prompt token of a running one."""
    return n > 1 or is_new or (seq is not None and seq.num_uncomputed_tokens > 1)


def holds_prefill(scheduled: list[tuple[str, int]], running: dict[str, SeqView], waiting: set[str]) -> bool:
    """Whether a step of these (request id, num_tokens) items does any prompt work."""
    return any(is_prompt_work(n, rid in waiting, running.get(rid)) for rid, n in scheduled)


def blocks_of(num_tokens: int, block_size: int) -> int:
    return -(-num_tokens // block_size)


def new_blocks_needed(seq: SeqView, num_tokens: int, block_size: int) -> int:
    """Blocks a sequence opens to grow by num_tokens, assuming it fills its blocks."""
    return blocks_of(seq.num_computed_tokens + num_tokens, block_size) - blocks_of(seq.num_computed_tokens, block_size)


class StepBudget:
    """What is left of one step (tokens, sequences, free blocks) and what it holds so far."""

    def __init__(self, inp: PlanInput, cfg: PlannerConfig, max_tokens: int | None = None,
                 max_seqs: int | None = None, free_blocks: int | None = None, chunked: bool = True):
        self.block_size = inp.block_size
        self.tokens = cfg.max_num_batched_tokens if max_tokens is None else max_tokens
        self.seqs = cfg.max_num_seqs if max_seqs is None else max_seqs
        self.blocks = inp.free_blocks if free_blocks is None else free_blocks
        self.chunked = chunked
        # Sequences the worker refused to grow last time although the arithmetic said
        # they fit: their last block is shared, so they need a fresh one (policy-filled).
        self.needs_block: set[str] = set()
        self.out = PlanDecision()

    def new_blocks(self, seq: SeqView, num_tokens: int) -> int:
        n = new_blocks_needed(seq, num_tokens, self.block_size)
        if n == 0 and self.needs_block and seq.request_id in self.needs_block:
            return 1
        return n

    def chunk(self, seq: SeqView) -> int:
        """Tokens this sequence would run now: all it has left, within the budget (0: none).
        Without chunked prefill a prompt runs whole or not at all."""
        n = min(seq.num_uncomputed_tokens, self.tokens)
        if not self.chunked and n < seq.num_uncomputed_tokens:
            return 0
        return n

    def fits(self, seq: SeqView, n: int) -> bool:
        return n > 0 and self.seqs > 0 and self.new_blocks(seq, n) <= self.blocks

    def take(self, seq: SeqView, n: int, admit: bool = False) -> None:
        self.out.scheduled.append((seq.request_id, n))
        if admit:
            self.out.admit.append(seq.request_id)
        self.tokens -= n
        self.seqs -= 1
        self.blocks -= self.new_blocks(seq, n)

    def untake(self, seq: SeqView, n: int) -> None:
        """Give back what take(seq, n) used (the sequence is preempted after all)."""
        self.tokens += n
        self.seqs += 1
        self.blocks += self.new_blocks(seq, n)

    def release(self, seq: SeqView) -> None:
        """Credit the blocks of a sequence this step preempts by recompute."""
        self.blocks += blocks_of(seq.num_computed_tokens, self.block_size)


def make_policy(name: str) -> Policy:
    from .policies import POLICIES
    try:
        return POLICIES[name]()
    except KeyError:
        raise ValueError(f"unknown policy {name!r}; choose from {sorted(POLICIES)}") from None
