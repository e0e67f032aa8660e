"""PostgreSQL: connection pools, retries, transactions that take effect once, creating the database,
migrations, and the health check.

Migrations are plain SQL files named ``NNNN_description.sql`` in a service's ``migrations`` package,
applied once each, in order, under an advisory lock, and recorded in ``schema_migrations`` per service.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from importlib import resources
from typing import Any, TypeVar

import psycopg
import stamina
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from psycopg.rows import tuple_row
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from mesh.kit import errors
from mesh.kit.logging import get_logger
from mesh.kit.text_fields import ascii_digits

log = get_logger(__name__)

T = TypeVar("T")
Conn = TypeVar("Conn", bound=psycopg.AsyncConnection[Any])

RETRY_ON = (psycopg.OperationalError, psycopg.errors.AdminShutdown)
"""Dropped connections and the like (a pool timeout too): a retry on a fresh connection may succeed."""

# The id of the transaction (NULL while it has written nothing), and later what became of it.
_XACT_ID = "SELECT pg_current_xact_id_if_assigned()::text"
_XACT_STATUS = "SELECT pg_xact_status(%s::xid8)"


class CommitOutcomeUnknown(Exception):
    """PostgreSQL cannot say yet whether a COMMIT whose answer was lost took effect: the transaction is still
    open on a backend that has not noticed its client is gone."""


_ONCE_RETRY_ON = (*RETRY_ON, CommitOutcomeUnknown)


class DatabaseStalled(psycopg.OperationalError):
    """PostgreSQL did not answer within the operation's time (a hung server, or a connection gone silent that
    TCP has not given up on yet): a connection-level failure like the others, so callers answer UNAVAILABLE."""


async def retrying(
    operation: Callable[[], Awaitable[T]],
    *,
    timeout: float = 30.0,
    on: tuple[type[Exception], ...] = RETRY_ON,
) -> T:
    """Run ``operation`` again on a fresh connection while PostgreSQL drops connections (errors ``on``), for
    ``timeout`` seconds in all; an attempt still waiting for PostgreSQL then is given up
    (:class:`DatabaseStalled`), so a hung server or a silent connection cannot hold the caller until its own
    deadline, or for ever where it has none.

    The given-up attempt is cancelled in the background: psycopg asks the server to cancel the query and waits
    for it, up to 10 s, before it closes the connection, and the caller need not wait for that.

    A ``timeout`` already spent (a caller that waited its window behind other work) is :class:`DatabaseStalled`
    at once, with nothing sent: an attempt cut off at once could still have reached PostgreSQL."""
    if timeout <= 0:
        raise DatabaseStalled(
            "PostgreSQL did not answer within the caller's time, spent waiting behind others"
        )
    attempts = asyncio.ensure_future(_attempts(operation, timeout, on))
    try:
        await asyncio.wait((attempts,), timeout=timeout)
    except asyncio.CancelledError:
        attempts.cancel()
        raise
    if attempts.done():
        return attempts.result()
    attempts.cancel()
    _given_up.add(attempts)
    attempts.add_done_callback(_forget)
    raise DatabaseStalled(f"PostgreSQL did not answer within {timeout:g}s")


_given_up: set[asyncio.Future[Any]] = set()
"""Attempts given up and still being cancelled (the event loop keeps only weak references to tasks)."""


def _forget(attempt: asyncio.Future[Any]) -> None:
    _given_up.discard(attempt)
    if not attempt.cancelled():
        attempt.exception()  # retrieved: nobody waits for it any more


async def _attempts(
    operation: Callable[[], Awaitable[T]], timeout: float, on: tuple[type[Exception], ...]
) -> T:
    try:
        return await operation()  # the common case, without the retry machinery's cost
    except on:
        pass
    async for attempt in stamina.retry_context(
        on=on, attempts=None, timeout=timeout, wait_initial=0.01, wait_max=0.25
    ):
        with attempt:
            return await operation()
    raise AssertionError("unreachable: stamina either returns or raises")


async def transaction_once(
    pool: AsyncConnectionPool[Conn],
    body: Callable[[Conn], Awaitable[T]],
    *,
    what: str,
    timeout: float,
) -> T:
    """``body`` in one transaction on a connection of ``pool``, retried on fresh connections while
    PostgreSQL drops them (for ``timeout`` seconds), and taking effect at most once.

    Before COMMIT the transaction's id is noted with the body's answer. When the connection drops and the
    answer to COMMIT is lost, the next try first asks PostgreSQL what became of that transaction
    (``pg_xact_status``): committed, the noted answer is the answer (running the body again would find its
    own change and answer otherwise: a deleted row "does not exist", a retried job "cannot be retried");
    aborted, the body runs again; still in progress (its backend has not yet noticed its client is gone), it
    asks again until ``timeout``, then fails UNAVAILABLE saying the outcome is unknown. PostgreSQL away for
    the whole ``timeout`` is UNAVAILABLE naming ``what`` (a service's database)."""
    sent: list[tuple[str, T]] = []  # the try whose COMMIT went out: its transaction id and answer

    async def run() -> T:
        async with pool.connection() as conn:
            if sent:
                xid, answer = sent[0]
                async with conn.cursor(row_factory=tuple_row) as cursor:
                    await cursor.execute(_XACT_STATUS, (xid,))
                    found = await cursor.fetchone()
                await conn.rollback()  # a non-autocommit connection is in a transaction now; end it
                status = found[0] if found else None
                if status == "committed":
                    return answer
                if status != "aborted":
                    raise CommitOutcomeUnknown(f"transaction {xid} is {status or 'unknown'}")
                sent.clear()
            async with conn.transaction():
                answer = await body(conn)
                async with conn.cursor(row_factory=tuple_row) as cursor:
                    await cursor.execute(_XACT_ID)
                    noted = await cursor.fetchone()
                if noted is not None and noted[0] is not None:  # None: it wrote nothing
                    sent[:] = [(noted[0], answer)]
            return answer

    try:
        return await retrying(run, timeout=timeout, on=_ONCE_RETRY_ON)
    except _ONCE_RETRY_ON as error:
        if sent:
            raise errors.Unavailable(
                f"{what} did not confirm the change, and whether it took effect is unknown "
                f"({type(error).__name__}); read it back to see whether it did",
                retry_after_seconds=1.0,
            ) from error
        raise database_unavailable(what, error, retried=True) from error


CONNECTION_KWARGS: dict[str, int] = {
    "keepalives": 1,
    "keepalives_idle": 15,
    "keepalives_interval": 5,
    "keepalives_count": 3,
    "tcp_user_timeout": 30_000,
}
"""libpq options of every pooled connection. A connection whose path goes silent (a NAT or firewall that lost
its state, a host gone without a reset) is dropped after about 30 s, idle (keepalive probes) or waiting for
an answer (unacknowledged data), and the pool replaces it; with the OS defaults a query on it waited two
hours, holding its pool slot and its caller (an upload stream has no deadline)."""


def create_pool(
    url: str, *, name: str, min_size: int = 1, max_size: int = 10, reconnect_timeout: float = 8.0
) -> AsyncConnectionPool:
    """A pool that validates connections on checkout, so it recovers by itself after PostgreSQL restarts.

    Open it with ``async with pool:`` (or ``await pool.open()``); it does not wait for PostgreSQL.
    psycopg_pool backs off exponentially (1, 2, 4, ... s) while reconnecting, for up to 5 minutes by
    default, so after a one-minute outage the next attempt could be a minute away. Giving an attempt up
    after ``reconnect_timeout`` lets the next request (a health check at the latest) start a fresh one:
    services recover within seconds of PostgreSQL's return.
    """
    return AsyncConnectionPool(
        url,
        name=name,
        min_size=min_size,
        max_size=max_size,
        open=False,
        timeout=5.0,
        reconnect_timeout=reconnect_timeout,
        check=AsyncConnectionPool.check_connection,
        kwargs={"autocommit": False, **CONNECTION_KWARGS},
    )


class DatabaseCannotBeCreated(psycopg.OperationalError):
    """The service's database does not exist, and its role may not create it: it cannot reach the ``postgres``
    maintenance database, or may not CREATE DATABASE there. Someone with the right must create it; until then
    the services that migrate in the background keep trying and show this in their health."""


async def ensure_database(url: str) -> bool:
    """Create the database named in ``url`` when it does not exist; returns True when it was created.

    The database itself is connected to first, and the ``postgres`` maintenance database only when that fails:
    a role that may reach only its own database (pg_hba.conf, or a pooler that lists only that database)
    starts as long as that database exists."""
    dbname = str(conninfo_to_dict(url).get("dbname") or "")
    if not dbname:
        return False
    try:
        async with await psycopg.AsyncConnection.connect(url, autocommit=True):
            return False
    except psycopg.OperationalError as error:
        refused = error
    # libpq gives no SQLSTATE for a connection it could not open, only the server's message: this is
    # InvalidCatalogName's (3D000) in English. A server that words it in another language is asked through
    # the maintenance database's catalog below instead.
    missing = f'database "{dbname}" does not exist' in str(refused)
    role = refused.pgconn.user.decode() if refused.pgconn is not None else "?"
    try:
        admin = await psycopg.AsyncConnection.connect(make_conninfo(url, dbname="postgres"), autocommit=True)
    except psycopg.OperationalError as error:
        if missing:
            raise _cannot_create(dbname, role, error) from error
        raise refused from None  # PostgreSQL away, or refusing both: the database's own error says why
    async with admin:
        found = await admin.execute("SELECT 1 FROM pg_database WHERE datname = %s", (dbname,))
        if await found.fetchone() is not None:
            raise refused  # it exists: connecting to it failed for another reason, which its error gives
        try:
            await admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(dbname)))
        except psycopg.errors.DuplicateDatabase:
            return False
        except psycopg.errors.InsufficientPrivilege as error:
            raise _cannot_create(dbname, role, error) from error
    log.info("database created", database=dbname)
    return True


