"""The Python client for bros.v1.Inference, blocking (`Client`) and asyncio (`AsyncClient`).

Streams are resumable: every request carries an id chosen here, so when a stream breaks
with a transient status (a scheduler replica died, a connection dropped) the client calls
again with the same id and the last token index it has seen, and the server continues
after it. The caller sees each token exactly once, in order, whichever replica serves it.

Pure helpers (request building, event conversion, resume bookkeeping) are shared by both
clients; only the call-and-retry loops differ, by `time.sleep` versus `asyncio.sleep`.
"""
from __future__ import annotations

import asyncio
import contextlib
import functools
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import grpc
from opentelemetry import trace

from bros.tls import ClientTls, aio_channel, channel_credentials
from bros.tls import channel as sync_channel
from bros.telemetry import metadata_for
from bros.v1 import inference_pb2, inference_pb2_grpc, types_pb2, worker_pb2

DEFAULT_TARGET = "127.0.0.1:50051"
DEFAULT_MAX_TOKENS = 256

SERVICE_CLASSES = {"rt": types_pb2.REALTIME, "be": types_pb2.BEST_EFFORT}
# Codes after which calling again with the same request id is safe and may succeed: the
# server never saw the call, or the replica serving it went away mid-stream.
TRANSIENT_CODES = frozenset({"UNAVAILABLE", "ABORTED"})
# gRPC waits 1 s, then longer, before reconnecting a broken channel, and calls made
# meanwhile fail at once; a restarted or replaced replica should be found within our
# retry budget instead.
CHANNEL_OPTIONS = (("grpc.initial_reconnect_backoff_ms", 100), ("grpc.max_reconnect_backoff_ms", 1000))
# The Abort sent when the caller stops reading a Generate early: best effort and short,
# as the caller is on its way out (the server's resume grace covers a failure).
ABANDON_ABORT_TIMEOUT_S = 2.0


def bearer_metadata(token: str | None) -> tuple[tuple[str, str], ...]:
    """The call metadata a scheduler with --auth-tokens-file expects; none without a token."""
    return (("authorization", f"Bearer {token}"),) if token else ()


# ---- events -------------------------------------------------------------------------------

@dataclass(frozen=True)
class Chunk:
    index: int                   # index of token_ids[0] among the request's output tokens
    token_ids: tuple[int, ...]
    text: str


@dataclass(frozen=True)
class Final:
    finish_reason: str           # "stop", "length", "abort" or "unspecified"
    num_prompt_tokens: int
    num_output_tokens: int
    queue_ms: float              # arrival to first scheduling
    ttft_ms: float
    tpot_ms: float
    ttft_met: bool               # meaningful for "rt" only
    tpot_met: bool
    error: str                   # non-empty when the request ended in an error
    ttft_flagged: bool = False   # admitted although its TTFT target looked infeasible


Event = Chunk | Final


class BrosError(Exception):
    """A failed call: `code` is the gRPC status name (e.g. "INVALID_ARGUMENT")."""

    def __init__(self, code: str, message: str, retry_after_s: float | None = None):
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.retry_after_s = retry_after_s   # the server's hint with RESOURCE_EXHAUSTED

    @property
    def transient(self) -> bool:
        return self.code in TRANSIENT_CODES


def error_from_rpc(e: grpc.RpcError) -> BrosError:
    code = e.code()
    retry_after_s = None
    try:
        hints = [v for k, v in (e.trailing_metadata() or ()) if k == "retry-after-ms"]
        retry_after_s = float(hints[0]) / 1e3 if hints else None
    except (AttributeError, TypeError, ValueError):
        pass
    return BrosError(code.name if code is not None else "UNKNOWN", e.details() or "", retry_after_s)


def event_from_pb(pb: inference_pb2.GenerateResponse) -> Event | None:
    """None for a response kind this client does not know (sent by a newer server)."""
    kind = pb.WhichOneof("kind")
    if kind == "chunk":
        return Chunk(index=pb.chunk.index, token_ids=tuple(pb.chunk.token_ids), text=pb.chunk.text)
    if kind == "final":
        f = pb.final
        return Final(finish_reason=finish_reason_name(f.finish_reason), num_prompt_tokens=f.num_prompt_tokens,
                     num_output_tokens=f.num_output_tokens, queue_ms=f.queue_ms, ttft_ms=f.ttft_ms,
                     tpot_ms=f.tpot_ms, ttft_met=f.ttft_met, tpot_met=f.tpot_met, error=f.error,
                     ttft_flagged=f.ttft_flagged)
    return None


