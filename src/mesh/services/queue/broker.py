"""RabbitMQ through aio-pika: a robust connection, the job queues' topology, confirmed publishing, consuming.

The connection reconnects by itself (``connect_robust``) and restores its channels, declarations and
consumers. A job queue is two RabbitMQ queues, its lanes (``topology``): ``declare`` and ``ready_count``
take the job queue and cover both lanes, ``publish`` takes a lane, ``consume`` consumes both lanes.
Publishing uses a channel with publisher confirms and ``on_return_raises``, persistent delivery and
``mandatory``: ``publish`` returns only once the broker has taken responsibility for the message, and raises
when it did not (a nack, a return because no queue is bound, a closed connection, a timeout).

Setting up (``connect``, ``declare_retrying``, ``consume``, ``consume_dead_letters``) is retried with backoff
through connection-level failures (refused, reset, timed out, the connection closed under a call) until
RabbitMQ answers, so one reset while a service starts does not stop it; only a declaration the broker refuses
(``PRECONDITION_FAILED``: a queue declared elsewhere with other arguments; ``ACCESS_REFUSED``) raises.

Questions (``ready_count``, the health ``check``) each run on a plain channel of their own, closed whatever
the outcome, and wait ``answer_seconds`` at most: a broker that stops answering without dropping the
connection (a black hole, noticed by the AMQP heartbeat only after about 48 s) makes the answer unknown (-1)
or the check fail, rather than hang its caller. Each runs in a task of the broker's, never cancelled by a
caller that stops waiting: a channel cancelled half-way made RabbitMQ close the whole connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, TypeVar
from urllib.parse import parse_qs, urlsplit

import aio_pika
import aiormq
import aiormq.abc
from aio_pika.abc import (
    AbstractChannel,
    AbstractIncomingMessage,
    AbstractQueue,
    AbstractRobustChannel,
    AbstractRobustConnection,
    DeliveryMode,
)
from aio_pika.exceptions import CONNECTION_EXCEPTIONS
from aiormq.exceptions import (
    ChannelAccessRefused,
    ChannelLockedResource,
    ChannelPreconditionFailed,
    DuplicateConsumerTag,
)
from pamqp import commands as spec

from mesh.kit.logging import describe, get_logger
from mesh.services.queue.topology import (
    dead_letter_exchange,
    dead_letter_queue,
    lanes,
    queue_arguments,
)

log = get_logger(__name__)

T = TypeVar("T")
MessageHandler = Callable[[AbstractIncomingMessage], Awaitable[None]]
CONTENT_TYPE = "application/x-protobuf"
PERSISTENT = int(DeliveryMode.PERSISTENT)

ANSWER_SECONDS = 3.0
"""How long a question to RabbitMQ (a ready count, the health check's round trip) waits for its answer."""

CONNECT_SECONDS = 10.0
"""How long one connection attempt (TCP and the AMQP handshake) may take before it counts as failed."""

HEARTBEAT_SECONDS = 15
"""The AMQP heartbeat asked for when the URL names none (``?heartbeat=N`` there wins). A broker that stops
answering without dropping the connection is taken for gone after about three heartbeats, 48 s, and the
robust connection reconnects and restores what was on it; RabbitMQ's default of 60 s took 183 s, and a
declaration or publish caught in the silence waited that long."""

RETRY_CAP_SECONDS = 10.0
"""The longest pause between two tries of a setup step (the pause doubles from ``reconnect_seconds``)."""

REFUSALS: tuple[type[Exception], ...] = (
    ChannelAccessRefused,
    ChannelLockedResource,
    ChannelPreconditionFailed,
    DuplicateConsumerTag,
)
"""Channel-level answers of the broker that no retry changes: the setup is wrong (a queue declared elsewhere
with other arguments, missing permissions), and the service stops rather than retry for ever."""


def retryable(exc: BaseException) -> bool:
    """A connection-level failure (refused, reset, timed out, the connection or the channel closed under the
    call, an entity gone meanwhile) that another try may get past once the connection is back; not a refusal
    (``REFUSALS``), and not an error outside the AMQP client (a bug)."""
    return isinstance(exc, CONNECTION_EXCEPTIONS) and not isinstance(exc, REFUSALS)


async def _round_trip(channel: aiormq.abc.AbstractChannel) -> None:
    """The health check's question: none, the channel's open and close are the round trip."""


class Broker:
    """One robust AMQP connection with a confirmed publishing channel and consumer channels."""

    def __init__(
        self,
        url: str,
        *,
        delivery_limit: int,
        reconnect_seconds: float = 1.0,
        name: str = "mesh",
        answer_seconds: float = ANSWER_SECONDS,
    ) -> None:
        self.url = url
        self.delivery_limit = delivery_limit
        self.reconnect_seconds = reconnect_seconds
        self.name = name
        self.answer_seconds = answer_seconds
        self._connection: AbstractRobustConnection | None = None
        self._publisher: AbstractRobustChannel | None = None
        self._declared: set[str] = set()
        self._declare_lock = asyncio.Lock()
        self._consumer_channels: list[AbstractChannel] = []
        self._asking: set[asyncio.Task[Any]] = set()
        self._unanswered_until = 0.0
        self._unanswered_since = 0.0
        self._closed = False
        self._setup_error = ""
        """Why the last try of a setup step failed ("" once one succeeds): the health check says it, so a refused
        login reads as such rather than as "connecting"."""

    @property
    def connected(self) -> bool:
        """True while the connection is up: a robust connection is not ``is_closed`` while it reconnects
        (only once closed on purpose), so health read "connected" through a whole broker outage."""
        connection = self._connection
        return connection is not None and not connection.is_closed and connection.connected.is_set()

    async def _retrying(self, what: str, step: Callable[[], Awaitable[T]]) -> T:
        """Run ``step`` until it succeeds, pausing (``reconnect_seconds``, doubling up to
        ``RETRY_CAP_SECONDS``) after each connection-level failure; a refusal, or any other error, raises.

        A call cancelled by the closing connection (aiormq cancels what waits on it) is such a failure too; a
        cancellation of the caller's own task is not, and goes through."""
        delay = self.reconnect_seconds
        while True:
            if self._closed:
                raise ConnectionError(f"the broker was closed before {what} succeeded")
            try:
                result = await step()
            except asyncio.CancelledError:
                task = asyncio.current_task()
                if task is None or task.cancelling():
                    raise
                error = "cancelled by the closing connection"
            except Exception as exc:
                if not retryable(exc):
                    log.error("RabbitMQ refused the setup", step=what, error=describe(exc))
                    raise
                error = describe(exc)
            else:
                self._setup_error = ""
                return result
            self._setup_error = f"{what} failed: {error}"
            log.warning("RabbitMQ setup failed; retrying", step=what, error=error, retry_in_s=round(delay, 3))
            await asyncio.sleep(delay)
            delay = min(delay * 2, max(self.reconnect_seconds, RETRY_CAP_SECONDS))

    async def connect(self) -> None:
        """Open the connection and the publishing channel, retrying until RabbitMQ answers: a connection
        refused, reset or timed out before both are open is tried again (the robust connection reconnects by
        itself once it was open)."""
        self._closed = False
        await self._retrying("connect", self._connect_once)

    async def _connect_once(self) -> None:
        if self._connection is None or self._connection.is_closed:
            heartbeat = None if "heartbeat" in parse_qs(urlsplit(self.url).query) else HEARTBEAT_SECONDS
            self._connection = await aio_pika.connect_robust(
                self.url,
                heartbeat=heartbeat,
                reconnect_interval=self.reconnect_seconds,
                timeout=CONNECT_SECONDS,
                client_properties={"connection_name": self.name},
            )
        if self._publisher is None:
            self._publisher = await self._open_channel(publisher_confirms=True, on_return_raises=True)

    async def close(self) -> None:
        """Close channels and the connection (a setup still retrying then raises)."""
        self._closed = True
        if self._connection is not None:
            await self._connection.close()
        # Questions on the closed connection end at once; none is left pending when the event loop ends.
        await asyncio.gather(*self._asking, return_exceptions=True)
        self._connection = None
        self._publisher = None
        self._declared.clear()

    def _channel(self) -> AbstractChannel:
        if self._publisher is None:
            raise ConnectionError("the broker is not connected")
        return self._publisher

    async def _open_channel(
        self, *, prefetch: int = 0, publisher_confirms: bool = True, on_return_raises: bool = False
    ) -> AbstractRobustChannel:
        """A robust channel (with ``prefetch`` when not 0); a channel whose opening failed is closed, so the
        connection does not reopen it when it reconnects."""
        if self._connection is None:
            raise ConnectionError("the broker is not connected")
        channel = self._connection.channel(
            publisher_confirms=publisher_confirms, on_return_raises=on_return_raises
        )
        try:
            await channel
            if prefetch:
                await channel.set_qos(prefetch_count=prefetch)
        except BaseException:
            await self._discard(channel)
            raise
        return channel

    async def _discard(self, channel: AbstractChannel) -> None:
        """Close ``channel`` (a setup step failed on it) without waiting long nor raising."""
        with contextlib.suppress(Exception):
            await asyncio.wait_for(channel.close(), self.answer_seconds)

    async def declare(self, queue: str) -> None:
        """Declare job queue ``queue``: both lanes (quorum, delivery limit, dead-lettering, the same
        arguments) with their dead-letter exchange and queue. One try: raises when it fails (the relay
        declares before it publishes, and releases its rows for a later round then)."""
        if queue in self._declared:
            return
        async with self._declare_lock:
            if queue in self._declared:
                return
            channel = self._channel()
            dlx = await channel.declare_exchange(
                dead_letter_exchange(queue), aio_pika.ExchangeType.DIRECT, durable=True
            )
            dead = await channel.declare_queue(
                dead_letter_queue(queue), durable=True, arguments={"x-queue-type": "quorum"}
            )
            await dead.bind(dlx, routing_key=queue)
            for lane in lanes(queue):
                await channel.declare_queue(
                    lane, durable=True, arguments=queue_arguments(queue, self.delivery_limit)
                )
            self._declared.add(queue)

    async def declare_retrying(self, queue: str) -> None:
        """``declare``, tried again through connection-level failures until it succeeds; raises only when the
        broker refuses the declaration (``REFUSALS``)."""
        await self._retrying(f"declare {queue}", lambda: self.declare(queue))

    async def publish(
        self,
        queue: str,
        body: bytes,
        *,
        headers: Mapping[str, str],
        message_id: str,
        message_type: str,
        timeout: float,
        priority: int = 0,
    ) -> None:
        """Publish persistently and mandatorily to ``queue`` (a lane); returns after the broker's confirm.
        ``priority`` goes in the AMQP ``priority`` property (workers order what they hold by it).

        Straight on the channel's aiormq channel (aio-pika's ``Message`` adds nothing here), and without
        waiting for the socket to drain first: the confirm that is awaited comes later anyway, and the
        connection's bounded frame queue still holds publishers back when RabbitMQ reads slowly."""
        channel = await self._channel().get_underlay_channel()
        if not isinstance(channel, aiormq.Channel):
            raise ConnectionError(f"unexpected AMQP channel {channel!r}")
        properties = spec.Basic.Properties(
            headers=dict(headers),
            content_type=CONTENT_TYPE,
            delivery_mode=PERSISTENT,
            message_id=message_id,
            message_type=message_type,
            priority=priority,
        )
        # A nack raises DeliveryError and a return (no queue bound) PublishError (the channel is opened with
        # on_return_raises); anything but an Ack is a failure too.
        confirmation = await channel.basic_publish(
            body,
            exchange="",
            routing_key=queue,
            properties=properties,
            mandatory=True,
            timeout=timeout,
            wait=False,
        )
        if not isinstance(confirmation, spec.Basic.Ack):
            raise ConnectionError(f"the broker did not confirm {message_id}: {confirmation!r}")

    async def consume(
        self, queue: str, handler: MessageHandler, *, prefetch: int
    ) -> list[tuple[AbstractQueue, str]]:
        """Consume both lanes of job queue ``queue`` (declared first), each on a channel of its own with
        ``prefetch`` unacknowledged messages at most (so up to twice ``prefetch`` in all); returns each lane's
        queue and consumer tag (to stop consuming with ``queue.cancel(tag)``), the normal lane first.

        Retried until it succeeds: a connection-level failure while the consumers are set up closes the
        channels this try opened and starts again; a refusal raises."""
        await self.declare_retrying(queue)
        return await self._retrying(f"consume {queue}", lambda: self._consume_lanes(queue, handler, prefetch))

    async def _consume_lanes(
        self, queue: str, handler: MessageHandler, prefetch: int
    ) -> list[tuple[AbstractQueue, str]]:
        opened: list[AbstractChannel] = []
        consumers: list[tuple[AbstractQueue, str]] = []
        try:
            for lane in lanes(queue):
                channel = await self._open_channel(prefetch=prefetch)
                opened.append(channel)
                declared = await channel.declare_queue(
                    lane, durable=True, arguments=queue_arguments(queue, self.delivery_limit)
                )
                tag = await declared.consume(handler, no_ack=False)
                consumers.append((declared, tag))
        except BaseException:
            for failed in opened:
                await self._discard(failed)
            raise
        self._consumer_channels.extend(opened)
        return consumers

    async def consume_dead_letters(self, queue: str, handler: MessageHandler, *, prefetch: int) -> None:
        """Consume ``queue``'s dead-letter queue (job queue ``queue`` declared first), retried as ``consume``
        is."""
        await self.declare_retrying(queue)
        await self._retrying(
            f"consume {dead_letter_queue(queue)}", lambda: self._consume_dead(queue, handler, prefetch)
        )

    async def _consume_dead(self, queue: str, handler: MessageHandler, prefetch: int) -> None:
        channel = await self._open_channel(prefetch=prefetch)
        try:
            dead = await channel.declare_queue(
                dead_letter_queue(queue), durable=True, arguments={"x-queue-type": "quorum"}
            )
            await dead.consume(handler, no_ack=False)
        except BaseException:
            await self._discard(channel)
            raise
        self._consumer_channels.append(channel)

    async def _ask(self, question: Callable[[aiormq.abc.AbstractChannel], Awaitable[T]]) -> T:
        """``question`` asked on a plain channel of its own (``_question``), in a task the broker owns: a caller
        that stops waiting (a client's deadline, the health monitor's or the reconciler's timeout) leaves the
        question to finish, within ``answer_seconds``. Cancelled half-way, the channel's open or close left
        frames the broker did not expect, and RabbitMQ closed the whole connection (``CHANNEL_ERROR - expected
        'channel.open'``), with every consumer and publish on it.

        Raises ConnectionError while not connected, and TimeoutError when RabbitMQ did not answer in time;
        after that, for ``answer_seconds``, every question raises TimeoutError at once rather than open yet
        another channel that would wait as long (a channel that got no answer is held until the broker confirms
        its close, or the connection goes)."""
        connection = self._connection
        transport = connection.transport if connection is not None else None
        if transport is None or not self.connected:
            raise ConnectionError("not connected to RabbitMQ")
        if time.monotonic() < self._unanswered_until:
            waited = time.monotonic() - self._unanswered_since
            raise TimeoutError(f"no reply for {waited:.1f}s")
        asking = asyncio.create_task(self._question(transport.connection, question))
        self._asking.add(asking)
        asking.add_done_callback(self._asked)
        return await asyncio.shield(asking)

    def _asked(self, asking: asyncio.Task[Any]) -> None:
        """A question's task ended: forget it, and take its error as seen (its caller may have gone)."""
        self._asking.discard(asking)
        if not asking.cancelled():
            asking.exception()

    async def _question(
        self,
        connection: aiormq.abc.AbstractConnection,
        question: Callable[[aiormq.abc.AbstractChannel], Awaitable[T]],
    ) -> T:
        """``question`` on a plain (aiormq, not robust) channel, closed after it whatever happened, within
        ``answer_seconds`` in all.

        Not the publishing channel: the broker closes a channel on a failed passive declare. Not a robust one
        either: aio-pika reopens a robust channel the broker closed, and the reopened one stayed open, one per
        question (at ``channel_max`` the connection failed)."""
        asked = time.monotonic()
        try:
            async with asyncio.timeout(self.answer_seconds):
                channel = await connection.channel(publisher_confirms=False)
                self._unanswered_since = 0.0  # it answers (again)
                try:
                    return await question(channel)
                finally:
                    if not channel.is_closed:
                        await channel.close()
        except TimeoutError:
            # No answer within answer_seconds: hold further questions off a while. Only the broker's own
            # silence counts, not a caller that gave up first (the health monitor's 2 s timeout): that left the
            # reconciler blind for 3 s.
            self._unanswered_since = self._unanswered_since or asked
            self._unanswered_until = time.monotonic() + self.answer_seconds
            raise

    async def ready_count(self, queue: str) -> int:
        """Messages ready in job queue ``queue``, both lanes (-1 when the broker cannot say)."""
        counts = await asyncio.gather(*(self.lane_ready_count(lane) for lane in lanes(queue)))
        return -1 if -1 in counts else sum(counts)

    async def lane_ready_count(self, lane: str) -> int:
        """Messages ready in the RabbitMQ queue ``lane``; -1 when the broker cannot say: not connected, the
        queue does not exist, or no answer within ``answer_seconds``. A passive declare, on a channel of its
        own that is closed after it (``_question``)."""
        try:
            declared = await self._ask(lambda channel: channel.queue_declare(lane, passive=True))
        except Exception:
            return -1
        count = declared.message_count
        return -1 if count is None else int(count)

    async def check(self) -> str:
        """Health: the connection is open and RabbitMQ answers a round trip (a channel opened and closed)
        within ``answer_seconds``; raises otherwise. A broker that stops answering without dropping the
        connection shows at the next check, not once the AMQP heartbeat gives up minutes later."""
        if self._connection is None:
            why = f"; {self._setup_error}" if self._setup_error else ""
            raise ConnectionError(f"not connected to RabbitMQ yet (connecting{why})")
        if not self.connected:
            raise ConnectionError("RabbitMQ connection is closed (reconnecting)")
        try:
            await self._ask(_round_trip)
        except TimeoutError as exc:
            detail = str(exc) or f"no reply within {self.answer_seconds:g}s"
            raise ConnectionError(f"RabbitMQ does not answer ({detail})") from None
        return "connected"
