"""The reconciler: nothing accepted stays non-terminal forever.

Every interval it moves RETRY_WAIT jobs whose backoff elapsed back to QUEUED (next attempt, new dispatch),
moves RUNNING jobs whose lease ran out (their worker died or hung: a SYSTEM error of the attempt) to
RETRY_WAIT with backoff, or fails them when their attempts are spent, and dispatches again QUEUED jobs
nobody claimed for a long time with no dispatch pending (a message lost outside the guarantees, e.g. a
purged queue). Where the broker holds no message ready for their queue (asked again once they are found),
all of them. Where it does, a dispatch waiting behind the backlog, or while no worker consumes, is not lost,
and a copy of it every ``stale_queued_seconds`` would only pile up in RabbitMQ; so only those whose dispatch a
claim overtook: each lane is FIFO and the relay publishes by priority, then in dispatch order, so once a
worker claimed (RUNNING) a job of the same lane, at the stale job's priority or below, dispatched over
``overtaken_margin_seconds`` after it, nothing of the stale job waits ahead of it in the broker. Its message was lost, or a worker holds it
unclaimed behind higher priorities: that one gets one duplicate (dropped at its claim), and since the
re-dispatch moves its dispatch time to now, another copy needs a later claimed dispatch: at most one copy
per stale period per held job, bounded by the workers' prefetch. Unconfirmed outbox rows are taken again by
the relay once their lock runs out.
Every ``prune_interval_seconds`` it also deletes finished jobs past their retention. Several reconcilers
may run: rows are taken with ``FOR UPDATE SKIP LOCKED``.

Given the service's job queues (``queues``), the broker is asked about them first: a queue it cannot say
about (-1, away or not answering) is not looked for in the database at all, and a backlog waiting in
RabbitMQ costs no scan of its stale jobs per sweep, only of the jobs queued before the latest claimed
dispatch of their lane (found through the RUNNING jobs); jobs of other queues (a former queue prefix) are
left alone. The broker is waited for ``ready_timeout_seconds`` at most (all queues asked at once): one
that stops answering delays a sweep by that long instead of stopping every sweep (lease expiry, retries,
pruning) until the connection's heartbeat gives up.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Sequence

from prometheus_client import Counter

from mesh.kit.logging import describe, get_logger
from mesh.kit.runtime import sleep_unless_stopping
from mesh.services.queue.repository import JobRepository, Row

log = get_logger(__name__)

RECONCILED = Counter(
    "mesh_queue_reconciled_total", "Jobs moved by the reconciler, by reason.", ["reason", "to_state"]
)
PRUNED = Counter("mesh_queue_jobs_pruned_total", "Finished jobs deleted after their retention.")
PRUNE_BATCH = 1000
PRUNE_BATCHES_PER_PASS = 20
"""At most 20 000 jobs a pass, in short transactions; a backlog (retention just lowered) takes a few passes."""
OVERTAKEN_MARGIN_SECONDS = 60.0
"""How much later than a stale job's dispatch a claimed one of its lane must have been written to prove the
stale one gone from the broker: longer than the relay's outbox lock (30 s) and its publish retries, which can
publish a dispatch after later ones."""
READY_TIMEOUT_SECONDS = 5.0
"""How long a sweep waits for the broker's ready counts (all queues asked at once) before it takes them as
unknown."""


class Reconciler:
    """Periodic sweeps over the jobs table."""

    def __init__(
        self,
        repository: JobRepository,
        *,
        ready_count: Callable[[str], Awaitable[int]],
        queues: Sequence[str] | None = None,
        ready_timeout_seconds: float = READY_TIMEOUT_SECONDS,
        interval_seconds: float = 1.0,
        stale_queued_seconds: float = 300.0,
        stale_check_seconds: float | None = None,
        overtaken_margin_seconds: float = OVERTAKEN_MARGIN_SECONDS,
        retention_seconds: float = 0.0,
        prune_interval_seconds: float = 60.0,
        on_dispatch: Callable[[], None] = lambda: None,
    ) -> None:
        self.repository = repository
        self.ready_count = ready_count
        self.queues = None if queues is None else list(queues)
        self.ready_timeout_seconds = ready_timeout_seconds
        self.interval_seconds = interval_seconds
        self.stale_queued_seconds = stale_queued_seconds
        # A job is stale only after stale_queued_seconds, so looking ten times in that period is enough; every
        # sweep (each second) asked the broker about every queue, four channels opened a second when idle.
        self.stale_check_seconds = (
            max(interval_seconds, stale_queued_seconds / 10)
            if stale_check_seconds is None
            else stale_check_seconds
        )
        self._next_stale_check = 0.0
        self.overtaken_margin_seconds = overtaken_margin_seconds
        self.retention_seconds = retention_seconds
        self.prune_interval_seconds = prune_interval_seconds
        self.on_dispatch = on_dispatch
        self._next_prune = 0.0

    async def run(self, stopping: asyncio.Event) -> None:
        """Sweep until ``stopping`` is set."""
        while not stopping.is_set():
            try:
                await self.sweep()
            except Exception as exc:
                log.warning("reconciler sweep failed", error=describe(exc))
            await sleep_unless_stopping(stopping, self.interval_seconds)

    async def sweep(self) -> int:
        """One sweep; returns how many jobs moved."""
        due = await self.repository.requeue_due_retries()
        if due:
            RECONCILED.labels("backoff_elapsed", "QUEUED").inc(len(due))
        expired = await self.repository.expire_leases()
        for _, state in expired:
            RECONCILED.labels("lease_expired", state.value).inc()
        if expired:
            log.warning("stalled leases reconciled", jobs=[(str(i), s.value) for i, s in expired])
        stale: list[Row] = []
        if time.monotonic() >= self._next_stale_check:
            self._next_stale_check = time.monotonic() + self.stale_check_seconds
            stale = await self.redispatch_stale()
        if stale:
            RECONCILED.labels("stale_queued", "QUEUED").inc(len(stale))
            log.warning("stale queued jobs re-dispatched", count=len(stale))
        moved = len(due) + len(expired) + len(stale)
        if moved:
            self.on_dispatch()
        if self.retention_seconds > 0 and time.monotonic() >= self._next_prune:
            self._next_prune = time.monotonic() + self.prune_interval_seconds
            await self.prune()
        return moved

    async def redispatch_stale(self) -> list[Row]:
        """Dispatch again the stale QUEUED jobs of the queues whose lanes hold no ready message, and those
        of queues with ready messages whose dispatch a later claimed one of their lane has overtaken (-1, the
        broker cannot say, is neither: nothing is sent while it is away or does not answer).

        With ``queues`` (the service's job queues) the broker is asked about them first, then the database,
        in one statement for the quiet queues and one for the others; without, the database names the queues
        with stale jobs first."""
        if self.queues is None:
            queues = await self.repository.stale_queues(self.stale_queued_seconds)
        else:
            queues = self.queues
        if not queues:
            return []
        counts = dict(
            zip(queues, await asyncio.gather(*(self._ready(queue) for queue in queues)), strict=True)
        )
        quiet = [queue for queue, count in counts.items() if count == 0]
        backlogged = [queue for queue, count in counts.items() if count > 0]
        moved: list[Row] = []
        if quiet:
            moved += await self._redispatch_quiet(quiet)
        if backlogged:
            moved += await self.repository.redispatch_overtaken(
                self.stale_queued_seconds, backlogged, margin_seconds=self.overtaken_margin_seconds
            )
        return moved

    async def _redispatch_quiet(self, queues: Sequence[str]) -> list[Row]:
        """The stale jobs of ``queues``, which held no ready message, dispatched again where their queue
        still holds none once they were found.

        A count can be read before the relay's publish of a stale job lands, and the database after the
        relay confirmed it (deleting its outbox row): the job would look lost while its message waits. A job
        found without an outbox row was confirmed before the second count, so that count holds its message
        unless it is gone (or a worker holds it unclaimed: one duplicate, dropped at its claim)."""
        found = await self.repository.stale_jobs(self.stale_queued_seconds, queues)
        if not found:
            return []
        names = sorted({str(row["queue"]) for row in found})
        counts = await asyncio.gather(*(self._ready(queue) for queue in names))
        still_quiet = {queue for queue, count in zip(names, counts, strict=True) if count == 0}
        ids = [row["id"] for row in found if row["queue"] in still_quiet]
        return await self.repository.redispatch_stale(self.stale_queued_seconds, ids) if ids else []

    async def _ready(self, queue: str) -> int:
        """The broker's ready count of ``queue``; -1 (unknown) when it fails or takes longer than
        ``ready_timeout_seconds``."""
        try:
            return await asyncio.wait_for(self.ready_count(queue), self.ready_timeout_seconds)
        except TimeoutError:
            log.warning(
                "broker ready count not answered; taken as unknown",
                queue=queue,
                timeout_s=self.ready_timeout_seconds,
            )
            return -1
        except Exception as exc:
            log.warning("broker ready count failed; taken as unknown", queue=queue, error=describe(exc))
            return -1

    async def prune(self) -> int:
        """Delete the jobs that finished over ``retention_seconds`` ago; returns how many."""
        pruned = 0
        for _ in range(PRUNE_BATCHES_PER_PASS):
            deleted = await self.repository.prune_finished(self.retention_seconds, limit=PRUNE_BATCH)
            pruned += deleted
            if deleted < PRUNE_BATCH:
                break
        if pruned:
            PRUNED.inc(pruned)
            log.info(
                "finished jobs pruned", count=pruned, retention_days=round(self.retention_seconds / 86400, 3)
            )
        return pruned
