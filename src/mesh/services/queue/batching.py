"""Group commit: operations that callers start at about the same time run as one statement.

Under load, a PostgreSQL round trip and its commit (a WAL flush) cost far more than the rows they carry,
so :class:`GroupCommit` gathers what concurrent callers ask for while the previous batch is in flight and
runs it as one batch. Each caller still waits for, and gets, its own answer, after the batch's transaction
committed: the durability of every caller is unchanged, only the flushes are shared. An idle caller waits
for nothing: its item goes out in the next turn of the event loop, alone.

A caller may give its item a deadline (``time.monotonic()``): its window starts when it asks, not when its batch
starts, so an item that waited behind a batch PostgreSQL left unanswered is not given a window of its own after
it (a submit answered after two windows, and one more per further batch). A batch runs until the earliest
deadline of its items; an item left with less than ``least_seconds`` when its batch starts is answered
``spent()`` alone, with nothing sent for it, rather than cutting the batch's time to nothing for the items that
still have theirs (after PostgreSQL was silent for a window, the next batch holds an item that arrived just after
the stalled one and items with most of their window left; cut to the first one's few milliseconds, all failed
though PostgreSQL answered again).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

Item = TypeVar("Item")
Result = TypeVar("Result")

BatchRunner = Callable[[Sequence[Item], float | None], Awaitable[Sequence[Result]]]
"""Runs a batch's items by the batch's deadline (the earliest of its items'; None when none has one) and returns
one result per item, in order."""


@dataclass(frozen=True)
class _Waiting(Generic[Item, Result]):
    item: Item
    deadline: float | None
    future: asyncio.Future[Result]


class GroupCommit(Generic[Item, Result]):
    """Runs items in batches through ``run_batch``, which returns one result per item, in order.

    At most ``concurrency`` batches are in flight; items that arrive meanwhile wait for the next one (at
    most ``max_batch`` each). When ``run_batch`` raises, every caller of that batch gets the exception; a caller
    whose deadline passed before its batch started gets ``spent()``.
    """

    def __init__(
        self,
        run_batch: BatchRunner[Item, Result],
        *,
        max_batch: int = 256,
        concurrency: int = 1,
        spent: Callable[[], Exception] = TimeoutError,
        least_seconds: float = 0.0,
    ) -> None:
        if max_batch < 1 or concurrency < 1:
            raise ValueError("max_batch and concurrency must be at least 1")
        self._run_batch = run_batch
        self.max_batch = max_batch
        self.concurrency = concurrency
        self._spent = spent
        self.least_seconds = least_seconds
        self._pending: list[_Waiting[Item, Result]] = []
        self._flushing = 0
        self._tasks: set[asyncio.Task[None]] = set()

    async def run(self, item: Item, *, deadline: float | None = None) -> Result:
        """Run ``item`` in the next batch; returns its result once the batch is done. ``deadline``
        (``time.monotonic()``): the batch tries no longer, and with less than ``least_seconds`` left when the
        batch starts, ``spent()``."""
        future: asyncio.Future[Result] = asyncio.get_running_loop().create_future()
        self._pending.append(_Waiting(item, deadline, future))
        if self._flushing < self.concurrency:
            # Counted here and uncounted by the flusher itself as it runs out of work (not by a done
            # callback, which runs a turn later: an item arriving in between would wait forever).
            self._flushing += 1
            flusher = asyncio.create_task(self._flush())
            self._tasks.add(flusher)
            flusher.add_done_callback(self._tasks.discard)
        return await future

    async def _flush(self) -> None:
        try:
            await self._flush_pending()
        finally:
            self._flushing -= 1

    async def _flush_pending(self) -> None:
        while self._pending:
            batch = self._live(self._pending[: self.max_batch])
            del self._pending[: self.max_batch]
            if not batch:
                continue
            deadlines = [waiting.deadline for waiting in batch if waiting.deadline is not None]
            try:
                results = await self._run_batch(
                    [waiting.item for waiting in batch], min(deadlines) if deadlines else None
                )
                if len(results) != len(batch):
                    raise RuntimeError(f"a batch of {len(batch)} returned {len(results)} results")
            except asyncio.CancelledError:
                # The flusher itself was cancelled (shutdown): nobody will run what is waiting.
                for waiting in [*batch, *self._pending]:
                    waiting.future.cancel()
                self._pending.clear()
                raise
            except Exception as exc:
                for waiting in batch:
                    if not waiting.future.done():
                        waiting.future.set_exception(exc)
                continue
            for waiting, result in zip(batch, results, strict=True):
                if not waiting.future.done():  # its caller may have been cancelled meanwhile
                    waiting.future.set_result(result)

    def _live(self, batch: list[_Waiting[Item, Result]]) -> list[_Waiting[Item, Result]]:
        """The items of ``batch`` still to run: the others, their time (all but ``least_seconds`` of it) spent
        while they waited, are answered ``spent()`` (nothing is sent for them; their callers are told at once)."""
        now = time.monotonic() + self.least_seconds
        live = []
        for waiting in batch:
            if waiting.deadline is not None and waiting.deadline <= now:
                if not waiting.future.done():
                    waiting.future.set_exception(self._spent())
            else:
                live.append(waiting)
        return live
