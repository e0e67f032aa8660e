"""The outbox relay in a process of its own, beside the queue service's API.

The API process spends its event loop on gRPC and submits; publishing with confirms costs about as much
CPU again per job in the AMQP client. In a child process the relay publishes on the other core instead of
taking turns with the API on one loop. The relay itself is unchanged (``relay.OutboxRelay``: rows locked
per round, deleted after the confirm, taken again by any relay once a lock runs out), so a child that dies
loses nothing: it is started again and its locked rows are published once their lock ran out.

Parent -> child, on stdin: a byte per wake (at most one per turn of the parent's event loop); end of input
means stop. Child -> parent, on stdout: ``@relay published|failed <queue> <n>`` lines, replayed into the
parent's counters so that the service's ``/metrics`` stays whole, and ``@relay alive`` in a quarter second
with nothing to count; other output is passed through. A child that hangs (or is stopped) neither publishes
nor exits: one silent for ``relay_stall_seconds`` is killed and started again. The child gets the parent's
settings (``MESH_QUEUE_RELAY_SETTINGS``, JSON).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import time
from collections.abc import Callable

from mesh.kit.logging import get_logger
from mesh.kit.runtime import configure_observability, sleep_unless_stopping
from mesh.services.queue.broker import Broker
from mesh.services.queue.relay import PUBLISH_FAILURES, PUBLISHED, OutboxRelay
from mesh.services.queue.repository import JobRepository, open_pool
from mesh.services.queue.settings import QueueSettings

log = get_logger(__name__)

SETTINGS_ENV = "MESH_QUEUE_RELAY_SETTINGS"
REPORT = "@relay"
ALIVE = "alive"
_COUNTERS = {"published": PUBLISHED, "failed": PUBLISH_FAILURES}

START_SECONDS = 30.0
"""How long a new child may take to report for the first time: its imports alone take seconds on a busy
node."""


class RelayProcess:
    """Runs and supervises the relay's child process (the parent's side)."""

    def __init__(self, settings: QueueSettings, *, restart_seconds: float = 1.0) -> None:
        self.settings = settings
        self.restart_seconds = restart_seconds
        self._process: asyncio.subprocess.Process | None = None
        self._wake_pending = False
        self._started_at = 0.0
        self._last_report: float | None = None

    @property
    def last_report(self) -> float | None:
        """When (``time.monotonic``) the running child last reported; None before its first report."""
        return self._last_report

    def _heard(self) -> None:
        self._last_report = time.monotonic()

    @property
    def process(self) -> asyncio.subprocess.Process | None:
        """The running child (None while none runs)."""
        return self._process

    def wake(self) -> None:
        """Something was written to the outbox: tell the child (once per turn of the event loop)."""
        if not self._wake_pending and self._process is not None:
            self._wake_pending = True
            asyncio.get_running_loop().call_soon(self._send_wake)

    def _send_wake(self) -> None:
        self._wake_pending = False
        stdin = self._process.stdin if self._process is not None else None
        if stdin is not None and not stdin.is_closing():
            with contextlib.suppress(Exception):  # a child that just died is restarted by run()
                stdin.write(b"w")

    async def run(self, stopping: asyncio.Event) -> None:
        """Keep a child relay running until ``stopping`` is set."""
        while not stopping.is_set():
            process = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "mesh.services.queue.relay_process",
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                env={**os.environ, SETTINGS_ENV: self.settings.model_dump_json()},
            )
            self._process, self._started_at, self._last_report = process, time.monotonic(), None
            reports = asyncio.create_task(_replay(process, self._heard))
            watch = asyncio.create_task(self._watch(process))
            ended = asyncio.ensure_future(process.wait())
            stop = asyncio.ensure_future(stopping.wait())
            try:
                await asyncio.wait([ended, stop], return_when=asyncio.FIRST_COMPLETED)
                if not ended.done():
                    return
                log.warning("outbox relay process ended; starting another", returncode=process.returncode)
            finally:
                self._process = None
                stop.cancel()
                ended.cancel()
                watch.cancel()
                await _stop(process)
                await reports
            await sleep_unless_stopping(stopping, self.restart_seconds)

    async def _watch(self, process: asyncio.subprocess.Process) -> None:
        """Kill ``process`` once it has not reported for ``relay_stall_seconds`` (``START_SECONDS`` before its
        first report); ``run`` then starts another. A look that comes late is skipped: this process's own loop
        was held up, and the reports that came meanwhile are not read yet."""
        limit = self.settings.relay_stall_seconds
        tick = limit / 4
        while True:
            before = time.monotonic()
            await asyncio.sleep(tick)
            now = time.monotonic()
            if now - before > 2 * tick:
                continue
            if self._last_report is None:
                silent, allowed = now - self._started_at, max(limit, START_SECONDS)
            else:
                silent, allowed = now - self._last_report, limit
            if silent > allowed:
                log.warning(
                    "outbox relay process stopped reporting (hung or stopped); killing it to start another",
                    pid=process.pid,
                    silent_seconds=round(silent, 1),
                    limit_seconds=allowed,
                )
                _kill(process)
                return


async def _stop(process: asyncio.subprocess.Process) -> None:
    """End of input asks the child to stop; it is killed when it does not."""
    if process.returncode is None and process.stdin is not None:
        with contextlib.suppress(Exception):
            process.stdin.close()
    try:
        await asyncio.wait_for(process.wait(), 10)
    except TimeoutError:
        _kill(process)
        await process.wait()
    except asyncio.CancelledError:
        _kill(process)
        raise


def _kill(process: asyncio.subprocess.Process) -> None:
    with contextlib.suppress(ProcessLookupError):
        process.kill()


async def _replay(process: asyncio.subprocess.Process, heard: Callable[[], None]) -> None:
    """The child's counts into this process's counters, each report of it to ``heard``; anything else it
    prints, to our stdout."""
    assert process.stdout is not None
    async for raw in process.stdout:
        line = raw.decode(errors="replace")
        parts = line.split()
        if len(parts) == 4 and parts[0] == REPORT and parts[1] in _COUNTERS:
            _COUNTERS[parts[1]].labels(parts[2]).inc(float(parts[3]))
            heard()
        elif parts == [REPORT, ALIVE]:
            heard()
        else:
            sys.stdout.write(line)


# --- the child --------------------------------------------------------------------------------------


async def _serve(settings: QueueSettings) -> None:
    pool = open_pool(settings.database_url, name="queue-relay", max_size=4)
    broker = Broker(
        settings.amqp_url,
        delivery_limit=settings.delivery_limit,
        reconnect_seconds=settings.amqp_reconnect_seconds,
        name="queue-relay",
    )
    relay = OutboxRelay(
        JobRepository(pool),
        broker,
        batch_size=settings.relay_batch_size,
        poll_seconds=settings.relay_poll_seconds,
        lock_seconds=settings.relay_lock_seconds,
        publish_timeout=settings.publish_timeout_seconds,
    )
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)

    async def wakes() -> None:
        while await reader.read(4096):
            relay.wake()
        stopping.set()  # the parent closed our input (or died)

    await pool.open(wait=False)
    # Reports start before RabbitMQ answers: the parent kills a child that does not report.
    tasks = [asyncio.create_task(wakes()), asyncio.create_task(_report(stopping))]
    try:
        await broker.connect()
        await relay.run(stopping)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        _write_counts()
    finally:
        await broker.close()
        await pool.close()


_reported: dict[tuple[str, str], float] = {}


def _write_counts() -> bool:
    """Write the counts that changed since the last time; True when there were any."""
    lines = []
    for kind, counter in _COUNTERS.items():
        for metric in counter.collect():
            for sample in metric.samples:
                if not sample.name.endswith("_total"):
                    continue
                key = (kind, sample.labels["queue"])
                delta = sample.value - _reported.get(key, 0.0)
                if delta:
                    _reported[key] = sample.value
                    lines.append(f"{REPORT} {kind} {key[1]} {delta:g}\n")
    if lines:
        sys.stdout.write("".join(lines))
        sys.stdout.flush()
    return bool(lines)


async def _report(stopping: asyncio.Event, interval: float = 0.25) -> None:
    """Counts, or that the child is alive, every ``interval`` while its event loop turns."""
    while not stopping.is_set():
        await sleep_unless_stopping(stopping, interval)
        if not _write_counts():
            sys.stdout.write(f"{REPORT} {ALIVE}\n")
            sys.stdout.flush()


def main() -> None:
    """``python -m mesh.services.queue.relay_process`` (started by :class:`RelayProcess`)."""
    settings = QueueSettings.model_validate_json(os.environ[SETTINGS_ENV])
    configure_observability("queue", settings)
    asyncio.run(_serve(settings))


if __name__ == "__main__":
    main()
