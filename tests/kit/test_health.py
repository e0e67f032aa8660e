"""The shared dependency checks of mesh.kit.health."""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import re
import shutil
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import aio_pika
import psycopg
import pytest
from grpc_health.v1.health import aio as health_aio  # type: ignore[attr-defined]

from mesh.kit.health import (
    ADDRESS,
    CheckResult,
    Degrading,
    DirectoryCheck,
    FreeSpaceCheck,
    FunctionCheck,
    HealthMonitor,
    in_thread_to_its_end,
    public_detail,
    run_check,
)

HealthServicer = health_aio.HealthServicer


async def test_a_free_space_check_reports_free_space_as_people_read_it(tmp_path: Path) -> None:
    """The detail shown on the dashboard is in binary units (GiB, MiB), with the disk's size beside it."""
    detail = await FreeSpaceCheck("blob_space", tmp_path, min_free_bytes=0).check()
    assert " free of " in detail
    assert "bytes free" not in detail
    assert detail.split()[1] in {"TiB", "GiB", "MiB", "KiB"}


def _low_disk(monkeypatch: pytest.MonkeyPatch, free: int) -> None:
    total = 100 * 2**30

    def usage(_: Any) -> Any:
        return SimpleNamespace(total=total, used=total - free, free=free)

    monkeypatch.setattr(shutil, "disk_usage", usage)


async def test_a_directory_short_of_space_fails_naming_what_it_has_and_needs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Under its minimum the check fails, saying the free space and the minimum in the same units."""
    _low_disk(monkeypatch, 40 * 2**20)
    check = FreeSpaceCheck("blob_space", tmp_path, min_free_bytes=64 * 2**20)
    with pytest.raises(OSError, match=rf"only 40.0 MiB free in {tmp_path}; it needs at least 64.0 MiB"):
        await check.check()


async def test_low_free_space_degrades_but_a_writable_directory_keeps_serving(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A nearly full disk is reported (degraded) without turning the service NOT_SERVING: the directory
    check, the essential one, does not look at free space; only the Degrading free-space check does."""
    _low_disk(monkeypatch, 20 * 2**20)
    monitor = HealthMonitor(
        HealthServicer(),
        ["svc"],
        [DirectoryCheck("blob_store", tmp_path), Degrading(FreeSpaceCheck("blob_space", tmp_path))],
    )
    assert await monitor.check_now()
    assert {r.name: r.status for r in monitor.results} == {"blob_store": "ok", "blob_space": "degraded"}


async def test_a_directory_check_never_creates_the_directory(tmp_path: Path) -> None:
    """A missing directory fails, naming it and a possibly unmounted volume, and the probe leaves it missing:
    one that made it would vouch for an empty directory on the root filesystem."""
    missing = tmp_path / "blobs"
    with pytest.raises(
        FileNotFoundError, match=rf"{missing} is not a directory; its volume may not be mounted"
    ):
        await DirectoryCheck("blob_store", missing).check()
    assert not missing.exists()


async def test_a_directory_check_fails_without_its_marker(tmp_path: Path) -> None:
    """An existing, writable directory without the marker its owner wrote (an empty mount point whose volume
    is not mounted) fails; with the marker it passes and leaves no probe file behind."""
    check = DirectoryCheck("blob_store", tmp_path, marker=".mesh-blob-store")
    with pytest.raises(
        FileNotFoundError, match=rf"{tmp_path} has no .mesh-blob-store marker; its volume may"
    ):
        await check.check()
    (tmp_path / ".mesh-blob-store").write_text("")
    assert await check.check() == "writable"
    assert await asyncio.to_thread(os.listdir, tmp_path) == [".mesh-blob-store"]


@dataclass
class Switch:
    """A dependency check that passes while ``up``."""

    name: str
    up: bool = False

    async def check(self) -> str:
        if not self.up:
            raise ConnectionError(f"{self.name} is down")
        return "up"


def _health_lines(caplog: pytest.LogCaptureFixture) -> list[tuple[str, dict[str, Any]]]:
    lines = []
    for record in caplog.records:
        if record.name == "mesh.kit.health" and isinstance(record.msg, dict):
            lines.append((record.levelname, record.msg))
    return lines


