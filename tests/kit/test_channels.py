"""The kit's channels: the default deadline every call gets, and the long-lived streams that get none."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest

from mesh.kit import errors
from mesh.kit.channels import open_channel
from mesh.kit.interceptors import ServerInterceptor
from mesh.kit.settings import CallerSettings
from mesh.queue.v1 import queue_service_pb2, queue_service_pb2_grpc

SERVICE = "mesh.queue.v1.QueueService"


class NeverAnswers:
    """GetJob and WatchJob of a queue service whose calls wait until their deadline or their client's cancel,
    noting the time each had left when it arrived (by the job id it asked for)."""

    def __init__(self) -> None:
        self.remaining: dict[str, float | None] = {}

    async def get_job(
        self, request: queue_service_pb2.GetJobRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> None:
        self.remaining[request.job_id] = context.time_remaining()
        await asyncio.sleep(3600)

    async def watch_job(
        self, request: queue_service_pb2.WatchJobRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[bytes]:
        self.remaining[request.job_id] = context.time_remaining()
        await asyncio.sleep(3600)
        yield b""

    def handler(self) -> grpc.GenericRpcHandler[Any, Any]:
        return grpc.method_handlers_generic_handler(
            SERVICE,
            {
                "GetJob": grpc.unary_unary_rpc_method_handler(
                    self.get_job, request_deserializer=queue_service_pb2.GetJobRequest.FromString
                ),
                "WatchJob": grpc.unary_stream_rpc_method_handler(
                    self.watch_job, request_deserializer=queue_service_pb2.WatchJobRequest.FromString
                ),
            },
        )


@pytest.fixture
async def server() -> AsyncIterator[tuple[str, NeverAnswers]]:
    servicer = NeverAnswers()
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((servicer.handler(),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    yield f"127.0.0.1:{port}", servicer
    await server.stop(0)


async def test_a_call_without_a_timeout_gets_the_whole_default_deadline(
    server: tuple[str, NeverAnswers],
) -> None:
    """A unary call with no ``timeout`` ends DEADLINE_EXCEEDED after the configured 2 s, not before: set through
    the service config, grpcio fired it about 1.7 s early (3 s gave 1.3 s, the default 30 s gave 28)."""
    channel = open_channel(server[0], CallerSettings(rpc_timeout_seconds=2.0), service=SERVICE)
    async with channel:
        stub = queue_service_pb2_grpc.QueueServiceStub(channel)
        started = time.monotonic()
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await stub.GetJob(queue_service_pb2.GetJobRequest(job_id="x"))
        waited = time.monotonic() - started
    assert raised.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED
    assert 1.9 <= waited < 3.0


async def test_a_callers_timeout_wins_and_long_lived_streams_get_no_deadline(
    server: tuple[str, NeverAnswers],
) -> None:
    """The default applies only to calls that name no ``timeout``: a caller's own wins, shorter or longer, and
    the streams named as long-lived (a job's watch) run without one."""
    target, servicer = server
    channel = open_channel(
        target, CallerSettings(rpc_timeout_seconds=30.0), service=SERVICE, streaming_methods=("WatchJob",)
    )
    async with channel:
        stub = queue_service_pb2_grpc.QueueServiceStub(channel)
        calls = [
            stub.GetJob(queue_service_pb2.GetJobRequest(job_id="default")),
            stub.GetJob(queue_service_pb2.GetJobRequest(job_id="shorter"), timeout=5.0),
            stub.GetJob(queue_service_pb2.GetJobRequest(job_id="longer"), timeout=100.0),
        ]
        tasks = [asyncio.ensure_future(call) for call in calls]
        watch = stub.WatchJob(queue_service_pb2.WatchJobRequest(job_id="watch"))
        watching = asyncio.ensure_future(watch.read())
        deadline = time.monotonic() + 5
        while len(servicer.remaining) < 4:
            assert time.monotonic() < deadline, f"calls not all arrived: {servicer.remaining}"
            await asyncio.sleep(0.02)
        for task in (*tasks, watching):
            task.cancel()
        await asyncio.gather(*tasks, watching, return_exceptions=True)
    remaining = servicer.remaining
    assert remaining["default"] == pytest.approx(30.0, abs=1.0)
    assert remaining["shorter"] == pytest.approx(5.0, abs=1.0)
    assert remaining["longer"] == pytest.approx(100.0, abs=1.0)
    assert remaining["watch"] is None


@pytest.mark.parametrize(("spent", "calls"), [(False, 4), (True, 1)], ids=["transient", "retries-spent"])
async def test_an_unavailable_whose_retries_the_server_spent_is_not_retried_by_the_channel(
    spent: bool, calls: int
) -> None:
    """UNAVAILABLE is retried by the channels' policy (4 attempts); but where the server already waited out its
    own retries (its database away for the whole pool wait), it says so with gRPC's pushback and the channel
    answers at once: a REST client waited four times the server's wait (20 s) for its 503."""
    received = 0

    async def get_job(request: queue_service_pb2.GetJobRequest, context: Any) -> None:
        nonlocal received
        received += 1
        raise errors.Unavailable(
            "the job database is unavailable", retry_after_seconds=1.0, retries_spent=spent
        )

    server = grpc.aio.server(interceptors=[ServerInterceptor()])
    handler = grpc.unary_unary_rpc_method_handler(
        get_job, request_deserializer=queue_service_pb2.GetJobRequest.FromString
    )
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, {"GetJob": handler}),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with open_channel(f"127.0.0.1:{port}", CallerSettings(), service=SERVICE) as channel:
            stub = queue_service_pb2_grpc.QueueServiceStub(channel)
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await stub.GetJob(queue_service_pb2.GetJobRequest(job_id="j"), timeout=10)
    finally:
        await server.stop(0)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    assert errors.from_rpc_error(info.value).retry_after_seconds == 1.0
    assert received == calls
