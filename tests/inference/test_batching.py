"""Dynamic batching: grouping, the queue delay, deadlines and cancellation while queued, failure isolation."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Sequence
from concurrent.futures import ThreadPoolExecutor

import pytest

from mesh.kit.errors import DeadlineExceeded, PayloadTooLarge, ResourceExhausted, Unavailable
from mesh.services.inference.batching import DynamicBatcher, ModelMemory, ModelScheduler, NotQueued


class Recorder:
    """A batch function that doubles numbers, records its batches and can be held or made to fail."""

    def __init__(self) -> None:
        self.batches: list[list[int]] = []
        self.gate = threading.Event()
        self.gate.set()
        self.sizes: list[int] = []

    def __call__(self, items: Sequence[int]) -> list[int]:
        self.batches.append(list(items))
        self.gate.wait(5)
        if -1 in items:
            raise ValueError("negative one is poison")
        return [2 * item for item in items]

    def batch_executed(self, size: int, compute_seconds: float) -> None:
        self.sizes.append(size)


@pytest.fixture
async def executor() -> AsyncIterator[ThreadPoolExecutor]:
    pool = ThreadPoolExecutor(max_workers=1)
    yield pool
    pool.shutdown(wait=False)


def _batcher(
    recorder: Recorder, executor: ThreadPoolExecutor, *, size: int = 4, delay: float = 0.05, queue: int = 100
) -> DynamicBatcher[int, int]:
    return DynamicBatcher(
        recorder,
        max_batch_size=size,
        max_queue_delay_seconds=delay,
        max_queue_size=queue,
        executor=executor,
        instances=asyncio.Semaphore(1),
        observer=recorder,
        name="test",
    )


async def test_concurrent_requests_are_grouped_up_to_the_maximum(executor: ThreadPoolExecutor) -> None:
    """Ten concurrent items make batches of 4, 4 and 2; each caller gets its own output."""
    recorder = Recorder()
    batcher = _batcher(recorder, executor)
    results = await asyncio.gather(*(batcher.submit(i) for i in range(10)))
    assert [r.output for r in results] == [2 * i for i in range(10)]
    assert [len(b) for b in recorder.batches] == [4, 4, 2]
    assert recorder.sizes == [4, 4, 2]
    assert [r.batch_size for r in results] == [4] * 8 + [2] * 2
    await batcher.close()


async def test_a_lone_request_waits_at_most_the_queue_delay(executor: ThreadPoolExecutor) -> None:
    """A single item is computed once the delay has passed, not held for a full batch."""
    recorder = Recorder()
    batcher = _batcher(recorder, executor, delay=0.05)
    started = time.monotonic()
    result = await batcher.submit(3)
    elapsed = time.monotonic() - started
    assert result.output == 6
    assert 0.045 <= elapsed < 0.5
    assert result.queue_seconds >= 0.045
    immediate = _batcher(recorder, executor, delay=0.0)
    started = time.monotonic()
    await immediate.submit(1)
    assert time.monotonic() - started < 0.04
    await batcher.close()
    await immediate.close()


async def test_a_request_arriving_within_the_delay_joins_the_batch(executor: ThreadPoolExecutor) -> None:
    """An item submitted while the oldest one waits shares its batch."""
    recorder = Recorder()
    batcher = _batcher(recorder, executor, delay=0.2)
    first = asyncio.ensure_future(batcher.submit(1))
    await asyncio.sleep(0.02)
    second = await batcher.submit(2)
    assert (await first).batch_size == second.batch_size == 2
    assert recorder.batches == [[1, 2]]
    await batcher.close()


async def test_requests_queued_behind_a_busy_instance_form_the_next_batch(
    executor: ThreadPoolExecutor,
) -> None:
    """While the only instance computes, arriving items pile up and go together next."""
    recorder = Recorder()
    recorder.gate.clear()
    batcher = _batcher(recorder, executor, size=8, delay=0.0)
    first = asyncio.ensure_future(batcher.submit(0))
    await asyncio.sleep(0.05)
    rest = [asyncio.ensure_future(batcher.submit(i)) for i in range(1, 6)]
    await asyncio.sleep(0.05)
    recorder.gate.set()
    await asyncio.gather(first, *rest)
    assert recorder.batches == [[0], [1, 2, 3, 4, 5]]
    await batcher.close()


async def test_deadline_passing_while_queued_drops_the_request(executor: ThreadPoolExecutor) -> None:
    """An item whose deadline passes while it waits gets DEADLINE_EXCEEDED and is never computed."""
    recorder = Recorder()
    recorder.gate.clear()
    batcher = _batcher(recorder, executor, delay=0.0)
    busy = asyncio.ensure_future(batcher.submit(1))
    await asyncio.sleep(0.05)
    with pytest.raises(DeadlineExceeded):
        await batcher.submit(2, deadline=time.monotonic() + 0.05)
    recorder.gate.set()
    await busy
    assert await batcher.submit(3) is not None
    assert recorder.batches == [[1], [3]]
    with pytest.raises(DeadlineExceeded):
        await batcher.submit(4, deadline=time.monotonic() - 1)
    await batcher.close()


async def test_cancelled_request_is_dropped_before_compute(executor: ThreadPoolExecutor) -> None:
    """A caller that goes away while queued does not cost a computation."""
    recorder = Recorder()
    recorder.gate.clear()
    batcher = _batcher(recorder, executor, delay=0.0)
    busy = asyncio.ensure_future(batcher.submit(1))
    await asyncio.sleep(0.05)
    doomed = asyncio.ensure_future(batcher.submit(2))
    await asyncio.sleep(0.02)
    doomed.cancel()
    with pytest.raises(asyncio.CancelledError):
        await doomed
    recorder.gate.set()
    await busy
    await batcher.submit(3)
    assert recorder.batches == [[1], [3]]
    await batcher.close()


async def test_a_failing_item_does_not_fail_its_batch(executor: ThreadPoolExecutor) -> None:
    """When a batch fails, its items are retried alone: only the bad one fails."""
    recorder = Recorder()
    batcher = _batcher(recorder, executor)
    results = await asyncio.gather(*(batcher.submit(i) for i in (1, -1, 3)), return_exceptions=True)
    assert results[0].output == 2  # type: ignore[union-attr]
    assert isinstance(results[1], ValueError)
    assert results[2].output == 6  # type: ignore[union-attr]
    assert recorder.batches[0] == [1, -1, 3]
    await batcher.close()


async def test_full_queue_is_resource_exhausted_and_close_fails_the_rest(
    executor: ThreadPoolExecutor,
) -> None:
    """Past max_queue_size a submit is refused at once; closing fails queued items with UNAVAILABLE."""
    recorder = Recorder()
    recorder.gate.clear()
    batcher = _batcher(recorder, executor, size=1, delay=0.0, queue=2)
    busy = asyncio.ensure_future(batcher.submit(0))
    await asyncio.sleep(0.05)
    # The oldest item waits for the instance outside the queue; two more fill it.
    queued = [asyncio.ensure_future(batcher.submit(1))]
    await asyncio.sleep(0.02)
    queued += [asyncio.ensure_future(batcher.submit(i)) for i in (2, 3)]
    await asyncio.sleep(0.01)
    with pytest.raises(ResourceExhausted):
        await batcher.submit(4)
    recorder.gate.set()
    await busy
    closing = asyncio.ensure_future(batcher.close())
    outcomes = await asyncio.gather(*queued, return_exceptions=True)
    await closing
    assert all(isinstance(o, Unavailable) or o.output in (2, 4, 6) for o in outcomes)  # type: ignore[union-attr]
    with pytest.raises(Unavailable):
        await batcher.submit(5)


async def test_scheduler_batches_only_equal_keys_together() -> None:
    """Requests with different keys (operation, parameters) never share a batch."""
    seen: list[tuple[str, list[int]]] = []

    def run(key: str, items: Sequence[int]) -> list[int]:
        seen.append((key, list(items)))
        return list(items)

    scheduler: ModelScheduler[str, int, int] = ModelScheduler(
        run, max_batch_size=8, max_queue_delay_seconds=0.02, max_queue_size=10, instance_count=1
    )
    await asyncio.gather(*(scheduler.submit("a" if i % 2 else "b", i) for i in range(6)))
    assert sorted(seen) == [("a", [1, 3, 5]), ("b", [0, 2, 4])]
    await scheduler.close()


def _loop_tasks(prefix: str) -> list[asyncio.Task[object]]:
    return [t for t in asyncio.all_tasks() if t.get_name().startswith(prefix) and not t.done()]


async def test_scheduler_retires_batchers_once_their_requests_are_answered() -> None:
    """A batcher (and its loop task) per parameter set was kept for ever: 1000 distinct sets left 1000 of each.
    Once every request of a key has its answer, that key's batcher is closed and forgotten."""
    scheduler: ModelScheduler[float, int, int] = ModelScheduler(
        lambda key, items: list(items),
        max_batch_size=4,
        max_queue_delay_seconds=0,
        max_queue_size=70,  # for every key together
        name="retiring",
    )
    for i in range(200):
        assert (await scheduler.submit(i / 200, i)).output == i
    await asyncio.gather(*(scheduler.submit(i % 7 / 7, i) for i in range(70)))
    for _ in range(10):  # the retired batchers' close() runs in tasks of their own
        await asyncio.sleep(0)
    assert scheduler._batchers == {}
    assert _loop_tasks("retiring[") == []
    await scheduler.close()


