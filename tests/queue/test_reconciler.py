"""The reconciler's sweep: when it prunes finished jobs, and in what batches; how often it looks for stale jobs."""

from __future__ import annotations

import asyncio
from typing import Any, cast

from mesh.services.queue.reconciler import PRUNE_BATCH, PRUNE_BATCHES_PER_PASS, Reconciler
from mesh.services.queue.repository import JobRepository


class Jobs:
    """A repository with nothing to reconcile and ``old`` finished jobs past any retention."""

    def __init__(self, old: int) -> None:
        self.old = old
        self.prunes: list[float] = []

    async def requeue_due_retries(self) -> list[Any]:
        return []

    async def expire_leases(self) -> list[Any]:
        return []

    async def stale_queues(self, seconds: float) -> list[str]:
        return []

    async def redispatch_overtaken(
        self, seconds: float, queues: list[str], *, margin_seconds: float
    ) -> list[Any]:
        return []

    async def prune_finished(self, older_than_seconds: float, limit: int) -> int:
        self.prunes.append(older_than_seconds)
        deleted = min(limit, self.old)
        self.old -= deleted
        return deleted


async def no_ready_messages(queue: str) -> int:
    return 0


def reconciler(jobs: Jobs, *, retention_seconds: float, prune_interval_seconds: float = 60) -> Reconciler:
    return Reconciler(
        cast(JobRepository, jobs),
        ready_count=no_ready_messages,
        retention_seconds=retention_seconds,
        prune_interval_seconds=prune_interval_seconds,
    )


async def test_no_retention_never_prunes() -> None:
    """With retention 0 (keep for ever), sweeps never delete anything."""
    jobs = Jobs(old=5)
    sweeper = reconciler(jobs, retention_seconds=0, prune_interval_seconds=0.001)
    for _ in range(3):
        await sweeper.sweep()
    assert jobs.prunes == []
    assert jobs.old == 5


async def test_a_sweep_prunes_once_per_interval_with_the_retention() -> None:
    """The first sweep prunes with the configured age; sweeps within the interval do not prune again."""
    jobs = Jobs(old=5)
    sweeper = reconciler(jobs, retention_seconds=86400, prune_interval_seconds=3600)
    for _ in range(3):
        await sweeper.sweep()
    assert jobs.prunes == [86400]
    assert jobs.old == 0


async def test_a_backlog_is_pruned_in_bounded_batches() -> None:
    """A large backlog is deleted in batches, at most PRUNE_BATCHES_PER_PASS a pass; the next pass goes on."""
    backlog = PRUNE_BATCH * PRUNE_BATCHES_PER_PASS + 10
    jobs = Jobs(old=backlog)
    sweeper = reconciler(jobs, retention_seconds=60)
    assert await sweeper.prune() == PRUNE_BATCH * PRUNE_BATCHES_PER_PASS
    assert len(jobs.prunes) == PRUNE_BATCHES_PER_PASS
    assert await sweeper.prune() == 10


async def test_stale_jobs_are_looked_for_ten_times_per_stale_period_not_every_sweep() -> None:
    """A job is stale after ``stale_queued_seconds`` (300 s), so the broker and the database are asked about
    stale jobs every 30 s, not every sweep: every second, an idle mesh opened a channel per lane and queue.
    Once the period has passed, the next sweep asks again."""
    asked: list[str] = []

    async def count(queue: str) -> int:
        asked.append(queue)
        return 1  # a dispatch is waiting: only overtaken dispatches to look for in the database

    sweeper = Reconciler(cast(JobRepository, Jobs(old=0)), ready_count=count, queues=["q"])
    for _ in range(3):
        await sweeper.sweep()
    assert (asked, sweeper.stale_check_seconds) == (["q"], 30.0)

    often = Reconciler(
        cast(JobRepository, Jobs(old=0)), ready_count=count, queues=["q"], stale_check_seconds=0.05
    )
    await often.sweep()
    await often.sweep()
    await asyncio.sleep(0.06)
    await often.sweep()
    assert asked == ["q"] * 3
