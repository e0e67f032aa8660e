"""A budget of bytes that requests hold at once, granted first come, first served.

A service weighs a request by the memory it will hold (decoded images, known from their headers) and takes that
share before it allocates anything; the share is given back once every owner of it is done: the request, and
work computing for it that outlives a caller that went away (a batch, a thread). A request larger than the whole
budget is refused at once, since it could never be granted; one that does not fit waits in turn, within its
deadline. The services word the refusals in their own terms by overriding :meth:`MemoryBudget.too_large` and
:meth:`MemoryBudget.timed_out`, and may bound the waiters with :meth:`MemoryBudget.may_wait`.

A request that waits already holds its input as received (an encoded file, a raw frame: up to tens of MB each)
outside the budget. ``max_carried`` bounds those bytes over all the waiters: a request that would take them past
it is shed at once (RESOURCE_EXHAUSTED with a retry delay; the first waiter is always let in), so that a burst of large requests queued behind a full
budget cannot take the process past its memory limit before the budget refuses anything.

Each budget shows on ``/metrics`` by its ``label``: its limit, the bytes held and the requests waiting, read at
scrape time (nothing is counted on the request path). Requests waiting for long mean the budget, not the CPU
or the GPU, bounds the service's throughput.

When a budget that held ``RETURN_MEMORY_AFTER_BYTES`` or more at once empties and then stays empty for
``IDLE_BEFORE_RETURN_SECONDS``, the process gives its free memory back to the system
(:func:`mesh.kit.memory.return_free_memory_soon`): the decoders' buffers for those images were freed into malloc's
heaps, which glibc would otherwise keep (see :mod:`mesh.kit.memory`). Not at once: the trim holds each arena's
lock while it works, stalling every allocation meanwhile, the event loop's included (up to about 200 ms after
1 GiB was freed), so it waits for the process to be idle. Under continuous load it never runs, and need not: the
next images reuse the freed buffers, and the peak does not grow.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import time

from prometheus_client import Gauge

from mesh.kit import errors, memory
from mesh.kit.units import binary_size

BUDGET_LIMIT = Gauge("mesh_memory_budget_limit_bytes", "The memory budget's size.", ["budget"])
BUDGET_HELD = Gauge(
    "mesh_memory_budget_held_bytes", "Bytes of the memory budget held by requests.", ["budget"]
)
BUDGET_WAITING = Gauge(
    "mesh_memory_budget_waiting", "Requests waiting for their share of the memory budget.", ["budget"]
)
BUDGET_CARRIED = Gauge(
    "mesh_memory_budget_waiting_carried_bytes",
    "Bytes the requests waiting for the memory budget hold outside it (their inputs as received).",
    ["budget"],
)


SHED_RETRY_SECONDS = 0.5
"""The retry delay a request shed by a busy budget is told to wait."""

RETURN_MEMORY_AFTER_BYTES = 64 * 1024 * 1024
"""A budget that held this much at once gives the process's free memory back once it has emptied and stayed idle: less is not
worth the page faults of taking it again (a few 1080p photos at a time keep their buffers for the next)."""

IDLE_BEFORE_RETURN_SECONDS = 2.0
"""How long such a budget stays empty before the process gives its free memory back. The trim stalls allocations
for up to about 200 ms, which must not land on a request: a client sending one image at a time leaves the budget
empty for milliseconds between two (its round trip), far below this, while a budget empty for seconds serves
nobody. Memory kept meanwhile is at most the peak the process has just held anyway."""


class MemoryHold:
    """Bytes granted by a :class:`MemoryBudget`, given back when the last of its owners releases them."""

    def __init__(self, budget: MemoryBudget, size: int) -> None:
        self.size = size
        self._budget = budget
        self._owners = 1

    def share(self) -> None:
        """One more owner."""
        self._owners += 1

    def release(self) -> None:
        """One owner fewer; the last one gives the bytes back."""
        self._owners -= 1
        if self._owners == 0:
            self._budget._give_back(self.size)


class MemoryBudget:
    """``limit`` bytes that requests hold at once, granted in arrival order (a large request is not passed over
    by small ones for ever). Used from the event loop only: work in other threads releases its holds through
    ``loop.call_soon_threadsafe``."""

    def __init__(
        self, limit: int, *, name: str, label: str | None = None, max_carried: int | None = None
    ) -> None:
        self.limit = limit
        self.name = name
        """What the budget is for, in the default wording of its refusals."""
        self.max_carried = max_carried
        """Most bytes the waiting requests may carry together (None: no bound)."""
        self.carried = 0
        """Bytes the waiting requests carry now."""
        self.held = 0
        self.holds = 0
        """Holds granted and not given back yet."""
        self._peak = 0
        """The most bytes held at once since the budget last gave memory back."""
        self._idle_timer: asyncio.TimerHandle | None = None
        """The pending return of free memory, once the budget has been empty for long enough."""
        self._waiters: collections.deque[tuple[int, asyncio.Future[None]]] = collections.deque()
        self.label = name if label is None else label
        """The ``budget`` label of its metrics (a later budget of the same label takes its series over)."""
        BUDGET_LIMIT.labels(self.label).set(limit)
        BUDGET_HELD.labels(self.label).set_function(lambda: self.held)
        BUDGET_WAITING.labels(self.label).set_function(lambda: self.waiting)
        BUDGET_CARRIED.labels(self.label).set_function(lambda: self.carried)

    @property
    def waiting(self) -> int:
        """Requests waiting for their share."""
        return len(self._waiters)

    def check(self, size: int, what: str) -> None:
        """:meth:`too_large`'s refusal when ``size`` is more than the whole budget: it could never be granted."""
        if size > self.limit:
            raise self.too_large(size, what)

    async def acquire(
        self, size: int, *, what: str, deadline: float | None = None, carried: int = 0
    ) -> MemoryHold:
        """``size`` bytes for the request ``what`` describes, waiting until the deadline (a ``time.monotonic()``
        instant) for others to give theirs back; ``carried``: the bytes it holds meanwhile outside the budget
        (its input as received).

        Refused with :meth:`too_large` when ``size`` is more than the whole budget, with what :meth:`may_wait`
        raises when the request would have to wait, with :meth:`carries_too_much` when its ``carried`` would take
        the waiters' past ``max_carried``, and with :meth:`timed_out` when the deadline passes.
        """
        self.check(size, what)
        if not self._waiters and self.held + size <= self.limit:
            self._take(size)
            return MemoryHold(self, size)
        self.may_wait(size, what)
        # The first waiter is let in whatever it carries: one larger than the bound alone would never be served.
        if self.max_carried is not None and self.carried and self.carried + carried > self.max_carried:
            raise self.carries_too_much(carried, what)
        started = time.monotonic()
        if deadline is not None and deadline <= started:
            raise self.timed_out(size, what, 0.0)
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        entry = (size, future)
        self._waiters.append(entry)
        self.carried += carried
        try:
            await asyncio.wait_for(future, None if deadline is None else deadline - started)
        except BaseException as exc:
            if future.done() and not future.cancelled():
                self._give_back(size)  # granted just as the caller gave up
            else:
                future.cancel()
                with contextlib.suppress(ValueError):  # already swept by _grant
                    self._waiters.remove(entry)
                self._grant()  # a large request that leaves the head of the line may let others in
            if isinstance(exc, TimeoutError):
                raise self.timed_out(size, what, time.monotonic() - started) from None
            raise
        finally:
            self.carried -= carried
        return MemoryHold(self, size)

    def too_large(self, size: int, what: str) -> errors.PayloadTooLarge:
        """The refusal of a request larger than the whole budget."""
        return errors.PayloadTooLarge(
            f"{what} needs {binary_size(size)}, more than the whole {self.name} of {binary_size(self.limit)}"
        )

    def timed_out(self, size: int, what: str, waited: float) -> errors.DeadlineExceeded:
        """The refusal of a request whose deadline passed while it waited ``waited`` seconds for its share."""
        return errors.DeadlineExceeded(
            f"deadline exceeded after {waited:.3f}s waiting for {binary_size(size)} of {self.name} for {what} "
            f"({binary_size(self.held)} of {binary_size(self.limit)} held by other requests)"
        )

    def carries_too_much(self, carried: int, what: str) -> errors.ResourceExhausted:
        """The refusal of a request that would wait while the waiters carry too much already: shed, to retry
        shortly, as the budget's other waiters are being served."""
        return errors.ResourceExhausted(
            f"{self.name} is busy: the requests waiting for it hold {binary_size(self.carried)} of input already "
            f"(at most {binary_size(self.max_carried or 0)}), and {what} would add {binary_size(carried)}; "
            "retry shortly",
            retry_after_seconds=SHED_RETRY_SECONDS,
        )

    def may_wait(self, size: int, what: str) -> None:
        """Called when a request must wait for its share: raise to refuse it instead (a bound on waiters).
        Every request may wait by default."""

    def _take(self, size: int) -> None:
        self.held += size
        self.holds += 1
        self._peak = max(self._peak, self.held)
        if self._idle_timer is not None:  # not idle after all: the next request reuses the freed buffers
            self._idle_timer.cancel()
            self._idle_timer = None

    def _give_back(self, size: int) -> None:
        self.held -= size
        self.holds -= 1
        self._grant()
        if self.holds == 0 and self._peak >= RETURN_MEMORY_AFTER_BYTES:
            self._return_memory_when_idle()

    def _return_memory_when_idle(self) -> None:
        if self._idle_timer is not None:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # released with no loop running (shutdown): no request left to serve either
            return
        self._idle_timer = loop.call_later(IDLE_BEFORE_RETURN_SECONDS, self._return_memory)

    def _return_memory(self) -> None:
        self._idle_timer = None
        self._peak = 0
        memory.return_free_memory_soon()

    def _grant(self) -> None:
        while self._waiters:
            size, future = self._waiters[0]
            if future.done():  # gave up
                self._waiters.popleft()
                continue
            if self.held + size > self.limit:
                return
            self._waiters.popleft()
            self._take(size)
            future.set_result(None)
