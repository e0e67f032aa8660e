"""Jobs, their history and the dispatch outbox on PostgreSQL (psycopg 3, async pool).

Two faces of one schema: :class:`JobRepository` for the queue service (submit, read, cancel, retry, the
relay's outbox and the reconciler's sweeps) and :class:`ClaimStore` for workers (fenced claim, lease beat,
progress, the attempt's outcome). Every statement is one round trip in autocommit mode unless it needs a
transaction; triggers (migration 0001) write the history and the outbox row of every move into QUEUED, so no
code path can queue a job without its dispatch.

Operations retry on a dropped connection (``pg_terminate_backend``, a restart). The ones that change state
are written so that a retry after an ambiguous commit is harmless: submit carries a client-made id, claims
and outcomes carry the worker's claim token.
"""

from __future__ import annotations

import base64
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, TypeVar

import psycopg
import stamina
from psycopg.rows import dict_row
from psycopg_pool import AsyncConnectionPool

from mesh.kit import errors
from mesh.services.queue.states import (
    RETRYABLE_BY_USER,
    Attempts,
    DeadLetterFacts,
    ErrorCategory,
    IllegalTransition,
    JobState,
    cancel_target,
    dead_letter_outcome,
    stalled_lease_outcome,
)

MIGRATIONS = "mesh.services.queue.migrations"
"""The package of the queue schema's SQL migrations (applied by the service and by every worker)."""

Row = dict[str, Any]
T = TypeVar("T")

# Dropped connections and the like; a retry on a fresh connection may succeed.
RETRY_ON = (psycopg.OperationalError, psycopg.errors.AdminShutdown)


def open_pool(url: str, *, name: str, max_size: int, min_size: int = 1) -> AsyncConnectionPool:
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
        kwargs={"autocommit": True, "row_factory": dict_row},
    )


async def retrying(operation: Callable[[], Awaitable[T]], *, timeout: float = 30.0) -> T:
    """Run ``operation`` again on a fresh connection while PostgreSQL drops connections."""
    try:
        return await operation()  # the common case, without the retry machinery's cost
    except RETRY_ON:
        pass
    async for attempt in stamina.retry_context(
        on=RETRY_ON, attempts=None, timeout=timeout, wait_initial=0.01, wait_max=0.25
    ):
        with attempt:
            return await operation()
    raise AssertionError("unreachable: stamina either returns or raises")


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
class PageToken:
    """Where a listing page ends (newest first: created_at, then id, both descending)."""

    created_at: datetime
    id: uuid.UUID

    def encode(self) -> str:
        raw = f"{self.created_at.isoformat()}|{self.id}".encode()
        return base64.urlsafe_b64encode(raw).decode().rstrip("=")

    @classmethod
    def decode(cls, token: str) -> PageToken:
        try:
            raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)).decode()
            created, ident = raw.split("|")
            return cls(datetime.fromisoformat(created), uuid.UUID(ident))
        except (ValueError, UnicodeDecodeError) as exc:
            raise errors.InvalidArgument(
                "page_token is not valid",
                field_violations=[errors.FieldViolation("page_token", "use a token from a previous page")],
            ) from exc


@dataclass(frozen=True)
class QueueCounts:
    """Job counts and ages for statistics and gauges."""

    by_queue_state: dict[tuple[str, str], int]
    oldest_queued_at: dict[str, datetime]
    finished_last_minute: int
    now: datetime


_SUBMIT = """
WITH ins AS (
    INSERT INTO jobs (id, queue, state, image_id, pipeline, model, priority, idempotency_key, max_attempts,
                      backoff_base_s, backoff_cap_s, traceparent, tracestate, state_reason)
    VALUES (%(id)s, %(queue)s, 'QUEUED', %(image_id)s, %(pipeline)s, %(model)s, %(priority)s,
            %(idempotency_key)s, %(max_attempts)s, %(base)s, %(cap)s, %(traceparent)s, %(tracestate)s,
            'submitted')
    ON CONFLICT DO NOTHING
    RETURNING *
)
SELECT ins.*,
       (SELECT count(*) FROM jobs j
         WHERE j.state = 'QUEUED' AND j.queue = ins.queue AND j.priority >= ins.priority) + 1 AS position
  FROM ins
"""

