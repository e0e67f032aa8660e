"""The W3C ``traceparent`` of a span, as every answer carries it: REST responses as a header, gRPC calls in
their trailing metadata, so a caller can name the trace whose log lines hold the cause of a failure."""

from __future__ import annotations

from opentelemetry import trace

TRACEPARENT = "traceparent"


def traceparent(span: trace.Span) -> str:
    """The W3C traceparent of ``span``."""
    ctx = span.get_span_context()
    return f"00-{ctx.trace_id:032x}-{ctx.span_id:016x}-{int(ctx.trace_flags):02x}"


def current_traceparent() -> str | None:
    """The traceparent of the current span; None outside any span."""
    span = trace.get_current_span()
    return traceparent(span) if span.get_span_context().is_valid else None


def current_trace_id() -> str | None:
    """The current trace's id as log lines carry it (32 hex digits); None outside any span."""
    ctx = trace.get_current_span().get_span_context()
    return f"{ctx.trace_id:032x}" if ctx.is_valid else None
