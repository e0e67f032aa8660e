"""Dynamic batching: concurrent requests for one model version are grouped and computed off the event loop.

A :class:`DynamicBatcher` queues items; its loop takes the oldest live item, waits for a free model instance,
then keeps adding items until the batch is full or ``max_queue_delay`` has passed since the oldest one was
queued (Triton's rule). While every instance is busy, requests pile up and the next batch is larger: that is
where batching gains its throughput. The batch function runs in a thread of the model's executor.

A request whose caller went away (cancellation) or whose deadline passed while queued is dropped before
compute; its waiter gets ``CANCELLED`` or ``DEADLINE_EXCEEDED``. When a batch function fails on a batch of
several items, each item is retried alone, so that one bad input does not fail its neighbours.

:class:`ModelScheduler` owns one model version's instances (executor threads) and keeps a batcher per
operation and parameter set, because only requests with equal parameters can share a batch. A batcher lives
while some request of its key is waiting for it and is retired when the last one has its answer, so that
parameter sets seen once do not keep a batcher (and its loop task) for ever. ``max_queue_size`` bounds the
items queued in all of a version's batchers together: per batcher, a client that varied a parameter's value
had an unbounded queue.

The scheduler's :class:`ModelMemory` (a :class:`mesh.kit.memory_budget.MemoryBudget`) bounds the bytes of
decoded images its requests hold at once. A request takes its share before it decodes (the size is known from the
image's header) and gives it back once it has its answer and the batch that computed it is done: a handful of
small PNGs of huge, plain images decoded at once took the service past its memory limit, however short the queue.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import sys
import time
from collections.abc import Callable, Hashable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Generic, Protocol, TypeVar

from mesh.kit.errors import DeadlineExceeded, Internal, PayloadTooLarge, ResourceExhausted, Unavailable
from mesh.kit.logging import get_logger
from mesh.kit.memory_budget import MemoryBudget, MemoryHold

log = get_logger(__name__)

KeyT = TypeVar("KeyT", bound=Hashable)
ItemT = TypeVar("ItemT")
OutputT = TypeVar("OutputT")

MIB = 2**20


@dataclass(frozen=True)
class BatchResult(Generic[OutputT]):
    """One item's output and what it cost."""

    output: OutputT
    """The batch function's output for this item."""

    queue_seconds: float
    """Time from submit until its batch started computing."""

    compute_seconds: float
    """Wall time of the batch computation it took part in."""

    batch_size: int
    """Number of items in that batch."""


class BatchObserver(Protocol):
    """Told about every executed batch (statistics, metrics)."""

    def batch_executed(self, size: int, compute_seconds: float) -> None:
        """A batch of ``size`` items took ``compute_seconds``."""
        ...


class NotQueued(Exception):
    """Marks a scheduler's refusal of a request before it entered the batch queue (a full queue, a deadline
    already past, a closing batcher): it never waited there, so the queue's statistics leave it out."""


class QueueFull(ResourceExhausted, NotQueued):
    """The queue holds as many requests as it may."""


class ExpiredBeforeQueue(DeadlineExceeded, NotQueued):
    """The request's deadline passed before it could be queued."""


class Closing(Unavailable, NotQueued):
    """The batcher is shutting down and takes no more requests."""


def queue_full(name: str, size: int) -> QueueFull:
    """The refusal of a request that finds ``size`` requests queued already: one wording for every bound."""
    return QueueFull(f"{name}: {size} requests are queued already", retry_after_seconds=0.1)


def _mib(size: int) -> str:
    return f"{size / MIB:.1f} MiB"


