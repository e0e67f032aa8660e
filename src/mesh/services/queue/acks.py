"""Settling a consumer's deliveries with as few frames as possible.

Each positive ack is a frame to write and for RabbitMQ to handle; a busy worker commits outcomes in batches
(see ``batching``), so its acks come in runs. :class:`Acks` sends a run of consecutive delivery tags as one
``basic.ack`` with ``multiple`` set. Only tags the worker asked to ack are ever covered: a multiple ack goes
up to a tag only when every lower tag of the channel was acked or rejected before, so a delivery whose
outcome is not committed yet is never acked on its behalf. Acks that do not extend such a run (an earlier
delivery is still running) go out one by one at once, so a long job never holds later acks back.

Delivery tags count per channel from 1, and a robust connection replaces its channels after a reconnect, so
the bookkeeping is per underlying channel (a worker consumes a job queue's two lanes on two channels: two
independent runs of tags, and a multiple ack never covers the other lane's deliveries); deliveries of a
lost channel cannot be settled (RabbitMQ redelivers them, which fencing makes harmless). A worker starts
the deliveries it holds by priority, not by tag, so acks often arrive out of tag order: those that do not
extend the run go out alone, and the run catches up over them once the gap below is settled.
"""

from __future__ import annotations

import asyncio
import contextlib

from aio_pika.abc import AbstractIncomingMessage
from aiormq.abc import AbstractChannel

from mesh.kit.logging import describe, get_logger

log = get_logger(__name__)


class _ChannelAcks:
    """The settled tags of one channel: every tag up to ``through``, and ``settled`` above it."""

    def __init__(self, channel: AbstractChannel) -> None:
        self.channel = channel
        self.through = 0
        self.settled: set[int] = set()
        self.ready: set[int] = set()
        self.flushing: asyncio.Task[None] | None = None

    async def flush(self) -> None:
        while self.ready:
            ready, self.ready = self.ready, set()
            top = None
            tag = self.through
            while True:
                following = tag + 1
                if following in ready:
                    ready.discard(following)
                    top = following
                elif following in self.settled:
                    self.settled.discard(following)
                else:
                    break
                tag = following
            self.through = tag
            if top is not None:
                await self.channel.basic_ack(delivery_tag=top, multiple=True)
            for straggler in sorted(ready):
                await self.channel.basic_ack(delivery_tag=straggler)
                self.settled.add(straggler)


class Acks:
    """Acks (grouped) and rejects (one by one) of the deliveries of one consumer."""

    def __init__(self) -> None:
        self._channels: dict[int, _ChannelAcks] = {}

    def _state(self, message: AbstractIncomingMessage) -> _ChannelAcks | None:
        try:
            channel = message.channel
        except Exception:  # closed: RabbitMQ redelivers what it held
            return None
        state = self._channels.get(id(channel))
        if state is None or state.channel is not channel:
            for key in [k for k, s in self._channels.items() if s.channel.is_closed]:
                del self._channels[key]
            state = self._channels[id(channel)] = _ChannelAcks(channel)
        return state

    def ack(self, message: AbstractIncomingMessage) -> None:
        """Ack ``message`` soon (with the other acks of this turn of the event loop)."""
        state = self._state(message)
        if state is None or message.delivery_tag is None:
            log.info("could not ack a dispatch (channel closed); it will be redelivered")
            return
        state.ready.add(message.delivery_tag)
        if state.flushing is None or state.flushing.done():
            state.flushing = asyncio.get_running_loop().create_task(self._flush(state))

    async def reject(self, message: AbstractIncomingMessage, *, requeue: bool) -> None:
        """Reject ``message`` now (requeue: hand it back; else dead-letter it)."""
        state = self._state(message)
        try:
            await message.reject(requeue=requeue)
        except Exception as exc:
            log.info(
                "could not reject a dispatch (channel closed); it will be redelivered", error=describe(exc)
            )
            return
        if state is not None and message.delivery_tag is not None:
            state.settled.add(message.delivery_tag)

    async def drain(self) -> None:
        """Wait until the acks asked for so far are written."""
        for state in list(self._channels.values()):
            if state.flushing is not None:
                with contextlib.suppress(Exception):
                    await state.flushing

    async def _flush(self, state: _ChannelAcks) -> None:
        # Runs after the tasks woken with this one had their turn, so their acks join it.
        try:
            await state.flush()
        except Exception as exc:
            log.info(
                "could not ack dispatches (channel closed); they will be redelivered", error=describe(exc)
            )
            state.ready.clear()
