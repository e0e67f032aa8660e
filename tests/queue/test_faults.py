"""Fault tests on the real RabbitMQ and PostgreSQL: killed workers, crash loops, undecodable messages,
dropped database connections, a broker restart, and an invariant run with faults injected at random."""

from __future__ import annotations

import asyncio
import contextlib
import random
import signal
import time
import uuid
from collections import Counter

import aio_pika
import grpc
import psycopg
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client import REGISTRY

from mesh.common.v1 import errors_pb2
from mesh.kit.runtime import ServiceRuntime
from mesh.queue.v1 import job_pb2, queue_service_pb2, queue_service_pb2_grpc
from mesh.services.queue.app import QueueApp
from mesh.services.queue.repository import ClaimStore, Outcome
from mesh.services.queue.scripted import scripted_handler
from mesh.services.queue.settings import SERVICE_NAME
from mesh.services.queue.states import JobState
from mesh.services.queue.topology import lanes
from tests.queue.harness import IMAGE_ID, Harness, fast_settings, running_queue

pytestmark = pytest.mark.integration


async def _terminate_backends(database_url: str) -> int:
    """Drop every other connection to the queue's database, like a PostgreSQL failover would."""
    async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as conn:
        cursor = await conn.execute(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
            " WHERE datname = current_database() AND pid <> pg_backend_pid()"
        )
        row = await cursor.fetchone()
        return int(row[0]) if row else 0


async def _rabbitmqctl(command: str) -> None:
    process = await asyncio.create_subprocess_exec(
        "rabbitmqctl", command, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE
    )
    _, stderr = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode == 0, f"rabbitmqctl {command} failed: {stderr.decode()}"


async def test_worker_killed_mid_job_completes_once(queue: Harness) -> None:
    """SIGKILL of the worker running a job: RabbitMQ redelivers, another worker takes over, one SUCCEEDED."""
    victim = await queue.spawn_worker(concurrency=1)
    job = await queue.submit("script:sleep=1")
    running = await queue.wait_for(job.id, {job_pb2.JOB_STATE_RUNNING})
    assert running.state == job_pb2.JOB_STATE_RUNNING
    await asyncio.sleep(0.2)
    victim.send_signal(signal.SIGKILL)
    await victim.wait()
    await queue.spawn_worker(concurrency=1)
    done = await queue.wait_for(job.id, timeout=20)
    assert done.state == job_pb2.JOB_STATE_SUCCEEDED
    assert done.result.output_image_id == f"job-{job.id}-attempt-{done.attempt}"
    assert Counter(t.to_state for t in done.history)[job_pb2.JOB_STATE_SUCCEEDED] == 1
    rows = await queue.sql("SELECT executions FROM jobs WHERE id = %s", job.id)
    assert rows[0]["executions"] == 2  # the killed run and the one that finished


async def test_hung_worker_loses_its_lease_and_is_fenced_out(queue: Harness) -> None:
    """A worker frozen mid-job (SIGSTOP: its connection stays open, so RabbitMQ redelivers nothing) loses its
    lease; the reconciler dispatches attempt 2, another worker finishes it, and the frozen worker, once
    resumed, cannot overwrite the outcome."""
    frozen = await queue.spawn_worker(concurrency=1)
    job = await queue.submit("script:sleep=1")
    await queue.wait_for(job.id, {job_pb2.JOB_STATE_RUNNING})
    frozen.send_signal(signal.SIGSTOP)
    try:
        await queue.spawn_worker(concurrency=1)
        done = await queue.wait_for(job.id, timeout=20)
    finally:
        frozen.send_signal(signal.SIGCONT)
    assert done.state == job_pb2.JOB_STATE_SUCCEEDED
    assert done.attempt == 2
    assert done.result.output_image_id == f"job-{job.id}-attempt-2"
    assert any(t.reason.startswith("lease expired") for t in done.history)
    await asyncio.sleep(1.5)  # the resumed worker finishes its sleep and tries to commit
    after = await queue.get(job.id)
    assert after.state == job_pb2.JOB_STATE_SUCCEEDED
    assert after.result.output_image_id == f"job-{job.id}-attempt-2"
    assert Counter(t.to_state for t in after.history)[job_pb2.JOB_STATE_SUCCEEDED] == 1