async def test_a_degrading_dependency_still_coming_up_at_start_is_awaited_not_a_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A job worker's RabbitMQ connection comes up a moment after the process starts: the first checks report
    it degraded (the truth), but log it at info as awaited; every start logged a warning before."""
    broker = Switch("rabbitmq-jobs")
    monitor = HealthMonitor(HealthServicer(), ["svc"], [Degrading(broker)], start_grace=60)
    with caplog.at_level(logging.INFO, logger="mesh.kit.health"):
        assert await monitor.check_now()
        assert [r.status for r in monitor.results] == ["degraded"]
        broker.up = True
        await monitor.check_now()
        broker.up = False  # lost after it was up: a fault
        await monitor.check_now()
    lines = _health_lines(caplog)
    assert [(level, line["event"]) for level, line in lines] == [
        ("INFO", "health: serving, waiting for dependencies to come up"),
        ("INFO", "health: serving"),
        ("WARNING", "health: serving, degraded"),
    ]
    assert lines[0][1]["awaited"] == {"rabbitmq-jobs": "ConnectionError: rabbitmq-jobs is down"}


async def test_a_degrading_dependency_missing_past_the_start_grace_is_a_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """One that has not come up when the start grace ends is logged as degraded then, though it never passed;
    an essential one failing at start is a warning at once."""
    monitor = HealthMonitor(HealthServicer(), ["svc"], [Degrading(Switch("rabbitmq-jobs"))], start_grace=0.05)
    with caplog.at_level(logging.INFO, logger="mesh.kit.health"):
        await monitor.check_now()
        await asyncio.sleep(0.06)
        await monitor.check_now()
        await monitor.check_now()  # unchanged: not logged again
    assert [(level, line["event"]) for level, line in _health_lines(caplog)] == [
        ("INFO", "health: serving, waiting for dependencies to come up"),
        ("WARNING", "health: serving, degraded"),
    ]
    caplog.clear()
    essential = HealthMonitor(HealthServicer(), ["svc"], [Switch("postgresql")], start_grace=60)
    with caplog.at_level(logging.INFO, logger="mesh.kit.health"):
        assert not await essential.check_now()
    assert [(level, line["event"]) for level, line in _health_lines(caplog)] == [
        ("WARNING", "health: not serving")
    ]


async def _driver_errors() -> list[str]:
    """What PostgreSQL's and RabbitMQ's drivers say when their server is not there, as a check reports it."""
    details = []
    for connect in (
        lambda: psycopg.AsyncConnection.connect("postgresql://mesh@127.0.0.1:1/mesh", connect_timeout=2),
        lambda: psycopg.AsyncConnection.connect("postgresql://mesh@no-such-host.invalid:5432/mesh"),
        lambda: aio_pika.connect("amqp://guest:secret@127.0.0.1:1/", timeout=2),
    ):
        with pytest.raises(Exception) as info:  # noqa: PT011 (any driver error: its text is the subject)
            await connect()
        details.append(f"{type(info.value).__name__}: {info.value}")
    return details


async def test_a_public_detail_names_no_address_and_keeps_what_went_wrong() -> None:
    """The drivers' own errors name the host and port they tried (a URL may name a password); the public detail
    replaces each with <address> and keeps the rest, so the dashboard still says what failed."""
    refused, unresolved, broker = await _driver_errors()
    assert "127.0.0.1" in refused
    assert "no-such-host.invalid" in unresolved
    assert "127.0.0.1" in broker
    for detail in (refused, unresolved, broker):
        public = public_detail(detail)
        assert ADDRESS in public, public
        assert "127.0.0.1" not in public
        assert "no-such-host" not in public
        assert ", 1)" not in public
        assert "port 1 " not in public
    assert "Connection refused" in public_detail(refused)
    assert (
        public_detail("connect failed: amqp://guest:secret@rabbitmq.mesh.svc:5672/")
        == f"connect failed: {ADDRESS}"
    )
    assert (
        public_detail("rabbitmq.mesh.svc:5672, [fd00::1]:5432, 10.0.0.7")
        == f"{ADDRESS}, {ADDRESS}, {ADDRESS}"
    )


@pytest.mark.parametrize(
    "detail",
    [
        "no answer within 2s",
        "pool 4 connections",
        "12.5 GiB free of 50 GiB",
        "checked at 12:30:45",
        "ACCESS_REFUSED",
    ],
)
def test_a_detail_without_an_address_is_public_as_it_is(detail: str) -> None:
    """Sizes, times and the brokers' refusal words are not taken for addresses."""
    assert public_detail(detail) == detail


@dataclass
class SlowToCancel:
    """A check that hangs while ``hung``, and once cancelled takes ``linger`` seconds to end (as psycopg does,
    asking a silent server to cancel the query), then raises ``on_cancel`` or re-raises the cancellation."""

    name: str
    linger: float
    hung: bool = True
    on_cancel: Exception | None = None
    calls: int = 0
    ended: asyncio.Event = field(default_factory=asyncio.Event)

    async def check(self) -> str:
        self.calls += 1
        self.ended.clear()
        try:
            if self.hung:
                await asyncio.sleep(60)
            return "answered"
        except asyncio.CancelledError:
            await asyncio.sleep(self.linger)
            if self.on_cancel is not None:
                raise self.on_cancel from None
            raise
        finally:
            self.ended.set()


