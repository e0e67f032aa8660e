"""A TCP proxy in front of PostgreSQL that a test can silence: from then on nothing passes either way and nothing
is closed. That is a hung server, or a path that went silent (a proxy that stopped forwarding, a NAT that lost
its state), as a client sees it until TCP gives up; here TCP never does, since the proxy's own kernel
acknowledges every byte. A connection opened while silent is accepted and then hears nothing, not even the
server's greeting.

Closing the proxy resets every connection it holds, so that the calls and connection attempts a test left
hanging end at once and its pool closes quickly.

The server must not speak TLS (the tests' local one does not): :meth:`SilentProxy.silence_after_next_answer`
reads the end of an answer in the bytes."""

from __future__ import annotations

import asyncio
import contextlib

from tests.postgres import proxied_postgres
from tests.tcp_proxy import Hooks, TcpProxy, Verdict

_READY_FOR_QUERY = b"Z\x00\x00\x00\x05"
"""The server's ReadyForQuery message less its last byte (the transaction status): it ends every answer."""


class SilentProxy(TcpProxy):
    """Forwards 127.0.0.1:<listen_port> to PostgreSQL at ``host``:``port`` until :meth:`silence`."""

    def __init__(self, host: str, port: int) -> None:
        super().__init__(host, port)
        self._silent_after_answer = False

    def silence_after_next_answer(self) -> None:
        """Forward the server's next answer, on whichever connection it comes, then :meth:`silence`: a
        PostgreSQL that falls silent half-way through a call that reads several times."""
        self._silent_after_answer = True

    def hooks(self, client: asyncio.StreamWriter, server: asyncio.StreamWriter) -> Hooks:
        return Hooks(to_client=self._silence_after_answer)

    def _silence_after_answer(self, chunk: bytes) -> Verdict:
        if self._silent_after_answer and chunk[-6:-1] == _READY_FOR_QUERY:
            self.silence()  # this answer still passes, being past the silence; nothing after it does
        return Verdict.FORWARD


def silent_proxy(url: str) -> contextlib.AbstractAsyncContextManager[tuple[SilentProxy, str]]:
    """A :class:`SilentProxy` in front of the PostgreSQL of ``url``, and ``url`` through it; closed after."""
    return proxied_postgres(SilentProxy, url)
