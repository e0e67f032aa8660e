"""Group commit: operations that callers start at about the same time run as one statement.

Under load, a PostgreSQL round trip and its commit (a WAL flush) cost far more than the rows they carry,
so :class:`GroupCommit` gathers what concurrent callers ask for while the previous batch is in flight and
runs it as one batch. Each caller still waits for, and gets, its own answer, after the batch's transaction
committed: the durability of every caller is unchanged, only the flushes are shared. An idle caller waits
for nothing: its item goes out in the next turn of the event loop, alone.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, TypeVar

Item = TypeVar("Item")
Result = TypeVar("Result")

BatchRunner = Callable[[Sequence[Item]], Awaitable[Sequence[Result]]]


class GroupCommit(Generic[Item, Result]):
    """Runs items in batches through ``run_batch``, which returns one result per item, in order.

    At most ``concurrency`` batches are in flight; items that arrive meanwhile wait for the next one (at
    most ``max_batch`` each). When ``run_batch`` raises, every caller of that batch gets the exception.
    """

    def __init__(
        self, run_batch: BatchRunner[Item, Result], *, max_batch: int = 256, concurrency: int = 1
    ) -> None:
        if max_batch < 1 or concurrency < 1:
            raise ValueError("max_batch and concurrency must be at least 1")
        self._run_batch = run_batch
        self.max_batch = max_batch
        self.concurrency = concurrency
        self._pending: list[tuple[Item, asyncio.Future[Result]]] = []
        self._flushing = 0
        self._tasks: set[asyncio.Task[None]] = set()

    async def run(self, item: Item) -> Result:
        """Run ``item`` in the next batch; returns its result once the batch is done."""
        future: asyncio.Future[Result] = asyncio.get_running_loop().create_future()
        self._pending.append((item, future))
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
            batch = self._pending[: self.max_batch]
            del self._pending[: self.max_batch]
            try:
                results = await self._run_batch([item for item, _ in batch])
                if len(results) != len(batch):
                    raise RuntimeError(f"a batch of {len(batch)} returned {len(results)} results")
            except asyncio.CancelledError:
                # The flusher itself was cancelled (shutdown): nobody will run what is waiting.
                for _, future in [*batch, *self._pending]:
                    future.cancel()
                self._pending.clear()
                raise
            except Exception as exc:
                for _, future in batch:
                    if not future.done():
                        future.set_exception(exc)
                continue
            for (_, future), result in zip(batch, results, strict=True):
                if not future.done():  # its caller may have been cancelled meanwhile
                    future.set_result(result)