async def _timed_round(monitor: HealthMonitor) -> tuple[float, dict[str, CheckResult]]:
    started = time.monotonic()
    await monitor.check_now()
    return time.monotonic() - started, {r.name: r for r in monitor.results}


async def _until_ended(check: SlowToCancel) -> None:
    await asyncio.wait_for(check.ended.wait(), 10)
    await asyncio.sleep(0.01)  # the run's done callback


async def test_a_check_slow_to_cancel_fails_at_its_timeout_and_is_not_run_again_until_it_ends() -> None:
    """A check that does not answer fails when its timeout passes, though its cancellation takes seconds (the
    round, and every other check's result, came 12 s late under a silent PostgreSQL); while that cancellation
    is still going on, the next round does not start another copy but fails it at once, saying how long ago
    the unfinished one started; once it has ended, the check is run again."""
    postgres = SlowToCancel("postgresql", linger=2.0)
    monitor = HealthMonitor(
        HealthServicer(), ["svc"], [postgres, Switch("blob_store", up=True)], timeout=0.2, start_grace=0
    )
    took, results = await _timed_round(monitor)
    assert took < 0.6
    assert not monitor.serving
    assert results["postgresql"].detail == "no answer within 0.2s"
    assert results["postgresql"].status == "failing"
    assert 0.2 <= results["postgresql"].latency_seconds < 0.6
    assert results["blob_store"].ok

    await asyncio.sleep(0.3)
    took, results = await _timed_round(monitor)
    assert took < 0.1
    assert postgres.calls == 1
    assert re.fullmatch(
        r"the previous check has not ended yet: it started 0\.\d+s ago and gave no answer within 0\.2s",
        results["postgresql"].detail,
    ), results["postgresql"].detail
    assert results["postgresql"].latency_seconds >= 0.5
    assert results["blob_store"].ok

    await _until_ended(postgres)
    postgres.hung = False
    _, results = await _timed_round(monitor)
    assert postgres.calls == 2
    assert results["postgresql"].ok
    assert monitor.serving


def _is_check_task(task: object) -> bool:
    return isinstance(task, asyncio.Task) and task.get_name().startswith("health-check-")


async def test_a_timed_out_check_that_fails_as_it_ends_logs_nothing_at_error(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The exception a timed-out check raises while it ends in the background is taken (asyncio would log
    "Task exception was never retrieved" at error level): the failure was already reported at the timeout."""
    check = SlowToCancel("rabbitmq", linger=0.5, on_cancel=ConnectionError("connection lost"))
    unhandled: list[dict[str, Any]] = []
    asyncio.get_running_loop().set_exception_handler(lambda _, context: unhandled.append(context))
    started = time.monotonic()
    with caplog.at_level(logging.DEBUG):
        result = await run_check(check, 0.1)
        assert time.monotonic() - started < 0.4
        assert result.detail == "no answer within 0.1s"
        await _until_ended(check)
        gc.collect()
    # Only this check's task counts: gc.collect() may also collect an earlier test's leftovers.
    assert [c for c in unhandled if _is_check_task(c.get("future") or c.get("task"))] == []
    assert not [
        r
        for r in caplog.records
        if r.levelno >= logging.ERROR and (r.name.startswith("mesh") or "health-check" in r.getMessage())
    ]
    check.hung = False
    assert (await run_check(check, 0.1)).ok


async def test_a_check_blocked_in_its_thread_starts_no_second_thread_until_the_first_returns() -> None:
    """A check that blocks in a thread (a hung volume) is not run again while its thread is blocked: its
    cancellation waits for the thread, so run_check holds it back, and the default executor, which every
    asyncio.to_thread of the process shares, is not filled by one blocked probe a round."""
    release = threading.Event()
    calls: list[int] = []

    def blocked_probe() -> str:
        calls.append(1)
        release.wait(10)
        return "writable"

    check = FunctionCheck("blobs", lambda: in_thread_to_its_end(blocked_probe))
    try:
        for _ in range(6):
            result = await run_check(check, 0.05)
            assert not result.ok
            await asyncio.sleep(0.05)  # the monitor's interval: a cancellation has time to end
        assert len(calls) == 1
        assert await asyncio.wait_for(asyncio.to_thread(lambda: "free"), 1) == "free"
    finally:
        release.set()
    for _ in range(100):
        if (await run_check(check, 0.5)).ok:
            break
        await asyncio.sleep(0.02)
    assert len(calls) == 2
