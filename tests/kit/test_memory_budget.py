"""mesh.kit.memory_budget: bytes granted in arrival order, within a deadline, given back by the last owner."""

from __future__ import annotations

import asyncio
import time

import pytest
from prometheus_client import REGISTRY

from mesh.kit import memory, memory_budget
from mesh.kit.errors import DeadlineExceeded, PayloadTooLarge, ResourceExhausted
from mesh.kit.memory_budget import RETURN_MEMORY_AFTER_BYTES, MemoryBudget


async def test_shares_are_granted_in_arrival_order_within_the_budget() -> None:
    """Holds are granted while they fit; a request that does not fit waits, and later small ones queue behind it
    rather than pass it for ever; each gets its bytes once enough are given back."""
    budget = MemoryBudget(100, name="budget")
    first = await budget.acquire(60, what="a")
    large = asyncio.ensure_future(budget.acquire(70, what="b"))
    small = asyncio.ensure_future(budget.acquire(10, what="c"))
    await asyncio.sleep(0.01)
    assert not large.done()
    assert not small.done()
    assert (budget.held, budget.holds, budget.waiting) == (60, 1, 2)
    first.release()
    granted = await large
    await asyncio.sleep(0)
    assert small.done()
    assert (budget.held, budget.holds, budget.waiting) == (80, 2, 0)
    granted.release()
    (await small).release()
    assert (budget.held, budget.holds) == (0, 0)


async def test_a_request_larger_than_the_whole_budget_is_refused_at_once() -> None:
    """It could never be granted: PayloadTooLarge naming both sizes, even with the budget idle, and nothing
    held or queued for it."""
    budget = MemoryBudget(2**20, name="test budget")
    with pytest.raises(
        PayloadTooLarge, match=r"img needs 2\.0 MiB, more than the whole test budget of 1\.0 MiB"
    ):
        await asyncio.wait_for(budget.acquire(2**21, what="img"), 1)
    assert (budget.held, budget.holds, budget.waiting) == (0, 0, 0)


async def test_a_waiter_past_its_deadline_is_refused_and_does_not_block_those_behind() -> None:
    """DeadlineExceeded naming what it waited for; it leaves the line, and a smaller request queued behind it
    is granted at once if it fits; a deadline already past is refused without waiting."""
    budget = MemoryBudget(100, name="test budget")
    held = await budget.acquire(60, what="a")
    started = time.monotonic()
    late = asyncio.ensure_future(budget.acquire(70, what="late", deadline=started + 0.05))
    behind = asyncio.ensure_future(budget.acquire(30, what="behind"))
    with pytest.raises(
        DeadlineExceeded, match=r"waiting for 70 bytes of test budget for late \(90 bytes of 100"
    ):
        await asyncio.wait_for(late, 1)
    assert 0.04 < time.monotonic() - started < 1
    assert (await asyncio.wait_for(behind, 1)).size == 30
    assert (budget.held, budget.waiting) == (90, 0)
    with pytest.raises(DeadlineExceeded):
        await asyncio.wait_for(budget.acquire(20, what="past", deadline=time.monotonic()), 1)
    assert budget.waiting == 0
    held.release()
    assert budget.held == 30


async def test_a_cancelled_waiter_at_the_head_of_the_line_lets_those_behind_in() -> None:
    """A large request whose caller goes away while it waits no longer holds up the small ones behind it."""
    budget = MemoryBudget(100, name="budget")
    await budget.acquire(60, what="a")
    large = asyncio.ensure_future(budget.acquire(70, what="b"))
    small = asyncio.ensure_future(budget.acquire(10, what="c"))
    await asyncio.sleep(0.01)
    large.cancel()
    assert (await asyncio.wait_for(small, 1)).size == 10
    assert (budget.held, budget.waiting) == (70, 0)


async def test_a_shared_hold_is_given_back_when_its_last_owner_releases_it() -> None:
    """The work computing for a request (a batch, a thread) shares its hold: the bytes stay taken until both
    have released it, then go to the next waiter."""
    budget = MemoryBudget(100, name="budget")
    hold = await budget.acquire(80, what="a")
    hold.share()
    waiter = asyncio.ensure_future(budget.acquire(50, what="b"))
    hold.release()
    await asyncio.sleep(0.01)
    assert not waiter.done()
    assert budget.held == 80
    hold.release()
    assert (await asyncio.wait_for(waiter, 1)).size == 50
    assert (budget.held, budget.holds) == (50, 1)


