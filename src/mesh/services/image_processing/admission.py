"""Admission of requests to the backend: a bound on how many wait, and a memory budget they share.

A request is admitted before its image is decoded, weighted by the bytes of the largest image it will hold
(the decoded input, or a step's output), known from the header and the steps' parameters. Requests wait in
turn (first come, first served) for their share of the budget, each within its deadline; a request larger
than the whole budget is refused at once, and beyond ``max_pending`` admitted or waiting requests new ones
are shed with RESOURCE_EXHAUSTED and a retry delay.

A :class:`Ticket` is given back by its caller once the reply is serialised, or when the caller fails or goes
away; work already started for it in a thread keeps its share until that work has really ended, and is
told (``Ticket.cancel``) to stop at its next step.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import threading
import time
from typing import Any

from prometheus_client import Counter

from mesh.kit import errors

PIPELINES_REJECTED = Counter(
    "mesh_image_pipelines_rejected_total", "Pipelines refused because too many were queued.", ["device"]
)
SHED_RETRY_SECONDS = 0.5


class Ticket:
    """One admitted request's place and share of the memory budget."""

    def __init__(self, admission: Admission, nbytes: int) -> None:
        self.nbytes = nbytes
        self.cancel = threading.Event()
        """Set once the caller has let go: a pipeline still running for it stops before its next step."""
        self._admission = admission
        self._holders = 1
        self._released = False

    def track(self, future: concurrent.futures.Future[Any]) -> None:
        """Keep the ticket's share until ``future`` (work started for it in a thread) is done."""
        self._holders += 1
        loop = self._admission.loop

        def done(_: concurrent.futures.Future[Any]) -> None:
            # From the worker thread; a loop already closed (shutdown) has nobody left to give back to.
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(self._drop)

        future.add_done_callback(done)

    def release(self) -> None:
        """The caller is done with it (on the event loop; again is harmless)."""
        if self._released:
            return
        self._released = True
        self.cancel.set()
        self._drop()

    def _drop(self) -> None:
        self._holders -= 1
        if self._holders == 0:
            self._admission._give_back(self.nbytes)


class Admission:
    """The requests on one backend and the memory they hold (used from the event loop only)."""

    def __init__(self, *, device: str, max_pending: int, memory_budget_bytes: int) -> None:
        self.device = device
        self.max_pending = max_pending
        self.memory_budget_bytes = memory_budget_bytes
        self.pending = 0
        self.free_bytes = memory_budget_bytes
        self._waiters: collections.deque[tuple[int, asyncio.Future[None]]] = collections.deque()
        self._loop: asyncio.AbstractEventLoop | None = None
        # At 0 from the start, so that rate() sees the first refusal (the shedding alert).
        PIPELINES_REJECTED.labels(device)

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        assert self._loop is not None, "nothing was admitted yet"
        return self._loop

    async def admit(self, nbytes: int, what: str, deadline: float | None = None) -> Ticket:
        """A ticket for a request whose largest image is ``nbytes`` (``what`` describes it in a refusal),
        once its share is free; ``deadline`` (``time.monotonic()``) bounds the wait (DEADLINE_EXCEEDED)."""
        if nbytes > self.memory_budget_bytes:
            raise errors.PayloadTooLarge(
                f"{what} needs {nbytes} bytes of memory, more than this server's whole budget of "
                f"{self.memory_budget_bytes} bytes for the images it processes at once; send a smaller image "
                "(or 8-bit samples), or resize or crop it in the pipeline's first step"
            )
        if self.pending >= self.max_pending:
            PIPELINES_REJECTED.labels(self.device).inc()
            raise errors.ResourceExhausted(
                f"{self.pending} pipelines are already queued on the {self.device} backend",
                retry_after_seconds=SHED_RETRY_SECONDS,
            )
        self._loop = asyncio.get_running_loop()
        self.pending += 1
        try:
            await self._reserve(nbytes, deadline)
        except BaseException:
            self.pending -= 1
            raise
        return Ticket(self, nbytes)

    async def _reserve(self, nbytes: int, deadline: float | None) -> None:
        if not self._waiters and nbytes <= self.free_bytes:
            self.free_bytes -= nbytes
            return
        waiter = self.loop.create_future()
        self._waiters.append((nbytes, waiter))
        started = time.monotonic()
        try:
            async with asyncio.timeout(None if deadline is None else deadline - started):
                await waiter
        except BaseException as error:
            if waiter.done() and not waiter.cancelled():
                self.free_bytes += nbytes  # granted just as the caller gave up
            with contextlib.suppress(ValueError):
                self._waiters.remove((nbytes, waiter))
            self._wake()
            if isinstance(error, TimeoutError):
                raise errors.DeadlineExceeded(
                    f"waited {time.monotonic() - started:.1f} s for {nbytes} bytes of the image memory "
                    f"budget ({self.free_bytes} of {self.memory_budget_bytes} free); the deadline passed"
                ) from None
            raise

    def _give_back(self, nbytes: int) -> None:
        self.pending -= 1
        self.free_bytes += nbytes
        self._wake()

    def _wake(self) -> None:
        # In turn: a large request at the head is not overtaken for ever by small ones behind it.
        while self._waiters and self._waiters[0][0] <= self.free_bytes:
            nbytes, waiter = self._waiters.popleft()
            if not waiter.done():
                self.free_bytes -= nbytes
                waiter.set_result(None)