def finish_reason_name(value: int) -> str:
    if value == types_pb2.FINISH_REASON_UNSPECIFIED:
        return "unspecified"
    return types_pb2.FinishReason.Name(value).lower()


# ---- requests ------------------------------------------------------------------------------

Prompt = str | Sequence[int] | Sequence[Mapping[str, str]]


def new_request_id() -> str:
    return uuid.uuid4().hex


def build_request(prompt: Prompt, *, service_class: str, ttft_ms: int = 0, tpot_ms: int = 0,
                  max_tokens: int = DEFAULT_MAX_TOKENS, temperature: float | None = None,
                  top_p: float | None = None, top_k: int = 0, seed: int | None = None,
                  stop: Sequence[str] = (), stop_token_ids: Sequence[int] = (), ignore_eos: bool = False,
                  request_id: str = "", resume_from_index: int | None = None,
                  chat: bool = False, timeout_ms: int = 0) -> inference_pb2.GenerateRequest:
    """A GenerateRequest; an empty request_id gets a fresh one so the call can be resumed."""
    if service_class not in SERVICE_CLASSES:
        raise ValueError(f"service_class must be 'rt' or 'be', got {service_class!r}")
    sampling = types_pb2.SamplingParams(
        max_tokens=max_tokens, top_k=top_k, stop=[stop] if isinstance(stop, str) else list(stop),
        stop_token_ids=list(stop_token_ids), ignore_eos=ignore_eos)
    # Unset optionals mean "server default", which is not the same as the zero value.
    for name, value in (("temperature", temperature), ("top_p", top_p), ("seed", seed)):
        if value is not None:
            setattr(sampling, name, value)
    req = inference_pb2.GenerateRequest(
        service_class=SERVICE_CLASSES[service_class], ttft_ms=ttft_ms, tpot_ms=tpot_ms, sampling=sampling,
        request_id=request_id or new_request_id(), timeout_ms=timeout_ms, **prompt_fields(prompt, chat))
    if resume_from_index is not None:
        req.resume_from_index = resume_from_index
    return req


def prompt_fields(prompt: Prompt, chat: bool) -> dict:
    """The GenerateRequest `prompt` oneof: text, a one-message chat, token ids or chat messages."""
    if isinstance(prompt, str):
        if chat:
            return {"chat": chat_list([{"role": "user", "content": prompt}])}
        return {"text": prompt}
    items = list(prompt)
    if not items:
        raise ValueError("prompt must not be empty")
    if all(isinstance(m, Mapping) for m in items):
        return {"chat": chat_list(items)}
    if chat:
        raise ValueError("chat=True needs a str or a list of {'role', 'content'} messages")
    # bool is an int subclass; True as a token id is a caller bug, not token 1.
    if all(isinstance(t, int) and not isinstance(t, bool) for t in items):
        return {"token_ids": inference_pb2.TokenIds(ids=items)}
    raise TypeError("prompt must be a str, a list of token ids or a list of chat message dicts")


def chat_list(messages: Sequence[Mapping[str, str]]) -> worker_pb2.ChatList:
    return worker_pb2.ChatList(messages=[worker_pb2.ChatMessage(role=m["role"], content=m["content"])
                                         for m in messages])


def message_to_dict(msg) -> dict:
    """A protobuf message as plain Python values; enums by name, service classes as rt/be."""
    out = {}
    for field in msg.DESCRIPTOR.fields:
        value = getattr(msg, field.name)
        if field.is_repeated:
            out[field.name] = [_plain(field, v) for v in value]
        else:
            out[field.name] = _plain(field, value)
    return out


def _plain(field, value):
    if field.message_type is not None:
        return message_to_dict(value)
    if field.enum_type is types_pb2.ServiceClass.DESCRIPTOR:
        return next((k for k, v in SERVICE_CLASSES.items() if v == value), "unspecified")
    if field.enum_type is not None:
        return field.enum_type.values_by_number[value].name.lower()
    return value


# ---- resume and retry ------------------------------------------------------------------------

class ResumeCursor:
    """The last output index delivered, and the request that continues after it."""

    def __init__(self, request):
        self._request = request
        self.last_index = request.resume_from_index if request.HasField("resume_from_index") else None

    def request(self):
        if self.last_index is None:
            return self._request
        req = type(self._request)()
        req.CopyFrom(self._request)
        req.resume_from_index = self.last_index
        return req

    def accept(self, event: Event | None) -> Event | None:
        """The event to hand to the caller, or None for one it already has."""
        if not isinstance(event, Chunk) or not event.token_ids:
            return event
        end = event.index + len(event.token_ids) - 1
        # A server replaying from a stale index after a reconnect must not duplicate tokens.
        if self.last_index is not None and end <= self.last_index:
            return None
        self.last_index = end
        return event


