"""Jobs, their history and the dispatch outbox on PostgreSQL (psycopg 3, async pool).

Two faces of one schema: :class:`JobRepository` for the queue service (submit, read, cancel, retry, the
relay's outbox and the reconciler's sweeps) and :class:`ClaimStore` for workers (fenced claim, lease beat,
progress, the attempt's outcome). Every statement is one round trip in autocommit mode unless it needs a
transaction; triggers (migration 0001) write the history and the outbox row of every move into QUEUED, so no
code path can queue a job without its dispatch.

Operations retry on a dropped connection (``pg_terminate_backend``, a restart). The ones that change state
are written so that a retry after an ambiguous commit (COMMIT reached PostgreSQL, its answer was lost) gives
the answer the first try would have given: submit carries a client-made id, claims and outcomes carry the
worker's claim token, and the queue service's own transactions (cancel, retry, dead letters, expired
leases) carry their transaction id: the next try asks PostgreSQL whether it committed
(:meth:`JobRepository._transaction`) rather than running again and finding its own change.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, TypeVar

import psycopg
from psycopg.rows import DictRow, dict_row
from psycopg_pool import AsyncConnectionPool

from mesh.kit import errors
from mesh.kit.db import (
    CONNECTION_KWARGS,
    RETRY_ON,
    DatabaseStalled,
    database_unavailable,
    retrying,
    transaction_once,
)
from mesh.kit.deadlines import call_timeout
from mesh.kit.pagination import Cursor
from mesh.services.queue.batching import GroupCommit
from mesh.services.queue.states import (
    LEASE_EXPIRED_MESSAGE,
    RETRYABLE_BY_USER,
    Attempts,
    Backoff,
    DeadLetterFacts,
    ErrorCategory,
    IllegalTransition,
    JobState,
    cancel_target,
    dead_letter_outcome,
    stalled_lease_outcome,
)
from mesh.services.queue.topology import HIGH_PRIORITY, MAX_PRIORITY

MIGRATIONS = "mesh.services.queue.migrations"
"""The package of the queue schema's SQL migrations (applied by the service and by every worker)."""

Row = dict[str, Any]
T = TypeVar("T")

JobConnection = psycopg.AsyncConnection[DictRow]
JobPool = AsyncConnectionPool[JobConnection]
"""A pool of autocommit connections whose rows are dicts (:func:`open_pool`)."""

Params = dict[str, Any] | Sequence[Any]


def job_not_found(job_id: uuid.UUID) -> errors.NotFound:
    """A job id that has no row: never submitted, or finished and deleted after its retention."""
    return errors.NotFound(
        f"job {job_id} does not exist (finished jobs are deleted once the queue's retention has passed)",
        metadata={"job_id": str(job_id)},
    )


async def _lock_job(conn: JobConnection, job_id: uuid.UUID) -> Row:
    """The job's row, locked for this transaction; NOT_FOUND when there is no such job."""
    cursor = await conn.execute("SELECT * FROM jobs WHERE id = %s FOR UPDATE", (job_id,))
    row: Row | None = await cursor.fetchone()
    if row is None:
        raise job_not_found(job_id)
    return row


def open_pool(url: str, *, name: str, max_size: int, min_size: int = 1) -> JobPool:
    """An autocommit pool (open it with ``await pool.open()``).

    Connections are not checked on checkout: every operation runs under :func:`retrying`, which takes a
    fresh connection at once when one turns out dead. (The pool's own check backs off for a second and more
    after each dead connection, which stalls every caller while PostgreSQL drops connections repeatedly.)
    """
    return AsyncConnectionPool(
        url,
        name=name,
        min_size=min_size,
        max_size=max_size,
        open=False,
        timeout=10.0,
        connection_class=JobConnection,
        kwargs={"autocommit": True, "row_factory": dict_row, **CONNECTION_KWARGS},
    )


async def _fetch_one(pool: JobPool, query: str, params: Params) -> Row | None:
    """The first row of one statement on a connection of ``pool``; one try (callers choose the retries)."""
    async with pool.connection() as conn:
        cursor = await conn.execute(query, params)
        return await cursor.fetchone()


async def _fetch_all(pool: JobPool, query: str, params: Params) -> list[Row]:
    """The rows of one statement on a connection of ``pool``; one try (callers choose the retries)."""
    async with pool.connection() as conn:
        cursor = await conn.execute(query, params)
        return await cursor.fetchall()


@dataclass(frozen=True)
class NewJob:
    """A validated submit."""

    queue: str
    image_id: str
    pipeline: bytes
    model: str
    priority: int
    idempotency_key: str | None
    max_attempts: int
    backoff_base_seconds: float
    backoff_cap_seconds: float
    traceparent: str = ""
    tracestate: str = ""
    id: uuid.UUID = field(default_factory=uuid.uuid4)


@dataclass(frozen=True)
class Submitted:
    """What submit returns."""

    row: Row
    existing: bool
    position: int


@dataclass(frozen=True)
class QueueCounts:
    """Job counts and ages for statistics and gauges."""

    by_queue_state: dict[tuple[str, str], int]
    oldest_queued_at: dict[str, datetime]
    finished_last_minute: int
    now: datetime