async def test_crash_loop_and_undecodable_message_end_dead_without_blocking_others(queue: Harness) -> None:
    """A job that kills every worker ends DEAD through the delivery limit; an undecodable message is
    dead-lettered; jobs around them succeed."""
    before = REGISTRY.get_sample_value(
        "mesh_queue_dead_letters_total", {"queue": queue.inference_queue, "effect": "undecodable"}
    )
    stop = asyncio.Event()
    # A lease longer than a worker's restart, so the crash loop runs on redeliveries of one attempt (with a
    # short lease, the reconciler re-dispatches each crash as the next attempt, ending FAILED instead).
    keeper = asyncio.create_task(queue.keep_workers(1, stop, concurrency=2, lease_seconds=15.0))
    try:
        await asyncio.sleep(0.5)
        crasher = await queue.submit("script:crash")
        connection = await aio_pika.connect(queue.settings.amqp_url)
        async with connection:
            channel = await connection.channel()
            await channel.default_exchange.publish(
                aio_pika.Message(b"not a dispatch \xff\xff\xff\xff"), routing_key=queue.inference_queue
            )
        others = [await queue.submit("script:noop") for _ in range(5)]
        dead = await queue.wait_for(crasher.id, timeout=40)
        finished = await queue.wait_all([o.id for o in others], timeout=20)
    finally:
        stop.set()
        deaths = await keeper
    assert dead.state == job_pb2.JOB_STATE_DEAD
    assert "delivered too often" in dead.error.message
    assert deaths >= 2
    assert {j.state for j in finished.values()} == {job_pb2.JOB_STATE_SUCCEEDED}
    for _ in range(40):
        after = REGISTRY.get_sample_value(
            "mesh_queue_dead_letters_total", {"queue": queue.inference_queue, "effect": "undecodable"}
        )
        if after and after > (before or 0):
            break
        await asyncio.sleep(0.05)
    assert after == (before or 0) + 1


async def test_dropped_database_connections_lose_nothing(queue: Harness) -> None:
    """Every PostgreSQL connection is terminated, once a second, during submits, claims and completions;
    every job still ends SUCCEEDED exactly once."""
    await queue.start_worker(scripted_handler, concurrency=8)
    stop = asyncio.Event()
    rounds = 0

    async def chaos() -> None:
        nonlocal rounds
        while not stop.is_set():
            await asyncio.sleep(1.0)
            await _terminate_backends(queue.settings.database_url)
            rounds += 1

    chaos_task = asyncio.create_task(chaos())
    try:
        jobs = []
        for _ in range(60):
            jobs.append(await queue.submit("script:sleep=0.05"))
            await asyncio.sleep(0.06)
        await asyncio.sleep(0.5)
    finally:
        stop.set()
        await chaos_task
    done = await queue.wait_all([j.id for j in jobs], timeout=40)
    assert rounds >= 3
    assert {j.state for j in done.values()} == {job_pb2.JOB_STATE_SUCCEEDED}
    rows = await queue.sql(
        "SELECT count(*) AS n FROM job_history WHERE to_state = 'SUCCEEDED' AND job_id = ANY(%s::uuid[])",
        [j.id for j in jobs],
    )
    assert rows[0]["n"] == len(jobs)


@pytest.mark.slow
@pytest.mark.serial  # it restarts the broker every other test uses
async def test_rabbitmq_restart_during_submits_and_work(queue: Harness) -> None:
    """``rabbitmqctl stop_app``/``start_app`` while jobs are submitted and run: every accepted job completes;
    the relay, the workers and the dead-letter consumer reconnect by themselves; the broker's health check
    fails during the outage and passes after it."""
    await queue.start_worker(scripted_handler, concurrency=8)
    accepted: list[str] = []

    async def submit_stream() -> None:
        for _ in range(120):
            accepted.append((await queue.submit("script:sleep=0.02")).id)
            await asyncio.sleep(0.03)

    submitter = asyncio.create_task(submit_stream())
    try:
        await asyncio.sleep(1.0)
        await _rabbitmqctl("stop_app")
        await asyncio.sleep(2.0)
        # Health tells the outage: the check read "connected" throughout, as the robust connection only
        # reconnects.
        with pytest.raises(ConnectionError, match="reconnecting"):
            await queue.app.broker.check()
    finally:
        await _rabbitmqctl("start_app")  # whatever happened, the broker comes back
    await submitter
    done = await queue.wait_all(accepted, timeout=45)
    assert len(accepted) == 120
    assert Counter(j.state for j in done.values()) == {job_pb2.JOB_STATE_SUCCEEDED: 120}
    assert await queue.app.broker.check() == "connected"


