"""The server interceptor every service uses: RED metrics per RPC and the one error-to-status mapping.

Servicers raise :class:`~mesh.kit.errors.MeshError`; here it becomes a gRPC status with rich details.
Anything else is logged with its traceback and answered INTERNAL without leaking internals.
Servicer streaming methods must be async generators (they ``yield`` responses).

A request message that cannot be parsed is answered INVALID_ARGUMENT here too. gRPC parses it in its core,
before any handler or interceptor code runs, and answers a parse error UNKNOWN with Python internals, logged
as a crash and counted nowhere; so each handler's request deserializer is wrapped to hand an
:class:`Undecodable` marker over instead, and the handler's wrapper raises it as the error it is.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf import descriptor_pool
from google.protobuf.message import DecodeError
from prometheus_client import Counter, Histogram

from mesh.kit.deadlines import deadline_in
from mesh.kit.errors import Internal, InvalidArgument, MeshError
from mesh.kit.logging import get_logger
from mesh.kit.text_fields import shown
from mesh.kit.trace_ids import TRACEPARENT, current_trace_id, current_traceparent

log = get_logger(__name__)

RPC_STARTED = Counter(
    "grpc_server_started_total", "RPCs started on the server.", ["grpc_service", "grpc_method", "grpc_type"]
)
RPC_HANDLED = Counter(
    "grpc_server_handled_total",
    "RPCs completed on the server, by status code.",
    ["grpc_service", "grpc_method", "grpc_type", "grpc_code"],
)
RPC_SECONDS = Histogram(
    "grpc_server_handling_seconds",
    "Time to complete an RPC on the server.",
    ["grpc_service", "grpc_method", "grpc_type"],
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)

_HEALTH_PREFIX = "/grpc.health.v1.Health/"

MAX_LOGGED_ERROR_CHARS = 2000
"""The most of an error's message an ``rpc failed`` line holds: a message can echo a request of any size."""

# What protobuf's parser (upb) says, in words a client can act on; anything else is passed on as it says it.
_PARSER_REASONS = {
    "String field had bad UTF-8": "a string field holds bytes that are not UTF-8",
    "Wire format was corrupt": "the bytes are not a protobuf message",
}


def _kind(client_streaming: bool, server_streaming: bool) -> str:
    if client_streaming:
        return "bidi_stream" if server_streaming else "client_stream"
    return "server_stream" if server_streaming else "unary"


def preinitialise_metrics(service_names: Sequence[str]) -> None:
    """Export every method's series at 0 (every status code), as go-grpc-prometheus does.

    A series that first appears at 1 has no earlier sample, so ``rate()`` and ``increase()`` miss that first
    call: the first INTERNAL after a restart would never count towards an error-rate alert.
    """
    pool = descriptor_pool.Default()
    for service_name in service_names:
        try:
            service = pool.FindServiceByName(service_name)
        except KeyError:  # served by generic handlers without descriptors: its series appear with its calls
            continue
        for method in service.methods:
            kind = _kind(method.client_streaming, method.server_streaming)
            RPC_STARTED.labels(service_name, method.name, kind)
            RPC_SECONDS.labels(service_name, method.name, kind)
            for code in grpc.StatusCode:
                RPC_HANDLED.labels(service_name, method.name, kind, code.name)


@dataclass(frozen=True, slots=True)
class Undecodable:
    """What a handler receives in place of a request message that could not be parsed."""

    type_name: str
    """The message type the bytes should have been (``mesh.file.v1.GetImageRequest``)."""
    reason: str
    """What is wrong with them."""

    def error(self) -> InvalidArgument:
        return InvalidArgument(f"the request is not a valid {self.type_name}: {self.reason}")


def _request_type(method: str) -> str:
    """The request message type of ``/package.Service/Method``, from its descriptor where one is known."""
    service, _, name = method.lstrip("/").rpartition("/")
    try:
        return str(descriptor_pool.Default().FindMethodByName(f"{service}.{name}").input_type.full_name)
    except KeyError:  # served by generic handlers without descriptors
        return f"request message of {service}/{name}"


def _tolerant(deserializer: Callable[[bytes], Any] | None, method: str) -> Callable[[bytes], Any] | None:
    """``deserializer``, answering :class:`Undecodable` where it raises DecodeError (None: raw bytes)."""
    if deserializer is None:
        return None

    def deserialize(data: bytes) -> Any:
        try:
            return deserializer(data)
        except DecodeError as error:
            said = str(error).rpartition("': ")[2]
            return Undecodable(_request_type(method), _PARSER_REASONS.get(said, said))

    return deserialize


class ServerInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[type-arg]
    """RED metrics, MeshError -> status and undecodable requests -> INVALID_ARGUMENT for every handler kind."""

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any]]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any]:
        handler = await continuation(handler_call_details)
        method: str = handler_call_details.method
        if handler is None or method.startswith(_HEALTH_PREFIX):
            return handler
        service, _, name = method.lstrip("/").rpartition("/")

        def wrap(behavior: Any, kind: str) -> Any:
            wrapper = _wrap_unary if kind in RESPONSE_UNARY else _wrap_stream
            return wrapper(behavior, service, name, kind)

        return rewrapped(handler, wrap, _tolerant(handler.request_deserializer, method))


RESPONSE_UNARY = frozenset({"unary", "client_stream"})
"""The handler kinds that answer one message (the others yield a stream)."""


def rewrapped(
    handler: grpc.RpcMethodHandler[Any, Any],
    wrap: Callable[[Any, str], Any],
    request_deserializer: Callable[[bytes], Any] | None,
) -> grpc.RpcMethodHandler[Any, Any]:
    """``handler`` with its behaviour replaced by ``wrap(behavior, kind)`` (kind: ``unary``, ``client_stream``,
    ``server_stream`` or ``bidi_stream``) and its request deserializer by ``request_deserializer``, its response
    serializer kept: the one way the kit's server interceptors rebuild a handler."""
    options: dict[str, Any] = {
        "request_deserializer": request_deserializer,
        "response_serializer": handler.response_serializer,
    }
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(wrap(handler.unary_unary, "unary"), **options)
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(wrap(handler.stream_unary, "client_stream"), **options)
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(wrap(handler.unary_stream, "server_stream"), **options)
    return grpc.stream_stream_rpc_method_handler(wrap(handler.stream_stream, "bidi_stream"), **options)


def _checker(kind: str) -> Callable[[Any], Any]:
    """What hands a handler of ``kind`` its request: where the request is :class:`Undecodable`, or a client
    stream meets such a message (the ones before it are the handler's to answer), its error is raised."""
    return _checked_stream if kind in ("client_stream", "bidi_stream") else _checked_message


def _checked_message(request: Any) -> Any:
    if isinstance(request, Undecodable):
        raise request.error()
    return request


async def _checked_stream(requests: AsyncIterator[Any]) -> AsyncIterator[Any]:
    async for request in requests:
        if isinstance(request, Undecodable):
            raise request.error()
        yield request