# Many submits in one statement (see GroupCommit): the jobs, and through the triggers their history and
# outbox rows, commit together. Rows are inserted in the callers' order with increasing enqueue times, so
# that positions and dispatches follow it. A row that conflicts (an idempotency key seen before, or an id
# already committed by an earlier try) is left out of the result; its caller looks it up.
# Position, exact at commit: the queued jobs of higher or equal priority that were there before (counted
# once per queue and priority of the batch), plus those of this batch ahead of the row or level with it.
_SUBMIT_MANY = """
WITH v AS (
    SELECT * FROM unnest(%(id)s::uuid[], %(queue)s::text[], %(image_id)s::text[], %(pipeline)s::bytea[],
                         %(model)s::text[], %(priority)s::smallint[], %(idempotency_key)s::text[],
                         %(max_attempts)s::integer[], %(base)s::float8[], %(cap)s::float8[],
                         %(traceparent)s::text[], %(tracestate)s::text[])
           WITH ORDINALITY AS v(id, queue, image_id, pipeline, model, priority, idempotency_key, max_attempts,
                                base, cap, traceparent, tracestate, ord)
), before AS (
    SELECT b.queue, b.priority,
           (SELECT count(*) FROM jobs j
             WHERE j.state = 'QUEUED' AND j.queue = b.queue AND j.priority >= b.priority) AS n
      FROM (SELECT DISTINCT queue, priority FROM v) b
), ins AS (
    INSERT INTO jobs (id, queue, state, image_id, pipeline, model, priority, idempotency_key, max_attempts,
                      backoff_base_s, backoff_cap_s, traceparent, tracestate, state_reason, enqueued_at)
    SELECT id, queue, 'QUEUED', image_id, pipeline, model, priority, idempotency_key, max_attempts,
           base, cap, traceparent, tracestate, 'submitted', clock_timestamp()
      FROM v ORDER BY ord
    ON CONFLICT DO NOTHING
    RETURNING *
)
SELECT ins.*,
       before.n + (SELECT count(*) FROM ins mate
                    WHERE mate.queue = ins.queue
                      AND (mate.priority > ins.priority
                           OR (mate.priority = ins.priority
                               AND (mate.enqueued_at, mate.id) <= (ins.enqueued_at, ins.id)))) AS position
  FROM ins JOIN before ON before.queue = ins.queue AND before.priority = ins.priority
"""

_POSITION = """
SELECT count(*) + 1 AS position FROM jobs
 WHERE state = 'QUEUED' AND queue = %(queue)s
   AND (priority > %(priority)s OR (priority = %(priority)s AND (enqueued_at, id) < (%(enqueued_at)s, %(id)s)))
"""

# Positions of several queued jobs at once (a listing page): one ordered pass over the queued jobs of
# their queues (the jobs_queued_order index), rather than one count per job.
_POSITIONS = """
SELECT id, position FROM (
    SELECT id, row_number() OVER (PARTITION BY queue ORDER BY priority DESC, enqueued_at, id) AS position
      FROM jobs WHERE state = 'QUEUED' AND queue = ANY(%(queues)s::text[])
) ranked
 WHERE id = ANY(%(ids)s::uuid[])
"""

# Oldest first, in batches that skip rows another transaction holds; job_history goes with ON DELETE CASCADE.
_PRUNE_FINISHED = """
DELETE FROM jobs WHERE id IN (
    SELECT id FROM jobs
     WHERE finished_at < now() - make_interval(secs => %(age)s)
       AND state IN ('SUCCEEDED', 'FAILED', 'DEAD', 'CANCELLED')
     ORDER BY finished_at LIMIT %(limit)s FOR UPDATE SKIP LOCKED)
RETURNING id
"""

_REQUEUE_DUE = """
UPDATE jobs SET state = 'QUEUED', attempt = attempt + 1, enqueued_at = now(), dispatched_at = now(),
                next_run_at = NULL, progress = 0, stage = '', state_reason = 'backoff elapsed'
 WHERE id IN (SELECT id FROM jobs WHERE state = 'RETRY_WAIT' AND next_run_at <= now()
               ORDER BY next_run_at LIMIT %(limit)s FOR UPDATE SKIP LOCKED)
RETURNING id, queue
"""

_STALE = """
  FROM jobs j
 WHERE j.state = 'QUEUED' AND j.dispatched_at < now() - make_interval(secs => %(age)s)
   AND NOT EXISTS (SELECT 1 FROM outbox o WHERE o.job_id = j.id)
"""

_STALE_QUEUES = f"SELECT DISTINCT j.queue {_STALE}"

_STALE_JOBS = (
    f"SELECT j.id, j.queue {_STALE} AND j.queue = ANY(%(queues)s) ORDER BY j.dispatched_at LIMIT %(limit)s"
)

# The same conditions again: a job claimed, cancelled or dispatched anew since it was found is left alone.
_REDISPATCH_STALE = f"""
UPDATE jobs SET dispatched_at = clock_timestamp(), state_reason = 're-dispatched: no worker took it'
 WHERE id IN (SELECT j.id {_STALE} AND j.id = ANY(%(ids)s) FOR UPDATE SKIP LOCKED)
RETURNING id
"""

# Stale jobs of queues whose lanes hold a backlog: only those a claim proves gone from the broker. A lane is
# FIFO and the relay publishes by priority, then in dispatch order, so a job K a worker claimed (RUNNING: few,
# at most the workers' concurrency) left no dispatch of its lane at K's priority or above, written over
# ``margin`` before K's (publish retries can reorder within it), waiting ahead of it: a QUEUED job J among
# them lost its message, or a worker holds it unclaimed (it then gets one duplicate, dropped at its claim; so
# may J when K was claimed through an older copy of its own dispatch). The latest K per queue and priority
# bounds J's dispatch time. dispatched_at is never earlier than enqueued_at by more than a submit statement
# lasts, so ``enqueued_at < K's dispatch`` loses no J and confines the scan, on the jobs_queued_order index in
# its order, to the jobs queued before K: not the lane's backlog, which was queued after it.
_REDISPATCH_OVERTAKEN = """
WITH claimed AS (
    SELECT queue, priority, dispatched_at FROM jobs WHERE state = 'RUNNING' AND queue = ANY(%(queues)s)
), latest AS (
    SELECT c.queue, p.priority, max(c.dispatched_at) AS dispatched_at
      FROM claimed c
      JOIN generate_series(0, %(max_priority)s) AS p(priority)
        ON c.priority <= p.priority AND (c.priority >= %(high)s) = (p.priority >= %(high)s)
     GROUP BY c.queue, p.priority
)
UPDATE jobs SET dispatched_at = clock_timestamp(),
                state_reason = 're-dispatched: a later dispatch of its lane was claimed before it'
 WHERE id IN (
    SELECT lost.id FROM latest l CROSS JOIN LATERAL (
        SELECT j.id FROM jobs j
         WHERE j.state = 'QUEUED' AND j.queue = l.queue AND j.priority = l.priority
           AND j.enqueued_at < l.dispatched_at
           AND j.dispatched_at < least(l.dispatched_at - make_interval(secs => %(margin)s),
                                      now() - make_interval(secs => %(age)s))
           AND NOT EXISTS (SELECT 1 FROM outbox o WHERE o.job_id = j.id)
         ORDER BY j.enqueued_at, j.id LIMIT %(limit)s FOR UPDATE SKIP LOCKED
    ) lost
    LIMIT %(limit)s)
RETURNING id
"""

