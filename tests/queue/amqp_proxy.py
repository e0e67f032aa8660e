"""A TCP proxy in front of the real RabbitMQ that a test drives to inject broker faults without touching the
shared broker: reset a connection when the client sends a given AMQP method (a reset at a chosen step of a
service's start, whatever the byte counts of the client library), or turn into a black hole (sockets stay
open, nothing passes either way, no reset: what a hung broker or a dropped route looks like until the AMQP
heartbeat gives up)."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

PROTOCOL_HEADER = 8
"""``AMQP\\x00\\x00\\x09\\x01``: what a client sends before its first frame."""
FRAME_METHOD = 1
FRAME_END = 0xCE

QUEUE_DECLARE = (50, 10)
EXCHANGE_DECLARE = (40, 10)
BASIC_CONSUME = (60, 20)
CHANNEL_OPEN = (20, 10)


def _abort(writer: asyncio.StreamWriter) -> None:
    """Close with a TCP reset (SO_LINGER 0), as a broker or a network that drops the connection does."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


@dataclass(eq=False)
class _Link:
    client: asyncio.StreamWriter
    upstream: asyncio.StreamWriter | None = None
    tasks: list[asyncio.Task[None]] = field(default_factory=list)

    def reset(self) -> None:
        for writer in (self.client, self.upstream):
            if writer is not None:
                _abort(writer)


class AmqpProxy:
    """Forwards 127.0.0.1:<port> to RabbitMQ (``target``); see the module docstring."""

    def __init__(self, target: tuple[str, int] = ("127.0.0.1", 5672)) -> None:
        self.target = target
        self.port = 0
        self.resets = 0
        self._server: asyncio.Server | None = None
        self._links: set[_Link] = set()
        self._flowing = asyncio.Event()
        self._flowing.set()
        self._reset_on: tuple[int, int] | None = None
        self._resets_left = 0

    @property
    def url(self) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.port}/%2F"

    async def start(self) -> AmqpProxy:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def close(self) -> None:
        self._flowing.set()
        if self._server is not None:
            self._server.close()
        for link in list(self._links):
            link.reset()
            for task in link.tasks:
                task.cancel()
            await asyncio.gather(*link.tasks, return_exceptions=True)
        self._links.clear()

    def reset_on(self, method: tuple[int, int], times: int = 1) -> None:
        """Reset the connection that sends AMQP method ``method`` (class id, method id) next, before it
        reaches the broker; ``times`` connections in all, then pass everything."""
        self._reset_on, self._resets_left = method, times

    def freeze(self) -> None:
        """Black hole: forward nothing either way until ``thaw`` (connections stay open)."""
        self._flowing.clear()

    def thaw(self) -> None:
        self._flowing.set()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        link = _Link(writer)
        self._links.add(link)
        try:
            await self._flowing.wait()
            try:
                up_reader, link.upstream = await asyncio.open_connection(*self.target)
            except OSError:
                _abort(writer)
                return
            link.tasks = [
                asyncio.create_task(self._client_to_broker(link, reader, link.upstream)),
                asyncio.create_task(self._pipe(up_reader, writer)),
            ]
            await asyncio.gather(*link.tasks, return_exceptions=True)
        finally:
            self._links.discard(link)
            for end in (link.client, link.upstream):
                if end is not None:
                    end.close()

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError, asyncio.IncompleteReadError):
            while data := await reader.read(65536):
                await self._flowing.wait()
                writer.write(data)
                await writer.drain()
        with contextlib.suppress(OSError):
            writer.close()

    async def _client_to_broker(
        self, link: _Link, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        """Forward whole frames, and reset the link on the method ``reset_on`` names."""
        with contextlib.suppress(OSError, asyncio.IncompleteReadError):
            header = await reader.readexactly(PROTOCOL_HEADER)
            await self._flowing.wait()
            writer.write(header)
            while True:
                head = await reader.readexactly(7)
                kind, _, size = struct.unpack(">BHI", head)
                rest = await reader.readexactly(size + 1)
                method = struct.unpack(">HH", rest[:4]) if kind == FRAME_METHOD and size >= 4 else None
                if self._resets_left > 0 and method == self._reset_on:
                    self._resets_left -= 1
                    self.resets += 1
                    link.reset()
                    return
                await self._flowing.wait()
                writer.write(head + rest)
                await writer.drain()
        with contextlib.suppress(OSError):
            writer.close()


@contextlib.asynccontextmanager
async def amqp_proxy() -> AsyncIterator[AmqpProxy]:
    """A started proxy to the local RabbitMQ, closed (and thawed) after."""
    proxy = await AmqpProxy().start()
    try:
        yield proxy
    finally:
        await proxy.close()
