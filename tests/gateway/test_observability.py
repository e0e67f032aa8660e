"""Trace context in and out, Prometheus metrics after traffic, the health dashboard and readiness."""

from __future__ import annotations

import asyncio
import logging
import re
import time
from dataclasses import dataclass
from typing import Any

import grpc
import httpx
import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from mesh.file.v1 import file_service_pb2 as file_pb
from mesh.file.v1 import file_service_pb2_grpc as file_grpc
from mesh.kit.health import Degrading
from mesh.services.gateway.backends import Backends
from mesh.services.gateway.health import FRESH_SECONDS, HealthProbe
from tests.gateway.fakes import FakeFileService, strip_png
from tests.gateway.harness import (
    FakeMesh,
    GatewayFactory,
    SwitchCheck,
    build_gateway,
    close_gateway,
    serve_app,
)

TRACEPARENT = re.compile(r"^00-([0-9a-f]{32})-([0-9a-f]{16})-[0-9a-f]{2}$")
INCOMING = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


async def test_every_response_carries_a_traceparent(client: httpx.AsyncClient) -> None:
    """Successes, errors and open routes all carry a valid traceparent; each request is its own trace."""
    ids = set()
    for path in ("/healthz", "/v1/filters", "/v1/images/missing", "/nope"):
        header = (await client.get(path)).headers["traceparent"]
        match = TRACEPARENT.match(header)
        assert match, header
        ids.add(match.group(1))
    assert len(ids) == 4


async def test_incoming_traceparent_is_honoured_and_propagated(
    client: httpx.AsyncClient, mesh: FakeMesh
) -> None:
    """The response continues the caller's trace, and the outgoing gRPC call carries the same trace id."""
    response = await client.post(
        "/v1/process",
        json={"image": "aGVsbG8=", "pipeline": [{"filter": "raise:NOT_FOUND"}]},
        headers={"traceparent": INCOMING},
    )
    match = TRACEPARENT.match(response.headers["traceparent"])
    assert match
    assert match.group(1) == "4bf92f3577b34da6a3ce929d0e0e4736"
    assert match.group(2) != "00f067aa0ba902b7"
    outgoing = mesh.fakes.image.last_metadata.get("traceparent", "")
    assert outgoing.split("-")[1] == "4bf92f3577b34da6a3ce929d0e0e4736"


