"""One request is one trace: client -> scheduler (admission, queue wait, every planning
step) -> worker (each prefill chunk, the decode phase) -> end of the stream.

In-process: a sim worker and a scheduler on one event loop (a thread of this process),
over real gRPC and a real Redis, each with its own tracer provider writing to the SDK's
in-memory exporter. Cross-process: real worker and scheduler processes exporting OTLP
(the scheduler over gRPC, the worker over http/protobuf) to receivers in this test.
"""
from __future__ import annotations

import threading
import time
import uuid
from concurrent import futures
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import grpc
import pytest
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from bros.client import Client, Final
from bros.redis_server import EmbeddedRedis
from bros.telemetry import telemetry_checks, tracer_provider
from scheduler_svc.config import SchedulerConfig
from inprocess import InProcessStack
from stack import Scheduler, Worker
from worker_svc.config import WorkerConfig

PROMPT = list(range(100, 140))     # 40 tokens: prefill chunks of 16, 16 and 8 under a budget of 16
MAX_TOKENS = 5                     # the last chunk samples token 1, then 4 decode steps
CHUNK_BUDGET = 16


@pytest.fixture(scope="module")
def redis_server():
    with EmbeddedRedis() as r:
        yield r


def provider_to(exporter, service_name: str) -> TracerProvider:
    provider = tracer_provider(service_name)
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return provider


def generate_one(address: str, client_provider=None) -> tuple[str, Final]:
    with Client(address, timeout=30, tracer_provider=client_provider) as client:
        stream = client.generate(PROMPT, service_class="rt", max_tokens=MAX_TOKENS, temperature=0.0)
        events = list(stream)
    assert isinstance(events[-1], Final) and events[-1].num_output_tokens == MAX_TOKENS
    return stream.request_id, events[-1]


# ---- the span tree ----------------------------------------------------------------------------

def check_request_trace(spans: list[dict], request_id: str, worker_id: str) -> None:
    """The shape every request's trace must have; spans as plain dicts (see as_dict)."""
    assert len({s["trace_id"] for s in spans}) == 1, "one request, one trace"
    by_name: dict[str, list[dict]] = {}
    for s in spans:
        by_name.setdefault(s["name"], []).append(s)
    [client] = by_name["bros.v1.Inference/Generate@client"]
    [server] = by_name["bros.v1.Inference/Generate@scheduler"]
    [admit] = by_name["bros.admit"]
    [queue_wait] = by_name["bros.queue_wait"]
    steps = sorted(by_name["bros.step"], key=lambda s: s["start"])
    prefills = sorted(by_name["bros.prefill"], key=lambda s: s["start"])
    [decode] = by_name["bros.decode"]

    assert client["parent"] is None and client["kind"] == SpanKind.CLIENT
    assert server["parent"] == client["span_id"] and server["kind"] == SpanKind.SERVER
    for child in [admit, queue_wait, decode, *steps, *prefills]:
        assert child["parent"] == server["span_id"], child["name"]

    assert client["attrs"]["bros.request_id"] == request_id and client["attrs"]["bros.service_class"] == "rt"
    for s in (server, admit):
        assert s["attrs"]["bros.request_id"] == request_id
        assert s["attrs"]["bros.service_class"] == "rt"
        assert s["attrs"]["bros.num_prompt_tokens"] == len(PROMPT)
    assert admit["attrs"]["bros.created"] is True

    # Every planning step that included the request: three chunks, then one per decode.
    assert [s["attrs"]["bros.num_tokens"] for s in steps] == [16, 16, 8, 1, 1, 1, 1]
    assert [s["attrs"]["bros.phase"] for s in steps] == ["prefill"] * 3 + ["decode"] * 4
    assert all(s["attrs"]["bros.worker_id"] == worker_id and s["attrs"]["bros.request_id"] == request_id
               for s in steps)
    assert [s["attrs"]["bros.chunk_tokens"] for s in prefills] == [16, 16, 8]
    assert [s["attrs"]["bros.chunk_start"] for s in prefills] == [0, 16, 32]
    assert [s["attrs"]["bros.sampled"] for s in prefills] == [False, False, True]
    assert all(s["attrs"]["bros.worker_id"] == worker_id and s["attrs"]["bros.num_prompt_tokens"] == len(PROMPT)
               for s in prefills)
    assert decode["attrs"]["bros.num_decode_steps"] == MAX_TOKENS - 1
    assert decode["attrs"]["bros.finish_reason"] == "length"
    assert decode["attrs"]["bros.num_output_tokens"] == MAX_TOKENS

    # Time runs forward along the request: queue wait, then the steps; each worker chunk
    # inside the scheduler step that planned it; everything inside the client's call.
    assert queue_wait["end"] <= steps[0]["end"]
    for step, chunk in zip(steps, prefills):
        assert step["start"] <= chunk["start"] <= chunk["end"] <= step["end"]
    assert steps[3]["start"] <= decode["start"] and decode["end"] <= steps[-1]["end"]
    assert client["start"] <= server["start"] and server["end"] <= client["end"]
    assert steps[-1]["end"] <= server["end"]

    for s in spans:  # ids, classes, counts and sizes: never prompt or output text
        assert not any("text" in k or "prompt_token_ids" in k for k in s["attrs"]), s
        assert not any(isinstance(v, (list, tuple)) and len(v) >= 8 for v in s["attrs"].values()), s