@pytest.mark.slow
async def test_invariant_run_with_random_faults(queue: Harness) -> None:
    """Hundreds of jobs while workers are SIGKILLed, jobs crash their workers and PostgreSQL connections
    drop: every accepted job ends in exactly one terminal state, none is lost, each success keeps exactly
    one result (its final attempt's); duplicate executions are counted and reported."""
    rng = random.Random(20261123)
    kinds = ["script:noop"] * 10 + ["script:sleep=0.05"] * 4 + ["script:flaky=0.3"] * 3
    kinds += ["script:fail=TRANSIENT:1"] * 2 + ["script:fail=PERMANENT"]
    stop_workers = asyncio.Event()
    keeper = asyncio.create_task(queue.keep_workers(2, stop_workers, concurrency=4))
    stop_chaos = asyncio.Event()
    faults: Counter[str] = Counter()

    async def chaos() -> None:
        while not stop_chaos.is_set():
            await asyncio.sleep(rng.uniform(0.3, 1.0))
            if rng.random() < 0.5:
                alive = [p for p in queue.processes if p.returncode is None]
                if alive:
                    with contextlib.suppress(ProcessLookupError):
                        rng.choice(alive).send_signal(signal.SIGKILL)
                    faults["worker_sigkill"] += 1
            else:
                await _terminate_backends(queue.settings.database_url)
                faults["postgres_terminate"] += 1

    chaos_task = asyncio.create_task(chaos())
    submitted: dict[str, str] = {}
    try:
        await asyncio.sleep(1.0)
        plan = [rng.choice(kinds) for _ in range(300)] + ["script:crash"] * 2
        rng.shuffle(plan)
        for start in range(0, len(plan), 25):
            batch = plan[start : start + 25]
            jobs = await asyncio.gather(*(queue.submit(kind) for kind in batch))
            submitted.update({job.id: kind for job, kind in zip(jobs, batch, strict=True)})
            await asyncio.sleep(0.2)
        await asyncio.sleep(3.0)
        stop_chaos.set()
        await chaos_task
        try:
            done = await queue.wait_all(submitted, timeout=60)
        except AssertionError:
            print(
                await queue.sql(
                    "SELECT state, count(*) FROM jobs WHERE queue = %s GROUP BY state", queue.inference_queue
                )
            )
            stuck = await queue.sql(
                "SELECT id, state, attempt, executions, attempt_claims, dispatched_at, now() FROM jobs WHERE queue = %s AND state NOT IN ('SUCCEEDED','FAILED','DEAD','CANCELLED') LIMIT 3",
                queue.inference_queue,
            )
            print(stuck)
            for r in stuck:
                print(
                    await queue.sql(
                        "SELECT from_state, to_state, attempt, reason, at FROM job_history WHERE job_id = %s ORDER BY id",
                        r["id"],
                    )
                )
            print(await queue.sql("SELECT count(*), min(locked_until), max(publishes) FROM outbox"))
            print(
                "ready",
                await queue.app.broker.ready_count(queue.inference_queue),
                [p.returncode for p in queue.processes],
            )
            raise
    finally:
        stop_chaos.set()
        stop_workers.set()
        await asyncio.gather(chaos_task, keeper, return_exceptions=True)

    rows = await queue.sql(
        "SELECT j.id::text AS id, j.state, j.attempt, j.executions, j.result,"
        " (SELECT count(*) FROM job_history h WHERE h.job_id = j.id AND h.to_state = 'RUNNING') AS runs,"
        " (SELECT count(*) FROM job_history h WHERE h.job_id = j.id AND h.to_state = 'SUCCEEDED') AS wins"
        " FROM jobs j WHERE j.queue = %s",
        queue.inference_queue,
    )
    by_id = {r["id"]: r for r in rows}
    assert set(by_id) == set(submitted), "a job was lost or appeared from nowhere"
    terminal = {"SUCCEEDED", "FAILED", "DEAD", "CANCELLED"}
    assert all(r["state"] in terminal for r in rows)
    for job_id, job in done.items():
        row = by_id[job_id]
        assert job_pb2.JobState.Name(job.state).removeprefix("JOB_STATE_") == row["state"]
        if row["state"] == "SUCCEEDED":
            assert row["wins"] == 1
            assert job.result.output_image_id == f"job-{job_id}-attempt-{row['attempt']}"
        kind = submitted[job_id]
        if kind == "script:crash":
            # Through the delivery limit (DEAD), or, when restarts outlast the lease, through lease expiries
            # until the attempts are spent (FAILED, SYSTEM).
            assert row["state"] in {"DEAD", "FAILED"}
            assert job.error.category == errors_pb2.ERROR_CATEGORY_SYSTEM
        elif kind == "script:fail=PERMANENT":
            assert row["state"] == "FAILED"
    duplicates = sum(r["executions"] - r["runs"] for r in rows)
    outcome = Counter(r["state"] for r in rows)
    dead_kinds = Counter(submitted[r["id"]] for r in rows if r["state"] == "DEAD")
    print(
        f"\ninvariant run: {len(rows)} jobs, outcomes {dict(outcome)}, dead by kind {dict(dead_kinds)},"
        f" faults {dict(faults)},"
        f" duplicate executions {duplicates} (each fenced; one result per job)"
    )
    assert faults["worker_sigkill"] + faults["postgres_terminate"] >= 3