_LOCK_OUTBOX = """
UPDATE outbox SET locked_until = clock_timestamp() + make_interval(secs => %(lock)s), publishes = publishes + 1
 WHERE id IN (SELECT id FROM outbox WHERE locked_until < clock_timestamp()
               ORDER BY priority DESC, id LIMIT %(limit)s FOR UPDATE SKIP LOCKED)
RETURNING *
"""


LEAST_BATCH_SHARE = 0.1
"""A batch of submits, claims or outcomes gets at least this share of a window: an item left with less when its
batch starts is answered at once (UNAVAILABLE; nothing sent), a tenth of its window early at most."""


def _spent_unavailable() -> errors.Unavailable:
    """A submit whose window passed while it waited for its batch (PostgreSQL silent or slow): nothing was sent."""
    return database_unavailable(
        "the job database", DatabaseStalled("its time was spent waiting behind other submits"), retried=True
    )


def _submit_outcome_unknown(new: NewJob) -> errors.Unavailable:
    """A submit whose statement PostgreSQL left unanswered: it may still commit, so the caller is told how to
    retry without queueing the job twice."""
    how = (
        "submit again with the same idempotency_key, which returns the job if it was"
        if new.idempotency_key
        else "a plain retry may queue it twice: give submits an idempotency_key to make retries safe"
    )
    return errors.Unavailable(
        f"the job database is unavailable (it did not answer in time), and whether the job was queued is "
        f"unknown: {how}",
        retry_after_seconds=1.0,
        retries_spent=True,
    )


def _spent_stalled() -> DatabaseStalled:
    """A claim or an outcome whose window passed while it waited for its batch: nothing was sent; the worker
    treats it as PostgreSQL away (``RETRY_ON``)."""
    return DatabaseStalled("PostgreSQL did not answer within the window, spent waiting behind other work")