def as_dict(span, service: str) -> dict:
    """An SDK ReadableSpan as the plain dict check_request_trace reads."""
    name = span.name + (f"@{service}" if span.name.startswith("bros.v1.") else "")
    return {"name": name, "trace_id": span.context.trace_id, "span_id": span.context.span_id,
            "parent": span.parent.span_id if span.parent is not None else None, "kind": span.kind,
            "start": span.start_time, "end": span.end_time, "attrs": dict(span.attributes or {})}


SERVICE_OF = {"test-client": "client", "bros-scheduler": "scheduler", "bros-worker": "worker"}


def test_one_request_is_one_trace_in_process(redis_server):
    exporter = InMemorySpanExporter()
    providers = [provider_to(exporter, name) for name in SERVICE_OF]
    client_p, sched_p, worker_p = providers
    with InProcessStack(redis_server.url, sched_p.get_tracer("s"), worker_p.get_tracer("w")) as stack:
        request_id, final = generate_one(stack.address, client_p)
        stored = stack.record(request_id).trace_context
    spans = [as_dict(s, SERVICE_OF[s.resource.attributes["service.name"]]) for s in exporter.get_finished_spans()]
    check_request_trace(spans, request_id, stack.worker_address)
    [server] = [s for s in spans if s["name"] == "bros.v1.Inference/Generate@scheduler"]
    # The stored context names the request's span: that is how other replicas continue it.
    version, trace_id, span_id, flags = stored.split("-")
    assert (version, int(trace_id, 16), int(span_id, 16)) == ("00", server["trace_id"], server["span_id"])
    assert int(flags, 16) & 1, "sampled"
    services = {s.resource.attributes["service.name"] for s in exporter.get_finished_spans()
                if s.name in ("bros.prefill", "bros.step")}
    assert services == {"bros-scheduler", "bros-worker"}


def test_tracing_off_stores_and_sends_no_context(redis_server):
    """Off (no tracer) on the scheduler: no spans anywhere, nothing stored with the request,
    nothing in the plan; a traced client still gets its own span."""
    exporter = InMemorySpanExporter()
    client_p, worker_p = provider_to(exporter, "test-client"), provider_to(exporter, "bros-worker")
    with InProcessStack(redis_server.url, None, worker_p.get_tracer("w")) as stack:
        assert stack.service.tracing is None and stack.worker_loop.tracing is None
        request_id, _ = generate_one(stack.address, client_p)
        assert stack.record(request_id).trace_context == ""
        raw = stack.call(stack.redis.hgetall(stack.store.keys.req(request_id)))
        assert b"trace_context" not in raw
    assert [s.name for s in exporter.get_finished_spans()] == ["bros.v1.Inference/Generate"]


def test_an_unsampled_client_call_records_nothing_downstream(redis_server):
    """The client's sampling decision (ratio 0 at the root) holds on every process."""
    exporter = InMemorySpanExporter()
    client_p = tracer_provider("test-client", sample_ratio=0.0)
    client_p.add_span_processor(SimpleSpanProcessor(exporter))
    sched_p, worker_p = provider_to(exporter, "bros-scheduler"), provider_to(exporter, "bros-worker")
    with InProcessStack(redis_server.url, sched_p.get_tracer("s"), worker_p.get_tracer("w")) as stack:
        request_id, _ = generate_one(stack.address, client_p)
        assert stack.record(request_id).trace_context == ""
    assert exporter.get_finished_spans() == ()


def test_telemetry_flags_are_checked_by_name():
    for field, value in (("otlp_protocol", "udp"), ("trace_sample_ratio", 1.5), ("metrics_port", 70000),
                         ("otlp_endpoint", "http://"), ("service_name", "")):
        for cfg_cls in (SchedulerConfig, WorkerConfig):
            with pytest.raises(ValueError, match=field):
                cfg_cls(**{field: value})
    defaults = SchedulerConfig()
    assert all(ok for ok, _, _ in telemetry_checks(defaults))
    assert (defaults.metrics_port, defaults.otlp_endpoint, defaults.service_name) == (0, "", "bros-scheduler")
    assert WorkerConfig().service_name == "bros-worker"


# ---- across processes, through OTLP -----------------------------------------------------------

