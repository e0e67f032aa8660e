"""``/v1/jobs``: submit, list, get, the colon routes ``:cancel``/``:retry``, and the SSE event stream."""

from __future__ import annotations

import asyncio
import contextlib
import json
from typing import Any

import grpc
import httpx
import pytest
from google.protobuf import timestamp_pb2
from prometheus_client import REGISTRY
from starlette.types import Message

from mesh.queue.v1 import job_pb2
from mesh.services.gateway.routes import jobs
from mesh.services.gateway.routes.jobs import MAX_PENDING_CHANGES, EventId
from tests.gateway.fakes import strip_png
from tests.gateway.harness import FakeMesh, build_gateway, close_gateway, serve_app


async def _image(client: httpx.AsyncClient) -> str:
    response = await client.post("/v1/images", files={"file": ("j.png", strip_png(), "image/png")})
    image_id: str = response.json()["id"]
    return image_id


async def _wait_state(client: httpx.AsyncClient, job_id: str, state: str) -> dict[str, Any]:
    for _ in range(500):  # 10 s: the fake queue's steps are 50 ms, on a loaded machine many times that
        job: dict[str, Any] = (await client.get(f"/v1/jobs/{job_id}")).json()
        if job["state"] == state:
            return job
        await asyncio.sleep(0.02)
    raise AssertionError(f"job {job_id} never reached {state}")


def parse_sse(text: str) -> list[dict[str, Any]]:
    """Server-Sent Events as dicts of their fields (data parsed as JSON)."""
    events = []
    for block in text.split("\n\n"):
        fields: dict[str, Any] = {}
        for line in block.splitlines():
            if not line or line.startswith(":"):
                continue
            name, _, value = line.partition(": ")
            fields[name] = json.loads(value) if name == "data" else value
        if "event" in fields:
            events.append(fields)
    return events


async def test_submit_is_202_with_location_and_job(client: httpx.AsyncClient) -> None:
    """POST /v1/jobs answers 202 with the queued job, its pipeline as sent, and a Location."""
    image_id = await _image(client)
    response = await client.post(
        "/v1/jobs",
        json={
            "image_id": image_id,
            "pipeline": [{"filter": "gaussian_blur", "params": {"sigma": 2.5, "border": "reflect"}}],
            "model": "strip-reader",
            "priority": 5,
        },
    )
    assert response.status_code == 202, response.text
    job = response.json()
    assert job["state"] == "QUEUED"
    assert job["priority"] == 5
    assert job["pipeline"] == [{"filter": "gaussian_blur", "params": {"sigma": 2.5, "border": "reflect"}}]
    assert response.headers["location"] == f"/v1/jobs/{job['id']}"
    done = await _wait_state(client, job["id"], "SUCCEEDED")
    assert done["result"]["prediction"]["strip_reading"]["verdict"] == "POSITIVE"


async def test_idempotency_key_returns_the_same_job(client: httpx.AsyncClient) -> None:
    """Submitting twice with one idempotency key gives one job."""
    image_id = await _image(client)
    body = {"image_id": image_id, "idempotency_key": "same-key-1"}
    first = (await client.post("/v1/jobs", json=body)).json()
    second = (await client.post("/v1/jobs", json=body)).json()
    assert first["id"] == second["id"]


async def test_the_idempotency_key_header_works_as_the_body_field(client: httpx.AsyncClient) -> None:
    """``Idempotency-Key``, the header uploads take, keys a job too: it was ignored, so a client that sent
    only the header got a second job on retry. Header and body may both be given only if they agree."""
    image_id = await _image(client)
    body = {"image_id": image_id}
    first = await client.post("/v1/jobs", json=body, headers={"Idempotency-Key": "header-key-1"})
    second = await client.post("/v1/jobs", json=body, headers={"Idempotency-Key": "header-key-1"})
    assert first.status_code == second.status_code == 202, first.text
    assert first.json()["id"] == second.json()["id"]
    assert first.json()["idempotency_key"] == "header-key-1"
    both = await client.post(
        "/v1/jobs",
        json={**body, "idempotency_key": "header-key-1"},
        headers={"Idempotency-Key": "header-key-1"},
    )
    assert both.json()["id"] == first.json()["id"]
    clash = await client.post(
        "/v1/jobs", json={**body, "idempotency_key": "body-key"}, headers={"Idempotency-Key": "header-key-1"}
    )
    assert clash.status_code == 400
    assert clash.json()["error"]["details"][1]["field_violations"][0]["field"] == "header.Idempotency-Key"
    control = await client.post("/v1/jobs", json=body, headers={"Idempotency-Key": "a\tb"})
    assert control.status_code == 400
    assert "the Idempotency-Key header holds the control character" in control.json()["error"]["message"]