_POSITION = """
SELECT count(*) + 1 AS position FROM jobs
 WHERE state = 'QUEUED' AND queue = %(queue)s
   AND (priority > %(priority)s OR (priority = %(priority)s AND (enqueued_at, id) < (%(enqueued_at)s, %(id)s)))
"""

_REQUEUE_DUE = """
UPDATE jobs SET state = 'QUEUED', attempt = attempt + 1, enqueued_at = now(), dispatched_at = now(),
                next_run_at = NULL, progress = 0, stage = '', state_reason = 'backoff elapsed'
 WHERE id IN (SELECT id FROM jobs WHERE state = 'RETRY_WAIT' AND next_run_at <= now()
               ORDER BY next_run_at LIMIT %(limit)s FOR UPDATE SKIP LOCKED)
RETURNING id, queue
"""

_REDISPATCH_STALE = """
UPDATE jobs SET dispatched_at = clock_timestamp(), state_reason = 're-dispatched: no worker took it'
 WHERE id IN (SELECT j.id FROM jobs j
               WHERE j.state = 'QUEUED' AND j.dispatched_at < now() - make_interval(secs => %(age)s)
                 AND NOT EXISTS (SELECT 1 FROM outbox o WHERE o.job_id = j.id)
               LIMIT %(limit)s FOR UPDATE SKIP LOCKED)
RETURNING id
"""

_LOCK_OUTBOX = """
UPDATE outbox SET locked_until = clock_timestamp() + make_interval(secs => %(lock)s), publishes = publishes + 1
 WHERE id IN (SELECT id FROM outbox WHERE locked_until < clock_timestamp()
               ORDER BY priority DESC, id LIMIT %(limit)s FOR UPDATE SKIP LOCKED)
RETURNING *
"""


@dataclass
class PoolCheck:
    """Health: PostgreSQL answers through ``pool`` (a dead connection is replaced, not reported)."""

    pool: AsyncConnectionPool
    name: str = "postgresql"

    async def check(self) -> str:
        async def probe() -> None:
            async with self.pool.connection(timeout=2.0) as conn:
                await conn.execute("SELECT 1")

        await retrying(probe, timeout=2.0)
        return f"pool {self.pool.get_stats().get('pool_size', 0)} connections"


