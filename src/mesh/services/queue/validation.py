"""Checks of QueueService requests, reported as InvalidArgument with one violation per bad field."""

from __future__ import annotations

import uuid

from mesh.kit import errors
from mesh.queue.v1 import queue_service_pb2

MAX_PRIORITY = 9
MAX_ATTEMPTS = 100
MAX_IDEMPOTENCY_KEY = 256
MAX_PAGE_SIZE = 500
DEFAULT_PAGE_SIZE = 50


def parse_uuid(value: str, field: str) -> uuid.UUID:
    """A UUID field, or InvalidArgument naming it."""
    try:
        return uuid.UUID(value)
    except ValueError:
        raise errors.InvalidArgument(
            f"{field} must be a UUID", field_violations=[errors.FieldViolation(field, "must be a UUID")]
        ) from None


def check_submit(request: queue_service_pb2.SubmitJobRequest) -> None:
    """Every problem of a submit at once."""
    bad: list[errors.FieldViolation] = []
    if not request.image_id:
        bad.append(errors.FieldViolation("image_id", "is required"))
    else:
        try:
            uuid.UUID(request.image_id)
        except ValueError:
            bad.append(errors.FieldViolation("image_id", "must be a UUID (an image id of the file service)"))
    if not request.pipeline and not request.model:
        bad.append(errors.FieldViolation("pipeline", "give a pipeline, a model, or both"))
    for index, step in enumerate(request.pipeline):
        if not step.filter:
            bad.append(errors.FieldViolation(f"pipeline[{index}].filter", "is required"))
    if request.priority > MAX_PRIORITY:
        bad.append(errors.FieldViolation("priority", f"must be between 0 and {MAX_PRIORITY}"))
    if request.max_attempts > MAX_ATTEMPTS:
        bad.append(
            errors.FieldViolation("max_attempts", f"must be between 1 and {MAX_ATTEMPTS} (0: default)")
        )
    if len(request.idempotency_key) > MAX_IDEMPOTENCY_KEY:
        bad.append(errors.FieldViolation("idempotency_key", f"at most {MAX_IDEMPOTENCY_KEY} characters"))
    if bad:
        raise errors.InvalidArgument("the job request is invalid", field_violations=bad)


def page_size(requested: int) -> int:
    """The page size to use: default 50, at most 500."""
    if requested > MAX_PAGE_SIZE:
        raise errors.InvalidArgument(
            "page_size is too large",
            field_violations=[errors.FieldViolation("page_size", f"at most {MAX_PAGE_SIZE}")],
        )
    return requested or DEFAULT_PAGE_SIZE
