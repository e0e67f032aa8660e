"""A relay that hangs is seen and replaced: the queue service's ``outbox`` health check says degraded while the
oldest dispatch in the outbox is older than ``outbox_stale_seconds``, and the relay's parent kills a child
process that stops reporting (stopped, or its event loop blocked) and starts another. Before, a stopped relay
dispatched nothing while every health answer said ok, and its parent waited for it to exit."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
import uuid
from collections.abc import AsyncIterator

import pytest

from mesh.kit.health import CheckResult, DependencyCheck, run_check
from mesh.services.queue.app import QueueApp
from mesh.services.queue.relay_process import RelayProcess
from tests.conftest import AMQP_URL
from tests.queue.harness import fast_settings
from tests.queue.record import sql

STALE_SECONDS = 5.0
STALL_SECONDS = 1.0


@pytest.fixture
async def app(migrated: str) -> AsyncIterator[QueueApp]:
    """A queue service's parts (nothing running) on the migrated database, with an empty outbox."""
    await sql(migrated, "DELETE FROM outbox")
    queue_app = QueueApp(
        fast_settings(migrated, AMQP_URL, "outbox-health", outbox_stale_seconds=STALE_SECONDS)
    )
    await queue_app.pool.open()
    queue_app.migrations.applied.set()
    yield queue_app
    await queue_app.pool.close()


def _outbox_check(app: QueueApp) -> DependencyCheck:
    return next(check for check in app.checks() if check.name == "outbox")


async def _checked(app: QueueApp) -> CheckResult:
    return await run_check(_outbox_check(app), timeout=5.0)


async def _dispatch(url: str, age_seconds: float) -> int:
    """An unsent outbox row written ``age_seconds`` ago; returns its id."""
    rows = await sql(
        url,
        "INSERT INTO outbox (job_id, attempt, queue, priority, created_at)"
        " VALUES (%s, 1, 'q.outbox', 0, now() - make_interval(secs => %s)) RETURNING id",
        uuid.uuid4(),
        age_seconds,
    )
    return int(rows[0]["id"])


async def test_the_outbox_check_passes_with_an_empty_or_fresh_outbox(app: QueueApp, migrated: str) -> None:
    """With nothing waiting, or only dispatches younger than the limit, the check passes and says how many
    wait."""
    empty = await _checked(app)
    assert empty.ok, empty.detail
    assert empty.detail.startswith("0 dispatches waiting")

    await _dispatch(migrated, 1.0)
    await _dispatch(migrated, 0.0)
    fresh = await _checked(app)
    assert fresh.ok, fresh.detail
    assert fresh.detail.startswith("2 dispatches waiting")


async def test_a_stale_unsent_dispatch_degrades_the_service_until_it_is_sent(
    app: QueueApp, migrated: str
) -> None:
    """A dispatch unsent for longer than ``outbox_stale_seconds`` fails the check, naming its age and how many
    wait; the check is degrading (the service still accepts jobs into the outbox, so gRPC health stays
    SERVING), and passes again once the dispatch is sent (its row deleted after the confirm)."""
    stale = await _dispatch(migrated, 40.0)
    await _dispatch(migrated, 0.0)

    result = await _checked(app)
    assert not result.ok
    assert result.status == "degraded"
    assert "the oldest of 2 dispatches in the outbox has waited 40s (over 5s)" in result.detail

    await app.repository.confirm_outbox([stale])
    sent = await _checked(app)
    assert sent.ok, sent.detail
    assert sent.detail.startswith("1 dispatches waiting")


async def test_the_outbox_check_waits_for_the_schema(migrated: str) -> None:
    """Before the migrations are in, the check passes without asking for a table that may not exist yet (the
    ``migrations`` check says what is missing)."""
    queue_app = QueueApp(fast_settings(migrated, AMQP_URL, "outbox-health"))
    result = await _checked(queue_app)
    assert result.ok, result.detail
    assert "not checked" in result.detail


async def _reporting_child(
    relay: RelayProcess, *, other_than: int | None = None
) -> asyncio.subprocess.Process:
    """The relay's child once it runs and has reported, waiting up to 30 s (its imports on a busy node)."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        child = relay.process
        if child is not None and child.pid != other_than and relay.last_report is not None:
            return child
        await asyncio.sleep(0.05)
    raise AssertionError("no relay child reported within 30 s")


async def test_a_stopped_relay_child_is_killed_and_replaced(migrated: str, amqp_url: str) -> None:
    """A child that reports keeps running, idle or not; one that is stopped (SIGSTOP: alive, silent, publishing
    nothing) is killed (SIGKILL) once it has been silent for ``relay_stall_seconds``, and another is started,
    which reports."""
    settings = fast_settings(migrated, amqp_url, "relay-stall", relay_stall_seconds=STALL_SECONDS)
    relay = RelayProcess(settings, restart_seconds=0.1)
    stopping = asyncio.Event()
    running = asyncio.create_task(relay.run(stopping))
    child: asyncio.subprocess.Process | None = None
    try:
        child = await _reporting_child(relay)
        await asyncio.sleep(3 * STALL_SECONDS)
        assert relay.process is child, "an idle child that reports was replaced"

        child.send_signal(signal.SIGSTOP)
        # The limit, a look every quarter of it, and room for two busy cores.
        await asyncio.wait_for(child.wait(), STALL_SECONDS * 3)
        assert child.returncode == -signal.SIGKILL

        replacement = await _reporting_child(relay, other_than=child.pid)
        assert replacement.returncode is None
    finally:
        if child is not None and child.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                child.kill()
        stopping.set()
        await asyncio.wait_for(running, 20)