def _cannot_create(dbname: str, role: str, error: psycopg.Error) -> DatabaseCannotBeCreated:
    return DatabaseCannotBeCreated(
        f'database "{dbname}" does not exist, and role "{role}" cannot create it'
        f" ({' '.join(str(error).split())}): create it beforehand"
        f' (CREATE DATABASE "{dbname}" OWNER "{role}"), or let the role connect to the "postgres" database'
        " with CREATEDB"
    )


@dataclass(frozen=True)
class Migration:
    """One SQL migration file."""

    version: int
    name: str
    sql: str

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.sql.encode()).hexdigest()


def load_migrations(package: str) -> list[Migration]:
    """The ``NNNN_*.sql`` files of ``package``, in version order."""
    found = []
    for entry in resources.files(package).iterdir():
        if entry.name.endswith(".sql") and ascii_digits(entry.name[:4]):
            found.append(Migration(int(entry.name[:4]), entry.name, entry.read_text()))
    return sorted(found, key=lambda m: m.version)


MIGRATION_LOCK_KEY = int.from_bytes(hashlib.sha256(b"mesh-migrate").digest()[:8], "big", signed=True)


async def migrate(url: str, component: str, package: str) -> list[str]:
    """Apply ``package``'s pending migrations for ``component``; returns the names applied."""
    migrations = load_migrations(package)
    # One lock for every component's migrations, not one per component: the components share the
    # schema_migrations table, and two concurrent CREATE TABLE IF NOT EXISTS of it on a fresh database
    # collide (a unique violation in pg_type) however the statement is phrased.
    lock_key = MIGRATION_LOCK_KEY
    applied: list[str] = []
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
        await conn.execute("SELECT pg_advisory_lock(%s)", (lock_key,))
        try:
            await conn.execute(
                "CREATE TABLE IF NOT EXISTS schema_migrations ("
                " component text NOT NULL, version integer NOT NULL, name text NOT NULL,"
                " checksum text NOT NULL, applied_at timestamptz NOT NULL DEFAULT now(),"
                " PRIMARY KEY (component, version))"
            )
            rows = await (
                await conn.execute("SELECT version FROM schema_migrations WHERE component = %s", (component,))
            ).fetchall()
            done = {r[0] for r in rows}
            for migration in migrations:
                if migration.version in done:
                    continue
                async with conn.transaction():
                    await conn.execute(migration.sql.encode())
                    await conn.execute(
                        "INSERT INTO schema_migrations (component, version, name, checksum) VALUES (%s, %s, %s, %s)",
                        (component, migration.version, migration.name, migration.checksum),
                    )
                applied.append(migration.name)
                log.info("migration applied", component=component, migration=migration.name)
        finally:
            await conn.execute("SELECT pg_advisory_unlock(%s)", (lock_key,))
    return applied