def _sample(text: str, name: str, **labels: str) -> float:
    for line in text.splitlines():
        if not line.startswith(name + "{"):
            continue
        found = dict(re.findall(r'(\w+)="([^"]*)"', line.rsplit(" ", 1)[0]))
        if all(found.get(k) == v for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


async def test_red_metrics_per_route_after_traffic(client: httpx.AsyncClient) -> None:
    """Requests are counted by route template, method and status; durations and bytes are recorded."""
    before = (await client.get("/metrics")).text
    data = strip_png()
    await client.post("/v1/images", files={"file": ("m.png", data, "image/png")})
    for _ in range(3):
        await client.get("/v1/images/does-not-exist")
    await client.get("/v1/jobs/does-not-exist")
    after = (await client.get("/metrics")).text
    route = "/v1/images/{image_id}"
    counted = _sample(after, "http_requests_total", route=route, method="GET", status="404")
    assert counted - _sample(before, "http_requests_total", route=route, method="GET", status="404") == 3
    # A template with a convertor ({job_id:name}) is labelled without it.
    assert _sample(after, "http_requests_total", route="/v1/jobs/{job_id}", method="GET", status="404") >= 1
    created = _sample(after, "http_requests_total", route="/v1/images", method="POST", status="201")
    assert (
        created - _sample(before, "http_requests_total", route="/v1/images", method="POST", status="201") == 1
    )
    duration = _sample(after, "http_request_duration_seconds_count", route=route, method="GET")
    assert duration - _sample(before, "http_request_duration_seconds_count", route=route, method="GET") == 3
    received = _sample(after, "http_request_bytes_total", route="/v1/images")
    assert received - _sample(before, "http_request_bytes_total", route="/v1/images") > len(data)


async def test_a_head_request_is_recorded_under_its_route(
    client: httpx.AsyncClient, caplog: pytest.LogCaptureFixture
) -> None:
    """HEAD (answered as the GET) is counted under its route template, not ``unmatched``, and a HEAD probe of
    /healthz is as quiet in the access log as a GET one."""
    image = (await client.post("/v1/images", files={"file": ("h.png", strip_png(), "image/png")})).json()
    route = "/v1/images/{image_id}/content"
    before = (await client.get("/metrics")).text
    with caplog.at_level(logging.INFO, logger="mesh.services.gateway.access"):
        assert (await client.head("/healthz")).status_code == 200
    assert [r.msg for r in caplog.records if r.name == "mesh.services.gateway.access"] == []
    assert (await client.head(f"/v1/images/{image['id']}/content")).status_code == 200
    after = (await client.get("/metrics")).text
    counted = _sample(after, "http_requests_total", route=route, method="HEAD", status="200")
    assert counted - _sample(before, "http_requests_total", route=route, method="HEAD", status="200") == 1


async def test_a_cors_preflight_is_traced_and_counted(make_client: GatewayFactory) -> None:
    """A preflight, answered by the CORS middleware before any route, has a span (its traceparent comes back)
    and is counted, as every other answer: it had neither, so a browser's failing preflights left no trace."""
    client = await make_client(cors_origins=["https://app.example"])
    before = (await client.get("/metrics")).text
    preflight = await client.options(
        "/v1/jobs", headers={"Origin": "https://app.example", "Access-Control-Request-Method": "POST"}
    )
    refused = await client.options(
        "/v1/jobs", headers={"Origin": "https://evil.example", "Access-Control-Request-Method": "POST"}
    )
    assert (preflight.status_code, refused.status_code) == (200, 400)
    assert "traceparent" in preflight.headers
    assert "traceparent" in refused.headers
    after = (await client.get("/metrics")).text
    for status in ("200", "400"):
        # Under the route it asks about, as a 405 for OPTIONS without CORS is (it was ``unmatched``).
        labels = {"route": "/v1/jobs", "method": "OPTIONS", "status": status}
        assert (
            _sample(after, "http_requests_total", **labels) - _sample(before, "http_requests_total", **labels)
            == 1
        )


async def test_health_dashboard_lists_services_dependencies_and_queue(make_client: GatewayFactory) -> None:
    """/v1/health has each service (gRPC health, latency), the services' dependencies, GPU and queue depths;
    the gateway's own rows are the services it calls (the blob store is the file service's to report)."""
    client = await make_client()
    body = (await client.get("/v1/health")).json()
    assert body["status"] == "ok"
    by_name = {(c["name"], c["source"]): c for c in body["components"]}
    for key in ("file", "image", "inference", "queue"):
        service = by_name[(f"{key} service", "gateway")]
        assert service["status"] == "ok"
        assert service["latency_ms"] > 0
        assert by_name[("postgresql", f"{key} service")]["status"] == "ok"
    assert by_name[("gpu", "image service")]["detail"] == "no GPU in use: CPU backend"
    assert body["queue"]["queues"][0]["queue"] == "jobs"
    # The blob store is the file service's to report; the gateway's own rows are the services it calls.
    assert {name for name, source in by_name if source == "gateway"} == {
        f"{key} service" for key in ("file", "image", "inference", "queue")
    }


async def test_readyz_is_503_naming_a_failing_dependency_and_recovers(
    client: httpx.AsyncClient, mesh: FakeMesh
) -> None:
    """When the services' PostgreSQL fails, /readyz is 503 naming it (and the services), and the dashboard's
    status is failing (it said degraded with a service down); then 200 again."""
    assert (await client.get("/readyz")).status_code == 200
    mesh.switch.up = False
    try:
        await mesh.runtime.monitor.check_now()
        response = await client.get("/readyz")
        assert response.status_code == 503
        failing = {c["name"] for c in response.json()["failing"]}
        assert "postgresql" in failing
        assert "file service" in failing
        dashboard = (await client.get("/v1/health")).json()
        assert dashboard["status"] == "failing"
    finally:
        mesh.switch.up = True
        await mesh.runtime.monitor.check_now()
    assert (await client.get("/readyz")).status_code == 200


async def test_a_degraded_dependency_shows_but_keeps_the_mesh_ready(
    client: httpx.AsyncClient, mesh: FakeMesh
) -> None:
    """A service's degrading dependency (RabbitMQ behind the queue's outbox) that fails is ``degraded`` on the
    dashboard, whose status is degraded, and /readyz stays 200: jobs are still accepted and wait."""
    broker = SwitchCheck(up=False, name="rabbitmq")
    mesh.runtime.monitor.add_check(Degrading(broker))
    try:
        await mesh.runtime.monitor.check_now()
        ready = await client.get("/readyz")
        assert ready.status_code == 200, ready.text
        dashboard = (await client.get("/v1/health")).json()
        assert dashboard["status"] == "degraded"
        reported = {c["status"] for c in dashboard["components"] if c["name"] == "rabbitmq"}
        assert reported == {"degraded"}
    finally:
        broker.up = True
        await mesh.runtime.monitor.check_now()
    assert (await client.get("/v1/health")).json()["status"] == "ok"


@dataclass
class _Unreachable:
    """A dependency whose driver names the address it could not reach, as psycopg does."""

    name: str = "postgresql-replica"
    up: bool = False

    async def check(self) -> str:
        if self.up:
            return "pool 1 connections"
        raise ConnectionError('connection to server at "db-1.mesh.svc" (10.4.0.9), port 5432 failed: timeout')


async def test_the_dashboard_names_no_internal_address(client: httpx.AsyncClient, mesh: FakeMesh) -> None:
    """/v1/health is open to anyone: a service's check detail that names its database's host reaches the
    dashboard with <address> in its place, and what failed still shows."""
    replica = _Unreachable()
    mesh.runtime.monitor.add_check(Degrading(replica))
    try:
        await mesh.runtime.monitor.check_now()
        dashboard = (await client.get("/v1/health")).json()
        async with (
            httpx.AsyncClient() as http
        ):  # the service's own /healthz, for its operators, keeps it whole
            own = (await http.get(f"http://127.0.0.1:{mesh.runtime.http_port}/healthz")).json()
    finally:
        replica.up = True
        await mesh.runtime.monitor.check_now()
    details = [c["detail"] for c in dashboard["components"] if c["name"] == "postgresql-replica"]
    assert details == ["ConnectionError: connection to server at <address> failed: timeout"] * len(details)
    assert details
    assert any("db-1.mesh.svc" in c["detail"] for c in own["checks"])


async def test_readyz_ignores_services_that_are_not_required(make_client: GatewayFactory) -> None:
    """A service left out of required_services does not block readiness when it is down: the dashboard
    says degraded where, with it required, it says failing."""
    client: httpx.AsyncClient = await make_client(
        inference_service_address="127.0.0.1:1",
        required_services=["file", "image", "queue"],
        health_timeout_seconds=0.5,
    )
    relaxed = await client.get("/readyz")
    assert relaxed.status_code == 200, relaxed.text
    assert (await client.get("/v1/health")).json()["status"] == "degraded"
    strict: httpx.AsyncClient = await make_client(
        inference_service_address="127.0.0.1:1", health_timeout_seconds=0.5
    )
    response = await strict.get("/readyz")
    assert response.status_code == 503
    assert [c["name"] for c in response.json()["failing"]] == ["inference service"]
    assert (await strict.get("/v1/health")).json()["status"] == "failing"


async def test_the_open_dashboard_names_no_address_of_a_service_that_does_not_answer(
    make_client: GatewayFactory, caplog: pytest.LogCaptureFixture
) -> None:
    """/v1/health is open and on the page: a service that does not answer reads "not answering" with its gRPC
    status, where gRPC's own text ("failed to connect to all addresses; ... ipv4:127.0.0.1:1: Connection
    refused") showed the mesh's internal addresses to anyone. That text goes to the gateway's log."""
    client = await make_client(inference_service_address="127.0.0.1:1", health_timeout_seconds=2.0)
    with caplog.at_level(logging.WARNING, logger="mesh.services.gateway.health"):
        body = (await client.get("/v1/health")).json()
    (inference,) = [c for c in body["components"] if c["name"] == "inference service"]
    assert inference["status"] == "failing"
    assert inference["detail"] == "not answering (UNAVAILABLE)"
    # The address as gRPC writes it (a bare ":1" also turns up in checked_at between :10 and :19 past the hour).
    assert "127.0.0.1:1" not in str(body)
    assert "ipv4:" not in str(body)
    logged = [r.msg for r in caplog.records if r.name == "mesh.services.gateway.health"]
    assert any(
        isinstance(line, dict) and line["component"] == "inference service" and "127.0.0.1:1" in line["error"]
        for line in logged
    ), logged


async def test_a_burst_of_health_requests_shares_one_round_and_readiness_asks_no_queue_stats(
    mesh: FakeMesh,
) -> None:
    """The health routes are open, and GetQueueStats counts jobs in PostgreSQL: 20 dashboard requests at
    once make one round of probes (one GetQueueStats), a request within FRESH_SECONDS reuses it, and
    readiness never asks for the statistics. Each request ran every probe, readiness included, so
    unauthenticated polling slowed the job API for everyone."""
    app, ctx = build_gateway(mesh.gateway_settings(), health_fresh_seconds=FRESH_SECONDS)
    queue = mesh.fakes.queue
    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gw") as client:
            before = queue.stats_calls
            ready = await asyncio.gather(*(client.get("/readyz") for _ in range(5)))
            assert [r.status_code for r in ready] == [200] * 5
            assert queue.stats_calls == before
            answers = await asyncio.gather(*(client.get("/v1/health") for _ in range(20)))
            again = await client.get("/v1/health")
    finally:
        await close_gateway(ctx)
    assert queue.stats_calls == before + 1
    bodies = [a.json() for a in [*answers, again]]
    assert all(b["queue"] is not None and b["status"] == "ok" for b in bodies)
    assert len({b["checked_at"] for b in bodies}) == 1


async def test_a_failing_health_round_is_reused_too(mesh: FakeMesh) -> None:
    """A round whose probe hangs until its timeout (a backend that does not answer) is shared by every
    request during it and reused while fresh, failing as it is: a burst waits out the timeout once, not
    once each, and only a request after ``fresh_seconds`` probes again."""
    settings = mesh.gateway_settings(health_timeout_seconds=0.3)
    calls = 0

    class Hanging:
        name = "key_store"

        async def check(self) -> str:
            nonlocal calls
            calls += 1
            await asyncio.sleep(10)
            return "never"

    backends = Backends(settings)
    http = httpx.AsyncClient(timeout=settings.health_timeout_seconds)
    probe = HealthProbe(settings, backends, http, [Hanging()], fresh_seconds=1.0)
    try:
        dashboards, readiness = await asyncio.gather(
            asyncio.gather(*(probe.collect() for _ in range(10))),
            asyncio.gather(*(probe.readiness() for _ in range(10))),
        )
        started = time.monotonic()
        reused = await probe.readiness()
        reused_seconds = time.monotonic() - started
        assert calls == 1
        await asyncio.sleep(1.0)
        await probe.readiness()
    finally:
        await http.aclose()
        await backends.close()
    assert calls == 2
    assert {d.status for d in dashboards} == {"failing"}
    assert {r.status for r in readiness} == {"not ready"}
    assert reused.status == "not ready"
    assert [c.name for c in reused.failing] == ["key_store"]
    assert reused_seconds < 0.1


async def test_request_span_has_attributes_and_parents_the_grpc_call(
    client: httpx.AsyncClient, spans: InMemorySpanExporter
) -> None:
    """The gateway's span continues the caller's trace, names the route, carries job and image attributes,
    and is the parent of the outgoing gRPC client span."""
    image = (await client.post("/v1/images", files={"file": ("t.png", strip_png(), "image/png")})).json()
    spans.clear()
    response = await client.post(
        "/v1/jobs",
        json={"image_id": image["id"], "pipeline": [{"filter": "grayscale"}], "model": "strip-reader"},
        headers={"traceparent": INCOMING},
    )
    assert response.status_code == 202
    finished = spans.get_finished_spans()
    servers = [s for s in finished if s.name == "POST /v1/jobs"]
    assert len(servers) == 1
    server = servers[0]
    assert format(server.context.trace_id, "032x") == "4bf92f3577b34da6a3ce929d0e0e4736"
    assert server.parent is not None
    assert format(server.parent.span_id, "016x") == "00f067aa0ba902b7"
    attributes = dict(server.attributes or {})
    assert attributes["http.route"] == "/v1/jobs"
    assert attributes["http.response.status_code"] == 202
    assert attributes["mesh.job.id"] == response.json()["id"]
    assert attributes["mesh.job.attempt"] == 1
    assert attributes["mesh.model"] == "strip-reader"
    assert tuple(attributes["mesh.filters"]) == ("grayscale",)  # type: ignore[arg-type]
    client_spans = [
        s for s in finished if s.name == "/mesh.queue.v1.QueueService/SubmitJob" and s.kind == SpanKind.CLIENT
    ]
    assert client_spans
    assert client_spans[0].parent is not None
    assert client_spans[0].parent.span_id == server.context.span_id


async def test_access_log_line_carries_the_trace_id(
    client: httpx.AsyncClient, caplog: pytest.LogCaptureFixture
) -> None:
    """Each API request logs one line with its route, status, client address and the trace id of its span."""
    with caplog.at_level(logging.INFO, logger="mesh.services.gateway.access"):
        response = await client.get("/v1/models", headers={"traceparent": INCOMING})
    assert response.status_code == 200
    lines = [r.msg for r in caplog.records if r.name == "mesh.services.gateway.access"]
    assert lines
    line = lines[-1]
    assert isinstance(line, dict)
    assert (line["route"], line["status"], line["client"]) == ("/v1/models", 200, "127.0.0.1")
    assert line["trace_id"] == "4bf92f3577b34da6a3ce929d0e0e4736"


class _HangingFiles(FakeFileService):
    """A file service whose GetImage never answers (its PostgreSQL cut), counting the calls cancelled."""

    def __init__(self) -> None:
        super().__init__()
        self.called = asyncio.Event()
        self.cancelled = 0

    async def GetImage(  # noqa: N802 (the gRPC method's name)
        self, request: file_pb.GetImageRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> file_pb.GetImageResponse:
        self.called.set()
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        return file_pb.GetImageResponse()


async def test_a_client_that_leaves_a_get_cancels_the_backend_call_and_is_recorded_as_499(
    mesh: FakeMesh, spans: InMemorySpanExporter, caplog: pytest.LogCaptureFixture
) -> None:
    """A GET (no body) whose client closes its connection while the backend hangs cancels the gRPC call and is
    a 499 in the access log, the metrics and the span, as a POST is: it was watched only once the app read a
    body, which a GET's route never does, so the call ran to its timeout and a 503 was recorded for nobody."""
    files = _HangingFiles()
    server = grpc.aio.server()
    file_grpc.add_FileServiceServicer_to_server(files, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    app, ctx = build_gateway(mesh.gateway_settings(file_service_address=f"127.0.0.1:{port}"))
    route = "/v1/images/{image_id}"
    labels = {"route": route, "method": "GET", "status": "499"}
    try:
        with caplog.at_level(logging.INFO, logger="mesh.services.gateway.access"):
            async with serve_app(app) as url, httpx.AsyncClient(base_url=url, timeout=10) as http:
                before = (await http.get("/metrics")).text
                spans.clear()
                host, http_port = url.removeprefix("http://").split(":")
                reader, writer = await asyncio.open_connection(host, int(http_port))
                writer.write(f"GET /v1/images/img-1 HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
                await writer.drain()
                await asyncio.wait_for(files.called.wait(), 5)
                assert not reader.at_eof()  # no answer yet: the call hangs
                writer.close()
                await writer.wait_closed()
                for _ in range(100):
                    if files.cancelled:
                        break
                    await asyncio.sleep(0.02)
                await asyncio.sleep(0.1)  # the access line is written as the request unwinds
                after = (await http.get("/metrics")).text
    finally:
        await close_gateway(ctx)
        await server.stop(None)
    assert files.cancelled == 1
    lines = [r.msg for r in caplog.records if r.name == "mesh.services.gateway.access"]
    assert [(line["route"], line["status"]) for line in lines if isinstance(line, dict)] == [(route, 499)]
    assert (
        _sample(after, "http_requests_total", **labels) - _sample(before, "http_requests_total", **labels)
        == 1
    )
    (server_span,) = [s for s in spans.get_finished_spans() if s.name == f"GET {route}"]
    assert dict(server_span.attributes or {})["http.response.status_code"] == 499


async def test_a_413_before_routing_is_recorded_under_its_route(
    client: httpx.AsyncClient, spans: InMemorySpanExporter, caplog: pytest.LogCaptureFixture
) -> None:
    """A body refused by its Content-Length (answered before the router runs) is counted, traced and logged
    under the route it was sent to, not ``unmatched``; a path no route has stays ``unmatched``."""
    before = (await client.get("/metrics")).text
    spans.clear()
    with caplog.at_level(logging.INFO, logger="mesh.services.gateway.access"):
        refused = await client.post(
            "/v1/jobs", content=b"{" + b" " * 2_000_000 + b"}", headers={"content-type": "application/json"}
        )
        missing = await client.post("/v1/nothing-here", content=b"{}")
    assert (refused.status_code, missing.status_code) == (413, 404)
    names = [s.name for s in spans.get_finished_spans() if s.kind == SpanKind.SERVER]
    assert names == ["POST /v1/jobs", "POST unmatched"]
    after = (await client.get("/metrics")).text
    for labels in (
        {"route": "/v1/jobs", "method": "POST", "status": "413"},
        {"route": "unmatched", "method": "POST", "status": "404"},
    ):
        counted = _sample(after, "http_requests_total", **labels)
        assert counted - _sample(before, "http_requests_total", **labels) == 1, labels
    lines = [r.msg for r in caplog.records if r.name == "mesh.services.gateway.access"]
    assert [(line["route"], line["status"]) for line in lines if isinstance(line, dict)] == [
        ("/v1/jobs", 413),
        ("unmatched", 404),
    ]


async def test_static_files_are_counted_under_their_mount_and_stay_out_of_the_access_log(
    client: httpx.AsyncClient, caplog: pytest.LogCaptureFixture
) -> None:
    """The page's files (a mount, which records no route) are one ``/static`` series and, being quiet, log
    no line when served; they were ``unmatched`` and logged, every one."""
    before = (await client.get("/metrics")).text
    with caplog.at_level(logging.INFO, logger="mesh.services.gateway.access"):
        assert (await client.get("/static/app.js")).status_code == 200
        assert (await client.get("/static/style.css")).status_code == 200
    after = (await client.get("/metrics")).text
    labels = {"route": "/static", "method": "GET", "status": "200"}
    assert (
        _sample(after, "http_requests_total", **labels) - _sample(before, "http_requests_total", **labels)
        == 2
    )
    assert [r.msg for r in caplog.records if r.name == "mesh.services.gateway.access"] == []


async def test_an_invented_method_is_labelled_other_in_metrics_and_span_names(
    client: httpx.AsyncClient, spans: InMemorySpanExporter, caplog: pytest.LogCaptureFixture
) -> None:
    """A method outside HTTP's standard ones is ``_OTHER`` in the metric labels and the span's name and method
    (OpenTelemetry's HTTP conventions), its real name kept in ``http.request.method_original`` and the
    access log: each invented method was a new series on every route (28 methods x 5 routes: 2 100 more)."""
    before = (await client.get("/metrics")).text
    spans.clear()
    with caplog.at_level(logging.INFO, logger="mesh.services.gateway.access"):
        for method in ("PROPFIND", "MKCOL"):
            assert (await client.request(method, "/v1/images")).status_code == 405
        assert (await client.request("PATCH", "/v1/images")).status_code == 405
    servers = [s for s in spans.get_finished_spans() if s.kind == SpanKind.SERVER]
    after = (await client.get("/metrics")).text
    for method, count in (("_OTHER", 2), ("PATCH", 1)):
        labels = {"route": "/v1/images", "method": method, "status": "405"}
        counted = _sample(after, "http_requests_total", **labels)
        assert counted - _sample(before, "http_requests_total", **labels) == count, method
    assert "PROPFIND" not in after
    assert "MKCOL" not in after
    assert [s.name for s in servers] == ["_OTHER /v1/images", "_OTHER /v1/images", "PATCH /v1/images"]
    attributes = dict(servers[0].attributes or {})
    assert (attributes["http.request.method"], attributes["http.request.method_original"]) == (
        "_OTHER",
        "PROPFIND",
    )
    assert "http.request.method_original" not in dict(servers[2].attributes or {})
    lines = [r.msg for r in caplog.records if r.name == "mesh.services.gateway.access"]
    assert [line["method"] for line in lines if isinstance(line, dict)] == ["PROPFIND", "MKCOL", "PATCH"]
