"""The gRPC tracing interceptors: every RPC gets server and client spans, except gRPC health checks."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio  # type: ignore[attr-defined]
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from mesh.kit import tracing

CANCELLED_ON_SERVER: list[bytes] = []


@pytest.fixture(scope="module")
def spans() -> InMemorySpanExporter:
    """Every span this process finishes, kept in memory."""
    exporter = InMemorySpanExporter()
    tracing.configure_tracing("kit-tests").add_span_processor(SimpleSpanProcessor(exporter))
    return exporter


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
    server.add_generic_rpc_handlers(
        [
            grpc.method_handlers_generic_handler(
                "test.Echo",
                {
                    "Echo": grpc.unary_unary_rpc_method_handler(echo),
                    "Slow": grpc.unary_unary_rpc_method_handler(slow),
                    "Count": grpc.unary_stream_rpc_method_handler(count),
                },
            )
        ]
    )
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    async with grpc.aio.insecure_channel(
        f"127.0.0.1:{port}", interceptors=tracing.client_interceptors()
    ) as chan:
        yield chan
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
