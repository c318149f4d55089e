"""The scheduler's Prometheus metrics (served on --metrics-port; names in docs/scheduler.md).

Two kinds, so that an iteration pays only for what it changes:
- events, counted by the worker loops as they happen (TTFT at a request's first token,
  TPOT, targets and the finish status when it finishes, the preemptions each report
  says were applied, the iteration time): plain counter and histogram updates, nothing else;
- levels, read when Prometheus scrapes (queue depth and queued tokens from Redis, and per
  worker this replica drives: KV slots per end, running sequences, the batch cap): the
  scrape thread runs one snapshot on the event loop, so it reads the loops' state between
  two of their awaits, never half-updated, and costs the loops nothing between scrapes.

Queue depth and queued tokens are global (Redis), so every replica reports the same value
(aggregate with max, not sum); the per-worker levels come only from the replica holding
the worker's lease, and the event counters only count what this replica did (sum them).
A request finished by a recovery path (a reconnecting loop adopting a finished sequence,
a requeue honouring a pending abort) is not in bros_requests_total.
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections import defaultdict, deque

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily

from bros.v1 import types_pb2

from .keys import CLASS_NAMES

log = logging.getLogger(__name__)

TTFT_BUCKETS = (0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0, 30.0, 60.0)
TPOT_BUCKETS = (0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0, 2.0)
ITERATION_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
FINISH_STATUS = {types_pb2.STOP: "stop", types_pb2.LENGTH: "length", types_pb2.ABORT: "abort"}
SCRAPE_TIMEOUT_S = 5.0


class SchedulerMetrics:
    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.requests = Counter("bros_requests", "Requests finished by this replica, by class and status "
                                "(stop, length, abort, error)", ["class", "status"], registry=r)
        self.ttft = Histogram("bros_ttft_seconds", "Arrival to first token", ["class"],
                              buckets=TTFT_BUCKETS, registry=r)
        self.tpot = Histogram("bros_tpot_seconds", "Mean time per output token of a finished request "
                              "(first to last token over tokens - 1; aborts excluded)", ["class"],
                              buckets=TPOT_BUCKETS, registry=r)
        self.attained = Counter("bros_target_attained", "Finished requests that met their target "
                                "(requests with that target only; aborts excluded)", ["class", "target"], registry=r)
        self.missed = Counter("bros_target_missed", "Finished requests that missed their target",
                              ["class", "target"], registry=r)
        self.preemptions = Counter("bros_preemptions", "Sequences paused, checkpointed or recomputed by "
                                   "this replica's plans", ["worker"], registry=r)
        self.iteration = Histogram("bros_iteration_seconds", "One scheduling iteration that ran work: plan, "
                                   "claim, worker step, report read (its Redis write overlaps the next)", ["worker"],
                                   buckets=ITERATION_BUCKETS, registry=r)
        # worker -> per plan in flight, oldest first: perf_counter at its start, and the
        # plan (the loop may plan one step ahead).
        self._in_flight: dict[str, deque[tuple[float, object]]] = defaultdict(deque)
        self._plan_started: dict[str, float] = {}          # worker -> perf_counter at the plan being made

    def watch(self, event_loop: asyncio.AbstractEventLoop, store, loops) -> None:
        """Serve the levels of store (queues) and loops (workers) at scrape time."""
        for loop in loops:
            self.preemptions.labels(loop.address)  # present at 0 before the first one
        self.registry.register(_Levels(event_loop, store, loops))

    # ---- events, from the worker loops (event-loop thread) -----------------------------------

    def session_started(self, loop) -> None:
        """A (re)connected loop: plans of an earlier session never get their reports."""
        self._in_flight.pop(loop.address, None)

    def plan_started(self, loop, aborts: list[str]) -> None:
        """Before a plan: the clock for the iteration, and the running requests aborted now."""
        self._plan_started[loop.address] = time.perf_counter()
        for rid in aborts:
            run = loop.seqs.get(rid)
            if run is not None:
                self.requests.labels(CLASS_NAMES[run.view.service_class], "abort").inc()

    def planned(self, loop, plan) -> None:
        self._in_flight[loop.address].append((self._plan_started.pop(loop.address, time.perf_counter()), plan))

    def reported(self, loop, report, finished: list[str], t_ms: float, num_preempted: int) -> None:
        """After a report is in loop.seqs (finished ones not yet removed); its Redis write may
        be in flight. num_preempted: the pauses and recomputes of its plan the worker applied."""
        if num_preempted:
            self.preemptions.labels(loop.address).inc(num_preempted)
        in_flight = self._in_flight[loop.address]
        started, plan = in_flight.popleft() if in_flight else (None, None)
        new_classes = {s.seq_id: s.service_class for s in plan.new_sequences} if plan is not None else {}
        if started is not None and report.outputs:
            self.iteration.labels(loop.address).observe(time.perf_counter() - started)
        for out in report.outputs:
            run = loop.seqs.get(out.seq_id)
            if run is None:
                continue
            view = run.view
            # The loop stamps a first token with this report's time, once per request.
            if out.token_ids and view.first_token_ms == t_ms and view.num_output_tokens == len(out.token_ids):
                self.ttft.labels(CLASS_NAMES[view.service_class]).observe((t_ms - view.arrival_ms) / 1e3)
            if out.finished:
                self._finished(view, FINISH_STATUS.get(out.finish_reason, "stop"))
        for err in report.errors:
            # A new sequence the worker refused ends with an error (the loop dropped it).
            if err.field.startswith("new_sequences") and err.seq_id in new_classes and err.seq_id not in loop.seqs:
                self.requests.labels(CLASS_NAMES.get(new_classes[err.seq_id], "unspecified"), "error").inc()

    def _finished(self, view, status: str) -> None:
        cls = CLASS_NAMES[view.service_class]
        self.requests.labels(cls, status).inc()
        if status == "abort":  # a client's abort says nothing about how well we serve
            return
        ttft_target_ms = view.ttft_deadline_ms - view.arrival_ms
        if ttft_target_ms > 0:
            met = view.first_token_ms is not None and view.first_token_ms - view.arrival_ms <= ttft_target_ms
            (self.attained if met else self.missed).labels(cls, "ttft").inc()
        n = view.num_output_tokens
        if n >= 2 and view.first_token_ms is not None and view.last_token_ms is not None:
            tpot_ms = (view.last_token_ms - view.first_token_ms) / (n - 1)
            self.tpot.labels(cls).observe(tpot_ms / 1e3)
            if view.tpot_ms > 0:
                (self.attained if tpot_ms <= view.tpot_ms else self.missed).labels(cls, "tpot").inc()

    # ---- events, from the service ----------------------------------------------------------

    def aborted_in_queue(self, service_class: int) -> None:
        """A queued request the Abort call finished at once (no loop ever saw it)."""
        self.requests.labels(CLASS_NAMES.get(service_class, "unspecified"), "abort").inc()


class _Levels:
    """Gauges read at scrape time (see the module docstring)."""

    def __init__(self, event_loop: asyncio.AbstractEventLoop, store, loops):
        self.event_loop = event_loop
        self.store = store
        self.loops = loops

    def collect(self):
        try:
            queues, workers = asyncio.run_coroutine_threadsafe(self._snapshot(), self.event_loop).result(
                SCRAPE_TIMEOUT_S)
        except Exception as e:  # noqa: BLE001 — a scrape must not fail on a busy or closed loop
            log.warning("metrics snapshot failed: %s", e)
            return
        yield from _queue_families(queues)
        yield from _worker_families(workers)

    async def _snapshot(self) -> tuple[dict | None, list[dict]]:
        workers = [_worker_levels(loop) for loop in self.loops if loop.status.connected]
        try:
            queues = (await self.store.load([]))["classes"]
        except Exception as e:  # noqa: BLE001 — Redis away: the worker levels still count
            log.warning("metrics: queue depth unavailable: %s", e)
            queues = None
        return queues, workers


def _worker_levels(loop) -> dict:
    running = {cls: 0 for cls in CLASS_NAMES}
    for run in loop.seqs.values():
        if not run.view.preempted:
            running[run.view.service_class] = running.get(run.view.service_class, 0) + 1
    occ = dict(loop.status.occupancy)
    return {"worker": loop.address, "occupancy": occ, "running": running,
            "batch_cap": getattr(loop.policy, "token_budget", None) or loop.cfg.max_num_batched_tokens}


def _queue_families(queues: dict | None):
    if queues is None:
        return
    depth = GaugeMetricFamily("bros_queue_depth", "Requests waiting to be scheduled (all replicas)", labels=["class"])
    tokens = GaugeMetricFamily("bros_queued_tokens", "Prompt tokens of the waiting requests", labels=["class"])
    for c, stats in queues.items():
        depth.add_metric([CLASS_NAMES[c]], stats.queued_requests)
        tokens.add_metric([CLASS_NAMES[c]], stats.queued_tokens)
    yield depth
    yield tokens


def _worker_families(workers: list[dict]):
    slots = GaugeMetricFamily("bros_kv_slots", "KV pool slots by end (rt, be) and free, at the last step",
                              labels=["worker", "end"])
    util = GaugeMetricFamily("bros_kv_utilization", "Fraction of the KV pool's slots holding KV (0..1)",
                             labels=["worker"])
    running = GaugeMetricFamily("bros_running_sequences", "Sequences resident and not paused on the worker",
                                labels=["worker", "class"])
    cap = GaugeMetricFamily("bros_batch_cap", "Tokens the policy lets one step run (bros: its adaptive "
                            "budget; others: max_num_batched_tokens)", labels=["worker"])
    for w in workers:
        occ, name = w["occupancy"], w["worker"]
        if occ:
            for end in ("rt", "be", "free"):
                slots.add_metric([name, end], occ.get(f"{end}_slots", 0))
            total = occ.get("num_blocks", 0) * occ.get("block_size", 0)
            util.add_metric([name], (occ.get("rt_slots", 0) + occ.get("be_slots", 0)) / total if total else 0.0)
        for c, n in w["running"].items():
            running.add_metric([name, CLASS_NAMES.get(c, "unspecified")], n)
        cap.add_metric([name], w["batch_cap"])
    yield from (slots, util, running, cap)