@dataclass(frozen=True)
class RetryPolicy:
    max_attempts: int = 8               # calls in a row without progress (about 7 s) before giving up
    initial_backoff_s: float = 0.1
    max_backoff_s: float = 2.0
    multiplier: float = 2.0

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError(f"max_attempts must be >= 1, got {self.max_attempts}")

    def start(self) -> "Backoff":
        return Backoff(self)


class Backoff:
    """Exponential backoff that restarts whenever a call makes progress."""

    def __init__(self, policy: RetryPolicy):
        self.policy = policy
        self.reset()

    def reset(self) -> None:
        self.failures = 0

    def next_delay(self) -> float | None:
        """Seconds to wait before the next attempt, or None when attempts are used up."""
        self.failures += 1
        if self.failures >= self.policy.max_attempts:
            return None
        delay = self.policy.initial_backoff_s * self.policy.multiplier ** (self.failures - 1)
        return min(delay, self.policy.max_backoff_s)


def _retry_delay(e: grpc.RpcError, backoff: Backoff, retry: bool) -> float:
    """The wait before calling again, or raise the call's BrosError."""
    err = error_from_rpc(e)
    delay = backoff.next_delay() if retry and err.transient else None
    if delay is None:
        raise err from None
    return delay


def resumable_events(rpc: Callable, request, *, timeout: float | None, retry: RetryPolicy,
                     resume: bool, on_abandon: Callable[[], None] | None = None) -> Iterator[Event]:
    """Events of a server stream (Generate or Watch), calling again after transient breaks.
    on_abandon runs when the caller stops reading before the final result."""
    cursor, backoff = ResumeCursor(request), retry.start()
    done = False
    try:
        while True:
            call = rpc(cursor.request(), timeout=timeout)
            try:
                for pb in call:
                    event = cursor.accept(event_from_pb(pb))
                    if event is not None:
                        backoff.reset()
                        done = isinstance(event, Final)
                        yield event
                return
            except grpc.RpcError as e:
                delay = _retry_delay(e, backoff, resume)
            finally:
                call.cancel()  # reached early when the caller stops iterating
            time.sleep(delay)
    except GeneratorExit:
        if not done and on_abandon is not None:
            on_abandon()
        raise


async def aresumable_events(rpc: Callable, request, *, timeout: float | None, retry: RetryPolicy,
                            resume: bool, on_abandon: Callable[[], Awaitable[None]] | None = None
                            ) -> AsyncIterator[Event]:
    """The asyncio twin of `resumable_events`."""
    cursor, backoff = ResumeCursor(request), retry.start()
    done = False
    try:
        while True:
            call = rpc(cursor.request(), timeout=timeout)
            try:
                async for pb in call:
                    event = cursor.accept(event_from_pb(pb))
                    if event is not None:
                        backoff.reset()
                        done = isinstance(event, Final)
                        yield event
                return
            except grpc.RpcError as e:
                delay = _retry_delay(e, backoff, resume)
            finally:
                call.cancel()
            await asyncio.sleep(delay)
    except GeneratorExit:
        if not done and on_abandon is not None:
            await on_abandon()
        raise


# ---- tracing (bros/telemetry.py) -------------------------------------------------------------

# The RPC a request type goes to, by call shape (Generate and Submit share a request type).
_STREAM_METHODS = {inference_pb2.GenerateRequest: "Generate", inference_pb2.WatchRequest: "Watch"}
_UNARY_METHODS = {inference_pb2.GenerateRequest: "Submit", inference_pb2.AbortRequest: "Abort",
                  inference_pb2.GetLoadRequest: "GetLoad"}


@contextlib.contextmanager
def call_span(tracer: trace.Tracer, method: str, request) -> Iterator[trace.Span]:
    """A CLIENT span over one logical call, retries and resumes included. Without an SDK
    tracer provider it is the API's non-recording span: no attributes, no metadata."""
    span = tracer.start_span(f"bros.v1.Inference/{method}", kind=trace.SpanKind.CLIENT)
    if span.is_recording():
        span.set_attributes({"rpc.system": "grpc", "rpc.service": "bros.v1.Inference", "rpc.method": method,
                             "bros.request_id": getattr(request, "request_id", "")})
        if isinstance(request, inference_pb2.GenerateRequest):
            span.set_attribute("bros.service_class", _class_name(request.service_class))
    try:
        yield span
    except BrosError as e:
        span.set_status(trace.Status(trace.StatusCode.ERROR, str(e)))
        raise
    finally:
        span.end()


