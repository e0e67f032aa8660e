"""The queue's throughput and latency through its whole guarantee path, against the bare broker and Celery.

Same run, same machine, same RabbitMQ:

- ``queue_noop_throughput``: no-op jobs submitted over gRPC to the queue service (a subprocess: job row,
  history and outbox row in one transaction; the relay publishing with confirms, persistent, mandatory),
  run by a worker process (fenced claim, outcome committed before the ack); jobs/s from the first submit
  to the last commit, and submit-to-done latency p50/p99, both from PostgreSQL's own timestamps;
- ``queue_submit_to_running_idle``: p50/p99 from submit to claim when workers are idle (one job at a time);
- ``aio_pika_confirmed_roundtrip``: the bare transport: persistent messages published with confirms to a
  quorum queue and consumed with acks, no database;
- ``celery_noop_throughput``: Celery (RabbitMQ broker, ``acks_late``, an rpc result backend so completion
  is observed) running a no-op task with a prefork worker of one process per core.

The mesh and Celery run ``MESH_BENCH_QUEUE_ROUNDS`` (default 3) throughput rounds of ``MESH_BENCH_QUEUE_JOBS``
(default 3000) each, alternately, both kept running throughout: on a small shared machine a single round of
either moves by 20 % with whatever else runs, so each figure is the median of its rounds and ``vs_celery`` the
median of the per-round ratios.

Needs PostgreSQL at ``MESH_BENCH_ADMIN_DATABASE_URL`` (default ``postgresql://localhost/postgres``) and
RabbitMQ at ``MESH_AMQP_URL``; a scratch database and uniquely named queues are created and removed.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Sequence
from typing import Any

import aio_pika
import grpc
import httpx
import psycopg
from psycopg import sql
from psycopg.conninfo import make_conninfo

from bench import processes
from mesh.kit.jobs import INFERENCE_JOBS_QUEUE
from mesh.queue.v1 import queue_service_pb2, queue_service_pb2_grpc
from mesh.services.queue.topology import dead_letter_exchange, dead_letter_queue, lanes

ADMIN_URL = os.environ.get("MESH_BENCH_ADMIN_DATABASE_URL", "postgresql://localhost/postgres")
AMQP_URL = os.environ.get("MESH_AMQP_URL", "amqp://guest:guest@localhost:5672/%2F")
JOBS = int(os.environ.get("MESH_BENCH_QUEUE_JOBS", "3000"))
SUBMITTERS = int(os.environ.get("MESH_BENCH_QUEUE_SUBMITTERS", "64"))
WORKER_CONCURRENCY = int(os.environ.get("MESH_BENCH_QUEUE_WORKER_CONCURRENCY", "64"))
IDLE_SAMPLES = 60
ROUNDS = int(os.environ.get("MESH_BENCH_QUEUE_ROUNDS", "3"))
IMAGE_ID = "5f0c7d52-8b0e-4a3e-9d51-6c1f2b7a9e10"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _percentile(values: Sequence[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def _ms(seconds: float) -> float:
    return round(seconds * 1000, 2)


class _Processes:
    """Child processes, stopped (SIGTERM, then SIGKILL) on exit."""

    def __init__(self) -> None:
        self.children: list[subprocess.Popen[bytes]] = []

    def start(self, args: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
        child = subprocess.Popen(args, env={**os.environ, **env}, stdout=subprocess.PIPE)
        self.children.append(child)
        return child

    def stop(self) -> None:
        # Signalled together, so that they drain side by side.
        for child in self.children:
            if child.poll() is None:
                child.send_signal(signal.SIGTERM)
        for child in self.children:
            processes.stop(child)


async def _wait_serving(http_port: int) -> None:
    async with httpx.AsyncClient() as client:
        for _ in range(300):
            with contextlib.suppress(httpx.HTTPError):
                if (await client.get(f"http://127.0.0.1:{http_port}/healthz")).status_code == 200:
                    return
            await asyncio.sleep(0.1)
    raise RuntimeError("the queue service did not become SERVING")


async def _submit_many(
    stub: queue_service_pb2_grpc.QueueServiceAsyncStub, count: int, concurrency: int
) -> tuple[list[str], float]:
    ids: list[str] = []
    next_index = 0

    async def submitter() -> None:
        nonlocal next_index
        while next_index < count:
            next_index += 1
            response = await stub.SubmitJob(
                queue_service_pb2.SubmitJobRequest(image_id=IMAGE_ID, model="script:noop"), timeout=30
            )
            ids.append(response.job.id)

    started = time.perf_counter()
    await asyncio.gather(*(submitter() for _ in range(concurrency)))
    return ids, time.perf_counter() - started


async def _wait_done(database_url: str, ids: list[str], timeout: float = 120.0) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout
    async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as conn:
        # The scratch database holds only this benchmark's jobs, so the count of jobs still to finish is a
        # cheap index scan; a poll over thousands of ids would take CPU from the system it measures. The
        # figures come from PostgreSQL's timestamps, so how often this polls does not change them.
        while True:
            cursor = await conn.execute("SELECT count(*) FROM jobs WHERE state <> 'SUCCEEDED'")
            row = await cursor.fetchone()
            if row and row[0] == 0:
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"{row[0] if row else '?'} jobs still unfinished after {timeout}s")
            await asyncio.sleep(0.25)
        cursor = await conn.execute(
            "SELECT extract(epoch FROM created_at) AS created, extract(epoch FROM started_at) AS started,"
            " extract(epoch FROM finished_at) AS finished, executions FROM jobs WHERE id = ANY(%s::uuid[])",
            (ids,),
        )
        columns = [c.name for c in cursor.description or []]
        return [dict(zip(columns, r, strict=True)) for r in await cursor.fetchall()]


class _MeshQueue:
    """The queue service and one no-op worker process on a scratch database, with a client."""

    def __init__(self, database_url: str, prefix: str) -> None:
        self.database_url = database_url
        self.prefix = prefix
        self.queue = prefix + INFERENCE_JOBS_QUEUE
        self.processes = _Processes()
        self.channel: grpc.aio.Channel | None = None
        self.stub: queue_service_pb2_grpc.QueueServiceAsyncStub | None = None

    async def __aenter__(self) -> _MeshQueue:
        grpc_port, http_port = _free_port(), _free_port()
        env = {
            "MESH_DATABASE_URL": self.database_url,
            "MESH_AMQP_URL": AMQP_URL,
            "MESH_QUEUE_PREFIX": self.prefix,
            "MESH_GRPC_HOST": "127.0.0.1",
            "MESH_GRPC_PORT": str(grpc_port),
            "MESH_HTTP_HOST": "127.0.0.1",
            "MESH_HTTP_PORT": str(http_port),
            "MESH_LOG_LEVEL": "warning",
            "MESH_DB_POOL_MAX_SIZE": "16",
            # The scripted model and the made-up image exist in no service; nothing to look up.
            "MESH_REFERENCE_CHECK_SECONDS": "0",
            "OTEL_TRACES_EXPORTER": "none",
        }
        try:
            self.processes.start([sys.executable, "-m", "mesh.services.queue"], env)
            await _wait_serving(http_port)
            worker = self.processes.start(
                [
                    sys.executable,
                    *("-m", "mesh.services.queue.scripted", "--queue", self.queue),
                    *("--concurrency", str(WORKER_CONCURRENCY), "--noop"),
                ],
                env,
            )
            assert worker.stdout is not None
            ready = await asyncio.to_thread(worker.stdout.readline)
            if ready.strip() != b"ready":
                raise RuntimeError("the worker did not start")
            self.channel = grpc.aio.insecure_channel(f"127.0.0.1:{grpc_port}")
            self.stub = queue_service_pb2_grpc.QueueServiceStub(self.channel)
            warm, _ = await _submit_many(self.stub, 200, 16)
            await _wait_done(self.database_url, warm)
        except BaseException:
            await self.close()
            raise
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.close()

    async def close(self) -> None:
        if self.channel is not None:
            await self.channel.close(None)
        self.processes.stop()
        await _delete_queues([self.queue, self.prefix + "mesh.jobs.image"])

    async def submit_to_running_idle(self) -> list[float]:
        """Seconds from submit to claim, one job at a time on an idle worker."""
        assert self.stub is not None
        idle: list[str] = []
        for _ in range(IDLE_SAMPLES):
            idle.append((await _submit_many(self.stub, 1, 1))[0][0])
            await asyncio.sleep(0.03)
        return [float(r["started"] - r["created"]) for r in await _wait_done(self.database_url, idle)]

    async def throughput_round(self, count: int) -> dict[str, Any]:
        """``count`` jobs from ``SUBMITTERS`` concurrent clients: rates and every job's latency."""
        assert self.stub is not None
        ids, submit_seconds = await _submit_many(self.stub, count, SUBMITTERS)
        rows = await _wait_done(self.database_url, ids)
        span = float(max(r["finished"] for r in rows) - min(r["created"] for r in rows))
        return {
            "jobs_per_second": count / span,
            "submit_per_second": count / submit_seconds,
            "latencies": [float(r["finished"] - r["created"]) for r in rows],
            "duplicates": int(sum(r["executions"] for r in rows) - len(rows)),
        }


