"""The scheduler's spans (bros/telemetry.py has the trace's shape and the plumbing).

RpcTracing serves the Inference service: a SERVER span per call, a child of the client's
span when the call carries a traceparent, and a bros.admit span under it. The SERVER span
of the call that admits a request is the request's span: its traceparent is stored with
the request (RequestRecord.trace_context) and parents everything later work adds.

LoopTracing serves one worker loop: a request's bros.queue_wait (arrival to its first
claim, once) and a bros.step span for every iteration that schedules it (plan start to
report written). Requests whose record has no trace context (tracing off, or not sampled)
cost a dict lookup per scheduled item and nothing else.

Attributes name ids, classes, counts and sizes; never prompt or output text.
"""
from __future__ import annotations

import time
from collections import deque

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace import SpanKind, Status, StatusCode, Tracer

from bros.telemetry import context_from_metadata, context_from_traceparent, ns_from_ms, traceparent

from .keys import CLASS_NAMES

SERVICE = "bros.v1.Inference"


class RpcTracing:
    def __init__(self, tracer: Tracer):
        self.tracer = tracer

    def start_rpc(self, method: str, context) -> trace.Span:
        parent = context_from_metadata(context.invocation_metadata())
        return self.tracer.start_span(f"{SERVICE}/{method}", context=parent, kind=SpanKind.SERVER,
                                      attributes={"rpc.system": "grpc", "rpc.service": SERVICE, "rpc.method": method})

    def start_admission(self, rpc: trace.Span) -> "Admission":
        return Admission(rpc, self.tracer.start_span("bros.admit", context=trace.set_span_in_context(rpc)))

    @staticmethod
    def end(span: trace.Span, error: BaseException | None = None, **attributes) -> None:
        if attributes:
            span.set_attributes(attributes)
        if error is not None:
            span.set_status(Status(StatusCode.ERROR, f"{type(error).__name__}: {error}"))
        span.end()


class Admission:
    """The bros.admit span of one call, and the call's span it belongs to."""

    def __init__(self, rpc: trace.Span, span: trace.Span):
        self.rpc = rpc
        self.span = span

    def describe(self, rec) -> str:
        """Attributes of the request about to be admitted, on both spans; returns the trace
        context to store with it (the call's traceparent, "" when not sampled)."""
        attrs = {"bros.request_id": rec.request_id, "bros.service_class": CLASS_NAMES.get(rec.service_class, "?"),
                 "bros.num_prompt_tokens": rec.num_prompt_tokens, "bros.ttft_target_ms": rec.ttft_ms,
                 "bros.tpot_target_ms": rec.tpot_ms}
        self.span.set_attributes(attrs)
        self.rpc.set_attributes(attrs)
        return traceparent(self.rpc)

    def end(self, request_id: str, created: bool) -> None:
        self.span.set_attributes({"bros.request_id": request_id, "bros.created": created})
        self.rpc.set_attribute("bros.request_id", request_id)
        self.span.end()

    def fail(self, error: BaseException) -> None:
        """Admission refused or failed: the call ends with it."""
        RpcTracing.end(self.span, error)
        RpcTracing.end(self.rpc, error)


class LoopTracing:
    def __init__(self, tracer: Tracer, worker_id: str):
        self.tracer = tracer
        self.worker_id = worker_id
        self._contexts: dict[str, Context] = {}  # traced requests resident on this worker
        self._plan_start_ns = 0
        # The plans in flight, oldest first (one unless the loop plans ahead): when each
        # was started, the plan, and (request id, parent, num_tokens, phase) of each traced
        # scheduled item.
        self._in_flight: deque[tuple[int, object, list[tuple[str, Context, int, str]]]] = deque()

    def adopt(self, rec) -> None:
        """A request this loop now runs (claimed, or adopted after a reconnect)."""
        ctx = context_from_traceparent(rec.trace_context)
        if ctx is not None:
            self._contexts[rec.request_id] = ctx

    def claimed(self, recs: list, since_ms: float) -> None:
        """Requests claimed by this plan; those whose first claim it was (first_scheduled_ms
        set at or after since_ms) get their queue wait."""
        for rec in recs:
            self.adopt(rec)
            ctx = self._contexts.get(rec.request_id)
            if ctx is None or rec.first_scheduled_ms is None or rec.first_scheduled_ms < since_ms:
                continue
            span = self.tracer.start_span("bros.queue_wait", context=ctx, start_time=ns_from_ms(rec.arrival_ms),
                                          attributes={"bros.request_id": rec.request_id,
                                                      "bros.service_class": CLASS_NAMES.get(rec.service_class, "?"),
                                                      "bros.worker_id": self.worker_id})
            span.end(end_time=ns_from_ms(rec.first_scheduled_ms))

    def session_started(self) -> None:
        """A (re)connected loop: plans of an earlier session never get their reports."""
        self._in_flight.clear()

    def plan_started(self) -> None:
        self._plan_start_ns = time.time_ns()

    def planned(self, plan, views: dict) -> None:
        """views: request id -> SeqView as the plan finds them (the phase of each item)."""
        steps = []
        if self._contexts:
            if len(self._contexts) > len(views):  # finished, aborted or refused since: forget them
                for rid in [r for r in self._contexts if r not in views]:
                    del self._contexts[rid]
            steps = [(s.seq_id, self._contexts[s.seq_id], s.num_tokens, _phase(views[s.seq_id], s.num_tokens))
                     for s in plan.scheduled if s.seq_id in self._contexts and s.seq_id in views]
        self._in_flight.append((self._plan_start_ns, plan, steps))

    def reported(self, finished: list[str], refused: set[str]) -> None:
        """The oldest plan's report is in: its step spans end now, but for the items the
        worker refused (pipelined: a sequence that finished in the step before)."""
        for rid in finished:
            self._contexts.pop(rid, None)
        if not self._in_flight:
            return
        start_ns, plan, steps = self._in_flight.popleft()
        if not steps:
            return
        end = time.time_ns()
        common = {"bros.worker_id": self.worker_id, "bros.plan_id": plan.plan_id,  # set when it was sent
                  "bros.batch_num_seqs": len(plan.scheduled),
                  "bros.batch_num_tokens": sum(s.num_tokens for s in plan.scheduled)}
        for rid, ctx, num_tokens, phase in steps:
            if rid in refused:
                continue
            span = self.tracer.start_span("bros.step", context=ctx, start_time=start_ns,
                                          attributes={**common, "bros.request_id": rid,
                                                      "bros.num_tokens": num_tokens, "bros.phase": phase})
            span.end(end_time=end)


def _phase(view, num_tokens: int) -> str:
    """decode: the one token after all others are computed, past the prompt; anything else
    (the prompt, or tokens a recompute must redo) is a prefill chunk."""
    decoding = (num_tokens == 1 and view.num_uncomputed_tokens == 1 and view.num_output_tokens > 0
                and view.num_computed_tokens >= view.num_prompt_tokens)
    return "decode" if decoding else "prefill"