async def test_bytes_granted_just_as_the_caller_was_cancelled_are_given_back() -> None:
    """A waiter granted its share in the same turn of the loop as its caller is cancelled never gets a hold to
    release: the budget takes the bytes back itself, or they would be lost for good."""
    budget = MemoryBudget(100, name="budget")
    first = await budget.acquire(100, what="a")
    waiter = asyncio.ensure_future(budget.acquire(100, what="b"))
    await asyncio.sleep(0.01)
    first.release()  # grants the waiter's future; its task has not resumed yet
    assert budget.held == 100
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert (budget.held, budget.holds, budget.waiting) == (0, 0, 0)
    (await budget.acquire(100, what="c")).release()


async def test_a_service_words_its_refusals_and_bounds_its_waiters() -> None:
    """The hooks: a subclass's refusals replace the default wording, and may_wait is asked only of a request
    that has to wait."""

    class Bounded(MemoryBudget):
        def too_large(self, size: int, what: str) -> PayloadTooLarge:
            return PayloadTooLarge(f"{what}: {size} > {self.limit}")

        def may_wait(self, size: int, what: str) -> None:
            if self.waiting >= 1:
                raise ResourceExhausted(f"{what} would be the second to wait")

    budget = Bounded(100, name="budget")
    with pytest.raises(PayloadTooLarge, match=r"^big: 101 > 100$"):
        await asyncio.wait_for(budget.acquire(101, what="big"), 1)
    held = await budget.acquire(100, what="a")
    waiter = asyncio.ensure_future(budget.acquire(10, what="b"))
    await asyncio.sleep(0.01)
    with pytest.raises(ResourceExhausted, match="c would be the second to wait"):
        await asyncio.wait_for(budget.acquire(10, what="c"), 1)
    held.release()
    (await waiter).release()
    assert budget.held == 0


async def test_a_budget_shows_its_limit_the_bytes_held_and_the_requests_waiting_on_metrics() -> None:
    """Operators see on /metrics how much of each budget is held and how many requests wait for it, as of the
    scrape (a budget that bounds throughput shows as waiting requests, not as busy CPUs)."""

    def sample(metric: str) -> float | None:
        return REGISTRY.get_sample_value(metric, {"budget": "metrics-test"})

    budget = MemoryBudget(100, name="test budget", label="metrics-test")
    assert sample("mesh_memory_budget_limit_bytes") == 100
    first = await budget.acquire(60, what="a")
    waiting = asyncio.ensure_future(budget.acquire(70, what="b"))
    await asyncio.sleep(0.01)
    assert (sample("mesh_memory_budget_held_bytes"), sample("mesh_memory_budget_waiting")) == (60, 1)
    first.release()
    (await waiting).release()
    assert (sample("mesh_memory_budget_held_bytes"), sample("mesh_memory_budget_waiting")) == (0, 0)


async def test_waiters_carry_at_most_max_carried_bytes_of_input_together() -> None:
    """A request that must wait holds its input meanwhile, outside the budget: once the waiters carry
    ``max_carried`` bytes together, one more that would wait is shed (RESOURCE_EXHAUSTED with a retry delay,
    naming the bytes), while one that fits at once is still granted whatever it carries. The carried bytes are
    given back as waiters are granted, time out or go away, and show on /metrics. The first waiter is let in
    whatever it carries: a request larger than the bound alone would otherwise never be served."""

    def carried_on_metrics() -> float | None:
        return REGISTRY.get_sample_value(
            "mesh_memory_budget_waiting_carried_bytes", {"budget": "carried-test"}
        )

    budget = MemoryBudget(100, name="test budget", label="carried-test", max_carried=1000)
    held = await budget.acquire(90, what="a", carried=5000)  # granted at once: it waits for nothing
    alone = asyncio.ensure_future(budget.acquire(50, what="alone", carried=2000))
    await asyncio.sleep(0.01)
    assert (budget.waiting, budget.carried) == (1, 2000)  # the first waiter is let in whatever it carries
    alone.cancel()
    await asyncio.sleep(0)
    assert (budget.waiting, budget.carried) == (0, 0)
    first = asyncio.ensure_future(budget.acquire(50, what="b", carried=600))
    gone = asyncio.ensure_future(budget.acquire(50, what="c", carried=300))
    await asyncio.sleep(0.01)
    assert (budget.waiting, budget.carried, carried_on_metrics()) == (2, 900, 900)
    with pytest.raises(
        ResourceExhausted, match=r"hold 900 bytes of input already \(at most 1000 bytes\)"
    ) as shed:
        await budget.acquire(10, what="d", carried=200)
    assert shed.value.retry_after_seconds == 0.5
    assert budget.waiting == 2
    gone.cancel()
    await asyncio.sleep(0)
    assert budget.carried == 600
    late = budget.acquire(10, what="e", carried=300, deadline=time.monotonic() + 0.02)
    with pytest.raises(DeadlineExceeded):
        await late
    assert budget.carried == 600
    held.release()
    (await first).release()
    assert (budget.carried, carried_on_metrics()) == (0, 0)


