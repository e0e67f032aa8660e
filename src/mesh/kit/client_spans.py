"""Client spans for outgoing gRPC calls, with the trace context in their metadata, that leave the call alone.

OpenTelemetry's aio client interceptors await each unary call's status before handing the call back, so that
cancelling the task that awaits the call cancels only that wait: the RPC runs on at the server
(open-telemetry/opentelemetry-python-contrib#3271; a call that never dispatches hangs the same way, #5046).
Their streaming ones hand back an async generator instead of the call, without ``cancel()`` or metadata (#2014).
These return the call itself at once and end the span from its done callback, so a cancelled caller cancels
the RPC (grpc.aio cancels a call whose awaiting task is cancelled) and every call keeps its whole API.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import grpc
from grpc.aio import ClientCallDetails, Metadata
from opentelemetry import propagate, trace
from opentelemetry.propagators.textmap import Setter
from opentelemetry.trace import SpanKind, Status, StatusCode

_tracer = trace.get_tracer(__name__)
# Ended spans' tasks, held until they finish (the event loop keeps only weak references to tasks).
_ending: set[asyncio.Task[None]] = set()


# The four kinds of client interceptor, as base classes. A channel files an interceptor under the first kind
# it is an instance of, so an interceptor of every call is one class per kind.
if TYPE_CHECKING:  # the stubs make these generic; at run time they are plain classes
    UnaryUnaryInterceptor = grpc.aio.UnaryUnaryClientInterceptor[Any, Any]
    UnaryStreamInterceptor = grpc.aio.UnaryStreamClientInterceptor[Any, Any]
    StreamUnaryInterceptor = grpc.aio.StreamUnaryClientInterceptor[Any, Any]
    StreamStreamInterceptor = grpc.aio.StreamStreamClientInterceptor[Any, Any]
else:
    UnaryUnaryInterceptor = grpc.aio.UnaryUnaryClientInterceptor
    UnaryStreamInterceptor = grpc.aio.UnaryStreamClientInterceptor
    StreamUnaryInterceptor = grpc.aio.StreamUnaryClientInterceptor
    StreamStreamInterceptor = grpc.aio.StreamStreamClientInterceptor


def client_spans(traced: Callable[[ClientCallDetails], bool]) -> list[Any]:
    """One interceptor per kind of call (a channel files an interceptor under the first kind it is an
    instance of, so one class for all four would trace unary calls only), each making a CLIENT span (name:
    the method path; ``rpc.*`` attributes as OpenTelemetry's instrumentation sets them) for every call that
    ``traced`` accepts."""
    return [
        _UnaryUnarySpans(traced),
        _UnaryStreamSpans(traced),
        _StreamUnarySpans(traced),
        _StreamStreamSpans(traced),
    ]


class _Spans:
    def __init__(self, traced: Callable[[ClientCallDetails], bool]) -> None:
        self._traced = traced

    async def _intercept(self, continuation: Any, details: ClientCallDetails, request: Any) -> Any:
        if not self._traced(details):
            return await continuation(details, request)
        method = details.method.decode() if isinstance(details.method, bytes) else str(details.method)
        service, _, name = method.lstrip("/").partition("/")
        span = _tracer.start_span(
            method,
            kind=SpanKind.CLIENT,
            attributes={"rpc.system": "grpc", "rpc.service": service, "rpc.method": name},
        )
        metadata = Metadata(*tuple(details.metadata or ()))
        propagate.inject(metadata, setter=_MetadataSetter(), context=trace.set_span_in_context(span))
        traced = ClientCallDetails(
            details.method, details.timeout, metadata, details.credentials, details.wait_for_ready
        )
        try:
            call = await continuation(traced, request)
        except BaseException as error:
            _end(span, grpc.StatusCode.UNKNOWN, f"{type(error).__name__}: {error}")
            raise
        call.add_done_callback(_ender(span))
        return call


class _UnaryUnarySpans(_Spans, UnaryUnaryInterceptor):
    async def intercept_unary_unary(self, continuation: Any, details: ClientCallDetails, request: Any) -> Any:
        return await self._intercept(continuation, details, request)


class _UnaryStreamSpans(_Spans, UnaryStreamInterceptor):
    async def intercept_unary_stream(
        self, continuation: Any, details: ClientCallDetails, request: Any
    ) -> Any:
        return await self._intercept(continuation, details, request)


class _StreamUnarySpans(_Spans, StreamUnaryInterceptor):
    async def intercept_stream_unary(
        self, continuation: Any, details: ClientCallDetails, requests: Any
    ) -> Any:
        return await self._intercept(continuation, details, requests)


class _StreamStreamSpans(_Spans, StreamStreamInterceptor):
    async def intercept_stream_stream(
        self, continuation: Any, details: ClientCallDetails, requests: Any
    ) -> Any:
        return await self._intercept(continuation, details, requests)


class _MetadataSetter(Setter[Metadata]):
    def set(self, carrier: Metadata, key: str, value: str) -> None:
        carrier[key] = value


def _ender(span: trace.Span) -> Callable[[Any], None]:
    def ended(call: Any) -> None:
        async def finish() -> None:
            try:
                code, details = await call.code(), await call.details()
            except BaseException:  # a call cancelled before it had a status
                code, details = grpc.StatusCode.CANCELLED, "cancelled"
            _end(span, code, details)

        task = asyncio.get_running_loop().create_task(finish())
        _ending.add(task)
        task.add_done_callback(_ending.discard)

    return ended


def _end(span: trace.Span, code: grpc.StatusCode, details: str | None) -> None:
    span.set_attribute("rpc.grpc.status_code", code.value[0])
    if code is not grpc.StatusCode.OK:
        span.set_status(Status(StatusCode.ERROR, description=f"{code.name}: {details or ''}"))
    span.end()
