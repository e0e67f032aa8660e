"""OpenTelemetry from the standard ``OTEL_*`` variables, W3C trace context on every hop.

A tracer provider is always installed, so trace ids exist for logs and propagation even when nothing is
exported. Spans are exported when ``OTEL_TRACES_EXPORTER`` says so (``otlp``, ``console``) or, when it is
unset, when an OTLP endpoint is configured. ``OTEL_EXPORTER_OTLP_PROTOCOL`` picks ``grpc`` or
``http/protobuf`` (the default). Propagators follow ``OTEL_PROPAGATORS`` (default tracecontext,baggage).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, MutableMapping
from typing import cast

import grpc
from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.instrumentation.grpc import aio_server_interceptor
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SpanExporter

from mesh.kit.client_spans import client_spans

_provider: TracerProvider | None = None


def configure_tracing(service: str) -> TracerProvider:
    """Install this process's tracer provider (idempotent); ``OTEL_SERVICE_NAME`` overrides ``service``."""
    global _provider
    if _provider is not None:
        return _provider
    attributes = {} if os.environ.get("OTEL_SERVICE_NAME") else {"service.name": service}
    provider = TracerProvider(resource=Resource.create(attributes))
    exporter = _exporter_from_env()
    if exporter is not None:
        provider.add_span_processor(BatchSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    _provider = provider
    return provider


def shutdown_tracing() -> None:
    """Flush and stop span export (call on shutdown)."""
    if _provider is not None:
        _provider.shutdown()


def _exporter_from_env() -> SpanExporter | None:
    choice = os.environ.get("OTEL_TRACES_EXPORTER", "").strip().lower()
    if not choice:
        has_endpoint = os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") or os.environ.get(
            "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"
        )
        choice = "otlp" if has_endpoint else "none"
    if choice == "none":
        return None
    if choice == "console":
        return ConsoleSpanExporter()
    if choice != "otlp":
        raise ValueError(f"OTEL_TRACES_EXPORTER={choice!r} is not supported; use otlp, console or none")
    protocol = (
        os.environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
        or os.environ.get("OTEL_EXPORTER_OTLP_PROTOCOL")
        or "http/protobuf"
    )
    if protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as GrpcExporter

        return GrpcExporter()
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as HttpExporter

    return HttpExporter()


def server_interceptor() -> grpc.aio.ServerInterceptor:  # type: ignore[type-arg]
    """Server spans for every RPC except health checks."""
    interceptor: grpc.aio.ServerInterceptor = aio_server_interceptor(  # type: ignore[type-arg,no-untyped-call]
        filter_=not_health_check
    )
    return interceptor


def client_interceptors() -> list[grpc.aio.ClientInterceptor]:
    """Client spans and trace-context injection for outgoing calls, except health checks (our own
    interceptor, not OpenTelemetry's: see mesh.kit.client_spans for why)."""
    return [cast(grpc.aio.ClientInterceptor, i) for i in client_spans(not_health_check)]


_HEALTH_PREFIX = "/grpc.health.v1.Health/"


def not_health_check(details: object) -> bool:
    """The interceptors' filter: trace every call but gRPC health checks.

    A plain prefix test on the method: the instrumentation's own filters dispatch on ``isinstance`` against
    typing protocols, a cost on every RPC that showed in profiles of busy services."""
    method = getattr(details, "method", "")
    if isinstance(method, bytes):  # client call details may carry bytes (grpc/grpc#31092)
        return not method.startswith(_HEALTH_PREFIX.encode())
    return not str(method).startswith(_HEALTH_PREFIX)


def inject(carrier: MutableMapping[str, str]) -> MutableMapping[str, str]:
    """Write the current trace context (traceparent, tracestate, baggage) into ``carrier``."""
    propagate.inject(carrier)
    return carrier


def extract(carrier: Mapping[str, str]) -> otel_context.Context:
    """Read a trace context from ``carrier`` (message headers, a stored job row)."""
    return propagate.extract(carrier)


def tracer(name: str) -> trace.Tracer:
    """A tracer for a module."""
    return trace.get_tracer(name)