async def _delete_queues(names: Sequence[str]) -> None:
    """Delete job queues with both their priority lanes, their dead-letter queues and exchanges."""
    connection = await aio_pika.connect(AMQP_URL)
    async with connection:
        for name in names:
            channel = await connection.channel()
            for queue in (*lanes(name), dead_letter_queue(name)):
                with contextlib.suppress(Exception):
                    await channel.queue_delete(queue)
            with contextlib.suppress(Exception):
                await channel.exchange_delete(dead_letter_exchange(name))
            with contextlib.suppress(Exception):
                await channel.close()


async def _aio_pika_roundtrip(count: int) -> dict[str, object]:
    name = f"bench-raw-{uuid.uuid4().hex[:8]}"
    connection = await aio_pika.connect_robust(AMQP_URL)
    async with connection:
        publisher = await connection.channel(publisher_confirms=True)
        consumer = await connection.channel()
        await consumer.set_qos(prefetch_count=WORKER_CONCURRENCY)
        queue = await consumer.declare_queue(name, durable=True, arguments={"x-queue-type": "quorum"})
        done = asyncio.Event()
        received = 0

        async def on_message(message: aio_pika.abc.AbstractIncomingMessage) -> None:
            nonlocal received
            await message.ack()
            received += 1
            if received == count:
                done.set()

        await queue.consume(on_message)
        started = time.perf_counter()
        window = asyncio.Semaphore(SUBMITTERS)

        async def publish(i: int) -> None:
            async with window:
                await publisher.default_exchange.publish(
                    aio_pika.Message(
                        b"x" * 64, delivery_mode=aio_pika.DeliveryMode.PERSISTENT, message_id=str(i)
                    ),
                    routing_key=name,
                    mandatory=True,
                )

        await asyncio.gather(*(publish(i) for i in range(count)))
        await asyncio.wait_for(done.wait(), 120)
        seconds = time.perf_counter() - started
        await queue.delete(if_unused=False, if_empty=False)
    return {
        "benchmark": "aio_pika_confirmed_roundtrip",
        "messages": count,
        "in_flight": SUBMITTERS,
        "messages_per_second": round(count / seconds, 1),
        "path": "publish (persistent, mandatory, confirm) -> quorum queue -> consume -> ack",
    }


