"""The ``Idempotency-Key`` header, which uploads and job submits both take (a job's key may come in its body
too), checked here so that a bad header is named as the header the client sent, not as the gRPC field it
travels in."""

from __future__ import annotations

import uuid
from typing import Any

from starlette.requests import Request

from mesh.kit import errors
from mesh.kit.text_fields import MAX_IDEMPOTENCY_KEY_CHARS, text_problem

HEADER = "Idempotency-Key"
FIELD = f"header.{HEADER}"
OPENAPI_PARAMETER: dict[str, Any] = {
    "name": HEADER,
    "in": "header",
    "required": False,
    "schema": {"type": "string", "maxLength": MAX_IDEMPOTENCY_KEY_CHARS},
}


def header_key(request: Request) -> str:
    """The header's key ("" when absent), or INVALID_ARGUMENT saying what is wrong with it."""
    key = request.headers.get(HEADER, "")
    problem = text_problem(key, MAX_IDEMPOTENCY_KEY_CHARS)
    if problem:
        raise errors.InvalidArgument(
            f"the {HEADER} header {problem}", field_violations=[errors.FieldViolation(FIELD, problem)]
        )
    return key


def job_key(request: Request, body_key: str) -> str:
    """A job's key from its body or the header; both may be given only if they agree."""
    header = header_key(request)
    if header and body_key and header != body_key:
        raise errors.InvalidArgument(
            f"the {HEADER} header says {header!r} and the body's idempotency_key {body_key!r}; give it once",
            field_violations=[
                errors.FieldViolation(FIELD, "the header and the body's idempotency_key disagree")
            ],
        )
    return body_key or header


def generated_key() -> str:
    """The key the gateway gives a job submitted without one: the channel retries a SubmitJob whose answer was
    lost (UNAVAILABLE after the queue service committed it), and without a key each retry queued another job."""
    return f"gateway-{uuid.uuid4()}"


def say_how_to_retry(error: errors.MeshError, key: str) -> errors.MeshError:
    """``error``, for a submit whose outcome is unknown (no answer: UNAVAILABLE, DEADLINE_EXCEEDED), telling the
    client the key under which a job may have been queued, so that its retry gets that job back."""
    if error.code in (errors.Unavailable.code, errors.DeadlineExceeded.code):
        error.message = (
            f"{error.message}; the job may have been queued before the answer was lost: send the same request "
            f"again with the header {HEADER}: {key} to get it back rather than queue it twice"
        )
        error.metadata["idempotency_key"] = key
    return error