async def test_a_request_arriving_as_its_batcher_retires_is_served() -> None:
    """A request for a key whose batcher is being retired gets a new batcher and its answer; one arriving while
    another request of its key is still waiting joins the same batcher and the same batch."""
    release = threading.Event()

    def run(key: str, items: Sequence[int]) -> list[int]:
        release.wait(5)
        return [2 * item for item in items]

    scheduler: ModelScheduler[str, int, int] = ModelScheduler(
        run, max_batch_size=4, max_queue_delay_seconds=0.05, max_queue_size=8, name="racing"
    )
    release.set()
    await scheduler.submit("k", 1)
    # The first batcher has just been retired; its close() has not run yet.
    assert len(_loop_tasks("racing[k]-retire")) == 1
    assert (await scheduler.submit("k", 2)).output == 4

    release.clear()
    first = asyncio.ensure_future(scheduler.submit("k", 3))
    await asyncio.sleep(0.01)
    second = asyncio.ensure_future(scheduler.submit("k", 4))
    await asyncio.sleep(0.01)
    release.set()
    assert [(r.output, r.batch_size) for r in await asyncio.gather(first, second)] == [(6, 2), (8, 2)]
    await scheduler.close()
    assert _loop_tasks("racing[") == []


async def test_the_queue_bound_holds_across_parameter_sets() -> None:
    """max_queue_size bounds the items of a version waiting for a batch whatever their keys: kept per
    (operation, parameters) batcher, it let a client that varied a parameter's value queue without limit."""
    release = threading.Event()

    def run(key: float, items: Sequence[int]) -> list[int]:
        release.wait(5)
        return list(items)

    scheduler: ModelScheduler[float, int, int] = ModelScheduler(
        run, max_batch_size=1, max_queue_delay_seconds=0, max_queue_size=3, name="bounded"
    )
    computing = asyncio.ensure_future(scheduler.submit(0.0, 0))
    await asyncio.sleep(0.05)
    waiting = [asyncio.ensure_future(scheduler.submit(float(i), i)) for i in (1, 2, 3)]
    await asyncio.sleep(0.05)
    assert scheduler.waiting == 3
    with pytest.raises(ResourceExhausted, match=r"^bounded: 3 requests are queued already$"):
        await scheduler.submit(4.0, 4)
    waiting[0].cancel()  # a caller that went away leaves room
    late = asyncio.ensure_future(scheduler.submit(5.0, 5))
    await asyncio.sleep(0.01)
    release.set()
    outcomes = await asyncio.gather(computing, *waiting[1:], late)
    assert [o.output for o in outcomes] == [0, 2, 3, 5]
    await scheduler.close()


