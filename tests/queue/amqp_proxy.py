"""A TCP proxy in front of the real RabbitMQ that a test drives to inject broker faults without touching the
shared broker: reset a connection when the client sends a given AMQP method (a reset at a chosen step of a
service's start, whatever the byte counts of the client library), or turn into a black hole (sockets stay
open, nothing passes either way, no reset: what a hung broker or a dropped route looks like until the AMQP
heartbeat gives up)."""

from __future__ import annotations

import asyncio
import struct
from functools import partial

from tests.tcp_proxy import Hooks, TcpProxy, Verdict

PROTOCOL_HEADER = 8
"""``AMQP\\x00\\x00\\x09\\x01``: what a client sends before its first frame."""
FRAME_HEADER = 7
"""A frame's type (1 byte), channel (2) and payload size (4); the payload and a frame-end byte follow."""
FRAME_METHOD = 1
FRAME_END = 0xCE

QUEUE_DECLARE = (50, 10)
EXCHANGE_DECLARE = (40, 10)
BASIC_CONSUME = (60, 20)
CHANNEL_OPEN = (20, 10)


class _Methods:
    """Reads the methods a client sends out of its bytes, whatever chunks they come in."""

    def __init__(self) -> None:
        self._unread = bytearray()
        self._greeted = False

    def read(self, chunk: bytes) -> list[tuple[int, int]]:
        """The (class id, method id) of each method frame that ``chunk`` completes."""
        self._unread += chunk
        if not self._greeted:
            if len(self._unread) < PROTOCOL_HEADER:
                return []
            del self._unread[:PROTOCOL_HEADER]
            self._greeted = True
        methods: list[tuple[int, int]] = []
        while len(self._unread) >= FRAME_HEADER:
            kind, _, size = struct.unpack_from(">BHI", self._unread)
            length = FRAME_HEADER + size + 1
            if len(self._unread) < length:
                break
            if kind == FRAME_METHOD and size >= 4:
                methods.append(struct.unpack_from(">HH", self._unread, FRAME_HEADER))
            del self._unread[:length]
        return methods


class AmqpProxy(TcpProxy):
    """Forwards 127.0.0.1:<port> to RabbitMQ (``target``); see the module docstring."""

    def __init__(self, target: tuple[str, int] = ("127.0.0.1", 5672)) -> None:
        super().__init__(*target)
        self.resets = 0
        self._reset_on: tuple[int, int] | None = None
        self._resets_left = 0

    @property
    def port(self) -> int:
        return self.listen_port

    @property
    def url(self) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.port}/%2F"

    def reset_on(self, method: tuple[int, int], times: int = 1) -> None:
        """Reset the connection that sends AMQP method ``method`` (class id, method id) next, before the broker
        has all of its frame; ``times`` connections in all, then pass everything."""
        self._reset_on, self._resets_left = method, times

    def freeze(self) -> None:
        """Black hole: forward nothing either way until ``thaw`` (connections stay open)."""
        self.silence()

    def thaw(self) -> None:
        self.resume()

    def hooks(self, client: asyncio.StreamWriter, server: asyncio.StreamWriter) -> Hooks:
        return Hooks(to_server=partial(self._reset_on_method, _Methods()))

    def _reset_on_method(self, methods: _Methods, chunk: bytes) -> Verdict:
        sent = methods.read(chunk)  # every chunk, to keep to the frames' bounds
        if self._resets_left > 0 and self._reset_on in sent:
            self._resets_left -= 1
            self.resets += 1
            return Verdict.RESET
        return Verdict.FORWARD


def amqp_proxy() -> AmqpProxy:
    """A proxy to the local RabbitMQ, for ``async with``: started, then closed after."""
    return AmqpProxy()
