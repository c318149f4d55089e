"""The hybrid benchmark in virtual time: the live scheduler's loop, with no Redis, no gRPC
and no sleeping.

    loop: arrivals -> queues -> PlanInput -> policy.plan -> Plan -> Engine.step -> absorb

One real Engine (allocator, sequences, validation) runs a SimRunner on a VirtualClock:
each step advances the clock by the cost model's iteration time, so a ten-minute trace
replays as fast as the CPU allows. The policies are the live ones, and the translation
between PlanDecision, Plan and Report mirrors scheduler_svc/worker_loop.py, so a
policy's behaviour here is its behaviour there, minus network time.

Deliberate differences from the live loop (both make this the more faithful model of
the worker, not a different policy input):
- after a recompute fallback (report.recompute_needed) the computed counts are read from
  the engine at once, where the live loop asks for the resident list in the next plan;
- a scheduled sequence the pool refused goes back to `preempted` if it was, as on the
  worker (the engine pauses it again).
"""
from __future__ import annotations

import itertools
import time
from collections import deque
from dataclasses import dataclass, field

from scheduler_svc.planner import (BE, RT, PlanDecision, PlanInput, PlannerConfig, Policy, SeqView, StepSample,
                                   blocks_of, holds_prefill)
from scheduler_svc.projection import PREEMPTING_FIELDS, project, reapply
from worker_svc.block_allocator import SeqClass
from worker_svc.build import build_engine
from worker_svc.config import WorkerConfig
from worker_svc.plan import NewSeq, Plan, Report, SeqOutput
from worker_svc.sampler import SamplingConfig
from worker_svc.sim.clock import VirtualClock

from .metrics import IterationRecord, RequestRecord
from .workload import Request

# The sim's tokens do not depend on the prompt's ids, so every prompt is this one id.
PROMPT_TOKEN = 3


@dataclass(frozen=True)
class VirtualConfig:
    """The simulated worker, and the driver's safety limits."""
    num_blocks: int | None = None       # None: the sim worker's default pool (sim_kv_cache_mb)
    sim_cost: str = "opt13b_a100"       # cost-model preset (worker_svc/sim/cost_model.py)
    overlap_copies: bool = WorkerConfig.sim_overlap_copies  # checkpoints beside the step (a GPU's copy engine)
    host_cache_mb: int = 1024           # host memory for checkpointed BE KV (worker default)
    max_model_len: int | None = None    # None: the sim model's context window
    idle_tick_ms: float = 5.0           # an empty step waits this long (the live idle sleep)
    pipeline_depth: int = 0             # 1: each plan is made as the step before it ends (--pipeline-depth 1)
    stall_ms: float = 30_000.0          # work is in flight but nothing ran for this long: give up
    max_virtual_ms: float | None = None  # None: 4x the last arrival + 10 min
    max_iterations: int = 5_000_000

    def worker_config(self, planner: PlannerConfig) -> WorkerConfig:
        return WorkerConfig(backend="sim", sim_clock="virtual", sim_cost=self.sim_cost,
                            sim_overlap_copies=self.overlap_copies,
                            num_blocks=self.num_blocks, host_cache_mb=self.host_cache_mb,
                            max_model_len=self.max_model_len,
                            max_num_seqs=planner.max_num_seqs,
                            max_num_batched_tokens=planner.max_num_batched_tokens, warmup=False)


@dataclass
class RunResult:
    requests: list[RequestRecord]       # in workload order
    iterations: list[IterationRecord]
    end_ms: float                       # virtual clock when the run stopped
    stop_reason: str                    # "done", "stalled", "max_virtual_ms", "max_iterations"
    num_dropped: int = 0                # new sequences the worker refused (never ran)
    num_retries: int = 0                # scheduled items the pool refused (planned again)
    error_fields: dict[str, int] = field(default_factory=dict)  # every ItemError, by field
    error_examples: dict[str, str] = field(default_factory=dict)  # the first message per field


@dataclass
class _Made:
    """A plan made, as the live loop keeps it until its report is read (worker_loop._Sent)."""
    plan: Plan
    was_preempted: dict[str, bool]   # the `preempted` flag each scheduled sequence had before
    planner_ms: float
    holds_prefill: bool
    num_freed_blocks: int            # blocks its recomputes and checkpoints free


@dataclass
class _Resident:
    view: SeqView
    record: RequestRecord


