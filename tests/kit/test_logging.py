"""mesh.kit.logging: what gRPC's own loggers write through the kit's setup."""

from __future__ import annotations

import json
import logging
import subprocess
import sys

import pytest
from aiormq.exceptions import AMQPConnectionError, ChannelInvalidStateError, ConnectionClosed
from psycopg_pool import PoolTimeout

from mesh.kit.logging import BrokerConnectionLoss, describe

# A server streams 1 MiB messages; its client reads two and cancels, five times. gRPC's asyncio server then
# often fails a write in progress ("ExecuteBatchError raised in core by servicer method ...").
STREAM_CANCELLED = """
import asyncio
import grpc
from mesh.file.v1 import file_service_pb2 as pb, file_service_pb2_grpc as rpc
from mesh.kit.logging import configure_logging

class Downloads(rpc.FileServiceServicer):
    async def DownloadImage(self, request, context):
        yield pb.DownloadImageResponse(image=pb.Image(id="x"))
        for _ in range(64):
            yield pb.DownloadImageResponse(chunk=bytes(1 << 20))

async def main():
    configure_logging("probe", fmt="json")
    server = grpc.aio.server()
    rpc.add_FileServiceServicer_to_server(Downloads(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        for _ in range(5):
            call = rpc.FileServiceStub(channel).DownloadImage(pb.DownloadImageRequest(image_id="x"))
            await call.read()
            await call.read()
            await asyncio.sleep(0.05)
            call.cancel()
            await asyncio.sleep(0.1)
    await server.stop(None)

asyncio.run(main())
"""


def test_a_client_leaving_a_stream_is_an_info_line_not_an_error_with_a_stack() -> None:
    """A client that stops reading a server stream and cancels makes gRPC log an ERROR with a stack for the
    write it could not finish; through the kit's setup that is one info line naming the method, and nothing
    at error level (an operator would otherwise chase a fault that is a client leaving)."""
    done = subprocess.run(
        [sys.executable, "-c", STREAM_CANCELLED], capture_output=True, text=True, timeout=120, check=True
    )
    lines = [json.loads(line) for line in done.stderr.splitlines() if line.startswith("{")]
    assert not [line for line in lines if line["level"] in ("error", "critical")]
    left = [line for line in lines if line["event"].startswith("the call ended while the server was sending")]
    assert left
    assert left[0]["level"] == "info"
    assert left[0]["event"].endswith("/mesh.file.v1.FileService/DownloadImage")
    assert "exception" not in left[0]


@pytest.mark.parametrize("error", [TimeoutError(), PoolTimeout()])
def test_an_exception_without_a_message_is_described_by_its_type(error: Exception) -> None:
    """``error=`` fields name the failure even when ``str()`` of it is empty (asyncio's timeout, psycopg_pool's
    PoolTimeout): the worker logged ``error=""`` for the very timeout it caught."""
    assert str(error) == ""
    assert describe(error) == type(error).__name__


def test_an_exception_with_a_message_keeps_it() -> None:
    """The message stays whole, after the type's name."""
    assert describe(ValueError("x")) == "ValueError: x"


class OneShotCallback:
    """Stands for aio_pika's callback in its error record, named as the fault review's log named it."""

    def __repr__(self) -> str:
        return (
            "<OneShotCallback: cb=<bound method RobustChannel._on_close of "
            "<aio_pika.robust_channel.RobustChannel object at 0x7f388c054050>>>"
        )


CALLBACK = OneShotCallback()

REFUSED = AMQPConnectionError(111, "Connect call failed ('127.0.0.1', 7872)")


def _record(logger: str, msg: str, *args: object) -> logging.LogRecord:
    return logging.getLogger(logger).makeRecord(logger, logging.ERROR, "x.py", 1, msg, args, None)


def _level_after_filter(record: logging.LogRecord) -> str:
    assert BrokerConnectionLoss().filter(record)
    return record.levelname