async def test_list_filters_by_state_and_paginates(client: httpx.AsyncClient) -> None:
    """GET /v1/jobs passes state and pagination through; every listed job is in the asked state."""
    image_id = await _image(client)
    ids = [(await client.post("/v1/jobs", json={"image_id": image_id})).json()["id"] for _ in range(3)]
    for job_id in ids:
        await _wait_state(client, job_id, "SUCCEEDED")
    page = (await client.get("/v1/jobs", params={"state": "SUCCEEDED", "page_size": 2})).json()
    assert len(page["jobs"]) == 2
    assert page["next_page_token"]
    assert all(j["state"] == "SUCCEEDED" for j in page["jobs"])
    bad = await client.get("/v1/jobs", params={"state": "SLEEPING"})
    assert bad.status_code == 400


async def test_cancel_colon_route_and_cancel_of_finished_job(
    client: httpx.AsyncClient, mesh: FakeMesh
) -> None:
    """POST /v1/jobs/{id}:cancel cancels a queued job; cancelling it again is 409 (failed precondition)."""
    mesh.fakes.queue.hold = True
    try:
        image_id = await _image(client)
        job = (await client.post("/v1/jobs", json={"image_id": image_id})).json()
        cancelled = await client.post(f"/v1/jobs/{job['id']}:cancel")
        assert cancelled.status_code == 200, cancelled.text
        assert cancelled.json()["state"] == "CANCELLED"
        again = await client.post(f"/v1/jobs/{job['id']}:cancel")
        assert again.status_code == 409
        assert again.json()["error"]["code"] == "FAILED_PRECONDITION"
    finally:
        mesh.fakes.queue.release()


async def test_retry_colon_route_restarts_a_failed_job(client: httpx.AsyncClient, mesh: FakeMesh) -> None:
    """POST /v1/jobs/{id}:retry starts attempt 2 of a failed job, which then succeeds."""
    mesh.fakes.queue.fail_next = True
    image_id = await _image(client)
    job = (await client.post("/v1/jobs", json={"image_id": image_id})).json()
    failed = await _wait_state(client, job["id"], "FAILED")
    assert failed["error"]["category"] == "DATA"
    retried = await client.post(f"/v1/jobs/{job['id']}:retry")
    assert retried.status_code == 200
    assert retried.json()["attempt"] == 2
    await _wait_state(client, job["id"], "SUCCEEDED")


async def test_unknown_colon_action_and_unknown_job(client: httpx.AsyncClient) -> None:
    """An unknown action is not routed to cancel/retry, and an unknown job is 404; GET of an action is 405
    allowing POST only (it was routed to GET /v1/jobs/{id} with the id 'abc:cancel')."""
    assert (await client.post("/v1/jobs/abc:explode")).status_code in (404, 405)
    for action in ("cancel", "retry"):
        got = await client.get(f"/v1/jobs/abc:{action}")
        assert (got.status_code, got.headers["allow"]) == (405, "POST")
    assert (await client.get("/v1/jobs/no-such-job")).status_code == 404
    assert (await client.post("/v1/jobs/no-such-job:cancel")).status_code == 404


async def test_events_stream_every_change_with_ids(client: httpx.AsyncClient) -> None:
    """The SSE stream sends each change as ``event: job`` with a distinct id, in order, then ``event: end``."""
    image_id = await _image(client)
    job = (await client.post("/v1/jobs", json={"image_id": image_id, "model": "strip-reader"})).json()
    response = await client.get(f"/v1/jobs/{job['id']}/events")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    events = parse_sse(response.text)
    assert events[-1]["event"] == "end"
    changes = [e for e in events if e["event"] == "job"]
    ids = [e["id"] for e in changes]
    assert len(set(ids)) == len(ids)
    times = [int(i.split("-")[0]) for i in ids]
    assert times == sorted(times)
    states = [e["data"]["state"] for e in changes]
    assert states[0] == "QUEUED"
    assert "RUNNING" in states
    assert states[-1] == "SUCCEEDED"
    progress = [e["data"]["progress"] for e in changes if e["data"]["state"] == "RUNNING"]
    assert progress == sorted(progress)
    assert len(progress) >= 2