class OtlpReceiver:
    """OTLP trace receivers in this process: gRPC (TraceService/Export) and http/protobuf
    (POST /v1/traces). Every span received, as the dicts check_request_trace reads."""

    def __init__(self):
        self.spans: list[dict] = []
        self.paths: list[str] = []
        self._lock = threading.Lock()
        self.grpc_server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(_GrpcTraceService(self), self.grpc_server)
        self.grpc_port = self.grpc_server.add_insecure_port("127.0.0.1:0")
        self.http_server = ThreadingHTTPServer(("127.0.0.1", 0), _http_handler(self))
        self.http_port = self.http_server.server_address[1]

    def __enter__(self) -> "OtlpReceiver":
        self.grpc_server.start()
        threading.Thread(target=self.http_server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self.grpc_server.stop(0)
        self.http_server.shutdown()
        self.http_server.server_close()

    def take(self, request: trace_service_pb2.ExportTraceServiceRequest) -> None:
        rows = []
        for rs in request.resource_spans:
            service = next(a.value.string_value for a in rs.resource.attributes if a.key == "service.name")
            for ss in rs.scope_spans:
                rows += [_otlp_span_dict(s, SERVICE_OF.get(service, service)) for s in ss.spans]
        with self._lock:
            self.spans += rows

    def wait_for(self, trace_id: int, names: set[str], timeout: float = 20.0) -> list[dict]:
        deadline = time.monotonic() + timeout
        while True:
            with self._lock:
                spans = [s for s in self.spans if s["trace_id"] == trace_id]
            if names <= {s["name"] for s in spans} or time.monotonic() > deadline:
                return spans
            time.sleep(0.1)


class _GrpcTraceService(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self, receiver: OtlpReceiver):
        self.receiver = receiver

    def Export(self, request, context):
        self.receiver.take(request)
        return trace_service_pb2.ExportTraceServiceResponse()


def _http_handler(receiver: OtlpReceiver):
    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            body = self.rfile.read(int(self.headers["Content-Length"]))
            receiver.paths.append(self.path)
            receiver.take(trace_service_pb2.ExportTraceServiceRequest.FromString(body))
            reply = trace_service_pb2.ExportTraceServiceResponse().SerializeToString()
            self.send_response(200)
            self.send_header("Content-Type", "application/x-protobuf")
            self.send_header("Content-Length", str(len(reply)))
            self.end_headers()
            self.wfile.write(reply)

        def log_message(self, *args):
            pass
    return Handler


_OTLP_KINDS = {2: SpanKind.SERVER, 3: SpanKind.CLIENT}   # opentelemetry.proto.trace.v1.Span.SpanKind


def _otlp_span_dict(span, service: str) -> dict:
    attrs = {}
    for a in span.attributes:
        kind = a.value.WhichOneof("value")
        attrs[a.key] = getattr(a.value, kind) if kind != "array_value" else [
            getattr(v, v.WhichOneof("value")) for v in a.value.array_value.values]
    name = span.name + (f"@{service}" if span.name.startswith("bros.v1.") else "")
    return {"name": name, "trace_id": int.from_bytes(span.trace_id, "big"),
            "span_id": int.from_bytes(span.span_id, "big"),
            "parent": int.from_bytes(span.parent_span_id, "big") if span.parent_span_id else None,
            "kind": _OTLP_KINDS.get(span.kind, SpanKind.INTERNAL), "start": span.start_time_unix_nano,
            "end": span.end_time_unix_nano, "attrs": attrs}


def test_one_request_is_one_trace_across_processes(redis_server, tmp_path, monkeypatch):
    """Real processes; the scheduler exports OTLP/gRPC, the worker OTLP http/protobuf."""
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "100")  # export within 0.1 s, not 5 s
    with OtlpReceiver() as receiver:
        worker = Worker(tmp_path, "--backend", "sim", "--num-blocks", "64", "--no-warmup",
                        "--otlp-endpoint", f"http://127.0.0.1:{receiver.http_port}", "--otlp-protocol", "http")
        worker.start()
        try:
            scheduler = Scheduler(tmp_path, redis_server.url, [worker.address], "--policy", "fcfs",
                                  "--max-num-batched-tokens", str(CHUNK_BUDGET),
                                  "--otlp-endpoint", f"http://127.0.0.1:{receiver.grpc_port}",
                                  prefix=f"x{uuid.uuid4().hex[:8]}").start()
            try:
                exporter = InMemorySpanExporter()
                request_id, _ = generate_one(scheduler.address, provider_to(exporter, "test-client"))
                [client_span] = exporter.get_finished_spans()
                names = {"bros.v1.Inference/Generate@scheduler", "bros.admit", "bros.queue_wait", "bros.step",
                         "bros.prefill", "bros.decode"}
                remote = receiver.wait_for(client_span.context.trace_id, names)
            finally:
                scheduler.stop()
        finally:
            worker.stop()
    check_request_trace([as_dict(client_span, "client"), *remote], request_id, worker.address)
    assert set(receiver.paths) == {"/v1/traces"}
