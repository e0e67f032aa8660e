"""Server spans for incoming gRPC calls that say how each call ended: its status code and message, not an abort.

The kit's ServerInterceptor answers every MeshError with ``context.abort()``, which raises AbortError.
OpenTelemetry's aio server interceptor recorded that AbortError twice on the call's span (its own
``record_exception`` and ``start_as_current_span``'s), each with a stack trace that held the MeshError it
replaced, and not one word of the status: a caller's NOT_FOUND read as a crash, and a message echoing a request
made spans of megabytes. These spans carry the call's code (``rpc.grpc.status_code``) and, when it is not OK,
its code's name and message (``mesh.error.*``), with status ERROR only for the codes that mean the server
failed (:data:`SERVER_FAULTS`); an exception is recorded only when one escapes without a status (a handler
outside the kit's interceptor). The trace context is read from the call's metadata and made current for the
handler, as OpenTelemetry's interceptor does.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import contextmanager
from typing import Any
from urllib.parse import unquote

import grpc
from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.trace import SpanKind, Status, StatusCode

from mesh.kit import errors
from mesh.kit.interceptors import RESPONSE_UNARY, CallClock, rewrapped

SERVER_FAULTS = frozenset(
    {
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.DATA_LOSS,
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
    }
)
"""The codes that mean the server failed, not its caller: the ones MeshGrpcServerErrors alerts on."""

_tracer = trace.get_tracer(__name__)


def record_outcome(span: trace.Span, code: grpc.StatusCode, message: str) -> None:
    """How the work under ``span`` ended: a code other than OK is named with its message (``mesh.error.code``,
    ``mesh.error.message``), and only a server fault sets status ERROR (described ``CODE: message``, as client
    spans are)."""
    if code is grpc.StatusCode.OK:
        return
    # An error's message may echo a request of any size: cut as on the wire (the span limits do not reach a
    # status description).
    message = errors.clip(message or code.value[1], errors.WIRE_MESSAGE_BYTES)
    span.set_attributes({"mesh.error.code": code.name, "mesh.error.message": message})
    if code in SERVER_FAULTS:
        span.set_status(Status(StatusCode.ERROR, description=f"{code.name}: {message}"))


class ServerSpans(grpc.aio.ServerInterceptor):  # type: ignore[type-arg]
    """A SERVER span (name: the method path) around every call ``traced`` accepts, for every handler kind."""

    def __init__(self, traced: Callable[[grpc.HandlerCallDetails], bool]) -> None:
        self._traced = traced

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any]]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any]:
        handler = await continuation(handler_call_details)
        if handler is None or not self._traced(handler_call_details):
            return handler
        method: str = handler_call_details.method
        return rewrapped(
            handler,
            lambda behavior, kind: (_unary if kind in RESPONSE_UNARY else _stream)(behavior, method),
            handler.request_deserializer,
        )


def _unary(behavior: Any, method: str) -> Any:
    async def traced(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        clock = CallClock.start(context)
        with _server_span(method, context) as span:
            try:
                response = await behavior(request, context)
            except BaseException as error:
                _end(span, context, clock, error)
                raise
            _end(span, context, clock, None)
            return response

    return traced


def _stream(behavior: Any, method: str) -> Any:
    async def traced(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> AsyncIterator[Any]:
        clock = CallClock.start(context)
        with _server_span(method, context) as span:
            try:
                async for response in behavior(request, context):
                    yield response
            except BaseException as error:
                _end(span, context, clock, error)
                raise
            _end(span, context, clock, None)

    return traced


@contextmanager
def _server_span(method: str, context: grpc.aio.ServicerContext[Any, Any]) -> Iterator[trace.Span]:
    """The call's span, current inside, a child of the trace context (and with the baggage) its metadata
    carries."""
    carrier = {key: value for key, value in context.invocation_metadata() or () if isinstance(value, str)}
    token = otel_context.attach(propagate.extract(carrier))
    try:
        service, _, name = method.lstrip("/").partition("/")
        attributes = {"rpc.system": "grpc", "rpc.service": service, "rpc.method": name, **_peer(context)}
        with _tracer.start_as_current_span(
            method,
            kind=SpanKind.SERVER,
            attributes=attributes,
            record_exception=False,
            set_status_on_exception=False,
        ) as span:
            yield span
    finally:
        otel_context.detach(token)


def _peer(context: grpc.aio.ServicerContext[Any, Any]) -> dict[str, str]:
    """``net.peer.ip`` and ``net.peer.port`` of an ``ipv4:10.0.3.7:50051`` or ``ipv6:%5B::1%5D:57284`` peer."""
    kind, _, address = context.peer().partition(":")
    if kind not in ("ipv4", "ipv6"):
        return {}
    ip, _, port = address.split(",")[0].rpartition(":")
    return {"net.peer.ip": unquote(ip), "net.peer.port": port}


def _end(
    span: trace.Span,
    context: grpc.aio.ServicerContext[Any, Any],
    clock: CallClock,
    error: BaseException | None,
) -> None:
    """Record the status the call ends with: the one the handler (or the kit's interceptor) set or aborted
    with; else OK, UNKNOWN for an exception that escaped (gRPC answers it so) or how a cancelled call ended."""
    code = context.code()
    message = context.details() or ""
    if not isinstance(code, grpc.StatusCode):
        if error is None:
            code = grpc.StatusCode.OK
        elif isinstance(error, Exception) and not isinstance(error, grpc.aio.AbortError):
            code, message = grpc.StatusCode.UNKNOWN, f"{type(error).__name__}: {error}"
            span.record_exception(error)
        else:
            code = clock.ended_code()
    span.set_attribute("rpc.grpc.status_code", code.value[0])
    record_outcome(span, code, message)