async def test_events_resume_after_last_event_id(client: httpx.AsyncClient, mesh: FakeMesh) -> None:
    """A reconnect with Last-Event-ID gets only the changes after that one, although the new WatchJob
    stream starts over (the fake replays the whole history, as a stream restart would)."""
    image_id = await _image(client)
    job = (await client.post("/v1/jobs", json={"image_id": image_id})).json()
    await _wait_state(client, job["id"], "SUCCEEDED")
    full = [
        e for e in parse_sse((await client.get(f"/v1/jobs/{job['id']}/events")).text) if e["event"] == "job"
    ]
    assert len(full) >= 4
    resumed_response = await client.get(
        f"/v1/jobs/{job['id']}/events", headers={"Last-Event-ID": full[2]["id"]}
    )
    resumed = [e for e in parse_sse(resumed_response.text) if e["event"] == "job"]
    assert [e["id"] for e in resumed] == [e["id"] for e in full[3:]]
    by_query = await client.get(f"/v1/jobs/{job['id']}/events", params={"after": full[2]["id"]})
    assert [e["id"] for e in parse_sse(by_query.text) if e["event"] == "job"] == [e["id"] for e in full[3:]]
    up_to_date = await client.get(f"/v1/jobs/{job['id']}/events", headers={"Last-Event-ID": full[-1]["id"]})
    assert [e["event"] for e in parse_sse(up_to_date.text)] == ["end"]
    garbage = await client.get(f"/v1/jobs/{job['id']}/events", headers={"Last-Event-ID": "not-an-id"})
    assert len([e for e in parse_sse(garbage.text) if e["event"] == "job"]) == len(full)


async def test_event_ids_compare_across_streams_that_restart_numbering() -> None:
    """Ids come from the job snapshot, not the stream's sequence: equal snapshots are skipped, newer sent."""
    stamp = timestamp_pb2.Timestamp(seconds=100, nanos=5000)
    running = job_pb2.Job(state=job_pb2.JOB_STATE_RUNNING, progress=0.5, attempt=1, update_time=stamp)
    seen = EventId.of(running)
    assert str(seen) == "100000005-RUNNING.0.500.1"
    assert EventId.parse(str(seen)) == seen
    assert not EventId.of(running).is_after(seen)
    later = job_pb2.Job(
        state=job_pb2.JOB_STATE_SUCCEEDED,
        progress=1.0,
        attempt=1,
        update_time=timestamp_pb2.Timestamp(seconds=101),
    )
    assert EventId.of(later).is_after(seen)
    earlier = job_pb2.Job(
        state=job_pb2.JOB_STATE_QUEUED, queue_position=2, update_time=timestamp_pb2.Timestamp(seconds=99)
    )
    assert not EventId.of(earlier).is_after(seen)
    moved = job_pb2.Job(
        state=job_pb2.JOB_STATE_RUNNING, progress=0.5, attempt=1, update_time=stamp, queue_position=0
    )
    moved.progress = 0.6
    assert EventId.of(moved).is_after(seen)
    assert EventId.parse("12") is None
    assert EventId.parse(None) is None
    assert EventId.parse("²-abc") is None  # a digit to isdigit(), not to int(): it was a 500