def _class_name(value: int) -> str:
    return next((k for k, v in SERVICE_CLASSES.items() if v == value), "unspecified")


def _describe_final(span: trace.Span, final: Final) -> None:
    if span.is_recording():
        span.set_attributes({"bros.finish_reason": final.finish_reason,
                             "bros.num_output_tokens": final.num_output_tokens,
                             "bros.ttft_ms": final.ttft_ms, "bros.tpot_ms": final.tpot_ms})


def traced_events(tracer: trace.Tracer, method: str, request,
                  events_for: Callable[[tuple], Iterator[Event]]) -> Iterator[Event]:
    """events_for(trace metadata) inside a call span; closing this closes (cancels) them."""
    with call_span(tracer, method, request) as span, contextlib.closing(events_for(metadata_for(span))) as events:
        for event in events:
            if isinstance(event, Final):
                _describe_final(span, event)
            yield event


async def atraced_events(tracer: trace.Tracer, method: str, request,
                         events_for: Callable[[tuple], AsyncIterator[Event]]) -> AsyncIterator[Event]:
    """The asyncio twin of `traced_events`."""
    with call_span(tracer, method, request) as span:
        async with contextlib.aclosing(events_for(metadata_for(span))) as events:
            async for event in events:
                if isinstance(event, Final):
                    _describe_final(span, event)
                yield event


# ---- clients -------------------------------------------------------------------------------

class EventStream:
    """An iterator of Events that also knows its request id."""

    def __init__(self, request_id: str, events: Iterator[Event]):
        self.request_id = request_id
        self._events = events

    def __iter__(self) -> "EventStream":
        return self

    def __next__(self) -> Event:
        return next(self._events)

    def close(self) -> None:
        """Stop reading; an unfinished Generate is aborted."""
        self._events.close()


class AsyncEventStream:
    """An async iterator of Events that also knows its request id."""

    def __init__(self, request_id: str, events: AsyncIterator[Event]):
        self.request_id = request_id
        self._events = events

    def __aiter__(self) -> "AsyncEventStream":
        return self

    async def __anext__(self) -> Event:
        return await self._events.__anext__()

    async def aclose(self) -> None:
        # Breaking out of `async for` leaves the call open until garbage collection; this doesn't.
        await self._events.aclose()


class Client:
    """Blocking client. `timeout` bounds each call (each attempt of a stream), in seconds.
    `tls` (None: plaintext) and `token` (a bearer token, sent with every call) are for a
    scheduler that requires them (docs/reliability.md#access)."""

    def __init__(self, target: str = DEFAULT_TARGET, timeout: float | None = None,
                 retry: RetryPolicy = RetryPolicy(), *, tls: ClientTls | None = None, token: str | None = None,
                 tracer_provider: trace.TracerProvider | None = None):
        self.timeout = timeout
        self.retry = retry
        self._metadata = bearer_metadata(token)
        # The global provider unless given one; without an SDK provider spans cost nothing.
        self._tracer = trace.get_tracer("bros.client", tracer_provider=tracer_provider)
        self._channel = sync_channel(target, channel_credentials(tls), options=CHANNEL_OPTIONS)
        self._stub = inference_pb2_grpc.InferenceStub(self._channel)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def generate(self, prompt: Prompt, *, service_class: str, resume: bool = True, **options) -> EventStream:
        """Stream one request's tokens; `options` are those of `build_request`."""
        req = build_request(prompt, service_class=service_class, **options)
        return EventStream(req.request_id, self._stream(self._stub.Generate, req, resume,
                                                        functools.partial(self._abort_abandoned, req.request_id)))

    def submit(self, prompt: Prompt, *, service_class: str, **options) -> str:
        """Queue a request and return its id; it runs even if this client goes away."""
        req = build_request(prompt, service_class=service_class, **options)
        return self._unary(self._stub.Submit, req).request_id

    def watch(self, request_id: str, *, wait: bool = True, resume_from_index: int | None = None,
              resume: bool = True) -> EventStream:
        req = inference_pb2.WatchRequest(request_id=request_id, wait=wait, resume_from_index=resume_from_index)
        return EventStream(request_id, self._stream(self._stub.Watch, req, resume))

    def abort(self, request_id: str) -> bool:
        """False if the request had already finished (or, after a retried call whose reply
        was lost, because the first attempt aborted it)."""
        return self._unary(self._stub.Abort, inference_pb2.AbortRequest(request_id=request_id)).aborted

    def load(self) -> dict:
        return message_to_dict(self._unary(self._stub.GetLoad, inference_pb2.GetLoadRequest()))

    def _abort_abandoned(self, request_id: str) -> None:
        """The caller stopped reading a Generate: abort it now. The server would too, once
        its resume grace (--resume-grace-s) passed, as it cannot tell a cancel from a lost
        connection; if this call fails, that still happens."""
        try:
            self._stub.Abort(inference_pb2.AbortRequest(request_id=request_id), timeout=ABANDON_ABORT_TIMEOUT_S,
                             metadata=self._metadata)
        except grpc.RpcError:
            pass

    def _stream(self, rpc, request, resume: bool, on_abandon: Callable[[], None] | None = None) -> Iterator[Event]:
        def attempts(trace_metadata: tuple) -> Iterator[Event]:
            call = functools.partial(rpc, metadata=self._metadata + trace_metadata)
            return resumable_events(call, request, timeout=self.timeout, retry=self.retry, resume=resume,
                                    on_abandon=on_abandon)
        return traced_events(self._tracer, _STREAM_METHODS[type(request)], request, attempts)

    def _unary(self, rpc, request):
        with call_span(self._tracer, _UNARY_METHODS[type(request)], request) as span:
            metadata = self._metadata + metadata_for(span)
            backoff = self.retry.start()
            while True:
                try:
                    return rpc(request, timeout=self.timeout, metadata=metadata)
                except grpc.RpcError as e:
                    delay = _retry_delay(e, backoff, retry=True)
                time.sleep(delay)


