"""``ObservedRequests`` around bare ASGI apps: what the span, the metrics and the access log record of answers
that the gateway's routes rarely give (a 5xx, a failure after the response began, a failing probe)."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from types import SimpleNamespace
from typing import Any

import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode
from prometheus_client import REGISTRY
from starlette.types import Message, Receive, Scope, Send

from mesh.services.gateway.middleware import ObservedRequests

ROUTE = "/test/observed/{n}"
ACCESS = "mesh.services.gateway.access"
App = Callable[[Scope, Receive, Send], Awaitable[None]]


def answering(status: int, *bodies: bytes, route: str = ROUTE, fail_after_start: bool = False) -> App:
    """An app that reads the request's body, records ``route`` as the router does, and answers ``status``
    with ``bodies`` (then raises, with ``fail_after_start``)."""

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        scope["route"] = SimpleNamespace(path_format=route)
        while (await receive()).get("more_body", False):
            pass
        await send({"type": "http.response.start", "status": status, "headers": []})
        for body in bodies:
            await send({"type": "http.response.body", "body": body, "more_body": True})
        if fail_after_start:
            raise RuntimeError("the stream broke")
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    return app


async def serve(app: App, path: str = "/test/observed/1", body: list[bytes] | None = None) -> list[Message]:
    """What ``ObservedRequests`` around ``app`` sends for one POST of ``body`` (in those chunks)."""
    parts = list(body or [b""])
    sent: list[Message] = []
    scope: dict[str, Any] = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "root_path": "",
        "query_string": b"",
        "headers": [(b"host", b"gw")],
        "client": ("10.0.0.7", 50000),
        "server": ("gw", 80),
    }

    async def receive() -> Message:
        chunk = parts.pop(0)
        return {"type": "http.request", "body": chunk, "more_body": bool(parts)}

    async def send(message: Message) -> None:
        sent.append(message)

    await ObservedRequests(app)(scope, receive, send)
    return sent


def sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def access_lines(caplog: pytest.LogCaptureFixture) -> list[dict[str, Any]]:
    return [r.msg for r in caplog.records if r.name == ACCESS and isinstance(r.msg, dict)]


async def test_a_5xx_marks_the_span_as_an_error_and_a_4xx_does_not(spans: InMemorySpanExporter) -> None:
    """The server span's status is ERROR for a 5xx answer only: a client's mistake is not the server's."""
    spans.clear()
    await serve(answering(503))
    await serve(answering(404))
    servers = [s for s in spans.get_finished_spans() if s.kind == SpanKind.SERVER]
    assert [s.name for s in servers] == [f"POST {ROUTE}"] * 2
    assert [s.status.status_code for s in servers] == [StatusCode.ERROR, StatusCode.UNSET]
    assert [dict(s.attributes or {})["http.response.status_code"] for s in servers] == [503, 404]


async def test_a_failure_after_the_response_began_is_recorded_and_raised(
    spans: InMemorySpanExporter, caplog: pytest.LogCaptureFixture
) -> None:
    """An app that fails after its 200 began (a stream cut part way) raises on, with the exception on the
    span, and the request is counted and logged with the status the client got."""
    before = sample("http_requests_total", route=ROUTE, method="POST", status="200")
    spans.clear()
    with caplog.at_level(logging.INFO, logger=ACCESS), pytest.raises(RuntimeError, match="the stream broke"):
        await serve(answering(200, b"part", fail_after_start=True))
    (server,) = [s for s in spans.get_finished_spans() if s.kind == SpanKind.SERVER]
    assert [event.name for event in server.events] == ["exception"]
    assert sample("http_requests_total", route=ROUTE, method="POST", status="200") - before == 1
    assert [(line["status"], line["bytes_out"]) for line in access_lines(caplog)] == [(200, 4)]


async def test_an_app_that_fails_before_answering_is_counted_as_500(caplog: pytest.LogCaptureFixture) -> None:
    """Without a response start, the request is recorded as the 500 the server will answer."""

    async def broken(scope: Scope, receive: Receive, send: Send) -> None:
        scope["route"] = SimpleNamespace(path_format=ROUTE)
        raise RuntimeError("a bug")

    before = sample("http_requests_total", route=ROUTE, method="POST", status="500")
    with caplog.at_level(logging.INFO, logger=ACCESS), pytest.raises(RuntimeError):
        await serve(broken)
    assert sample("http_requests_total", route=ROUTE, method="POST", status="500") - before == 1
    assert [line["status"] for line in access_lines(caplog)] == [500]


async def test_bytes_in_and_out_are_counted_and_logged(caplog: pytest.LogCaptureFixture) -> None:
    """Request and response body bytes, summed over their chunks, go to the byte counters of the route and
    the access line, with the method, path, client address and duration."""
    bytes_in = sample("http_request_bytes_total", route=ROUTE)
    bytes_out = sample("http_response_bytes_total", route=ROUTE)
    with caplog.at_level(logging.INFO, logger=ACCESS):
        sent = await serve(answering(201, b"abc", b"defgh"), body=[b"12345", b"678"])
    assert sent[0]["status"] == 201
    assert sample("http_request_bytes_total", route=ROUTE) - bytes_in == 8
    assert sample("http_response_bytes_total", route=ROUTE) - bytes_out == 8
    (line,) = access_lines(caplog)
    assert {k: line[k] for k in ("method", "route", "path", "client", "status", "bytes_in", "bytes_out")} == {
        "method": "POST",
        "route": ROUTE,
        "path": "/test/observed/1",
        "client": "10.0.0.7",
        "status": 201,
        "bytes_in": 8,
        "bytes_out": 8,
    }
    assert line["duration_ms"] >= 0


async def test_a_quiet_route_is_logged_only_when_it_fails(caplog: pytest.LogCaptureFixture) -> None:
    """A probe's success writes no access line; its failure (a 503 /readyz) does."""
    with caplog.at_level(logging.INFO, logger=ACCESS):
        await serve(answering(200, route="/readyz"), path="/readyz")
        await serve(answering(503, route="/readyz"), path="/readyz")
    assert [(line["route"], line["status"]) for line in access_lines(caplog)] == [("/readyz", 503)]


async def test_a_request_is_in_flight_while_it_is_served() -> None:
    """``http_requests_in_flight`` counts the request while the app serves it, and not after."""
    seen: list[float] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        seen.append(sample("http_requests_in_flight"))
        await answering(204)(scope, receive, send)

    before = sample("http_requests_in_flight")
    await serve(app)
    assert (seen, sample("http_requests_in_flight")) == ([before + 1], before)
