"""The server interceptor over a real server: requests that cannot be parsed, and calls that end unanswered."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from google.protobuf import descriptor_pb2, descriptor_pool, wrappers_pb2
from prometheus_client import REGISTRY

from mesh.kit import errors
from mesh.kit.runtime import ServiceRuntime
from mesh.kit.settings import ServerSettings

SERVICE = "test.v1.UndecodableEchoService"
"""Declared in the descriptor pool (as generated code declares the mesh's services), every kind of method."""
UNDECLARED = "test.v1.UndeclaredEchoService"
"""Served by generic handlers only: no descriptor names its request type."""
KINDS = {"Echo": "unary", "Repeat": "server_stream", "Join": "client_stream", "Chat": "bidi_stream"}

BAD_UTF8 = b"\x0a\x02\xc3\x28"
"""A StringValue whose value is not UTF-8."""
NOT_PROTOBUF = b"\xff\xff\xff"
GOOD = wrappers_pb2.StringValue(value="good").SerializeToString()


def _declare_service() -> None:
    pool = descriptor_pool.Default()
    try:
        pool.FindServiceByName(SERVICE)
        return
    except KeyError:
        pass
    file = descriptor_pb2.FileDescriptorProto(
        name="tests/kit/undecodable_echo.proto",
        package="test.v1",
        syntax="proto3",
        dependency=["google/protobuf/wrappers.proto"],
    )
    service = file.service.add(name=SERVICE.rpartition(".")[2])
    for name, kind in KINDS.items():
        service.method.add(
            name=name,
            input_type=".google.protobuf.StringValue",
            output_type=".google.protobuf.StringValue",
            client_streaming=kind in ("client_stream", "bidi_stream"),
            server_streaming=kind in ("server_stream", "bidi_stream"),
        )
    pool.Add(file)


async def _echo(request: wrappers_pb2.StringValue, context: Any) -> wrappers_pb2.StringValue:
    return request


async def _repeat(request: wrappers_pb2.StringValue, context: Any) -> AsyncIterator[wrappers_pb2.StringValue]:
    for _ in range(2):
        yield request


async def _join(requests: AsyncIterator[wrappers_pb2.StringValue], context: Any) -> wrappers_pb2.StringValue:
    return wrappers_pb2.StringValue(value=",".join([r.value async for r in requests]))


async def _chat(
    requests: AsyncIterator[wrappers_pb2.StringValue], context: Any
) -> AsyncIterator[wrappers_pb2.StringValue]:
    async for request in requests:
        yield request


async def _hold(request: wrappers_pb2.StringValue, context: Any) -> wrappers_pb2.StringValue:
    await asyncio.sleep(30)
    return request


def _handlers() -> dict[str, grpc.RpcMethodHandler[Any, Any]]:
    parse, write = wrappers_pb2.StringValue.FromString, wrappers_pb2.StringValue.SerializeToString
    return {
        "Echo": grpc.unary_unary_rpc_method_handler(_echo, parse, write),
        "Repeat": grpc.unary_stream_rpc_method_handler(_repeat, parse, write),
        "Join": grpc.stream_unary_rpc_method_handler(_join, parse, write),
        "Chat": grpc.stream_stream_rpc_method_handler(_chat, parse, write),
        "Hold": grpc.unary_unary_rpc_method_handler(_hold, parse, write),
    }


@pytest.fixture
async def server() -> AsyncIterator[grpc.aio.Channel]:
    """Both echo services on port 0, and a channel to them that sends bytes as they are."""
    _declare_service()
    settings = ServerSettings(grpc_port=0, http_port=0, grace_seconds=1, health_interval_seconds=0.05)
    runtime = ServiceRuntime("undecodable", settings, service_names=[SERVICE, UNDECLARED])
    runtime.server.add_generic_rpc_handlers(
        [grpc.method_handlers_generic_handler(name, _handlers()) for name in (SERVICE, UNDECLARED)]
    )
    task = asyncio.create_task(runtime.run())
    await asyncio.wait_for(runtime.started.wait(), 10)
    async with grpc.aio.insecure_channel(f"localhost:{runtime.grpc_port}") as channel:
        yield channel
    runtime.stopping.set()
    await asyncio.wait_for(task, 10)


def _handled(method: str, code: str, service: str = SERVICE) -> float:
    kind = KINDS.get(method, "unary")
    labels = {"grpc_service": service, "grpc_method": method, "grpc_type": kind, "grpc_code": code}
    return REGISTRY.get_sample_value("grpc_server_handled_total", labels) or 0.0


async def _call(channel: grpc.aio.Channel, method: str, messages: list[bytes]) -> list[bytes]:
    """The raw replies to ``messages`` (one for a unary request), sent to ``SERVICE``'s ``method``."""
    path, kind = f"/{SERVICE}/{method}", KINDS[method]

    async def stream() -> AsyncIterator[bytes]:
        for message in messages:
            yield message

    replies: list[bytes] = []
    if kind == "unary":
        replies.append(await channel.unary_unary(path, None, None)(messages[0]))
    elif kind == "client_stream":
        replies.append(await channel.stream_unary(path, None, None)(stream()))
    elif kind == "server_stream":
        replies.extend([reply async for reply in channel.unary_stream(path, None, None)(messages[0])])
    else:
        async for reply in channel.stream_stream(path, None, None)(stream()):
            replies.append(reply)
    return replies


def _problems(caplog: pytest.LogCaptureFixture) -> list[str]:
    """Errors and tracebacks the kit and gRPC logged (not asyncio's: the garbage collector may finish an earlier
    test's leftovers during this one)."""
    return [
        record.getMessage()
        for record in caplog.records
        if (record.levelno >= logging.ERROR or record.exc_info) and record.name.startswith(("mesh", "grpc"))
    ]


@pytest.mark.parametrize("method", list(KINDS))
@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (BAD_UTF8, "a string field holds bytes that are not UTF-8"),
        (NOT_PROTOBUF, "the bytes are not a protobuf message"),
    ],
    ids=["bad-utf8", "not-protobuf"],
)
async def test_an_undecodable_request_is_invalid_argument_naming_its_type_counted_once_and_not_a_crash(
    server: grpc.aio.Channel, caplog: pytest.LogCaptureFixture, method: str, payload: bytes, reason: str
) -> None:
    """Every kind of method answers a request it cannot parse INVALID_ARGUMENT naming the message type and
    what is wrong, counts it once as INVALID_ARGUMENT, and logs no error: it was UNKNOWN with protobuf's
    internals (INTERNAL on a client stream), logged as a crash with its traceback, and counted nowhere."""
    before = _handled(method, "INVALID_ARGUMENT")
    with caplog.at_level(logging.INFO), pytest.raises(grpc.aio.AioRpcError) as info:
        await _call(server, method, [payload])
    await asyncio.sleep(0.05)  # the server's side of the call ends after the client's
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.details() == f"the request is not a valid google.protobuf.StringValue: {reason}"
    assert isinstance(errors.from_rpc_error(info.value), errors.InvalidArgument)
    assert _handled(method, "INVALID_ARGUMENT") - before == 1
    assert _problems(caplog) == []


