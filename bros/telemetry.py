"""Tracing and metrics plumbing shared by the scheduler, the worker and the client.

One request is one trace across processes. The client starts a CLIENT span and sends its
W3C `traceparent` in the gRPC metadata; the scheduler's SERVER span is its child, and the
scheduler stores that span's traceparent with the request in Redis, so whichever replica
plans the request later (and the worker, which gets it in NewSequence.traceparent) adds
its spans to the same trace:

    client  bros.v1.Inference/Generate (CLIENT)
    sched     bros.v1.Inference/Generate (SERVER)  -- ends with the stream
    sched       bros.admit, bros.queue_wait, bros.step (one per planning step with the request)
    worker      bros.prefill (one per chunk), bros.decode (first decode step to finish)

Off unless --otlp-endpoint is set, and then free of cost: a service holds `tracer: Tracer
| None` and tests it before building a span or its attributes. Spans go out through a
BatchSpanProcessor to OTLP over gRPC or HTTP (http/protobuf); a ParentBased(TraceIdRatio)
sampler decides at the root (the client, or the scheduler for a call without a parent)
and everything downstream follows the decision.

Metrics: each service keeps its own CollectorRegistry (so a test can start several in one
process) and serves it in the Prometheus text format on --metrics-port (0 = off).
"""
from __future__ import annotations

import logging
from urllib.parse import urlparse

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter
from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
from opentelemetry.trace import Span, Tracer
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

log = logging.getLogger(__name__)

OTLP_PROTOCOLS = ("grpc", "http")
OTLP_HTTP_PATH = "/v1/traces"
_PROPAGATOR = TraceContextTextMapPropagator()
_HEADERS = frozenset(_PROPAGATOR.fields)          # traceparent, tracestate


# ---- configuration ---------------------------------------------------------------------------

def telemetry_checks(cfg) -> list[tuple[bool, str, str]]:
    """The (ok, field, rule) checks of the telemetry fields both service configs carry."""
    return [
        (0 <= cfg.metrics_port < 65536, "metrics_port", "must be in [0, 65536) (0 = off)"),
        (cfg.otlp_protocol in OTLP_PROTOCOLS, "otlp_protocol", "must be 'grpc' or 'http'"),
        (0.0 <= cfg.trace_sample_ratio <= 1.0, "trace_sample_ratio", "must be in [0, 1]"),
        (not cfg.otlp_endpoint or _has_host(cfg.otlp_endpoint), "otlp_endpoint",
         "must be a URL like http://collector:4317"),
        (bool(cfg.service_name), "service_name", "must not be empty"),
    ]


def _has_host(endpoint: str) -> bool:
    return bool(urlparse(endpoint if "://" in endpoint else f"http://{endpoint}").hostname)


def otlp_exporter(endpoint: str, protocol: str) -> SpanExporter:
    """OTLP/gRPC to host:port, or OTLP http/protobuf to the URL (path /v1/traces when the
    URL has none). http:// (or no scheme) is plaintext, https:// is TLS."""
    url = endpoint if "://" in endpoint else f"http://{endpoint}"
    parsed = urlparse(url)
    if protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
        return OTLPSpanExporter(endpoint=url, insecure=parsed.scheme != "https")
    if protocol == "http":
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        if parsed.path in ("", "/"):
            url = url.rstrip("/") + OTLP_HTTP_PATH
        return OTLPSpanExporter(endpoint=url)
    raise ValueError(f"otlp_protocol must be 'grpc' or 'http', got {protocol!r}")


def tracer_provider(service_name: str, sample_ratio: float = 1.0,
                    exporter: SpanExporter | None = None) -> TracerProvider:
    """A provider whose spans carry service.name and go out in batches through exporter."""
    provider = TracerProvider(resource=Resource.create({"service.name": service_name}),
                              sampler=ParentBased(TraceIdRatioBased(sample_ratio)))
    if exporter is not None:
        provider.add_span_processor(BatchSpanProcessor(exporter))
    return provider


class Telemetry:
    """What one process runs for observability: its tracer provider (None: tracing off)
    and its /metrics endpoint (None: metrics off). close() flushes and stops both."""

    def __init__(self, provider: TracerProvider | None = None, metrics_server=None):
        self.provider = provider
        self.metrics_server = metrics_server

    @classmethod
    def start(cls, cfg, registry=None) -> "Telemetry":
        """From a service config's otlp_*, trace_sample_ratio, service_name, host and
        metrics_port fields; registry is what /metrics serves (needed when the port is set)."""
        provider = None
        if cfg.otlp_endpoint:
            exporter = otlp_exporter(cfg.otlp_endpoint, cfg.otlp_protocol)
            provider = tracer_provider(cfg.service_name, cfg.trace_sample_ratio, exporter)
            log.info("tracing to %s (%s), sample ratio %g", cfg.otlp_endpoint, cfg.otlp_protocol,
                     cfg.trace_sample_ratio)
        server = None
        if cfg.metrics_port:
            server = serve_metrics(registry, cfg.host, cfg.metrics_port)
            log.info("metrics on http://%s:%d/metrics", cfg.host, cfg.metrics_port)
        return cls(provider, server)

    def tracer(self, name: str) -> Tracer | None:
        return self.provider.get_tracer(name) if self.provider is not None else None

    def close(self) -> None:
        if self.provider is not None:
            self.provider.shutdown()  # exports what the batch processor still holds
        if self.metrics_server is not None:
            self.metrics_server.shutdown()
            self.metrics_server.server_close()


def serve_metrics(registry, host: str, port: int):
    """The Prometheus text exposition of registry at http://host:port/metrics, served from a
    daemon thread. Returns the HTTP server (shutdown() + server_close() to stop it)."""
    from prometheus_client import disable_created_metrics, start_http_server
    disable_created_metrics()  # no *_created series: Prometheus does not need them, they double the count
    server, _thread = start_http_server(port, addr=host, registry=registry)
    return server


# ---- propagation -----------------------------------------------------------------------------

def traceparent(span: Span) -> str:
    """The W3C traceparent naming span, or "" when it is not sampled: a request whose trace
    is not recorded carries nothing downstream, so nothing downstream builds spans."""
    ctx = span.get_span_context()
    if not ctx.is_valid or not ctx.trace_flags.sampled:
        return ""
    carrier: dict[str, str] = {}
    _PROPAGATOR.inject(carrier, context=trace.set_span_in_context(span))
    return carrier.get("traceparent", "")


def context_from_traceparent(value: str) -> Context | None:
    """The parent context a stored or forwarded traceparent names; None for ""."""
    if not value:
        return None
    return _PROPAGATOR.extract({"traceparent": value})


def context_from_metadata(metadata) -> Context:
    """A server's parent context from its call's invocation metadata (empty if none)."""
    carrier = {k: v for k, v in (metadata or ()) if k in _HEADERS}
    return _PROPAGATOR.extract(carrier)


def metadata_for(span: Span) -> tuple[tuple[str, str], ...]:
    """gRPC metadata carrying span as the remote parent (empty for an invalid span, the
    no-op API's, so a client without tracing sends nothing)."""
    if not span.get_span_context().is_valid:
        return ()
    carrier: dict[str, str] = {}
    _PROPAGATOR.inject(carrier, context=trace.set_span_in_context(span))
    return tuple(carrier.items())


def ns_from_ms(epoch_ms: float) -> int:
    """Epoch ms (how the store keeps times) as the epoch ns spans take."""
    return int(epoch_ms * 1_000_000)
