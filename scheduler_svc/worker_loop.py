"""One loop per worker whose lease this replica holds: report in, Redis out, plan, plan out.

    connect -> list_resident -> reconcile with Redis
    loop: aborts + queues (Redis) -> policy.plan (pure) -> claim (Redis) -> Step -> report
          -> tokens, finishes, worker state (one Redis pipeline, in the background)
          -> free what Redis now holds (in a later plan)

The report's write to Redis is off the critical path: the next plan needs only the
loop's own mirror, which the report updates at once, so the write runs while the loop
reads the queues, plans and waits for the next step, and the worker is not left idle for
a round trip each step. One write is in flight at a time (each waits for the one
before, so a request's tokens land in order), and anything else that writes a running
request's state (aborts, handing BE back, reconnecting) waits for it first.

    loop:     report N | inputs, plan N+1, send | ........ wait ........ | report N+1
    Redis:             | write N  ->|                                    | write N+1
    worker:   ---------|            | step N+1 ..........................|

Serially (pipeline_depth 0) the worker still waits between two steps for the queue read,
the planning and the exchange. Pipelined (1), plan N+1 is made while the worker runs step
N, against the sequences as plan N will leave them (projection.py), and waits in the
stream for the worker to finish step N:

    loop:     report N-1 | inputs, plan N+1, send | .. wait .. | report N | inputs, plan N+2 ...
    worker:   step N ........................................ | step N+1 ..................

Nothing here is authoritative: the in-memory `seqs` mirror is rebuilt from Redis and the
worker's resident list whenever a loop (re)connects, so a replica killed at any instant
loses nothing. A finished sequence is freed on the worker only after its tokens are in
Redis, so the worker's copy covers any crash in between, in-flight write included.
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

import grpc
from redis.exceptions import RedisError

from bros import tls
from bros.v1 import types_pb2, worker_pb2, worker_pb2_grpc

from .keys import BEST_EFFORT
from . import round_trips
from .placement import RoomBoard
from .planner import BE, RT, PlanInput, PlannerConfig, Policy, SeqView, StepSample, blocks_of, holds_prefill
from .projection import PREEMPTING_FIELDS, project, reapply
from .store import Batch, RequestRecord, Store

if TYPE_CHECKING:
    from .metrics import SchedulerMetrics
    from .step_log import StepLog
    from .tracing import LoopTracing

log = logging.getLogger(__name__)

MIN_PREFILL_SAMPLE = 64     # prefill tokens a step needs to count toward the rate
PREFILL_RATE_ALPHA = 0.2
PLAN_PHASE_ALPHA = 0.1      # weight of each new queue-read-to-plan-sent time in its running mean
# Pipelined, a plan is made this long before the step in flight should end: 3 x the mean
# queue-read-to-plan-sent time or a quarter of the last step, whichever is more, + 1 ms.
PLAN_MARGIN_PHASES = 3.0
PLAN_MARGIN_STEP = 0.25
_FINISH_NAMES = {types_pb2.STOP: "stop", types_pb2.LENGTH: "length", types_pb2.ABORT: "abort"}


def now_ms() -> float:
    return time.time() * 1e3


@dataclass
class Running:
    """A request resident on this loop's worker."""
    view: SeqView
    num_output_tokens: int          # output tokens already in Redis


@dataclass
class LoopStats:
    """What the loop costs, published in its worker state hash in Redis (the sim-scale benchmark reads it)."""
    iterations: int = 0
    round_trips: int = 0            # Redis round trips made by this loop (round_trips.py counts them)
    # Per plan() call: wall time, and the CPU time of the thread that ran it. The two part
    # when the OS runs something else mid-plan (on a box shared with its workers).
    planner_ms: deque = field(default_factory=lambda: deque(maxlen=2000))
    planner_cpu_ms: deque = field(default_factory=lambda: deque(maxlen=2000))
    # What the loop's plans did: steps that ran anything, the sequences in them, and the
    # preempt / checkpoint / recompute items issued.
    num_steps: int = 0
    num_scheduled_seqs: int = 0
    preemptions: int = 0
    # Output tokens written to Redis and requests finished, per class (RT, BE).
    output_tokens: Counter = field(default_factory=Counter)
    finished: Counter = field(default_factory=Counter)
    # The planner quantiles as last sorted, and at which iteration: every report publishes
    # a summary, and sorting 2 x 2,000 plan times each time cost ~0.2 ms of the loop's
    # path between a report and the next plan. Refreshed every QUANTILES_EVERY iterations.
    _planner_quantiles: dict = field(default_factory=dict, repr=False)
    _quantiles_at: int = -1

    QUANTILES_EVERY = 64

    def summary(self) -> dict:
        if self._quantiles_at < 0 or self.iterations - self._quantiles_at >= self.QUANTILES_EVERY:
            wall, cpu = _quantiles(self.planner_ms), _quantiles(self.planner_cpu_ms)
            self._planner_quantiles = {"planner_p50_ms": wall(0.5), "planner_p99_ms": wall(0.99),
                                       "planner_cpu_p50_ms": cpu(0.5), "planner_cpu_p99_ms": cpu(0.99)}
            self._quantiles_at = self.iterations
        return {"iterations": self.iterations, **self._planner_quantiles,
                "redis_round_trips_per_iter": self.round_trips / max(1, self.iterations),
                "num_steps": self.num_steps, "num_scheduled_seqs": self.num_scheduled_seqs,
                "preemptions": self.preemptions,
                "rt_output_tokens": self.output_tokens[RT], "be_output_tokens": self.output_tokens[BE],
                "rt_finished": self.finished[RT], "be_finished": self.finished[BE]}