class JobRepository:
    """The queue service's access to jobs and the outbox."""

    def __init__(self, pool: JobPool, *, submit_batch: int = 128, retry_timeout: float = 10.0) -> None:
        self.pool = pool
        self.retry_timeout = retry_timeout
        self._submits: GroupCommit[NewJob, Row | None] = GroupCommit(
            self._submit_many,
            max_batch=submit_batch,
            spent=_spent_unavailable,
            least_seconds=LEAST_BATCH_SHARE * retry_timeout,
        )

    def call_deadline(self) -> float:
        """The ``time.monotonic()`` instant by which a call starting now is answered, ``retry_timeout`` from
        now: give it to every read and write of one call (a GetJob reads the row, then its position and
        history), so that the call answers UNAVAILABLE within one window however far it got. Each read with a
        window of its own, a PostgreSQL that fell silent half-way through answered a window after that, plus
        what the call's earlier reads took."""
        return time.monotonic() + self.retry_timeout

    async def _retrying(self, operation: Callable[[], Awaitable[T]], *, deadline: float | None = None) -> T:
        """``operation`` under :func:`retrying`; PostgreSQL still away at ``deadline`` (:meth:`call_deadline`;
        None: after ``retry_timeout``, short of the callers' deadlines: the gateway's is 30 s) is UNAVAILABLE,
        which callers may retry."""
        try:
            return await retrying(operation, timeout=call_timeout(self.retry_timeout, deadline))
        except RETRY_ON as error:
            raise database_unavailable("the job database", error, retried=True) from error

    async def _transaction(
        self, body: Callable[[JobConnection], Awaitable[T]], *, deadline: float | None = None
    ) -> T:
        """``body`` in one transaction, retried as :meth:`_retrying` does, and taking effect at most once
        (:func:`~mesh.kit.db.transaction_once`)."""
        return await transaction_once(
            self.pool, body, what="the job database", timeout=call_timeout(self.retry_timeout, deadline)
        )

    async def _fetchone(self, query: str, params: Params, *, deadline: float | None = None) -> Row | None:
        return await self._retrying(lambda: _fetch_one(self.pool, query, params), deadline=deadline)

    async def _fetchall(self, query: str, params: Params, *, deadline: float | None = None) -> list[Row]:
        return await self._retrying(lambda: _fetch_all(self.pool, query, params), deadline=deadline)

    # --- the API -------------------------------------------------------------------------------------
    # ``deadline`` everywhere: the call's (:meth:`call_deadline`); None, a window of the method's own.

    async def submit(self, new: NewJob, *, deadline: float | None = None) -> Submitted:
        """Insert the job (its history and outbox rows come with it) or return the one with the same key.

        Concurrent submits share one statement and one commit (:class:`GroupCommit`); each returns once
        the transaction holding its job committed. Its window starts at the latest here, not when its batch
        starts: a submit that waited behind a batch PostgreSQL left unanswered is not given a window of its
        own after it (it answered after 19.9 s of a 10 s window)."""
        deadline = self.call_deadline() if deadline is None else deadline
        try:
            row = await self._submits.run(new, deadline=deadline)
        except errors.Unavailable as error:
            if isinstance(error.__cause__, DatabaseStalled):
                raise _submit_outcome_unknown(new) from error
            raise
        if row is not None:
            return Submitted(row, existing=False, position=int(row.pop("position")))
        # A conflict: our own earlier try (an ambiguous commit) or another job with the same key.
        found = await self._fetchone(
            "SELECT * FROM jobs WHERE id = %(id)s OR idempotency_key = %(idempotency_key)s "
            "ORDER BY (id = %(id)s) DESC LIMIT 1",
            {"id": new.id, "idempotency_key": new.idempotency_key},
            deadline=deadline,
        )
        if found is None:
            raise errors.Aborted("the job conflicted with another submit that vanished; submit again")
        position = await self.position(found, deadline=deadline)
        return Submitted(found, existing=found["id"] != new.id, position=position)

    async def _submit_many(self, batch: Sequence[NewJob], deadline: float | None) -> list[Row | None]:
        """One statement for the batch, retried until ``deadline`` (its earliest submit's window ends)."""
        params = {
            "id": [n.id for n in batch],
            "queue": [n.queue for n in batch],
            "image_id": [n.image_id for n in batch],
            "pipeline": [n.pipeline for n in batch],
            "model": [n.model for n in batch],
            "priority": [n.priority for n in batch],
            "idempotency_key": [n.idempotency_key for n in batch],
            "max_attempts": [n.max_attempts for n in batch],
            "base": [n.backoff_base_seconds for n in batch],
            "cap": [n.backoff_cap_seconds for n in batch],
            "traceparent": [n.traceparent for n in batch],
            "tracestate": [n.tracestate for n in batch],
        }
        rows = await self._fetchall(_SUBMIT_MANY, params, deadline=deadline)
        inserted = {row["id"]: row for row in rows}
        return [inserted.get(n.id) for n in batch]

    async def by_key(self, idempotency_key: str, *, deadline: float | None = None) -> Row | None:
        """The job submitted with this idempotency key, if any."""
        return await self._fetchone(
            "SELECT * FROM jobs WHERE idempotency_key = %s", (idempotency_key,), deadline=deadline
        )

    async def get(self, job_id: uuid.UUID, *, deadline: float | None = None) -> Row | None:
        """One job row."""
        return await self._fetchone("SELECT * FROM jobs WHERE id = %s", (job_id,), deadline=deadline)

    async def require(self, job_id: uuid.UUID, *, deadline: float | None = None) -> Row:
        """One job row, or NotFound."""
        row = await self.get(job_id, deadline=deadline)
        if row is None:
            raise job_not_found(job_id)
        return row

    async def history(self, job_id: uuid.UUID, *, deadline: float | None = None) -> list[Row]:
        """The job's transitions, oldest first."""
        return await self._fetchall(
            "SELECT * FROM job_history WHERE job_id = %s ORDER BY id", (job_id,), deadline=deadline
        )

    async def with_history(
        self, job_id: uuid.UUID, *, deadline: float | None = None
    ) -> tuple[Row, list[Row]]:
        """One job row and its transitions as of one instant (one REPEATABLE READ snapshot), or NotFound: read
        apart, the history could hold changes newer than the row, which a watch then took for the row's own."""

        async def read() -> tuple[Row | None, list[Row]]:
            async with self.pool.connection() as conn, conn.transaction():
                await conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")
                row = await (await conn.execute("SELECT * FROM jobs WHERE id = %s", (job_id,))).fetchone()
                history = await (
                    await conn.execute("SELECT * FROM job_history WHERE job_id = %s ORDER BY id", (job_id,))
                ).fetchall()
                return row, history

        row, history = await self._retrying(read, deadline=deadline)
        if row is None:
            raise job_not_found(job_id)
        return row, history

    async def position(self, row: Row, *, deadline: float | None = None) -> int:
        """1-based position of a queued job within its queue (0 when not queued); one indexed count."""
        if row["state"] != JobState.QUEUED:
            return 0
        found = await self._fetchone(_POSITION, row, deadline=deadline)
        return int(found["position"]) if found else 0

    async def positions(self, rows: Sequence[Row], *, deadline: float | None = None) -> dict[uuid.UUID, int]:
        """1-based positions of the queued ones among ``rows`` (by job id), in one statement."""
        queued = [r for r in rows if r["state"] == JobState.QUEUED]
        if not queued:
            return {}
        if len(queued) == 1:
            return {queued[0]["id"]: await self.position(queued[0], deadline=deadline)}
        found = await self._fetchall(
            _POSITIONS,
            {"queues": sorted({r["queue"] for r in queued}), "ids": [r["id"] for r in queued]},
            deadline=deadline,
        )
        return {r["id"]: int(r["position"]) for r in found}

    async def page(
        self, state: JobState | None, page_size: int, after: Cursor | None, *, deadline: float | None = None
    ) -> list[Row]:
        """A page of jobs, newest first; ``page_size + 1`` rows are read to know whether more follow."""
        where: list[str] = []
        params: dict[str, object] = {"limit": page_size + 1}
        if state is not None:
            where.append("state = %(state)s")
            params["state"] = state.value
        if after is not None:
            where.append("(created_at, id) < (%(created_at)s, %(id)s)")
            params.update({"created_at": after.created_at, "id": after.id})
        clause = f"WHERE {' AND '.join(where)}" if where else ""
        return await self._fetchall(
            f"SELECT * FROM jobs {clause} ORDER BY created_at DESC, id DESC LIMIT %(limit)s",
            params,
            deadline=deadline,
        )

    async def cancel(self, job_id: uuid.UUID, *, deadline: float | None = None) -> Row:
        """Queued or waiting -> CANCELLED at once; running -> cancel_requested (the worker ends it)."""

        async def body(conn: JobConnection) -> Row:
            row = await _lock_job(conn, job_id)
            try:
                target = cancel_target(JobState(row["state"]))
            except IllegalTransition as exc:
                raise errors.FailedPrecondition(str(exc), reason="JOB_FINISHED") from exc
            if target is None:
                query = (
                    "UPDATE jobs SET cancel_requested = true, state_reason = 'cancel requested by user' "
                    "WHERE id = %s RETURNING *"
                )
            else:
                query = (
                    "UPDATE jobs SET state = 'CANCELLED', finished_at = now(), next_run_at = NULL, "
                    "state_reason = 'cancelled by user' WHERE id = %s RETURNING *"
                )
            cursor = await conn.execute(query, (job_id,))
            updated = await cursor.fetchone()
            assert updated is not None  # the row is locked by this transaction
            return updated

        return await self._transaction(body, deadline=deadline)

    async def retry(self, job_id: uuid.UUID, *, deadline: float | None = None) -> Row:
        """A failed, dead or cancelled job -> QUEUED as a new attempt with a fresh attempt budget."""

        async def body(conn: JobConnection) -> Row:
            row = await _lock_job(conn, job_id)
            if JobState(row["state"]) not in RETRYABLE_BY_USER:
                raise errors.FailedPrecondition(
                    f"a {row['state']} job cannot be retried; only FAILED, DEAD or CANCELLED ones",
                    reason="JOB_NOT_RETRYABLE",
                )
            cursor = await conn.execute(
                "UPDATE jobs SET state = 'QUEUED', attempt = attempt + 1, run_first_attempt = attempt + 1,"
                " cancel_requested = false, dead_letters = 0, error_category = NULL, error_message = NULL,"
                " error_code = NULL, result = NULL, progress = 0, stage = '', enqueued_at = now(),"
                " dispatched_at = now(), finished_at = NULL, next_run_at = NULL, lease_owner = NULL,"
                " lease_expires_at = NULL, state_reason = 'retried by user' WHERE id = %s RETURNING *",
                (job_id,),
            )
            updated = await cursor.fetchone()
            assert updated is not None  # the row is locked by this transaction
            return updated

        return await self._transaction(body, deadline=deadline)

    async def counts(self) -> QueueCounts:
        """Counts per queue and state, oldest queued job per queue, jobs finished in the last minute."""

        async def run() -> QueueCounts:
            async with self.pool.connection() as conn:
                by_state = await (
                    await conn.execute("SELECT queue, state, count(*) AS n FROM jobs GROUP BY queue, state")
                ).fetchall()
                oldest = await (
                    await conn.execute(
                        "SELECT queue, min(enqueued_at) AS oldest FROM jobs WHERE state = 'QUEUED' GROUP BY queue"
                    )
                ).fetchall()
                recent = await (
                    await conn.execute(
                        "SELECT count(*) AS n, now() AS now FROM jobs"
                        " WHERE finished_at > now() - interval '60 seconds'"
                    )
                ).fetchone()
            assert recent is not None
            return QueueCounts(
                by_queue_state={(r["queue"], r["state"]): int(r["n"]) for r in by_state},
                oldest_queued_at={r["queue"]: r["oldest"] for r in oldest},
                finished_last_minute=int(recent["n"]),
                now=recent["now"],
            )

        return await self._retrying(run)

    # --- the relay -----------------------------------------------------------------------------------

    async def lock_outbox(self, limit: int, lock_seconds: float) -> list[Row]:
        """Take up to ``limit`` dispatches nobody is publishing (highest priority first) for a while."""
        return await self._fetchall(_LOCK_OUTBOX, {"limit": limit, "lock": lock_seconds})

    async def confirm_outbox(self, ids: Sequence[int]) -> None:
        """The broker confirmed these dispatches: they are done."""
        if ids:
            await self._fetchall("DELETE FROM outbox WHERE id = ANY(%s) RETURNING id", (list(ids),))

    async def release_outbox(self, ids: Sequence[int], delay_seconds: float) -> None:
        """Publishing failed: let these be taken again after ``delay_seconds``."""
        if ids:
            await self._fetchall(
                "UPDATE outbox SET locked_until = clock_timestamp() + make_interval(secs => %s)"
                " WHERE id = ANY(%s) RETURNING id",
                (delay_seconds, list(ids)),
            )

    async def outbox_backlog(self) -> tuple[int, float]:
        """Dispatches not yet confirmed, and the age in seconds of the oldest."""
        row = await self._fetchone(
            "SELECT count(*) AS n, coalesce(extract(epoch FROM now() - min(created_at)), 0) AS age FROM outbox",
            (),
        )
        assert row is not None
        return int(row["n"]), float(row["age"])

    # --- the reconciler ------------------------------------------------------------------------------

    async def prune_finished(self, older_than_seconds: float, limit: int = 1000) -> int:
        """Delete up to ``limit`` jobs that finished over ``older_than_seconds`` ago; returns how many."""
        return len(await self._fetchall(_PRUNE_FINISHED, {"age": older_than_seconds, "limit": limit}))

    async def requeue_due_retries(self, limit: int = 500) -> list[Row]:
        """RETRY_WAIT jobs whose backoff elapsed -> QUEUED as the next attempt (with a new dispatch)."""
        return await self._fetchall(_REQUEUE_DUE, {"limit": limit})

    async def expire_leases(self, limit: int = 200) -> list[tuple[uuid.UUID, JobState]]:
        """RUNNING jobs whose lease ran out: their worker is lost, a SYSTEM error of the attempt, which goes
        RETRY_WAIT with backoff (the next attempt is queued once it elapses) or FAILED when the attempts are
        spent (:func:`~mesh.services.queue.states.stalled_lease_outcome`); CANCELLED when cancel was asked."""

        async def body(conn: JobConnection) -> list[tuple[uuid.UUID, JobState]]:
            moved: list[tuple[uuid.UUID, JobState]] = []
            cursor = await conn.execute(
                "SELECT id, attempt, run_first_attempt, max_attempts, backoff_base_s, backoff_cap_s,"
                " cancel_requested FROM jobs WHERE state = 'RUNNING' AND lease_expires_at < now()"
                " ORDER BY lease_expires_at LIMIT %s FOR UPDATE SKIP LOCKED",
                (limit,),
            )
            jobs: list[Row] = await cursor.fetchall()
            for job in jobs:
                if job["cancel_requested"]:
                    await conn.execute(
                        "UPDATE jobs SET state = 'CANCELLED', finished_at = now(), lease_owner = NULL,"
                        " lease_expires_at = NULL,"
                        " state_reason = 'cancelled by user; its worker stopped answering' WHERE id = %s",
                        (job["id"],),
                    )
                    moved.append((job["id"], JobState.CANCELLED))
                    continue
                outcome = stalled_lease_outcome(
                    Attempts(job["attempt"], job["run_first_attempt"], job["max_attempts"]),
                    Backoff(job["backoff_base_s"], job["backoff_cap_s"]),
                )
                # As the worker commits a failed attempt (ClaimStore.finish), but clearing lease_owner: the
                # lost worker, should it come back, is told it was fenced out, not that it committed.
                await conn.execute(
                    "UPDATE jobs SET state = %(state)s, lease_owner = NULL, lease_expires_at = NULL,"
                    " error_category = 'SYSTEM', error_message = %(message)s, error_code = NULL,"
                    " next_run_at = CASE WHEN %(delay)s::float8 IS NULL THEN NULL"
                    "                    ELSE clock_timestamp() + make_interval(secs => %(delay)s::float8) END,"
                    " finished_at = CASE WHEN %(state)s = 'FAILED' THEN now() END,"
                    " state_reason = %(reason)s WHERE id = %(id)s",
                    {
                        "id": job["id"],
                        "state": outcome.state.value,
                        "message": LEASE_EXPIRED_MESSAGE,
                        "delay": outcome.delay_seconds,
                        "reason": outcome.reason,
                    },
                )
                moved.append((job["id"], outcome.state))
            return moved

        return await self._transaction(body)

    async def stale_queues(self, older_than_seconds: float) -> list[str]:
        """The queues holding QUEUED jobs that nobody claimed for a long time, with no dispatch pending."""
        return [row["queue"] for row in await self._fetchall(_STALE_QUEUES, {"age": older_than_seconds})]

    async def stale_jobs(
        self, older_than_seconds: float, queues: Sequence[str], limit: int = 200
    ) -> list[Row]:
        """Those jobs of ``queues`` (``id``, ``queue``), the oldest dispatches first."""
        return await self._fetchall(
            _STALE_JOBS, {"age": older_than_seconds, "queues": list(queues), "limit": limit}
        )

    async def redispatch_stale(self, older_than_seconds: float, job_ids: Sequence[uuid.UUID]) -> list[Row]:
        """Those of ``job_ids`` that are still stale -> dispatched again."""
        return await self._fetchall(_REDISPATCH_STALE, {"age": older_than_seconds, "ids": list(job_ids)})

    async def redispatch_overtaken(
        self, older_than_seconds: float, queues: Sequence[str], *, margin_seconds: float, limit: int = 200
    ) -> list[Row]:
        """Those jobs of ``queues`` whose dispatch a worker's claim of a later one of their lane, at their
        priority or below and written over ``margin_seconds`` after theirs, proves gone from the broker ->
        dispatched again (for queues whose lanes hold a backlog, where a waiting dispatch is no sign of loss)."""
        return await self._fetchall(
            _REDISPATCH_OVERTAKEN,
            {
                "age": older_than_seconds,
                "queues": list(queues),
                "margin": margin_seconds,
                "high": HIGH_PRIORITY,
                "max_priority": MAX_PRIORITY,
                "limit": limit,
            },
        )

    # --- dead letters --------------------------------------------------------------------------------

    async def dead_letter(
        self,
        job_id: uuid.UUID,
        attempt: int,
        reason: str,
        *,
        delivery_limit: int,
        generation: int | None = None,
    ) -> JobState | None:
        """A dispatch of this attempt reached the dead-letter queue: DEAD, dispatched again (QUEUED) when the
        job was collateral, CANCELLED when its user asked to cancel it (see
        :func:`~mesh.services.queue.states.dead_letter_outcome`); None when it moved on.

        ``generation`` is the job's dead-letter count when the dispatch was written (``JobDispatch.dead_letters``;
        None for a dispatch that predates it): a dead letter of an earlier generation is stale (None), so one
        redelivered because its ack was lost after this commit does not count twice."""

        async def body(conn: JobConnection) -> JobState | None:
            cursor = await conn.execute(
                "SELECT state, attempt_claims, dead_letters, cancel_requested FROM jobs"
                " WHERE id = %(id)s AND attempt = %(attempt)s"
                " AND (%(generation)s::integer IS NULL OR dead_letters = %(generation)s) FOR UPDATE",
                {"id": job_id, "attempt": attempt, "generation": generation},
            )
            row: Row | None = await cursor.fetchone()
            if row is None:
                return None
            target = dead_letter_outcome(
                DeadLetterFacts(
                    JobState(row["state"]),
                    row["attempt_claims"],
                    row["dead_letters"],
                    row["cancel_requested"],
                ),
                delivery_limit=delivery_limit,
            )
            if target is JobState.DEAD:
                await conn.execute(
                    "UPDATE jobs SET state = 'DEAD', finished_at = now(), lease_owner = NULL, lease_expires_at = NULL,"
                    " dead_letters = dead_letters + 1, error_category = 'SYSTEM', error_message = %(reason)s,"
                    " state_reason = %(reason)s WHERE id = %(id)s",
                    {"id": job_id, "reason": reason},
                )
            elif target is JobState.CANCELLED:
                await conn.execute(
                    "UPDATE jobs SET state = 'CANCELLED', finished_at = now(), next_run_at = NULL, lease_owner = NULL,"
                    " lease_expires_at = NULL, dead_letters = dead_letters + 1, state_reason = %(reason)s"
                    " WHERE id = %(id)s",
                    {"id": job_id, "reason": f"cancelled by user; {reason}, and no worker runs it any more"},
                )
            elif target is JobState.QUEUED:
                await conn.execute(
                    "UPDATE jobs SET state = 'QUEUED', dispatched_at = clock_timestamp(), lease_owner = NULL,"
                    " lease_expires_at = NULL, dead_letters = dead_letters + 1, progress = 0, stage = '',"
                    " state_reason = %(reason)s WHERE id = %(id)s",
                    {
                        "id": job_id,
                        "reason": f"{reason}; collateral of another job's crashes, dispatched again",
                    },
                )
            return target

        return await self._transaction(body)


