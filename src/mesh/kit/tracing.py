"""OpenTelemetry from the standard ``OTEL_*`` variables, W3C trace context on every hop.

A tracer provider is always installed, so trace ids exist for logs and propagation even when nothing is
exported. Spans are exported when ``OTEL_TRACES_EXPORTER`` says so (``otlp``, ``console``) or, when it is
unset, when an OTLP endpoint is configured. ``OTEL_EXPORTER_OTLP_PROTOCOL`` picks ``grpc`` or
``http/protobuf`` (the default). Propagators follow ``OTEL_PROPAGATORS`` (default tracecontext,baggage).
Span limits follow the ``OTEL_*_LIMIT`` variables, with bounds of the mesh's own where they are unset (see
:func:`span_limits`).
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterator, Mapping, MutableMapping
from contextlib import contextmanager
from typing import cast

import grpc
from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import SpanLimits, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SpanExporter
from opentelemetry.util.types import Attributes

from mesh.kit import errors
from mesh.kit.client_spans import client_spans
from mesh.kit.jobs import JobInterrupted
from mesh.kit.server_spans import ServerSpans, record_outcome

# Bounds on what one span holds where OTEL_* sets none. OpenTelemetry's own are 128 attributes, 128 events of
# 128 attributes each and no bound on a value's length: an exception event whose stack trace held an error that
# echoed a 1 MB request made a 4 MB span, which an OTel Collector refuses whole (its receivers take 4 MiB).
MAX_ATTRIBUTE_CHARS = 4096
"""The longest attribute value kept (a stack trace, a message); longer ones are cut."""
MAX_SPAN_EVENTS = 32
MAX_EVENT_ATTRIBUTES = 16

_provider: TracerProvider | None = None


def configure_tracing(service: str) -> TracerProvider:
    """Install this process's tracer provider (idempotent); ``OTEL_SERVICE_NAME`` overrides ``service``."""
    global _provider
    if _provider is not None:
        return _provider
    attributes = {} if os.environ.get("OTEL_SERVICE_NAME") else {"service.name": service}
    provider = TracerProvider(resource=Resource.create(attributes), span_limits=span_limits())
    exporter = _exporter_from_env()
    if exporter is not None:
        provider.add_span_processor(BatchSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    _provider = provider
    return provider


def span_limits() -> SpanLimits:
    """OpenTelemetry's span limits, each from its ``OTEL_*`` variable where that is set, else the mesh's bound
    (``MAX_*`` above): a value that echoes a request of any size is cut to a few kilobytes."""

    def unless_set(variable: str, bound: int) -> int | None:
        return None if variable in os.environ else bound  # None: SpanLimits reads the variable

    return SpanLimits(
        max_attribute_length=unless_set("OTEL_ATTRIBUTE_VALUE_LENGTH_LIMIT", MAX_ATTRIBUTE_CHARS),
        max_events=unless_set("OTEL_SPAN_EVENT_COUNT_LIMIT", MAX_SPAN_EVENTS),
        max_event_attributes=unless_set("OTEL_EVENT_ATTRIBUTE_COUNT_LIMIT", MAX_EVENT_ATTRIBUTES),
    )


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
    """Server spans for every RPC except health checks (our own interceptor, not OpenTelemetry's: see
    mesh.kit.server_spans for why)."""
    return ServerSpans(not_health_check)


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


@contextmanager
def internal_span(
    module_tracer: trace.Tracer, name: str, attributes: Attributes = None
) -> Iterator[trace.Span]:
    """A span, current inside, around a stage of a call's or a job's work, that says how it failed as the
    call's server span does: ``start_as_current_span``'s defaults recorded every exception with its stack trace
    and status ERROR, so a caller's NOT_FOUND read as a crash. A MeshError is named with its message and is
    ERROR only where the server failed; any other exception is ERROR (INTERNAL: a crash, logged with its stack
    where it is caught); a cancelled or interrupted one is CANCELLED."""
    with module_tracer.start_as_current_span(
        name, attributes=attributes, record_exception=False, set_status_on_exception=False
    ) as span:
        try:
            yield span
        except errors.MeshError as error:
            record_outcome(span, error.code, error.message)
            raise
        except (asyncio.CancelledError, JobInterrupted) as error:
            record_outcome(span, grpc.StatusCode.CANCELLED, str(error))
            raise
        except Exception as error:
            record_outcome(span, grpc.StatusCode.INTERNAL, f"{type(error).__name__}: {error}")
            raise