async def test_events_go_on_when_the_queue_service_drops_the_watch(
    client: httpx.AsyncClient, mesh: FakeMesh
) -> None:
    """A WatchJob stream that ends UNAVAILABLE (the queue service restarting, or closing an aged connection to
    rebalance) is opened again: the client sees every change once and the end, not an error event."""
    image_id = await _image(client)
    mesh.fakes.queue.watch_drops = 2
    watches = mesh.fakes.queue.watch_requests
    job = (await client.post("/v1/jobs", json={"image_id": image_id})).json()
    events = parse_sse((await client.get(f"/v1/jobs/{job['id']}/events")).text)
    assert [e["event"] for e in events if e["event"] != "job"] == ["end"]
    changes = [e for e in events if e["event"] == "job"]
    assert len({e["id"] for e in changes}) == len(changes)
    assert changes[0]["data"]["state"] == "QUEUED"
    assert changes[-1]["data"]["state"] == "SUCCEEDED"
    assert mesh.fakes.queue.watch_requests - watches == 3


async def test_events_of_unknown_job_is_404_before_streaming(client: httpx.AsyncClient) -> None:
    """The stream of an unknown job is a plain 404 error, not an event stream."""
    response = await client.get("/v1/jobs/missing/events")
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "NOT_FOUND"


async def test_events_stream_live_changes(mesh: FakeMesh) -> None:
    """Over real HTTP, a client connected while a job is held sees QUEUED at once, then changes as they happen."""
    app, ctx = build_gateway(mesh.gateway_settings())
    mesh.fakes.queue.hold = True
    seen: list[str] = []
    try:
        async with serve_app(app) as url, httpx.AsyncClient(base_url=url, timeout=10) as client:
            image_id = await _image(client)
            job = (await client.post("/v1/jobs", json={"image_id": image_id})).json()
            seen = await _follow(client, job["id"], mesh)
    finally:
        mesh.fakes.queue.release()
        await close_gateway(ctx)
    assert seen[0] == "QUEUED"
    assert seen[-1] == "SUCCEEDED"


async def _follow(client: httpx.AsyncClient, job_id: str, mesh: FakeMesh) -> list[str]:
    seen: list[str] = []
    async with client.stream("GET", f"/v1/jobs/{job_id}/events") as response:
        buffer = ""
        async for text in response.aiter_text():
            buffer += text
            events = parse_sse(buffer)
            seen = [e["data"]["state"] for e in events if e["event"] == "job"]
            if seen == ["QUEUED"]:
                mesh.fakes.queue.release()
            if events and events[-1]["event"] == "end":
                break
    return seen


async def test_draining_ends_open_event_streams(mesh: FakeMesh) -> None:
    """On SIGTERM (``draining``) an open stream closes at once, without ``end``, so the client reconnects."""
    app, ctx = build_gateway(mesh.gateway_settings())
    mesh.fakes.queue.hold = True
    events: list[dict[str, Any]] = []
    try:
        async with serve_app(app) as url, httpx.AsyncClient(base_url=url, timeout=10) as client:
            image_id = await _image(client)
            job = (await client.post("/v1/jobs", json={"image_id": image_id})).json()
            async with client.stream("GET", f"/v1/jobs/{job['id']}/events") as response:
                buffer = ""
                async for text in response.aiter_text():
                    buffer += text
                    events = parse_sse(buffer)
                    if events and not ctx.draining.is_set():
                        ctx.draining.set()
    finally:
        mesh.fakes.queue.release()
        await close_gateway(ctx)
    assert [e["event"] for e in events] == ["job"]


async def test_an_event_stream_opens_with_the_reconnect_delay(client: httpx.AsyncClient) -> None:
    """The first line of a job's event stream tells EventSource to reconnect after SSE_RETRY_MS."""
    image_id = await _image(client)
    job = (await client.post("/v1/jobs", json={"image_id": image_id})).json()
    response = await client.get(f"/v1/jobs/{job['id']}/events")
    assert response.text.startswith(f"retry: {jobs.SSE_RETRY_MS}\n\n")


async def test_a_watch_that_fails_other_than_unavailable_ends_in_its_error_at_once(
    client: httpx.AsyncClient, mesh: FakeMesh
) -> None:
    """A WatchJob that fails with another code than UNAVAILABLE is not retried: the client gets the changes
    sent before it, then ``event: error`` with that code, and the watch is not opened again."""
    image_id = await _image(client)
    job = (await client.post("/v1/jobs", json={"image_id": image_id})).json()
    await _wait_state(client, job["id"], "SUCCEEDED")
    queue = mesh.fakes.queue
    watches = queue.watch_requests
    queue.watch_drops, queue.watch_drop_code = 1, grpc.StatusCode.INTERNAL
    try:
        events = parse_sse((await client.get(f"/v1/jobs/{job['id']}/events")).text)
    finally:
        queue.watch_drops, queue.watch_drop_code = 0, grpc.StatusCode.UNAVAILABLE
    assert [e["event"] for e in events] == ["job", "error"]
    assert events[-1]["data"]["error"]["code"] == "INTERNAL"
    assert queue.watch_requests - watches == 1


