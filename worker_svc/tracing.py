"""The worker's spans: one bros.prefill per prefill chunk and one bros.decode over the
decode phase (first decode step to finish or free) of each traced sequence.

A sequence is traced when its NewSequence carries a traceparent (the request's span on
the scheduler, see bros/telemetry.py); the spans are its children, so they land in the
request's trace whatever scheduler replica planned the step. Untraced sequences cost one
dict lookup per step output. Built from the plan (protobuf) and the engine's plain
Report, after the step, so the engine stays free of tracing.
"""
from __future__ import annotations

from dataclasses import dataclass

from opentelemetry.context import Context
from opentelemetry.trace import Span, Tracer

from bros.telemetry import context_from_traceparent

from .plan import Report

_CLASS_NAMES = {1: "rt", 2: "be"}


@dataclass
class _Traced:
    parent: Context
    attributes: dict               # request id, class, worker: on every span of the sequence
    num_prompt_tokens: int
    decode: Span | None = None
    num_decode_steps: int = 0


class StepTracing:
    def __init__(self, tracer: Tracer, worker_id: str):
        self.tracer = tracer
        self.worker_id = worker_id
        self._seqs: dict[str, _Traced] = {}

    def step(self, plan_pb, report: Report, start_ns: int, end_ns: int) -> None:
        for new in plan_pb.new_sequences:
            parent = context_from_traceparent(new.traceparent)
            if parent is not None:
                attrs = {"bros.request_id": new.seq_id, "bros.worker_id": self.worker_id,
                         "bros.service_class": _CLASS_NAMES.get(new.service_class, "?")}
                self._seqs[new.seq_id] = _Traced(parent, attrs, len(new.prompt_token_ids))
        if not self._seqs:
            return
        self._lifecycle(plan_pb, start_ns)
        sizes = {s.seq_id: s.num_tokens for s in plan_pb.scheduled if s.seq_id in self._seqs}
        for out in report.outputs:
            traced = self._seqs.get(out.seq_id)
            if traced is None:
                continue
            n = sizes.get(out.seq_id, 0)
            start = out.num_computed_tokens - n
            if n == 1 and start >= traced.num_prompt_tokens:  # the engine's own decode test
                self._decode_step(traced, start_ns)
            else:
                self._prefill(traced, plan_pb, n, start, bool(out.token_ids), start_ns, end_ns)
            if out.finished:
                self._end(out.seq_id, end_ns, finish_reason=out.finish_reason or "",
                          num_output_tokens=out.num_output_tokens)

    def _lifecycle(self, plan_pb, start_ns: int) -> None:
        """Pauses show as events on the decode span; a free (abort, or after a finish the
        scheduler has stored) ends it."""
        for kind in ("preempt", "checkpoint", "recompute"):
            for seq_id in getattr(plan_pb, kind):
                traced = self._seqs.get(seq_id)
                if traced is not None and traced.decode is not None:
                    traced.decode.add_event(f"bros.{kind}", timestamp=start_ns)
        for seq_id in plan_pb.free:
            if seq_id in self._seqs:
                self._end(seq_id, start_ns, freed=True)

    def _prefill(self, traced: _Traced, plan_pb, n: int, start: int, sampled: bool, start_ns: int,
                 end_ns: int) -> None:
        span = self.tracer.start_span("bros.prefill", context=traced.parent, start_time=start_ns, attributes={
            **traced.attributes, "bros.plan_id": plan_pb.plan_id, "bros.chunk_tokens": n,
            "bros.chunk_start": start, "bros.num_prompt_tokens": traced.num_prompt_tokens,
            "bros.batch_num_seqs": len(plan_pb.scheduled), "bros.sampled": sampled})
        span.end(end_time=end_ns)

    def _decode_step(self, traced: _Traced, start_ns: int) -> None:
        if traced.decode is None:
            traced.decode = self.tracer.start_span("bros.decode", context=traced.parent, start_time=start_ns,
                                                   attributes=traced.attributes)
        traced.num_decode_steps += 1

    def _end(self, seq_id: str, end_ns: int, **attributes) -> None:
        traced = self._seqs.pop(seq_id)
        if traced.decode is not None:
            traced.decode.set_attributes({"bros.num_decode_steps": traced.num_decode_steps,
                                          **{f"bros.{k}": v for k, v in attributes.items()}})
            traced.decode.end(end_time=end_ns)