# --- the worker's side -------------------------------------------------------------------------------

# Claims of several dispatches in one statement (see GroupCommit); each row is still fenced by its own
# id, attempt and claim token. The same job twice in a batch (a duplicate dispatch) is claimed by one
# token only; the other finds no row with its token and drops its dispatch.
_CLAIM_MANY = """
UPDATE jobs
   SET state = 'RUNNING', lease_owner = v.token,
       lease_expires_at = clock_timestamp() + make_interval(secs => v.lease),
       started_at = CASE WHEN jobs.lease_owner = v.token THEN jobs.started_at ELSE now() END,
       executions = CASE WHEN jobs.lease_owner = v.token THEN jobs.executions ELSE jobs.executions + 1 END,
       attempt_claims = CASE WHEN jobs.lease_owner = v.token THEN jobs.attempt_claims
                             ELSE jobs.attempt_claims + 1 END,
       progress = 0, stage = '',
       state_reason = CASE WHEN jobs.state = 'RUNNING' THEN 'redelivered: taken over by another worker'
                           ELSE 'claimed by a worker' END
  FROM unnest(%(id)s::uuid[], %(attempt)s::integer[], %(token)s::uuid[], %(redelivered)s::boolean[],
              %(lease)s::float8[]) AS v(id, attempt, token, redelivered, lease)
 WHERE jobs.id = v.id AND jobs.attempt = v.attempt
   AND (jobs.state = 'QUEUED'
        OR (jobs.state = 'RUNNING' AND jobs.lease_owner = v.token)
        OR (jobs.state = 'RUNNING' AND v.redelivered AND NOT jobs.cancel_requested))
RETURNING jobs.*
"""