def _open_streams() -> float:
    return REGISTRY.get_sample_value("http_sse_streams") or 0.0


async def test_an_open_stream_is_counted_and_a_client_that_leaves_closes_its_watch(mesh: FakeMesh) -> None:
    """While a client reads a job's events, the stream counts in ``http_sse_streams`` and holds one WatchJob
    call; when the client leaves, the call is cancelled at the queue service and the count goes back."""
    app, ctx = build_gateway(mesh.gateway_settings())
    queue = mesh.fakes.queue
    queue.hold = True
    streams, watches = _open_streams(), queue.open_watches
    try:
        async with serve_app(app) as url, httpx.AsyncClient(base_url=url, timeout=10) as client:
            image_id = await _image(client)
            job = (await client.post("/v1/jobs", json={"image_id": image_id})).json()
            async with client.stream("GET", f"/v1/jobs/{job['id']}/events") as response:
                buffer = ""
                async for text in response.aiter_text():
                    buffer += text
                    if parse_sse(buffer):
                        break
                assert (_open_streams() - streams, queue.open_watches - watches) == (1, 1)
            for _ in range(500):  # 10 s at most
                if queue.open_watches == watches and _open_streams() == streams:
                    break
                await asyncio.sleep(0.02)
    finally:
        queue.release()
        await close_gateway(ctx)
    assert (queue.open_watches, _open_streams()) == (watches, streams)


async def test_a_job_body_of_megabytes_is_413_before_it_is_parsed(
    client: httpx.AsyncClient, mesh: FakeMesh
) -> None:
    """A job carries no image, so its body is held to 1 MiB: a 31 MB JSON body was read and parsed whole
    (under the 36 MiB limit meant for inline images) before its 30,000 steps were refused. The message
    names the limit in MiB and the route."""
    submitted = len(mesh.fakes.queue.jobs)
    step = {"filter": "grayscale", "params": {"note": "x" * 1000}}
    body = json.dumps({"image_id": "x", "pipeline": [step] * 2000}).encode()
    response = await client.post("/v1/jobs", content=body, headers={"content-type": "application/json"})
    assert response.status_code == 413
    message = response.json()["error"]["message"]
    assert message == "the request body is larger than the limit of 1.0 MiB (1048576 bytes) for POST /v1/jobs"
    assert len(mesh.fakes.queue.jobs) == submitted


async def test_inline_image_routes_keep_the_larger_limit(client: httpx.AsyncClient) -> None:
    """Process and predict carry base64 images, so a body of several MiB reaches them (and is judged on its
    content, here an image that is not one), where a job's is refused by size."""
    image = "A" * (3 * 2**20)  # 3 MiB of base64 for zero bytes: no image
    body = json.dumps({"image": image, "pipeline": [{"filter": "grayscale"}]}).encode()
    response = await client.post("/v1/process", content=body, headers={"content-type": "application/json"})
    predict = await client.post(
        "/v1/models/strip-reader:predict",
        content=json.dumps({"image": image}).encode(),
        headers={"content-type": "application/json"},
    )
    assert (response.status_code, predict.status_code) == (415, 415), (response.text, predict.text)


