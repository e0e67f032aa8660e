"""Health that tells the truth: periodic dependency checks drive gRPC health per service name.

A :class:`DependencyCheck` raises when its dependency is unusable. :class:`HealthMonitor` runs every check
on an interval (each with a timeout, which a check that does not answer fails at, however long its
cancellation takes), sets every served name to SERVING only when all essential checks pass
(a :class:`Degrading` one is reported but does not stop serving), logs each change with the reason, and
keeps the latest results for ``/healthz`` and the gateway's dashboard.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import shutil
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from grpc_health.v1 import health_pb2
from grpc_health.v1.health import aio as health_aio  # type: ignore[attr-defined]
from prometheus_client import Gauge

from mesh.kit.logging import get_logger
from mesh.kit.units import binary_size

log = get_logger(__name__)

DEPENDENCY_UP = Gauge("mesh_dependency_up", "1 when the dependency's last check passed.", ["dependency"])
DEPENDENCY_LATENCY = Gauge(
    "mesh_dependency_check_seconds", "Latency of the dependency's last check.", ["dependency"]
)


class DependencyCheck(Protocol):
    """Something a service needs; ``check`` raises with a useful message when it is unusable."""

    name: str

    async def check(self) -> str:
        """Probe the dependency; return a short detail (e.g. free space) or raise."""
        ...


ADDRESS = "<address>"
"""What :func:`public_detail` puts in place of a network address."""

# Most specific first: a URL may carry credentials, and the drivers' own phrasings name a host in words.
_ADDRESSES: tuple[tuple[re.Pattern[str], str], ...] = (
    (re.compile(r"\b[a-z][a-z0-9+.-]*://\S+", re.IGNORECASE), ADDRESS),  # a URL
    (re.compile(r'server at "[^"]*"(?: \([^)]*\))?, port \d+'), f"server at {ADDRESS}"),  # libpq
    (re.compile(r"host '[^']*'"), f"host {ADDRESS}"),  # psycopg: failed to resolve host 'name'
    (re.compile(r"\('[^']*', \d+(?:, \d+)*\)"), f"({ADDRESS})"),  # asyncio: Connect call failed ('ip', port)
    (re.compile(r"\[[0-9A-Fa-f:.]*:[0-9A-Fa-f:.]*\](?::\d+)?"), ADDRESS),  # [IPv6]:port
    (re.compile(r"\b\d{1,3}(?:\.\d{1,3}){3}(?::\d+)?\b"), ADDRESS),  # IPv4[:port]
    (re.compile(r"\b[A-Za-z][A-Za-z0-9-]*(?:\.[A-Za-z0-9-]+)*:\d{1,5}\b"), ADDRESS),  # host:port
)


def public_detail(detail: str) -> str:
    """A check's detail with the network addresses in it (hosts, ports, URLs) replaced by ``<address>``, for
    pages anyone may read (the gateway's dashboard): a driver's error names the database's or broker's host,
    which tells a user nothing and maps the inside of the deployment for anyone else. What went wrong
    ("Connection refused", "ACCESS_REFUSED", "no answer within 2s") stays; the service's own ``/healthz`` and
    log keep the whole text for its operators."""
    for pattern, replacement in _ADDRESSES:
        detail = pattern.sub(replacement, detail)
    return detail


@dataclass(frozen=True)
class CheckResult:
    """The outcome of one dependency check."""

    name: str
    ok: bool
    latency_seconds: float
    detail: str
    checked_at: float = field(default_factory=time.time)
    essential: bool = True

    @property
    def status(self) -> str:
        """``ok``; ``failing`` (the service cannot serve); ``degraded`` (it serves, with less)."""
        if self.ok:
            return "ok"
        return "failing" if self.essential else "degraded"

    def as_dict(self) -> dict[str, object]:
        return {
            "name": self.name,
            "status": self.status,
            "latency_ms": round(self.latency_seconds * 1000, 3),
            "detail": self.detail,
        }


@dataclass
class FunctionCheck:
    """A check from a coroutine function (for small ad-hoc checks)."""

    name: str
    probe: Callable[[], Awaitable[str]]

    async def check(self) -> str:
        return await self.probe()


@dataclass
class Degrading:
    """A dependency whose loss degrades the service without stopping it from serving its API: it is checked
    and reported (``degraded`` on /healthz and the dashboard, ``mesh_dependency_up`` 0) but leaves gRPC health
    SERVING, so that an orchestrator keeps routing the calls that still work. The queue service accepts jobs
    while RabbitMQ is away (they wait in its outbox), and a job worker's connections are not what its
    process's own API needs."""

    inner: DependencyCheck
    name: str = field(init=False)

    def __post_init__(self) -> None:
        self.name = self.inner.name

    async def check(self) -> str:
        return await self.inner.check()


async def in_thread_to_its_end(probe: Callable[[], str], executor: Executor | None = None) -> str:
    """``probe`` in a thread, for a check that blocks (a filesystem call). A cancelled caller (its timeout
    passed) still ends only once the thread has returned, so that :func:`run_check` holds the check back until
    then: a thread cannot be stopped, and one started each round on a hung volume filled the default executor,
    which every ``asyncio.to_thread`` of the process (hashing, decoding) waits on. ``executor``: one of the
    check's own, else asyncio's default."""
    running = asyncio.get_running_loop().run_in_executor(executor, probe)
    try:
        return await asyncio.shield(running)
    except asyncio.CancelledError:
        with contextlib.suppress(BaseException):  # cancelled again (shutdown): leave the thread be
            await asyncio.wait({running})
        raise


@dataclass
class DirectoryCheck:
    """A directory exists, holds its ``marker`` file (when one is given) and is writable.

    The directory is never created here: a probe that made a missing one would answer for an empty directory
    on the root filesystem while the volume that holds the data is not mounted. The marker, written by the
    directory's owner when it opens it, tells that volume from the bare mount point under it.
    """

    name: str
    path: Path
    marker: str | None = None

    async def check(self) -> str:
        return await in_thread_to_its_end(self._check)

    def _check(self) -> str:
        if not self.path.is_dir():
            raise FileNotFoundError(f"{self.path} is not a directory; its volume may not be mounted")
        if self.marker is not None and not (self.path / self.marker).is_file():
            raise FileNotFoundError(f"{self.path} has no {self.marker} marker; its volume may not be mounted")
        probe = self.path / f".health-{uuid.uuid4().hex}"
        probe.write_bytes(b"ok")
        probe.unlink()
        return "writable"


@dataclass
class FreeSpaceCheck:
    """The filesystem of ``path`` has at least ``min_free_bytes`` free; reports free space.

    Meant to be wrapped in :class:`Degrading`: a nearly full disk still serves its reads, and the writes it
    cannot take fail by themselves (the file service refuses such uploads with 507), so low space is a
    warning, not a reason to take the service out of rotation.
    """

    name: str
    path: Path
    min_free_bytes: int = 64 * 1024 * 1024

    async def check(self) -> str:
        return await in_thread_to_its_end(self._check)

    def _check(self) -> str:
        usage = shutil.disk_usage(self.path)
        if usage.free < self.min_free_bytes:
            raise OSError(
                f"only {binary_size(usage.free)} free in {self.path}; it needs at least {binary_size(self.min_free_bytes)}"
            )
        return f"{binary_size(usage.free)} free of {binary_size(usage.total)}"


@dataclass(frozen=True)
class _Ending:
    """A check's run that passed its timeout and whose cancellation has not finished yet."""

    check: DependencyCheck  # held so that its id, the key in _ENDING, is not reused meanwhile
    task: asyncio.Task[str]
    started: float  # time.monotonic() when the run began
    timeout: float


# A driver may take far longer to cancel than its check's timeout (psycopg 3 cancelled mid-query asks the
# server to cancel, then waits again: ~10 s with a silent PostgreSQL), so such a run is left to end in the
# background, held here (a task nothing refers to may be garbage-collected) until it has ended. Keyed by the
# check's id: checks are dataclasses, which compare by value and do not hash.
_ENDING: dict[int, _Ending] = {}


async def run_check(check: DependencyCheck, timeout: float) -> CheckResult:
    """Run one check with a timeout; never raises.

    A check that has not answered when ``timeout`` passes fails then ("no answer within 2s"), whatever its
    cancellation costs: that ends in the background, and until it has, the check is not run again (it fails
    at once, saying the previous run has not ended), so that a hung dependency never piles up probes, and
    their connections, one a round. Its latency is then the age of the run still in progress.
    """
    started = time.perf_counter()
    ending = _still_ending(check)
    if ending is not None:
        age = time.monotonic() - ending.started
        detail = (
            f"the previous check has not ended yet: it started {age:.1f}s ago "
            f"and gave no answer within {ending.timeout:g}s"
        )
        return _record(check, False, age, detail)
    ok, detail = await _outcome(check, timeout)
    return _record(check, ok, time.perf_counter() - started, detail)


def _still_ending(check: DependencyCheck) -> _Ending | None:
    ending = _ENDING.get(id(check))
    # A run left on an event loop that has since closed (a test's) never ends; it holds nothing back now.
    if ending is not None and ending.task.get_loop() is not asyncio.get_running_loop():
        del _ENDING[id(check)]
        return None
    return ending


async def _outcome(check: DependencyCheck, timeout: float) -> tuple[bool, str]:
    started = time.monotonic()
    task = asyncio.create_task(check.check(), name=f"health-check-{check.name}")
    try:
        # Unlike asyncio.wait_for, asyncio.wait returns at the timeout without waiting for a cancellation.
        await asyncio.wait({task}, timeout=timeout)
    except asyncio.CancelledError:
        _leave_to_end(check, task, started, timeout)
        raise
    if not task.done():
        _leave_to_end(check, task, started, timeout)
        return False, f"no answer within {timeout:g}s"
    if task.cancelled():
        return False, "the check was cancelled"
    error = task.exception()
    if error is not None:
        return False, f"{type(error).__name__}: {error}".strip()
    return True, task.result()


def _leave_to_end(check: DependencyCheck, task: asyncio.Task[str], started: float, timeout: float) -> None:
    """Cancel a run that passed its timeout and hold it until it has ended."""
    task.cancel()
    _ENDING[id(check)] = _Ending(check, task, started, timeout)

    def ended(_: asyncio.Task[str]) -> None:
        held = _ENDING.get(id(check))
        if held is not None and held.task is task:
            del _ENDING[id(check)]
        # Retrieved, so that asyncio does not log it at error level: the timeout was already reported.
        error = None if task.cancelled() else task.exception()
        log.debug(
            "health: a check that passed its timeout has ended",
            check=check.name,
            seconds=round(time.monotonic() - started, 3),
            error=None if error is None else f"{type(error).__name__}: {error}".strip(),
        )

    task.add_done_callback(ended)


def _record(check: DependencyCheck, ok: bool, latency: float, detail: str) -> CheckResult:
    DEPENDENCY_UP.labels(check.name).set(1 if ok else 0)
    DEPENDENCY_LATENCY.labels(check.name).set(latency)
    return CheckResult(check.name, ok, latency, detail, essential=not isinstance(check, Degrading))


class HealthMonitor:
    """Drives gRPC health status from dependency checks."""

    def __init__(
        self,
        servicer: health_aio.HealthServicer,
        service_names: Sequence[str],
        checks: Sequence[DependencyCheck],
        *,
        interval: float = 2.0,
        timeout: float = 2.0,
        start_grace: float = 15.0,
    ) -> None:
        self._servicer = servicer
        self._names = ["", *service_names]
        self._checks = list(checks)
        self._interval = interval
        self._timeout = timeout
        self._start_grace = start_grace
        self._started = time.monotonic()
        self._passed: set[str] = set()
        self._results: dict[str, CheckResult] = {}
        self._serving: bool | None = None
        self._logged: tuple[bool, frozenset[str], frozenset[str]] | None = None
        self._wake = asyncio.Event()

    @property
    def results(self) -> list[CheckResult]:
        """The latest result of each check."""
        return list(self._results.values())

    @property
    def serving(self) -> bool:
        """True when every essential check passed last time."""
        return bool(self._serving)

    def add_check(self, check: DependencyCheck) -> None:
        """Add a check (before or while running)."""
        self._checks.append(check)
        self._wake.set()

    async def check_now(self) -> bool:
        """Run every check once and update health; returns whether every essential one passed."""
        results = await asyncio.gather(*(run_check(c, self._timeout) for c in self._checks))
        self._results = {r.name: r for r in results}
        self._passed.update(r.name for r in results if r.ok)
        serving = all(r.ok or not r.essential for r in results)
        failing = {r.name: r.detail for r in results if not r.ok}
        # A degrading dependency that has not come up yet since the start (a job worker connects to RabbitMQ
        # after its migrations) is reported as degraded, but logged as awaited, not as a fault, until the
        # start grace has passed; a lost one, or one still missing after the grace, is a warning.
        in_grace = time.monotonic() - self._started < self._start_grace
        awaited = {
            r.name: r.detail
            for r in results
            if not r.ok and not r.essential and r.name not in self._passed and in_grace
        }
        degraded = {name: detail for name, detail in failing.items() if name not in awaited}
        state = (serving, frozenset(failing), frozenset(awaited))
        if state != self._logged:
            if not serving:
                log.warning("health: not serving", failing=failing)
            elif degraded:
                log.warning("health: serving, degraded", degraded=degraded, awaited=awaited or None)
            elif awaited:
                log.info("health: serving, waiting for dependencies to come up", awaited=awaited)
            else:
                log.info("health: serving", checks=[r.name for r in results])
        self._serving, self._logged = serving, state
        status = (
            health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for name in self._names:
            await self._servicer.set(name, status)
        return serving

    async def run(self) -> None:
        """Check forever (until cancelled)."""
        while True:
            await self.check_now()
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self._interval)