class AsyncClient:
    """asyncio client with the same methods as `Client`; streams are async iterators."""

    def __init__(self, target: str = DEFAULT_TARGET, timeout: float | None = None,
                 retry: RetryPolicy = RetryPolicy(), *, tls: ClientTls | None = None, token: str | None = None,
                 tracer_provider: trace.TracerProvider | None = None):
        self.timeout = timeout
        self.retry = retry
        self._metadata = bearer_metadata(token)
        self._tracer = trace.get_tracer("bros.client", tracer_provider=tracer_provider)
        self._channel = aio_channel(target, channel_credentials(tls), options=CHANNEL_OPTIONS)
        self._stub = inference_pb2_grpc.InferenceStub(self._channel)

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> "AsyncClient":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    def generate(self, prompt: Prompt, *, service_class: str, resume: bool = True,
                 **options) -> AsyncEventStream:
        req = build_request(prompt, service_class=service_class, **options)
        return AsyncEventStream(req.request_id, self._stream(self._stub.Generate, req, resume,
                                                             functools.partial(self._abort_abandoned, req.request_id)))

    async def submit(self, prompt: Prompt, *, service_class: str, **options) -> str:
        req = build_request(prompt, service_class=service_class, **options)
        return (await self._unary(self._stub.Submit, req)).request_id

    def watch(self, request_id: str, *, wait: bool = True, resume_from_index: int | None = None,
              resume: bool = True) -> AsyncEventStream:
        req = inference_pb2.WatchRequest(request_id=request_id, wait=wait, resume_from_index=resume_from_index)
        return AsyncEventStream(request_id, self._stream(self._stub.Watch, req, resume))

    async def abort(self, request_id: str) -> bool:
        return (await self._unary(self._stub.Abort, inference_pb2.AbortRequest(request_id=request_id))).aborted

    async def load(self) -> dict:
        return message_to_dict(await self._unary(self._stub.GetLoad, inference_pb2.GetLoadRequest()))

    async def _abort_abandoned(self, request_id: str) -> None:
        """As `Client._abort_abandoned`."""
        try:
            await self._stub.Abort(inference_pb2.AbortRequest(request_id=request_id),
                                   timeout=ABANDON_ABORT_TIMEOUT_S, metadata=self._metadata)
        except grpc.RpcError:
            pass

    def _stream(self, rpc, request, resume: bool,
                on_abandon: Callable[[], Awaitable[None]] | None = None) -> AsyncIterator[Event]:
        def attempts(trace_metadata: tuple) -> AsyncIterator[Event]:
            call = functools.partial(rpc, metadata=self._metadata + trace_metadata)
            return aresumable_events(call, request, timeout=self.timeout, retry=self.retry, resume=resume,
                                     on_abandon=on_abandon)
        return atraced_events(self._tracer, _STREAM_METHODS[type(request)], request, attempts)

    async def _unary(self, rpc, request):
        with call_span(self._tracer, _UNARY_METHODS[type(request)], request) as span:
            metadata = self._metadata + metadata_for(span)
            backoff = self.retry.start()
            while True:
                try:
                    return await rpc(request, timeout=self.timeout, metadata=metadata)
                except grpc.RpcError as e:
                    delay = _retry_delay(e, backoff, retry=True)
                await asyncio.sleep(delay)