def _wrap_unary(behavior: Any, service: str, method: str, kind: str) -> Any:
    check = _checker(kind)

    async def wrapper(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        started, clock = _start(service, method, kind, context), CallClock.start(context)
        try:
            response = await behavior(check(request), context)
        except BaseException as exc:
            await _fail(exc, context, service, method, kind, started, clock)
            raise
        _finish(context, service, method, kind, started)
        return response

    return wrapper


def _wrap_stream(behavior: Any, service: str, method: str, kind: str) -> Any:
    check = _checker(kind)

    async def wrapper(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> AsyncIterator[Any]:
        started, clock = _start(service, method, kind, context), CallClock.start(context)
        try:
            async for response in behavior(check(request), context):
                yield response
        except BaseException as exc:
            await _fail(exc, context, service, method, kind, started, clock)
            raise
        _finish(context, service, method, kind, started)

    return wrapper


def _start(service: str, method: str, kind: str, context: grpc.aio.ServicerContext[Any, Any]) -> float:
    RPC_STARTED.labels(service, method, kind).inc()
    context.set_trailing_metadata(_trace_metadata())
    return time.perf_counter()


def _trace_metadata() -> tuple[tuple[str, str], ...]:
    """The call's ``traceparent`` for its trailing metadata, as REST answers carry it in a header: a caller
    that sent none can still name the trace whose log lines hold what went wrong."""
    current = current_traceparent()
    return () if current is None else ((TRACEPARENT, current),)


def _finish(
    context: grpc.aio.ServicerContext[Any, Any],
    service: str,
    method: str,
    kind: str,
    started: float,
    default: grpc.StatusCode = grpc.StatusCode.OK,
) -> None:
    code = context.code() or default
    name = code.name if isinstance(code, grpc.StatusCode) else str(code)
    elapsed = time.perf_counter() - started
    RPC_HANDLED.labels(service, method, kind, name).inc()
    RPC_SECONDS.labels(service, method, kind).observe(elapsed)
    # One access line per RPC, inside its span, so every hop's logs carry the trace id.
    log.info("rpc", rpc=f"{service}/{method}", code=name, duration_ms=round(elapsed * 1000, 3))


def _logged(message: str) -> str:
    """``message`` for a log line: whole, or cut to ``MAX_LOGGED_ERROR_CHARS`` with a word of its length."""
    if len(message) <= MAX_LOGGED_ERROR_CHARS:
        return message
    return f"{shown(message, MAX_LOGGED_ERROR_CHARS)} (cut from {len(message)} characters)"


DEADLINE_SLACK_SECONDS = 0.1
"""The least time before its deadline in which a cancelled call counts as past it: the server's deadline starts
when the call arrives, after the client's, so the cancel that the client's own expiry sends comes while the
server still sees a little time left (tens of milliseconds on a loaded machine)."""

DEADLINE_SLACK_FRACTION = 0.1
"""The share of a call's time, at its end, in which a cancellation counts as its deadline (at least
``DEADLINE_SLACK_SECONDS``). The cancel that the client's expiry sends lands while the server still sees time
left, the more so the busier it is (headers wait behind other calls' frames and the loop); and a client rarely
gives up by hand in the last tenth of the time it gave itself: there, its deadline is by far the likelier cause.
Under load a handler starts with less time than the client gave (64 calls of 0.3 s at once, 1080p JPEGs,
2 cores: 0 to 0.22 s left at the start), which the floor covers."""


def cancelled_code(deadline: float | None, arrived: float, now: float) -> grpc.StatusCode:
    """The one rule for how a call (or the work done for it) cancelled at ``now`` ended, when it arrived at
    ``arrived`` with ``deadline`` (``time.monotonic()`` instants): DEADLINE_EXCEEDED when it had no more than
    its slack left (the larger of ``DEADLINE_SLACK_SECONDS`` and ``DEADLINE_SLACK_FRACTION`` of its time),
    CANCELLED otherwise or without a deadline. The call's status, its span and the statistics of the work
    done for it all use it, so that one cancel is never counted under two codes."""
    if deadline is None:
        return grpc.StatusCode.CANCELLED
    slack = max(DEADLINE_SLACK_SECONDS, DEADLINE_SLACK_FRACTION * (deadline - arrived))
    return grpc.StatusCode.DEADLINE_EXCEEDED if deadline - now <= slack else grpc.StatusCode.CANCELLED


@dataclass(frozen=True, slots=True)
class CallClock:
    """When a server call arrived and its deadline (``time.monotonic()`` instants; None: no deadline), read
    when its handler starts: what :func:`cancelled_code` needs to say how a cancelled call ended."""

    arrived: float
    deadline: float | None

    @classmethod
    def start(cls, context: grpc.aio.ServicerContext[Any, Any]) -> CallClock:
        return cls(time.monotonic(), deadline_in(context.time_remaining()))

    def ended_code(self) -> grpc.StatusCode:
        """The code of the call, cancelled now without a status of its own (gRPC cancels the handler when its
        deadline passes, as when the client leaves)."""
        return cancelled_code(self.deadline, self.arrived, time.monotonic())


async def _fail(
    exc: BaseException,
    context: grpc.aio.ServicerContext[Any, Any],
    service: str,
    method: str,
    kind: str,
    started: float,
    clock: CallClock,
) -> None:
    """Record the failure and abort with the mapped status (abort raises; the caller re-raises otherwise)."""
    if isinstance(exc, MeshError):
        error = exc
        log.info(
            "rpc failed",
            rpc=f"{service}/{method}",
            code=error.code.name,
            reason=error.reason,
            error=_logged(str(error)),
        )
    elif isinstance(exc, grpc.aio.AbortError | GeneratorExit) or not isinstance(exc, Exception):
        # Already aborted by the servicer, or cancelled: record what the context says, with the access line
        # every other call gets.
        _finish(context, service, method, kind, started, default=clock.ended_code())
        return
    else:
        log.exception("rpc crashed", rpc=f"{service}/{method}")
        error = Internal(f"internal error in {method}; the server logged the cause{_under_trace()}")
    RPC_HANDLED.labels(service, method, kind, error.code.name).inc()
    RPC_SECONDS.labels(service, method, kind).observe(time.perf_counter() - started)
    status = error.grpc_status()
    await context.abort(
        status.code, status.details, trailing_metadata=(*status.trailing_metadata, *_trace_metadata())
    )


def _under_trace() -> str:
    """Where an operator finds a crash's log lines: `` under trace <id>``, or nothing outside a span."""
    trace_id = current_trace_id()
    return "" if trace_id is None else f" under trace {trace_id}"