class _Celery:
    """A Celery prefork worker (one process per core) on its own queue, and rounds of no-op tasks."""

    def __init__(self) -> None:
        from bench import celery_noop  # imported here: only this benchmark needs Celery

        self.tasks = celery_noop
        self.queue = f"bench-celery-{uuid.uuid4().hex[:8]}"
        self.worker: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> _Celery:
        self.worker = subprocess.Popen(
            [
                sys.executable,
                *("-m", "celery", "-A", "bench.celery_noop", "worker", "--pool=prefork"),
                f"--concurrency={os.cpu_count() or 2}",
                *("--prefetch-multiplier=16", "--loglevel=WARNING"),
                *("--without-gossip", "--without-mingle", "--without-heartbeat", "-Q", self.queue),
            ],
            env={**os.environ, "MESH_BENCH_CELERY_QUEUE": self.queue},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            # Warm up: the worker is consuming once a task comes back.
            self.tasks.noop.apply_async(queue=self.queue).get(timeout=60)
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *_: object) -> None:
        with self.tasks.app.connection_for_write() as connection:
            channel = connection.channel()
            with contextlib.suppress(Exception):
                channel.queue_delete(self.queue)
        if self.worker is not None:
            processes.stop(self.worker, grace_seconds=20)

    def throughput_round(self, count: int) -> float:
        """Tasks per second, from the first publish to the last result."""
        started = time.perf_counter()
        results = [self.tasks.noop.apply_async(queue=self.queue) for _ in range(count)]
        for result in results:
            result.get(timeout=120)
        return count / (time.perf_counter() - started)