def database_unavailable(what: str, error: Exception, *, retried: bool = False) -> errors.Unavailable:
    """The error a caller gets while ``what`` (a service's database) cannot be reached: UNAVAILABLE (HTTP 503),
    which clients retry, not INTERNAL. After a wait already spent here (``retried``: :func:`retrying` gave up;
    no pool connection within its timeout; an attempt given up as stalled), the channels' retry policy is told
    not to retry at once: each of its four attempts waited as long again, and a REST client got its 503 after
    20 s where health had said so within 2."""
    return errors.Unavailable(
        f"{what} is unavailable ({type(error).__name__}); retry shortly",
        retry_after_seconds=1.0,
        retries_spent=retried or isinstance(error, PoolTimeout | DatabaseStalled),
    )


async def prepare_database(url: str, component: str, package: str, *, timeout: float | None = 60.0) -> None:
    """Create the database if absent and migrate, retrying while PostgreSQL is starting (forever when
    ``timeout`` is None)."""
    async for attempt in stamina.retry_context(on=psycopg.OperationalError, timeout=timeout, attempts=None):
        with attempt:
            await ensure_database(url)
            await migrate(url, component, package)


@dataclass
class PostgresCheck:
    """PostgreSQL answers a query through the service's own pool.

    A dead connection is replaced, not reported (a pool that does not check connections on checkout hands out
    the ones PostgreSQL dropped). A pool whose every connection is in use counts as answering, once a connection
    of the check's own says PostgreSQL is there: through the pool, the check would wait behind the service's own
    work, and a burst of requests would make the service unready, and out of rotation, while PostgreSQL is well.
    The pool alone cannot tell: the connections it is still trying to open count as in use, so with PostgreSQL
    away a small pool (2) looked busy for the whole outage.
    """

    pool: AsyncConnectionPool[Any]
    name: str = "postgresql"
    timeout: float = 1.5
    """Within the health monitor's own timeout (2 s by default), so that the check answers itself."""

    async def check(self) -> str:
        stats = self.pool.get_stats()
        if stats.get("pool_size", 0) >= self.pool.max_size and not stats.get("pool_available", 0):
            await self._answers_outside_the_pool()
            return f"pool busy: all {self.pool.max_size} connections in use"
        async for attempt in stamina.retry_context(
            on=psycopg.OperationalError, attempts=None, timeout=self.timeout, wait_initial=0.01, wait_max=0.25
        ):
            with attempt:
                async with self.pool.connection(timeout=self.timeout) as conn:
                    await conn.execute("SELECT 1")
        return f"pool {self.pool.get_stats().get('pool_size', 0)} connections"

    async def _answers_outside_the_pool(self) -> None:
        """``SELECT 1`` on a connection of its own (raises when PostgreSQL does not answer in time)."""
        conninfo = self.pool.conninfo
        if not isinstance(conninfo, str):  # a callable conninfo: the pool's own business; none of ours is
            return
        async with asyncio.timeout(self.timeout):
            connection = await psycopg.AsyncConnection.connect(
                conninfo, connect_timeout=max(1, round(self.timeout)), autocommit=True
            )
            async with connection:
                await connection.execute("SELECT 1")