async def _ready(queue: Harness, expected: int, seconds: float = 10.0) -> int:
    """The inference queue's ready messages, once they are ``expected`` or ``seconds`` have passed."""
    deadline = time.monotonic() + seconds
    while (ready := await queue.app.broker.ready_count(queue.inference_queue)) != expected:
        if time.monotonic() > deadline:
            break
        await asyncio.sleep(0.1)
    return ready


async def test_a_dispatch_waiting_in_the_broker_is_not_copied_and_a_lost_one_is_sent_again(
    database_url: str, amqp_url: str, unique_name: str
) -> None:
    """With no worker consuming, a QUEUED job past ``stale_queued_seconds`` keeps its one dispatch in
    RabbitMQ (a copy per period piled up before); once that message is lost (a purged queue), the
    reconciler dispatches the job again, once.

    A second apart, not less: a sweep that reads the broker's count before the relay's first publish lands and
    the database after it copies a dispatch that is a stale period old (0.3 s did on a loaded CI machine; in
    service the period is 300 s, and the copy is dropped at its claim)."""
    stale = 1.0
    settings = fast_settings(database_url, amqp_url, unique_name, stale_queued_seconds=stale)
    async with running_queue(settings) as queue:
        job = await queue.submit()
        assert await _ready(queue, 1) == 1
        await asyncio.sleep(3 * stale)  # several stale periods and reconciler sweeps
        assert await _ready(queue, 1, seconds=0) == 1

        connection = await aio_pika.connect_robust(amqp_url)
        async with connection:
            channel = await connection.channel()
            lane = await channel.declare_queue(lanes(queue.inference_queue)[0], passive=True)
            await lane.purge()
        assert await _ready(queue, 1) == 1
        await asyncio.sleep(2 * stale)
        assert await _ready(queue, 1, seconds=0) == 1
        rows = await queue.sql("SELECT state, state_reason FROM jobs WHERE id = %s", job.id)
        assert rows == [{"state": "QUEUED", "state_reason": "re-dispatched: no worker took it"}]


async def test_an_outcome_after_the_lease_expired_or_the_job_went_dead_is_fenced_out(queue: Harness) -> None:
    """A worker whose job the reconciler moved on (lease expired -> next attempt) or the dead-letter
    consumer marked DEAD commits nothing and is told so (None), not that its outcome was written."""
    expired, dead = await queue.submit(), await queue.submit()
    store = ClaimStore(queue.app.pool)
    done = Outcome(JobState.SUCCEEDED, "succeeded", result=job_pb2.JobResult().SerializeToString())

    token = uuid.uuid4()
    assert await store.claim(uuid.UUID(expired.id), 1, token, redelivered=False, lease_seconds=0.05)
    moved = await queue.wait_for(expired.id, {job_pb2.JOB_STATE_QUEUED}, timeout=10)
    assert moved.attempt == 2
    assert await store.finish(uuid.UUID(expired.id), token, done) is None

    token = uuid.uuid4()
    assert await store.claim(uuid.UUID(dead.id), 1, token, redelivered=False, lease_seconds=60)
    # A crash loop: every delivery of the attempt was claimed before its dispatch was dead-lettered.
    await queue.sql("UPDATE jobs SET attempt_claims = 3 WHERE id = %s", dead.id)
    target = await queue.app.repository.dead_letter(
        uuid.UUID(dead.id), 1, "delivery limit reached", delivery_limit=3
    )
    assert target is JobState.DEAD
    assert await store.finish(uuid.UUID(dead.id), token, done) is None
    assert (await queue.get(dead.id)).state == job_pb2.JOB_STATE_DEAD