async def test_a_stalled_reader_gets_the_newest_changes_and_the_end(mesh: FakeMesh) -> None:
    """While a client reads nothing, the stream keeps only the newest few of the job's changes (each is the
    whole job), not every one: after 300 changes it gets at most MAX_PENDING_CHANGES of them, the last being
    the final state, then ``end``. Every change was queued for it."""
    app, ctx = build_gateway(mesh.gateway_settings())
    mesh.fakes.queue.hold = True
    chunks: list[bytes] = []
    stalled, resume = asyncio.Event(), asyncio.Event()

    requested = False

    async def receive() -> Message:
        nonlocal requested
        if not requested:
            requested = True
            return {"type": "http.request", "body": b"", "more_body": False}
        await asyncio.Event().wait()  # the client stays connected
        raise AssertionError("unreachable")

    async def send(message: Message) -> None:
        if message["type"] == "http.response.body" and message.get("body"):
            chunks.append(message["body"])
            if len(chunks) == 1:  # the stream's first line: the client stops reading here
                stalled.set()
                await resume.wait()

    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gw") as client:
            image_id = await _image(client)
            job_id = (await client.post("/v1/jobs", json={"image_id": image_id})).json()["id"]
            path = f"/v1/jobs/{job_id}/events"
            scope = {
                "type": "http",
                "asgi": {"version": "3.0"},
                "http_version": "1.1",
                "method": "GET",
                "scheme": "http",
                "path": path,
                "raw_path": path.encode(),
                "root_path": "",
                "query_string": b"",
                "headers": [(b"host", b"gw")],
                "client": ("127.0.0.1", 50000),
                "server": ("gw", 80),
            }
            stream = asyncio.create_task(app(scope, receive, send))
            await asyncio.wait_for(stalled.wait(), 10)
            for beat in range(300):
                mesh.fakes.queue.beat(job_id, beat / 1000)
                await asyncio.sleep(0)
            assert (await client.post(f"/v1/jobs/{job_id}:cancel")).status_code == 200
            await asyncio.sleep(1.0)  # the gateway reads the whole WatchJob stream meanwhile
            resume.set()
            await asyncio.wait_for(stream, 10)
    finally:
        mesh.fakes.queue.release()
        await close_gateway(ctx)
    events = parse_sse(b"".join(chunks).decode())
    changes = [e for e in events if e["event"] == "job"]
    assert 1 <= len(changes) <= MAX_PENDING_CHANGES
    assert changes[-1]["data"]["state"] == "CANCELLED"
    assert events[-1] == {"event": "end", "data": {"job_id": job_id}}


async def _read_for(client: httpx.AsyncClient, path: str, seconds: float) -> str:
    """What an event stream sends within ``seconds`` (all of it, if it ends sooner)."""
    text = ""
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(seconds), client.stream("GET", path) as response:
            async for chunk in response.aiter_text():
                text += chunk
    return text


async def _stream_of_a_dropping_watch(mesh: FakeMesh, seconds: float, **settings: Any) -> str:
    """What a client reads in ``seconds`` from the events of a held job whose WatchJob replays the job and then
    fails UNAVAILABLE every time (a queue replica in a crash loop), through a gateway with ``settings``."""
    app, ctx = build_gateway(mesh.gateway_settings(**settings))
    mesh.fakes.queue.hold = True
    try:
        async with serve_app(app) as url, httpx.AsyncClient(base_url=url, timeout=10) as client:
            image_id = await _image(client)
            job = (await client.post("/v1/jobs", json={"image_id": image_id})).json()
            mesh.fakes.queue.watch_drops = 10**6
            return await _read_for(client, f"/v1/jobs/{job['id']}/events", seconds)
    finally:
        mesh.fakes.queue.watch_drops = 0
        mesh.fakes.queue.release()
        await close_gateway(ctx)


async def test_keepalives_are_timed_from_the_last_byte_not_from_skipped_replays(
    mesh: FakeMesh, monkeypatch: pytest.MonkeyPatch
) -> None:
    """While the queue keeps replaying the job and dropping the watch (a replica in a crash loop), the
    replays, already sent and so skipped, write nothing, and the keepalive still goes out on time: each
    replay restarted its timer, so the stream stayed silent past any proxy's idle timeout."""
    monkeypatch.setattr(jobs, "WATCH_RESUME_DELAY", 0.05)
    text = await _stream_of_a_dropping_watch(mesh, 2.0, sse_keepalive_seconds=0.4)
    assert [e["event"] for e in parse_sse(text)] == ["job"]
    assert text.count(": keepalive") >= 3, text


