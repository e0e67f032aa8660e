"""mesh.kit.logging: what gRPC's own loggers write through the kit's setup."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from psycopg_pool import PoolTimeout

from mesh.kit.logging import describe

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