def run(requests: list[Request], policy: Policy, planner: PlannerConfig,
        cfg: VirtualConfig = VirtualConfig()) -> RunResult:
    """Serve `requests` (any order) with `policy` until every one has finished or was
    refused, or a safety limit hits. Pass a fresh policy: some keep state across steps."""
    return _Driver(requests, policy, planner, cfg).run()


class _Driver:
    def __init__(self, requests: list[Request], policy: Policy, planner: PlannerConfig, cfg: VirtualConfig):
        if cfg.pipeline_depth not in (0, 1):
            raise ValueError(f"pipeline_depth must be 0 or 1, got {cfg.pipeline_depth}")
        self.policy, self.planner, self.cfg = policy, planner, cfg
        self.clock = VirtualClock()
        self.engine = build_engine(cfg.worker_config(planner), clock=self.clock)
        self.records = {r.request_id: RequestRecord(r) for r in requests}
        self.arrivals = deque(sorted(requests, key=lambda r: (r.arrival_ms, r.service_class)))
        last_arrival = self.arrivals[-1].arrival_ms if self.arrivals else 0.0
        self.max_virtual_ms = cfg.max_virtual_ms or 4 * last_arrival + 600_000.0
        # Queues in arrival order, per class; the view is built once, on arrival.
        self.queues: dict[int, dict[str, SeqView]] = {RT: {}, BE: {}}
        self.resident: dict[str, _Resident] = {}
        self.pending_free: list[str] = []
        self.occupancy: dict = {}
        self.refused: set[str] = set()   # as the live loop: growth refused since the last plan
        # As the pipelined live loop: plans made whose reports are not read, oldest first,
        # and the steps read since the last plan (PlanInput.steps).
        self.in_flight: deque[_Made] = deque()
        self.steps_seen: list[StepSample] = []
        self.iterations: list[IterationRecord] = []
        self.num_done = 0
        self.idle_since_ms: float | None = None
        self.result = RunResult([], [], 0.0, "")

    # ---- the loop --------------------------------------------------------------------

    def run(self) -> RunResult:
        stop = None
        for plan_id in itertools.count(1):
            stop = self._stop_reason(plan_id)
            if stop:
                break
            self._iterate(plan_id)
        self.result.requests = list(self.records.values())
        self.result.iterations = self.iterations
        self.result.end_ms = self.clock.now_ms()
        self.result.stop_reason = stop
        self._copy_unfinished_progress()
        return self.result

    def _stop_reason(self, plan_id: int) -> str | None:
        if self.num_done == len(self.records):
            return "done"
        if plan_id > self.cfg.max_iterations:
            return "max_iterations"
        if self.clock.now_ms() > self.max_virtual_ms:
            return "max_virtual_ms"
        if self.idle_since_ms is not None and self.clock.now_ms() - self.idle_since_ms > self.cfg.stall_ms:
            return "stalled"
        return None

    def _iterate(self, plan_id: int) -> None:
        """One plan. Serially it runs at once. Pipelined (pipeline_depth 1) the plan made
        the iteration before runs first, and this one is made as that step ends, before
        its report is read: with the arrivals up to then, and the sequences as the last
        report had them, projected (the live loop plans just before the step's end)."""
        reports = []
        ended = self._run(self.in_flight[0]) if self.in_flight else None
        self._admit_arrivals()
        inp = self._plan_input()
        t0 = time.perf_counter()
        decision = self.policy.plan(inp, self.planner)
        planner_ms = (time.perf_counter() - t0) * 1e3
        prefill = self.cfg.pipeline_depth > 0 and holds_prefill(   # only a pipelined loop's step samples use it
            decision.scheduled, {v.request_id: v for v in inp.running}, {v.request_id for v in inp.waiting})
        plan, was_preempted, num_freed = self._to_plan(decision, plan_id)
        self.in_flight.append(_Made(plan, was_preempted, planner_ms, prefill, num_freed))
        if ended is not None:
            reports.append(self._read(self.in_flight.popleft(), ended))
        idle = not plan.scheduled and not self.resident   # the live loop reads every report then
        while len(self.in_flight) > (0 if idle else self.cfg.pipeline_depth):
            made = self.in_flight[0]
            reports.append(self._read(self.in_flight.popleft(), self._run(made)))
        if not reports:
            return
        if any(r.outputs for r in reports):
            self.idle_since_ms = None
        else:
            self._wait()

    def _run(self, made: _Made) -> tuple[Report, float, float]:
        """The worker runs a plan: (its report, when the step started, how long it took)."""
        start_ms = self.clock.now_ms()
        report = self.engine.step(made.plan)
        return report, start_ms, self.clock.now_ms() - start_ms

    def _read(self, made: _Made, ran: tuple[Report, float, float]) -> Report:
        """The loop reads a plan's report into its mirror."""
        plan, (report, start_ms, step_ms) = made.plan, ran
        self._absorb(report, made.was_preempted)
        if self.cfg.pipeline_depth:   # serially the policy times steps by the gaps between plans
            self.steps_seen.append(StepSample(len(plan.scheduled), sum(n for _, n in plan.scheduled),
                                              made.holds_prefill, step_ms))
        t = report.timings
        num_preempted = (len(plan.preempt) + len(plan.checkpoint) + len(plan.recompute)
                         - sum(e.field in PREEMPTING_FIELDS for e in report.errors))
        self.iterations.append(IterationRecord(
            start_ms, step_ms, len(report.outputs),
            t.num_prefill_tokens + t.num_decode_tokens, made.planner_ms, num_preempted))
        return report

    def _wait(self) -> None:
        """Nothing ran. With nothing in flight, jump to the next arrival; otherwise let
        the live loop's idle tick pass (a policy may be waiting for time to move)."""
        now = self.clock.now_ms()
        if self.idle_since_ms is None:
            self.idle_since_ms = now
        in_flight = self.resident or any(self.queues.values())
        next_ms = self.arrivals[0].arrival_ms if self.arrivals else None
        if not in_flight and next_ms is not None:
            self.clock.sleep_ms(next_ms - now)
            self.idle_since_ms = None
        elif next_ms is not None and next_ms - now < self.cfg.idle_tick_ms:
            self.clock.sleep_ms(next_ms - now)
        else:
            self.clock.sleep_ms(self.cfg.idle_tick_ms)

    # ---- plan input --------------------------------------------------------------------

    def _admit_arrivals(self) -> None:
        now = self.clock.now_ms()
        while self.arrivals and self.arrivals[0].arrival_ms <= now:
            req = self.arrivals.popleft()
            self.queues[req.service_class][req.request_id] = _queued_view(req)

    def _plan_input(self) -> PlanInput:
        # As the live loop: the oldest max_num_seqs of each class are the candidates, and
        # with plans in flight the running sequences are as they will leave them.
        n = self.planner.max_num_seqs
        waiting = [v for q in self.queues.values() for v in itertools.islice(q.values(), n)]
        at_ms, views, num_taken = self.clock.now_ms(), {rid: r.view for rid, r in self.resident.items()}, 0
        for made in self.in_flight:   # it has just run (the clock is at its end)
            views, taken = project(views, made.plan.scheduled, at_ms, self.engine.limits.block_size)
            num_taken += taken - made.num_freed_blocks
        inp = PlanInput(now_ms=at_ms, running=list(views.values()), waiting=waiting,
                        free_blocks=max(0, self.occupancy.get("free_blocks", self.engine.limits.num_blocks) - num_taken),
                        block_size=self.engine.limits.block_size, occupancy=dict(self.occupancy),
                        refused=frozenset(self.refused),
                        steps=tuple(self.steps_seen) if self.cfg.pipeline_depth else None,
                        max_num_fused_tokens=self.engine.runner.max_num_fused_tokens)
        self.refused, self.steps_seen = set(), []
        return inp

    # ---- decision -> plan ----------------------------------------------------------------

    def _to_plan(self, decision: PlanDecision, plan_id: int) -> tuple[Plan, dict[str, bool], int]:
        """The worker plan, the `preempted` flag each scheduled sequence had before, and
        the blocks its recomputes and checkpoints free."""
        plan = Plan(plan_id=plan_id, free=self.pending_free)
        self.pending_free = []
        for rid in decision.admit:
            self._admit(rid, plan)
        bs, num_freed = self.engine.limits.block_size, 0
        for rid in decision.recompute:
            if rid in self.resident:
                plan.recompute.append(rid)
                view = self.resident[rid].view
                num_freed += blocks_of(view.num_computed_tokens, bs)
                view.num_computed_tokens, view.preempted = 0, False  # the worker resumes it empty
        for ids, ops in ((decision.preempt, plan.preempt), (decision.checkpoint, plan.checkpoint)):
            for rid in ids:
                if rid in self.resident:
                    ops.append(rid)
                    if ops is plan.checkpoint:
                        num_freed += blocks_of(self.resident[rid].view.num_computed_tokens, bs)
                    self.resident[rid].view.preempted = True
        was_preempted: dict[str, bool] = {}
        for rid, num_tokens in decision.scheduled:
            if rid in self.resident:
                plan.scheduled.append((rid, num_tokens))
                view = self.resident[rid].view
                was_preempted[rid], view.preempted = view.preempted, False  # scheduling resumes it
        return plan, was_preempted, num_freed

    def _admit(self, rid: str, plan: Plan) -> None:
        record = self.records.get(rid)
        view = self.queues[record.request.service_class].pop(rid, None) if record else None
        if view is None:
            return  # not queued: the live loop's claim would fail the same way
        req = record.request
        sampling = SamplingConfig(max_tokens=req.output_len, temperature=0.0, ignore_eos=True)
        plan.new_sequences.append(NewSeq(rid, SeqClass(req.service_class), [PROMPT_TOKEN] * req.prompt_len,
                                         sampling))
        self.resident[rid] = _Resident(view, record)

    # ---- report ----------------------------------------------------------------------------

    def _absorb(self, report: Report, was_preempted: dict[str, bool]) -> None:
        self.occupancy = report.occupancy
        for err in report.errors:
            self._on_error(err.seq_id, err.field, err.message, was_preempted)
        for seq_id in report.recompute_needed:
            if seq_id in self.resident:
                self.resident[seq_id].view.num_computed_tokens = self.engine.seqs[seq_id].num_computed_tokens
        t = self.clock.now_ms()
        for out in report.outputs:
            if out.seq_id in self.resident:
                self._on_output(self.resident[out.seq_id], out, t)
        views = {rid: r.view for rid, r in self.resident.items()} if self.in_flight else {}
        for made in self.in_flight:   # made before this report: what it set stands
            p = made.plan
            reapply(views, p.recompute, (*p.preempt, *p.checkpoint), (rid for rid, _ in p.scheduled))

    def _on_error(self, seq_id: str, field_name: str, message: str, was_preempted: dict[str, bool]) -> None:
        """A refused new sequence can never run there: it ends, unserved. A scheduled item
        that did not fit is planned again; anything else is a policy bug, counted."""
        fields = self.result.error_fields
        fields[field_name] = fields.get(field_name, 0) + 1
        self.result.error_examples.setdefault(field_name, f"{seq_id}: {message}")
        if field_name.startswith("new_sequences") and seq_id in self.resident:
            self.resident.pop(seq_id).record.error = f"{field_name}: {message}"
            self.result.num_dropped += 1
            self.num_done += 1
        elif field_name.startswith("scheduled") and seq_id in self.resident:
            self.result.num_retries += 1
            if seq_id in was_preempted:
                self.resident[seq_id].view.preempted = was_preempted[seq_id]
            if field_name == "scheduled.num_tokens" and not self.resident[seq_id].view.preempted:
                self.refused.add(seq_id)

    def _on_output(self, res: _Resident, out: SeqOutput, t: float) -> None:
        view = res.view
        view.num_computed_tokens = out.num_computed_tokens
        view.num_tokens += len(out.token_ids)
        if out.token_ids:
            view.last_token_ms = t
            if view.first_token_ms is None:
                view.first_token_ms = t
            view.num_output_tokens += len(out.token_ids)
        if out.finished:
            self._finish(res, t)

    def _finish(self, res: _Resident, t: float) -> None:
        rec = res.record
        rec.first_token_ms, rec.finish_ms = res.view.first_token_ms, t
        rec.num_output_tokens = res.view.num_output_tokens
        del self.resident[rec.request.request_id]
        self.pending_free.append(rec.request.request_id)  # freed with the next plan, as live
        self.num_done += 1

    def _copy_unfinished_progress(self) -> None:
        for res in self.resident.values():
            res.record.first_token_ms = res.view.first_token_ms
            res.record.num_output_tokens = res.view.num_output_tokens


def _queued_view(req: Request) -> SeqView:
    # As worker_loop._view for a request that has produced nothing yet, with its full
    # record (max_tokens: the projection of a pipelined loop drops what ends by length).
    return SeqView(request_id=req.request_id, service_class=req.service_class, arrival_ms=req.arrival_ms,
                   num_prompt_tokens=req.prompt_len, num_tokens=req.prompt_len,
                   ttft_deadline_ms=req.arrival_ms + req.ttft_ms, tpot_ms=req.tpot_ms, max_tokens=req.output_len)