@pytest.mark.parametrize("method", ["Join", "Chat"])
async def test_a_client_stream_answers_the_messages_before_an_undecodable_one(
    server: grpc.aio.Channel, caplog: pytest.LogCaptureFixture, method: str
) -> None:
    """The handler reads a stream's good messages as usual and meets the undecodable one as INVALID_ARGUMENT:
    a bidi stream has answered those before it; nothing after it is read."""
    replies: list[bytes] = []
    path = f"/{SERVICE}/{method}"

    async def stream() -> AsyncIterator[bytes]:
        for message in (GOOD, GOOD, BAD_UTF8, GOOD):
            yield message

    with caplog.at_level(logging.INFO), pytest.raises(grpc.aio.AioRpcError) as info:
        if method == "Chat":
            async for reply in server.stream_stream(path, None, None)(stream()):
                replies.append(reply)
        else:
            replies.append(await server.stream_unary(path, None, None)(stream()))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "google.protobuf.StringValue" in (info.value.details() or "")
    assert replies == ([GOOD, GOOD] if method == "Chat" else [])
    assert _problems(caplog) == []


async def test_an_undecodable_request_to_a_method_without_a_descriptor_names_the_method(
    server: grpc.aio.Channel,
) -> None:
    """Where no descriptor declares the method (generic handlers only), the message names the method instead."""
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await server.unary_unary(f"/{UNDECLARED}/Echo", None, None)(NOT_PROTOBUF)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.details() == (
        f"the request is not a valid request message of {UNDECLARED}/Echo: the bytes are not a protobuf message"
    )


async def test_good_requests_of_every_kind_are_answered_as_before(server: grpc.aio.Channel) -> None:
    """The wrapped deserializer and request stream hand good messages over unchanged."""
    hello = wrappers_pb2.StringValue(value="hello").SerializeToString()
    assert await _call(server, "Echo", [hello]) == [hello]
    assert await _call(server, "Repeat", [hello]) == [hello, hello]
    joined = await _call(server, "Join", [hello, GOOD])
    assert wrappers_pb2.StringValue.FromString(joined[0]).value == "hello,good"
    assert await _call(server, "Chat", [hello, GOOD]) == [hello, GOOD]


async def _access_lines(caplog: pytest.LogCaptureFixture, count: int) -> list[dict[str, Any]]:
    """The interceptor's "rpc" lines once ``count`` of them are logged (within a second)."""
    for _ in range(50):
        lines = [r.msg for r in caplog.records if isinstance(r.msg, dict) and r.msg.get("event") == "rpc"]
        if len(lines) >= count:
            return lines
        await asyncio.sleep(0.02)
    return lines


async def test_a_call_past_its_deadline_is_counted_and_logged_deadline_exceeded(
    server: grpc.aio.Channel, caplog: pytest.LogCaptureFixture
) -> None:
    """A call that runs out of its deadline is DEADLINE_EXCEEDED in the metrics and its access line, as the
    client sees it; it was counted CANCELLED."""
    before = _handled("Hold", "DEADLINE_EXCEEDED")
    with caplog.at_level(logging.INFO, logger="mesh.kit.interceptors"):
        for _ in range(3):
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await server.unary_unary(f"/{SERVICE}/Hold", None, None)(GOOD, timeout=0.05)
            assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        lines = await _access_lines(caplog, 3)
    assert [(line["rpc"], line["code"]) for line in lines] == [(f"{SERVICE}/Hold", "DEADLINE_EXCEEDED")] * 3
    assert _handled("Hold", "DEADLINE_EXCEEDED") - before == 3


async def test_a_call_its_client_cancels_before_its_deadline_is_counted_and_logged_cancelled(
    server: grpc.aio.Channel, caplog: pytest.LogCaptureFixture
) -> None:
    """A call with a deadline that its client cancels before the deadline stays CANCELLED."""
    before = _handled("Hold", "CANCELLED")
    with caplog.at_level(logging.INFO, logger="mesh.kit.interceptors"):
        call = server.unary_unary(f"/{SERVICE}/Hold", None, None)(GOOD, timeout=30)
        await asyncio.sleep(0.1)
        call.cancel()
        lines = await _access_lines(caplog, 1)
    assert [(line["rpc"], line["code"]) for line in lines] == [(f"{SERVICE}/Hold", "CANCELLED")]
    assert _handled("Hold", "CANCELLED") - before == 1