_BEAT = """
UPDATE jobs SET lease_expires_at = clock_timestamp() + make_interval(secs => %(lease)s),
                progress = coalesce(%(progress)s, progress), stage = coalesce(%(stage)s, stage)
 WHERE id = %(id)s AND lease_owner = %(token)s AND state = 'RUNNING'
RETURNING cancel_requested
"""

# Outcomes of several attempts in one statement (see GroupCommit), each fenced by its own claim token.
_FINISH_MANY = """
UPDATE jobs
   SET state = CASE WHEN jobs.cancel_requested AND v.state = 'RETRY_WAIT' THEN 'CANCELLED' ELSE v.state END,
       result = v.result, error_category = v.category, error_message = v.message, error_code = v.code,
       progress = CASE WHEN v.state = 'SUCCEEDED' THEN 1 ELSE jobs.progress END,
       next_run_at = CASE WHEN jobs.cancel_requested OR v.delay IS NULL THEN NULL
                          ELSE clock_timestamp() + make_interval(secs => v.delay) END,
       finished_at = CASE WHEN v.state = 'RETRY_WAIT' AND NOT jobs.cancel_requested THEN NULL ELSE now() END,
       lease_expires_at = NULL,
       state_reason = CASE WHEN jobs.cancel_requested AND v.state = 'RETRY_WAIT'
                           THEN 'cancelled by user after a failed attempt' ELSE v.reason END
  FROM unnest(%(id)s::uuid[], %(token)s::uuid[], %(state)s::text[], %(result)s::bytea[],
              %(category)s::text[], %(message)s::text[], %(code)s::text[], %(delay)s::float8[],
              %(reason)s::text[]) AS v(id, token, state, result, category, message, code, delay, reason)
 WHERE jobs.id = v.id AND jobs.lease_owner = v.token AND jobs.state = 'RUNNING'
RETURNING jobs.lease_owner AS token, jobs.state
"""