class JobRepository:
    """The queue service's access to jobs and the outbox."""

    def __init__(self, pool: AsyncConnectionPool) -> None:
        self.pool = pool

    async def _fetchone(self, query: str, params: dict[str, Any] | Sequence[Any]) -> Row | None:
        async def run() -> Row | None:
            async with self.pool.connection() as conn:
                cursor = await conn.execute(query, params)
                row: Row | None = await cursor.fetchone()  # type: ignore[assignment]
                return row

        return await retrying(run)

    async def _fetchall(self, query: str, params: dict[str, Any] | Sequence[Any]) -> list[Row]:
        async def run() -> list[Row]:
            async with self.pool.connection() as conn:
                cursor = await conn.execute(query, params)
                rows: list[Row] = await cursor.fetchall()  # type: ignore[assignment]
                return rows

        return await retrying(run)

    # --- the API -------------------------------------------------------------------------------------

    async def submit(self, new: NewJob) -> Submitted:
        """Insert the job (its history and outbox rows come with it) or return the one with the same key."""
        params = {
            "id": new.id,
            "queue": new.queue,
            "image_id": new.image_id,
            "pipeline": new.pipeline,
            "model": new.model,
            "priority": new.priority,
            "idempotency_key": new.idempotency_key,
            "max_attempts": new.max_attempts,
            "base": new.backoff_base_seconds,
            "cap": new.backoff_cap_seconds,
            "traceparent": new.traceparent,
            "tracestate": new.tracestate,
        }
        row = await self._fetchone(_SUBMIT, params)
        if row is not None:
            return Submitted(row, existing=False, position=int(row.pop("position")))
        # A conflict: our own earlier try (an ambiguous commit) or another job with the same key.
        found = await self._fetchone(
            "SELECT * FROM jobs WHERE id = %(id)s OR idempotency_key = %(idempotency_key)s "
            "ORDER BY (id = %(id)s) DESC LIMIT 1",
            params,
        )
        if found is None:
            raise errors.Aborted("the job conflicted with another submit that vanished; submit again")
        return Submitted(found, existing=found["id"] != new.id, position=await self.position(found))

    async def get(self, job_id: uuid.UUID) -> Row | None:
        """One job row."""
        return await self._fetchone("SELECT * FROM jobs WHERE id = %s", (job_id,))

    async def require(self, job_id: uuid.UUID) -> Row:
        """One job row, or NotFound."""
        row = await self.get(job_id)
        if row is None:
            raise errors.NotFound(f"job {job_id} does not exist", metadata={"job_id": str(job_id)})
        return row

    async def history(self, job_id: uuid.UUID) -> list[Row]:
        """The job's transitions, oldest first."""
        return await self._fetchall("SELECT * FROM job_history WHERE job_id = %s ORDER BY id", (job_id,))

    async def position(self, row: Row) -> int:
        """1-based position of a queued job within its queue (0 when not queued); one indexed count."""
        if row["state"] != JobState.QUEUED:
            return 0
        found = await self._fetchone(_POSITION, row)
        return int(found["position"]) if found else 0

    async def page(self, state: JobState | None, page_size: int, after: PageToken | None) -> list[Row]:
        """A page of jobs, newest first; ``page_size + 1`` rows are read to know whether more follow."""
        where, params = [], {"limit": page_size + 1}
        if state is not None:
            where.append("state = %(state)s")
            params["state"] = state.value  # type: ignore[assignment]
        if after is not None:
            where.append("(created_at, id) < (%(created_at)s, %(id)s)")
            params.update({"created_at": after.created_at, "id": after.id})  # type: ignore[dict-item]
        clause = f"WHERE {' AND '.join(where)}" if where else ""
        return await self._fetchall(
            f"SELECT * FROM jobs {clause} ORDER BY created_at DESC, id DESC LIMIT %(limit)s", params
        )

    async def cancel(self, job_id: uuid.UUID) -> Row:
        """Queued or waiting -> CANCELLED at once; running -> cancel_requested (the worker ends it)."""

        async def run() -> Row:
            async with self.pool.connection() as conn, conn.transaction():
                cursor = await conn.execute("SELECT * FROM jobs WHERE id = %s FOR UPDATE", (job_id,))
                row: Row | None = await cursor.fetchone()  # type: ignore[assignment]
                if row is None:
                    raise errors.NotFound(f"job {job_id} does not exist", metadata={"job_id": str(job_id)})
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
                updated: Row = await cursor.fetchone()  # type: ignore[assignment]
                return updated

        return await retrying(run)

    async def retry(self, job_id: uuid.UUID) -> Row:
        """A failed, dead or cancelled job -> QUEUED as a new attempt with a fresh attempt budget."""

        async def run() -> Row:
            async with self.pool.connection() as conn, conn.transaction():
                cursor = await conn.execute("SELECT * FROM jobs WHERE id = %s FOR UPDATE", (job_id,))
                row: Row | None = await cursor.fetchone()  # type: ignore[assignment]
                if row is None:
                    raise errors.NotFound(f"job {job_id} does not exist", metadata={"job_id": str(job_id)})
                if JobState(row["state"]) not in RETRYABLE_BY_USER:
                    raise errors.FailedPrecondition(
                        f"a {row['state']} job cannot be retried; only FAILED, DEAD or CANCELLED ones",
                        reason="JOB_NOT_RETRYABLE",
                    )
                cursor = await conn.execute(
                    "UPDATE jobs SET state = 'QUEUED', attempt = attempt + 1, run_first_attempt = attempt + 1,"
                    " cancel_requested = false, error_category = NULL, error_message = NULL,"
                    " error_code = NULL, result = NULL, progress = 0, stage = '', enqueued_at = now(),"
                    " dispatched_at = now(), finished_at = NULL, next_run_at = NULL, lease_owner = NULL,"
                    " lease_expires_at = NULL, state_reason = 'retried by user' WHERE id = %s RETURNING *",
                    (job_id,),
                )
                updated: Row = await cursor.fetchone()  # type: ignore[assignment]
                return updated

        return await retrying(run)

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
                by_queue_state={(r["queue"], r["state"]): int(r["n"]) for r in by_state},  # type: ignore[call-overload]
                oldest_queued_at={r["queue"]: r["oldest"] for r in oldest},  # type: ignore[call-overload]
                finished_last_minute=int(recent["n"]),  # type: ignore[call-overload]
                now=recent["now"],  # type: ignore[call-overload]
            )

        return await retrying(run)

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

    async def requeue_due_retries(self, limit: int = 500) -> list[Row]:
        """RETRY_WAIT jobs whose backoff elapsed -> QUEUED as the next attempt (with a new dispatch)."""
        return await self._fetchall(_REQUEUE_DUE, {"limit": limit})

    async def expire_leases(self, limit: int = 200) -> list[tuple[uuid.UUID, JobState]]:
        """RUNNING jobs whose lease ran out -> QUEUED as the next attempt, or FAILED when attempts are spent
        (or CANCELLED when cancel was asked)."""

        async def run() -> list[tuple[uuid.UUID, JobState]]:
            moved: list[tuple[uuid.UUID, JobState]] = []
            async with self.pool.connection() as conn, conn.transaction():
                cursor = await conn.execute(
                    "SELECT id, attempt, run_first_attempt, max_attempts, cancel_requested FROM jobs"
                    " WHERE state = 'RUNNING' AND lease_expires_at < now()"
                    " ORDER BY lease_expires_at LIMIT %s FOR UPDATE SKIP LOCKED",
                    (limit,),
                )
                for row in await cursor.fetchall():
                    job: Row = row  # type: ignore[assignment]
                    if job["cancel_requested"]:
                        await conn.execute(
                            "UPDATE jobs SET state = 'CANCELLED', finished_at = now(), lease_expires_at = NULL,"
                            " state_reason = 'cancelled by user; its worker stopped answering' WHERE id = %s",
                            (job["id"],),
                        )
                        moved.append((job["id"], JobState.CANCELLED))
                        continue
                    outcome = stalled_lease_outcome(
                        Attempts(job["attempt"], job["run_first_attempt"], job["max_attempts"])
                    )
                    if outcome.state is JobState.QUEUED:
                        await conn.execute(
                            "UPDATE jobs SET state = 'QUEUED', attempt = attempt + 1, enqueued_at = now(),"
                            " dispatched_at = now(), lease_expires_at = NULL, progress = 0, stage = '',"
                            " state_reason = %s WHERE id = %s",
                            (outcome.reason, job["id"]),
                        )
                    else:
                        await conn.execute(
                            "UPDATE jobs SET state = 'FAILED', finished_at = now(), lease_expires_at = NULL,"
                            " error_category = 'SYSTEM', error_message = %s, state_reason = %s WHERE id = %s",
                            (outcome.reason, outcome.reason, job["id"]),
                        )
                    moved.append((job["id"], outcome.state))
            return moved

        return await retrying(run)

    async def redispatch_stale(self, older_than_seconds: float, limit: int = 200) -> list[Row]:
        """QUEUED jobs nobody claimed for a long time and with no dispatch pending -> dispatched again."""
        return await self._fetchall(_REDISPATCH_STALE, {"age": older_than_seconds, "limit": limit})

    # --- dead letters --------------------------------------------------------------------------------

    async def dead_letter(
        self, job_id: uuid.UUID, attempt: int, reason: str, *, delivery_limit: int
    ) -> JobState | None:
        """A dispatch of this attempt reached the dead-letter queue: DEAD, or dispatched again when the job
        was collateral (see :func:`~mesh.services.queue.states.dead_letter_outcome`); None when it moved on."""

        async def run() -> JobState | None:
            async with self.pool.connection() as conn, conn.transaction():
                cursor = await conn.execute(
                    "SELECT state, attempt_claims, dead_letters FROM jobs"
                    " WHERE id = %s AND attempt = %s FOR UPDATE",
                    (job_id, attempt),
                )
                row: Row | None = await cursor.fetchone()  # type: ignore[assignment]
                if row is None:
                    return None
                target = dead_letter_outcome(
                    DeadLetterFacts(JobState(row["state"]), row["attempt_claims"], row["dead_letters"]),
                    delivery_limit=delivery_limit,
                )
                if target is JobState.DEAD:
                    await conn.execute(
                        "UPDATE jobs SET state = 'DEAD', finished_at = now(), lease_expires_at = NULL,"
                        " dead_letters = dead_letters + 1, error_category = 'SYSTEM', error_message = %(reason)s,"
                        " state_reason = %(reason)s WHERE id = %(id)s",
                        {"id": job_id, "reason": reason},
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

        return await retrying(run)


# --- the worker's side -------------------------------------------------------------------------------

_CLAIM = """
UPDATE jobs
   SET state = 'RUNNING', lease_owner = %(token)s,
       lease_expires_at = clock_timestamp() + make_interval(secs => %(lease)s),
       started_at = CASE WHEN lease_owner = %(token)s THEN started_at ELSE now() END,
       executions = CASE WHEN lease_owner = %(token)s THEN executions ELSE executions + 1 END,
       attempt_claims = CASE WHEN lease_owner = %(token)s THEN attempt_claims ELSE attempt_claims + 1 END,
       progress = 0, stage = '',
       state_reason = CASE WHEN state = 'RUNNING' THEN 'redelivered: taken over by another worker'
                           ELSE 'claimed by a worker' END
 WHERE id = %(id)s AND attempt = %(attempt)s
   AND (state = 'QUEUED'
        OR (state = 'RUNNING' AND lease_owner = %(token)s)
        OR (state = 'RUNNING' AND %(redelivered)s AND NOT cancel_requested))
RETURNING *
"""

_BEAT = """
UPDATE jobs SET lease_expires_at = clock_timestamp() + make_interval(secs => %(lease)s),
                progress = coalesce(%(progress)s, progress), stage = coalesce(%(stage)s, stage)
 WHERE id = %(id)s AND lease_owner = %(token)s AND state = 'RUNNING'
RETURNING cancel_requested
"""

_FINISH = """
UPDATE jobs
   SET state = CASE WHEN cancel_requested AND %(state)s = 'RETRY_WAIT' THEN 'CANCELLED' ELSE %(state)s END,
       result = %(result)s, error_category = %(category)s, error_message = %(message)s, error_code = %(code)s,
       progress = CASE WHEN %(state)s = 'SUCCEEDED' THEN 1 ELSE progress END,
       next_run_at = CASE WHEN cancel_requested OR %(delay)s::float8 IS NULL THEN NULL
                          ELSE clock_timestamp() + make_interval(secs => %(delay)s::float8) END,
       finished_at = CASE WHEN %(state)s = 'RETRY_WAIT' AND NOT cancel_requested THEN NULL ELSE now() END,
       lease_expires_at = NULL,
       state_reason = CASE WHEN cancel_requested AND %(state)s = 'RETRY_WAIT'
                           THEN 'cancelled by user after a failed attempt' ELSE %(reason)s END
 WHERE id = %(id)s AND lease_owner = %(token)s AND state = 'RUNNING'
RETURNING state
"""


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
    """The worker's access to jobs: every write is fenced by the claim token."""

    def __init__(self, pool: AsyncConnectionPool, *, retry_timeout: float = 30.0) -> None:
        self.pool = pool
        self.retry_timeout = retry_timeout

    async def _fetchone(self, query: str, params: dict[str, Any]) -> Row | None:
        async def run() -> Row | None:
            async with self.pool.connection() as conn:
                cursor = await conn.execute(query, params)
                row: Row | None = await cursor.fetchone()  # type: ignore[assignment]
                return row

        return await retrying(run, timeout=self.retry_timeout)

    async def claim(
        self, job_id: uuid.UUID, attempt: int, token: uuid.UUID, *, redelivered: bool, lease_seconds: float
    ) -> Row | None:
        """QUEUED -> RUNNING for this attempt (or take over a redelivered RUNNING one); None: drop it."""
        return await self._fetchone(
            _CLAIM,
            {
                "id": job_id,
                "attempt": attempt,
                "token": token,
                "redelivered": redelivered,
                "lease": lease_seconds,
            },
        )

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

    async def finish(self, job_id: uuid.UUID, token: uuid.UUID, outcome: Outcome) -> str | None:
        """Commit the attempt's outcome; returns the state written, or None when fenced out."""
        params = {
            "id": job_id,
            "token": token,
            "state": outcome.state.value,
            "result": outcome.result,
            "category": outcome.category.value if outcome.category else None,
            "message": outcome.message,
            "code": outcome.code,
            "delay": outcome.delay_seconds,
            "reason": outcome.reason,
        }
        row = await self._fetchone(_FINISH, params)
        if row is not None:
            return str(row["state"])
        # An earlier try may have committed before its connection dropped: our token on a moved-on row.
        again = await self._fetchone(
            "SELECT state FROM jobs WHERE id = %(id)s AND lease_owner = %(token)s AND state <> 'RUNNING'",
            params,
        )
        return None if again is None else str(again["state"])
