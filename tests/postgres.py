"""PostgreSQL helpers of the tests: SQL on a connection of its own, and a TCP proxy that cuts a COMMIT, for tests
of what a service does when the answer to its COMMIT is lost (the transaction committed, the client never heard)
or the COMMIT never arrived."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator
from typing import Any

import psycopg
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from psycopg.rows import dict_row

COMMIT_ASKED = b"Q\x00\x00\x00\x0bCOMMIT\x00"  # the simple query psycopg sends
COMMIT_ANSWERED = b"C\x00\x00\x00\x0bCOMMIT\x00"  # PostgreSQL's CommandComplete


class CommitCutter:
    """A TCP proxy to PostgreSQL that, once armed, cuts the next COMMIT: ``answered`` after PostgreSQL committed
    (the answer is dropped), ``held`` before forwarding it with the server side kept open (the transaction
    stays in progress until :meth:`release`), ``aborted`` before forwarding it with both sides closed. Armed
    ``silent``, it forwards nothing more from then on, either way, and closes nothing: a hung server or a path
    that went silent, as a client sees it until TCP gives up."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.mode: str | None = None
        self.listen_port = 0
        self.fired = 0
        self.held: list[asyncio.StreamWriter] = []
        self.tasks: set[asyncio.Task[Any]] = set()

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.listen_port = int(self.server.sockets[0].getsockname()[1])
        return self.listen_port

    def arm(self, mode: str) -> None:
        self.mode = mode

    def release(self) -> None:
        """Close the server side of held connections: their transactions abort."""
        for writer in self.held:
            _reset(writer)
        self.held.clear()

    async def close(self) -> None:
        self.release()
        self.server.close()
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)

    async def _handle(self, client_reader: asyncio.StreamReader, client: asyncio.StreamWriter) -> None:
        server_reader, server = await asyncio.open_connection(self.host, self.port)

        async def up() -> None:
            with contextlib.suppress(Exception):
                while data := await client_reader.read(65536):
                    if self.mode == "silent":
                        continue
                    if COMMIT_ASKED in data and self.mode in ("held", "aborted"):
                        mode, self.mode = self.mode, None
                        self.fired += 1
                        _reset(client)
                        if mode == "held":
                            self.held.append(server)
                        else:
                            _reset(server)
                        return
                    server.write(data)
                    await server.drain()

        async def down() -> None:
            with contextlib.suppress(Exception):
                while data := await server_reader.read(65536):
                    if self.mode == "silent":
                        continue
                    if COMMIT_ANSWERED in data and self.mode == "answered":
                        self.mode = None
                        self.fired += 1
                        _reset(client)
                        _reset(server)
                        return
                    client.write(data)
                    await client.drain()

        for coroutine in (up(), down()):
            task = asyncio.create_task(coroutine)
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)


def _reset(writer: asyncio.StreamWriter) -> None:
    """Close with a TCP reset, as a dropped network path or a killed peer does."""
    sock = writer.get_extra_info("socket")
    with contextlib.suppress(Exception):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    writer.transport.abort()


@contextlib.asynccontextmanager
async def commit_cutter(url: str) -> AsyncIterator[tuple[CommitCutter, str]]:
    """A :class:`CommitCutter` in front of the PostgreSQL of ``url``, and ``url`` through it."""
    params = conninfo_to_dict(url)
    cutter = CommitCutter(str(params.get("host") or "localhost"), int(params.get("port") or 5432))
    port = await cutter.start()
    try:
        yield cutter, make_conninfo(url, host="127.0.0.1", port=str(port))
    finally:
        await cutter.close()


async def sql(url: str, query: str, *params: Any) -> list[dict[str, Any]]:
    """SQL on a connection of its own (past any proxy the repository's pool goes through)."""
    async with await psycopg.AsyncConnection.connect(url, autocommit=True, row_factory=dict_row) as conn:
        cursor = await conn.execute(query, params)
        return await cursor.fetchall() if cursor.description else []