# A stopping worker gives back an attempt it will not finish: QUEUED again at the same attempt, so that no
# attempt of the budget is spent on a stop (an expired lease is a SYSTEM error of the attempt). The move writes
# the job's next dispatch (the transition trigger), and the claim is taken back from attempt_claims: a
# handed-back claim did not crash its worker, which is what the dead-letter consumer counts claims for.
# A job asked to cancel is left to end CANCELLED as it would have.
_RELEASE = """
UPDATE jobs SET state = 'QUEUED', lease_owner = NULL, lease_expires_at = NULL, progress = 0, stage = '',
                attempt_claims = greatest(attempt_claims - 1, 0), dispatched_at = clock_timestamp(),
                state_reason = 'handed back: its worker stopped before the attempt ended'
 WHERE id = %(id)s AND lease_owner = %(token)s AND state = 'RUNNING' AND NOT cancel_requested
RETURNING id
"""

# After a retried batch: outcomes an earlier try committed before its connection dropped (our token on a
# row that moved on). Everything else that moves a RUNNING job on (an expired lease, a dead letter, a user's
# retry) clears its lease_owner, so a superseded worker is told it was fenced out, not that it committed.
_FINISHED_BEFORE = """
SELECT jobs.lease_owner AS token, jobs.state FROM jobs
  JOIN unnest(%(id)s::uuid[], %(token)s::uuid[]) AS v(id, token)
    ON jobs.id = v.id AND jobs.lease_owner = v.token
 WHERE jobs.state <> 'RUNNING'
"""

# A batch that deadlocks with another (two workers holding duplicate dispatches of the same jobs) rolled
# back as a whole: it is simply run again.
BATCH_RETRY_ON = (*RETRY_ON, psycopg.errors.DeadlockDetected)


