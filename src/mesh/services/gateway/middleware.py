"""Pure ASGI middleware: one span and RED metrics per request, ``traceparent`` on every response, body limits.

Pure ASGI (not ``BaseHTTPMiddleware``) so that streaming responses are not buffered and the span stays the
current context inside the endpoint, which makes outgoing gRPC calls children of it.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, MutableMapping
from typing import Any

from fastapi.routing import RouteContext, iter_route_contexts
from opentelemetry import trace
from opentelemetry.trace import SpanKind, Status, StatusCode
from starlette.applications import Starlette
from starlette.routing import Match, Mount
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from mesh.kit import errors, tracing
from mesh.kit.logging import get_logger
from mesh.kit.trace_ids import traceparent
from mesh.kit.units import binary_size
from mesh.services.gateway import metrics
from mesh.services.gateway.http_errors import CLIENT_CLOSED_REQUEST, answer, internal_error_response

_tracer = tracing.tracer(__name__)
log = get_logger("mesh.services.gateway.access")
# Probes and scrapes arrive every few seconds; their successes are not worth a log line each.
QUIET_ROUTES = frozenset({"/healthz", "/readyz", "/metrics", "/v1/health", "/static"})
EXTRA_HEADERS_KEY = "mesh.response_headers"


def route_template(scope: Scope, as_received: Scope | None = None) -> str:
    """The path template (``/v1/images/{image_id}``) of the route the request went, or would have gone, to;
    ``unmatched`` when no route's path matches.

    Where the router recorded no route, the app's routes are matched against ``as_received`` (a copy of the
    scope made before routing, which a mount rewrites), or else ``scope``.
    """
    path = getattr(scope.get("route"), "path_format", None)  # without convertors: {job_id}, not {job_id:name}
    return str(path or matching_template(scope if as_received is None else as_received) or "unmatched")


def matching_template(scope: Scope) -> str | None:
    """The template of the route the app's router would pick for ``scope``: the first whose path and method
    match, else the first whose path does (its 405).

    For answers the router did not record a route for: those given before routing (a 413 by Content-Length,
    a CORS preflight), and those of routes that do not record themselves (the static files, /openapi.json).
    They were all ``unmatched``, hiding which route's uploads were refused.
    """
    app = scope.get("app")
    if not isinstance(app, Starlette):
        return None
    partial = None
    for route in iter_route_contexts(app.routes):
        match, _ = route.matches(scope)
        if match is Match.FULL:
            return template_of(route)
        if match is Match.PARTIAL and partial is None:
            partial = route
    return template_of(partial) if partial is not None else None


def template_of(route: RouteContext) -> str | None:
    """A route's label: its path template, or a mount's prefix (``/static``, one series for all its files)."""
    path = route.path if isinstance(route.original_route, Mount) else route.path_format
    return str(path) if path else None


STANDARD_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "CONNECT", "TRACE"})
OTHER_METHOD = "_OTHER"


def method_label(method: str) -> str:
    """``method`` as a metric label and in a span name: RFC 9110's methods and PATCH as they are, any other
    ``_OTHER`` (OpenTelemetry's HTTP conventions). The server passes any token as a method, so one client
    made 28 invented methods on 5 routes into 2 100 new duration series."""
    return method if method in STANDARD_METHODS else OTHER_METHOD


def add_response_headers(scope: Scope, headers: dict[str, str]) -> None:
    """Ask the middleware to add ``headers`` to this request's response (rate limits, for example)."""
    state: MutableMapping[str, Any] = scope.setdefault("state", {})
    state.setdefault(EXTRA_HEADERS_KEY, {}).update(headers)


class HttpMiddleware(ABC):
    """An ASGI middleware that acts on HTTP requests (``handle``); lifespan and other scopes pass through."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        await self.handle(scope, receive, send)

    @abstractmethod
    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Serve one HTTP request."""


HEAD_KEY = "mesh.head"


class HeadAsGet(HttpMiddleware):
    """HEAD answered as the GET it stands for, without the body (RFC 9110: a general-purpose server supports
    both; FastAPI's routes list only GET, so ``curl -I`` and HEAD health checks got 405)."""

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["method"] != "HEAD":
            await self.app(scope, receive, send)
            return
        ended = False

        async def headers_only(message: Message) -> None:
            nonlocal ended
            if message["type"] == "http.response.start":
                # The server frames the response by the scope's method when the headers go out: as a GET's,
                # uvicorn waited for the Content-Length's worth of body, then reset the keep-alive connection.
                scope["method"] = "HEAD"
                await send(message)
            elif message["type"] != "http.response.body":
                await send(message)
            elif not ended:
                # The headers (Content-Length included) are the GET's; the body ends here, and what the
                # endpoint still sends (a streamed download) is dropped.
                ended = True
                await send({"type": "http.response.body", "body": b"", "more_body": False})

        # The scope itself, not a copy: the router records the matched route (and a rate limit its headers)
        # in it, which ObservedRequests reads for the metrics, span and log line once the response is out.
        scope["method"] = "GET"
        scope[HEAD_KEY] = True
        try:
            await self.app(scope, receive, headers_only)
        finally:
            scope["method"] = "HEAD"


def has_body(scope: Scope) -> bool:
    """Whether the request says a body follows: a Content-Length other than 0, or a Transfer-Encoding."""
    for key, value in scope["headers"]:
        if key == b"transfer-encoding" or (key == b"content-length" and value.strip() not in (b"0", b"")):
            return True
    return False


class CancelOnDisconnect(HttpMiddleware):
    """Stops working for a client that has gone: once the request's body is read (from the start for a
    request without one: a GET, a DELETE), a disconnect cancels the request's task, and with it the gRPC call
    it awaits (the service sees CANCELLED; a prediction still waiting for its batch never runs). The request
    is recorded as 499. Starlette itself only notices a disconnect while it streams a response; a client that
    gave up on a long ``/v1/process`` had the whole pipeline run and a 200 logged for nobody.
    """

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        body_read = asyncio.Event()
        response_started = response_finished = False
        early: list[Message] = []

        def note(message: Message) -> Message:
            if message["type"] == "http.request" and not message.get("more_body", False):
                body_read.set()
            return message

        async def tracking_receive() -> Message:
            return early.pop() if early else note(await receive())

        if not has_body(scope):
            # The server holds its empty body already: read here (the app gets it when it asks), so that the
            # watch below starts now. It waited for the app to read a body, which a GET's route never does: a
            # client that left a GET whose backend hung had the retries run for nobody, and a 503 logged.
            first = note(await receive())
            if first["type"] == "http.disconnect":
                body_read.set()  # gone already: the watch sees it again at once
            early.append(first)

        async def tracking_send(message: Message) -> None:
            nonlocal response_started, response_finished
            if message["type"] == "http.response.start":
                response_started = True
            elif message["type"] == "http.response.body" and not message.get("more_body", False):
                response_finished = True
            await send(message)

        async def serve() -> None:
            await self.app(scope, tracking_receive, tracking_send)

        serving = asyncio.create_task(serve())

        async def watch() -> bool:
            await body_read.wait()
            # After the whole body, the server's next message is the disconnect: the client's leaving, or
            # (uvicorn says so too) the end of a response already sent, whose work after it must finish.
            while (await receive())["type"] != "http.disconnect":
                pass
            if response_finished:
                return False
            serving.cancel()
            return True

        watcher = asyncio.create_task(watch())
        try:
            await serving
        except asyncio.CancelledError:
            if not (watcher.done() and not watcher.cancelled() and watcher.result()):
                raise  # cancelled from outside (shutdown), not by the client's leaving
            if not response_started:
                # Nobody reads it (the server drops it): it is what the access log and metrics record.
                await send({"type": "http.response.start", "status": CLIENT_CLOSED_REQUEST, "headers": []})
                await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher


class ObservedRequests(HttpMiddleware):
    """A server span per request (honouring an incoming traceparent), metrics and the access log.

    The outermost middleware, so that every answer is seen: a CORS preflight, a 413, the safety net's 500.
    """

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        started = time.perf_counter()
        as_received = dict(scope)  # routing rewrites the scope (a mount, its root_path): for route_template
        metrics.IN_FLIGHT.inc()
        try:
            with server_span(scope) as span:
                exchange = Exchange(scope, receive, send, span)
                try:
                    await self.app(scope, exchange.receive, exchange.send)
                except Exception as exc:
                    # Only after the response began (SafetyNet answers the rest): the client sees a cut-off
                    # body.
                    span.record_exception(exc)
                    raise
                finally:
                    exchange.record(span, route_template(scope, as_received), time.perf_counter() - started)
        finally:
            metrics.IN_FLIGHT.dec()


def server_span(scope: Scope) -> contextlib.AbstractContextManager[trace.Span]:
    """The request's server span, named by its method until its route is known, continuing the caller's
    trace when the request carries a traceparent."""
    carrier = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
    method: str = scope["method"]
    label = method_label(method)
    attributes = {"http.request.method": label, "url.path": scope["path"]}
    if label != method:
        attributes["http.request.method_original"] = method
    return _tracer.start_as_current_span(
        label,
        context=tracing.extract(carrier),
        kind=SpanKind.SERVER,
        attributes=attributes,
        record_exception=False,
        set_status_on_exception=False,
    )


class Exchange:
    """One request and its response as :class:`ObservedRequests` sees them: the body bytes both ways and the
    status sent, with ``traceparent`` and the headers asked for (:func:`add_response_headers`) added to the
    response; then recorded on the span, in the metrics and in the access log."""

    def __init__(self, scope: Scope, receive: Receive, send: Send, span: trace.Span) -> None:
        self._scope = scope
        self._receive = receive
        self._send = send
        self.method: str = scope["method"]
        self.label = method_label(self.method)
        self.status = 500
        self.bytes_in = 0
        self.bytes_out = 0
        # Without an SDK tracer provider the span is a no-op with an invalid context; send nothing then.
        self._traceparent = traceparent(span).encode() if span.get_span_context().is_valid else b""

    async def receive(self) -> Message:
        """The server's next message, its body bytes counted."""
        message = await self._receive()
        if message["type"] == "http.request":
            self.bytes_in += len(message.get("body", b""))
        return message

    async def send(self, message: Message) -> None:
        """Send the app's ``message``: the response's start noted and given the added headers, body bytes
        counted."""
        if message["type"] == "http.response.start":
            self.status = message["status"]
            message = {**message, "headers": self._response_headers(message)}
        elif message["type"] == "http.response.body":
            self.bytes_out += len(message.get("body", b""))
        await self._send(message)

    def _response_headers(self, start: Message) -> list[tuple[bytes, bytes]]:
        headers = list(start.get("headers", []))
        if self._traceparent:
            headers.append((b"traceparent", self._traceparent))
        extra: dict[str, str] = self._scope.get("state", {}).get(EXTRA_HEADERS_KEY, {})
        headers.extend((k.lower().encode(), v.encode()) for k, v in extra.items())
        return headers

    def record(self, span: trace.Span, route: str, elapsed: float) -> None:
        """Name ``span`` after ``route`` and give it the status, count the request, and log it unless it is a
        quiet route's success."""
        self._finish_span(span, route)
        self._count(route, elapsed)
        if route not in QUIET_ROUTES or self.status >= 400:
            # Inside the span, so the line carries this request's trace_id and span_id.
            self._log(route, elapsed)

    def _finish_span(self, span: trace.Span, route: str) -> None:
        span.update_name(f"{self.label} {route}")
        span.set_attribute("http.route", route)
        span.set_attribute("http.response.status_code", self.status)
        if self.status >= 500:
            span.set_status(Status(StatusCode.ERROR))

    def _count(self, route: str, elapsed: float) -> None:
        metrics.REQUESTS.labels(route, self.label, str(self.status)).inc()
        metrics.DURATION.labels(route, self.label).observe(elapsed)
        metrics.BYTES_IN.labels(route).inc(self.bytes_in)
        metrics.BYTES_OUT.labels(route).inc(self.bytes_out)

    def _log(self, route: str, elapsed: float) -> None:
        log.info(
            "request",
            method=self.method,
            route=route,
            path=self._scope["path"],
            client=client[0] if (client := self._scope.get("client")) else "",
            status=self.status,
            duration_ms=round(elapsed * 1000, 3),
            bytes_in=self.bytes_in,
            bytes_out=self.bytes_out,
        )


class SafetyNet(HttpMiddleware):
    """A bug's exception becomes the contract's 500 (logged, recorded on the request's span), unless the
    response had begun, when there is nothing left to answer with and it goes on up.

    Inside the CORS middleware, so that the 500 carries its headers too (a browser hides an answer without them
    from the page).
    """

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        response_started = False

        async def watching_send(message: Message) -> None:
            nonlocal response_started
            if message["type"] == "http.response.start":
                response_started = True
            await send(message)

        try:
            await self.app(scope, receive, watching_send)
        except Exception as exc:
            if response_started:
                raise
            trace.get_current_span().record_exception(exc)
            await internal_error_response(exc, scope)(scope, receive, send)


MAX_JSON_VALUES = 20_000
"""Most values (object members and array items, counted by their separating commas) a JSON body may hold.

The largest request a client needs (64 pipeline steps of 64 parameters) holds about 4 500. pydantic builds every
value of a body before it validates any, and an error for each unknown key: 36 MB of ``{"k1":0,"k2":0,...}``
cost 1.2 GB and 2.4 s on the event loop, 1 MiB of them 150 MB.
"""


def is_json(scope: Scope) -> bool:
    """Whether the request declares a JSON body (``application/json`` or ``application/*+json``)."""
    for key, value in scope["headers"]:
        if key == b"content-type":
            kind: bytes = value.split(b";")[0].strip().lower()
            return kind == b"application/json" or (
                kind.startswith(b"application/") and kind.endswith(b"+json")
            )
    return False


def separators(chunk: bytes, most: int) -> int:
    """The commas in ``chunk``, counted up to ``most + 1``.

    One ``find`` per comma runs at memchr's speed over a base64 image, which has none (``bytes.count`` took
    22 ms for 36 MB), and stops early on a body that is nothing but commas.
    """
    found = 0
    at = chunk.find(b",")
    while at >= 0 and found <= most:
        found += 1
        at = chunk.find(b",", at + 1)
    return found


class BodyLimit(HttpMiddleware):
    """Refuses bodies over the limit with 413 before reading them: by Content-Length, then by counting; and a
    JSON body of more than :data:`MAX_JSON_VALUES` values with 400, before it is parsed.

    When a body grows past a limit, reading stops, whatever the app answered is discarded and the refusal goes
    out instead (the app sees a disconnect).
    """

    def __init__(self, app: ASGIApp, limit_for: Callable[[Scope], int]) -> None:
        super().__init__(app)
        self.limit_for = limit_for

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        limit = self.limit_for(scope)
        too_large = errors.PayloadTooLarge(
            f"the request body is larger than the limit of {binary_size(limit)} ({limit} bytes) for "
            f"{scope['method']} {scope['path']}",
            metadata={"limit_bytes": str(limit)},
        )
        for key, value in scope["headers"]:
            if key == b"content-length" and value.isdigit() and int(value) > limit:
                # Before the route runs: nothing asked this answer to carry metadata (a prediction's id) yet.
                await answer(scope, too_large)(scope, receive, send)
                return
        # n commas separate n + 1 values (or more, as a one-value array has none).
        commas_left = MAX_JSON_VALUES - 1 if is_json(scope) else None
        received = 0
        refusal: errors.MeshError | None = None
        sent_start = False

        async def limited_receive() -> Message:
            nonlocal received, refusal, commas_left
            if refusal is not None:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                chunk = message.get("body", b"")
                received += len(chunk)
                if commas_left is not None:
                    commas_left -= separators(chunk, commas_left)
                if received > limit:
                    refusal = too_large
                elif commas_left is not None and commas_left < 0:
                    refusal = too_many_values()
                if refusal is not None:
                    return {"type": "http.disconnect"}
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal sent_start
            if refusal is not None and not sent_start:
                return
            if message["type"] == "http.response.start":
                sent_start = True
            await send(message)

        try:
            await self.app(scope, limited_receive, guarded_send)
        except Exception:
            if refusal is None:
                raise
        if refusal is not None and not sent_start:
            # With the ErrorInfo metadata the route asked for before it read the body (a prediction's id).
            await answer(scope, refusal)(scope, receive, send)


def too_many_values() -> errors.InvalidArgument:
    """The 400 for a JSON body of more values than any request needs."""
    reason = f"holds more than {MAX_JSON_VALUES} values (object members and array items); no request needs that many"
    return errors.InvalidArgument(
        f"invalid request: body {reason}", field_violations=[errors.FieldViolation("body", reason)]
    )