async def test_a_released_claim_is_queued_again_at_its_attempt_with_a_new_dispatch(queue: Harness) -> None:
    """ClaimStore.release, a stopping worker's hand-back of a job it will not finish: RUNNING -> QUEUED at the
    same attempt (no attempt spent), the lease cleared, the claim taken back from attempt_claims (it crashed
    nothing, which the dead-letter consumer counts claims for), and a new dispatch written (RabbitMQ holds the
    old one too until the worker acks it). Only the claim's holder releases, once; a job asked to cancel is
    left RUNNING, to end CANCELLED as before."""
    job, cancelled = await queue.submit(), await queue.submit()
    assert await _ready(queue, 2) == 2
    store = ClaimStore(queue.app.pool)
    token = uuid.uuid4()
    assert await store.claim(uuid.UUID(job.id), 1, token, redelivered=False, lease_seconds=60)
    assert not await store.release(uuid.UUID(job.id), uuid.uuid4())
    assert await store.release(uuid.UUID(job.id), token)
    assert not await store.release(uuid.UUID(job.id), token)
    rows = await queue.sql(
        "SELECT state, attempt, attempt_claims, executions, lease_owner, lease_expires_at FROM jobs WHERE id = %s",
        job.id,
    )
    assert rows == [
        {
            "state": "QUEUED",
            "attempt": 1,
            "attempt_claims": 0,
            "executions": 1,
            "lease_owner": None,
            "lease_expires_at": None,
        }
    ]
    history = (await queue.get(job.id)).history
    assert [t.to_state for t in history] == [
        job_pb2.JOB_STATE_QUEUED,
        job_pb2.JOB_STATE_RUNNING,
        job_pb2.JOB_STATE_QUEUED,
    ]
    assert history[-1].reason == "handed back: its worker stopped before the attempt ended"
    assert await _ready(queue, 3) == 3

    token = uuid.uuid4()
    assert await store.claim(uuid.UUID(cancelled.id), 1, token, redelivered=False, lease_seconds=60)
    await queue.stub.CancelJob(queue_service_pb2.CancelJobRequest(job_id=cancelled.id))
    assert not await store.release(uuid.UUID(cancelled.id), token)
    assert (await queue.get(cancelled.id)).state == job_pb2.JOB_STATE_RUNNING


async def test_the_queue_service_serves_while_rabbitmq_has_never_answered(
    database_url: str, unique_name: str
) -> None:
    """Started while RabbitMQ is away, the service serves at once (it waited for the broker before, so a pod's
    startup probe restarted it until the broker was back): health SERVING, degraded, and a submit is kept in
    the outbox, QUEUED."""
    settings = fast_settings(database_url, "amqp://guest:guest@127.0.0.1:1/%2F", unique_name)
    app = QueueApp(settings)
    runtime = ServiceRuntime("queue", settings, service_names=[SERVICE_NAME], checks=app.checks())
    await asyncio.wait_for(app.start(), 30)  # it waited for the broker for ever
    app.install(runtime)
    task = asyncio.create_task(runtime.run())
    try:
        await asyncio.wait_for(runtime.started.wait(), 20)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{runtime.grpc_port}") as channel:
            health = await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=10
            )
            assert health.status == health_pb2.HealthCheckResponse.SERVING
            stub = queue_service_pb2_grpc.QueueServiceStub(channel)
            request = queue_service_pb2.SubmitJobRequest(image_id=IMAGE_ID, model="script:noop")
            job = (await stub.SubmitJob(request, timeout=10)).job
        assert job.state == job_pb2.JOB_STATE_QUEUED
        assert not app.broker_ready.is_set()
        rows = await _outbox(database_url, job.id)
        assert rows == 1
    finally:
        runtime.stopping.set()
        await asyncio.wait_for(task, 30)
        await app.close()


async def _outbox(database_url: str, job_id: str) -> int:
    async with await psycopg.AsyncConnection.connect(database_url) as conn:
        cursor = await conn.execute("SELECT count(*) FROM outbox WHERE job_id = %s", (job_id,))
        row = await cursor.fetchone()
        return int(row[0]) if row else 0
