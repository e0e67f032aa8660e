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

Needs PostgreSQL at ``MESH_BENCH_ADMIN_DATABASE_URL`` (default ``postgresql://localhost/postgres``) and
RabbitMQ at ``MESH_AMQP_URL``; a scratch database and uniquely named queues are created and removed.
``MESH_BENCH_QUEUE_JOBS`` sets the job count (default 3000).
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

from mesh.kit.jobs import INFERENCE_JOBS_QUEUE
from mesh.queue.v1 import queue_service_pb2, queue_service_pb2_grpc

ADMIN_URL = os.environ.get("MESH_BENCH_ADMIN_DATABASE_URL", "postgresql://localhost/postgres")
AMQP_URL = os.environ.get("MESH_AMQP_URL", "amqp://guest:guest@localhost:5672/%2F")
JOBS = int(os.environ.get("MESH_BENCH_QUEUE_JOBS", "3000"))
SUBMITTERS = int(os.environ.get("MESH_BENCH_QUEUE_SUBMITTERS", "64"))
WORKER_CONCURRENCY = int(os.environ.get("MESH_BENCH_QUEUE_WORKER_CONCURRENCY", "64"))
IDLE_SAMPLES = 60
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
        for child in self.children:
            if child.poll() is None:
                child.send_signal(signal.SIGTERM)
        for child in self.children:
            try:
                child.wait(15)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()


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


async def _queue_benchmarks(database_url: str, prefix: str) -> list[dict[str, object]]:
    grpc_port, http_port = _free_port(), _free_port()
    queue = prefix + INFERENCE_JOBS_QUEUE
    env = {
        "MESH_DATABASE_URL": database_url,
        "MESH_AMQP_URL": AMQP_URL,
        "MESH_QUEUE_PREFIX": prefix,
        "MESH_GRPC_HOST": "127.0.0.1",
        "MESH_GRPC_PORT": str(grpc_port),
        "MESH_HTTP_HOST": "127.0.0.1",
        "MESH_HTTP_PORT": str(http_port),
        "MESH_LOG_LEVEL": "warning",
        "MESH_DB_POOL_MAX_SIZE": "16",
        "OTEL_TRACES_EXPORTER": "none",
    }
    processes = _Processes()
    try:
        processes.start([sys.executable, "-m", "mesh.services.queue"], env)
        await _wait_serving(http_port)
        worker = processes.start(
            [
                sys.executable,
                "-m",
                "mesh.services.queue.scripted",
                "--queue",
                queue,
                "--concurrency",
                str(WORKER_CONCURRENCY),
                "--noop",
            ],
            env,
        )
        assert worker.stdout is not None
        ready = await asyncio.to_thread(worker.stdout.readline)
        if ready.strip() != b"ready":
            raise RuntimeError("the worker did not start")
        async with grpc.aio.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
            stub = queue_service_pb2_grpc.QueueServiceStub(channel)
            warm, _ = await _submit_many(stub, 200, 16)
            await _wait_done(database_url, warm)

            idle: list[str] = []
            for _ in range(IDLE_SAMPLES):
                idle.append((await _submit_many(stub, 1, 1))[0][0])
                await asyncio.sleep(0.03)
            idle_rows = await _wait_done(database_url, idle)

            ids, submit_seconds = await _submit_many(stub, JOBS, SUBMITTERS)
            rows = await _wait_done(database_url, ids)
    finally:
        processes.stop()
        await _delete_queues([queue, prefix + "mesh.jobs.image"])

    to_running = [r["started"] - r["created"] for r in idle_rows]
    latencies = [float(r["finished"] - r["created"]) for r in rows]
    span = float(max(r["finished"] for r in rows) - min(r["created"] for r in rows))
    return [
        {
            "benchmark": "queue_noop_throughput",
            "jobs": JOBS,
            "submitters": SUBMITTERS,
            "worker_concurrency": WORKER_CONCURRENCY,
            "jobs_per_second": round(JOBS / span, 1),
            "submit_per_second": round(JOBS / submit_seconds, 1),
            "submit_to_done_p50_ms": _ms(_percentile(latencies, 0.5)),
            "submit_to_done_p99_ms": _ms(_percentile(latencies, 0.99)),
            "duplicate_executions": int(sum(r["executions"] for r in rows) - len(rows)),
            "path": "gRPC submit -> job+outbox txn -> relay (confirms) -> quorum queue -> fenced claim"
            " -> outcome commit -> ack",
        },
        {
            "benchmark": "queue_submit_to_running_idle",
            "samples": len(to_running),
            "p50_ms": _ms(float(statistics.median(to_running))),
            "p99_ms": _ms(float(_percentile([float(v) for v in to_running], 0.99))),
        },
    ]


async def _delete_queues(names: Sequence[str]) -> None:
    connection = await aio_pika.connect(AMQP_URL)
    async with connection:
        for name in [*names, *(f"{n}.dead" for n in names)]:
            channel = await connection.channel()
            with contextlib.suppress(Exception):
                await channel.queue_delete(name)
            with contextlib.suppress(Exception):
                await channel.exchange_delete(f"{name.removesuffix('.dead')}.dlx")
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


def _celery_benchmark(count: int) -> dict[str, object]:
    from bench import celery_noop  # imported here: only this benchmark needs Celery

    queue = f"bench-celery-{uuid.uuid4().hex[:8]}"
    env = {**os.environ, "MESH_BENCH_CELERY_QUEUE": queue}
    worker = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "celery",
            "-A",
            "bench.celery_noop",
            "worker",
            "--pool=prefork",
            f"--concurrency={os.cpu_count() or 2}",
            "--prefetch-multiplier=16",
            "--loglevel=WARNING",
            "--without-gossip",
            "--without-mingle",
            "--without-heartbeat",
            "-Q",
            queue,
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        # Warm up: the worker is consuming once a task comes back.
        celery_noop.noop.apply_async(queue=queue).get(timeout=60)
        started = time.perf_counter()
        results = [celery_noop.noop.apply_async(queue=queue) for _ in range(count)]
        for result in results:
            result.get(timeout=120)
        seconds = time.perf_counter() - started
    finally:
        with celery_noop.app.connection_for_write() as connection:
            channel = connection.channel()
            with contextlib.suppress(Exception):
                channel.queue_delete(queue)
        worker.send_signal(signal.SIGTERM)
        try:
            worker.wait(20)
        except subprocess.TimeoutExpired:
            worker.kill()
            worker.wait()
    return {
        "benchmark": "celery_noop_throughput",
        "tasks": count,
        "worker": f"prefork x{os.cpu_count() or 2}, prefetch 16, acks_late, rpc result backend",
        "tasks_per_second": round(count / seconds, 1),
    }


async def _measure() -> list[dict[str, object]]:
    name = f"mesh_bench_queue_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(ADMIN_URL, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    database_url = make_conninfo(ADMIN_URL, dbname=name)
    try:
        results = await _queue_benchmarks(database_url, f"bench{uuid.uuid4().hex[:8]}.")
    finally:
        with psycopg.connect(ADMIN_URL, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
    results.append(await _aio_pika_roundtrip(JOBS))
    return results


def run() -> list[dict[str, object]]:
    """Every queue benchmark, in one run."""
    results = asyncio.run(_measure())
    results.append(_celery_benchmark(JOBS))
    queue_rate = float(str(results[0]["jobs_per_second"]))
    celery_rate = float(str(results[-1]["tasks_per_second"]))
    results[0]["vs_celery"] = round(queue_rate / celery_rate, 2) if celery_rate else None
    return results
