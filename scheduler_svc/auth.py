"""Bearer tokens for bros.v1.Inference: a gRPC server interceptor.

    authorization: Bearer <token>      (gRPC metadata, on every call)

- no token, or one not in the table             -> UNAUTHENTICATED
- Generate/Submit of a class the token lacks    -> PERMISSION_DENIED, naming the class
- Watch/Abort/GetLoad: any valid token; the service lets a token Watch and Abort only
  the requests it sent (`caller()` is the owner it stores and compares).
Health and reflection stay open: probes and tooling carry no token.

The caller's identity reaches the servicer through a contextvar, which gRPC runs the
interceptor and the handler in (grpc.aio.ServerInterceptor's contract). Nothing here
logs or returns a token.
"""
from __future__ import annotations

import contextlib
import contextvars
import logging

import grpc

from .keys import CLASS_NAMES
from .tokens import TokenTable, identity

log = logging.getLogger(__name__)

PROTECTED_PREFIX = "/bros.v1.Inference/"
CLASS_CHECKED = frozenset({"/bros.v1.Inference/Generate", "/bros.v1.Inference/Submit"})
_CLASS_LABELS = {1: "REALTIME (rt)", 2: "BEST_EFFORT (be)"}

_caller: contextvars.ContextVar[str | None] = contextvars.ContextVar("bros_caller", default=None)


def caller() -> str | None:
    """The identity of this call's token; None when the scheduler runs without auth."""
    return _caller.get()


def bearer_token(metadata) -> str | None:
    for key, value in metadata or ():
        if key == "authorization" and isinstance(value, str):
            scheme, _, token = value.strip().partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                return token.strip()
    return None


class BearerTokenInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, table: TokenTable):
        self.table = table

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        if handler is None or not details.method.startswith(PROTECTED_PREFIX):
            return handler
        token = bearer_token(details.invocation_metadata)
        classes = self.table.classes_of(token) if token is not None else None
        if classes is None:
            why = "missing bearer token (metadata 'authorization: Bearer <token>')" if token is None \
                else "unknown bearer token"
            log.debug("refused %s: %s", details.method, why)
            return _refuse(handler, grpc.StatusCode.UNAUTHENTICATED, why)
        _caller.set(identity(token))
        if details.method in CLASS_CHECKED:
            return _check_class(handler, classes)
        return handler


def _refuse(handler: grpc.RpcMethodHandler, code: grpc.StatusCode, message: str) -> grpc.RpcMethodHandler:
    """The same kind of handler, aborting before it reads anything. The request is left
    as bytes (no deserializer): a refused caller costs no parsing."""
    async def abort(request, context):
        await context.abort(code, message)

    kind = _kind(handler)
    return handler._replace(**{kind: abort}, request_deserializer=None)


def _check_class(handler: grpc.RpcMethodHandler, classes: frozenset[int]) -> grpc.RpcMethodHandler:
    """Generate (unary-stream) and Submit (unary-unary) with a service_class check first.
    A class outside rt/be passes through: the service answers INVALID_ARGUMENT for it."""
    async def check(request, context):
        c = request.service_class
        if c in CLASS_NAMES and c not in classes:
            allowed = ", ".join(_CLASS_LABELS[k] for k in sorted(classes))
            await context.abort(grpc.StatusCode.PERMISSION_DENIED,
                                f"service_class {_CLASS_LABELS[c]} is not allowed for this token (allowed: {allowed})")

    if handler.unary_unary is not None:
        inner_unary = handler.unary_unary

        async def unary(request, context):
            await check(request, context)
            return await inner_unary(request, context)
        return handler._replace(unary_unary=unary)

    inner_stream = handler.unary_stream

    async def stream(request, context):
        await check(request, context)
        # aclosing: when the call ends early, the inner stream is closed now, so its own
        # cleanup (Generate aborts an unfinished request) runs as it would unwrapped.
        async with contextlib.aclosing(inner_stream(request, context)) as responses:
            async for response in responses:
                yield response
    return handler._replace(unary_stream=stream)


def _kind(handler: grpc.RpcMethodHandler) -> str:
    if handler.request_streaming:
        return "stream_stream" if handler.response_streaming else "stream_unary"
    return "unary_stream" if handler.response_streaming else "unary_unary"