@dataclass(frozen=True)
class _Claim:
    id: uuid.UUID
    attempt: int
    token: uuid.UUID
    redelivered: bool
    lease: float


@dataclass(frozen=True)
class _Finish:
    id: uuid.UUID
    token: uuid.UUID
    outcome: Outcome


@dataclass(frozen=True)
class Outcome:
    """How an attempt ended, as the worker commits it."""

    state: JobState
    reason: str
    result: bytes | None = None
    category: ErrorCategory | None = None
    message: str | None = None
    code: str | None = None
    delay_seconds: float | None = None


class ClaimStore:
    """The worker's access to jobs: every write is fenced by the claim token.

    Claims and outcomes of concurrent jobs are grouped into one statement each (:class:`GroupCommit`),
    so a busy worker commits many per round trip; each caller still gets its own fenced answer.

    Each operation is retried for ``retry_timeout`` while PostgreSQL drops connections or stays silent, then
    raises (one of ``RETRY_ON``). For a claim or an outcome that window starts when it is asked for, not when
    its batch starts (:class:`~mesh.services.queue.batching.GroupCommit`'s deadlines)."""

    def __init__(self, pool: JobPool, *, retry_timeout: float = 30.0, max_batch: int = 128) -> None:
        self.pool = pool
        self.retry_timeout = retry_timeout
        self._claims: GroupCommit[_Claim, Row | None] = GroupCommit(
            self._claim_many,
            max_batch=max_batch,
            spent=_spent_stalled,
            least_seconds=LEAST_BATCH_SHARE * retry_timeout,
        )
        self._finishes: GroupCommit[_Finish, str | None] = GroupCommit(
            self._finish_many,
            max_batch=max_batch,
            spent=_spent_stalled,
            least_seconds=LEAST_BATCH_SHARE * retry_timeout,
        )

    def _deadline(self) -> float:
        """The window of a claim or an outcome asked for now: ``retry_timeout`` from now."""
        return time.monotonic() + self.retry_timeout

    async def _fetchone(self, query: str, params: Params) -> Row | None:
        return await retrying(lambda: _fetch_one(self.pool, query, params), timeout=self.retry_timeout)

    async def _fetchall(self, query: str, params: Params, *, deadline: float | None) -> list[Row]:
        """The rows of one statement of a batch, retried (a deadlock too) until ``deadline``."""
        return await retrying(
            lambda: _fetch_all(self.pool, query, params),
            timeout=call_timeout(self.retry_timeout, deadline),
            on=BATCH_RETRY_ON,
        )

    async def claim(
        self, job_id: uuid.UUID, attempt: int, token: uuid.UUID, *, redelivered: bool, lease_seconds: float
    ) -> Row | None:
        """QUEUED -> RUNNING for this attempt (or take over a redelivered RUNNING one); None: drop it."""
        return await self._claims.run(
            _Claim(job_id, attempt, token, redelivered, lease_seconds), deadline=self._deadline()
        )

    async def _claim_many(self, batch: Sequence[_Claim], deadline: float | None) -> list[Row | None]:
        """One statement for the batch, retried until ``deadline`` (its earliest claim's window ends)."""
        rows = await self._fetchall(
            _CLAIM_MANY,
            {
                "id": [c.id for c in batch],
                "attempt": [c.attempt for c in batch],
                "token": [c.token for c in batch],
                "redelivered": [c.redelivered for c in batch],
                "lease": [c.lease for c in batch],
            },
            deadline=deadline,
        )
        claimed = {row["lease_owner"]: row for row in rows}
        return [claimed.get(c.token) for c in batch]

    async def beat(
        self,
        job_id: uuid.UUID,
        token: uuid.UUID,
        *,
        lease_seconds: float,
        progress: float | None = None,
        stage: str | None = None,
    ) -> bool | None:
        """Extend the lease (and record progress); returns cancel_requested, or None when the lease is lost."""
        row = await self._fetchone(
            _BEAT,
            {"id": job_id, "token": token, "lease": lease_seconds, "progress": progress, "stage": stage},
        )
        return None if row is None else bool(row["cancel_requested"])

    async def release(self, job_id: uuid.UUID, token: uuid.UUID) -> bool:
        """Give the claim back without an outcome (RUNNING -> QUEUED at the same attempt, with a new dispatch);
        False when the claim no longer holds the job or its user asked to cancel it."""
        return await self._fetchone(_RELEASE, {"id": job_id, "token": token}) is not None

    async def finish(self, job_id: uuid.UUID, token: uuid.UUID, outcome: Outcome) -> str | None:
        """Commit the attempt's outcome; returns the state written, or None when fenced out."""
        return await self._finishes.run(_Finish(job_id, token, outcome), deadline=self._deadline())

    async def _finish_many(self, batch: Sequence[_Finish], deadline: float | None) -> list[str | None]:
        """One statement for the batch, and the look-up of outcomes an earlier try of it committed, both
        by ``deadline`` (its earliest outcome's window ends)."""
        outcomes = [f.outcome for f in batch]
        params = {
            "id": [f.id for f in batch],
            "token": [f.token for f in batch],
            "state": [o.state.value for o in outcomes],
            "result": [o.result for o in outcomes],
            "category": [o.category.value if o.category else None for o in outcomes],
            "message": [o.message for o in outcomes],
            "code": [o.code for o in outcomes],
            "delay": [o.delay_seconds for o in outcomes],
            "reason": [o.reason for o in outcomes],
        }
        rows = await self._fetchall(_FINISH_MANY, params, deadline=deadline)
        written = {row["token"]: str(row["state"]) for row in rows}
        missing = [f for f in batch if f.token not in written]
        if missing:
            # Fenced out, or an earlier try of this batch committed before its connection dropped.
            again = await self._fetchall(
                _FINISHED_BEFORE,
                {"id": [f.id for f in missing], "token": [f.token for f in missing]},
                deadline=deadline,
            )
            written.update({row["token"]: str(row["state"]) for row in again})
        return [written.get(f.token) for f in batch]