def _quantiles(values) -> Callable[[float], float]:
    xs = sorted(values)
    return (lambda q: xs[min(len(xs) - 1, int(q * len(xs)))]) if xs else (lambda q: 0.0)


@dataclass
class _Sent:
    """A plan made, then on its way to (or being run by) the worker, its report not read yet."""
    plan: worker_pb2.StepPlan
    resuming: set[str] = field(default_factory=set)  # paused sequences it schedules (the worker may keep them paused)
    num_prefill_tokens: int = 0     # its chunks of more than one token (the prefill-rate sample)
    holds_prefill: bool = False     # any prompt work in it (planner.holds_prefill)
    num_freed_blocks: int = 0       # blocks its aborts, recomputes and checkpoints free
    sent_ms: float = 0.0


@dataclass
class LoopStatus:
    connected: bool = False         # this replica drives the worker (holds its lease)
    reachable: bool = False         # the worker answered recently (Describe or Step)
    occupancy: dict = field(default_factory=dict)
    last_step_ms: float = 0.0


class WorkerLoop:
    def __init__(self, address: str, store: Store, policy: Policy, cfg: PlannerConfig, replica_id: str,
                 lease_ttl_ms: int = 5000, idle_sleep_s: float = 0.005, board: RoomBoard | None = None,
                 step_timeout_ms: float = 30_000, requeue_after_ms: float = 5_000,
                 credentials: grpc.ChannelCredentials | None = None, pipeline_depth: int = 0):
        self.address = address
        self.credentials = credentials  # mutual TLS to the worker; None: plaintext
        self.store = store
        self.policy = policy
        self.cfg = cfg
        self.replica_id = replica_id
        self.lease_ttl_ms = lease_ttl_ms
        self.idle_sleep_s = idle_sleep_s
        self.status = LoopStatus()
        self.stats = LoopStats()
        self.board = board or RoomBoard()  # shared by this replica's loops (placement.py)
        self.info: worker_pb2.WorkerInfo | None = None
        self.seqs: dict[str, Running] = {}
        self._pending_free: list[str] = []
        # The last report's Redis write (see the module doc): built, then started once the
        # next plan is on its way to the worker.
        self._unwritten: tuple[Batch, list[str]] | None = None
        self._writing: asyncio.Task | None = None
        self._plan_id = 0
        self._needs_resync = False  # the worker cut a sequence's KV short: re-read counts
        self._refused: set[str] = set()   # running sequences whose growth the last report refused
        # Plans sent whose reports are not read yet, oldest first. The loop reads a report
        # once more than pipeline_depth are out: 0 plans against the last report (serial),
        # 1 sends plan k+1 while the worker runs plan k (projection.py), so the worker
        # never waits for the queue read and the planning between two steps.
        self.pipeline_depth = pipeline_depth
        self._sent: deque[_Sent] = deque()
        self._last_report_ms = 0.0        # when the last report was read (wall ms)
        self._plan_phase_ms = 0.0         # queue read to plan sent, a running mean (ms)
        self._steps_seen: list[StepSample] = []   # reported since the last plan (PlanInput.steps)
        self._stopping = asyncio.Event()
        # A worker that died or stalls: how long a report may take, and how long the loop
        # keeps a lost worker's requests for it before they go back to the queues.
        self.step_timeout_s = step_timeout_ms / 1e3
        self.requeue_after_s = requeue_after_ms / 1e3
        self._worker_lost_at: float | None = None   # monotonic s; None while the worker answers
        # Prefill throughput seen in steps with enough prefill to measure it (EWMA): what
        # admission uses to tell whether an RT request's TTFT target can still be met.
        self.prefill_tokens_per_ms = 0.0
        # Draining (this replica on SIGTERM, or the worker said so in its report): admit
        # nothing, hand BE back to the queue, let RT finish. `drained` is set once this
        # loop holds nothing more (replica drain only).
        self.draining = False
        self.worker_draining = False
        self.drained = asyncio.Event()
        # Observability, set by server.py when enabled; None costs one test per hook.
        self.metrics: SchedulerMetrics | None = None
        self.tracing: LoopTracing | None = None
        self.step_log: StepLog | None = None

    # ---- outer loop: lease, connect, retry ------------------------------------------

    async def run(self) -> None:
        round_trips.count_into(self.stats)   # this task's Redis traffic, and its write tasks'
        backoff = 0.1
        while not self._stopping.is_set():
            if self.draining:
                self.drained.set()
                return
            try:
                if await self.store.acquire_lease(self.address, self.replica_id, self.lease_ttl_ms):
                    await self._session()
                    backoff = 0.1
                else:
                    # Another replica drives it; still know it (admission checks, Tokenize, health).
                    await self._probe()
                    await asyncio.sleep(self.lease_ttl_ms / 4000)
                    continue
            except (grpc.aio.AioRpcError, ConnectionError, OSError, TimeoutError) as e:
                log.warning("worker %s: %s", self.address, _describe(e))
                self._worker_lost()
            except RedisError as e:
                # Redis away: the worker keeps its sequences; reconnecting reconciles.
                log.warning("worker %s: redis: %s", self.address, e)
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 — one loop's bug must not kill the replica
                log.exception("worker %s loop failed", self.address)
            self.status.connected = self.status.reachable = False
            self.board.forget(self.address)
            await self._requeue_if_lost()
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 2.0)

    def _worker_lost(self) -> None:
        if self._worker_lost_at is None:
            self._worker_lost_at = time.monotonic()

    async def _requeue_if_lost(self) -> None:
        """Once a worker has been gone requeue_after_s, what it ran goes back to the queues
        (at the admission scores, output so far carried) for the other workers or for
        this one when it is back; reconnecting frees whatever it still holds."""
        if self._worker_lost_at is None or time.monotonic() - self._worker_lost_at < self.requeue_after_s:
            return
        try:
            if await self.store.lease_holder(self.address) != self.replica_id:
                return  # whoever drives it now decides
            ids = sorted(await self.store.running(self.address))
            if ids:
                requeued = await self.store.requeue(self.address, ids)
                log.warning("worker %s lost: requeued %d requests", self.address, len(requeued))
        except RedisError as e:
            log.warning("worker %s: requeue deferred, redis: %s", self.address, e)

    def channel(self) -> grpc.aio.Channel:
        return tls.aio_channel(self.address, self.credentials)

    async def stop(self) -> None:
        self._stopping.set()
        await self.store.release_lease(self.address, self.replica_id)

    async def _probe(self) -> None:
        try:
            async with self.channel() as channel:
                self.info = await worker_pb2_grpc.WorkerStub(channel).Describe(worker_pb2.DescribeRequest(), timeout=2)
            self.status.reachable = True
        except grpc.aio.AioRpcError:
            self.status.reachable = False

    async def _session(self) -> None:
        try:
            await self._drive()
        finally:
            await self._settle_quietly()

    async def _drive(self) -> None:
        async with self.channel() as channel:
            stub = worker_pb2_grpc.WorkerStub(channel)
            self.info = await stub.Describe(worker_pb2.DescribeRequest(), timeout=10)
            stream = stub.Step()
            report = await self._exchange(stream, worker_pb2.StepPlan(list_resident=True))
            await self._reconcile(report)
            self._worker_lost_at = None
            self.status.connected = self.status.reachable = True
            self._sent.clear()
            self._observe_session()
            while not self._stopping.is_set():
                await self._until_plan_time()
                t0 = time.perf_counter()
                n = self.cfg.max_num_seqs
                # Only as many queued BE requests as could start now; RT is always looked
                # at in full (bros may pause BE to make room for it).
                free_seats = self._free_seats()
                held, aborts, waiting_rt, waiting_be = await self.store.loop_inputs(
                    self.address, self.replica_id, self.lease_ttl_ms, n, free_seats)
                self.stats.iterations += 1
                if not held:
                    log.warning("lost the lease on %s", self.address)
                    return
                made = await self._next_plan(aborts, waiting_rt + waiting_be)
                await self._send(stream, made)
                plan = made.plan
                self._plan_phase_ms += PLAN_PHASE_ALPHA * ((time.perf_counter() - t0) * 1e3 - self._plan_phase_ms)
                idle = not plan.scheduled and not self.seqs
                # Idle, nothing is worth running ahead: read every report before sleeping.
                while len(self._sent) > (0 if idle else self.pipeline_depth):
                    await self._receive(stream)
                if self.draining and not self.seqs:
                    await self._flush(stream)
                    await self._settle()
                    if self._pending_free:  # leave the worker empty for whoever comes next
                        await self._exchange(stream, worker_pb2.StepPlan(free=self._pending_free))
                        self._pending_free = []
                    self.drained.set()
                    return
                if idle:
                    self._start_write()   # nothing to overlap it with
                    await asyncio.sleep(self.idle_sleep_s)
            await self._flush(stream)   # stopping: what the worker ran goes to Redis

    async def _exchange(self, stream, plan: worker_pb2.StepPlan) -> worker_pb2.StepReport:
        """Send a plan and read its report, outside the planning loop (nothing else may be
        in flight: the reconnect's resident list, the drain's last free)."""
        await self._write_plan(stream, plan)
        return await self._read_report(stream)

    async def _send(self, stream, made: _Sent) -> None:
        await self._write_plan(stream, made.plan)
        made.sent_ms = now_ms()
        self._sent.append(made)

    async def _receive(self, stream) -> None:
        """Read the oldest sent plan's report into the mirror."""
        report = await self._read_report(stream)
        sent = self._sent.popleft()
        t = now_ms()
        num_seqs, num_tokens = len(sent.plan.scheduled), sum(s.num_tokens for s in sent.plan.scheduled)
        if self.pipeline_depth:   # serially the policy times steps by the gaps between plans
            self._steps_seen.append(StepSample(num_seqs, num_tokens, sent.holds_prefill,
                                               t - max(sent.sent_ms, self._last_report_ms)))
        self._last_report_ms = t
        if report.plan_id != sent.plan.plan_id:
            raise ConnectionError(f"report for plan {report.plan_id}, expected {sent.plan.plan_id}")
        if self.step_log is not None and num_seqs:
            self.step_log.record(self.address, sent.sent_ms, t, report.timings.step_ms, num_seqs, num_tokens,
                                 sent.num_prefill_tokens, sent.holds_prefill, self.info.max_num_fused_tokens)
        await self._absorb(report, sent)
        self.worker_draining = report.draining
        if self.pipeline_depth:
            self._start_write()   # the next plan waits for its time (_until_plan_time): write now

    async def _flush(self, stream) -> None:
        """Read every outstanding report (the loop is leaving or going idle)."""
        while self._sent:
            await self._receive(stream)

    async def _write_plan(self, stream, plan: worker_pb2.StepPlan) -> None:
        self._plan_id += 1
        plan.plan_id = self._plan_id
        try:
            await asyncio.wait_for(stream.write(plan), self.step_timeout_s)
        except TimeoutError:
            self._stalled(stream)
        self._start_write()   # the last report's write, while the worker steps

    async def _read_report(self, stream) -> worker_pb2.StepReport:
        # A stalled worker must not hold its requests forever: no report in time ends the
        # session (TimeoutError), and its requests are requeued at once.
        try:
            report = await asyncio.wait_for(stream.read(), self.step_timeout_s)
        except TimeoutError:
            self._stalled(stream)
        if report is grpc.aio.EOF:
            raise ConnectionError("worker closed the Step stream")
        return report

    def _stalled(self, stream) -> None:
        stream.cancel()
        self._worker_lost_at = time.monotonic() - self.requeue_after_s
        raise TimeoutError(f"no report within {self.step_timeout_s:.1f} s") from None

    # ---- reconciliation ------------------------------------------------------------------

    async def _reconcile(self, report: worker_pb2.StepReport) -> None:
        """Adopt what the worker holds and Redis says is ours; free the rest; requeue what
        Redis says runs here but the worker lost."""
        self.seqs.clear()
        self._pending_free = []
        ours = await self.store.running(self.address)
        t = now_ms()
        async with self.store.batch() as b:
            for res in report.resident:
                rec = await self.store.get(res.seq_id)
                if rec is None or rec.state != "running" or rec.worker_id != self.address:
                    self._pending_free.append(res.seq_id)
                    continue
                if rec.abort_requested:  # asked before the last replica could act on it
                    b.finish(rec.request_id, "abort", t)
                    self._pending_free.append(rec.request_id)
                    continue
                # Tokens the last replica never wrote: the stream skips those it has (the
                # text of the missing ones is lost; their ids are not).
                out = list(res.output_token_ids)
                if out:
                    b.append_tokens(rec.request_id, 0, out, [""] * len(out), t)
                if res.finished:
                    b.finish(rec.request_id, _FINISH_NAMES.get(res.finish_reason, "stop"), t)
                    self._pending_free.append(rec.request_id)
                    continue
                view = self._view(rec, res.num_prompt_tokens + len(out), full=True)
                view.num_computed_tokens = res.num_computed_tokens
                self.seqs[rec.request_id] = Running(view, len(out))
                self._observe_adopted(rec)
        lost = sorted(ours - {r.seq_id for r in report.resident})
        if lost:
            await self.store.requeue(self.address, lost)
        log.info("worker %s: adopted %d, freed %d, requeued %d", self.address, len(self.seqs),
                 len(self._pending_free), len(lost))

    # ---- planning ------------------------------------------------------------------------

    async def _next_plan(self, aborts: list[str], queued: list[RequestRecord]) -> _Sent:
        plan = worker_pb2.StepPlan(free=self._pending_free)
        made = _Sent(plan)
        self._pending_free = []
        self._observe_plan_start(aborts)
        if aborts:
            await self._settle()   # a request that just finished: its own finish lands first
            async with self.store.batch() as b:
                for rid in aborts:
                    b.finish(rid, "abort", now_ms())
                    if (run := self.seqs.pop(rid, None)) is not None:
                        plan.free.append(rid)
                        made.num_freed_blocks += self._blocks_held(run.view)
        if self.draining or self.worker_draining:
            queued = []
            await self._hand_back_be(plan)
        idle = not self.seqs
        waiting = {r.request_id: r for r in queued if r.request_id not in self.seqs
                   and self.board.takes(self.address, r.service_class, idle)}
        occ = self.status.occupancy
        at_ms, views, num_taken = self._ahead()
        inp = PlanInput(now_ms=at_ms, running=list(views.values()),
                        waiting=[self._view(r, r.num_prompt_tokens + r.num_output_tokens)
                                 for r in waiting.values()],
                        free_blocks=max(0, occ.get("free_blocks", self.info.num_blocks) - num_taken),
                        block_size=self.info.block_size, occupancy=occ, refused=frozenset(self._refused),
                        steps=tuple(self._steps_seen) if self.pipeline_depth else None,
                        max_num_fused_tokens=self.info.max_num_fused_tokens)
        self._refused, self._steps_seen = set(), []
        t0, c0 = time.perf_counter(), time.thread_time()
        decision = self.policy.plan(inp, self.cfg)
        self.stats.planner_ms.append((time.perf_counter() - t0) * 1e3)
        self.stats.planner_cpu_ms.append((time.thread_time() - c0) * 1e3)
        t_claim = now_ms()
        claimed = set(await self.store.claim(self.address, decision.admit, t_claim)) if decision.admit else set()
        admitted = [rid for rid in decision.admit if rid in claimed]
        full = dict(zip(admitted, await asyncio.gather(*(self.store.get(rid) for rid in admitted))))
        for rid in decision.admit:
            if rid in claimed and full[rid] is not None:
                rec = full[rid]
                plan.new_sequences.append(await self._new_sequence(rec))
                self.seqs[rid] = Running(self._view(rec, rec.num_prompt_tokens + rec.num_output_tokens, full=True),
                                         rec.num_output_tokens)
        self._observe_claimed(full, t_claim)
        for rid in decision.recompute:
            plan.recompute.append(rid)
            view = self.seqs[rid].view
            made.num_freed_blocks += self._blocks_held(view)
            view.num_computed_tokens, view.preempted = 0, False  # the worker resumes it empty
        for rid in decision.preempt:
            plan.preempt.append(rid)
            self.seqs[rid].view.preempted = True
        for rid in decision.checkpoint:
            plan.checkpoint.append(rid)
            made.num_freed_blocks += self._blocks_held(self.seqs[rid].view)
            self.seqs[rid].view.preempted = True
        made.num_prefill_tokens = sum(n for _, n in decision.scheduled if n > 1)
        if self.pipeline_depth or self.step_log is not None:   # a pipelined loop's step samples, the log
            made.holds_prefill = holds_prefill(decision.scheduled, views, set(waiting))
        for rid, num_tokens in decision.scheduled:
            if rid in self.seqs:
                plan.scheduled.append(worker_pb2.ScheduledSequence(seq_id=rid, num_tokens=num_tokens))
                if self.seqs[rid].view.preempted:
                    made.resuming.add(rid)
                self.seqs[rid].view.preempted = False  # scheduling resumes it on the worker
        if self._needs_resync:
            plan.list_resident = True
        self.stats.num_steps += bool(plan.scheduled)
        self.stats.num_scheduled_seqs += len(plan.scheduled)
        for new in plan.new_sequences:
            views[new.seq_id] = self.seqs[new.seq_id].view
        self._observe_plan(plan, views)
        return made

    async def _until_plan_time(self) -> None:
        """Pipelined: wait until shortly before the worker should end the step in flight,
        so the plan sees what arrived meanwhile: made at the step's start, it would leave a
        request that arrives during the step to wait a whole step more for the next one.
        The margin (PLAN_MARGIN_*) covers the queue read and planning, and steps that end
        sooner than the last one did; too little and the worker waits for the plan."""
        if not self._sent:
            return
        margin_ms = max(PLAN_MARGIN_PHASES * self._plan_phase_ms, PLAN_MARGIN_STEP * self.status.last_step_ms) + 1.0
        wait_ms = self._step_ends_ms()[-1] - margin_ms - now_ms()
        if wait_ms > 0:
            await asyncio.sleep(wait_ms / 1e3)

    def _step_ends_ms(self) -> list[float]:
        """When the worker should end each plan in flight: one after the other, from when
        it could start the first (sent, and the step before reported), each taking as
        long as the last reported step."""
        end = max(self._sent[0].sent_ms, self._last_report_ms)
        ends = []
        for _ in self._sent:
            end += self.status.last_step_ms
            ends.append(end)
        return ends

    def _ahead(self) -> tuple[float, dict[str, SeqView], int]:
        """(when this plan will start, the running sequences as it will find them, the
        blocks the plans before it take): the mirror as it is in the serial loop; with
        plans still out, as they leave it (projection.py), from when the worker should
        be done with them."""
        views = {rid: run.view for rid, run in self.seqs.items()}
        at = now_ms()
        if not self._sent:
            return at, views, 0
        num_taken = 0
        for sent, end in zip(self._sent, self._step_ends_ms()):
            views, n = project(views, [(s.seq_id, s.num_tokens) for s in sent.plan.scheduled], end,
                               self.info.block_size)
            num_taken += n - sent.num_freed_blocks
        return max(at, end), views, num_taken

    def _blocks_held(self, view: SeqView) -> int:
        """Blocks a sequence's KV fills in the pool (a paused one's may be on host already)."""
        return blocks_of(view.num_computed_tokens, self.info.block_size)

    async def _hand_back_be(self, plan: worker_pb2.StepPlan) -> None:
        """BE goes back to its queue (output so far kept, KV recomputed wherever it lands
        next) and is freed here; RT stays to finish."""
        be = sorted(rid for rid, run in self.seqs.items() if run.view.service_class == BEST_EFFORT)
        if not be:
            return
        await self._settle()   # requeue carries the output in Redis: all of it
        await self.store.requeue(self.address, be)
        for rid in be:
            del self.seqs[rid]
            plan.free.append(rid)
        log.info("worker %s draining: %d BE requests back to the queue", self.address, len(be))

    def begin_drain(self) -> None:
        self.draining = True
        if not self.status.connected:
            self.drained.set()   # nothing driven from here

    async def _new_sequence(self, rec: RequestRecord) -> worker_pb2.NewSequence:
        sampling = types_pb2.SamplingParams.FromString(rec.sampling)
        carried = []
        if rec.num_output_tokens:  # requeued after a worker loss: carry what was produced
            entries = await self.store.read_stream(rec.request_id, -1)
            carried = [e.token_id for e in entries if not e.final]
        return worker_pb2.NewSequence(seq_id=rec.request_id, service_class=rec.service_class,
                                      prompt_token_ids=rec.prompt_token_ids, sampling=sampling,
                                      output_token_ids=carried, traceparent=rec.trace_context)

    @staticmethod
    def _view(rec: RequestRecord, num_tokens: int, full: bool = False) -> SeqView:
        """full: the whole record was read (a queued one has only PLAN_FIELDS), so its
        max_tokens is known too."""
        max_tokens = types_pb2.SamplingParams.FromString(rec.sampling).max_tokens if full else 0
        return SeqView(request_id=rec.request_id, service_class=rec.service_class, arrival_ms=rec.arrival_ms,
                       num_prompt_tokens=rec.num_prompt_tokens, num_tokens=num_tokens,
                       ttft_deadline_ms=rec.arrival_ms + rec.ttft_ms, tpot_ms=rec.tpot_ms,
                       first_token_ms=rec.first_token_ms, last_token_ms=rec.last_token_ms,
                       num_output_tokens=rec.num_output_tokens, max_tokens=max_tokens)

    # ---- the report --------------------------------------------------------------------

    def _free_seats(self, leaving: frozenset[str] = frozenset()) -> int:
        """Seats not held by an unpaused resident sequence (those in `leaving` excepted)."""
        held = sum(not run.view.preempted for rid, run in self.seqs.items() if rid not in leaving)
        return max(0, self.cfg.max_num_seqs - held)

    async def _absorb(self, report: worker_pb2.StepReport, sent: _Sent) -> None:
        """The report updates the mirror at once; everything it says goes to Redis in one
        round trip, built here, started once the next plan is sent (`_start_write`) and
        awaited before the next report's (see the module doc). The finished sequences
        leave the mirror now and are freed on the worker once the write has landed."""
        await self._settle()
        self.status.occupancy = {f.name: getattr(report.occupancy, f.name)
                                 for f in report.occupancy.DESCRIPTOR.fields}
        self.status.last_step_ms = report.timings.step_ms
        self._measure_prefill(report.timings.step_ms, sent.num_prefill_tokens)
        finishing = frozenset(out.seq_id for out in report.outputs if out.finished)
        free_seats = self._free_seats(finishing)
        self.board.report(self.address, self.status.occupancy, free_seats)
        self._resync(report)
        finished: list[str] = []
        t = now_ms()
        b = Batch(self.store)
        for err in report.errors:
            self._on_error(b, err, t, sent.resuming)
        for out in report.outputs:
            run = self.seqs.get(out.seq_id)
            if run is None:
                continue
            run.view.num_computed_tokens = out.num_computed_tokens
            run.view.num_tokens += len(out.token_ids)
            if out.token_ids:
                run.view.last_token_ms = t
                if run.view.first_token_ms is None:
                    run.view.first_token_ms = t
                run.view.num_output_tokens += len(out.token_ids)
                b.append_tokens(out.seq_id, run.num_output_tokens, list(out.token_ids),
                                [out.text] + [""] * (len(out.token_ids) - 1), t)
                run.num_output_tokens += len(out.token_ids)
                self.stats.output_tokens[run.view.service_class] += len(out.token_ids)
            if out.finished:
                b.finish(out.seq_id, _FINISH_NAMES.get(out.finish_reason, "stop"), t)
                finished.append(out.seq_id)
                self.stats.finished[run.view.service_class] += 1
        b.set_worker_state(self.address, {
            "leased_by": self.replica_id, "running": len(self.seqs) - len(finished), "free_seats": free_seats,
            "last_step_ms": report.timings.step_ms, **self.stats.summary(), **self.status.occupancy})
        # Pauses and recomputes count once the worker applied them (pipelined, one may
        # name a sequence that finished in the step before).
        num_preempted = (len(sent.plan.preempt) + len(sent.plan.checkpoint) + len(sent.plan.recompute)
                         - sum(e.field in PREEMPTING_FIELDS for e in report.errors))
        self.stats.preemptions += num_preempted
        self._observe_report(report, finished, t, num_preempted)
        for rid in finished:
            self.seqs.pop(rid, None)
        self._unwritten = (b, finished)
        views = {rid: run.view for rid, run in self.seqs.items()} if self._sent else {}
        for later in self._sent:   # made before this report: what it set stands
            reapply(views, later.plan.recompute, (*later.plan.preempt, *later.plan.checkpoint),
                    (s.seq_id for s in later.plan.scheduled))

    def _start_write(self) -> None:
        if self._unwritten is not None:
            b, finished = self._unwritten
            self._unwritten = None
            self._writing = asyncio.get_running_loop().create_task(self._write(b, finished))

    async def _write(self, b: Batch, finished: list[str]) -> None:
        await b.execute()
        self._pending_free += finished   # in Redis now: the worker's copy may go

    async def _settle(self) -> None:
        """Wait for the last report's write (raising what it raised), starting it if need be."""
        self._start_write()
        task, self._writing = self._writing, None
        if task is not None:
            await task

    async def _settle_quietly(self) -> None:
        """The same on the way out of a session: a write that failed is logged, and what
        it held is still on the worker for the next session's reconciliation."""
        try:
            await self._settle()
        except RedisError as e:
            log.warning("worker %s: report not written, redis: %s", self.address, e)

    # ---- observability hooks (metrics.py, tracing.py) ------------------------------------

    def _observe_adopted(self, rec: RequestRecord) -> None:
        if self.tracing is not None:
            self.tracing.adopt(rec)

    def _observe_session(self) -> None:
        if self.metrics is not None:
            self.metrics.session_started(self)
        if self.tracing is not None:
            self.tracing.session_started()

    def _observe_plan_start(self, aborts: list[str]) -> None:
        if self.metrics is not None:
            self.metrics.plan_started(self, aborts)
        if self.tracing is not None:
            self.tracing.plan_started()

    def _observe_claimed(self, records: dict[str, RequestRecord | None], since_ms: float) -> None:
        if self.tracing is not None and records:
            self.tracing.claimed([r for r in records.values() if r is not None], since_ms)

    def _observe_plan(self, plan: worker_pb2.StepPlan, views: dict[str, SeqView]) -> None:
        """views: the running sequences as the plan finds them (projected, when pipelined)."""
        if self.metrics is not None:
            self.metrics.planned(self, plan)
        if self.tracing is not None:
            self.tracing.planned(plan, views)

    def _observe_report(self, report: worker_pb2.StepReport, finished: list[str], t: float,
                        num_preempted: int) -> None:
        """After the report is in the mirror, before the finished sequences leave self.seqs
        (its write to Redis may still be in flight)."""
        if self.metrics is not None:
            self.metrics.reported(self, report, finished, t, num_preempted)
        if self.tracing is not None:
            self.tracing.reported(finished, {e.seq_id for e in report.errors if e.field.startswith("scheduled")})

    def _measure_prefill(self, step_ms: float, num_prefill_tokens: int) -> None:
        """The whole step's time is charged to its prefill tokens: decodes riding along make
        the estimate lower than the real rate, which errs toward refusing."""
        if num_prefill_tokens < MIN_PREFILL_SAMPLE or step_ms <= 0:
            return
        rate = num_prefill_tokens / step_ms
        a = PREFILL_RATE_ALPHA
        self.prefill_tokens_per_ms = rate if self.prefill_tokens_per_ms == 0 else (1 - a) * self.prefill_tokens_per_ms + a * rate

    def _resync(self, report: worker_pb2.StepReport) -> None:
        """The recompute fallback truncated some sequences' KV; their computed counts come
        back with the resident list, asked for in the next plan."""
        for res in report.resident:
            if res.seq_id in self.seqs:
                self.seqs[res.seq_id].view.num_computed_tokens = res.num_computed_tokens
        self._needs_resync = bool(report.recompute_needed)

    def _on_error(self, b, err: worker_pb2.ItemError, t: float, resuming: set[str]) -> None:
        """A new sequence the worker refused can never run there: end it with the reason.
        A scheduled item that did not fit (pool full) is simply planned again. (Pipelined,
        a plan made before the last report may name a sequence that has finished since:
        the worker refuses that item, and nothing is left to do.)"""
        if err.field.startswith("new_sequences") and err.seq_id in self.seqs:
            del self.seqs[err.seq_id]
            b.finish(err.seq_id, "abort", t, error=f"{err.field}: {err.message}")
            self._pending_free.append(err.seq_id)
        elif err.field.startswith("scheduled") and err.seq_id in resuming and err.seq_id in self.seqs:
            self.seqs[err.seq_id].view.preempted = True  # it did not fit: the worker keeps it paused
        elif err.field == "scheduled.num_tokens" and err.seq_id in self.seqs:
            self._refused.add(err.seq_id)   # the pool had no room where the arithmetic said so
        elif err.field not in ("scheduled.num_tokens", "free") and (err.seq_id in self.seqs or not self.pipeline_depth):
            log.warning("worker %s refused %s (%s): %s", self.address, err.seq_id, err.field, err.message)


def _describe(e: BaseException) -> str:
    return e.details() if isinstance(e, grpc.aio.AioRpcError) else str(e) or type(e).__name__