class ModelMemory(MemoryBudget):
    """Bytes of decoded images one model version's requests may hold at once (a :class:`MemoryBudget` named
    after the version), at most ``max_waiters`` of them waiting, carrying at most half its bytes in their inputs
    together; its refusals speak of decoded images in MiB."""

    def __init__(self, limit: int, *, max_waiters: int, name: str) -> None:
        # Waiting requests hold their inputs as received outside the budget: at most half of it together.
        super().__init__(limit, name=name, max_carried=limit // 2)
        self._max_waiters = max_waiters

    def too_large(self, size: int, what: str) -> PayloadTooLarge:
        return PayloadTooLarge(
            f"{what} takes {_mib(size)} decoded; {self.name} holds at most {_mib(self.limit)} of decoded images "
            "at once; send a smaller image"
        )

    def timed_out(self, size: int, what: str, waited: float) -> DeadlineExceeded:
        return DeadlineExceeded(
            f"deadline exceeded after {waited:.3f}s waiting for memory to decode {what} ({_mib(size)}; "
            f"{_mib(self.held)} of {_mib(self.limit)} held by other requests)"
        )

    def may_wait(self, size: int, what: str) -> None:
        if self.waiting >= self._max_waiters:
            raise ResourceExhausted(
                f"{self.name}: {self.waiting} requests wait for memory already ({_mib(self.held)} of "
                f"{_mib(self.limit)} of decoded images held; {what} needs {_mib(size)})",
                retry_after_seconds=0.5,
            )


@dataclass(eq=False)
class _Pending(Generic[ItemT, OutputT]):
    item: ItemT
    future: asyncio.Future[BatchResult[OutputT]]
    enqueued: float
    deadline: float | None
    hold: MemoryHold | None = None

    def expired(self, now: float) -> bool:
        return self.deadline is not None and now >= self.deadline


@dataclass
class _Outcome(Generic[OutputT]):
    outputs: list[OutputT | BaseException] = field(default_factory=list)
    seconds: float = 0.0


class DynamicBatcher(Generic[ItemT, OutputT]):
    """Groups submitted items into batches for ``batch_fn`` (which runs in ``executor``)."""

    def __init__(
        self,
        batch_fn: Callable[[Sequence[ItemT]], Sequence[OutputT]],
        *,
        max_batch_size: int,
        max_queue_delay_seconds: float,
        max_queue_size: int,
        executor: ThreadPoolExecutor,
        instances: asyncio.Semaphore,
        observer: BatchObserver | None = None,
        name: str = "batcher",
    ) -> None:
        if max_batch_size < 1:
            raise ValueError("max_batch_size must be >= 1")
        self._batch_fn = batch_fn
        self._max_batch = max_batch_size
        self._max_delay = max(0.0, max_queue_delay_seconds)
        self._max_queue = max_queue_size
        self._executor = executor
        self._instances = instances
        self._observer = observer
        self._name = name
        self._queue: collections.deque[_Pending[ItemT, OutputT]] = collections.deque()
        self._wake = asyncio.Event()
        self._loop_task: asyncio.Task[None] | None = None
        self._running: set[asyncio.Task[None]] = set()
        self._forming: list[_Pending[ItemT, OutputT]] = []
        self._closed = False

    @property
    def queued(self) -> int:
        """Items waiting for a batch (including dropped ones not yet swept)."""
        return len(self._queue)

    @property
    def waiting(self) -> int:
        """Items not computing yet: queued, or forming the next batch while it waits for a free instance (the
        oldest item of each batcher does)."""
        return len(self._queue) + sum(1 for pending in self._forming if not pending.future.done())

    async def submit(
        self, item: ItemT, *, deadline: float | None = None, hold: MemoryHold | None = None
    ) -> BatchResult[OutputT]:
        """Queue ``item`` and wait for its output; ``deadline`` is a ``time.monotonic()`` instant.

        Raises DeadlineExceeded when the deadline passes first, ResourceExhausted when the queue is full,
        Unavailable when the batcher is closing, and whatever the batch function raised for this item; a
        refusal before the item was queued is also a :class:`NotQueued`.
        Cancelling the caller drops the item if it has not started computing. ``hold``, the memory the item
        holds, is shared by the batch that computes it until that batch is done.
        """
        if self._closed:
            raise Closing(f"{self._name} is shutting down")
        now = time.monotonic()
        if deadline is not None and deadline <= now:
            raise ExpiredBeforeQueue("deadline exceeded before the request was queued")
        if len(self._queue) >= self._max_queue:
            self.sweep(now)
            if len(self._queue) >= self._max_queue:
                raise queue_full(self._name, self._max_queue)
        future: asyncio.Future[BatchResult[OutputT]] = asyncio.get_running_loop().create_future()
        self._queue.append(_Pending(item, future, now, deadline, hold))
        self._wake.set()
        self._start()
        timeout = None if deadline is None else deadline - now
        try:
            # wait_for cancels the future on timeout or when we are cancelled: the loop then skips it.
            return await asyncio.wait_for(future, timeout)
        except TimeoutError:
            raise DeadlineExceeded(
                f"deadline exceeded after {time.monotonic() - now:.3f}s waiting for the model"
            ) from None

    async def close(self) -> None:
        """Stop taking items, let running batches finish, fail what is still queued with UNAVAILABLE."""
        self._closed = True
        self._wake.set()
        if self._loop_task is not None:
            self._loop_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._loop_task
        if self._running:
            await asyncio.gather(*self._running, return_exceptions=True)
        while self._queue:
            pending = self._queue.popleft()
            if not pending.future.done():
                pending.future.set_exception(Unavailable(f"{self._name} shut down"))

    def _start(self) -> None:
        if self._loop_task is None or self._loop_task.done():
            self._loop_task = asyncio.create_task(self._run(), name=f"{self._name}-loop")

    def sweep(self, now: float) -> None:
        """Drop cancelled items and fail expired ones, keeping order."""
        live: collections.deque[_Pending[ItemT, OutputT]] = collections.deque()
        for pending in self._queue:
            if self._alive(pending, now):
                live.append(pending)
        self._queue = live

    @staticmethod
    def _alive(pending: _Pending[ItemT, OutputT], now: float) -> bool:
        if pending.future.done():
            return False
        if pending.expired(now):
            pending.future.set_exception(DeadlineExceeded("deadline exceeded while queued for a batch"))
            return False
        return True

    def _pop_live(self) -> _Pending[ItemT, OutputT] | None:
        now = time.monotonic()
        while self._queue:
            pending = self._queue.popleft()
            if self._alive(pending, now):
                return pending
        return None

    async def _next_live(self) -> _Pending[ItemT, OutputT]:
        while True:
            pending = self._pop_live()
            if pending is not None:
                return pending
            self._wake.clear()
            await self._wake.wait()

    async def _run(self) -> None:
        try:
            while not self._closed:
                self._forming = [await self._next_live()]
                # Wait for a free instance first: requests arriving meanwhile join this batch.
                await self._instances.acquire()
                try:
                    await self._gather()
                except BaseException:
                    self._instances.release()
                    raise
                batch, self._forming = self._forming, []
                if not batch:
                    self._instances.release()
                    continue
                for pending in batch:
                    if pending.hold is not None:
                        pending.hold.share()
                task = asyncio.create_task(self._execute(batch), name=f"{self._name}-batch")
                self._running.add(task)
                task.add_done_callback(self._running.discard)
        finally:
            # Cancelled (closing) with items in hand: back to the queue, where close() answers them.
            self._queue.extendleft(reversed(self._forming))
            self._forming = []

    async def _gather(self) -> None:
        """Fill ``_forming`` up to the batch size or until the oldest item has waited ``max_queue_delay``."""
        batch = self._forming
        flush_at = batch[0].enqueued + self._max_delay
        while len(batch) < self._max_batch:
            pending = self._pop_live()
            if pending is not None:
                batch.append(pending)
                continue
            remaining = flush_at - time.monotonic()
            if remaining <= 0:
                break
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), remaining)
        # Callers may have gone while we waited for an instance or for more items.
        now = time.monotonic()
        self._forming = [p for p in batch if self._alive(p, now)]

    async def _execute(self, batch: list[_Pending[ItemT, OutputT]]) -> None:
        started = time.monotonic()
        try:
            outcome = await asyncio.get_running_loop().run_in_executor(
                self._executor, self._compute, [p.item for p in batch]
            )
        except BaseException as exc:  # the executor itself failed (shut down)
            outcome = _Outcome([exc] * len(batch), time.monotonic() - started)
        finally:
            self._instances.release()
            for pending in batch:
                if pending.hold is not None:
                    pending.hold.release()
        if self._observer is not None:
            self._observer.batch_executed(len(batch), outcome.seconds)
        for pending, output in zip(batch, outcome.outputs, strict=True):
            if pending.future.done():
                continue
            if isinstance(output, BaseException):
                pending.future.set_exception(output)
            else:
                pending.future.set_result(
                    BatchResult(output, started - pending.enqueued, outcome.seconds, len(batch))
                )

    def _compute(self, items: list[ItemT]) -> _Outcome[OutputT]:
        """Runs in a worker thread: the batch, or each item alone when the batch fails."""
        started = time.perf_counter()
        outcome: _Outcome[OutputT] = _Outcome()
        try:
            outcome.outputs = list(self._checked(items))
        except Exception as exc:
            if len(items) == 1:
                outcome.outputs = [exc]
            else:
                log.warning(
                    "batch failed, retrying its items one by one", batcher=self._name, error=repr(exc)
                )
                for item in items:
                    try:
                        outcome.outputs.extend(self._checked([item]))
                    except Exception as item_exc:
                        outcome.outputs.append(item_exc)
        outcome.seconds = time.perf_counter() - started
        return outcome

    def _checked(self, items: list[ItemT]) -> Sequence[OutputT]:
        outputs = self._batch_fn(items)
        if len(outputs) != len(items):
            raise Internal(f"{self._name}: the model returned {len(outputs)} outputs for {len(items)} inputs")
        return outputs


