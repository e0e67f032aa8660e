"""Admission of requests to the backend: a bound on how many wait, and a memory budget they share.

A request is admitted before its image is decoded, weighted by the most memory it will hold at once
(``processor.weigh``: the codec's copies, each step's input, output and working memory beside the decoded
input, the encoded file), known from the header and the steps' parameters. Requests wait in
turn (first come, first served) for their share of the budget, each within its deadline; a request larger
than the whole budget is refused at once, and beyond ``max_pending`` admitted or waiting requests new ones
are shed with RESOURCE_EXHAUSTED and a retry delay, as are those that would wait while the waiting ones hold
half the budget's bytes in their inputs already (those bytes are in memory, outside the budget).

A :class:`Ticket` is given back by its caller once the reply is serialised, or when the caller fails or goes
away; work already started for it in a thread keeps its share until that work has really ended, and is
told (``Ticket.cancel``) to stop at its next step.

The budget itself (first come, first served, the deadline, the refusal of a request too large, a share given back
when its last owner lets go) is :class:`mesh.kit.memory_budget.MemoryBudget`; admission adds the bound on
pending requests, the cancel flag and the threads' shares.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import threading
from typing import Any

from prometheus_client import Counter

from mesh.kit import errors
from mesh.kit.memory_budget import MemoryBudget, MemoryHold

PIPELINES_REJECTED = Counter(
    "mesh_image_pipelines_rejected_total", "Pipelines refused because too many were queued.", ["device"]
)
SHED_RETRY_SECONDS = 0.5


class Ticket:
    """One admitted request's place and share of the memory budget."""

    def __init__(self, hold: MemoryHold, loop: asyncio.AbstractEventLoop) -> None:
        self.nbytes = hold.size
        self.cancel = threading.Event()
        """Set once the caller has let go: a pipeline still running for it stops before its next step."""
        self._hold = hold
        self._loop = loop
        self._released = False

    def track(self, future: concurrent.futures.Future[Any]) -> None:
        """Keep the ticket's share until ``future`` (work started for it in a thread) is done."""
        self._hold.share()
        loop, hold = self._loop, self._hold

        def done(_: concurrent.futures.Future[Any]) -> None:
            # From the worker thread; a loop already closed (shutdown) has nobody left to give back to.
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(hold.release)

        future.add_done_callback(done)

    def release(self) -> None:
        """The caller is done with it (on the event loop; again is harmless)."""
        if self._released:
            return
        self._released = True
        self.cancel.set()
        self._hold.release()


class _ImageMemory(MemoryBudget):
    """The server's budget for the images its pipelines hold, its refusals in bytes."""

    def too_large(self, size: int, what: str) -> errors.PayloadTooLarge:
        return errors.PayloadTooLarge(
            f"{what} needs {size} bytes of memory, more than this server's whole budget of {self.limit} bytes "
            "for the images it processes at once; send a smaller image (or 8-bit samples), or resize or crop it "
            "in the pipeline's first step"
        )

    def timed_out(self, size: int, what: str, waited: float) -> errors.DeadlineExceeded:
        return errors.DeadlineExceeded(
            f"waited {waited:.1f} s for {size} bytes of the {self.name} ({self.limit - self.held} of "
            f"{self.limit} free); the deadline passed"
        )


class Admission:
    """The requests on one backend and the memory they hold (used from the event loop only)."""

    def __init__(self, *, device: str, max_pending: int, memory_budget_bytes: int) -> None:
        self.device = device
        self.max_pending = max_pending
        # Waiting requests hold their inputs (up to 64 MiB each) outside the budget: at most half of it together.
        self.memory = _ImageMemory(
            memory_budget_bytes,
            name="image memory budget",
            label="image",
            max_carried=memory_budget_bytes // 2,
        )
        # At 0 from the start, so that rate() sees the first refusal (the shedding alert).
        PIPELINES_REJECTED.labels(device)

    @property
    def memory_budget_bytes(self) -> int:
        return self.memory.limit

    @property
    def free_bytes(self) -> int:
        return self.memory.limit - self.memory.held

    @property
    def pending(self) -> int:
        """Requests admitted and not given back (work still running for them included), or waiting for memory."""
        return self.memory.holds + self.memory.waiting

    async def admit(
        self, nbytes: int, what: str, deadline: float | None = None, *, carried: int = 0
    ) -> Ticket:
        """A ticket for a request that will hold ``nbytes`` at most (``what`` describes it in a refusal),
        once its share is free; ``deadline`` (``time.monotonic()``) bounds the wait (DEADLINE_EXCEEDED);
        ``carried``: the bytes of its input as received, held while it waits (shed when the waiters' are
        too many already)."""
        self.memory.check(nbytes, what)  # before the bound: retrying a request too large would not help
        if self.pending >= self.max_pending:
            PIPELINES_REJECTED.labels(self.device).inc()
            raise errors.ResourceExhausted(
                f"{self.pending} pipelines are already queued on the {self.device} backend",
                retry_after_seconds=SHED_RETRY_SECONDS,
            )
        try:
            hold = await self.memory.acquire(nbytes, what=what, deadline=deadline, carried=carried)
        except errors.ResourceExhausted:
            PIPELINES_REJECTED.labels(self.device).inc()
            raise
        return Ticket(hold, asyncio.get_running_loop())
