"""The tests' fault proxy (:mod:`tests.tcp_proxy`) against a local echo server: it forwards both ways, its hooks
drop or reset as they decide, silence holds every connection open without a byte passing (a connection accepted
meanwhile hears nothing, not even from the server), and closing it resets every connection it holds."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import pytest

from tests.tcp_proxy import Hooks, TcpProxy, Verdict

QUIET = 0.2
"""How long a side is listened to before it is said to hear nothing (a wrong answer only passes a test)."""


@dataclass
class Echo:
    """A server that sends back what it reads, noting what it read and how each connection ended."""

    received: bytearray = field(default_factory=bytearray)
    ends: list[asyncio.Future[str]] = field(default_factory=list)
    """Per connection: "closed" or "reset", once it ended."""

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        end = asyncio.get_running_loop().create_future()
        self.ends.append(end)
        try:
            while data := await reader.read(1024):
                self.received += data
                writer.write(data)
                await writer.drain()
            end.set_result("closed")
        except ConnectionResetError:
            end.set_result("reset")
        writer.close()


@pytest.fixture
async def echo() -> AsyncIterator[tuple[Echo, int]]:
    echo = Echo()
    server = await asyncio.start_server(echo.serve, "127.0.0.1", 0)
    async with server:
        yield echo, int(server.sockets[0].getsockname()[1])


class Cutter(TcpProxy):
    """Drops a chunk that says ``drop``, resets on ``reset``, the client's side only on ``hang up``; notes each
    chunk it judged."""

    def __init__(self, host: str, port: int) -> None:
        super().__init__(host, port)
        self.judged: asyncio.Queue[bytes] = asyncio.Queue()

    def hooks(self, client: asyncio.StreamWriter, server: asyncio.StreamWriter) -> Hooks:
        return Hooks(to_server=self.judge)

    def judge(self, chunk: bytes) -> Verdict:
        self.judged.put_nowait(chunk)
        verdicts = {b"drop": Verdict.DROP, b"reset": Verdict.RESET, b"hang up": Verdict.RESET_CLIENT}
        return verdicts.get(chunk, Verdict.FORWARD)


@contextlib.asynccontextmanager
async def connected(proxy: TcpProxy) -> AsyncIterator[tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
    """A client connection through ``proxy``, that has had an answer from the server when ``proxy`` is not
    silent."""
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.listen_port)
    try:
        if not proxy.silent:
            writer.write(b"ping")
            assert await said(reader, 4) == b"ping"
        yield reader, writer
    finally:
        writer.close()


async def said(reader: asyncio.StreamReader, size: int) -> bytes:
    return await asyncio.wait_for(reader.readexactly(size), 5)


async def hears_nothing(reader: asyncio.StreamReader) -> bool:
    """Whether ``reader`` gets neither a byte nor an end for a while."""
    try:
        await asyncio.wait_for(reader.read(1), QUIET)
    except TimeoutError:
        return True
    return False


async def ended(end: asyncio.Future[str]) -> str:
    return await asyncio.wait_for(asyncio.shield(end), 5)


async def still_open(end: asyncio.Future[str]) -> bool:
    """Whether a server side has not ended after a while."""
    await asyncio.sleep(QUIET)
    return not end.done()


async def test_it_forwards_both_ways_and_passes_the_end_on(echo: tuple[Echo, int]) -> None:
    """What the client sends reaches the server, its answer comes back, and the client's close ends the server's
    side."""
    server, port = echo
    async with TcpProxy("127.0.0.1", port) as proxy:
        async with connected(proxy) as (reader, writer):
            writer.write(b"pong")
            assert await said(reader, 4) == b"pong"
        assert await ended(server.ends[0]) == "closed"
    assert server.received == b"pingpong"


async def test_a_hook_drops_a_chunk_and_the_connection_carries_on(echo: tuple[Echo, int]) -> None:
    server, port = echo
    async with Cutter("127.0.0.1", port) as proxy, connected(proxy) as (reader, writer):
        writer.write(b"drop")
        while await proxy.judged.get() != b"drop":
            pass
        writer.write(b"kept")
        assert await said(reader, 4) == b"kept"
    assert server.received == b"pingkept"


async def test_a_hook_resets_both_sides(echo: tuple[Echo, int]) -> None:
    server, port = echo
    async with Cutter("127.0.0.1", port) as proxy, connected(proxy) as (reader, writer):
        writer.write(b"reset")
        with pytest.raises(ConnectionResetError):
            await said(reader, 1)
        assert await ended(server.ends[0]) == "reset"
    assert server.received == b"ping"


async def test_a_hook_resets_the_client_and_holds_the_server_open_until_close(echo: tuple[Echo, int]) -> None:
    server, port = echo
    async with Cutter("127.0.0.1", port) as proxy:
        async with connected(proxy) as (reader, writer):
            writer.write(b"hang up")
            with pytest.raises(ConnectionResetError):
                await said(reader, 1)
        assert await still_open(server.ends[0])
    assert await ended(server.ends[0]) == "reset"
    assert server.received == b"ping"


async def test_silence_holds_connections_open_and_passes_nothing_until_resumed(
    echo: tuple[Echo, int],
) -> None:
    """Silent, nothing passes either way and neither side hears an end; resumed, what was sent meanwhile
    passes."""
    server, port = echo
    async with TcpProxy("127.0.0.1", port) as proxy, connected(proxy) as (reader, writer):
        proxy.silence()
        writer.write(b"pong")
        assert await hears_nothing(reader)
        assert await still_open(server.ends[0])
        assert server.received == b"ping"
        proxy.resume()
        assert await said(reader, 4) == b"pong"


async def test_a_connection_accepted_while_silent_hears_nothing(echo: tuple[Echo, int]) -> None:
    """The proxy accepts it but does not reach the server, so the client hears neither a greeting nor an end,
    until the proxy resumes."""
    server, port = echo
    async with TcpProxy("127.0.0.1", port) as proxy:
        proxy.silence()
        async with connected(proxy) as (reader, writer):
            writer.write(b"hello")
            assert await hears_nothing(reader)
            assert server.ends == []
            proxy.resume()
            assert await said(reader, 5) == b"hello"


async def test_close_resets_every_connection(echo: tuple[Echo, int]) -> None:
    """Both sides of a connection, and a client the proxy holds silent without a server, hear a reset."""
    server, port = echo
    async with TcpProxy("127.0.0.1", port) as proxy, connected(proxy) as (forwarded, _):
        proxy.silence()
        async with connected(proxy) as (held, _):
            assert await hears_nothing(held)
            await proxy.close()
            for reader in (forwarded, held):
                with pytest.raises(ConnectionResetError):
                    await said(reader, 1)
            assert await ended(server.ends[0]) == "reset"
            assert len(server.ends) == 1