IDLE = 0.05
"""The idle delay the tests set (the service's is seconds)."""


@pytest.fixture
def returned(monkeypatch: pytest.MonkeyPatch) -> list[None]:
    """The times the process gave its free memory back, with the idle delay shortened to IDLE."""
    calls: list[None] = []
    monkeypatch.setattr(memory, "return_free_memory_soon", lambda: calls.append(None))
    monkeypatch.setattr(memory_budget, "IDLE_BEFORE_RETURN_SECONDS", IDLE)
    return calls


async def test_a_budget_that_emptied_after_holding_many_megabytes_gives_the_free_memory_back_once_idle(
    returned: list[None],
) -> None:
    """The decoders' buffers of the images it held were freed into malloc's heaps, which glibc keeps: once the
    last hold is given back after RETURN_MEMORY_AFTER_BYTES or more were held at once and the budget then stays
    empty for IDLE_BEFORE_RETURN_SECONDS, the process returns its free memory, once (not at the release itself,
    whose trim would stall the next request's allocations, not while a hold remains, and not after a budget
    that only ever held a little)."""
    large = RETURN_MEMORY_AFTER_BYTES
    budget = MemoryBudget(4 * large, name="budget")
    first = await budget.acquire(large // 2, what="a")
    second = await budget.acquire(large // 2, what="b")
    first.release()
    await asyncio.sleep(3 * IDLE)
    assert not returned  # the second image is still held
    second.release()
    await asyncio.sleep(0)
    assert not returned  # not yet idle for long
    await asyncio.sleep(3 * IDLE)
    assert len(returned) == 1
    await asyncio.sleep(3 * IDLE)
    assert len(returned) == 1  # once per emptying
    (await budget.acquire(large // 4, what="c")).release()
    await asyncio.sleep(3 * IDLE)
    assert len(returned) == 1  # a small image alone leaves the heap for the next one
    (await budget.acquire(large, what="d")).release()
    await asyncio.sleep(3 * IDLE)
    assert len(returned) == 2


async def test_a_hold_taken_before_the_idle_delay_passes_means_no_memory_is_given_back_then(
    returned: list[None],
) -> None:
    """The next request arriving soon after a large one reuses its freed buffers: its hold cancels the pending
    return, which waits until the budget is empty and idle again (the large peak is not forgotten)."""
    large = RETURN_MEMORY_AFTER_BYTES
    budget = MemoryBudget(4 * large, name="budget")
    (await budget.acquire(large, what="a")).release()
    next_one = await budget.acquire(large // 4, what="b")
    await asyncio.sleep(3 * IDLE)
    assert not returned
    next_one.release()
    await asyncio.sleep(3 * IDLE)
    assert len(returned) == 1


async def test_a_stream_of_requests_one_at_a_time_gives_no_memory_back_until_it_stops(
    returned: list[None],
) -> None:
    """Under continuous load the budget empties between every two requests, yet nothing is given back then (the
    trim would stall each next request's allocations; the freed buffers serve the next images anyway): only
    once the stream stops and the budget has stayed idle."""
    large = RETURN_MEMORY_AFTER_BYTES
    budget = MemoryBudget(4 * large, name="budget")
    started = time.monotonic()
    while time.monotonic() - started < 4 * IDLE:
        hold = await budget.acquire(large, what="image")
        await asyncio.sleep(IDLE / 5)
        hold.release()
        await asyncio.sleep(0)  # the next request arrives a turn of the loop later
    assert not returned
    await asyncio.sleep(3 * IDLE)
    assert len(returned) == 1


def test_a_hold_released_with_no_event_loop_running_is_given_back_without_error(returned: list[None]) -> None:
    """A release at shutdown, after the loop has stopped, finds no loop to wait for idleness on: the bytes are
    still given back, and no memory is returned (nobody is left to need it)."""
    budget = MemoryBudget(2 * RETURN_MEMORY_AFTER_BYTES, name="budget")
    hold = asyncio.run(budget.acquire(RETURN_MEMORY_AFTER_BYTES, what="a"))
    hold.release()
    assert (budget.held, budget.holds, returned) == (0, 0, [])
