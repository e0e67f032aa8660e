"""Attributes on the request's span that say what the request was about (image, filters, model, job)."""

from __future__ import annotations

from collections.abc import Sequence

from opentelemetry import trace

AttributeValue = str | int | float | bool | Sequence[str]


def annotate(attributes: dict[str, AttributeValue]) -> None:
    """Set ``attributes`` (keys like ``mesh.job.id``) on the current span; a no-op when tracing is off."""
    span = trace.get_current_span()
    if span.is_recording():
        span.set_attributes(attributes)
