"""A TCP proxy for the tests' network faults: it listens on 127.0.0.1, forwards every connection it accepts to a
target, and lets a subclass look at each chunk either way and forward it, drop it or reset the connection
(:meth:`TcpProxy.hooks`).

Silenced, nothing passes either way and nothing is closed: a hung server, or a path that went silent (a proxy
that stopped forwarding, a NAT that lost its state), as a client sees it until TCP gives up; here TCP never does,
since the proxy's own kernel acknowledges every byte. A connection accepted while silent hears nothing, not even
a greeting. What was sent meanwhile passes once the proxy resumes, in order.

Closing the proxy resets every connection it holds, so that whatever a test left hanging ends at once."""

from __future__ import annotations

import asyncio
import contextlib
import enum
import socket
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple, Self

CHUNK = 65536
"""The most one read takes: a hook sees the bytes as they come, not a message at a time."""


class Verdict(enum.Enum):
    """What a hook makes of a chunk."""

    FORWARD = enum.auto()
    """Pass it on."""
    DROP = enum.auto()
    """Swallow it; the connection carries on."""
    RESET = enum.auto()
    """Reset both sides instead of passing it: a dropped path, or a killed peer."""
    RESET_CLIENT = enum.auto()
    """Reset the client's side instead of passing it; the server's side stays open and hears nothing more until
    it is reset or the proxy closes: a client that vanished half-way through a conversation."""


Hook = Callable[[bytes], Verdict]


def forward(chunk: bytes) -> Verdict:
    return Verdict.FORWARD


class Hooks(NamedTuple):
    """A connection's hooks, one per direction: each sees every chunk going its way as it is about to pass
    (never while the proxy is silent), and decides what becomes of it."""

    to_server: Hook = forward
    to_client: Hook = forward


def reset(writer: asyncio.StreamWriter) -> None:
    """Close with a TCP reset (SO_LINGER 0), as a dropped network path or a killed peer does."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


@dataclass(eq=False)
class _Connection:
    client: asyncio.StreamWriter
    server: asyncio.StreamWriter | None = None
    """None until the proxy has connected to the target."""
    cut: bool = False
    """The proxy reset it: nothing more passes, and no end is passed on."""

    def reset(self) -> None:
        for writer in (self.client, self.server):
            if writer is not None:
                reset(writer)


class TcpProxy:
    """Forwards 127.0.0.1:<listen_port> to ``host``:``port``; see the module docstring. Use it with ``async with``
    (started, then closed), or :meth:`start` and :meth:`close`."""

    def __init__(self, host: str, port: int) -> None:
        self.target = (host, port)
        self.listen_port = 0
        self._server: asyncio.Server | None = None
        self._connections: dict[_Connection, asyncio.Task[None]] = {}
        self._flowing = asyncio.Event()
        self._flowing.set()

    async def start(self) -> int:
        """Listen; the port it listens on."""
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.listen_port = int(self._server.sockets[0].getsockname()[1])
        return self.listen_port

    async def close(self) -> None:
        """Stop listening, reset every connection, both sides, and end their tasks."""
        if self._server is not None:
            self._server.close()
        tasks = list(self._connections.values())
        for connection, task in self._connections.items():
            connection.reset()
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    @property
    def silent(self) -> bool:
        return not self._flowing.is_set()

    def silence(self) -> None:
        """Forward nothing more, either way, and close nothing, until :meth:`resume`."""
        self._flowing.clear()

    def resume(self) -> None:
        """Forward again, what was held first."""
        self._flowing.set()

    def hooks(self, client: asyncio.StreamWriter, server: asyncio.StreamWriter) -> Hooks:
        """The hooks of a connection just made (``client`` and ``server`` are its two sides); a subclass
        overrides this to inject its faults. Here every chunk passes."""
        return Hooks()

    def _accept(self, client_reader: asyncio.StreamReader, client: asyncio.StreamWriter) -> None:
        connection = _Connection(client)
        task = asyncio.create_task(self._serve(connection, client_reader))
        self._connections[connection] = task
        task.add_done_callback(lambda _: self._connections.pop(connection, None))

    async def _serve(self, connection: _Connection, client_reader: asyncio.StreamReader) -> None:
        await self._flowing.wait()  # accepted while silent: the client waits for an answer that does not come
        try:
            server_reader, server = await asyncio.open_connection(*self.target)
        except OSError:
            reset(connection.client)
            return
        connection.server = server
        hooks = self.hooks(connection.client, server)
        await asyncio.gather(
            self._pipe(connection, client_reader, server, hooks.to_server),
            self._pipe(connection, server_reader, connection.client, hooks.to_client),
        )

    async def _pipe(
        self, connection: _Connection, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, hook: Hook
    ) -> None:
        """Pass what ``reader`` reads on to ``writer`` as ``hook`` decides, then its end (as a close)."""
        with contextlib.suppress(OSError):
            while chunk := await reader.read(CHUNK):
                await self._flowing.wait()
                if connection.cut:
                    return
                verdict = hook(chunk)
                if verdict is Verdict.FORWARD:
                    writer.write(chunk)
                    await writer.drain()
                elif verdict is not Verdict.DROP:
                    self._cut(connection, verdict)
                    return
        await self._flowing.wait()  # silent, the other side hears nothing of the end either
        if not connection.cut:
            writer.close()

    @staticmethod
    def _cut(connection: _Connection, verdict: Verdict) -> None:
        connection.cut = True
        if verdict is Verdict.RESET:
            connection.reset()
        else:
            reset(connection.client)
