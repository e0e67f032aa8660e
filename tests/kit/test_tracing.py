"""The gRPC tracing interceptors: every RPC gets server and client spans, except gRPC health checks."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio  # type: ignore[attr-defined]
from opentelemetry import baggage, trace
from opentelemetry import context as otel_context
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode

from mesh.kit import errors, tracing
from mesh.kit.interceptors import ServerInterceptor
from mesh.kit.jobs import JobCancelled

CANCELLED_ON_SERVER: list[bytes] = []


@pytest.fixture
async def channel() -> AsyncIterator[grpc.aio.Channel]:
    """A traced server (health, and an echo method on raw bytes) and a traced channel to it."""

    async def echo(request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
        return request

    async def slow(request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            CANCELLED_ON_SERVER.append(request)
            raise
        return request

    async def count(request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> AsyncIterator[bytes]:
        for index in range(int(request)):
            yield str(index).encode()

    server = grpc.aio.server(interceptors=[tracing.server_interceptor()])
    health_pb2_grpc.add_HealthServicer_to_server(health_aio.HealthServicer(), server)
    handlers = {
        "Echo": grpc.unary_unary_rpc_method_handler(echo),
        "Slow": grpc.unary_unary_rpc_method_handler(slow),
        "Count": grpc.unary_stream_rpc_method_handler(count),
    }
    async with _traced_channel(server, "test.Echo", handlers) as chan:
        yield chan


@contextlib.asynccontextmanager
async def _traced_channel(
    server: grpc.aio.Server, service: str, handlers: dict[str, grpc.RpcMethodHandler[Any, Any]]
) -> AsyncIterator[grpc.aio.Channel]:
    """``server`` serving ``handlers`` as ``service`` on a free port, and a traced channel to it."""
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(service, handlers)])
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(
            f"127.0.0.1:{port}", interceptors=tracing.client_interceptors()
        ) as chan:
            yield chan
    finally:
        await server.stop(None)


async def test_health_checks_are_not_traced_other_calls_are(
    channel: grpc.aio.Channel, spans: InMemorySpanExporter
) -> None:
    """A health check makes no span on either side; any other call makes a client and a server span."""
    spans.clear()
    await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
    assert spans.get_finished_spans() == ()

    assert await channel.unary_unary("/test.Echo/Echo", None, None)(b"ping") == b"ping"
    kinds = sorted(s.kind.name for s in spans.get_finished_spans() if s.name == "/test.Echo/Echo")
    assert kinds == ["CLIENT", "SERVER"], spans.get_finished_spans()


def test_the_filter_reads_str_and_bytes_methods() -> None:
    """Client call details may carry the method as bytes; both spellings are recognised."""

    class Details:
        def __init__(self, method: str | bytes) -> None:
            self.method = method

    assert not tracing.not_health_check(Details("/grpc.health.v1.Health/Check"))
    assert not tracing.not_health_check(Details(b"/grpc.health.v1.Health/Watch"))
    assert tracing.not_health_check(Details("/mesh.queue.v1.QueueService/SubmitJob"))
    assert tracing.not_health_check(Details(b"/mesh.queue.v1.QueueService/SubmitJob"))


async def test_cancelling_the_caller_cancels_the_call_at_the_server(
    channel: grpc.aio.Channel, spans: InMemorySpanExporter
) -> None:
    """A traced call whose awaiting task is cancelled is cancelled at the server too, and its client span ends
    as CANCELLED. OpenTelemetry's own aio interceptor awaited the call's status inside the interceptor, so the
    cancellation stopped there and the server ran on (opentelemetry-python-contrib#3271)."""
    spans.clear()
    slow = channel.unary_unary("/test.Echo/Slow", None, None)

    async def call() -> bytes:
        reply: bytes = await slow(b"gone")
        return reply

    task = asyncio.create_task(call())
    await asyncio.sleep(0.3)
    task.cancel()
    for _ in range(100):
        if CANCELLED_ON_SERVER:
            break
        await asyncio.sleep(0.02)
    assert CANCELLED_ON_SERVER == [b"gone"]
    for _ in range(50):
        client = [s for s in spans.get_finished_spans() if s.kind.name == "CLIENT"]
        if client:
            break
        await asyncio.sleep(0.02)
    assert [(s.attributes or {}).get("rpc.grpc.status_code") for s in client] == [
        grpc.StatusCode.CANCELLED.value[0]
    ]


async def test_a_traced_stream_is_the_call_itself(
    channel: grpc.aio.Channel, spans: InMemorySpanExporter
) -> None:
    """A streaming call comes back as gRPC's call object (read(), metadata, cancel() all work), not a
    generator wrapped around it; its client span carries the service, method and final status."""
    spans.clear()
    call = channel.unary_stream("/test.Echo/Count", None, None)(b"3")
    assert await call.initial_metadata() is not None
    assert [await call.read() for _ in range(3)] == [b"0", b"1", b"2"]
    assert await call.code() == grpc.StatusCode.OK
    for _ in range(50):
        client = [s for s in spans.get_finished_spans() if s.kind.name == "CLIENT"]
        if client:
            break
        await asyncio.sleep(0.02)
    (span,) = client
    assert span.name == "/test.Echo/Count"
    assert span.attributes is not None
    assert (span.attributes["rpc.service"], span.attributes["rpc.method"]) == ("test.Echo", "Count")
    assert span.attributes["rpc.grpc.status_code"] == 0


# What the handlers of the kit's server below saw, for the propagation test.
SEEN_ON_SERVER: dict[str, Any] = {}


@pytest.fixture
async def kit_channel() -> AsyncIterator[grpc.aio.Channel]:
    """A server as every service runs it (server spans, then the kit's interceptor) with handlers that fail in
    each way, and a traced channel to it."""

    async def fail(request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
        with trace.get_tracer(__name__).start_as_current_span("inside") as inside:
            SEEN_ON_SERVER["inside"] = inside.get_span_context()
            SEEN_ON_SERVER["baggage"] = baggage.get_baggage("tenant")
        if request == b"missing":
            raise errors.NotFound("image 42 does not exist (it was never uploaded or has been deleted)")
        if request == b"down":
            raise errors.Unavailable("the file service is unavailable; retry shortly")
        if request == b"crash":
            raise RuntimeError("secret internals")
        if request == b"huge":
            raise errors.InvalidArgument(f"no parameter {'k' * 1_000_000!r}")
        return request

    async def items(request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> AsyncIterator[bytes]:
        yield b"one"
        raise errors.NotFound("no more items")

    server = grpc.aio.server(interceptors=[tracing.server_interceptor(), ServerInterceptor()])
    handlers = {
        "Fail": grpc.unary_unary_rpc_method_handler(fail),
        "Items": grpc.unary_stream_rpc_method_handler(items),
    }
    async with _traced_channel(server, "test.Kit", handlers) as chan:
        yield chan


async def _server_span(spans: InMemorySpanExporter, method: str) -> ReadableSpan:
    """The one SERVER span of ``method`` (the server ends it as it answers: wait for it a moment)."""
    for _ in range(50):
        found = [s for s in spans.get_finished_spans() if s.kind.name == "SERVER" and s.name == method]
        if found:
            break
        await asyncio.sleep(0.02)
    [span] = found
    return span


async def _fail(channel: grpc.aio.Channel, request: bytes) -> grpc.StatusCode:
    with pytest.raises(grpc.aio.AioRpcError) as failed:
        await channel.unary_unary("/test.Kit/Fail", None, None)(request)
    code: grpc.StatusCode = failed.value.code()
    return code


async def test_a_callers_error_leaves_the_server_span_unset_with_its_code_and_message(
    kit_channel: grpc.aio.Channel, spans: InMemorySpanExporter
) -> None:
    """A NOT_FOUND (the caller's error) ends the server span with status UNSET, the code and the MeshError's
    message, and no exception event: OpenTelemetry's interceptor recorded two identical 'AbortError: Locally
    aborted.' events with stack traces, and no word of the cause."""
    spans.clear()
    assert await _fail(kit_channel, b"missing") == grpc.StatusCode.NOT_FOUND
    span = await _server_span(spans, "/test.Kit/Fail")
    assert span.status.status_code is StatusCode.UNSET
    assert span.events == ()
    assert span.attributes is not None
    assert span.attributes["rpc.grpc.status_code"] == grpc.StatusCode.NOT_FOUND.value[0]
    assert span.attributes["mesh.error.code"] == "NOT_FOUND"
    assert span.attributes["mesh.error.message"] == (
        "image 42 does not exist (it was never uploaded or has been deleted)"
    )


@pytest.mark.parametrize(
    ("request_", "code", "description"),
    [
        (b"down", grpc.StatusCode.UNAVAILABLE, "UNAVAILABLE: the file service is unavailable; retry shortly"),
        (
            b"crash",
            grpc.StatusCode.INTERNAL,
            "INTERNAL: internal error in Fail; the server logged the cause under trace ",
        ),
    ],
)
async def test_a_server_fault_makes_the_server_span_an_error_without_abort_events(
    kit_channel: grpc.aio.Channel,
    spans: InMemorySpanExporter,
    request_: bytes,
    code: grpc.StatusCode,
    description: str,
) -> None:
    """UNAVAILABLE and INTERNAL (a crash, answered by the kit without its internals) are the server's failures:
    status ERROR described ``CODE: message`` as client spans are, and still no AbortError events."""
    spans.clear()
    assert await _fail(kit_channel, request_) == code
    span = await _server_span(spans, "/test.Kit/Fail")
    trace_id = f"{span.context.trace_id:032x}" if code == grpc.StatusCode.INTERNAL else ""
    assert (span.status.status_code, span.status.description) == (StatusCode.ERROR, description + trace_id)
    assert span.events == ()
    assert span.attributes is not None
    assert span.attributes["rpc.grpc.status_code"] == code.value[0]


async def test_a_stream_that_fails_after_items_ends_its_span_with_the_code(
    kit_channel: grpc.aio.Channel, spans: InMemorySpanExporter
) -> None:
    """A server stream's span ends with the status that followed its items, without exception events, and
    the stream's trailing metadata names that trace beside its status."""
    spans.clear()
    call = kit_channel.unary_stream("/test.Kit/Items", None, None)(b"")
    assert await call.read() == b"one"
    assert await call.code() == grpc.StatusCode.NOT_FOUND
    span = await _server_span(spans, "/test.Kit/Items")
    assert (
        _trailing_traceparent(await call.trailing_metadata()).split("-")[1] == f"{span.context.trace_id:032x}"
    )
    assert span.status.status_code is StatusCode.UNSET
    assert span.events == ()
    assert span.attributes is not None
    assert span.attributes["rpc.grpc.status_code"] == grpc.StatusCode.NOT_FOUND.value[0]
    assert span.attributes["mesh.error.message"] == "no more items"


async def test_the_server_span_continues_the_callers_trace_with_its_baggage(
    kit_channel: grpc.aio.Channel, spans: InMemorySpanExporter
) -> None:
    """The trace context travels as before: the server span is the client span's child, it is current in the
    handler (the handler's own spans, and its log lines, are in the trace), and the caller's baggage arrives."""
    spans.clear()
    token = otel_context.attach(baggage.set_baggage("tenant", "acme"))
    try:
        assert await kit_channel.unary_unary("/test.Kit/Fail", None, None)(b"fine") == b"fine"
    finally:
        otel_context.detach(token)
    server = await _server_span(spans, "/test.Kit/Fail")
    [client] = [s for s in spans.get_finished_spans() if s.kind.name == "CLIENT"]
    assert server.parent is not None
    assert (server.parent.trace_id, server.parent.span_id) == (
        client.context.trace_id,
        client.context.span_id,
    )
    assert SEEN_ON_SERVER["inside"].trace_id == client.context.trace_id
    [inside] = [s for s in spans.get_finished_spans() if s.name == "inside"]
    assert inside.parent is not None
    assert inside.parent.span_id == server.context.span_id
    assert SEEN_ON_SERVER["baggage"] == "acme"
    assert server.status.status_code is StatusCode.UNSET
    assert server.attributes is not None
    assert server.attributes["rpc.grpc.status_code"] == 0
    assert "mesh.error.code" not in server.attributes


def _trailing_traceparent(metadata: Any) -> str:
    [value] = [value for key, value in metadata if key == "traceparent"]
    return str(value)


@pytest.mark.parametrize("request_", [b"fine", b"missing", b"crash"])
async def test_every_answer_names_its_trace_in_the_trailing_metadata(
    kit_channel: grpc.aio.Channel, spans: InMemorySpanExporter, request_: bytes
) -> None:
    """A call's trailing metadata carries the server span's ``traceparent``, whether it succeeded or failed,
    as every REST answer carries it in a header: a caller that sent no trace context can still name the trace
    whose log lines tell what happened."""
    spans.clear()
    call = kit_channel.unary_unary("/test.Kit/Fail", None, None)(request_)
    with contextlib.suppress(grpc.aio.AioRpcError):
        await call
    server = await _server_span(spans, "/test.Kit/Fail")
    assert _trailing_traceparent(await call.trailing_metadata()) == (
        f"00-{server.context.trace_id:032x}-{server.context.span_id:016x}-{server.context.trace_flags:02x}"
    )


async def test_a_span_stays_small_whatever_a_request_holds(
    kit_channel: grpc.aio.Channel, spans: InMemorySpanExporter
) -> None:
    """The configured provider bounds attribute values (MAX_ATTRIBUTE_CHARS) and events: a span given a 1 MB
    attribute and a 1 MB exception, and the server span of a call refused with a 1 MB message, each export in
    a few kilobytes of OTLP, far under an OTel Collector's 4 MiB; such a server span was 4 MB."""
    spans.clear()
    huge = "k" * 1_000_000
    with trace.get_tracer(__name__).start_as_current_span("big") as span:
        span.set_attribute("echo", huge)
        span.record_exception(ValueError(huge))
        for index in range(200):
            span.add_event(f"event {index}", {f"a{i}": i for i in range(100)})
    assert await _fail(kit_channel, b"huge") == grpc.StatusCode.INVALID_ARGUMENT
    server = await _server_span(spans, "/test.Kit/Fail")
    [big] = [s for s in spans.get_finished_spans() if s.name == "big"]
    assert len(big.events) == tracing.MAX_SPAN_EVENTS
    assert all(len(event.attributes or {}) <= tracing.MAX_EVENT_ATTRIBUTES for event in big.events)
    assert encode_spans([big]).ByteSize() < 64 * 1024
    assert encode_spans([server]).ByteSize() < 4 * 1024


def test_the_otel_variables_override_the_span_limits(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each bound is the mesh's only where its OTEL_* variable is unset."""
    limits = tracing.span_limits()
    assert (limits.max_attribute_length, limits.max_events, limits.max_event_attributes) == (
        tracing.MAX_ATTRIBUTE_CHARS,
        tracing.MAX_SPAN_EVENTS,
        tracing.MAX_EVENT_ATTRIBUTES,
    )
    monkeypatch.setenv("OTEL_ATTRIBUTE_VALUE_LENGTH_LIMIT", "100")
    monkeypatch.setenv("OTEL_SPAN_EVENT_COUNT_LIMIT", "7")
    monkeypatch.setenv("OTEL_EVENT_ATTRIBUTE_COUNT_LIMIT", "3")
    limits = tracing.span_limits()
    assert (limits.max_attribute_length, limits.max_events, limits.max_event_attributes) == (100, 7, 3)


@pytest.mark.parametrize(
    ("error", "status", "code"),
    [
        (errors.NotFound("image 42 does not exist"), StatusCode.UNSET, "NOT_FOUND"),
        (errors.InvalidArgument("sigma is out of range"), StatusCode.UNSET, "INVALID_ARGUMENT"),
        (JobCancelled("job-1"), StatusCode.UNSET, "CANCELLED"),
        (asyncio.CancelledError(), StatusCode.UNSET, "CANCELLED"),
        (errors.Unavailable("the file service is unavailable"), StatusCode.ERROR, "UNAVAILABLE"),
        (RuntimeError("boom"), StatusCode.ERROR, "INTERNAL"),
    ],
)
def test_an_internal_span_is_an_error_only_where_the_server_failed(
    spans: InMemorySpanExporter, error: BaseException, status: StatusCode, code: str
) -> None:
    """internal_span names how the work failed (mesh.error.code) without recording the exception, and is ERROR
    only for the server's failures: start_as_current_span's defaults made a caller's NOT_FOUND an ERROR with
    its stack trace."""
    spans.clear()
    with pytest.raises(type(error)), tracing.internal_span(trace.get_tracer(__name__), "work", {"a": 1}):
        raise error
    [span] = spans.get_finished_spans()
    assert span.status.status_code is status
    assert span.events == ()
    assert span.attributes is not None
    assert (span.attributes["a"], span.attributes["mesh.error.code"]) == (1, code)