async def test_a_watch_that_fails_after_each_replay_ends_in_an_error_event(
    mesh: FakeMesh, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A WatchJob that replays the job and fails UNAVAILABLE every time is not a recovery: after
    WATCH_RESUME_SECONDS the client gets ``event: error`` (503 UNAVAILABLE). Each replay reset the limit, so
    the gateway reopened the watch for as long as the client stayed."""
    monkeypatch.setattr(jobs, "WATCH_RESUME_DELAY", 0.05)
    monkeypatch.setattr(jobs, "WATCH_RESUME_SECONDS", 0.5)
    events = parse_sse(await _stream_of_a_dropping_watch(mesh, 5.0))
    assert [e["event"] for e in events] == ["job", "error"]
    assert events[-1]["data"]["error"]["code"] == "UNAVAILABLE"


async def test_a_watch_that_worked_for_longer_than_the_limit_is_reopened_when_it_drops(
    mesh: FakeMesh, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A watch that dropped once, then stayed open longer than WATCH_RESUME_SECONDS with nothing new to send
    (a queued job), worked: when it drops in turn (a connection closed for its age), it is opened again,
    not turned into an error event by the first drop's clock."""
    monkeypatch.setattr(jobs, "WATCH_RESUME_DELAY", 0.05)
    monkeypatch.setattr(jobs, "WATCH_RESUME_SECONDS", 0.3)
    app, ctx = build_gateway(mesh.gateway_settings())
    queue = mesh.fakes.queue
    queue.hold = True

    async def until_watches(count: int) -> None:
        while queue.watch_requests < count:
            await asyncio.sleep(0.01)

    try:
        async with serve_app(app) as url, httpx.AsyncClient(base_url=url, timeout=10) as client:
            image_id = await _image(client)
            job = (await client.post("/v1/jobs", json={"image_id": image_id})).json()
            watches = queue.watch_requests
            queue.watch_drops = 1
            reader = asyncio.create_task(_read_for(client, f"/v1/jobs/{job['id']}/events", 10.0))
            await asyncio.wait_for(until_watches(watches + 2), 5)
            await asyncio.sleep(0.6)
            queue.cut_watches()
            await asyncio.wait_for(until_watches(watches + 3), 5)
            queue.release()
            events = parse_sse(await reader)
    finally:
        queue.watch_drops = 0
        queue.release()
        await close_gateway(ctx)
    kinds = [e["event"] for e in events]
    assert kinds[-1] == "end", kinds
    assert "error" not in kinds


async def test_a_keyless_submit_whose_answer_was_lost_is_queued_once(
    client: httpx.AsyncClient, mesh: FakeMesh
) -> None:
    """A submit without a key whose answer the queue service lost after queueing it (UNAVAILABLE) is retried
    by the gateway's channel under the key the gateway gave it: one job, not two. The job shows that key."""
    image_id = await _image(client)
    before = set(mesh.fakes.queue.jobs)
    mesh.fakes.queue.lose_answers = 1
    response = await client.post("/v1/jobs", json={"image_id": image_id, "model": "strip-reader"})
    assert response.status_code == 202
    created = [mesh.fakes.queue.jobs[i].job for i in set(mesh.fakes.queue.jobs) - before]
    assert [job.id for job in created] == [response.json()["id"]]
    assert created[0].idempotency_key.startswith("gateway-")


async def test_a_submit_left_without_an_answer_says_the_key_to_retry_with(
    client: httpx.AsyncClient, mesh: FakeMesh
) -> None:
    """When every try loses its answer, the 503 names the key the job may have been queued under; the client's
    retry with that Idempotency-Key gets the job back instead of queueing a second one."""
    image_id = await _image(client)
    mesh.fakes.queue.lose_answers = 100
    try:
        refused = await client.post("/v1/jobs", json={"image_id": image_id})
    finally:
        mesh.fakes.queue.lose_answers = 0
    assert refused.status_code == 503
    message = refused.json()["error"]["message"]
    assert "may have been queued" in message
    key = message.split("Idempotency-Key: ")[1].split()[0]
    queued = [e.job for e in mesh.fakes.queue.jobs.values() if e.job.idempotency_key == key]
    assert len(queued) == 1
    again = await client.post("/v1/jobs", json={"image_id": image_id}, headers={"Idempotency-Key": key})
    assert (again.status_code, again.json()["id"]) == (202, queued[0].id)