class ModelScheduler(Generic[KeyT, ItemT, OutputT]):
    """One model version's instances, shared by a batcher per (operation, parameters) key."""

    def __init__(
        self,
        batch_fn: Callable[[KeyT, Sequence[ItemT]], Sequence[OutputT]],
        *,
        max_batch_size: int,
        max_queue_delay_seconds: float,
        max_queue_size: int,
        instance_count: int = 1,
        max_image_bytes: int | None = None,
        observer: BatchObserver | None = None,
        name: str = "model",
    ) -> None:
        self._batch_fn = batch_fn
        self._max_batch = max_batch_size
        self._max_delay = max_queue_delay_seconds
        self._max_queue = max_queue_size
        self._observer = observer
        self._name = name
        self._executor = ThreadPoolExecutor(max_workers=instance_count, thread_name_prefix=name)
        self._instances = asyncio.Semaphore(instance_count)
        self._batchers: dict[KeyT, DynamicBatcher[ItemT, OutputT]] = {}
        # Requests inside submit() per key: the batcher is retired when its count falls to zero.
        self._users: dict[KeyT, int] = {}
        self._retiring: set[asyncio.Task[None]] = set()
        self.memory = ModelMemory(
            sys.maxsize if max_image_bytes is None else max_image_bytes, max_waiters=max_queue_size, name=name
        )
        """Bytes of decoded images this version's requests hold: taken before decoding (see Predictor)."""

    @property
    def waiting(self) -> int:
        """Items not computing yet, in every batcher (including dropped ones not yet swept from a queue)."""
        return sum(batcher.waiting for batcher in self._batchers.values())

    async def submit(
        self, key: KeyT, item: ItemT, *, deadline: float | None = None, hold: MemoryHold | None = None
    ) -> BatchResult[OutputT]:
        """Batch ``item`` with others of the same ``key``; see :meth:`DynamicBatcher.submit`. ResourceExhausted
        when ``max_queue_size`` items are queued already, whatever their keys."""
        if self.waiting >= self._max_queue:
            now = time.monotonic()
            for each in self._batchers.values():
                each.sweep(now)
            if self.waiting >= self._max_queue:
                raise queue_full(self._name, self._max_queue)
        batcher = self._batchers.get(key)
        if batcher is None:
            batcher = DynamicBatcher(
                functools.partial(self._batch_fn, key),
                max_batch_size=self._max_batch,
                max_queue_delay_seconds=self._max_delay,
                max_queue_size=self._max_queue,
                executor=self._executor,
                instances=self._instances,
                observer=self._observer,
                name=f"{self._name}[{key}]",
            )
            self._batchers[key] = batcher
        self._users[key] = self._users.get(key, 0) + 1
        try:
            return await batcher.submit(item, deadline=deadline, hold=hold)
        finally:
            self._release(key, batcher)

    def _release(self, key: KeyT, batcher: DynamicBatcher[ItemT, OutputT]) -> None:
        """Retire ``batcher`` when no request of ``key`` is left in it.

        The count and the dictionary change together, with no await between: a request arriving later finds no
        batcher and makes a new one, never one that is closing. A batch still computing for a caller that went
        away finishes in the retired batcher's close().
        """
        self._users[key] -= 1
        if self._users[key]:
            return
        del self._users[key], self._batchers[key]
        closing = asyncio.create_task(batcher.close(), name=f"{self._name}[{key}]-retire")
        self._retiring.add(closing)
        closing.add_done_callback(self._retiring.discard)

    async def close(self) -> None:
        """Close every batcher (and wait for retired ones to finish closing), then the executor."""
        await asyncio.gather(*(b.close() for b in self._batchers.values()), *self._retiring)
        self._executor.shutdown(wait=False, cancel_futures=True)
