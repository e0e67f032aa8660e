"""RabbitMQ through aio-pika: a robust connection, the job queues' topology, confirmed publishing, consuming.

The connection reconnects by itself (``connect_robust``) and restores its channels, declarations and
consumers. A job queue is two RabbitMQ queues, its lanes (``topology``): ``declare`` and ``ready_count``
take the job queue and cover both lanes, ``publish`` takes a lane, ``consume`` consumes both lanes.
Publishing uses a channel with publisher confirms and ``on_return_raises``, persistent delivery and
``mandatory``: ``publish`` returns only once the broker has taken responsibility for the message, and raises
when it did not (a nack, a return because no queue is bound, a closed connection, a timeout).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping

import aio_pika
import aiormq
from aio_pika.abc import (
    AbstractChannel,
    AbstractIncomingMessage,
    AbstractQueue,
    AbstractRobustConnection,
    DeliveryMode,
)
from pamqp import commands as spec

from mesh.services.queue.topology import (
    dead_letter_exchange,
    dead_letter_queue,
    lanes,
    queue_arguments,
)

MessageHandler = Callable[[AbstractIncomingMessage], Awaitable[None]]
CONTENT_TYPE = "application/x-protobuf"
PERSISTENT = int(DeliveryMode.PERSISTENT)


class Broker:
    """One robust AMQP connection with a confirmed publishing channel and consumer channels."""

    def __init__(
        self, url: str, *, delivery_limit: int, reconnect_seconds: float = 1.0, name: str = "mesh"
    ) -> None:
        self.url = url
        self.delivery_limit = delivery_limit
        self.reconnect_seconds = reconnect_seconds
        self.name = name
        self._connection: AbstractRobustConnection | None = None
        self._publisher: AbstractChannel | None = None
        self._declared: set[str] = set()
        self._declare_lock = asyncio.Lock()
        self._consumer_channels: list[AbstractChannel] = []

    @property
    def connected(self) -> bool:
        """True while the connection is up: a robust connection is not ``is_closed`` while it reconnects
        (only once closed on purpose), so health read "connected" through a whole broker outage."""
        connection = self._connection
        return connection is not None and not connection.is_closed and connection.connected.is_set()

    async def connect(self) -> None:
        """Open the connection and the publishing channel (retrying until RabbitMQ answers)."""
        while self._connection is None:
            try:
                self._connection = await aio_pika.connect_robust(
                    self.url,
                    reconnect_interval=self.reconnect_seconds,
                    client_properties={"connection_name": self.name},
                )
            except (ConnectionError, OSError, aio_pika.exceptions.AMQPError):
                await asyncio.sleep(self.reconnect_seconds)
        self._publisher = await self._connection.channel(publisher_confirms=True, on_return_raises=True)

    async def close(self) -> None:
        """Close channels and the connection."""
        if self._connection is not None:
            await self._connection.close()
        self._connection = None
        self._publisher = None
        self._declared.clear()

    def _channel(self) -> AbstractChannel:
        if self._publisher is None:
            raise ConnectionError("the broker is not connected")
        return self._publisher

    async def declare(self, queue: str) -> None:
        """Declare job queue ``queue``: both lanes (quorum, delivery limit, dead-lettering, the same
        arguments) with their dead-letter exchange and queue."""
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

    async def _consumer_channel(self, queue: str, prefetch: int) -> AbstractChannel:
        """A channel of its own for consuming from job queue ``queue`` (declared first) with a per-consumer
        ``prefetch``, kept to be closed with the broker."""
        if self._connection is None:
            raise ConnectionError("the broker is not connected")
        await self.declare(queue)
        channel = await self._connection.channel()
        await channel.set_qos(prefetch_count=prefetch)
        self._consumer_channels.append(channel)
        return channel

    async def consume(
        self, queue: str, handler: MessageHandler, *, prefetch: int
    ) -> list[tuple[AbstractQueue, str]]:
        """Consume both lanes of job queue ``queue``, each on a channel of its own with ``prefetch``
        unacknowledged messages at most (so up to twice ``prefetch`` in all); returns each lane's queue and
        consumer tag (to stop consuming with ``queue.cancel(tag)``), the normal lane first."""
        consumers = []
        for lane in lanes(queue):
            channel = await self._consumer_channel(queue, prefetch)
            declared = await channel.declare_queue(
                lane, durable=True, arguments=queue_arguments(queue, self.delivery_limit)
            )
            tag = await declared.consume(handler, no_ack=False)
            consumers.append((declared, tag))
        return consumers

    async def consume_dead_letters(self, queue: str, handler: MessageHandler, *, prefetch: int) -> None:
        """Consume ``queue``'s dead-letter queue."""
        channel = await self._consumer_channel(queue, prefetch)
        dead = await channel.declare_queue(
            dead_letter_queue(queue), durable=True, arguments={"x-queue-type": "quorum"}
        )
        await dead.consume(handler, no_ack=False)

    async def ready_count(self, queue: str) -> int:
        """Messages ready in job queue ``queue``, both lanes (-1 when the broker cannot say)."""
        counts = [await self.lane_ready_count(lane) for lane in lanes(queue)]
        return -1 if -1 in counts else sum(counts)

    async def lane_ready_count(self, lane: str) -> int:
        """Messages ready in the RabbitMQ queue ``lane`` (-1 when the broker cannot say).

        A passive declare of a missing queue closes its channel, so it runs on a throwaway channel, never on
        the publishing one."""
        if self._connection is None or self._connection.is_closed:
            return -1
        try:
            channel = await self._connection.channel(publisher_confirms=False)
        except Exception:
            return -1
        try:
            declared = await channel.declare_queue(lane, passive=True)
            count = declared.declaration_result.message_count
            return -1 if count is None else int(count)
        except Exception:
            return -1
        finally:
            if not channel.is_closed:
                await channel.close()

    async def check(self) -> str:
        """Health: the connection is open (raises otherwise)."""
        if self._connection is None:
            raise ConnectionError("not connected to RabbitMQ yet (connecting)")
        if not self.connected:
            raise ConnectionError("RabbitMQ connection is closed (reconnecting)")
        return "connected"
