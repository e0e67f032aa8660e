"""A minimal OTLP/HTTP trace collector for tests: receives spans and keeps them in memory."""

from __future__ import annotations

import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from opentelemetry.proto.collector.trace.v1 import trace_service_pb2


@dataclass(frozen=True)
class CollectedSpan:
    """The parts of a span that the trace tests look at."""

    service: str
    name: str
    trace_id: str
    span_id: str
    parent_span_id: str
    links: tuple[str, ...]
    attributes: dict[str, object]


class Collector:
    """Listens on 127.0.0.1 (port chosen by the OS) for OTLP/HTTP protobuf trace exports."""

    def __init__(self) -> None:
        self.spans: list[CollectedSpan] = []
        self._lock = threading.Lock()
        collector = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", "0"))
                request = trace_service_pb2.ExportTraceServiceRequest.FromString(self.rfile.read(length))
                collector._add(request)
                body = trace_service_pb2.ExportTraceServiceResponse().SerializeToString()
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:
                return

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.endpoint = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def __enter__(self) -> Collector:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._server.shutdown()
        self._server.server_close()

    def _add(self, request: trace_service_pb2.ExportTraceServiceRequest) -> None:
        collected = []
        for resource_spans in request.resource_spans:
            service = next(
                (a.value.string_value for a in resource_spans.resource.attributes if a.key == "service.name"),
                "",
            )
            for scope_spans in resource_spans.scope_spans:
                for span in scope_spans.spans:
                    attributes: dict[str, object] = {}
                    for attribute in span.attributes:
                        kind = attribute.value.WhichOneof("value")
                        attributes[attribute.key] = getattr(attribute.value, kind) if kind else None
                    collected.append(
                        CollectedSpan(
                            service=service,
                            name=span.name,
                            trace_id=span.trace_id.hex(),
                            span_id=span.span_id.hex(),
                            parent_span_id=span.parent_span_id.hex(),
                            links=tuple(link.span_id.hex() for link in span.links),
                            attributes=attributes,
                        )
                    )
        with self._lock:
            self.spans.extend(collected)

    def trace(self, trace_id: str) -> list[CollectedSpan]:
        """Every span received so far of one trace."""
        with self._lock:
            return [s for s in self.spans if s.trace_id == trace_id]