async def test_memory_refusals_name_the_sizes() -> None:
    """A model version's memory refuses in its own words (the mechanics are mesh.kit.memory_budget's): an image
    larger than the whole budget with both sizes and the version; one that waits past its deadline naming what
    it waited for; past max_waiters requests waiting, RESOURCE_EXHAUSTED."""
    mib = 2**20
    budget = ModelMemory(256 * mib, max_waiters=1, name="strip-reader-v1")
    with pytest.raises(
        PayloadTooLarge,
        match=r"input\.encoded \(9000x9000\) takes 309\.0 MiB decoded; "
        r"strip-reader-v1 holds at most 256\.0 MiB",
    ):
        await budget.acquire(9000 * 9000 * 4, what="input.encoded (9000x9000)")
    held = await budget.acquire(200 * mib, what="a")
    with pytest.raises(
        DeadlineExceeded, match=r"waiting for memory to decode b \(100\.0 MiB; 200\.0 MiB of 256\.0"
    ):
        await budget.acquire(100 * mib, what="b", deadline=time.monotonic() + 0.05)
    assert budget.waiting == 0
    waiter = asyncio.ensure_future(budget.acquire(100 * mib, what="c"))
    await asyncio.sleep(0.01)
    with pytest.raises(ResourceExhausted, match="1 requests wait for memory already"):
        await asyncio.wait_for(budget.acquire(100 * mib, what="d"), 1)
    held.release()
    (await waiter).release()
    assert budget.held == 0