async def _measure() -> list[dict[str, object]]:
    name = f"mesh_bench_queue_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(ADMIN_URL, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    database_url = make_conninfo(ADMIN_URL, dbname=name)
    mesh_rounds: list[dict[str, Any]] = []
    celery_rates: list[float] = []
    try:
        async with _MeshQueue(database_url, f"bench{uuid.uuid4().hex[:8]}.") as mesh:
            with _Celery() as celery:
                to_running = await mesh.submit_to_running_idle()
                # Rounds alternate, so that drift in what else the machine does hits both alike.
                for _ in range(ROUNDS):
                    mesh_rounds.append(await mesh.throughput_round(JOBS))
                    celery_rates.append(await asyncio.to_thread(celery.throughput_round, JOBS))
    finally:
        with psycopg.connect(ADMIN_URL, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))

    mesh_rates = [r["jobs_per_second"] for r in mesh_rounds]
    latencies = [latency for r in mesh_rounds for latency in r["latencies"]]
    ratios = [m / c for m, c in zip(mesh_rates, celery_rates, strict=True)]
    return [
        {
            "benchmark": "queue_noop_throughput",
            "jobs": JOBS,
            "rounds": ROUNDS,
            "submitters": SUBMITTERS,
            "worker_concurrency": WORKER_CONCURRENCY,
            "jobs_per_second": round(statistics.median(mesh_rates), 1),
            "jobs_per_second_rounds": [round(r, 1) for r in mesh_rates],
            "submit_per_second": round(statistics.median(r["submit_per_second"] for r in mesh_rounds), 1),
            "submit_to_done_p50_ms": _ms(_percentile(latencies, 0.5)),
            "submit_to_done_p99_ms": _ms(_percentile(latencies, 0.99)),
            "duplicate_executions": sum(r["duplicates"] for r in mesh_rounds),
            "vs_celery": round(statistics.median(ratios), 2),
            "vs_celery_rounds": [round(r, 2) for r in ratios],
            "path": "gRPC submit -> job+outbox txn -> relay (confirms) -> quorum queue -> fenced claim"
            " -> outcome commit -> ack",
            "target": ">= 500 jobs/s and >= Celery (median of rounds)",
        },
        {
            "benchmark": "queue_submit_to_running_idle",
            "samples": len(to_running),
            "p50_ms": _ms(float(statistics.median(to_running))),
            "p99_ms": _ms(float(_percentile(to_running, 0.99))),
            "target": "p50 < 20 ms",
        },
        {
            "benchmark": "celery_noop_throughput",
            "tasks": JOBS,
            "rounds": ROUNDS,
            "worker": f"prefork x{os.cpu_count() or 2}, prefetch 16, acks_late, rpc result backend",
            "tasks_per_second": round(statistics.median(celery_rates), 1),
            "tasks_per_second_rounds": [round(r, 1) for r in celery_rates],
        },
        await _aio_pika_roundtrip(JOBS),
    ]


def run() -> list[dict[str, object]]:
    """Every queue benchmark, in one run."""
    return asyncio.run(_measure())
