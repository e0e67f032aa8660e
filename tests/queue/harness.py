"""A queue service and workers on the real PostgreSQL and RabbitMQ, with short timings, for the tests."""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
import time
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, field
from typing import Any

import aio_pika
import grpc

from mesh.kit import tracing
from mesh.kit.jobs import IMAGE_JOBS_QUEUE, INFERENCE_JOBS_QUEUE, JobHandler
from mesh.kit.runtime import ServiceRuntime
from mesh.queue.v1 import job_pb2, queue_service_pb2, queue_service_pb2_grpc
from mesh.services.queue.app import QueueApp
from mesh.services.queue.settings import SERVICE_NAME, QueueSettings
from mesh.services.queue.topology import dead_letter_exchange, dead_letter_queue, lanes
from mesh.services.queue.worker import JobWorker, WorkerOptions

DELIVERY_LIMIT = 3
IMAGE_ID = "5f0c7d52-8b0e-4a3e-9d51-6c1f2b7a9e10"
TERMINAL = {
    job_pb2.JOB_STATE_SUCCEEDED,
    job_pb2.JOB_STATE_FAILED,
    job_pb2.JOB_STATE_DEAD,
    job_pb2.JOB_STATE_CANCELLED,
}

FAST_OPTIONS = WorkerOptions(
    lease_seconds=1.5,
    heartbeat_seconds=0.2,
    progress_interval_seconds=0.05,
    delivery_limit=DELIVERY_LIMIT,
    commit_timeout_seconds=20.0,
    drain_seconds=2.0,
    reconnect_seconds=0.3,
)


def fast_settings(database_url: str, amqp_url: str, prefix: str, **overrides: Any) -> QueueSettings:
    """Queue service settings with test-sized timings."""
    values: dict[str, Any] = {
        "database_url": database_url,
        "amqp_url": amqp_url,
        "grpc_port": 0,
        "http_port": 0,
        "grpc_host": "127.0.0.1",
        "http_host": "127.0.0.1",
        "queue_prefix": f"{prefix}.",
        "backoff_base_seconds": 0.1,
        "backoff_cap_seconds": 0.8,
        "delivery_limit": DELIVERY_LIMIT,
        "relay_poll_seconds": 0.1,
        "relay_lock_seconds": 2.0,
        "publish_timeout_seconds": 3.0,
        "reconcile_interval_seconds": 0.1,
        "stale_queued_seconds": 10.0,
        "watch_poll_seconds": 0.05,
        "stats_interval_seconds": 0.5,
        "amqp_reconnect_seconds": 0.3,
        "health_interval_seconds": 0.5,
        "grace_seconds": 2.0,
        # The scripted models and the made-up image exist in no service.
        "reference_check_seconds": 0.0,
    }
    values.update(overrides)
    return QueueSettings(**values)


class WorkerDidNotStart(Exception):
    """A scripted worker process ended before it consumed."""


@dataclass
class RunningWorker:
    """An in-process worker and the event that stops it."""

    worker: JobWorker
    stopping: asyncio.Event
    task: asyncio.Task[None]

    async def stop(self) -> None:
        self.stopping.set()
        await asyncio.wait_for(self.task, 15)