async def test_a_batch_keeps_its_images_memory_until_it_is_done() -> None:
    """The memory of an image being computed is given back when its batch is done, not when its caller gives up
    (the batch still holds the pixels)."""
    release = threading.Event()

    def run(key: str, items: Sequence[int]) -> list[int]:
        release.wait(5)
        return list(items)

    scheduler: ModelScheduler[str, int, int] = ModelScheduler(
        run, max_batch_size=2, max_queue_delay_seconds=0, max_queue_size=4, max_image_bytes=100, name="held"
    )

    async def request(value: int) -> int:
        hold = await scheduler.memory.acquire(50, what=str(value))
        try:
            return (await scheduler.submit("k", value, hold=hold)).output
        finally:
            hold.release()

    computing = asyncio.ensure_future(request(1))
    await asyncio.sleep(0.05)
    computing.cancel()
    await asyncio.sleep(0.01)
    assert scheduler.memory.held == 50  # the batch still computes it
    release.set()
    for _ in range(100):
        if scheduler.memory.held == 0:
            break
        await asyncio.sleep(0.01)
    assert scheduler.memory.held == 0
    assert await request(2) == 2
    await scheduler.close()


async def test_refusals_before_the_queue_are_marked_not_queued(executor: ThreadPoolExecutor) -> None:
    """A deadline already past, a closed batcher and a full queue refuse the item before it is queued, with
    their usual codes, marked NotQueued (so the predictor leaves them out of queued_count); an item that
    waited in the queue and expired there is not marked."""
    recorder = Recorder()
    batcher = _batcher(recorder, executor, size=1, delay=0, queue=1)
    with pytest.raises(DeadlineExceeded) as expired:
        await batcher.submit(1, deadline=time.monotonic() - 1)
    recorder.gate.clear()
    computing = asyncio.ensure_future(batcher.submit(2))
    await asyncio.sleep(0.05)
    with pytest.raises(DeadlineExceeded) as waited:
        await batcher.submit(3, deadline=time.monotonic() + 0.05)
    queued = asyncio.ensure_future(batcher.submit(4))
    await asyncio.sleep(0.01)
    with pytest.raises(ResourceExhausted) as full:
        await batcher.submit(5)
    recorder.gate.set()
    await asyncio.gather(computing, queued)
    await batcher.close()
    with pytest.raises(Unavailable) as closed:
        await batcher.submit(6)
    assert [isinstance(info.value, NotQueued) for info in (expired, full, closed)] == [True, True, True]
    assert not isinstance(waited.value, NotQueued)
