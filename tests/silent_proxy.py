"""A TCP proxy in front of PostgreSQL that a test can silence: from then on nothing passes either way and nothing
is closed. That is a hung server, or a path that went silent (a proxy that stopped forwarding, a NAT that lost
its state), as a client sees it until TCP gives up; here TCP never does, since the proxy's own kernel
acknowledges every byte. A connection opened while silent is accepted and then hears nothing, not even the
server's greeting.

Unlike :class:`tests.postgres.CommitCutter`, closing the proxy resets every connection it holds, so that the
calls and connection attempts a test left hanging end at once and its pool closes quickly.

The server must not speak TLS (the tests' local one does not): :meth:`SilentProxy.silence_after_next_answer`
reads the end of an answer in the bytes."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
from collections.abc import AsyncIterator

from psycopg.conninfo import conninfo_to_dict, make_conninfo

_READY_FOR_QUERY = b"Z\x00\x00\x00\x05"
"""The server's ReadyForQuery message less its last byte (the transaction status): it ends every answer."""


class SilentProxy:
    """Forwards 127.0.0.1:<port> to PostgreSQL at ``host``:``port`` until :meth:`silence`."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.listen_port = 0
        self.silent = False
        self._silent_after_answer = False
        self._server: asyncio.Server | None = None
        self._sockets: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> int:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.listen_port = int(self._server.sockets[0].getsockname()[1])
        return self.listen_port

    def silence(self) -> None:
        """Forward nothing more, either way, and close nothing."""
        self.silent = True

    def silence_after_next_answer(self) -> None:
        """Forward the server's next answer, on whichever connection it comes, then :meth:`silence`: a
        PostgreSQL that falls silent half-way through a call that reads several times."""
        self._silent_after_answer = True

    async def close(self) -> None:
        """Stop listening and reset every connection, both sides."""
        if self._server is not None:
            self._server.close()
        for writer in self._sockets:
            _reset(writer)
        self._sockets.clear()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _accept(self, client_reader: asyncio.StreamReader, client: asyncio.StreamWriter) -> None:
        self._sockets.add(client)
        if self.silent:
            return  # held open by _sockets: the client waits for a greeting that never comes
        server_reader, server = await asyncio.open_connection(self.host, self.port)
        self._sockets.add(server)
        for reader, writer, from_server in ((client_reader, server, False), (server_reader, client, True)):
            task = asyncio.create_task(self._pipe(reader, writer, from_server=from_server))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _pipe(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, from_server: bool
    ) -> None:
        with contextlib.suppress(OSError):
            while data := await reader.read(65536):
                if not self.silent:
                    writer.write(data)
                    if from_server and self._silent_after_answer and data[-6:-1] == _READY_FOR_QUERY:
                        self.silent = True  # before the drain: nothing else may pass meanwhile
                    await writer.drain()
            if not self.silent:  # an end passed on as it came; silent, the other side hears nothing of it
                writer.close()


def _reset(writer: asyncio.StreamWriter) -> None:
    """Close with a TCP reset (SO_LINGER 0), as a dropped path or a killed peer does."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


@contextlib.asynccontextmanager
async def silent_proxy(url: str) -> AsyncIterator[tuple[SilentProxy, str]]:
    """A :class:`SilentProxy` in front of the PostgreSQL of ``url``, and ``url`` through it; closed after."""
    params = conninfo_to_dict(url)
    proxy = SilentProxy(str(params.get("host") or "localhost"), int(params.get("port") or 5432))
    port = await proxy.start()
    try:
        yield proxy, make_conninfo(url, host="127.0.0.1", port=str(port))
    finally:
        await proxy.close()