@dataclass
class Harness:
    """A running queue service with a client stub, and helpers to run workers against it."""

    settings: QueueSettings
    app: QueueApp
    runtime: ServiceRuntime
    channel: grpc.aio.Channel
    stub: queue_service_pb2_grpc.QueueServiceAsyncStub
    workers: list[RunningWorker] = field(default_factory=list)
    processes: list[asyncio.subprocess.Process] = field(default_factory=list)

    @property
    def image_queue(self) -> str:
        return self.settings.queue_prefix + IMAGE_JOBS_QUEUE

    @property
    def inference_queue(self) -> str:
        return self.settings.queue_prefix + INFERENCE_JOBS_QUEUE

    async def submit(self, model: str = "script:noop", **fields: Any) -> job_pb2.Job:
        """Submit a model-only job (inference queue) and return it."""
        request = queue_service_pb2.SubmitJobRequest(image_id=IMAGE_ID, model=model, **fields)
        response = await self.stub.SubmitJob(request, timeout=10)
        return response.job

    async def get(self, job_id: str) -> job_pb2.Job:
        return (await self.stub.GetJob(queue_service_pb2.GetJobRequest(job_id=job_id), timeout=10)).job

    async def wait_for(
        self, job_id: str, states: Iterable[int] = TERMINAL, timeout: float = 20.0
    ) -> job_pb2.Job:
        """Poll until the job is in one of ``states``."""
        wanted = set(states)
        deadline = time.monotonic() + timeout
        while True:
            job = await self.get(job_id)
            if job.state in wanted:
                return job
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"job {job_id} still {job_pb2.JobState.Name(job.state)} after {timeout}s"
                )
            await asyncio.sleep(0.05)

    async def wait_all(self, job_ids: Iterable[str], timeout: float = 60.0) -> dict[str, job_pb2.Job]:
        """Wait until every job is terminal."""
        deadline = time.monotonic() + timeout
        done: dict[str, job_pb2.Job] = {}
        pending = list(job_ids)
        while pending:
            left = max(0.1, deadline - time.monotonic())
            job = await self.wait_for(pending[0], timeout=left)
            done[job.id] = job
            pending.pop(0)
        return done

    async def start_worker(
        self,
        handler: JobHandler,
        *,
        queue: str | None = None,
        concurrency: int = 4,
        options: WorkerOptions = FAST_OPTIONS,
    ) -> RunningWorker:
        """An in-process worker on the inference queue (or ``queue``), consuming once this returns."""
        worker = JobWorker(
            self.settings,
            queue=queue or self.inference_queue,
            handler=handler,
            concurrency=concurrency,
            options=options,
            name="test-worker",
        )
        stopping = asyncio.Event()
        task = asyncio.create_task(worker.run(stopping))
        ready = asyncio.ensure_future(worker.ready.wait())
        await asyncio.wait([ready, task], timeout=20, return_when=asyncio.FIRST_COMPLETED)
        if task.done():
            ready.cancel()
            await task
        assert worker.ready.is_set(), "worker did not start"
        running = RunningWorker(worker, stopping, task)
        self.workers.append(running)
        return running

    async def spawn_worker(
        self, *, concurrency: int = 4, queue: str | None = None, lease_seconds: float | None = None
    ) -> asyncio.subprocess.Process:
        """A scripted worker in a subprocess (to be killed); returns once it consumes."""
        env = {
            **os.environ,
            "MESH_DATABASE_URL": self.settings.database_url,
            "MESH_AMQP_URL": self.settings.amqp_url,
        }
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "mesh.services.queue.scripted",
            "--queue",
            queue or self.inference_queue,
            "--concurrency",
            str(concurrency),
            "--lease",
            str(lease_seconds or FAST_OPTIONS.lease_seconds),
            "--heartbeat",
            str(FAST_OPTIONS.heartbeat_seconds),
            "--progress-interval",
            str(FAST_OPTIONS.progress_interval_seconds),
            "--delivery-limit",
            str(DELIVERY_LIMIT),
            "--drain",
            "1",
            env=env,
            stdout=asyncio.subprocess.PIPE,
        )
        self.processes.append(process)
        assert process.stdout is not None
        line = await asyncio.wait_for(process.stdout.readline(), 30)
        if line.strip() != b"ready":
            raise WorkerDidNotStart(f"scripted worker did not start: {line!r}")
        return process

    async def keep_workers(
        self, count: int, stop: asyncio.Event, *, concurrency: int = 4, lease_seconds: float | None = None
    ) -> int:
        """Keep ``count`` scripted worker processes alive until ``stop`` (respawning the dead); returns how
        many died."""
        alive: list[asyncio.subprocess.Process] = []
        deaths = 0
        while not stop.is_set():
            for process in [p for p in alive if p.returncode is not None]:
                alive.remove(process)
                deaths += 1
            while len(alive) < count and not stop.is_set():
                try:
                    alive.append(
                        await self.spawn_worker(concurrency=concurrency, lease_seconds=lease_seconds)
                    )
                except WorkerDidNotStart:
                    deaths += 1  # killed while starting (the chaos does not wait for readiness)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 0.1)
        return deaths

    async def stop_workers(self) -> None:
        """Kill worker processes and stop in-process workers."""
        for process in self.processes:
            if process.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    process.kill()
            await process.wait()
        for worker in self.workers:
            with contextlib.suppress(Exception):
                await worker.stop()

    async def sql(self, query: str, *params: Any) -> list[dict[str, Any]]:
        """Run SQL on the queue's database (for checks the API does not expose, like executions)."""
        async with self.app.pool.connection() as conn:
            cursor = await conn.execute(query, params)
            if cursor.description is None:
                return []
            rows: list[dict[str, Any]] = await cursor.fetchall()
            return rows


@contextlib.asynccontextmanager
async def running_queue(settings: QueueSettings) -> AsyncIterator[Harness]:
    """Start the queue service (its runtime, relay, reconciler, dead letters); stop it and its workers after."""
    app = QueueApp(settings)
    runtime = ServiceRuntime("queue", settings, service_names=[SERVICE_NAME], checks=app.checks())
    run_task: asyncio.Task[None] | None = None
    harness: Harness | None = None
    try:
        await app.start()
        app.install(runtime)
        run_task = asyncio.create_task(runtime.run())
        await asyncio.wait_for(runtime.started.wait(), 20)
        await asyncio.wait_for(app.broker_ready.wait(), 20)
        channel = grpc.aio.insecure_channel(
            f"127.0.0.1:{runtime.grpc_port}", interceptors=tracing.client_interceptors()
        )
        harness = Harness(settings, app, runtime, channel, queue_service_pb2_grpc.QueueServiceStub(channel))
        yield harness
    finally:
        if harness is not None:
            await harness.stop_workers()
            await harness.channel.close(None)
        runtime.stopping.set()
        if run_task is not None:
            await asyncio.wait_for(run_task, 20)
        await app.close()
        await delete_queues(
            settings.amqp_url, [settings.queue_prefix + q for q in (IMAGE_JOBS_QUEUE, INFERENCE_JOBS_QUEUE)]
        )


async def delete_queues(amqp_url: str, queues: Iterable[str]) -> None:
    """Remove a test's job queues (both lanes) and their dead-letter exchanges and queues, so the broker does
    not collect them."""
    connection = await aio_pika.connect(amqp_url)
    try:
        for queue in queues:
            for name in (*lanes(queue), dead_letter_queue(queue)):
                channel = await connection.channel()
                with contextlib.suppress(Exception):
                    await channel.queue_delete(name)
                with contextlib.suppress(Exception):
                    await channel.close(None)
            channel = await connection.channel()
            with contextlib.suppress(Exception):
                await channel.exchange_delete(dead_letter_exchange(queue))
            with contextlib.suppress(Exception):
                await channel.close(None)
    finally:
        await connection.close()