@pytest.mark.parametrize(
    "record",
    [
        _record("aiormq.connection", "error when creating transport: %r", REFUSED),
        _record("aiormq.connection", "error when creating transport: %r", ConnectionResetError(104, "reset")),
        _record(
            "aiormq.connection",
            'Unexpected connection close from remote "%s", Connection.Close(reply_code=%r, reply_text=%r)',
            "amqp://guest:******@rabbitmq:5672/",
            320,
            "CONNECTION_FORCED - broker forced connection closure with reason 'shutdown'",
        ),
        _record(
            "aio_pika.tools",
            "Callback %r error: %s: %s",
            CALLBACK,
            "ChannelInvalidStateError",
            ChannelInvalidStateError("No active transport in channel"),
        ),
        _record(
            "aio_pika.tools",
            "Callback %r error: %s: %s",
            CALLBACK,
            "ConnectionClosed",
            ConnectionClosed(320, "x"),
        ),
    ],
)
def test_a_lost_broker_connection_logged_by_the_libraries_is_a_warning(record: logging.LogRecord) -> None:
    """aiormq's and aio_pika's errors for a refused, reset or broker-closed RabbitMQ connection, which aio_pika
    heals by reconnecting, come out as warnings (a 10 s outage wrote 22 error lines), message unchanged."""
    message = record.getMessage()
    assert _level_after_filter(record) == "WARNING"
    assert record.levelno == logging.WARNING
    assert record.getMessage() == message


@pytest.mark.parametrize(
    "record",
    [
        _record(
            "aio_pika.tools", "Callback %r error: %s: %s", CALLBACK, "ValueError", ValueError("bad header")
        ),
        _record(
            "aio_pika.robust_connection",
            "Reconnect attempt failed %s due to %s: %s. Retrying after %r seconds.",
            "amqp://rabbitmq",
            "KeyError",
            KeyError("x"),
            1.0,
        ),
        _record("aiormq.channel", "Consumer callback failed"),
        _record(
            "aiormq.connection",
            "error when creating transport: %r",
            AMQPConnectionError(1, "[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed"),
        ),
        _record(
            "aiormq.connection",
            'Unexpected connection close from remote "%s", Connection.Close(reply_code=%r, reply_text=%r)',
            "amqp://rabbitmq",
            541,
            "INTERNAL_ERROR",
        ),
        _record("mesh.services.queue.broker", "error when creating transport: %r", REFUSED),
    ],
)
def test_any_other_error_stays_an_error(record: logging.LogRecord) -> None:
    """Only the connection-loss records are lowered: another error from the libraries (a failing callback, a
    reconnect that failed for another reason, a TLS certificate refused, a broker's internal error), and any
    from the mesh's own loggers, stays ERROR."""
    assert _level_after_filter(record) == "ERROR"


BROKER_REFUSED = """
import asyncio, logging
import aio_pika
from aiormq.exceptions import ChannelInvalidStateError
from mesh.kit.logging import configure_logging, get_logger

async def main():
    configure_logging("probe", fmt="json")
    try:
        await aio_pika.connect("amqp://guest:guest@127.0.0.1:1/", timeout=2)
    except Exception:
        pass
    tools = logging.getLogger("aio_pika.tools")
    lost = ChannelInvalidStateError("No active transport in channel")
    tools.error("Callback %r error: %s: %s", "<OneShotCallback>", type(lost).__name__, lost)
    tools.error("Callback %r error: %s: %s", "<OneShotCallback>", "ValueError", ValueError("bad header"))
    get_logger("mesh.probe").error("error when creating transport: ours")

asyncio.run(main())
"""


def test_the_kit_setup_writes_a_refused_broker_connection_as_a_warning() -> None:
    """Through configure_logging, aiormq's own record for a refused connection (a real connect attempt) and
    aio_pika's channel callback one are warnings; aio_pika's other error and the mesh's own stay errors."""
    done = subprocess.run(
        [sys.executable, "-c", BROKER_REFUSED], capture_output=True, text=True, timeout=60, check=True
    )
    lines = [json.loads(line) for line in done.stderr.splitlines() if line.startswith("{")]
    levels = [(line["logger"], line["event"].split(":")[0], line["level"]) for line in lines]
    assert levels == [
        ("aiormq.connection", "error when creating transport", "warning"),
        ("aio_pika.tools", "Callback '<OneShotCallback>' error", "warning"),
        ("aio_pika.tools", "Callback '<OneShotCallback>' error", "error"),
        ("mesh.probe", "error when creating transport", "error"),
    ], levels
