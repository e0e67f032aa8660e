"""PostgreSQL helpers of the tests: SQL on a connection of its own, and a TCP proxy that cuts a COMMIT, for tests
of what a service does when the answer to its COMMIT is lost (the transaction committed, the client never heard)
or the COMMIT never arrived."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from functools import partial
from typing import Any, Literal, TypeVar

import psycopg
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from psycopg.rows import dict_row

from tests.tcp_proxy import Hooks, TcpProxy, Verdict, reset

COMMIT_ASKED = b"Q\x00\x00\x00\x0bCOMMIT\x00"  # the simple query psycopg sends
COMMIT_ANSWERED = b"C\x00\x00\x00\x0bCOMMIT\x00"  # PostgreSQL's CommandComplete

Mode = Literal["answered", "held", "aborted", "silent"]


class CommitCutter(TcpProxy):
    """A TCP proxy to PostgreSQL that, once armed, cuts the next COMMIT: ``answered`` after PostgreSQL committed
    (the answer is dropped), ``held`` before forwarding it with the server side kept open (the transaction
    stays in progress until :meth:`release`), ``aborted`` before forwarding it with both sides closed. Armed
    ``silent``, it forwards nothing more from then on, either way, and closes nothing: a hung server or a path
    that went silent, as a client sees it until TCP gives up."""

    def __init__(self, host: str, port: int) -> None:
        super().__init__(host, port)
        self.mode: Mode | None = None
        self.fired = 0
        self.held: list[asyncio.StreamWriter] = []

    def arm(self, mode: Mode) -> None:
        self.mode = mode
        if mode == "silent":
            self.silence()

    def release(self) -> None:
        """Close the server side of held connections: their transactions abort."""
        for writer in self.held:
            reset(writer)
        self.held.clear()

    def hooks(self, client: asyncio.StreamWriter, server: asyncio.StreamWriter) -> Hooks:
        return Hooks(to_server=partial(self._cut_commit_asked, server), to_client=self._cut_commit_answered)

    def _cut_commit_asked(self, server: asyncio.StreamWriter, chunk: bytes) -> Verdict:
        if self.mode not in ("held", "aborted") or COMMIT_ASKED not in chunk:
            return Verdict.FORWARD
        if self._fire() == "aborted":
            return Verdict.RESET
        self.held.append(server)
        return Verdict.RESET_CLIENT

    def _cut_commit_answered(self, chunk: bytes) -> Verdict:
        if self.mode != "answered" or COMMIT_ANSWERED not in chunk:
            return Verdict.FORWARD
        self._fire()
        return Verdict.RESET

    def _fire(self) -> Mode | None:
        """Disarm, counting the cut; the mode it was armed with."""
        mode, self.mode = self.mode, None
        self.fired += 1
        return mode


Proxy = TypeVar("Proxy", bound=TcpProxy)


@contextlib.asynccontextmanager
async def proxied_postgres(
    proxy_type: Callable[[str, int], Proxy], url: str
) -> AsyncIterator[tuple[Proxy, str]]:
    """A ``proxy_type`` in front of the PostgreSQL of ``url``, started, and ``url`` through it; closed after."""
    params = conninfo_to_dict(url)
    async with proxy_type(str(params.get("host") or "localhost"), int(params.get("port") or 5432)) as proxy:
        yield proxy, make_conninfo(url, host="127.0.0.1", port=str(proxy.listen_port))


def commit_cutter(url: str) -> contextlib.AbstractAsyncContextManager[tuple[CommitCutter, str]]:
    """A :class:`CommitCutter` in front of the PostgreSQL of ``url``, and ``url`` through it."""
    return proxied_postgres(CommitCutter, url)


async def sql(url: str, query: str, *params: Any) -> list[dict[str, Any]]:
    """SQL on a connection of its own (past any proxy the repository's pool goes through)."""
    async with await psycopg.AsyncConnection.connect(url, autocommit=True, row_factory=dict_row) as conn:
        cursor = await conn.execute(query, params)
        return await cursor.fetchall() if cursor.description else []
