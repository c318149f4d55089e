"""A server interceptor that answers undecodable request bytes with INVALID_ARGUMENT.

grpcio deserializes a request before any servicer code runs; when the bytes are not a
valid message (corrupt wire format, bad UTF-8 in a string field) the DecodeError escapes
into grpcio, which ends the call with UNKNOWN. Bad input must get a precise status, so
this wraps every method's deserializer: a failure becomes an `Undecodable` value, and
the wrapped handler aborts the call with INVALID_ARGUMENT naming the message type before
the servicer sees it. For a request stream the check runs per message, so a stream ends
at its first bad message. Works for every service on the server (health, reflection too).
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass

import grpc


@dataclass(frozen=True)
class Undecodable:
    """What the guarded deserializer returns instead of raising."""
    message: str


class DecodeGuard(grpc.aio.ServerInterceptor):
    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None or handler.request_deserializer is None:
            return handler
        return _guard(handler)


def _guard(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    decode = handler.request_deserializer
    type_name = _type_name(decode)

    def safe_decode(raw: bytes):
        try:
            return decode(raw)
        except Exception as e:  # noqa: BLE001 — any decoder failure is the caller's bad bytes
            # protobuf's text repeats the type name: keep only the reason after it.
            reason = str(e).split(f"'{type_name}': ", 1)[-1]
            return Undecodable(f"request: not a valid {type_name}: {reason}")

    if handler.unary_unary:
        return handler._replace(request_deserializer=safe_decode, unary_unary=_unary(handler.unary_unary))
    if handler.unary_stream:
        return handler._replace(request_deserializer=safe_decode, unary_stream=_unary(handler.unary_stream))
    if handler.stream_unary:
        return handler._replace(request_deserializer=safe_decode, stream_unary=_streaming(handler.stream_unary))
    return handler._replace(request_deserializer=safe_decode, stream_stream=_streaming(handler.stream_stream))


def _type_name(decode) -> str:
    # Generated code passes Message.FromString; its __self__ is the message class.
    descriptor = getattr(getattr(decode, "__self__", None), "DESCRIPTOR", None)
    return getattr(descriptor, "full_name", "message")


async def _reject_if_bad(request, context) -> None:
    if isinstance(request, Undecodable):
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.message)


def _unary(behavior):
    """Wrap a behavior that takes one request (its response may be a stream)."""
    if inspect.isasyncgenfunction(behavior):
        async def stream_out(request, context):
            await _reject_if_bad(request, context)
            async for response in behavior(request, context):
                yield response
        return stream_out

    async def one_out(request, context):
        await _reject_if_bad(request, context)
        return await _maybe_await(behavior(request, context))
    return one_out


def _streaming(behavior):
    """Wrap a behavior that takes a request stream: each message is checked as it arrives."""
    async def checked(request_iterator, context):
        async for request in request_iterator:
            await _reject_if_bad(request, context)
            yield request

    if inspect.isasyncgenfunction(behavior):
        async def stream_out(request_iterator, context):
            async for response in behavior(checked(request_iterator, context), context):
                yield response
        return stream_out

    async def one_out(request_iterator, context):
        return await _maybe_await(behavior(checked(request_iterator, context), context))
    return one_out


async def _maybe_await(result):
    # aio servicers are coroutines; a plain function (a sync servicer) returns its value.
    return await result if inspect.isawaitable(result) else result
